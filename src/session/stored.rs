//! `Stored`: documents kept for a while by id and owner, in this process
//! or, with `--redis`, shared by every instance: the Responses API's
//! stored responses (their input items, and their final object once they
//! end). What a document holds is the API's business; here it is JSON.
//!
//! In the process, documents live within a byte budget and a TTL, oldest
//! out first, purged as new ones arrive (no timer: an expired document is
//! also refused when read). In Redis, each is one key with its TTL.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::{CallerId, Replicas, SharedStateError};

/// How long documents are kept and how many bytes of them at most.
#[derive(Debug, Clone, Copy)]
pub struct StoredConfig {
    pub ttl: Duration,
    pub budget: usize,
}

pub struct Stored {
    config: StoredConfig,
    local: Mutex<Local>,
    replicas: Option<Arc<Replicas>>,
}

#[derive(Default)]
struct Local {
    documents: HashMap<String, Entry>,
    /// Ids in the order they were last written, with that write's time.
    order: VecDeque<(String, Instant)>,
    bytes: usize,
}

struct Entry {
    owner: CallerId,
    document: Arc<Value>,
    written: Instant,
    bytes: usize,
}

impl Stored {
    pub fn new(config: StoredConfig, replicas: Option<Arc<Replicas>>) -> Self {
        Self {
            config,
            local: Mutex::new(Local::default()),
            replicas,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `document` under `id` for the TTL, replacing what was there.
    pub async fn put(
        &self,
        owner: CallerId,
        id: &str,
        document: Value,
    ) -> Result<(), SharedStateError> {
        if let Some(replicas) = &self.replicas {
            return replicas
                .put_document(owner, id, &document, self.config.ttl)
                .await;
        }
        let bytes = document.to_string().len() + id.len() + 64;
        let now = Instant::now();
        let mut local = self.lock();
        if let Some(old) = local.documents.remove(id) {
            local.bytes -= old.bytes;
        }
        local.bytes += bytes;
        local.documents.insert(
            id.to_owned(),
            Entry {
                owner,
                document: Arc::new(document),
                written: now,
                bytes,
            },
        );
        local.order.push_back((id.to_owned(), now));
        // Out: what expired, then the oldest while over the budget (the one
        // just written stays, even alone over it).
        while let Some((oldest, written)) = local.order.front().cloned() {
            let expired = now.duration_since(written) >= self.config.ttl;
            let over = local.bytes > self.config.budget && oldest != id;
            let stale = local
                .documents
                .get(&oldest)
                .is_none_or(|e| e.written != written);
            if !(expired || over || stale) {
                break;
            }
            local.order.pop_front();
            if !stale && let Some(entry) = local.documents.remove(&oldest) {
                local.bytes -= entry.bytes;
            }
        }
        Ok(())
    }

    /// The owner's document under `id`; another caller's is `None`, as if
    /// it did not exist.
    pub async fn get(
        &self,
        owner: CallerId,
        id: &str,
    ) -> Result<Option<Arc<Value>>, SharedStateError> {
        if let Some(replicas) = &self.replicas {
            return Ok(replicas.get_document(owner, id).await?.map(Arc::new));
        }
        let local = self.lock();
        Ok(local
            .documents
            .get(id)
            .filter(|e| e.owner == owner && e.written.elapsed() < self.config.ttl)
            .map(|e| Arc::clone(&e.document)))
    }

    /// Deletes the owner's document; whether there was one.
    pub async fn delete(&self, owner: CallerId, id: &str) -> Result<bool, SharedStateError> {
        if let Some(replicas) = &self.replicas {
            return replicas.delete_document(owner, id).await;
        }
        let mut local = self.lock();
        let mine = local
            .documents
            .get(id)
            .is_some_and(|e| e.owner == owner && e.written.elapsed() < self.config.ttl);
        if mine && let Some(entry) = local.documents.remove(id) {
            local.bytes -= entry.bytes;
        }
        Ok(mine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(ttl: Duration, budget: usize) -> Stored {
        Stored::new(StoredConfig { ttl, budget }, None)
    }

    #[tokio::test(start_paused = true)]
    async fn documents_are_kept_for_their_owner_until_the_ttl() {
        let s = stored(Duration::from_secs(60), 1 << 20);
        let me = CallerId(1);
        s.put(me, "resp_a", json!({"x": 1})).await.expect("put");
        assert_eq!(
            *s.get(me, "resp_a").await.expect("get").expect("kept"),
            json!({"x": 1})
        );
        assert!(s.get(CallerId(2), "resp_a").await.expect("get").is_none());
        assert!(!s.delete(CallerId(2), "resp_a").await.expect("delete"));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(s.get(me, "resp_a").await.expect("get").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_drops_the_oldest_first_and_a_rewrite_counts_once() {
        let doc = json!({"text": "x".repeat(100)});
        let each = doc.to_string().len() + "resp_0".len() + 64;
        let s = stored(Duration::from_secs(60), 2 * each);
        let me = CallerId::ANONYMOUS;
        for i in 0..3 {
            s.put(me, &format!("resp_{i}"), doc.clone())
                .await
                .expect("put");
        }
        assert!(
            s.get(me, "resp_0").await.expect("get").is_none(),
            "oldest out"
        );
        s.put(me, "resp_1", doc.clone()).await.expect("rewrite");
        assert!(s.get(me, "resp_1").await.expect("get").is_some());
        assert!(s.get(me, "resp_2").await.expect("get").is_some());
        assert!(s.delete(me, "resp_2").await.expect("delete"));
        assert!(s.get(me, "resp_2").await.expect("get").is_none());
    }
}
