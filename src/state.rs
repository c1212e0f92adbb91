//! `AppState`: what every request reads (the generations, the keys, the
//! settings), built once at startup. `api/` and `server.rs` both import it;
//! it imports neither.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::ApiKeys;
use crate::backend::Backend;
use crate::session::replicas::{Epilogue, caller_hash};
use crate::session::{
    Admission, GenerationRegistry, Generations, PerCaller, RegistryConfig, ReplicaConfig, Replicas,
    Stored, StoredConfig,
};

/// Settings the request path reads.
#[derive(Debug, Clone)]
pub struct Settings {
    pub keep_alive: Duration,
    pub max_body: usize,
    pub shutdown_grace: Duration,
    /// Generations running at once; `None`: the backend's choice.
    pub max_concurrent: Option<usize>,
    /// Generations waiting beyond that before 429.
    pub max_queue: usize,
    /// Generations of one API key running at once; `None`: no own limit.
    pub max_concurrent_per_key: Option<usize>,
    /// Generations of one API key admitted (running or waiting); `None`:
    /// half of `max_concurrent + max_queue` when keys are configured.
    pub max_queue_per_key: Option<usize>,
    /// Origins allowed by CORS; `*` for any; empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// A request head must be complete this long after it may begin.
    pub header_read_timeout: Duration,
    /// A request body must have arrived in full this long after its head.
    pub body_read_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Open connections at most; `None`: from the descriptor limit.
    pub max_connections: Option<usize>,
    /// Names accepted in `Host` when no API key is set, besides IP
    /// addresses and `localhost`; `*` for any.
    pub allowed_hosts: Vec<String>,
    /// How long stored Responses API responses are kept, within what.
    pub stored: StoredConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(15),
            max_body: 1_048_576,
            shutdown_grace: Duration::from_secs(10),
            max_concurrent: None,
            max_queue: 64,
            max_concurrent_per_key: None,
            max_queue_per_key: None,
            cors_origins: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: None,
            allowed_hosts: Vec::new(),
            stored: StoredConfig {
                ttl: Duration::from_secs(30 * 60),
                budget: 64 << 20,
            },
        }
    }
}

/// What every request reads, behind one `Arc`: axum clones the state for
/// each middleware and extractor that takes it, and one counter is all
/// such a clone bumps (a clone of each field would bump a dozen, and lock
/// the shutdown token's node twice).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The fields of [`AppState`].
#[derive(Clone)]
pub struct Shared {
    pub backend: Arc<dyn Backend>,
    pub registry: Arc<GenerationRegistry>,
    pub admission: Arc<Admission>,
    /// Starts and runs generations over the three above.
    pub generations: Arc<Generations>,
    pub keys: Arc<ApiKeys>,
    pub settings: Arc<Settings>,
    /// Unix time the server started, the `created` of its models.
    pub started: u64,
    /// Cancelled when shutdown begins: new generations get 503.
    pub shutdown: CancellationToken,
    /// Renders `/metrics`; `None` where no recorder is installed (tests
    /// that run many servers in one process).
    pub metrics: Option<PrometheusHandle>,
    /// The state shared with other instances (`--redis`); `None`: all
    /// state is in this process.
    pub replicas: Option<Arc<Replicas>>,
    /// Stored Responses API responses, here or (with `--redis`) shared.
    pub stored: Arc<Stored>,
}

impl AppState {
    pub async fn new(
        backend: Arc<dyn Backend>,
        registry: RegistryConfig,
        keys: Vec<String>,
        settings: Settings,
    ) -> Self {
        let max_running = settings
            .max_concurrent
            .unwrap_or(backend.capabilities().default_concurrency);
        let keys = ApiKeys::new(keys);
        // One caller cannot be unfair to itself; with several keys, no key
        // may hold more than half the places unless told otherwise.
        let per_caller = PerCaller {
            running: settings.max_concurrent_per_key,
            admitted: settings.max_queue_per_key.or_else(|| {
                (keys.len() > 1).then(|| (max_running + settings.max_queue).div_ceil(2).max(1))
            }),
        };
        let admission = Arc::new(Admission::new(max_running, settings.max_queue, per_caller));
        let registry = GenerationRegistry::new(registry);
        let generations = Arc::new(Generations::new(
            Arc::clone(&registry),
            Arc::clone(&admission),
            Arc::clone(&backend),
        ));
        let stored = Arc::new(Stored::new(settings.stored, None));
        Self(Arc::new(Shared {
            admission,
            backend,
            registry,
            generations,
            keys: Arc::new(keys),
            settings: Arc::new(settings),
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            shutdown: CancellationToken::new(),
            metrics: None,
            replicas: None,
            stored,
        }))
    }

    /// The fields, to change while the server is being set up; changed
    /// later, the copies already handed out would keep the old ones.
    fn setup(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.0)
    }

    /// Renders `/metrics` with `handle`.
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.setup().metrics = Some(handle);
        self
    }

    /// Shares generations with the other instances on the same Redis.
    /// `keys` are the `--api-key` values, in the order the state got them;
    /// `epilogue` encodes the end of a log whose owner died.
    pub fn share(
        mut self,
        config: ReplicaConfig,
        keys: &[String],
        epilogue: Epilogue,
    ) -> Result<Self, String> {
        let secret = config.secret.as_deref().unwrap_or_default().as_bytes();
        if secret.is_empty() && !keys.is_empty() {
            tracing::warn!(
                "--redis-secret is not set: records name callers by a slow hash of their API key, which someone who reads Redis can still test guessed keys against; set the same secret on every instance"
            );
        }
        let callers = std::iter::once(caller_hash(secret, None))
            .chain(
                keys.iter()
                    .filter(|k| !k.is_empty())
                    .map(|k| caller_hash(secret, Some(k))),
            )
            .collect();
        let replicas = Replicas::start(config, callers, Arc::clone(&self.registry), epilogue)?;
        self.generations.share(Arc::clone(&replicas));
        let stored = Arc::new(Stored::new(
            self.settings.stored,
            Some(Arc::clone(&replicas)),
        ));
        let shared = self.setup();
        shared.stored = stored;
        shared.replicas = Some(replicas);
        Ok(self)
    }

    /// The model a request without `model` gets: the backend's, picked
    /// when asked (an upstream may have been down at startup).
    pub fn default_model(&self) -> String {
        self.backend
            .default_model()
            .unwrap_or_else(|| "default".to_owned())
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
