//! The common upstream chunk read without a JSON parser: one choice, index
//! 0, its text and maybe its finish reason, beside fields that sluicegate
//! sets itself (`id`, `created`, `model`, ...). That is nearly every chunk
//! of a stream, and a parser building even a borrowed struct was a fifth
//! of the relay's CPU under load.
//!
//! A chunk that is anything else, or that this reader would have to
//! interpret where a parser could disagree (escapes outside the text,
//! nesting in fields it skips, duplicate keys), is declined whole, and the
//! relay reads it the long way. So the only answers it gives are ones the
//! parser would give. The text's own escapes (a newline, a quote: common
//! in answers) are decoded here, as JSON defines them; one it could not
//! decode the same way (a lone surrogate) declines the chunk. Decoded
//! text goes into a buffer the caller keeps, not one of its own per chunk.

/// What the scanned chunk carries.
#[derive(Debug)]
pub(super) struct Plain<'a> {
    /// The first choice's text: its delta's content in a chat chunk, its
    /// `text` in a legacy completion's. In the chunk, or in the buffer
    /// its escapes were decoded into.
    pub(super) text: Option<&'a str>,
    pub(super) finish_reason: Option<&'a str>,
}

/// The chunk `data` as [`Plain`], or `None`: not that shape. A text with
/// escapes is decoded into `decoded` (what it held is replaced).
pub(super) fn plain<'a>(data: &'a str, chat: bool, decoded: &'a mut String) -> Option<Plain<'a>> {
    let mut scan = Scan {
        data,
        at: 0,
        decoded: &mut *decoded,
    };
    let mut choice = None;
    scan.object(|scan, key| match key {
        "choices" if choice.is_none() => {
            choice = Some(scan.choices(chat)?);
            Some(())
        }
        "choices" => None,
        "usage" | "error" => scan.null(),
        _ => scan.scalar(),
    })?;
    scan.end()?;
    // No `choices` at all: nothing to take, as the parser would find.
    let (text, finish_reason) = choice.unwrap_or_default();
    let decoded: &'a str = decoded;
    Some(Plain {
        text: text.map(|text| match text {
            Text::Plain(plain) => plain,
            Text::Decoded => decoded,
        }),
        finish_reason,
    })
}

/// A string read from the chunk.
#[derive(Debug, Clone, Copy)]
enum Text<'a> {
    /// It had no escapes: its bytes in the chunk.
    Plain(&'a str),
    /// Its escapes are decoded in [`Scan::decoded`].
    Decoded,
}

struct Scan<'a, 'b> {
    data: &'a str,
    at: usize,
    decoded: &'b mut String,
}

impl<'a> Scan<'a, '_> {
    fn peek(&mut self) -> Option<u8> {
        let bytes = self.data.as_bytes();
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(self.at) {
            self.at += 1;
        }
        bytes.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        self.peek()?;
        self.data[self.at..]
            .starts_with(word)
            .then(|| self.at += word.len())
    }

    fn end(&mut self) -> Option<()> {
        self.peek().is_none().then_some(())
    }

    fn null(&mut self) -> Option<()> {
        self.literal("null")
    }

    /// A string with no escapes (nor the control characters JSON refuses
    /// unescaped): its contents, borrowed. One with escapes is declined:
    /// outside the text, which [`Self::text`] reads, a parser's reading
    /// of them is not worth matching.
    fn string(&mut self) -> Option<&'a str> {
        match self.text()? {
            Text::Plain(plain) => Some(plain),
            Text::Decoded => None,
        }
    }

    /// A string, its escapes decoded into [`Self::decoded`] if it has any
    /// (what was there is replaced: a chunk keeps one decoded string, its
    /// text, since escapes anywhere else decline it).
    fn text(&mut self) -> Option<Text<'a>> {
        self.eat(b'"')?;
        let bytes = self.data.as_bytes();
        let mut at = self.at;
        let mut escaped = false;
        loop {
            let rest = &bytes[at..];
            let len = run_length(rest)?;
            // `"` and `\` are ASCII: both ends are character boundaries.
            let run = &self.data[at..at + len];
            at += len;
            if bytes[at] == b'"' {
                self.at = at + 1;
                if !escaped {
                    return Some(Text::Plain(run));
                }
                self.decoded.push_str(run);
                return Some(Text::Decoded);
            }
            if !escaped {
                escaped = true;
                self.decoded.clear();
            }
            self.decoded.push_str(run);
            let escape = *bytes.get(at + 1)?;
            at += 2;
            self.decoded.push(match escape {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let unit = hex4(bytes.get(at..at + 4)?)?;
                    at += 4;
                    let code = if (0xD800..0xDC00).contains(&unit) {
                        // A leading surrogate: its trailing one must follow.
                        if bytes.get(at..at + 2)? != b"\\u" {
                            return None;
                        }
                        let low = hex4(bytes.get(at + 2..at + 6)?)?;
                        if !(0xDC00..0xE000).contains(&low) {
                            return None;
                        }
                        at += 6;
                        0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                    } else {
                        unit
                    };
                    // A lone trailing surrogate is no character: declined.
                    char::from_u32(code)?
                }
                _ => return None,
            });
        }
    }

    /// [`Self::text`] or `null`.
    fn text_or_null(&mut self) -> Option<Option<Text<'a>>> {
        match self.peek()? {
            b'n' => self.null().map(|()| None),
            _ => self.text().map(Some),
        }
    }

    /// A string or `null`.
    fn string_or_null(&mut self) -> Option<Option<&'a str>> {
        match self.peek()? {
            b'n' => self.null().map(|()| None),
            _ => self.string().map(Some),
        }
    }

    /// A number as servers write ids and timestamps: `-`? (`0` |
    /// [1-9][0-9]*) (`.`[0-9]+)?, its whole part at most 18 digits. No
    /// exponent and no longer whole part: one a parser might find out of
    /// range.
    fn number(&mut self) -> Option<()> {
        self.peek()?;
        let bytes = self.data.as_bytes();
        let digits = |at: &mut usize| {
            let start = *at;
            while bytes.get(*at).is_some_and(u8::is_ascii_digit) {
                *at += 1;
            }
            *at - start
        };
        let mut at = self.at;
        if bytes.get(at) == Some(&b'-') {
            at += 1;
        }
        match bytes.get(at) {
            Some(b'0') => at += 1,
            Some(b'1'..=b'9') => (digits(&mut at) <= 18).then_some(())?,
            _ => return None,
        }
        if bytes.get(at) == Some(&b'.') {
            at += 1;
            (digits(&mut at) > 0).then_some(())?;
        }
        self.at = at;
        Some(())
    }

    /// A string, number, `true`, `false` or `null`, skipped.
    fn scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.null(),
            _ => self.number(),
        }
    }

    /// An object, each key handed to `field`, which reads its value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            field(self, key)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// `choices`: none, or the one choice with index 0.
    fn choices(&mut self, chat: bool) -> Option<(Option<Text<'a>>, Option<&'a str>)> {
        self.eat(b'[')?;
        let mut plain = (None, None);
        if self.eat(b']').is_some() {
            return Some(plain);
        }
        let (mut index, mut text, mut finish) = (false, false, false);
        self.object(|scan, key| match key {
            // `0` and nothing more: `01` or `0.0` leaves a byte that is
            // neither `,` nor `}`, and the object is declined.
            "index" if !index => {
                index = true;
                scan.literal("0")
            }
            "delta" if chat && !text => {
                text = true;
                plain.0 = scan.delta()?;
                Some(())
            }
            "text" if !chat && !text => {
                text = true;
                plain.0 = scan.text_or_null()?;
                Some(())
            }
            "finish_reason" if !finish => {
                finish = true;
                plain.1 = scan.string_or_null()?;
                Some(())
            }
            "logprobs" | "stop_reason" => scan.null(),
            "index" | "delta" | "text" | "finish_reason" => None,
            _ => scan.scalar(),
        })?;
        // A missing index is 0 to the parser too.
        self.eat(b']')?;
        Some(plain)
    }

    /// A chat delta with nothing but its role and content (the other
    /// fields servers send beside them, only as `null`): its content.
    fn delta(&mut self) -> Option<Option<Text<'a>>> {
        let mut content = None;
        let (mut role, mut seen_content) = (false, false);
        self.object(|scan, key| match key {
            "content" if !seen_content => {
                seen_content = true;
                content = scan.text_or_null()?;
                Some(())
            }
            "role" if !role => {
                role = true;
                scan.scalar()
            }
            "tool_calls" | "function_call" | "refusal" | "reasoning_content" | "reasoning" => {
                scan.null()
            }
            _ => None,
        })?;
        Some(content)
    }
}

/// How many bytes of `rest` precede its first `"` or `\\`; `None` if a
/// control character (which JSON refuses unescaped) comes first, or
/// neither comes. Eight bytes at a time, in a word: most strings of a
/// chunk (its keys, a token's text) are a few bytes, too short for a
/// vector search to pay for setting itself up.
fn run_length(rest: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    // The bytes of `word` below `n` (for `n` <= 0x80), each marked by
    // its high bit. Marks above the lowest one can be wrong (a borrow
    // runs up from it); the lowest is right.
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH;
    let stops = |word: u64| {
        below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1)
            | below(word, 0x20)
    };
    let mut at = 0;
    let len = loop {
        let Some(word) = rest.get(at..at + 8) else {
            break at
                + rest[at..]
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        };
        let mut bytes = [0; 8];
        bytes.copy_from_slice(word);
        let found = stops(u64::from_le_bytes(bytes));
        if found != 0 {
            break at + found.trailing_zeros() as usize / 8;
        }
        at += 8;
    };
    (rest[len] >= 0x20).then_some(len)
}

/// Four hex digits, as JSON's `\\u` takes them (either case).
fn hex4(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0, |code, &d| {
        let value = char::from(d).to_digit(16)?;
        Some(code << 4 | value)
    })
}
