//! `Replicas`: the state that several instances share through Redis, so
//! that every guarantee holds whichever instance a request reaches.
//!
//! The instance that runs a generation (its owner) keeps it in its own
//! registry as before and mirrors it into Redis ([`mirror`]); any other
//! instance finds it there and reads its log by entry id ([`follow`]).
//! Leases, reader marks and write-backs live in [`lease`]; the key schema
//! and the scripts in [`keys`].
//!
//! Redis is a network: every reply can be late, lost or duplicated. Every
//! write carries its own position, so a retry is harmless; every change
//! to several keys is one script; every key expires. With Redis away,
//! generations still run and end on their owner, what needs the shared
//! state fails fast, and the mirror catches up once Redis is back.

mod follow;
mod keys;
mod lease;
mod link;
mod mirror;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use redis::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::generation::RemoteReaders;
use super::{CallerId, EndCause, Generation, GenerationId, GenerationRegistry};
use crate::telemetry;
pub use follow::{Follow, RemoteReader};
pub use keys::caller_hash;
use keys::{Keys, Scripts};
use link::{Link, LinkConfig};

/// How a Redis connection and its timing are set.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// `redis://` or `rediss://` for one server, `redis+sentinel://` for a
    /// primary that Sentinel watches, `redis+cluster://` for a Cluster;
    /// with user and password if any.
    pub url: String,
    /// How long an owner's lease lasts; it is renewed three times a lease.
    pub lease: Duration,
    /// Longest wait for one Redis command.
    pub timeout: Duration,
    /// How long finished generations stay in Redis.
    pub resume_ttl: Duration,
    /// What every key and channel starts with (before its colon).
    pub prefix: String,
    /// The key of the HMAC that names callers in records.
    pub secret: Option<String>,
    /// PEM of the CA to trust for `rediss://`, instead of the system's.
    pub ca: Option<Vec<u8>>,
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
    link: Link,
    config: ReplicaConfig,
    keys: Keys,
    scripts: Scripts,
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
    /// Set once the subscriber listens on this instance's control channel
    /// (cleared when the connections move to a new primary).
    listening: AtomicBool,
    /// This instance's markers: finding one gone that was written means
    /// Redis (or a Cluster master) lost its data.
    markers: Mutex<lease::Markers>,
    /// Generations the resume budget evicted here, to delete from Redis.
    evicted: mpsc::Sender<GenerationId>,
    /// Streams started here in the last window (not on a Cluster, where
    /// one transaction cannot span their slots).
    fresh: Arc<mirror::Fresh>,
}

/// Evictions waiting for their deletion from Redis. Past this many (Redis
/// slow or away) the rest are left to their TTL.
const EVICTIONS_QUEUED: usize = 4096;

/// Most evictions deleted in one exchange.
const EVICTIONS_PER_DELETE: usize = 512;

enum Looked {
    Found(RemoteGeneration),
    /// Another caller's: unknown to this one.
    NotYours,
}

struct Followed {
    wake: watch::Sender<u64>,
    readers: usize,
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
        let (pushes, received) = mpsc::unbounded_channel();
        let (evicted, evictions) = mpsc::channel(EVICTIONS_QUEUED);
        let link = Link::open(
            &config.url,
            LinkConfig {
                timeout: config.timeout,
                ca: config.ca.clone(),
            },
            pushes,
        )?;
        let replicas = Arc::new(Self {
            instance: GenerationId::new("i-").as_str().to_owned(),
            link,
            keys: Keys::new(&config.prefix),
            config,
            scripts: Scripts::default(),
            callers,
            registry,
            epilogue,
            owned: Mutex::new(HashMap::new()),
            followed: Mutex::new(HashMap::new()),
            up: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            listening: AtomicBool::new(false),
            markers: Mutex::default(),
            evicted,
            fresh: Arc::default(),
        });
        let weak = Arc::downgrade(&replicas);
        replicas.registry.on_evict(Box::new(move |ids| {
            if let Some(replicas) = weak.upgrade() {
                for id in ids {
                    // Full: Redis is behind, and the TTL removes the rest.
                    let _ = replicas.evicted.try_send(id.clone());
                }
            }
        }));
        tokio::spawn(forget(Arc::downgrade(&replicas), evictions));
        tokio::spawn(mirror::sweep(
            Arc::clone(&replicas.fresh),
            Arc::downgrade(&replicas),
        ));
        tokio::spawn(lease::listen(Arc::downgrade(&replicas), received));
        tokio::spawn(lease::renew(Arc::downgrade(&replicas)));
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

    /// The events that end a log at event `seq` when its owner is gone:
    /// what readers elsewhere get from the orphan ending.
    pub fn epilogue(&self, id: &GenerationId, seq: usize) -> [Bytes; 2] {
        (self.epilogue)(id, seq)
    }

    fn caller(&self, caller: CallerId) -> &str {
        self.callers
            .get(caller.0 as usize)
            .map_or("unknown", String::as_str)
    }

    fn session_key(&self, generation: &Generation) -> Option<String> {
        let session = generation.session.as_ref()?;
        Some(self.keys.session(self.caller(generation.owner), session))
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

    /// [`Self::call`] for a script: a failure is counted by script and
    /// logged with its reason, since it means a change did not happen (or
    /// is not known to have happened).
    async fn script_call<T>(
        &self,
        script: &'static str,
        exchange: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedStateError> {
        let result = self.call(exchange).await;
        if let Err(err) = &result {
            telemetry::redis_script_failed(script);
            tracing::warn!(script, %err, "a Redis script failed");
        }
        result
    }

    /// Publishes a generation that starts here: its record, its lease, and
    /// (with a session) the session's latest. The session's previous
    /// generation, wherever it runs, is cancelled. Only the session switch
    /// is waited for, so that the session's next request, wherever it
    /// lands, finds this one: the record is written meanwhile, and a
    /// lookup elsewhere of an id this young waits for it ([`Self::find`]).
    /// Without Redis the generation runs on, known to this instance only;
    /// its mirror writes the record once Redis is back.
    pub async fn activate(self: &Arc<Self>, generation: &Arc<Generation>) {
        generation.watch_remote_readers(Arc::clone(self) as Arc<dyn RemoteReaders>);
        self.lock_owned()
            .insert(generation.id.clone(), Arc::clone(generation));
        let (replicas, owned) = (Arc::clone(self), Arc::clone(generation));
        if owned.streamed && !self.link.is_cluster() {
            self.fresh.push(owned);
        } else {
            self.tasks.spawn(async move {
            // A stream's first append writes its record.
            if !owned.streamed
                && let Err(err) = replicas.write_record(&owned).await
            {
                tracing::warn!(%err, "generation not shared yet: it is known to this instance only");
            }
            mirror::own(replicas, owned, mirror::Start::New).await;
            }.instrument(tracing::Span::current()));
        }
        let Some(key) = self.session_key(generation) else {
            return;
        };
        let mut swap = redis::cmd("SET");
        swap.arg(key)
            .arg(generation.id.as_str())
            .arg("GET")
            .arg("PX")
            .arg(self.running_ttl_ms());
        let mut conn = self.link.conn();
        let previous = self
            .call(swap.query_async::<Option<String>>(&mut conn))
            .await
            .ok()
            .flatten()
            .map(|id| GenerationId::from(id.as_str()))
            .filter(|id| *id != generation.id);
        let Some(previous) = previous else {
            return;
        };
        if let Some(local) = self.registry.get_any(&previous) {
            local.cancel(EndCause::SessionReplaced);
            return;
        }
        let (replicas, caller) = (Arc::clone(self), generation.owner);
        self.tasks.spawn(async move {
            let asked = replicas
                .until_recorded(&previous, || {
                    replicas.ask_to_cancel(caller, &previous, EndCause::SessionReplaced)
                })
                .await;
            if let Err(err) = asked {
                tracing::warn!(%err, replaced = %previous, "cannot cancel the session's previous generation");
            }
        }.instrument(tracing::Span::current()));
    }

    /// Runs the record script. `Ok(None)`: the generation was ended
    /// elsewhere; otherwise the length of its log in Redis.
    async fn write_record(
        &self,
        generation: &Generation,
    ) -> Result<Option<usize>, SharedStateError> {
        // By hash, loaded again only when Redis answers that it lacks it.
        let mut conn = self.link.conn();
        let len: i64 = self
            .script_call(
                "record",
                self.record_invocation(generation).invoke_async(&mut conn),
            )
            .await?;
        Ok(usize::try_from(len).ok())
    }

    /// A record's fields, as the record script and a first append take
    /// them.
    fn record_args(&self, append: &mut redis::ScriptInvocation<'_>, generation: &Generation) {
        append
            .arg(self.caller(generation.owner))
            .arg(&self.instance)
            .arg(if generation.streamed { "1" } else { "0" })
            .arg(self.running_ttl_ms())
            .arg(self.lease_ms());
    }

    fn record_invocation(&self, generation: &Generation) -> redis::ScriptInvocation<'_> {
        let mut invocation = self.scripts.record.key(self.keys.meta(&generation.id));
        invocation
            .key(self.keys.lease(&generation.id))
            .key(self.keys.log(&generation.id));
        self.record_args(&mut invocation, generation);
        invocation
    }

    /// Writes a running generation's record again after Redis lost it,
    /// with its session's latest if nothing newer took that place.
    /// `Ok(None)`: it was ended elsewhere meanwhile. Otherwise the length
    /// of its log in Redis.
    async fn rewrite_record(
        &self,
        generation: &Generation,
    ) -> Result<Option<usize>, SharedStateError> {
        let len = self.write_record(generation).await?;
        if let (Some(_), Some(key)) = (len, self.session_key(generation)) {
            let mut set = redis::cmd("SET");
            set.arg(key)
                .arg(generation.id.as_str())
                .arg("NX")
                .arg("PX")
                .arg(self.running_ttl_ms());
            let mut conn = self.link.conn();
            self.call(set.query_async::<()>(&mut conn)).await?;
        }
        Ok(len)
    }

    /// Runs commands that may touch keys of many slots: one pipeline per
    /// slot on a Cluster (one in all elsewhere), sent together. Each
    /// command comes with the key that routes it; the replies come back
    /// in the order of the commands.
    async fn query_spread(
        &self,
        commands: Vec<(String, redis::Cmd)>,
    ) -> Result<Vec<Value>, SharedStateError> {
        let mut groups: Vec<(String, redis::Pipeline, Vec<usize>)> = Vec::new();
        for (at, (key, cmd)) in commands.into_iter().enumerate() {
            let group = self.link.group_of(&key);
            let index = match groups.iter().position(|(g, _, _)| g == group) {
                Some(index) => index,
                None => {
                    groups.push((group.to_owned(), redis::pipe(), Vec::new()));
                    groups.len() - 1
                }
            };
            let (_, pipe, places) = &mut groups[index];
            pipe.add_command(cmd);
            places.push(at);
        }
        let total = groups.iter().map(|(_, _, places)| places.len()).sum();
        let replies = join_all(groups.iter().map(|(_, pipe, _)| async move {
            let mut conn = self.link.conn();
            self.call(pipe.query_async::<Vec<Value>>(&mut conn)).await
        }))
        .await;
        let mut ordered = vec![Value::Nil; total];
        for ((_, _, places), replies) in groups.into_iter().zip(replies) {
            for (at, reply) in places.into_iter().zip(replies?) {
                ordered[at] = reply;
            }
        }
        Ok(ordered)
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

    /// Asks the owner of another instance's generation to stop, without
    /// waiting for it. `Ok(None)`: no such generation for this caller;
    /// `Ok(Some(asked))`: whether this call was the one that asked.
    async fn ask_to_cancel(
        &self,
        caller: CallerId,
        id: &GenerationId,
        cause: EndCause,
    ) -> Result<Option<bool>, SharedStateError> {
        let mut conn = self.link.conn();
        let mut invocation = self.scripts.cancel.key(self.keys.meta(id));
        invocation.arg(self.caller(caller)).arg(cause.as_str());
        let (outcome, owner): (i64, Option<String>) = self
            .script_call("cancel", invocation.invoke_async(&mut conn))
            .await?;
        if let (1, Some(owner)) = (outcome, owner) {
            // Should this message be lost, the owner finds the mark in the
            // record on its next renewal round.
            let traceparent = telemetry::traceparent().unwrap_or_else(|| "-".to_owned());
            let mut publish = redis::cmd(self.link.publish());
            publish
                .arg(self.keys.control_channel(&owner))
                .arg(format!("cancel {id} {} {traceparent}", cause.as_str()));
            if let Err(err) = self.call(publish.query_async::<()>(&mut conn)).await {
                tracing::debug!(%err, "the cancel waits for its owner's next renewal");
            }
        }
        Ok(match outcome {
            -1 => None,
            n => Some(n == 1),
        })
    }

    /// Stops another instance's generation and says what happened, as the
    /// cancel endpoint reports it: `Ok(Some(true))` once its owner (or,
    /// for a dead owner, the orphan ending) has ended it after this call
    /// asked; `Ok(Some(false))` when it had already ended or was being
    /// stopped; `Ok(None)` when this caller has no such generation.
    pub async fn cancel(
        &self,
        caller: CallerId,
        id: &GenerationId,
        cause: EndCause,
    ) -> Result<Option<bool>, SharedStateError> {
        match self.ask_to_cancel(caller, id, cause).await? {
            Some(true) => self.until_ended(id).await.map(|()| Some(true)),
            other => Ok(other),
        }
    }

    /// Waits until a generation's record says it ended, ending it for its
    /// owner when the owner is gone. Bounded: an owner that neither ends
    /// it nor loses its lease within two leases is reported unreachable.
    async fn until_ended(&self, id: &GenerationId) -> Result<(), SharedStateError> {
        let lease = self.config.lease;
        let deadline = Instant::now() + 2 * lease + self.config.timeout;
        let mut unleased_since: Option<Instant> = None;
        loop {
            let mut pipe = redis::pipe();
            pipe.cmd("HMGET")
                .arg(self.keys.meta(id))
                .arg("state")
                .arg("n");
            pipe.cmd("EXISTS").arg(self.keys.lease(id));
            let mut conn = self.link.conn();
            let ((state, len), leased): ((Option<String>, Option<usize>), bool) =
                self.call(pipe.query_async(&mut conn)).await?;
            match state.as_deref() {
                Some("run") if !leased => {
                    let since = *unleased_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= lease {
                        self.end_orphan(id, len.unwrap_or(0)).await?;
                        continue;
                    }
                }
                Some("run") => unleased_since = None,
                // Done, or gone with its TTL: either way it does not run.
                _ => return Ok(()),
            }
            if Instant::now() >= deadline {
                return Err(SharedStateError(
                    "the generation's owner did not confirm the cancel".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The caller's generation with this id, as Redis knows it. An owner
    /// sends its first byte before its record reaches Redis, so the record
    /// of an id minted within the last command timeout is waited for
    /// (bounded: about a dozen looks) before the id counts as unknown.
    pub async fn find(
        &self,
        caller: CallerId,
        id: &GenerationId,
    ) -> Result<Option<RemoteGeneration>, SharedStateError> {
        Ok(
            match self.until_recorded(id, || self.look_up(caller, id)).await? {
                Some(Looked::Found(found)) => Some(found),
                Some(Looked::NotYours) | None => None,
            },
        )
    }

    /// Runs `look` (`Ok(None)`: no record of `id`) until it finds the
    /// record. Only for an id minted within the command timeout, whose
    /// record may still be on its way from its owner, it looks again, with
    /// a pause that doubles from 2 ms to 128 ms, until that timeout has
    /// passed: about a dozen looks at most.
    async fn until_recorded<T, Fut>(
        &self,
        id: &GenerationId,
        mut look: impl FnMut() -> Fut,
    ) -> Result<Option<T>, SharedStateError>
    where
        Fut: Future<Output = Result<Option<T>, SharedStateError>>,
    {
        let young = id.minted_within(self.config.timeout);
        let deadline = Instant::now() + self.config.timeout;
        let mut pause = Duration::from_millis(2);
        loop {
            match look().await? {
                None if young && Instant::now() < deadline => {}
                found => return Ok(found),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(128));
        }
    }

    /// One look at a record: `None` when there is none.
    async fn look_up(
        &self,
        caller: CallerId,
        id: &GenerationId,
    ) -> Result<Option<Looked>, SharedStateError> {
        let mut conn = self.link.conn();
        let mut get = redis::cmd("HMGET");
        get.arg(self.keys.meta(id))
            .arg("caller")
            .arg("streamed")
            .arg("state")
            .arg("n");
        let fields: Vec<Option<String>> = self.call(get.query_async(&mut conn)).await?;
        let [Some(owner), streamed, state, len] = fields.as_slice() else {
            return Ok(None);
        };
        if owner != self.caller(caller) {
            return Ok(Some(Looked::NotYours));
        }
        Ok(Some(Looked::Found(RemoteGeneration {
            id: id.clone(),
            streamed: streamed.as_deref() == Some("1"),
            len: len.as_deref().and_then(|n| n.parse().ok()).unwrap_or(0),
            done: state.as_deref() == Some("done"),
        })))
    }

    /// The caller's latest generation in a session, as Redis knows it.
    pub async fn latest_in_session(
        &self,
        caller: CallerId,
        session: &str,
    ) -> Result<Option<RemoteGeneration>, SharedStateError> {
        let key = self.keys.session(self.caller(caller), session);
        let mut conn = self.link.conn();
        let latest: Option<String> = self
            .call(redis::cmd("GET").arg(key).query_async(&mut conn))
            .await?;
        match latest {
            Some(id) => self.find(caller, &GenerationId::from(id.as_str())).await,
            None => Ok(None),
        }
    }

    /// Tries once what this instance will do in Redis (keys and channels
    /// under the prefix, streams, hashes, scripts, pub/sub), so that a
    /// user without a permission is a clear error at start-up rather than
    /// generations that silently stay unshared. Redis away is no error:
    /// instances start before it, and connect once it is there.
    pub async fn check_permissions(&self) -> Result<(), String> {
        if let Err(err) = self.link.refresh().await {
            tracing::warn!(%err, "Sentinel did not name a Redis primary yet");
        }
        // The probe key and channel share a hash tag: one slot.
        let probe_name = format!("{}-probe", self.instance);
        let probe = self.keys.instance_marker(&probe_name);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&probe)
            .arg(1)
            .arg("PX")
            .arg(10_000)
            .ignore();
        pipe.cmd("DEL").arg(&probe).ignore();
        pipe.cmd("HSET").arg(&probe).arg("f").arg(1).ignore();
        pipe.cmd("PEXPIRE").arg(&probe).arg(10_000).ignore();
        pipe.cmd("DEL").arg(&probe).ignore();
        pipe.cmd("XADD")
            .arg(&probe)
            .arg("MAXLEN")
            .arg(1)
            .arg("*")
            .arg("f")
            .arg(1)
            .ignore();
        pipe.cmd("XRANGE").arg(&probe).arg("-").arg("+").ignore();
        pipe.cmd("DEL").arg(&probe).ignore();
        pipe.cmd(self.link.publish())
            .arg(self.keys.control_channel(&probe_name))
            .arg("probe")
            .ignore();
        for script in [
            &self.scripts.record,
            &self.scripts.append,
            &self.scripts.end_orphan,
            &self.scripts.cancel,
        ] {
            pipe.load_script(script).ignore();
        }
        let mut conn = self.link.conn();
        let mut subscriber = self.link.subscriber();
        let checked = match tokio::time::timeout(
            self.config.timeout,
            pipe.query_async::<()>(&mut conn),
        )
        .await
        {
            Ok(Ok(())) => {
                let channel = self.keys.control_channel(&self.instance);
                tokio::time::timeout(self.config.timeout, subscriber.subscribe(channel))
                    .await
                    .unwrap_or(Ok(()))
            }
            Ok(Err(err)) => Err(err),
            Err(_) => Ok(()),
        };
        match checked {
            Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                Err(format!(
                    "--redis: the Redis user may not do what sluicegate needs ({err}); give it keys `~{p}*`, channels `&{p}*` and the commands `+@read +@write +@keyspace +@pubsub +@scripting +@connection` (see the README)",
                    p = self.keys.prefix()
                ))
            }
            Err(err) => {
                tracing::warn!(%err, "Redis not reachable at start-up; generations are shared once it is");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Keeps a caller's document under `id` for `ttl`, for every instance.
    pub async fn put_document(
        &self,
        owner: CallerId,
        id: &str,
        document: &serde_json::Value,
        ttl: Duration,
    ) -> Result<(), SharedStateError> {
        let record = serde_json::json!({"owner": self.caller(owner), "doc": document});
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut set = redis::cmd("SET");
        set.arg(self.keys.document(id))
            .arg(record.to_string())
            .arg("PX")
            .arg(ttl_ms);
        let mut conn = self.link.conn();
        self.call(set.query_async::<()>(&mut conn)).await
    }

    /// The caller's document under `id`; another caller's is `None`.
    pub async fn get_document(
        &self,
        owner: CallerId,
        id: &str,
    ) -> Result<Option<serde_json::Value>, SharedStateError> {
        let mut conn = self.link.conn();
        let mut get = redis::cmd("GET");
        get.arg(self.keys.document(id));
        let record: Option<String> = self.call(get.query_async(&mut conn)).await?;
        Ok(record
            .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
            .filter(|r| r["owner"].as_str() == Some(self.caller(owner)))
            .map(|mut r| r["doc"].take()))
    }

    /// Deletes the caller's document; whether there was one.
    pub async fn delete_document(
        &self,
        owner: CallerId,
        id: &str,
    ) -> Result<bool, SharedStateError> {
        if self.get_document(owner, id).await?.is_none() {
            return Ok(false);
        }
        let mut conn = self.link.conn();
        let mut del = redis::cmd("DEL");
        del.arg(self.keys.document(id));
        let deleted: u64 = self.call(del.query_async(&mut conn)).await?;
        Ok(deleted > 0)
    }

    /// Waits until every mirror has written its last event, or `deadline`.
    pub async fn flush(self: &Arc<Self>, deadline: Instant) {
        // Whatever is fresh goes now, due or not.
        self.take_fresh(true);
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some generations were not fully written to Redis before exit");
        }
    }
}

/// Deletes what the resume budget evicted here from Redis too, so that
/// Redis holds no more than the instances' budgets (and each log no more
/// than `--max-log-bytes`, for no longer than the TTL). Evictions that
/// pile up while one deletion is on its way go out together: one `DEL`
/// (one per slot on a Cluster) for many generations.
async fn forget(replicas: std::sync::Weak<Replicas>, mut evictions: mpsc::Receiver<GenerationId>) {
    let mut ids = Vec::with_capacity(EVICTIONS_PER_DELETE);
    while evictions.recv_many(&mut ids, EVICTIONS_PER_DELETE).await > 0 {
        let Some(replicas) = replicas.upgrade() else {
            return;
        };
        // By slot group: one `DEL` each.
        let mut deletes: Vec<(String, redis::Cmd)> = Vec::new();
        let mut groups: HashMap<String, usize> = HashMap::new();
        for id in ids.drain(..) {
            let meta = replicas.keys.meta(&id);
            let group = replicas.link.group_of(&meta).to_owned();
            let at = *groups.entry(group).or_insert_with(|| {
                deletes.push((meta.clone(), redis::cmd("DEL")));
                deletes.len() - 1
            });
            deletes[at].1.arg(meta).arg(replicas.keys.log(&id));
        }
        // Redis away: the TTL removes them instead.
        let _ = replicas.query_spread(deletes).await;
    }
}
