//! Event logs: one generation's numbered, already-encoded events, and the
//! one way every connection reads them, by position.
//!
//! A log lives in this process ([`MemoryLog`], written by the generation's
//! task) or in Redis (`replicas::RedisLog`, mirrored by the instance that
//! runs the generation). Both are a [`LogSource`]; a [`LogReader`] holds a
//! source and a position, never a copy, and takes at most [`READ_LIMIT`]
//! bytes at a time, so a reader that stops reading costs only what is in
//! flight to it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

/// Most bytes one read hands out (always at least one whole event).
pub const READ_LIMIT: usize = 32 * 1024;

/// Whole events, concatenated, read from one position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub bytes: Bytes,
    /// How many events `bytes` holds.
    pub events: usize,
}

/// What a read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    Events(Batch),
    /// The log is complete and the position is past its last event.
    End,
}

/// Why a log cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Redis unreachable, after retries.
    #[error("{0}")]
    Unreachable(String),
    /// The log was dropped (its TTL ran out, or the resume budget needed
    /// the room) before this reader got to the end.
    #[error("the log was dropped before it was read to its end")]
    Dropped,
    /// The reader asked for an event past the end of the finished log.
    #[error("event {0} was never written: the generation ended before it")]
    NotWritten(usize),
}

/// Somewhere a generation's events can be read from.
#[async_trait]
pub trait LogSource: Send + Sync {
    /// Events from number `from` on, whole ones up to `limit` bytes (at
    /// least one). Waits while there is none yet and the log is open.
    /// Cancel-safe: dropping the future loses nothing.
    async fn read(&self, from: usize, limit: usize) -> Result<Read, LogError>;

    /// Like [`Self::read`] without waiting: `None` while nothing after
    /// `from` is there yet.
    async fn read_now(&self, from: usize, limit: usize) -> Result<Option<Read>, LogError>;
}

/// One connection's place in a log.
pub struct LogReader {
    source: Arc<dyn LogSource>,
    pos: usize,
    /// It has read the log's last event (`[DONE]`): whatever a source
    /// might still say after it is not read.
    ended: bool,
}

/// The data line of the event that ends every log.
const DONE_EVENT: &[u8] = b"data: [DONE]\n";

/// Whether a batch's last event is the one that ends a log.
fn ends_log(batch: &[u8]) -> bool {
    let last = batch
        .strip_suffix(b"\n\n")
        .and_then(|b| b.rsplit(|&c| c == b'\n').nth(1))
        .unwrap_or_default();
    // The event's lines: `data: [DONE]`, then its `id:` line.
    last.len() + 1 == DONE_EVENT.len() && DONE_EVENT.starts_with(last)
}

impl LogReader {
    pub fn new(source: Arc<dyn LogSource>, from: usize) -> Self {
        Self {
            source,
            pos: from,
            ended: false,
        }
    }

    /// The number of the next event this reader will get.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// What [`Self::next`] would give now, without waiting; `Ok(None)`
    /// both at the end and while nothing new is there yet (see `ended`).
    pub async fn next_now(&mut self) -> Result<Option<Bytes>, LogError> {
        if self.ended {
            return Ok(None);
        }
        match self.source.read_now(self.pos, READ_LIMIT).await? {
            Some(Read::Events(batch)) => {
                self.pos += batch.events;
                self.ended = ends_log(&batch.bytes);
                Ok(Some(batch.bytes))
            }
            Some(Read::End) | None => Ok(None),
        }
    }

    /// The next events, as one buffer so a fast producer costs one write
    /// per wake-up rather than one per token; `None` at the end of a
    /// complete log. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Bytes>, LogError> {
        if self.ended {
            return Ok(None);
        }
        match self.source.read(self.pos, READ_LIMIT).await? {
            Read::Events(batch) => {
                self.pos += batch.events;
                self.ended = ends_log(&batch.bytes);
                Ok(Some(batch.bytes))
            }
            Read::End => Ok(None),
        }
    }
}

/// A log in this process: the generation's task appends, readers walk it.
/// The events sit in one buffer with their end offsets, so a retained log
/// costs its bytes plus four per event.
///
/// A mutex and one `Notify`, not a `watch` channel: a watch wakes its
/// receivers through eight `Notify`s, each locked on every send, and a
/// relay pushes an event per token.
#[derive(Default)]
pub struct MemoryLog {
    frames: Mutex<Frames>,
    /// Woken after every change.
    changed: Notify,
}

#[derive(Default)]
struct Frames {
    data: Vec<u8>,
    /// End offset of each event in `data`.
    ends: Vec<u32>,
    closed: bool,
    /// Emptied by the registry: a reader still connected holds nothing.
    dropped: bool,
}

impl Frames {
    fn start_of(&self, event: usize) -> usize {
        match event {
            0 => 0,
            n => self.ends[n - 1] as usize,
        }
    }

    /// Events `from..` that fit in `limit` bytes, at least one: their
    /// bytes and how many they are.
    fn span(&self, from: usize, limit: usize) -> (&[u8], usize) {
        let start = self.start_of(from);
        let fitting = self.ends[from..].partition_point(|&end| end as usize - start <= limit);
        let events = fitting.max(1);
        let end = self.ends[from + events - 1] as usize;
        (&self.data[start..end], events)
    }

    fn window(&self, from: usize, limit: usize) -> Batch {
        let (bytes, events) = self.span(from, limit);
        Batch {
            bytes: Bytes::copy_from_slice(bytes),
            events,
        }
    }
}

impl MemoryLog {
    fn frames(&self) -> MutexGuard<'_, Frames> {
        // What runs under it appends and reads bytes, which does not
        // panic; a poisoned lock would be taken over as it is.
        self.frames.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the frames and wakes the readers.
    fn modify(&self, f: impl FnOnce(&mut Frames)) {
        f(&mut self.frames());
        self.changed.notify_waiters();
    }

    /// Waits until `f` finds what it waits for in the frames. `f` runs
    /// under the lock, so it must be quick. Cancel-safe.
    async fn wait_for<R>(&self, mut f: impl FnMut(&Frames) -> Option<R>) -> R {
        loop {
            // Registered before looking, so a change between the look and
            // the wait still wakes it.
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if let Some(found) = f(&self.frames()) {
                return found;
            }
            changed.await;
        }
    }

    /// Appends one event and wakes the readers.
    pub fn push(&self, frame: &[u8]) {
        self.push_with(|data| data.extend_from_slice(frame));
    }

    /// Appends the one event `write` appends to the buffer, written where
    /// it goes (no buffer of its own to copy), and wakes the readers;
    /// returns the log's size in bytes after it, as [`Self::bytes`] would.
    /// `write` runs under the lock, so it must be quick.
    pub fn push_with(&self, write: impl FnOnce(&mut Vec<u8>)) -> usize {
        let mut size = 0;
        self.modify(|s| {
            write(&mut s.data);
            size = s.data.len();
            // A log is capped far below 4 GiB (`--max-log-bytes`).
            s.ends.push(u32::try_from(size).unwrap_or(u32::MAX));
        });
        size
    }

    /// Marks the log complete (readers end once they have read it all) and
    /// gives back the spare capacity of its buffers.
    pub fn close(&self) {
        self.modify(|s| {
            s.closed = true;
            s.data.shrink_to_fit();
            s.ends.shrink_to_fit();
        });
    }

    /// Frees the events of a log the registry no longer keeps; a reader
    /// still connected then ends instead of holding them.
    pub fn drop_events(&self) {
        self.modify(|s| {
            s.dropped = true;
            s.closed = true;
            s.data = Vec::new();
            s.ends = Vec::new();
        });
    }

    /// Number of events written so far.
    pub fn len(&self) -> usize {
        self.frames().ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_closed(&self) -> bool {
        self.frames().closed
    }

    /// Encoded size of the events.
    pub fn bytes(&self) -> usize {
        self.frames().data.len()
    }

    /// Like [`LogSource::read`], for the mirror: hands the window's bytes
    /// to `f` where they lie (no copy), and returns what `f` made of them,
    /// how many events they are and whether they end the closed log.
    /// `None` once the log is complete and read. `f` runs while the log's
    /// writer waits, so it must be quick.
    pub async fn window_with<R>(
        &self,
        from: usize,
        limit: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Option<(R, usize, bool)> {
        let mut f = Some(f);
        self.wait_for(|state| {
            if from < state.ends.len() {
                let (bytes, events) = state.span(from, limit);
                let last = state.closed && from + events == state.ends.len();
                // Taken once: the wait ends here.
                return f.take().map(|f| Some((f(bytes), events, last)));
            }
            state.closed.then_some(None)
        })
        .await
    }

    /// The whole closed log handed to `f` where it lies, with its number
    /// of events, when it is not empty and fits in `limit` bytes (one
    /// window of [`Self::window_with`] from 0 that is also the last).
    pub fn whole_with<R>(&self, limit: usize, f: impl FnOnce(&[u8]) -> R) -> Option<(R, usize)> {
        let state = self.frames();
        if !state.closed || state.ends.is_empty() {
            return None;
        }
        let (bytes, events) = state.span(0, limit);
        (events == state.ends.len()).then(|| (f(bytes), events))
    }

    /// Memory the log's buffers hold, the figure the resume budget counts.
    pub fn held_bytes(&self) -> usize {
        let s = self.frames();
        s.data.capacity() + s.ends.capacity() * std::mem::size_of::<u32>()
    }

    /// What a read from `from` finds now; `None` while the open log has
    /// nothing after it.
    fn read_at(state: &Frames, from: usize, limit: usize) -> Option<Result<Read, LogError>> {
        if state.dropped {
            return Some(Err(LogError::Dropped));
        }
        if from < state.ends.len() {
            return Some(Ok(Read::Events(state.window(from, limit))));
        }
        state.closed.then(|| {
            if from == state.ends.len() {
                Ok(Read::End)
            } else {
                Err(LogError::NotWritten(from))
            }
        })
    }
}

#[async_trait]
impl LogSource for MemoryLog {
    async fn read_now(&self, from: usize, limit: usize) -> Result<Option<Read>, LogError> {
        match Self::read_at(&self.frames(), from, limit) {
            // Past the end of a complete log: nothing more, as at its end.
            Some(Err(LogError::NotWritten(_))) => Ok(Some(Read::End)),
            found => found.transpose(),
        }
    }

    async fn read(&self, from: usize, limit: usize) -> Result<Read, LogError> {
        self.wait_for(|state| Self::read_at(state, from, limit))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(log: &Arc<MemoryLog>, from: usize) -> LogReader {
        LogReader::new(Arc::clone(log) as Arc<dyn LogSource>, from)
    }

    async fn next(reader: &mut LogReader) -> Option<Bytes> {
        reader.next().await.expect("a memory log never fails")
    }

    #[tokio::test]
    async fn readers_get_everything_after_their_position_then_end() {
        let log = Arc::new(MemoryLog::default());
        log.push(b"a");
        log.push(b"b");
        let mut from_start = reader(&log, 0);
        let mut from_one = reader(&log, 1);
        assert_eq!(next(&mut from_start).await.as_deref(), Some(&b"ab"[..]));
        assert_eq!(next(&mut from_one).await.as_deref(), Some(&b"b"[..]));

        let waiting = tokio::spawn(async move { next(&mut from_one).await });
        tokio::task::yield_now().await;
        log.push(b"c");
        assert_eq!(waiting.await.expect("joined").as_deref(), Some(&b"c"[..]));

        log.close();
        assert_eq!(next(&mut from_start).await.as_deref(), Some(&b"c"[..]));
        assert_eq!(next(&mut from_start).await, None);
        assert_eq!(from_start.position(), 3);
        assert_eq!((log.len(), log.bytes()), (3, 3));
    }

    /// Readers already waiting when the log changes: each change wakes
    /// them, whichever it is.
    #[tokio::test]
    async fn waiting_readers_wake_on_every_kind_of_change() {
        let bound = std::time::Duration::from_secs(10);
        let log = Arc::new(MemoryLog::default());
        let waiting = |from| {
            let log = Arc::clone(&log);
            tokio::spawn(async move { log.read(from, READ_LIMIT).await })
        };
        let mirror = {
            let log = Arc::clone(&log);
            tokio::spawn(async move { log.window_with(0, READ_LIMIT, <[u8]>::to_vec).await })
        };
        let (first, second) = (waiting(0), waiting(1));
        tokio::task::yield_now().await;
        log.push(b"a");
        let read = tokio::time::timeout(bound, first)
            .await
            .expect("woken by a push");
        assert!(matches!(read.expect("joined"), Ok(Read::Events(b)) if b.bytes == "a"));
        let window = tokio::time::timeout(bound, mirror)
            .await
            .expect("woken by a push");
        assert_eq!(window.expect("joined"), Some((b"a".to_vec(), 1, false)));
        log.close();
        let read = tokio::time::timeout(bound, second)
            .await
            .expect("woken by the close");
        assert!(matches!(read.expect("joined"), Ok(Read::End)));

        let log = Arc::new(MemoryLog::default());
        let waiting = {
            let log = Arc::clone(&log);
            tokio::spawn(async move { log.read(0, READ_LIMIT).await })
        };
        tokio::task::yield_now().await;
        log.drop_events();
        let read = tokio::time::timeout(bound, waiting)
            .await
            .expect("woken by the drop");
        assert!(matches!(read.expect("joined"), Err(LogError::Dropped)));
    }

    #[tokio::test]
    async fn a_reader_stops_at_done_whatever_its_source_says_after() {
        let log = Arc::new(MemoryLog::default());
        log.push(b"data: {}\nid: a.0\n\n");
        log.push(b"data: [DONE]\nid: a.1\n\n");
        let mut r = reader(&log, 0);
        assert!(
            next(&mut r)
                .await
                .is_some_and(|b| b.ends_with(b"id: a.1\n\n"))
        );
        // A source that goes on after the end (a log written again under
        // a reader) is not read past it.
        log.push(b"data: {\"error\": {}}\nid: a.2\n\n");
        assert_eq!(next(&mut r).await, None);
        assert!(ends_log(b"data: {}\nid: a.0\n\ndata: [DONE]\nid: a.1\n\n"));
        assert!(!ends_log(b"data: [DONE]\nid: a.1\n\ndata: {}\nid: a.2\n\n"));
        assert!(!ends_log(b"retry: 1000\ndata: {}\nid: a.0\n\n"));
    }

    #[tokio::test]
    async fn a_reader_past_the_end_of_a_closed_log_is_told_at_once() {
        let log = Arc::new(MemoryLog::default());
        log.push(b"a");
        log.close();
        assert_eq!(next(&mut reader(&log, 1)).await, None);
        assert!(matches!(
            reader(&log, 5).next().await,
            Err(LogError::NotWritten(5))
        ));
    }

    #[tokio::test]
    async fn one_read_hands_out_whole_events_up_to_the_limit() {
        let log = MemoryLog::default();
        for frame in [&b"aaaa"[..], b"bbbb", b"cccc", b"dddddddddd"] {
            log.push(frame);
        }
        let read = |from, limit| {
            let log = &log;
            async move {
                match log.read(from, limit).await.expect("read") {
                    Read::Events(batch) => (batch.bytes, batch.events),
                    Read::End => panic!("not at the end"),
                }
            }
        };
        assert_eq!(read(0, 9).await, (Bytes::from_static(b"aaaabbbb"), 2));
        assert_eq!(read(1, 8).await, (Bytes::from_static(b"bbbbcccc"), 2));
        // An event larger than the limit still goes out whole, alone.
        assert_eq!(read(3, 4).await, (Bytes::from_static(b"dddddddddd"), 1));
        assert_eq!(read(2, 3).await, (Bytes::from_static(b"cccc"), 1));
        let (bytes, events, last) = log
            .window_with(1, 20, <[u8]>::to_vec)
            .await
            .expect("frames");
        assert_eq!(bytes, b"bbbbccccdddddddddd");
        assert_eq!(events, 3);
        assert!(!last, "the log is still open");
    }

    #[tokio::test]
    async fn a_dropped_log_frees_its_events_and_ends_its_readers() {
        let log = Arc::new(MemoryLog::default());
        log.push(&[b'x'; 1000]);
        log.close();
        let mut slow = reader(&log, 0);
        log.drop_events();
        assert_eq!(log.held_bytes(), 0);
        assert!(matches!(slow.next().await, Err(LogError::Dropped)));
    }

    #[tokio::test]
    async fn a_closed_log_holds_only_its_bytes() {
        let log = MemoryLog::default();
        for _ in 0..100 {
            log.push(&[b'x'; 33]);
        }
        log.close();
        assert_eq!(log.held_bytes(), 100 * 33 + 100 * 4);
    }
}
