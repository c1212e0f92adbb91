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

/// The most bytes one event may take: a chunk of tokens is a few hundred.
const MAX_EVENT_BYTES: usize = 1 << 20;

/// The data of the event being read.
#[derive(Debug, Default)]
enum Data {
    #[default]
    None,
    /// One `data` line: where its value lies in the buffer.
    Line(usize, usize),
    /// Several, joined with LF.
    Joined(BytesMut),
}

#[derive(Debug, Default)]
pub(super) struct SseParser {
    /// The event being read, from its first line, and what follows it.
    buf: BytesMut,
    /// Where the event's next line starts in `buf`.
    at: usize,
    /// The byte-order mark was looked for.
    started: bool,
    /// The event being read.
    error: bool,
    data: Data,
}

impl SseParser {
    /// Adds a piece of the body, once the events before it are taken. An
    /// event still unfinished past [`MAX_EVENT_BYTES`] is an error.
    pub(super) fn push(&mut self, chunk: &[u8]) -> Result<(), String> {
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(format!(
                "the upstream sent an event longer than {MAX_EVENT_BYTES} bytes"
            ));
        }
        self.buf.extend_from_slice(chunk);
        if !self.started {
            const BOM: &[u8] = b"\xEF\xBB\xBF";
            if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
                // Too short to tell yet.
                return Ok(());
            }
            self.started = true;
            if self.buf.starts_with(BOM) {
                self.buf.advance(BOM.len());
            }
        }
        Ok(())
    }

    /// The body ended: a CR left at its very end ends its line.
    pub(super) fn close(&mut self) {
        if self.buf.ends_with(b"\r") {
            self.buf.extend_from_slice(b"\n");
        }
    }

    /// The next whole event in what was pushed, if there is one. Lines are
    /// read where they lie; the buffer gives up an event's bytes only once
    /// it is dispatched, a one-line `data` as a slice of them.
    pub(super) fn next_event(&mut self) -> Option<SseEvent> {
        if !self.started {
            return None;
        }
        loop {
            // Lines before an event's one `data` line (comments, other
            // fields) need not be kept: a body of endless comments holds
            // no memory.
            if !matches!(self.data, Data::Line(..)) && self.at > 0 {
                self.buf.advance(self.at);
                self.at = 0;
            }
            let start = self.at;
            let end = start + memchr::memchr2(b'\n', b'\r', &self.buf[start..])?;
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
            self.at = end + skip;
            if start == end {
                let error = std::mem::take(&mut self.error);
                let data = std::mem::take(&mut self.data);
                let event = self.buf.split_to(self.at);
                self.at = 0;
                let data = match data {
                    Data::None => continue,
                    Data::Line(from, to) => event.freeze().slice(from..to),
                    Data::Joined(joined) => joined.freeze(),
                };
                return Some(SseEvent { error, data });
            }
            let line = &self.buf[start..end];
            if line[0] == b':' {
                continue;
            }
            let (name, value) = match memchr::memchr(b':', line) {
                Some(colon) => {
                    let from = colon + 1 + usize::from(line.get(colon + 1) == Some(&b' '));
                    (colon, start + from)
                }
                None => (line.len(), end),
            };
            match &line[..name] {
                b"data" => {
                    self.data = match std::mem::take(&mut self.data) {
                        Data::None => Data::Line(value, end),
                        Data::Line(from, to) => {
                            let mut joined = BytesMut::with_capacity(to - from + 1 + end - value);
                            joined.extend_from_slice(&self.buf[from..to]);
                            joined.extend_from_slice(b"\n");
                            joined.extend_from_slice(&self.buf[value..end]);
                            Data::Joined(joined)
                        }
                        Data::Joined(mut joined) => {
                            joined.extend_from_slice(b"\n");
                            joined.extend_from_slice(&self.buf[value..end]);
                            Data::Joined(joined)
                        }
                    };
                }
                b"event" => self.error = &self.buf[value..end] == b"error",
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
            parser.push(piece).expect("short events");
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

    #[test]
    fn endless_comments_hold_no_memory_and_an_endless_event_is_an_error() {
        let mut parser = SseParser::default();
        for _ in 0..100_000 {
            parser.push(b": keep-alive\nid: 1\n").expect("comments");
            assert_eq!(parser.next_event(), None);
        }
        assert!(parser.buf.len() < 64, "{} bytes held", parser.buf.len());
        let line = vec![b'x'; 64 * 1024];
        parser.push(b"data: ").expect("a start");
        let mut pushed = Ok(());
        for _ in 0..17 {
            pushed = pushed.and_then(|()| parser.push(&line));
            assert_eq!(parser.next_event(), None);
        }
        assert!(pushed.expect_err("too long").contains("longer than"));
    }
}
