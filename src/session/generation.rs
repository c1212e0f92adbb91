//! One generation: its cancellation signal, its event log, and the count of
//! connections attached to it that decides when an abandoned one stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{CallerId, EndCause, GenerationId, MemoryLog};
use crate::backend::Demand;

/// The reattach grace of a generation abandoned before its first token: a
/// retry (every stream says `retry: 1000`) comes well within it, and a
/// client that sent a burst and left holds no place for the whole grace.
pub const EARLY_GRACE: Duration = Duration::from_secs(2);

/// What a retained generation costs beside its log: the record, its ids
/// and signals, and its entries in the registry's maps. An estimate from
/// the types' sizes and their heap parts, rounded up.
pub const RECORD_OVERHEAD: usize = 1024;

/// Readers of this generation on other instances (through Redis). When the
/// last local reader has been gone for the grace, the generation is only
/// cancelled if nobody reads it elsewhere either.
#[async_trait]
pub trait RemoteReaders: Send + Sync {
    async fn reading(&self, id: &GenerationId) -> bool;
}

pub struct Generation {
    pub id: GenerationId,
    pub owner: CallerId,
    pub session: Option<String>,
    /// Streamed generations keep a log that connections read and resume
    /// from; a plain JSON request has none.
    pub streamed: bool,
    pub log: Arc<MemoryLog>,
    /// The one signal the backend watches. Set only through [`Self::cancel`]
    /// so that the cause is recorded first.
    cancel: CancellationToken,
    /// Fires once the last event is in the log.
    done: CancellationToken,
    cause: OnceLock<EndCause>,
    ended_at: OnceLock<Instant>,
    attached: Mutex<AttachState>,
    reattach_grace: Duration,
    remote_readers: OnceLock<Arc<dyn RemoteReaders>>,
    /// Visible in the registry and not yet retired.
    active: AtomicBool,
    /// Runs to its end whether anyone reads it or not (a Responses API
    /// `background` response): no pause, no reattach grace.
    background: AtomicBool,
    /// Paused while no connection reads it (a backend that can stops
    /// computing then); handed to the backend with the request.
    pub demand: Demand,
}

#[derive(Default)]
struct AttachState {
    count: usize,
    /// Bumped on every attach and detach, so a grace timer can tell that
    /// the world moved on since it was started.
    epoch: u64,
}

impl Generation {
    pub fn new(
        id: GenerationId,
        owner: CallerId,
        session: Option<String>,
        streamed: bool,
        reattach_grace: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            owner,
            session,
            streamed,
            log: Arc::new(MemoryLog::default()),
            cancel: CancellationToken::new(),
            done: CancellationToken::new(),
            cause: OnceLock::new(),
            ended_at: OnceLock::new(),
            attached: Mutex::new(AttachState::default()),
            reattach_grace,
            remote_readers: OnceLock::new(),
            active: AtomicBool::new(false),
            background: AtomicBool::new(false),
            demand: Demand::default(),
        })
    }

    /// Marks it visible; see [`super::GenerationRegistry::activate`].
    pub(super) fn set_active(&self) {
        self.active.store(true, Ordering::Release);
    }

    /// Ends its visibility as a running generation; true only the first
    /// time, and only if it was active.
    pub(super) fn take_active(&self) -> bool {
        self.active.swap(false, Ordering::AcqRel)
    }

    /// Makes it run to its end with nobody attached.
    pub fn run_in_background(&self) {
        self.background.store(true, Ordering::Release);
    }

    /// Makes the reattach grace ask other instances before cancelling.
    pub fn watch_remote_readers(&self, readers: Arc<dyn RemoteReaders>) {
        // Set once, at activation; a second call changes nothing.
        let _ = self.remote_readers.set(readers);
    }

    /// Memory this generation holds while retained: what the resume budget
    /// counts.
    pub fn held_bytes(&self) -> usize {
        self.log.held_bytes()
            + RECORD_OVERHEAD
            + 2 * self.id.as_str().len()
            + self.session.as_ref().map_or(0, |s| 2 * s.len())
    }

    /// The token handed to the backend.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Asks the generation to stop. Returns whether it was still running and
    /// this call is the one that stopped it.
    pub fn cancel(&self, cause: EndCause) -> bool {
        if self.is_done() || self.cancel.is_cancelled() {
            return false;
        }
        let first = self.cause.set(cause).is_ok();
        self.cancel.cancel();
        // A paused generation ends (and frees what it holds) at once.
        self.demand.wake();
        first
    }

    /// Why it was cancelled, if it was.
    pub fn cancel_cause(&self) -> Option<EndCause> {
        self.cause.get().copied()
    }

    pub fn is_done(&self) -> bool {
        self.done.is_cancelled()
    }

    /// Resolves when the generation has written its last event.
    pub async fn finished(&self) {
        self.done.cancelled().await;
    }

    /// When it ended; `None` while running.
    pub fn ended_at(&self) -> Option<Instant> {
        self.ended_at.get().copied()
    }

    /// Records the end: closes the log and wakes everyone waiting on it.
    pub fn mark_done(&self) {
        // Only the first end counts; a second is a no-op by design.
        let _ = self.ended_at.set(Instant::now());
        self.log.close();
        self.done.cancel();
    }

    /// Registers a connection that reads this generation. Dropping the
    /// returned value detaches it; the last one to detach starts the
    /// reattach grace, after which an unfinished generation is cancelled.
    pub fn attach(self: &Arc<Self>) -> Attachment {
        let mut state = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        state.count += 1;
        state.epoch += 1;
        if state.count == 1 {
            self.demand.set_paused(false);
        }
        Attachment(Arc::clone(self))
    }

    fn detach(self: &Arc<Self>) {
        let epoch = {
            let mut state = self.attached.lock().unwrap_or_else(|e| e.into_inner());
            state.count -= 1;
            state.epoch += 1;
            if state.count > 0 || self.is_done() || self.background.load(Ordering::Acquire) {
                return;
            }
            // Nobody reads: no compute until someone is back (decided under
            // the lock, so a return racing this leaves it running). With
            // replicas a reader may be on another instance, which this one
            // cannot see at once, so there it runs on through the grace.
            if self.remote_readers.get().is_none() && !self.reattach_grace.is_zero() {
                self.demand.set_paused(true);
            }
            state.epoch
        };
        if self.reattach_grace.is_zero() {
            self.cancel(EndCause::ClientGone);
            return;
        }
        // Nothing but the opening event yet: queued or still prefilling.
        let grace = if self.log.len() <= 1 {
            self.reattach_grace.min(EARLY_GRACE)
        } else {
            self.reattach_grace
        };
        // Detaching happens when hyper drops a response body, always on the
        // runtime; without one there is nothing to wait on, so stop now.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.cancel(EndCause::ClientGone);
            return;
        };
        let generation = Arc::clone(self);
        runtime.spawn(async move {
            loop {
                tokio::select! {
                    () = generation.finished() => return,
                    () = tokio::time::sleep(grace) => {}
                }
                let still_alone = {
                    let state = generation
                        .attached
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    state.count == 0 && state.epoch == epoch
                };
                if !still_alone {
                    return;
                }
                let elsewhere = match generation.remote_readers.get() {
                    Some(remote) => remote.reading(&generation.id).await,
                    None => false,
                };
                if !elsewhere {
                    generation.cancel(EndCause::ClientGone);
                    return;
                }
            }
        });
    }

    pub fn attached_count(&self) -> usize {
        self.attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count
    }
}

/// A connection's hold on a generation; see [`Generation::attach`].
pub struct Attachment(Arc<Generation>);

impl Drop for Attachment {
    fn drop(&mut self) {
        self.0.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(grace: Duration) -> Arc<Generation> {
        Generation::new(
            GenerationId::new("t-"),
            CallerId::ANONYMOUS,
            None,
            true,
            grace,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_detach_cancels_after_the_grace_unless_someone_returns() {
        let g = generation(Duration::from_secs(10));
        // Past its first token: the whole grace applies.
        g.log.push(b"opening");
        g.log.push(b"token");
        let first = g.attach();
        let second = g.attach();
        drop(first);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!g.cancel_token().is_cancelled(), "one reader remains");

        drop(second);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let back = g.attach();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            !g.cancel_token().is_cancelled(),
            "a resume within the grace"
        );

        drop(back);
        tokio::time::sleep(Duration::from_millis(9_999)).await;
        assert!(!g.cancel_token().is_cancelled());
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(g.cancel_token().is_cancelled());
        assert_eq!(g.cancel_cause(), Some(EndCause::ClientGone));
    }

    #[tokio::test(start_paused = true)]
    async fn before_the_first_token_the_grace_is_short() {
        let g = generation(Duration::from_secs(60));
        g.log.push(b"opening");
        drop(g.attach());
        tokio::time::sleep(EARLY_GRACE - Duration::from_millis(1)).await;
        assert!(!g.cancel_token().is_cancelled());
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(g.cancel_cause(), Some(EndCause::ClientGone));
    }

    #[tokio::test(start_paused = true)]
    async fn a_background_generation_runs_on_with_nobody_attached() {
        let g = generation(Duration::ZERO);
        g.run_in_background();
        drop(g.attach());
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!g.cancel_token().is_cancelled());
        assert!(!g.demand.is_paused());
    }

    #[tokio::test]
    async fn zero_grace_cancels_at_once() {
        let g = generation(Duration::ZERO);
        drop(g.attach());
        assert_eq!(g.cancel_cause(), Some(EndCause::ClientGone));
    }

    #[tokio::test]
    async fn cancel_reports_only_the_call_that_stopped_a_running_generation() {
        let g = generation(Duration::ZERO);
        assert!(g.cancel(EndCause::CancelEndpoint));
        assert!(!g.cancel(EndCause::SessionReplaced));
        assert_eq!(g.cancel_cause(), Some(EndCause::CancelEndpoint));

        let ended = generation(Duration::ZERO);
        ended.mark_done();
        assert!(!ended.cancel(EndCause::CancelEndpoint));
    }
}
