//! Keeping shared state alive and true: owners renew their leases and
//! session records, readers renew their marks, a cancel whose message was
//! lost is picked up, and an instance that finds Redis emptied (a restart,
//! an eviction) writes back what it holds.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::Ordering;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::super::{EndCause, GenerationId};
use super::follow::text;
use super::keys::masters_of;
use super::link::Primary;
use super::mirror::{Start, own};
use super::{Replicas, cause_from};
use crate::telemetry;

/// An instance's markers, whose absence says that Redis lost its data:
/// one key, or on a Cluster one on each master.
#[derive(Default)]
pub(super) struct Markers {
    /// The masters' slot ranges the keys were chosen for (Cluster).
    masters: Vec<Vec<(u16, u16)>>,
    keys: Vec<String>,
    /// Those that Redis took in the last round.
    written: HashSet<String>,
}

/// Pushes from the subscriber connection: appends and cancels.
pub(super) async fn listen(
    replicas: Weak<Replicas>,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
) {
    while let Some(push) = pushes.recv().await {
        let Some(replicas) = replicas.upgrade() else {
            return;
        };
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                    continue;
                };
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
pub(super) async fn renew(replicas: Weak<Replicas>) {
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

impl Replicas {
    pub(super) fn on_message(&self, channel: &str, payload: &str) {
        if let Some(id) = self.keys.events_of(channel) {
            if let Some(followed) = self.lock_followed().get(&GenerationId::from(id)) {
                followed.wake.send_modify(|n| *n += 1);
            }
        } else if self.keys.control_of(channel) == Some(self.instance.as_str()) {
            let mut words = payload.split(' ');
            if let (Some("cancel"), Some(id), Some(cause)) =
                (words.next(), words.next(), words.next())
                && let Some(generation) = self.registry.get_any(&GenerationId::from(id))
            {
                // In the trace of the request that asked, wherever it came.
                let traceparent = words.next().filter(|t| *t != "-");
                let _span = telemetry::remote_span("cancel", traceparent).entered();
                if generation.cancel(cause_from(cause)) {
                    tracing::info!(completion_id = %generation.id, cause, "cancelled from another instance");
                }
            }
        }
    }

    /// Makes sure this instance hears cancels for what it owns, and under
    /// Sentinel that the connections follow the primary. After a failover
    /// every subscription is made again on the new primary, and what runs
    /// or is retained here is written back: replication is asynchronous,
    /// so the last writes to the old primary may be missing (each append
    /// names its position, so what did arrive is not written twice).
    async fn listen_for_control(self: &Arc<Self>) {
        match self.link.refresh().await {
            Ok(Primary::Same) => {}
            Ok(moved) => {
                self.listening.store(false, Ordering::Relaxed);
                let followed: Vec<_> = self.lock_followed().keys().cloned().collect();
                let mut subscriber = self.link.subscriber();
                for id in followed {
                    let channel = self.keys.events_channel(&id);
                    let _ = self.call(subscriber.subscribe(channel)).await;
                }
                if moved == Primary::Moved {
                    self.write_back().await;
                }
            }
            Err(err) => tracing::warn!(%err, "Sentinel did not name a Redis primary"),
        }
        if self.listening.load(Ordering::Relaxed) {
            return;
        }
        let mut subscriber = self.link.subscriber();
        let channel = self.keys.control_channel(&self.instance);
        if self.call(subscriber.subscribe(channel)).await.is_ok() {
            self.listening.store(true, Ordering::Relaxed);
        }
    }

    /// One renewal round: this instance's marker (whose absence says Redis
    /// lost its data), leases and session records of what runs here, reader
    /// marks of what is read here, and cancels whose message was lost.
    async fn renew_once(self: &Arc<Self>) {
        let owned: Vec<_> = self.lock_owned().values().cloned().collect();
        let followed: Vec<_> = self
            .lock_followed()
            .iter()
            .filter(|(_, f)| f.readers > 0)
            .map(|(id, _)| id.clone())
            .collect();
        // A finished generation being written back holds no lease: should
        // its write-back stall (Redis evicting as fast as it is written), a
        // reader elsewhere ends its stream rather than wait for ever.
        let running: Vec<_> = owned.iter().filter(|g| !g.is_done()).collect();
        let set_px = |key: String, ms: u64| {
            let mut set = redis::cmd("SET");
            set.arg(&key).arg(1).arg("PX").arg(ms);
            (key, set)
        };
        let pexpire = |key: String| {
            let mut expire = redis::cmd("PEXPIRE");
            expire.arg(&key).arg(self.running_ttl_ms());
            (key, expire)
        };
        let markers = self.markers().await;
        let mut commands: Vec<_> = markers
            .iter()
            .map(|key| {
                let mut marker = set_px(key.clone(), self.readers_mark_ms());
                marker.1.arg("GET");
                marker
            })
            .collect();
        // Where each running generation's `cancel` field comes back.
        let mut cancels = Vec::with_capacity(running.len());
        for generation in &running {
            let id = &generation.id;
            commands.push(set_px(self.keys.lease(id), self.lease_ms()));
            commands.push(pexpire(self.keys.meta(id)));
            commands.push(pexpire(self.keys.log(id)));
            if let Some(session) = self.session_key(generation) {
                commands.push(pexpire(session));
            }
            let mut cancel = redis::cmd("HGET");
            cancel.arg(self.keys.meta(id)).arg("cancel");
            cancels.push(commands.len());
            commands.push((self.keys.meta(id), cancel));
        }
        for id in &followed {
            commands.push(set_px(self.keys.readers(id), self.readers_mark_ms()));
        }
        let Ok(mut replies) = self.query_spread(commands).await else {
            return;
        };
        let lost = {
            let mut kept = self.lock_markers();
            let lost = markers
                .iter()
                .zip(&replies)
                .any(|(key, reply)| *reply == Value::Nil && kept.written.contains(key));
            kept.written = markers.into_iter().collect();
            lost
        };
        if lost {
            tracing::warn!("Redis lost this instance's data; writing it back");
            self.write_back().await;
        }
        for (generation, at) in running.iter().zip(cancels) {
            let cancel = std::mem::replace(&mut replies[at], Value::Nil);
            if let Ok(Some(cause)) = redis::from_redis_value::<Option<String>>(cancel) {
                generation.cancel(cause_from(&cause));
            }
        }
    }

    /// This instance's markers: one, or on a Cluster one on each master
    /// (as `CLUSTER SLOTS` names them now; the last ones when it cannot).
    async fn markers(&self) -> Vec<String> {
        if !self.link.is_cluster() {
            return vec![self.keys.instance_marker(&self.instance)];
        }
        let mut conn = self.link.conn();
        let mut slots = redis::cmd("CLUSTER");
        slots.arg("SLOTS");
        if let Ok(reply) = self.call(slots.query_async::<Vec<Value>>(&mut conn)).await {
            let masters = masters_of(reply);
            let mut kept = self.lock_markers();
            if kept.masters != masters {
                kept.keys = self.keys.instance_markers(&self.instance, &masters);
                kept.masters = masters;
            }
        }
        self.lock_markers().keys.clone()
    }

    fn lock_markers(&self) -> std::sync::MutexGuard<'_, Markers> {
        self.markers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After Redis lost data (a restart, an eviction, a failover): the
    /// record of each generation running here again (its mirror then
    /// writes what the log lacks), and each retained one whole, with its
    /// end.
    async fn write_back(self: &Arc<Self>) {
        let owned: Vec<_> = self.lock_owned().values().cloned().collect();
        for generation in owned.iter().filter(|g| !g.is_done()) {
            match self.rewrite_record(generation).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    generation.cancel(EndCause::EndedElsewhere);
                }
                Err(_) => return,
            }
        }
        for generation in self.registry.retained() {
            if !generation.streamed || self.lock_owned().contains_key(&generation.id) {
                continue;
            }
            self.lock_owned()
                .insert(generation.id.clone(), Arc::clone(&generation));
            self.tasks
                .spawn(own(Arc::clone(self), generation, Start::Again));
        }
    }
}
