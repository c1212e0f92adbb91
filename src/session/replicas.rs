//! `Replicas`: the state that several instances share through Redis, so
//! that every guarantee holds whichever instance a request reaches.
//!
//! The instance that runs a generation (its owner) keeps it in its own
//! registry as before and mirrors it into Redis; any other instance finds
//! it there. Per generation `g`, all keys share the hash tag `{g}`:
//!
//! - `sg:{g}:m`, a hash: `caller` (a hash of the caller's key), `inst` (the
//!   owner), `streamed`, `state` (`run` or `done`), and `cancel` once some
//!   instance asked the owner to stop.
//! - `sg:{g}:l`, a stream: event `n` is entry `0-(n+1)` with the encoded
//!   event in field `f`, written in batches (one pipeline per wake-up).
//!   Explicit ids make every append a compare-and-set: an instance that
//!   declares a dead owner's log ended and the owner can never both write
//!   the same position.
//! - `sg:{g}:lease`, renewed by the owner while the generation runs; its
//!   absence for a whole lease means the owner died.
//! - `sg:{g}:rd`, renewed by instances that have readers of `g`, so the
//!   owner's reattach grace does not cancel a generation read elsewhere.
//!
//! A session's latest generation is `sg:s:{<caller>}:<session>`, swapped
//! with `SET … GET` so that of two instances starting a generation in one
//! session at once, exactly one sees the other and cancels it. Owners
//! listen on `sg:ctl:<instance>` for cancels; readers elsewhere listen on
//! `sg:ev:<g>` for appends. Every command has a timeout: with Redis away,
//! generations still run and end on their owner, and what needs the
//! shared state fails fast.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Script, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::generation::RemoteReaders;
use super::log::{Batch, LogError, LogReader, LogSource, Read};
use super::{CallerId, EndCause, Generation, GenerationId, GenerationRegistry};
use crate::telemetry;

/// How a Redis connection and its timing are set.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// `redis://` or `rediss://`, with user and password if any.
    pub url: String,
    /// How long an owner's lease lasts; it is renewed three times a lease.
    pub lease: Duration,
    /// Longest wait for one Redis command.
    pub timeout: Duration,
    /// How long finished generations stay in Redis.
    pub resume_ttl: Duration,
}

/// Redis could not be asked, so the answer is unknown.
#[derive(Debug, thiserror::Error)]
#[error("Redis is unreachable: {0}")]
pub struct SharedStateError(String);

/// What another instance's generation looks like from here.
#[derive(Debug, Clone)]
pub struct RemoteGeneration {
    pub id: GenerationId,
    pub streamed: bool,
    /// Events in its log now.
    pub len: usize,
    /// Its log ends with `[DONE]`.
    pub done: bool,
}

/// The events that end a log whose owner died: an error, then `[DONE]`,
/// numbered from the given position. Encoding is the API's business.
pub type Epilogue = Arc<dyn Fn(&GenerationId, usize) -> [Bytes; 2] + Send + Sync>;

pub struct Replicas {
    /// This process, as owners are named in records.
    instance: String,
    conn: ConnectionManager,
    subscriber: ConnectionManager,
    config: ReplicaConfig,
    /// The caller hashes, by `CallerId` index.
    callers: Vec<String>,
    registry: Arc<GenerationRegistry>,
    epilogue: Epilogue,
    /// Generations run here and not yet fully mirrored.
    owned: Mutex<HashMap<GenerationId, Arc<Generation>>>,
    /// Other instances' logs followed here, with their readers.
    followed: Mutex<HashMap<GenerationId, Followed>>,
    up: AtomicBool,
    errors: AtomicU64,
    tasks: TaskTracker,
    /// Set once the subscriber listens on this instance's control channel.
    listening: OnceLock<()>,
    cancel_script: Script,
    append_script: Script,
}

struct Followed {
    wake: watch::Sender<u64>,
    readers: usize,
}

/// Appends the events `ARGV[3..]` to the log `KEYS[1]` as numbers
/// `ARGV[2]`, `ARGV[2]` + 1, … (entry `0-(n+1)` for event `n`), then
/// announces the new length on channel `ARGV[1]`. An id already taken
/// fails the first `XADD` and so the whole batch.
const APPEND: &str = r"
local first = tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('XADD', KEYS[1], '0-' .. (first + i - 2), 'f', ARGV[i])
end
redis.call('PUBLISH', ARGV[1], first + #ARGV - 2)
";

const CANCEL: &str = r"
local m = redis.call('HMGET', KEYS[1], 'caller', 'inst', 'state')
if not m[1] or m[1] ~= ARGV[1] then return -1 end
if m[3] ~= 'run' then return 0 end
if redis.call('HSETNX', KEYS[1], 'cancel', ARGV[2]) == 0 then return 0 end
redis.call('PUBLISH', 'sg:ctl:' .. m[2], 'cancel ' .. ARGV[3] .. ' ' .. ARGV[2])
return 1
";

fn meta_key(id: &GenerationId) -> String {
    format!("sg:{{{id}}}:m")
}

fn log_key(id: &GenerationId) -> String {
    format!("sg:{{{id}}}:l")
}

fn lease_key(id: &GenerationId) -> String {
    format!("sg:{{{id}}}:lease")
}

fn readers_key(id: &GenerationId) -> String {
    format!("sg:{{{id}}}:rd")
}

fn events_channel(id: &GenerationId) -> String {
    format!("sg:ev:{id}")
}

fn entry_id(seq: usize) -> String {
    format!("0-{}", seq + 1)
}

/// A hash of an API key, the caller as records name it: the same on every
/// instance whatever the order of its `--api-key` flags.
pub fn caller_hash(key: Option<&str>) -> String {
    match key {
        None => "anonymous".to_owned(),
        Some(key) => {
            let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
            digest.as_ref()[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        }
    }
}

fn cause_name(cause: EndCause) -> &'static str {
    cause.as_str()
}

fn cause_from(name: &str) -> EndCause {
    match name {
        "session_replaced" => EndCause::SessionReplaced,
        "shutdown" => EndCause::Shutdown,
        _ => EndCause::CancelEndpoint,
    }
}

impl Replicas {
    /// Connects lazily (an instance starts while Redis is away) and starts
    /// the tasks that listen, renew leases and reconnect.
    pub fn start(
        config: ReplicaConfig,
        callers: Vec<String>,
        registry: Arc<GenerationRegistry>,
        epilogue: Epilogue,
    ) -> Result<Arc<Self>, String> {
        let info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("--redis: {e}"))?;
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let info = info.set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(|e| format!("--redis: {e}"))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager.clone())
            .map_err(|e| format!("--redis: {e}"))?;
        let (pushes, received) = mpsc::unbounded_channel();
        let subscriber = ConnectionManager::new_lazy_with_config(
            client,
            manager
                .set_push_sender(pushes)
                .set_automatic_resubscription(),
        )
        .map_err(|e| format!("--redis: {e}"))?;
        let replicas = Arc::new(Self {
            instance: GenerationId::new("i-").as_str().to_owned(),
            conn,
            subscriber,
            config,
            callers,
            registry,
            epilogue,
            owned: Mutex::new(HashMap::new()),
            followed: Mutex::new(HashMap::new()),
            up: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            listening: OnceLock::new(),
            cancel_script: Script::new(CANCEL),
            append_script: Script::new(APPEND),
        });
        let weak = Arc::downgrade(&replicas);
        replicas.registry.on_evict(Box::new(move |ids| {
            if let Some(replicas) = weak.upgrade() {
                replicas.forget(ids.to_vec());
            }
        }));
        tokio::spawn(listen(Arc::downgrade(&replicas), received));
        tokio::spawn(renew(Arc::downgrade(&replicas)));
        Ok(replicas)
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Whether the last command reached Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Commands that failed since start.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn caller(&self, caller: CallerId) -> &str {
        self.callers
            .get(caller.0 as usize)
            .map_or("unknown", String::as_str)
    }

    fn lock_owned(&self) -> MutexGuard<'_, HashMap<GenerationId, Arc<Generation>>> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_followed(&self) -> MutexGuard<'_, HashMap<GenerationId, Followed>> {
        self.followed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one Redis exchange with the timeout, keeping the health flag
    /// and the error count.
    async fn call<T>(
        &self,
        exchange: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedStateError> {
        let result = match tokio::time::timeout(self.config.timeout, exchange).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(SharedStateError(err.to_string())),
            Err(_) => Err(SharedStateError(format!(
                "no answer within {:?}",
                self.config.timeout
            ))),
        };
        match &result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("Redis reachable");
                }
                telemetry::redis_up(true);
            }
            Err(err) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                telemetry::redis_error();
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(%err, "Redis unreachable");
                }
                telemetry::redis_up(false);
            }
        }
        result
    }

    /// Publishes a generation that starts here: its record, its lease, and
    /// (with a session) the session's latest. The session's previous
    /// generation, wherever it runs, is cancelled. Without Redis this
    /// fails and the generation runs on, known to this instance only.
    pub async fn activate(self: &Arc<Self>, generation: &Arc<Generation>) {
        generation.watch_remote_readers(Arc::clone(self) as Arc<dyn RemoteReaders>);
        self.lock_owned()
            .insert(generation.id.clone(), Arc::clone(generation));
        let caller = self.caller(generation.owner).to_owned();
        let mut pipe = self.record(generation);
        let session_key = generation
            .session
            .as_ref()
            .map(|session| format!("sg:s:{{{caller}}}:{session}"));
        if let Some(key) = &session_key {
            pipe.cmd("SET")
                .arg(key)
                .arg(generation.id.as_str())
                .arg("GET")
                .arg("PX")
                .arg(self.running_ttl_ms());
        }
        let mut conn = self.conn.clone();
        let replies: Result<Vec<Value>, _> = self.call(pipe.query_async(&mut conn)).await;
        let tracker = self.tasks.clone();
        tracker.spawn(own(Arc::clone(self), Arc::clone(generation)));
        let previous = match replies {
            Ok(mut replies) if session_key.is_some() => replies.pop(),
            Ok(_) => None,
            Err(err) => {
                tracing::warn!(%err, "generation not shared: it is known to this instance only");
                None
            }
        };
        let previous = previous
            .and_then(|v| redis::from_redis_value::<Option<String>>(v).ok())
            .flatten()
            .map(|id| GenerationId::from(id.as_str()))
            .filter(|id| *id != generation.id);
        if let Some(previous) = previous {
            if let Some(local) = self.registry.get_any(&previous) {
                local.cancel(EndCause::SessionReplaced);
            } else if let Err(err) = self
                .cancel(generation.owner, &previous, EndCause::SessionReplaced)
                .await
            {
                tracing::warn!(%err, replaced = %previous, "cannot cancel the session's previous generation");
            }
        }
    }

    /// The commands that (re)write a running generation's record.
    fn record(&self, generation: &Generation) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        let meta = meta_key(&generation.id);
        pipe.cmd("HSET")
            .arg(&meta)
            .arg("caller")
            .arg(self.caller(generation.owner))
            .arg("inst")
            .arg(&self.instance)
            .arg("streamed")
            .arg(if generation.streamed { "1" } else { "0" })
            .arg("state")
            .arg("run")
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(&meta)
            .arg(self.running_ttl_ms())
            .ignore();
        pipe.cmd("SET")
            .arg(lease_key(&generation.id))
            .arg(1)
            .arg("PX")
            .arg(self.lease_ms())
            .ignore();
        pipe
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX)
    }

    /// A reader mark lasts three leases, renewed every third of one: a
    /// renewal round delayed on a busy machine does not make a reader
    /// elsewhere look gone to the owner's grace.
    fn readers_mark_ms(&self) -> u64 {
        self.lease_ms().saturating_mul(3)
    }

    /// Keys of a running generation outlive a dead owner by the TTL.
    fn running_ttl_ms(&self) -> u64 {
        u64::try_from((self.config.resume_ttl + self.config.lease).as_millis()).unwrap_or(u64::MAX)
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.config.resume_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Asks the owner of another instance's generation to stop it. `Ok(None)`:
    /// no such generation for this caller; `Ok(Some(cancelled))` as the
    /// cancel endpoint reports it.
    pub async fn cancel(
        &self,
        caller: CallerId,
        id: &GenerationId,
        cause: EndCause,
    ) -> Result<Option<bool>, SharedStateError> {
        let mut conn = self.conn.clone();
        let mut invocation = self.cancel_script.key(meta_key(id));
        invocation
            .arg(self.caller(caller))
            .arg(cause_name(cause))
            .arg(id.as_str());
        let outcome: i64 = self.call(invocation.invoke_async(&mut conn)).await?;
        Ok(match outcome {
            -1 => None,
            n => Some(n == 1),
        })
    }

    /// The caller's generation with this id, as Redis knows it.
    pub async fn find(
        &self,
        caller: CallerId,
        id: &GenerationId,
    ) -> Result<Option<RemoteGeneration>, SharedStateError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(meta_key(id))
            .arg("caller")
            .arg("streamed")
            .arg("state");
        pipe.cmd("XLEN").arg(log_key(id));
        let mut conn = self.conn.clone();
        let (fields, len): (Vec<Option<String>>, usize) =
            self.call(pipe.query_async(&mut conn)).await?;
        let [Some(owner), streamed, state] = fields.as_slice() else {
            return Ok(None);
        };
        if owner != self.caller(caller) {
            return Ok(None);
        }
        Ok(Some(RemoteGeneration {
            id: id.clone(),
            streamed: streamed.as_deref() == Some("1"),
            len,
            done: state.as_deref() == Some("done"),
        }))
    }

    /// The caller's latest generation in a session, as Redis knows it.
    pub async fn latest_in_session(
        &self,
        caller: CallerId,
        session: &str,
    ) -> Result<Option<RemoteGeneration>, SharedStateError> {
        let key = format!("sg:s:{{{}}}:{session}", self.caller(caller));
        let mut conn = self.conn.clone();
        let latest: Option<String> = self
            .call(redis::cmd("GET").arg(key).query_async(&mut conn))
            .await?;
        match latest {
            Some(id) => self.find(caller, &GenerationId::from(id.as_str())).await,
            None => Ok(None),
        }
    }

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
        let log = Arc::new(RedisLog {
            replicas: Arc::clone(self),
            id: id.clone(),
            wake,
        });
        // Subscribe before the first read so that no append is missed; a
        // failure only costs latency (reads also poll).
        let mut subscriber = self.subscriber.clone();
        if first {
            let channel = events_channel(id);
            if let Err(err) = self.call(subscriber.subscribe(channel)).await {
                tracing::debug!(%err, "cannot subscribe to a log's appends");
            }
        }
        let mut conn = self.conn.clone();
        let mut mark = redis::cmd("SET");
        mark.arg(readers_key(id))
            .arg(1)
            .arg("PX")
            .arg(self.readers_mark_ms());
        if let Err(err) = self.call(mark.query_async::<()>(&mut conn)).await {
            tracing::debug!(%err, "cannot mark a remote reader");
        }
        RemoteReader {
            reader: LogReader::new(Arc::clone(&log) as Arc<dyn LogSource>, from),
            follow: Follow {
                replicas: Arc::clone(self),
                id: id.clone(),
            },
        }
    }

    /// Deletes what the resume budget evicted here from Redis too, so that
    /// Redis holds no more than the instances' budgets (and each log no
    /// more than `--max-log-bytes`, for no longer than the TTL).
    fn forget(self: &Arc<Self>, ids: Vec<GenerationId>) {
        let replicas = Arc::clone(self);
        self.tasks.spawn(async move {
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("DEL").arg(meta_key(id)).arg(log_key(id)).ignore();
            }
            let mut conn = replicas.conn.clone();
            // Redis away: the TTL removes them instead.
            let _ = replicas.call(pipe.query_async::<()>(&mut conn)).await;
        });
    }

    /// Waits until every mirror has written its last event, or `deadline`.
    pub async fn flush(&self, deadline: Instant) {
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some generations were not fully written to Redis before exit");
        }
    }

    fn on_message(&self, channel: &str, payload: &str) {
        if let Some(id) = channel.strip_prefix("sg:ev:") {
            if let Some(followed) = self.lock_followed().get(&GenerationId::from(id)) {
                followed.wake.send_modify(|n| *n += 1);
            }
        } else if channel.strip_prefix("sg:ctl:") == Some(self.instance.as_str()) {
            let mut words = payload.split(' ');
            if let (Some("cancel"), Some(id), Some(cause)) =
                (words.next(), words.next(), words.next())
                && let Some(generation) = self.registry.get_any(&GenerationId::from(id))
                && generation.cancel(cause_from(cause))
            {
                tracing::info!(completion_id = %generation.id, cause, "cancelled from another instance");
            }
        }
    }

    /// One renewal round: leases of what runs here, reader marks of what is
    /// read here, and cancels whose message was lost.
    async fn renew_once(&self) {
        let owned: Vec<_> = self.lock_owned().values().cloned().collect();
        let followed: Vec<_> = self
            .lock_followed()
            .iter()
            .filter(|(_, f)| f.readers > 0)
            .map(|(id, _)| id.clone())
            .collect();
        if owned.is_empty() && followed.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        let running: Vec<_> = owned.iter().filter(|g| !g.is_done()).collect();
        for generation in &running {
            let id = &generation.id;
            pipe.cmd("SET")
                .arg(lease_key(id))
                .arg(1)
                .arg("PX")
                .arg(self.lease_ms())
                .ignore();
            pipe.cmd("PEXPIRE")
                .arg(meta_key(id))
                .arg(self.running_ttl_ms())
                .ignore();
            pipe.cmd("PEXPIRE")
                .arg(log_key(id))
                .arg(self.running_ttl_ms())
                .ignore();
            pipe.cmd("HGET").arg(meta_key(id)).arg("cancel");
        }
        for id in &followed {
            pipe.cmd("SET")
                .arg(readers_key(id))
                .arg(1)
                .arg("PX")
                .arg(self.readers_mark_ms())
                .ignore();
        }
        let mut conn = self.conn.clone();
        let Ok(cancels) = self
            .call(pipe.query_async::<Vec<Option<String>>>(&mut conn))
            .await
        else {
            return;
        };
        for (generation, cancel) in running.iter().zip(cancels) {
            if let Some(cause) = cancel {
                generation.cancel(cause_from(&cause));
            }
        }
    }

    /// Makes sure this instance hears cancels for what it owns.
    async fn listen_for_control(&self) {
        if self.listening.get().is_some() {
            return;
        }
        let mut subscriber = self.subscriber.clone();
        let channel = format!("sg:ctl:{}", self.instance);
        if self.call(subscriber.subscribe(channel)).await.is_ok() {
            let _ = self.listening.set(());
        }
    }
}

#[async_trait]
impl RemoteReaders for Replicas {
    async fn reading(&self, id: &GenerationId) -> bool {
        let mut conn = self.conn.clone();
        let mut exists = redis::cmd("EXISTS");
        exists.arg(readers_key(id));
        // Redis away: nobody can be reading through it.
        self.call(exists.query_async::<bool>(&mut conn))
            .await
            .unwrap_or(false)
    }
}

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
            let mut subscriber = self.replicas.subscriber.clone();
            let channel = events_channel(&self.id);
            let timeout = self.replicas.config.timeout;
            runtime.spawn(async move {
                let _ = tokio::time::timeout(timeout, subscriber.unsubscribe(channel)).await;
            });
        }
    }
}

/// Another instance's log, read from Redis.
struct RedisLog {
    replicas: Arc<Replicas>,
    id: GenerationId,
    wake: watch::Sender<u64>,
}

/// What one look at a Redis log found.
struct Look {
    frames: Vec<Vec<u8>>,
    done: bool,
    leased: bool,
    len: usize,
}

impl RedisLog {
    async fn look(&self, from: usize, limit: usize) -> Result<Look, SharedStateError> {
        // Entries are a few hundred bytes; ask for about `limit` of them.
        let count = (limit / 256).clamp(16, 1024);
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(log_key(&self.id))
            .arg(entry_id(from))
            .arg("+")
            .arg("COUNT")
            .arg(count);
        pipe.cmd("HGET").arg(meta_key(&self.id)).arg("state");
        pipe.cmd("EXISTS").arg(lease_key(&self.id));
        pipe.cmd("XLEN").arg(log_key(&self.id));
        let mut conn = self.replicas.conn.clone();
        type Reply = (Vec<(String, Vec<Vec<u8>>)>, Option<String>, bool, usize);
        let (entries, state, leased, len): Reply =
            self.replicas.call(pipe.query_async(&mut conn)).await?;
        let frames = entries
            .into_iter()
            .filter_map(|(_, mut fields)| (fields.len() == 2).then(|| fields.swap_remove(1)))
            .collect();
        Ok(Look {
            frames,
            done: state.as_deref() == Some("done"),
            leased,
            len,
        })
    }

    /// Ends a log whose owner died, at its current end. Losing the race to
    /// the owner or to another instance is fine: the next look reads it.
    async fn end_orphan(&self, len: usize) -> Result<(), SharedStateError> {
        let [error, done] = (self.replicas.epilogue)(&self.id, len);
        let key = log_key(&self.id);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("XADD")
            .arg(&key)
            .arg(entry_id(len))
            .arg("f")
            .arg(error.as_ref())
            .ignore();
        pipe.cmd("XADD")
            .arg(&key)
            .arg(entry_id(len + 1))
            .arg("f")
            .arg(done.as_ref())
            .ignore();
        pipe.cmd("HSET")
            .arg(meta_key(&self.id))
            .arg("state")
            .arg("done")
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(meta_key(&self.id))
            .arg(self.replicas.ttl_ms())
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(&key)
            .arg(self.replicas.ttl_ms())
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(events_channel(&self.id))
            .arg(len + 2)
            .ignore();
        let mut conn = self.replicas.conn.clone();
        match self.replicas.call(pipe.query_async::<()>(&mut conn)).await {
            Ok(()) => {
                tracing::warn!(completion_id = %self.id, "owner gone; its log ended here");
                Ok(())
            }
            // An id already taken: someone else wrote there first.
            Err(err) if err.0.contains("equal or smaller") => Ok(()),
            Err(err) => Err(err),
        }
    }
}

#[async_trait]
impl LogSource for RedisLog {
    async fn read(&self, from: usize, limit: usize) -> Result<Read, LogError> {
        let lease = self.replicas.config.lease;
        let poll = lease / 3;
        let mut wake = self.wake.subscribe();
        let mut unleased_since: Option<Instant> = None;
        let mut failing_since: Option<Instant> = None;
        loop {
            wake.borrow_and_update();
            match self.look(from, limit).await {
                Ok(look) => {
                    failing_since = None;
                    if !look.frames.is_empty() {
                        return Ok(Read::Events(batch(look.frames, limit)));
                    }
                    if look.done && from >= look.len {
                        return Ok(Read::End);
                    }
                    if look.leased || look.done {
                        unleased_since = None;
                    } else {
                        let since = *unleased_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= lease {
                            self.end_orphan(look.len)
                                .await
                                .map_err(|e| LogError::Unreachable(e.to_string()))?;
                            continue;
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

/// Whole frames up to `limit` bytes (at least one) as one buffer.
fn batch(frames: Vec<Vec<u8>>, limit: usize) -> Batch {
    let mut bytes = BytesMut::new();
    let mut events = 0;
    for frame in frames {
        if events > 0 && bytes.len() + frame.len() > limit {
            break;
        }
        bytes.extend_from_slice(&frame);
        events += 1;
    }
    Batch {
        bytes: bytes.freeze(),
        events,
    }
}

/// Pushes from the subscriber connection: appends and cancels.
async fn listen(replicas: Weak<Replicas>, mut pushes: mpsc::UnboundedReceiver<PushInfo>) {
    while let Some(push) = pushes.recv().await {
        let Some(replicas) = replicas.upgrade() else {
            return;
        };
        match push.kind {
            PushKind::Message => {
                let mut data = push.data.into_iter();
                let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                    continue;
                };
                let text = |v: Value| redis::from_redis_value::<String>(v).unwrap_or_default();
                replicas.on_message(&text(channel), &text(payload));
            }
            PushKind::Disconnection => {
                replicas.up.store(false, Ordering::Relaxed);
                telemetry::redis_up(false);
            }
            _ => {}
        }
    }
}

/// The renewal task: three rounds a lease.
async fn renew(replicas: Weak<Replicas>) {
    let every = match replicas.upgrade() {
        Some(r) => r.config.lease / 3,
        None => return,
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(replicas) = replicas.upgrade() else {
            return;
        };
        replicas.listen_for_control().await;
        replicas.renew_once().await;
    }
}

/// Mirrors a generation that runs here into Redis, then marks it done
/// with the resume TTL. Retries while Redis is away; after Redis lost its
/// data (a restart), writes the whole log again.
async fn own(replicas: Arc<Replicas>, generation: Arc<Generation>) {
    let id = generation.id.clone();
    if generation.streamed {
        mirror(&replicas, &generation).await;
    } else {
        generation.finished().await;
    }
    let mut pipe = redis::pipe();
    pipe.cmd("HSET")
        .arg(meta_key(&id))
        .arg("state")
        .arg("done")
        .ignore();
    for key in [meta_key(&id), log_key(&id)] {
        pipe.cmd("PEXPIRE").arg(key).arg(replicas.ttl_ms()).ignore();
    }
    pipe.cmd("DEL").arg(lease_key(&id)).ignore();
    let mut conn = replicas.conn.clone();
    for attempt in 0..5u32 {
        if replicas
            .call(pipe.query_async::<()>(&mut conn))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100) * 2u32.pow(attempt)).await;
    }
    replicas.lock_owned().remove(&id);
}

async fn mirror(replicas: &Replicas, generation: &Generation) {
    let id = &generation.id;
    let key = log_key(id);
    let channel = events_channel(id);
    let mut written = 0usize;
    let mut resync = false;
    let mut backoff = Duration::from_millis(50);
    let mut conn = replicas.conn.clone();
    loop {
        if resync {
            let len: Result<usize, _> = replicas
                .call(redis::cmd("XLEN").arg(&key).query_async(&mut conn))
                .await;
            match len {
                Ok(len) if len > written => {
                    // Another instance ended this log: it took us for dead.
                    generation.cancel(EndCause::Error);
                    return;
                }
                Ok(len) => {
                    written = len;
                    let restore = replicas.record(generation);
                    if replicas
                        .call(restore.query_async::<()>(&mut conn))
                        .await
                        .is_ok()
                    {
                        resync = false;
                    }
                }
                Err(_) => {}
            }
            if resync {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                if give_up(generation, replicas) {
                    return;
                }
                continue;
            }
        }
        let Some(frames) = generation.log.frames_from(written, 64 * 1024).await else {
            return;
        };
        // One command per batch, whatever its length: the script appends
        // the events under their explicit ids and announces them.
        let mut append = replicas.append_script.key(&key);
        append.arg(&channel).arg(written);
        for frame in &frames {
            append.arg(frame.as_ref());
        }
        match replicas.call(append.invoke_async::<()>(&mut conn)).await {
            Ok(()) => {
                written += frames.len();
                backoff = Duration::from_millis(50);
            }
            Err(err) => {
                tracing::debug!(%err, completion_id = %id, "mirroring paused");
                resync = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                if give_up(generation, replicas) {
                    return;
                }
            }
        }
    }
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
    use super::*;

    #[test]
    fn caller_hashes_are_stable_and_reveal_nothing_of_the_key() {
        let a = caller_hash(Some("sekrit-one"));
        assert_eq!(a, caller_hash(Some("sekrit-one")));
        assert_ne!(a, caller_hash(Some("sekrit-two")));
        assert_eq!(a.len(), 32);
        assert!(!a.contains("sekrit"));
        assert_eq!(caller_hash(None), "anonymous");
    }

    #[test]
    fn keys_of_one_generation_share_a_hash_tag() {
        let id = GenerationId::from("chatcmpl-abc");
        for key in [
            meta_key(&id),
            log_key(&id),
            lease_key(&id),
            readers_key(&id),
        ] {
            assert!(key.contains("{chatcmpl-abc}"), "{key}");
        }
        assert_eq!(entry_id(0), "0-1");
    }

    #[test]
    fn a_batch_takes_whole_frames_up_to_the_limit() {
        let frames = vec![b"aaaa".to_vec(), b"bbbb".to_vec(), b"cc".to_vec()];
        let b = batch(frames.clone(), 8);
        assert_eq!((&b.bytes[..], b.events), (&b"aaaabbbb"[..], 2));
        let b = batch(frames, 2);
        assert_eq!((&b.bytes[..], b.events), (&b"aaaa"[..], 1));
    }
}
