//! An upstream's error message made fit for a client: what looks like a
//! credential removed, and its length bounded.

/// Longest message passed on, in bytes.
const MAX_MESSAGE: usize = 1024;
const REDACTED: &str = "[redacted]";

/// `message` without the configured upstream key, bearer tokens, `sk-`
/// style keys, `key=`/`token=` parameters and passwords in URLs.
pub(super) fn redact(message: &str, api_key: Option<&str>) -> String {
    let message = match api_key.filter(|k| !k.is_empty()) {
        Some(key) => message.replace(key, REDACTED),
        None => message.to_owned(),
    };
    let mut out = String::with_capacity(message.len());
    let mut after_scheme = false;
    for piece in message.split_inclusive(is_separator) {
        let (word, separator) = match piece.char_indices().next_back() {
            Some((at, c)) if is_separator(c) => piece.split_at(at),
            _ => (piece, ""),
        };
        let secret = !word.is_empty() && (after_scheme || looks_secret(word));
        out.push_str(if secret { REDACTED } else { word });
        out.push_str(separator);
        if !word.is_empty() {
            after_scheme =
                word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic");
        }
    }
    truncate(out)
}

fn is_separator(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '`' | ',' | ';' | '(' | ')' | '<' | '>')
}

fn looks_secret(word: &str) -> bool {
    let lower = word.to_ascii_lowercase();
    let prefixed = ["sk-", "sk_", "hf_", "gsk_", "xai-", "ghp_", "github_pat_"]
        .iter()
        .any(|p| lower.starts_with(p) && word.len() >= p.len() + 8);
    let parameter = ["key=", "token=", "secret=", "password=", "signature="]
        .iter()
        .any(|p| lower.contains(p));
    prefixed || parameter || url_with_password(word)
}

/// `scheme://user:password@host...`
fn url_with_password(word: &str) -> bool {
    word.split_once("://").is_some_and(|(_, rest)| {
        let authority = rest.split('/').next().unwrap_or("");
        authority
            .split_once('@')
            .is_some_and(|(userinfo, _)| userinfo.contains(':'))
    })
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_removed_and_the_rest_is_kept() {
        let message = "CUDA out of memory (key sk-proj-abcdefghijkl, header Bearer tok123, \
            url https://bob:hunter2@db.internal/x?api_key=zzz, upstream-secret)";
        let clean = redact(message, Some("upstream-secret"));
        for secret in [
            "abcdefghijkl",
            "tok123",
            "hunter2",
            "zzz",
            "upstream-secret",
        ] {
            assert!(!clean.contains(secret), "{secret} in {clean}");
        }
        assert!(clean.starts_with("CUDA out of memory (key [redacted], header Bearer [redacted]"));
    }

    #[test]
    fn plain_messages_pass_unchanged_and_long_ones_are_cut() {
        let plain = "model overloaded; retry later";
        assert_eq!(redact(plain, None), plain);
        let long = "é".repeat(2000);
        let cut = redact(&long, None);
        assert!(cut.len() <= MAX_MESSAGE + '…'.len_utf8());
    }
}
