//! `EventLog`: one generation's numbered, already-encoded events. The
//! generation task appends; every connection reads from any position, so a
//! resume replays the very bytes first sent.

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

pub struct EventLog {
    state: watch::Sender<LogState>,
}

#[derive(Default)]
struct LogState {
    frames: Vec<Bytes>,
    bytes: usize,
    closed: bool,
}

impl Default for EventLog {
    fn default() -> Self {
        Self {
            state: watch::Sender::new(LogState::default()),
        }
    }
}

impl EventLog {
    /// Appends one event and wakes the readers; returns the bytes it added.
    pub fn push(&self, frame: Bytes) -> usize {
        let added = frame.len();
        self.state.send_modify(|s| {
            s.bytes += added;
            s.frames.push(frame);
        });
        added
    }

    /// Marks the log complete: readers end once they have read everything.
    pub fn close(&self) {
        self.state.send_modify(|s| s.closed = true);
    }

    /// Number of events written so far.
    pub fn len(&self) -> usize {
        self.state.borrow().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Encoded size of all events, the figure the resume budget counts.
    pub fn bytes(&self) -> usize {
        self.state.borrow().bytes
    }

    /// A reader that starts with event number `from` (0 = from the start).
    pub fn reader(&self, from: usize) -> LogReader {
        LogReader {
            rx: self.state.subscribe(),
            pos: from,
        }
    }
}

pub struct LogReader {
    rx: watch::Receiver<LogState>,
    pos: usize,
}

impl LogReader {
    /// Everything written after what this reader has seen, as one buffer so
    /// a fast producer costs one write per wake-up rather than one per token.
    /// `None` once the log is closed and read to its end. Cancel-safe.
    pub async fn next(&mut self) -> Option<Bytes> {
        loop {
            {
                let state = self.rx.borrow_and_update();
                if let Some(fresh) = state.frames.get(self.pos..).filter(|f| !f.is_empty()) {
                    self.pos = state.frames.len();
                    return Some(concat(fresh));
                }
                if state.closed {
                    return None;
                }
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

fn concat(frames: &[Bytes]) -> Bytes {
    if let [one] = frames {
        return one.clone();
    }
    let mut out = BytesMut::with_capacity(frames.iter().map(Bytes::len).sum());
    for frame in frames {
        out.extend_from_slice(frame);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_get_everything_after_their_position_then_end() {
        let log = EventLog::default();
        log.push(Bytes::from_static(b"a"));
        log.push(Bytes::from_static(b"b"));
        let mut from_start = log.reader(0);
        let mut from_one = log.reader(1);
        assert_eq!(from_start.next().await.as_deref(), Some(&b"ab"[..]));
        assert_eq!(from_one.next().await.as_deref(), Some(&b"b"[..]));

        let waiting = tokio::spawn(async move { from_one.next().await });
        tokio::task::yield_now().await;
        log.push(Bytes::from_static(b"c"));
        assert_eq!(waiting.await.expect("joined").as_deref(), Some(&b"c"[..]));

        log.close();
        assert_eq!(from_start.next().await.as_deref(), Some(&b"c"[..]));
        assert_eq!(from_start.next().await, None);
        assert_eq!(log.len(), 3);
        assert_eq!(log.bytes(), 3);
    }

    #[tokio::test]
    async fn a_reader_past_the_end_of_a_closed_log_ends_at_once() {
        let log = EventLog::default();
        log.push(Bytes::from_static(b"a"));
        log.close();
        assert_eq!(log.reader(5).next().await, None);
    }
}
