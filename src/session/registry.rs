//! `GenerationRegistry`: every live or recently finished generation, by id
//! and by (caller, session). Starting a generation in a session cancels the
//! one before it; finished ones stay for the resume TTL within a memory
//! budget, oldest evicted first.
//!
//! Retention is bookkept as generations end, in O(1): they end in time
//! order and the TTL is one figure, so a FIFO is both the expiry order and
//! the eviction order. One purge task sleeps until the oldest expires.
//! The token path never takes the registry's locks.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{CallerId, EndCause, Generation, GenerationId};

#[derive(Debug, Clone, Copy)]
pub struct RegistryConfig {
    /// How long a generation nobody reads keeps going, waiting for a resume.
    pub reattach_grace: Duration,
    /// How long a finished generation stays resumable.
    pub resume_ttl: Duration,
    /// Bytes held by retained generations in all (their logs and records);
    /// finished generations beyond it are dropped, oldest first. Running
    /// generations are never cut.
    pub resume_budget: usize,
    /// Largest event log of one generation; a generation that reaches it
    /// ends with `length`.
    pub max_log_bytes: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            reattach_grace: Duration::from_secs(10),
            resume_ttl: Duration::from_secs(300),
            resume_budget: 64 << 20,
            max_log_bytes: 16 << 20,
        }
    }
}

pub struct GenerationRegistry {
    config: RegistryConfig,
    inner: Mutex<Inner>,
    retained: Mutex<Retained>,
    /// Wakes the purge task when the first retained generation arrives,
    /// and when the registry is dropped.
    purge: Arc<Notify>,
    running: AtomicUsize,
    /// Notified each time `running` drops to zero.
    idle: Notify,
    /// Told which generations the budget evicted, so that copies elsewhere
    /// (Redis) go too.
    on_evict: OnceLock<EvictHook>,
}

/// See [`GenerationRegistry::on_evict`].
pub type EvictHook = Box<dyn Fn(&[GenerationId]) + Send + Sync>;

#[derive(Default)]
struct Inner {
    generations: HashMap<GenerationId, Arc<Generation>>,
    /// The latest generation of each (caller, session).
    sessions: HashMap<(CallerId, String), GenerationId>,
}

/// Finished generations in the order they ended.
#[derive(Default)]
struct Retained {
    queue: VecDeque<RetainedEntry>,
    bytes: usize,
}

struct RetainedEntry {
    id: GenerationId,
    expires: Instant,
    bytes: usize,
}

impl GenerationRegistry {
    /// A registry and its purge task (which ends with the registry).
    pub fn new(config: RegistryConfig) -> Arc<Self> {
        let registry = Arc::new(Self {
            config,
            inner: Mutex::new(Inner::default()),
            retained: Mutex::new(Retained::default()),
            purge: Arc::new(Notify::new()),
            running: AtomicUsize::new(0),
            idle: Notify::new(),
            on_evict: OnceLock::new(),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(purge(
                Arc::downgrade(&registry),
                Arc::clone(&registry.purge),
            ));
        }
        registry
    }

    /// Calls `hook` with the ids of generations the budget evicts (not
    /// those that expire: their copies expire on their own).
    pub fn on_evict(&self, hook: EvictHook) {
        // One hook for the registry's life; a second is ignored.
        let _ = self.on_evict.set(hook);
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_retained(&self) -> MutexGuard<'_, Retained> {
        self.retained.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new generation, not yet visible: it becomes so with
    /// [`Self::activate`] once the backend has accepted it, so that a
    /// refused request disturbs nothing.
    pub fn create(
        &self,
        id_prefix: &str,
        owner: CallerId,
        session: Option<String>,
        streamed: bool,
    ) -> Arc<Generation> {
        Generation::new(
            GenerationId::new(id_prefix),
            owner,
            session,
            streamed,
            self.config.reattach_grace,
        )
    }

    /// Makes the generation findable and cancels the one it replaces in its
    /// session. Returns the replaced generation's id when one was running
    /// here. Every activated generation is [`Self::retire`]d once it ends.
    pub fn activate(&self, generation: &Arc<Generation>) -> Option<GenerationId> {
        generation.set_active();
        self.running.fetch_add(1, Ordering::AcqRel);
        let previous = {
            let mut inner = self.lock();
            inner
                .generations
                .insert(generation.id.clone(), Arc::clone(generation));
            let previous = generation.session.as_ref().and_then(|session| {
                inner
                    .sessions
                    .insert((generation.owner, session.clone()), generation.id.clone())
            });
            previous.and_then(|id| inner.generations.get(&id).cloned())
        };
        let replaced = previous.filter(|p| p.cancel(EndCause::SessionReplaced))?;
        Some(replaced.id.clone())
    }

    /// The caller's generation with this id; another caller's is `None`,
    /// exactly as if it did not exist.
    pub fn get(&self, owner: CallerId, id: &GenerationId) -> Option<Arc<Generation>> {
        self.get_any(id).filter(|g| g.owner == owner)
    }

    /// The generation with this id, whoever owns it: for signals that
    /// arrive from other instances, already checked there.
    pub fn get_any(&self, id: &GenerationId) -> Option<Arc<Generation>> {
        self.lock().generations.get(id).cloned()
    }

    /// The finished generations kept for resume, oldest first.
    pub fn retained(&self) -> Vec<Arc<Generation>> {
        let ids: Vec<GenerationId> = self
            .lock_retained()
            .queue
            .iter()
            .map(|e| e.id.clone())
            .collect();
        let inner = self.lock();
        ids.iter()
            .filter_map(|id| inner.generations.get(id).cloned())
            .collect()
    }

    /// The caller's latest generation in a session.
    pub fn latest_in_session(&self, owner: CallerId, session: &str) -> Option<Arc<Generation>> {
        let inner = self.lock();
        let id = inner.sessions.get(&(owner, session.to_owned()))?;
        inner.generations.get(id).cloned()
    }

    /// Called once an activated generation has ended: keeps it for the
    /// resume TTL within the budget, evicting the oldest retained first.
    /// A generation never activated, or already retired, is left alone.
    pub fn retire(&self, generation: &Arc<Generation>) {
        if !generation.take_active() {
            return;
        }
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
        let entry = RetainedEntry {
            id: generation.id.clone(),
            expires: Instant::now() + self.config.resume_ttl,
            bytes: generation.held_bytes(),
        };
        let mut evicted = Vec::new();
        let was_empty = {
            let mut retained = self.lock_retained();
            let was_empty = retained.queue.is_empty();
            retained.bytes += entry.bytes;
            retained.queue.push_back(entry);
            // The one just finished stays even alone over the budget (by at
            // most one log's cap): its readers are still at its end.
            while retained.bytes > self.config.resume_budget && retained.queue.len() > 1 {
                let Some(oldest) = retained.queue.pop_front() else {
                    break;
                };
                retained.bytes -= oldest.bytes;
                evicted.push(oldest.id);
            }
            was_empty
        };
        if !evicted.is_empty() {
            tracing::debug!(evicted = evicted.len(), "resume budget reached");
            for id in &evicted {
                self.remove(id);
            }
            if let Some(hook) = self.on_evict.get() {
                hook(&evicted);
            }
        }
        if was_empty {
            self.purge.notify_one();
        }
    }

    /// Forgets what has expired; returns when the next one expires.
    fn purge_expired(&self, now: Instant) -> Option<Instant> {
        let mut expired = Vec::new();
        let next = {
            let mut retained = self.lock_retained();
            while retained.queue.front().is_some_and(|e| e.expires <= now) {
                if let Some(entry) = retained.queue.pop_front() {
                    retained.bytes -= entry.bytes;
                    expired.push(entry.id);
                }
            }
            retained.queue.front().map(|e| e.expires)
        };
        for id in &expired {
            self.remove(id);
        }
        next
    }

    fn remove(&self, id: &GenerationId) {
        let mut inner = self.lock();
        let Some(generation) = inner.generations.remove(id) else {
            return;
        };
        // A reader still connected must not keep what the registry let go.
        generation.log.drop_events();
        if let Some(session) = &generation.session {
            let key = (generation.owner, session.clone());
            if inner.sessions.get(&key) == Some(id) {
                inner.sessions.remove(&key);
            }
        }
    }

    /// Cancels every running generation; returns how many it stopped.
    pub fn cancel_all(&self, cause: EndCause) -> usize {
        let running: Vec<_> = self
            .lock()
            .generations
            .values()
            .filter(|g| !g.is_done())
            .cloned()
            .collect();
        running.iter().filter(|g| g.cancel(cause)).count()
    }

    /// Generations activated and not yet retired.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Waits until no generation runs, or until `deadline`; returns whether
    /// none runs.
    pub async fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            let idle = self.idle.notified();
            if self.running() == 0 {
                return true;
            }
            tokio::select! {
                () = idle => {}
                () = tokio::time::sleep_until(deadline) => return self.running() == 0,
            }
        }
    }

    /// Bytes the retained generations hold, as the budget counts them.
    pub fn retained_bytes(&self) -> usize {
        self.lock_retained().bytes
    }

    /// Generations held, running or retained for resume.
    pub fn len(&self) -> usize {
        self.lock().generations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The one purge task: sleeps until the oldest retained generation
/// expires, or until news arrives; ends once the registry is dropped.
async fn purge(registry: Weak<GenerationRegistry>, news: Arc<Notify>) {
    loop {
        let woken = news.notified();
        let next = match registry.upgrade() {
            Some(registry) => registry.purge_expired(Instant::now()),
            None => return,
        };
        match next {
            Some(at) => tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = woken => {}
            },
            None => woken.await,
        }
    }
}

impl Drop for GenerationRegistry {
    fn drop(&mut self) {
        self.purge.notify_one();
    }
}

/// Ends and retires a generation when dropped. A JSON request holds one,
/// because its handler is dropped mid-way when the client leaves, and then
/// nobody else would: the generation is cancelled as `ClientGone`.
pub struct RetireOnDrop {
    pub registry: Arc<GenerationRegistry>,
    pub generation: Arc<Generation>,
}

impl Drop for RetireOnDrop {
    fn drop(&mut self) {
        if !self.generation.is_done() {
            self.generation.cancel(EndCause::ClientGone);
            self.generation.mark_done();
        }
        self.registry.retire(&self.generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(config: RegistryConfig) -> Arc<GenerationRegistry> {
        GenerationRegistry::new(config)
    }

    fn start(registry: &GenerationRegistry, owner: u32, session: Option<&str>) -> Arc<Generation> {
        let g = registry.create("t-", CallerId(owner), session.map(str::to_owned), true);
        registry.activate(&g);
        g
    }

    #[tokio::test]
    async fn a_new_generation_cancels_only_the_same_callers_same_session() {
        let r = registry(RegistryConfig::default());
        let a = start(&r, 1, Some("s"));
        let other_session = start(&r, 1, Some("t"));
        let other_caller = start(&r, 2, Some("s"));
        let no_session = start(&r, 1, None);
        let b = r.create("t-", CallerId(1), Some("s".into()), true);
        assert!(!a.cancel_token().is_cancelled(), "not before activation");
        assert_eq!(r.activate(&b), Some(a.id.clone()));
        assert_eq!(a.cancel_cause(), Some(EndCause::SessionReplaced));
        for g in [&other_session, &other_caller, &no_session, &b] {
            assert!(!g.cancel_token().is_cancelled());
        }
        assert_eq!(
            r.latest_in_session(CallerId(1), "s").map(|g| g.id.clone()),
            Some(b.id.clone())
        );
    }

    #[tokio::test]
    async fn another_caller_cannot_see_a_generation() {
        let r = registry(RegistryConfig::default());
        let g = start(&r, 1, Some("s"));
        assert!(r.get(CallerId(1), &g.id).is_some());
        assert!(r.get(CallerId(2), &g.id).is_none());
        assert!(r.latest_in_session(CallerId(2), "s").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn finished_generations_are_forgotten_after_the_ttl() {
        let r = registry(RegistryConfig {
            resume_ttl: Duration::from_secs(60),
            ..RegistryConfig::default()
        });
        let g = start(&r, 1, Some("s"));
        g.mark_done();
        r.retire(&g);
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(r.get(CallerId(1), &g.id).is_some());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(r.get(CallerId(1), &g.id).is_none());
        assert!(r.latest_in_session(CallerId(1), "s").is_none());
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn the_budget_evicts_the_oldest_finished_and_never_a_running_one() {
        let fill = |g: &Generation| g.log.push(&[b'x'; 10]);
        let finish = |r: &GenerationRegistry, g: &Arc<Generation>| {
            g.mark_done();
            r.retire(g);
        };
        // Each finished generation holds the same, so the budget is two.
        let probe = start(&registry(RegistryConfig::default()), 1, None);
        fill(&probe);
        probe.mark_done();
        let each = probe.held_bytes();
        let r = registry(RegistryConfig {
            resume_budget: 2 * each + each / 2,
            ..RegistryConfig::default()
        });

        let running = start(&r, 1, None);
        fill(&running);
        let old = start(&r, 1, None);
        fill(&old);
        finish(&r, &old);
        let young = start(&r, 1, None);
        fill(&young);
        finish(&r, &young);
        assert!(r.get(CallerId(1), &old.id).is_some(), "two fit");
        assert_eq!(r.retained_bytes(), 2 * each);

        let last = start(&r, 1, None);
        fill(&last);
        finish(&r, &last);
        assert!(r.get(CallerId(1), &old.id).is_none(), "oldest goes first");
        assert!(r.get(CallerId(1), &young.id).is_some());
        assert!(r.get(CallerId(1), &last.id).is_some());
        assert_eq!(r.retained_bytes(), 2 * each);

        for _ in 0..1000 {
            fill(&running);
        }
        assert_eq!(running.log.len(), 1001, "a running log is never cut");
        assert!(r.get(CallerId(1), &running.id).is_some());
        assert_eq!(r.running(), 1);
    }

    #[tokio::test]
    async fn waiting_for_idle_ends_when_the_last_generation_retires() {
        let r = registry(RegistryConfig::default());
        let g = start(&r, 1, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        let waiter = {
            let r = Arc::clone(&r);
            tokio::spawn(async move { r.wait_idle(deadline).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        g.mark_done();
        r.retire(&g);
        assert!(waiter.await.expect("joined"));
    }
}
