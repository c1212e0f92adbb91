//! The owner's side: a generation that runs here is mirrored into Redis
//! batch by batch, its record is written back when Redis lost it, and its
//! end is marked with the resume TTL.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::super::{EndCause, Generation};
use super::Replicas;

/// How long the mirror gathers events before one append: a fast stream
/// costs one script call per window, not one per token, and a reader
/// elsewhere is this much later at most.
pub(super) const BATCH_WINDOW: Duration = Duration::from_millis(5);

/// The most bytes of events in one append (and one stream entry).
const BATCH_BYTES: usize = 64 * 1024;

/// How a mirror ended.
#[derive(Debug, PartialEq, Eq)]
enum Mirrored {
    /// Every event is in Redis.
    Whole,
    /// Every event is in Redis and its end is marked.
    Finished,
    /// Another instance ended the generation (it took this one for dead).
    EndedElsewhere,
    /// Redis stayed away for longer than the log would have been kept.
    GaveUp,
}

/// What an append's script answered.
enum Appended {
    /// The log's length now; where the next append starts.
    Len(usize),
    EndedElsewhere,
    RecordLost,
}

impl Appended {
    fn from_reply(reply: i64) -> Self {
        match reply {
            -1 => Self::EndedElsewhere,
            n => usize::try_from(n).map_or(Self::RecordLost, Self::Len),
        }
    }
}

/// Whose record a mirror starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start {
    /// A generation that starts here now: Redis has never seen its id.
    New,
    /// Like `New`, for a generation whose first window is already over
    /// (it waited among the fresh ones and was still running).
    Waited,
    /// A write-back: Redis may hold some of it, or another ending.
    Again,
}

/// Most whole answers in one transaction.
const WHOLE_PER_WRITE: usize = 64;

/// Generations that started here in the last window, oldest first. A
/// short answer is over within its first window: it is then written
/// whole in one transaction with the others of its window, and only a
/// longer one gets a mirror of its own. So a short answer costs no task,
/// no timer and no exchange with Redis of its own.
#[derive(Default)]
pub(super) struct Fresh {
    queue: Mutex<VecDeque<(Instant, Arc<Generation>)>>,
    wake: Notify,
}

impl Fresh {
    /// Takes a generation that starts now.
    pub(super) fn push(&self, generation: Arc<Generation>) {
        let mut queue = self.lock();
        queue.push_back((Instant::now() + BATCH_WINDOW, generation));
        if queue.len() == 1 {
            self.wake.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Arc<Generation>)>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The task that takes fresh generations once their first window is
/// over (all of them, due or not, when `replicas` flushes).
pub(super) async fn sweep(fresh: Arc<Fresh>, replicas: Weak<Replicas>) {
    loop {
        let due = fresh.lock().front().map(|(due, _)| *due);
        match due {
            Some(due) => tokio::time::sleep_until(due).await,
            None => {
                // Now and then, to end with the replicas it serves.
                let _ = tokio::time::timeout(Duration::from_secs(1), fresh.wake.notified()).await;
            }
        }
        let Some(replicas) = replicas.upgrade() else {
            return;
        };
        replicas.take_fresh(false);
    }
}

impl Replicas {
    /// Fresh generations whose first window is over (`all`: every one),
    /// handed to one task ([`sweep_out`]) spawned under the queue's lock,
    /// so that a flush that drains the queue then waits for them.
    pub(super) fn take_fresh(self: &Arc<Self>, all: bool) {
        let now = Instant::now();
        let mut queue = self.fresh.lock();
        let mut due = Vec::new();
        while queue.front().is_some_and(|(at, _)| all || *at <= now) {
            due.extend(queue.pop_front().map(|(_, generation)| generation));
        }
        if !due.is_empty() {
            self.tasks.spawn(sweep_out(Arc::clone(self), due));
        }
    }
}

/// The short answers among `due` go out whole, together (at most
/// [`WHOLE_PER_WRITE`] a transaction); the rest get their mirrors.
async fn sweep_out(replicas: Arc<Replicas>, due: Vec<Arc<Generation>>) {
    let mut whole = Vec::new();
    for generation in due {
        match generation.log.whole_with(BATCH_BYTES, compress) {
            Some((packed, events)) => whole.push((generation, packed, events)),
            None => {
                replicas
                    .tasks
                    .spawn(own(Arc::clone(&replicas), generation, Start::Waited));
            }
        }
    }
    let mut writes = Vec::new();
    while !whole.is_empty() {
        let rest = whole.split_off(whole.len().min(WHOLE_PER_WRITE));
        writes.push(write_wholes(&replicas, std::mem::replace(&mut whole, rest)));
    }
    futures_util::future::join_all(writes).await;
}

/// Whole answers on their first try, in one transaction. Should it fail
/// (its reply may be lost after it ran), each goes the way of any later
/// try: its own mirror, whose script finds what is there.
async fn write_wholes(replicas: &Arc<Replicas>, whole: Vec<(Arc<Generation>, Vec<u8>, usize)>) {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (generation, packed, events) in &whole {
        write_whole(replicas, &mut pipe, generation, packed, *events);
    }
    let mut conn = replicas.link.conn();
    let written = replicas
        .call(pipe.query_async::<()>(&mut conn))
        .await
        .is_ok();
    for (generation, _, _) in whole {
        if written {
            replicas.lock_owned().remove(&generation.id);
        } else {
            replicas
                .tasks
                .spawn(own(Arc::clone(replicas), generation, Start::Again));
        }
    }
}

/// Mirrors a generation that runs here into Redis, then marks it done
/// with what is left of the resume TTL. Also the write-back of a retained
/// generation after Redis lost its data: the same steps from event 0.
pub(super) async fn own(replicas: Arc<Replicas>, generation: Arc<Generation>, start: Start) {
    let mirrored = if generation.streamed {
        mirror(&replicas, &generation, start).await
    } else {
        generation.finished().await;
        Mirrored::Whole
    };
    if mirrored == Mirrored::Whole {
        finish(&replicas, &generation).await;
    }
    replicas.lock_owned().remove(&generation.id);
}

/// What is left of the resume TTL of a generation that ended, in ms.
fn end_ttl_ms(replicas: &Replicas, generation: &Generation) -> u64 {
    let ttl = generation
        .ended_at()
        .map_or(replicas.config.resume_ttl, |ended| {
            replicas.config.resume_ttl.saturating_sub(ended.elapsed())
        });
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Marks the end: state `done`, the TTL on what is kept, no lease.
async fn finish(replicas: &Replicas, generation: &Generation) {
    let id = &generation.id;
    let keys = &replicas.keys;
    let ttl_ms = end_ttl_ms(replicas, generation);
    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.cmd("HSET")
        .arg(keys.meta(id))
        .arg("state")
        .arg("done")
        .ignore();
    for key in [keys.meta(id), keys.log(id)] {
        pipe.cmd("PEXPIRE").arg(key).arg(ttl_ms).ignore();
    }
    pipe.cmd("DEL").arg(keys.lease(id)).ignore();
    for attempt in 0..5u32 {
        let mut conn = replicas.link.conn();
        if replicas
            .call(pipe.query_async::<()>(&mut conn))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100) * 2u32.pow(attempt)).await;
    }
    tracing::warn!(completion_id = %id, "the end of a generation could not be written to Redis");
}

/// A whole answer in one batch, on the first try for a new id: nothing
/// in Redis can name this id yet (the scripts that mark or end a record
/// need one to exist), so the record is written outright, in one
/// transaction with its expiry, as the append script would write it
/// (field `z`, no log key), without a script's cost.
fn write_whole(
    replicas: &Replicas,
    pipe: &mut redis::Pipeline,
    generation: &Generation,
    packed: &[u8],
    events: usize,
) {
    let meta = replicas.keys.meta(&generation.id);
    pipe.cmd("HSET")
        .arg(&meta)
        .arg("caller")
        .arg(replicas.caller(generation.owner))
        .arg("inst")
        .arg(&replicas.instance)
        .arg("streamed")
        .arg("1")
        .arg("state")
        .arg("done")
        .arg("n")
        .arg(events)
        .arg("z")
        .arg(packed)
        .ignore()
        .cmd("PEXPIRE")
        .arg(meta)
        .arg(end_ttl_ms(replicas, generation))
        .ignore()
        .cmd(replicas.link.publish())
        .arg(replicas.keys.events_channel(&generation.id))
        .arg(events)
        .ignore();
}

async fn mirror(replicas: &Replicas, generation: &Generation, start: Start) -> Mirrored {
    let id = &generation.id;
    let (meta, log, lease) = (
        replicas.keys.meta(id),
        replicas.keys.log(id),
        replicas.keys.lease(id),
    );
    let channel = replicas.keys.events_channel(id);
    // Events Redis holds, as its last answer said.
    let mut written = 0usize;
    let mut backoff = Duration::from_millis(50);
    // The first append waits a window too (unless it was waited among
    // the fresh): a short answer is then one append that also writes the
    // record and marks the end.
    let mut last_append = Instant::now();
    let mut waited = start == Start::Waited;
    // Only the very first try may take the shortcut: after a try whose
    // answer was lost, Redis may hold what it wrote.
    let mut untried = start != Start::Again;
    loop {
        if !std::mem::take(&mut waited) {
            tokio::time::sleep_until(last_append + BATCH_WINDOW).await;
        }
        // Compressed where the events lie: a copy of the compressed bytes
        // (about a twentieth of them) is all that leaves the log.
        let Some((packed, events, last)) = generation
            .log
            .window_with(written, BATCH_BYTES, compress)
            .await
        else {
            return Mirrored::Whole;
        };
        if std::mem::take(&mut untried) && last {
            let mut pipe = redis::pipe();
            write_whole(replicas, pipe.atomic(), generation, &packed, events);
            let mut conn = replicas.link.conn();
            if replicas
                .call(pipe.query_async::<()>(&mut conn))
                .await
                .is_ok()
            {
                return Mirrored::Finished;
            }
            continue;
        }
        let mut append = replicas.scripts.append.key(&meta);
        append
            .key(&log)
            .key(&lease)
            .arg(&channel)
            .arg(written)
            .arg(events)
            .arg(replicas.running_ttl_ms())
            .arg(&packed)
            .arg(replicas.link.publish())
            .arg(if last {
                end_ttl_ms(replicas, generation)
            } else {
                0
            });
        if written == 0 {
            replicas.record_args(&mut append, generation);
        }
        // Taken anew each time: under Sentinel the primary may have moved.
        let mut conn = replicas.link.conn();
        let reply = replicas
            .script_call("append", append.invoke_async::<i64>(&mut conn))
            .await;
        match reply.map(Appended::from_reply) {
            Ok(Appended::Len(len)) if last && len == written + events => {
                return Mirrored::Finished;
            }
            Ok(Appended::Len(len)) => {
                // Past what was sent: an earlier try that timed out had run.
                // Short of it: Redis lost events; write them again.
                written = len;
                backoff = Duration::from_millis(50);
                last_append = Instant::now();
                continue;
            }
            Ok(Appended::EndedElsewhere) => {
                if generation.cancel(EndCause::EndedElsewhere) {
                    tracing::warn!(completion_id = %id, "ended by another instance while out of reach; stopped");
                }
                return Mirrored::EndedElsewhere;
            }
            Ok(Appended::RecordLost) => match replicas.rewrite_record(generation).await {
                Ok(Some(len)) => {
                    tracing::info!(completion_id = %id, "Redis lost this generation; writing it back");
                    written = len;
                    continue;
                }
                Ok(None) => {
                    generation.cancel(EndCause::EndedElsewhere);
                    return Mirrored::EndedElsewhere;
                }
                Err(_) => {}
            },
            Err(err) => tracing::debug!(%err, completion_id = %id, "mirroring paused"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
        if give_up(generation, replicas) {
            return Mirrored::GaveUp;
        }
    }
}

thread_local! {
    /// Room for compressing, kept by each thread across batches and
    /// generations, so that a batch costs no zeroed allocation of its size.
    static ROOM: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// LZ4 with the length in front (`lz4_flex`'s `compress_prepend_size`
/// format).
fn compress(batch: &[u8]) -> Vec<u8> {
    ROOM.with_borrow_mut(|room| {
        let needed = 4 + lz4_flex::block::get_maximum_output_size(batch.len());
        if room.len() < needed {
            room.resize(needed, 0);
        }
        let length = u32::try_from(batch.len()).unwrap_or(u32::MAX);
        room[..4].copy_from_slice(&length.to_le_bytes());
        match lz4_flex::block::compress_into(batch, &mut room[4..needed]) {
            Ok(packed) => room[..4 + packed].to_vec(),
            // Not expected with the room the crate asks for.
            Err(_) => lz4_flex::compress_prepend_size(batch),
        }
    })
}

/// A finished generation whose log could not reach Redis for a whole TTL
/// is not worth writing any more.
fn give_up(generation: &Generation, replicas: &Replicas) -> bool {
    generation
        .ended_at()
        .is_some_and(|ended| ended.elapsed() > replicas.config.resume_ttl)
}

#[cfg(test)]
mod tests {
    use super::compress;

    #[test]
    fn a_batch_compressed_in_the_kept_room_reads_back_as_the_crate_reads_it() {
        let long = "data: {\"choices\":[{\"delta\":{\"content\":\" word\"}}]}\n\n".repeat(200);
        // Long, then shorter ones in the same room: no tail of the long one.
        for batch in [long.as_bytes(), b"short", b""] {
            assert_eq!(
                lz4_flex::decompress_size_prepended(&compress(batch)).expect("decompresses"),
                batch
            );
        }
    }
}
