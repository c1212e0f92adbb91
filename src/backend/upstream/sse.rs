//! Server-sent events read from an upstream's body, as the HTML standard
//! parses them: lines end in CR LF, LF or CR; `data` lines join with LF;
//! an `event` names the event; comments and other fields are skipped; an
//! event is dispatched at a blank line, and one the body cuts short is
//! dropped.
//!
//! Written here rather than taken from a crate because the relay reads
//! every token through it: a single-line `data` field (every upstream's
//! chunks) is a slice of the body's bytes, with no copy and no parser
//! combinators. (eventsource-stream's parse took about a fifth of the
//! relay's CPU under load, measured with `perf`.)

use bytes::{Buf, Bytes, BytesMut};

/// One dispatched event.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct SseEvent {
    /// Named `error` (the other names do not matter to the relay).
    pub(super) error: bool,
    pub(super) data: Bytes,
}

#[derive(Debug, Default)]
pub(super) struct SseParser {
    /// Bytes not yet split into lines.
    buf: BytesMut,
    /// The byte-order mark was looked for.
    started: bool,
    /// The event being read.
    error: bool,
    data: Option<Bytes>,
}

impl SseParser {
    /// Adds a piece of the body.
    pub(super) fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        if !self.started {
            const BOM: &[u8] = b"\xEF\xBB\xBF";
            if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
                // Too short to tell yet.
                return;
            }
            self.started = true;
            if self.buf.starts_with(BOM) {
                self.buf.advance(BOM.len());
            }
        }
    }

    /// The body ended: a CR left at its very end ends its line.
    pub(super) fn close(&mut self) {
        if self.buf.ends_with(b"\r") {
            self.buf.extend_from_slice(b"\n");
        }
    }

    /// The next whole event in what was pushed, if there is one.
    pub(super) fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.buf.iter().position(|b| *b == b'\n' || *b == b'\r')?;
            let crlf = self.buf[end] == b'\r';
            // A CR last in the buffer may be the first half of CR LF.
            if crlf && end + 1 == self.buf.len() {
                return None;
            }
            let skip = if crlf && self.buf[end + 1] == b'\n' {
                2
            } else {
                1
            };
            let line = self.buf.split_to(end).freeze();
            self.buf.advance(skip);
            if line.is_empty() {
                let error = std::mem::take(&mut self.error);
                if let Some(data) = self.data.take() {
                    return Some(SseEvent { error, data });
                }
                continue;
            }
            if line[0] == b':' {
                continue;
            }
            let (name, value) = match line.iter().position(|b| *b == b':') {
                Some(colon) => {
                    let mut value = line.slice(colon + 1..);
                    if value.first() == Some(&b' ') {
                        value.advance(1);
                    }
                    (line.slice(..colon), value)
                }
                None => (line.clone(), Bytes::new()),
            };
            match &name[..] {
                b"data" => {
                    self.data = Some(match self.data.take() {
                        None => value,
                        Some(before) => {
                            let mut joined =
                                BytesMut::with_capacity(before.len() + 1 + value.len());
                            joined.extend_from_slice(&before);
                            joined.extend_from_slice(b"\n");
                            joined.extend_from_slice(&value);
                            joined.freeze()
                        }
                    });
                }
                b"event" => self.error = &value[..] == b"error",
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(pieces: &[&[u8]]) -> Vec<(bool, String)> {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        for piece in pieces {
            parser.push(piece);
            while let Some(e) = parser.next_event() {
                out.push((e.error, String::from_utf8(e.data.to_vec()).expect("utf-8")));
            }
        }
        parser.close();
        while let Some(e) = parser.next_event() {
            out.push((e.error, String::from_utf8(e.data.to_vec()).expect("utf-8")));
        }
        out
    }

    #[test]
    fn events_split_anywhere_and_every_line_ending_read_alike() {
        let whole: &[u8] = b"data: {\"a\":1}\n\ndata: [DONE]\n\n";
        let expected = vec![
            (false, "{\"a\":1}".to_owned()),
            (false, "[DONE]".to_owned()),
        ];
        for cut in 0..whole.len() {
            assert_eq!(
                events(&[&whole[..cut], &whole[cut..]]),
                expected,
                "cut at {cut}"
            );
        }
        assert_eq!(
            events(&[b"data: {\"a\":1}\r\n\r\ndata: [DONE]\r\n\r\n"]),
            expected
        );
        assert_eq!(
            events(&[b"data: {\"a\":1}\r\rdata: [DONE]\r", b"\r"]),
            expected
        );
        // A CR at the very end of the body still ends its line.
        assert_eq!(events(&[b"data: {\"a\":1}\r\rdata: [DONE]\r\r"]), expected);
    }

    #[test]
    fn fields_comments_names_and_a_cut_event_follow_the_standard() {
        let got = events(&[
            b"\xEF\xBB\xBF: keep-alive\nid: 7\nretry: 10\ndata:a\ndata: b\n\n",
            b"event: error\ndata: {\"message\":\"no\"}\n\n",
            b"event: ping\n\n",
            b"data\n\n",
            b"data: cut short",
        ]);
        assert_eq!(
            got,
            vec![
                (false, "a\nb".to_owned()),
                (true, "{\"message\":\"no\"}".to_owned()),
                (false, String::new()),
            ]
        );
        // A byte-order mark cut in pieces is still skipped.
        assert_eq!(
            events(&[b"\xEF", b"\xBB", b"\xBFdata: x\n\n"]),
            vec![(false, "x".to_owned())]
        );
    }
}
