//! `GET /` and `GET /ui/{file}`: the built-in chat page and its few files
//! (its modules, its styles, and three pinned libraries: marked renders
//! markdown, DOMPurify sanitizes it, highlight.js colours code), compiled
//! into the binary.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use super::error::ApiError;

const PAGE: &str = include_str!("../../web/index.html");

/// What `/ui/` serves: path, media type, content.
const FILES: &[(&str, &str, &str)] = &[
    ("app.js", JAVASCRIPT, include_str!("../../web/app.js")),
    (
        "markdown.js",
        JAVASCRIPT,
        include_str!("../../web/markdown.js"),
    ),
    ("store.js", JAVASCRIPT, include_str!("../../web/store.js")),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../web/style.css"),
    ),
    (
        "vendor/marked.esm.js",
        JAVASCRIPT,
        include_str!("../../web/vendor/marked.esm.js"),
    ),
    (
        "vendor/highlight.min.js",
        JAVASCRIPT,
        include_str!("../../web/vendor/highlight.min.js"),
    ),
    (
        "vendor/purify.es.mjs",
        JAVASCRIPT,
        include_str!("../../web/vendor/purify.es.mjs"),
    ),
];

const JAVASCRIPT: &str = "text/javascript; charset=utf-8";

/// Scripts only from the page's own files (no inline script, no event
/// handler attribute, nothing from elsewhere), styles likewise, images
/// from here or inline data, requests only to this server.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// A validator per file, so that a browser revalidates (`no-cache`) and
/// gets 304 while the binary is the same.
static TAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    FILES
        .iter()
        .map(|(_, _, body)| {
            // FNV-1a: enough to tell one build's file from another's.
            let hash = body.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            format!("\"{hash:016x}\"")
        })
        .collect()
});

pub(crate) async fn index() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(PAGE),
    )
}

pub(crate) async fn file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    let Some(at) = FILES.iter().position(|(name, _, _)| *name == path) else {
        return ApiError::RouteNotFound(format!("/ui/{path}")).into_response();
    };
    let (_, kind, body) = FILES[at];
    let tag = &TAGS[at];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let etag = HeaderValue::from_str(tag).unwrap_or(HeaderValue::from_static("\"\""));
    let common = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, etag),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, HeaderValue::from_static(kind))],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_files_that_are_served_and_runs_no_inline_script() {
        for needed in ["/ui/style.css", "/ui/app.js"] {
            assert!(PAGE.contains(needed), "{needed}");
        }
        assert!(!PAGE.contains("<script>") && !PAGE.contains("<style>"));
        let handler = PAGE
            .split_whitespace()
            .any(|w| w.starts_with("on") && w.contains('='));
        assert!(!handler, "no inline event handler");
        // Every import of the page's modules is a file served here.
        for (name, _, body) in FILES.iter().filter(|(n, _, _)| n.ends_with(".js")) {
            for line in body.lines().filter(|l| l.starts_with("import ")) {
                let from = line.rsplit(" from ").next().unwrap_or_default();
                let target = from.trim_matches(|c| c == '"' || c == ';' || c == '\'');
                let target = target.trim_start_matches("./");
                assert!(
                    FILES.iter().any(|(n, _, _)| *n == target),
                    "{name} imports {target}, which is not served"
                );
            }
        }
    }

    #[test]
    fn the_served_libraries_are_the_pinned_releases_unedited() {
        let sums = include_str!("../../web/vendor/SHA256SUMS");
        let mut checked = 0;
        for (name, _, body) in FILES.iter().filter(|(n, _, _)| n.starts_with("vendor/")) {
            let file = name.trim_start_matches("vendor/");
            let expected = sums
                .lines()
                .find_map(|l| l.strip_suffix(file)?.strip_suffix("  "))
                .unwrap_or_else(|| panic!("{file} is in web/vendor/SHA256SUMS"));
            let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
            let actual: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(
                actual, expected,
                "{file} differs from its release (scripts/vendor-web)"
            );
            checked += 1;
        }
        assert_eq!(checked, 3);
    }
}
