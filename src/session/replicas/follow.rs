//! Reading another instance's generation: its log as Redis holds it, read
//! by entry id from a position, and the reader marks that keep the
//! owner's reattach grace from cancelling what is read here.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::BytesMut;
use redis::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use super::super::GenerationId;
use super::super::generation::RemoteReaders;
use super::super::log::{Batch, LogError, LogReader, LogSource, Read};
use super::keys::{entry_id, entry_start, split_events};
use super::{Followed, Replicas, SharedStateError};

/// A connection's reader of another instance's generation.
pub struct RemoteReader {
    pub reader: LogReader,
    pub follow: Follow,
}

/// Counts as a reader here until dropped.
pub struct Follow {
    replicas: Arc<Replicas>,
    id: GenerationId,
}

impl Replicas {
    /// A reader of another instance's generation from event `from`; it
    /// counts as a reader of the generation until dropped.
    pub async fn reader(self: &Arc<Self>, id: &GenerationId, from: usize) -> RemoteReader {
        let (wake, first) = {
            let mut followed = self.lock_followed();
            let entry = followed.entry(id.clone()).or_insert_with(|| Followed {
                wake: watch::Sender::new(0),
                readers: 0,
            });
            entry.readers += 1;
            (entry.wake.clone(), entry.readers == 1)
        };
        // The count goes down when this is dropped, even if this future is
        // dropped at one of the awaits below.
        let follow = Follow {
            replicas: Arc::clone(self),
            id: id.clone(),
        };
        // Subscribe before the first read so that no append is missed; a
        // failure only costs latency (reads also poll).
        if first {
            let mut subscriber = self.link.subscriber();
            let channel = self.keys.events_channel(id);
            if let Err(err) = self.call(subscriber.subscribe(channel)).await {
                tracing::debug!(%err, "cannot subscribe to a log's appends");
            }
        }
        let mut conn = self.link.conn();
        let mut mark = redis::cmd("SET");
        mark.arg(self.keys.readers(id))
            .arg(1)
            .arg("PX")
            .arg(self.readers_mark_ms());
        if let Err(err) = self.call(mark.query_async::<()>(&mut conn)).await {
            tracing::debug!(%err, "cannot mark a remote reader");
        }
        let log = Arc::new(RedisLog {
            replicas: Arc::clone(self),
            id: id.clone(),
            wake,
        });
        RemoteReader {
            reader: LogReader::new(log as Arc<dyn LogSource>, from),
            follow,
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let last = {
            let mut followed = self.replicas.lock_followed();
            let Some(entry) = followed.get_mut(&self.id) else {
                return;
            };
            entry.readers -= 1;
            let last = entry.readers == 0;
            if last {
                followed.remove(&self.id);
            }
            last
        };
        if last && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut subscriber = self.replicas.link.subscriber();
            let channel = self.replicas.keys.events_channel(&self.id);
            let timeout = self.replicas.config.timeout;
            runtime.spawn(async move {
                let _ = tokio::time::timeout(timeout, subscriber.unsubscribe(channel)).await;
            });
        }
    }
}

#[async_trait]
impl RemoteReaders for Replicas {
    async fn reading(&self, id: &GenerationId) -> bool {
        let mut conn = self.link.conn();
        let mut exists = redis::cmd("EXISTS");
        exists.arg(self.keys.readers(id));
        // Redis away: nobody can be reading through it.
        self.call(exists.query_async::<bool>(&mut conn))
            .await
            .unwrap_or(false)
    }
}

/// Another instance's log, read from Redis.
struct RedisLog {
    replicas: Arc<Replicas>,
    id: GenerationId,
    wake: watch::Sender<u64>,
}

/// What a generation's record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RecordState {
    /// No record: Redis lost it (its owner writes it back) or it expired.
    Missing,
    Running,
    Done,
}

impl RecordState {
    pub(super) fn parse(state: Option<&str>) -> Self {
        match state {
            None => Self::Missing,
            Some("done") => Self::Done,
            Some(_) => Self::Running,
        }
    }
}

/// What one look at a Redis log found.
struct Look {
    /// The events from the position on, whole, in order, with no gap.
    frames: Vec<Vec<u8>>,
    state: RecordState,
    leased: bool,
    /// Events in the log.
    len: usize,
}

type Entries = Vec<(String, Vec<Vec<u8>>)>;

/// The events from `from` on in entries read by id: the entry that holds
/// `from` and those after it. Stops at a gap, so a reader never skips
/// or repeats an event whatever the entries are.
fn events_from(from: usize, entries: Entries) -> Vec<Vec<u8>> {
    let mut next = from;
    let mut frames = Vec::new();
    for (id, mut fields) in entries {
        let Some(start) = entry_start(&id) else {
            continue;
        };
        if start > next || fields.len() != 2 {
            break;
        }
        let blob = fields.swap_remove(1);
        let blob = if fields[0] == b"z" {
            match lz4_flex::decompress_size_prepended(&blob) {
                Ok(blob) => blob,
                Err(err) => {
                    tracing::warn!(%err, entry = %id, "a log entry does not decompress; reading stops there");
                    break;
                }
            }
        } else {
            blob
        };
        for (seq, event) in (start..).zip(split_events(&blob)) {
            if seq == next {
                frames.push(event.to_vec());
                next += 1;
            }
        }
    }
    frames
}

impl RedisLog {
    async fn look(&self, from: usize, limit: usize) -> Result<Look, SharedStateError> {
        let keys = &self.replicas.keys;
        let log = keys.log(&self.id);
        // An entry holds a batch of a few hundred bytes to 64 KiB.
        let count = (limit / 1024).clamp(4, 64);
        let mut pipe = redis::pipe();
        pipe.cmd("XREVRANGE")
            .arg(&log)
            .arg(entry_id(from))
            .arg("-")
            .arg("COUNT")
            .arg(1);
        pipe.cmd("XRANGE")
            .arg(&log)
            .arg(format!("({}", entry_id(from)))
            .arg("+")
            .arg("COUNT")
            .arg(count);
        pipe.cmd("HMGET")
            .arg(keys.meta(&self.id))
            .arg("state")
            .arg("n")
            .arg("z");
        pipe.cmd("EXISTS").arg(keys.lease(&self.id));
        let mut conn = self.replicas.link.conn();
        type Meta = (Option<String>, Option<usize>, Option<Vec<u8>>);
        type Reply = (Entries, Entries, Meta, bool);
        let (holding, after, (state, len, whole), leased): Reply =
            self.replicas.call(pipe.query_async(&mut conn)).await?;
        let entries = match whole {
            // The whole log, kept in the record.
            Some(blob) => vec![(entry_id(0), vec![b"z".to_vec(), blob])],
            None => holding.into_iter().chain(after).collect(),
        };
        Ok(Look {
            frames: events_from(from, entries),
            state: RecordState::parse(state.as_deref()),
            leased,
            len: len.unwrap_or(0),
        })
    }
}

impl Replicas {
    /// Ends a log whose owner died, at `len`, its end when looked at. Losing
    /// the race to the owner or to another instance is fine: the script
    /// then changes nothing and the next look reads what the winner wrote.
    pub(super) async fn end_orphan(
        &self,
        id: &GenerationId,
        len: usize,
    ) -> Result<bool, SharedStateError> {
        let epilogue = (self.epilogue)(id, len);
        let blob: Vec<u8> = epilogue.concat();
        let mut invocation = self.scripts.end_orphan.key(self.keys.meta(id));
        invocation
            .key(self.keys.log(id))
            .key(self.keys.lease(id))
            .arg(self.keys.events_channel(id))
            .arg(len)
            .arg(epilogue.len())
            .arg(self.ttl_ms())
            .arg(blob)
            .arg(self.link.publish());
        let mut conn = self.link.conn();
        let ended: i64 = self
            .script_call("end_orphan", invocation.invoke_async(&mut conn))
            .await?;
        if ended == 1 {
            tracing::warn!(completion_id = %id, "owner gone; its log ended here");
        }
        Ok(ended == 1)
    }
}

#[async_trait]
impl LogSource for RedisLog {
    async fn read_now(&self, from: usize, limit: usize) -> Result<Option<Read>, LogError> {
        let look = self
            .look(from, limit)
            .await
            .map_err(|e| LogError::Unreachable(e.to_string()))?;
        if !look.frames.is_empty() {
            return Ok(Some(Read::Events(batch(look.frames, limit))));
        }
        Ok((look.state == RecordState::Done && from >= look.len).then_some(Read::End))
    }

    async fn read(&self, from: usize, limit: usize) -> Result<Read, LogError> {
        let lease = self.replicas.config.lease;
        let poll = lease / 3;
        let mut wake = self.wake.subscribe();
        // Each wait is bounded: an owner silent for a lease is dead, a
        // record missing for two leases will not come back, and Redis
        // unreachable for two leases fails the read.
        let mut unleased_since: Option<Instant> = None;
        let mut missing_since: Option<Instant> = None;
        let mut failing_since: Option<Instant> = None;
        loop {
            wake.borrow_and_update();
            match self.look(from, limit).await {
                Ok(look) => {
                    failing_since = None;
                    if !look.frames.is_empty() {
                        return Ok(Read::Events(batch(look.frames, limit)));
                    }
                    match look.state {
                        RecordState::Done if from >= look.len => {
                            return if from == look.len {
                                Ok(Read::End)
                            } else {
                                Err(LogError::NotWritten(from))
                            };
                        }
                        RecordState::Running if !look.leased => {
                            missing_since = None;
                            let since = *unleased_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= lease {
                                self.replicas
                                    .end_orphan(&self.id, look.len)
                                    .await
                                    .map_err(|e| LogError::Unreachable(e.to_string()))?;
                                continue;
                            }
                        }
                        RecordState::Running => {
                            unleased_since = None;
                            missing_since = None;
                        }
                        // Done, but the events are not there: the log was
                        // dropped under the record (eviction), or a
                        // write-back is under way.
                        RecordState::Done | RecordState::Missing => {
                            let since = *missing_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= 2 * lease {
                                return Err(LogError::Dropped);
                            }
                        }
                    }
                }
                Err(err) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= 2 * lease {
                        return Err(LogError::Unreachable(err.to_string()));
                    }
                }
            }
            let _ = tokio::time::timeout(poll, wake.changed()).await;
        }
    }
}

/// Whole frames up to `limit` bytes (at least one) as one buffer, and
/// none after `[DONE]`, which ends every log (a log written again under a
/// reader may hold more after it).
fn batch(frames: Vec<Vec<u8>>, limit: usize) -> Batch {
    let mut bytes = BytesMut::new();
    let mut events = 0;
    for frame in frames {
        if events > 0 && bytes.len() + frame.len() > limit {
            break;
        }
        bytes.extend_from_slice(&frame);
        events += 1;
        if frame.starts_with(b"data: [DONE]\n") {
            break;
        }
    }
    Batch {
        bytes: bytes.freeze(),
        events,
    }
}

/// A reply's text, for pushes.
pub(super) fn text(value: Value) -> String {
    redis::from_redis_value::<String>(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: usize, events: &[&str]) -> (String, Vec<Vec<u8>>) {
        let blob: String = events.iter().map(|e| format!("{e}\n\n")).collect();
        (entry_id(start), vec![b"f".to_vec(), blob.into_bytes()])
    }

    fn texts(frames: Vec<Vec<u8>>) -> Vec<String> {
        frames
            .into_iter()
            .map(|f| String::from_utf8(f).expect("utf-8").trim_end().to_owned())
            .collect()
    }

    #[test]
    fn events_are_read_from_the_middle_of_an_entry_and_stop_at_a_gap() {
        let entries = vec![
            entry(0, &["e0", "e1", "e2"]),
            entry(3, &["e3"]),
            entry(6, &["e6"]),
        ];
        assert_eq!(texts(events_from(1, entries.clone())), ["e1", "e2", "e3"]);
        assert_eq!(texts(events_from(3, entries[1..].to_vec())), ["e3"]);
        // The entry holding the position is not there (yet): nothing.
        assert!(events_from(4, entries[2..].to_vec()).is_empty());
        // An overlap never repeats an event.
        let overlapping = vec![entry(0, &["e0", "e1"]), entry(1, &["x1", "e2"])];
        assert_eq!(texts(events_from(0, overlapping)), ["e0", "e1", "e2"]);
    }

    #[test]
    fn compressed_entries_read_as_plain_ones_and_a_corrupt_one_is_a_gap() {
        let compress = |(id, mut fields): (String, Vec<Vec<u8>>)| {
            fields[1] = lz4_flex::compress_prepend_size(&fields[1]);
            fields[0] = b"z".to_vec();
            (id, fields)
        };
        let entries = vec![
            compress(entry(0, &["e0", "e1"])),
            compress(entry(2, &["e2"])),
            entry(3, &["e3"]),
        ];
        assert_eq!(texts(events_from(1, entries)), ["e1", "e2", "e3"]);
        let corrupt = vec![
            entry(0, &["e0"]),
            (
                entry_id(1),
                vec![b"z".to_vec(), b"\xff\xff\xff\x7fjunk".to_vec()],
            ),
        ];
        assert_eq!(texts(events_from(0, corrupt)), ["e0"]);
    }

    #[test]
    fn a_batch_takes_whole_frames_up_to_the_limit() {
        let frames = vec![b"aaaa".to_vec(), b"bbbb".to_vec(), b"cc".to_vec()];
        let b = batch(frames.clone(), 8);
        assert_eq!((&b.bytes[..], b.events), (&b"aaaabbbb"[..], 2));
        let b = batch(frames, 2);
        assert_eq!((&b.bytes[..], b.events), (&b"aaaa"[..], 1));
        let past_the_end = vec![b"data: [DONE]\nid: a.1\n\n".to_vec(), b"x".to_vec()];
        assert_eq!(batch(past_the_end, 100).events, 1);
    }
}
