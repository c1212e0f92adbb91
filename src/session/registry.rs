//! `GenerationRegistry`: every live or recently finished generation, by id
//! and by (caller, session). Starting a generation in a session cancels the
//! one before it; finished ones stay for the resume TTL within a memory
//! budget, oldest evicted first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{CallerId, EndCause, Generation, GenerationId};

#[derive(Debug, Clone, Copy)]
pub struct RegistryConfig {
    /// How long a generation nobody reads keeps going, waiting for a resume.
    pub reattach_grace: Duration,
    /// How long a finished generation stays resumable.
    pub resume_ttl: Duration,
    /// Bytes of event logs kept in all; finished generations beyond it are
    /// dropped, oldest first. Running generations are never cut.
    pub resume_budget: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            reattach_grace: Duration::from_secs(10),
            resume_ttl: Duration::from_secs(300),
            resume_budget: 64 << 20,
        }
    }
}

pub struct GenerationRegistry {
    config: RegistryConfig,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    generations: HashMap<GenerationId, Arc<Generation>>,
    /// The latest generation of each (caller, session).
    sessions: HashMap<(CallerId, String), GenerationId>,
}

impl GenerationRegistry {
    pub fn new(config: RegistryConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
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
    /// session. Returns the replaced generation's id when one was running.
    pub fn activate(&self, generation: &Arc<Generation>) -> Option<GenerationId> {
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
        self.lock()
            .generations
            .get(id)
            .filter(|g| g.owner == owner)
            .cloned()
    }

    /// The caller's latest generation in a session.
    pub fn latest_in_session(&self, owner: CallerId, session: &str) -> Option<Arc<Generation>> {
        let inner = self.lock();
        let id = inner.sessions.get(&(owner, session.to_owned()))?;
        inner.generations.get(id).cloned()
    }

    /// Called once a generation has ended: keeps it for the resume TTL, then
    /// forgets it, and trims finished logs to the budget.
    pub fn retire(self: &Arc<Self>, generation: &Arc<Generation>) {
        self.enforce_budget();
        let id = generation.id.clone();
        let registry = Arc::downgrade(self);
        let ttl = self.config.resume_ttl;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.remove(&id);
            return;
        };
        // Dropping the registry (a test, or the process) ends the wait too.
        runtime.spawn(async move {
            tokio::time::sleep(ttl).await;
            if let Some(registry) = registry.upgrade() {
                registry.remove(&id);
            }
        });
    }

    fn remove(&self, id: &GenerationId) {
        let mut inner = self.lock();
        let Some(generation) = inner.generations.remove(id) else {
            return;
        };
        if let Some(session) = &generation.session {
            let key = (generation.owner, session.clone());
            if inner.sessions.get(&key) == Some(id) {
                inner.sessions.remove(&key);
            }
        }
    }

    /// Evicts finished generations, oldest end first, until all logs fit the
    /// budget. Running generations count but are never evicted: if they
    /// alone exceed the budget it stays exceeded until they finish.
    fn enforce_budget(&self) {
        let evict: Vec<GenerationId> = {
            let inner = self.lock();
            let mut total: usize = inner.generations.values().map(|g| g.log.bytes()).sum();
            if total <= self.config.resume_budget {
                return;
            }
            let mut finished: Vec<_> = inner
                .generations
                .values()
                .filter_map(|g| Some((g.ended_at()?, g)))
                .collect();
            finished.sort_by_key(|(ended, _)| *ended);
            finished
                .into_iter()
                .take_while(|(_, g)| {
                    let over = total > self.config.resume_budget;
                    total = total.saturating_sub(g.log.bytes());
                    over
                })
                .map(|(_, g)| g.id.clone())
                .collect()
        };
        if !evict.is_empty() {
            tracing::debug!(evicted = evict.len(), "resume budget reached");
        }
        for id in &evict {
            self.remove(id);
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

    /// Generations not yet ended.
    pub fn running(&self) -> usize {
        self.lock()
            .generations
            .values()
            .filter(|g| !g.is_done())
            .count()
    }

    /// Generations held, running or retained for resume.
    pub fn len(&self) -> usize {
        self.lock().generations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    use bytes::Bytes;

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
        let r = registry(RegistryConfig {
            resume_budget: 25,
            ..RegistryConfig::default()
        });
        let fill = |g: &Generation| {
            g.log.push(Bytes::from(vec![b'x'; 10]));
        };
        let running = start(&r, 1, None);
        fill(&running);
        let old = start(&r, 1, None);
        fill(&old);
        old.mark_done();
        r.retire(&old);
        assert!(r.get(CallerId(1), &old.id).is_some(), "20 bytes fit in 25");

        let young = start(&r, 1, None);
        fill(&young);
        young.mark_done();
        r.retire(&young);
        assert!(r.get(CallerId(1), &old.id).is_none(), "oldest goes first");
        assert!(r.get(CallerId(1), &young.id).is_some());
        assert!(r.get(CallerId(1), &running.id).is_some());

        fill(&running);
        fill(&running);
        let last = start(&r, 1, None);
        last.mark_done();
        r.retire(&last);
        assert!(r.get(CallerId(1), &young.id).is_none());
        assert_eq!(running.log.len(), 3, "a running log is never cut");
        assert!(r.get(CallerId(1), &running.id).is_some());
    }
}
