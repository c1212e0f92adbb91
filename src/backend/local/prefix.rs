//! KV caches kept after their generations end, so that the next request
//! that starts with the same tokens computes only the rest: a chat
//! client re-sends the whole conversation each turn, and many share a
//! system prompt. Bounded by memory, each block shared between kept
//! caches counted once; the least recently used go first.

use super::CacheKey;
use crate::model::llama::Cache;

pub(super) struct PromptCache {
    budget: usize,
    used: usize,
    /// Least recently used first.
    entries: Vec<Entry>,
}

struct Entry {
    key: CacheKey,
    /// The tokens whose positions `cache` holds.
    tokens: Vec<u32>,
    cache: Cache,
}

impl PromptCache {
    pub(super) fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            entries: Vec::new(),
        }
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.used
    }

    /// The cache with the longest prefix of `prompt` among the caller's
    /// own: the session's last generation when it matches best, else
    /// another's prefix (a shared system prompt), its blocks shared. Always leaves
    /// the prompt's last token to compute, whose logits start the answer.
    /// Caches never cross callers.
    pub(super) fn take(&mut self, key: &CacheKey, prompt: &[u32]) -> Option<Cache> {
        let most = prompt.len().saturating_sub(1);
        let (at, reuse) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.key.caller == key.caller)
            .map(|(i, e)| {
                let common = common_prefix(&e.tokens, prompt).min(most);
                let own = key.session.is_some() && e.key == *key;
                (i, common, own)
            })
            .max_by_key(|&(_, common, own)| (common, own))
            .map(|(i, common, _)| (i, common))?;
        if reuse == 0 {
            return None;
        }
        let entry = &self.entries[at];
        if key.session.is_some() && entry.key == *key {
            let mut entry = self.entries.remove(at);
            self.recount();
            entry.cache.truncate(reuse);
            Some(entry.cache)
        } else {
            let shared = entry.cache.prefix(reuse);
            let entry = self.entries.remove(at);
            self.entries.push(entry);
            Some(shared)
        }
    }

    /// Keeps a finished generation's cache: `tokens` are the positions it
    /// holds. Replaces the session's previous one.
    pub(super) fn put(&mut self, key: CacheKey, mut tokens: Vec<u32>, cache: Cache) {
        if key.session.is_some()
            && let Some(at) = self.entries.iter().position(|e| e.key == key)
        {
            self.entries.remove(at);
        }
        tokens.truncate(cache.position);
        tokens.shrink_to_fit();
        let own = cache.bytes() + tokens.len() * std::mem::size_of::<u32>();
        if own > self.budget || cache.position == 0 {
            self.recount();
            return;
        }
        self.entries.push(Entry { key, tokens, cache });
        self.recount();
        while self.used > self.budget {
            self.entries.remove(0);
            self.recount();
        }
    }

    /// Bytes held: each block once, however many kept caches share it
    /// (sessions that start from one system prompt), and the tokens.
    fn recount(&mut self) {
        let mut blocks: Vec<(usize, usize)> = self
            .entries
            .iter()
            .flat_map(|e| {
                let per_block = e.cache.bytes() / e.cache.block_ids().count().max(1);
                e.cache.block_ids().map(move |id| (id, per_block))
            })
            .collect();
        blocks.sort_unstable();
        blocks.dedup_by_key(|b| b.0);
        let tokens: usize = self.entries.iter().map(|e| e.tokens.len()).sum();
        self.used = blocks.iter().map(|b| b.1).sum::<usize>() + tokens * std::mem::size_of::<u32>();
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(caller: u32, session: Option<&str>) -> CacheKey {
        CacheKey {
            caller,
            session: session.map(str::to_owned),
        }
    }

    /// A cache holding `n` positions of a tiny model shape.
    fn cache(n: usize) -> Cache {
        Cache::filled(n, 2, 1, 4)
    }

    #[test]
    fn the_session_gets_its_own_cache_back_up_to_the_common_prefix() {
        let mut pc = PromptCache::new(1 << 20);
        pc.put(key(1, Some("a")), vec![1, 2, 3, 4, 5], cache(5));
        let got = pc.take(&key(1, Some("a")), &[1, 2, 3, 9, 9]).expect("hit");
        assert_eq!(got.position, 3);
        assert_eq!(pc.bytes(), 0, "taken out");
        // A prompt that is all cached still computes its last token.
        pc.put(key(1, Some("a")), vec![1, 2, 3], cache(3));
        assert_eq!(
            pc.take(&key(1, Some("a")), &[1, 2, 3])
                .expect("hit")
                .position,
            2
        );
    }

    #[test]
    fn other_sessions_share_a_prefix_and_other_callers_nothing() {
        let mut pc = PromptCache::new(1 << 20);
        pc.put(key(1, Some("a")), vec![7, 7, 7, 1], cache(4));
        let before = pc.bytes();
        let copy = pc.take(&key(1, Some("b")), &[7, 7, 7, 2, 2]).expect("hit");
        assert_eq!(copy.position, 3);
        assert_eq!(pc.bytes(), before, "the original stays");
        assert!(pc.take(&key(2, Some("a")), &[7, 7, 7, 1, 1]).is_none());
        assert!(pc.take(&key(1, None), &[8, 7]).is_none());
    }

    #[test]
    fn a_prefix_kept_again_by_another_session_counts_its_blocks_once() {
        let mut pc = PromptCache::new(1 << 30);
        let tokens: Vec<u32> = (0..130).collect();
        pc.put(key(1, Some("a")), tokens.clone(), cache(130));
        let one = pc.bytes();
        let mut prompt = tokens[..129].to_vec();
        prompt.push(7);
        let shared = pc.take(&key(1, Some("b")), &prompt).expect("hit");
        assert_eq!(shared.position, 129);
        pc.put(key(1, Some("b")), prompt, shared);
        assert_eq!(pc.bytes(), one + 129 * 4, "only b's tokens are new");
    }

    #[test]
    fn memory_is_bounded_and_the_least_recently_used_go_first() {
        let one = {
            let mut pc = PromptCache::new(1 << 20);
            pc.put(key(1, Some("x")), vec![1; 10], cache(10));
            pc.bytes()
        };
        let mut pc = PromptCache::new(2 * one);
        pc.put(key(1, Some("a")), vec![1; 10], cache(10));
        pc.put(key(1, Some("b")), vec![2; 10], cache(10));
        // Using a's prefix makes b the least recently used.
        assert!(pc.take(&key(1, Some("z")), &[1, 1, 5]).is_some());
        pc.put(key(1, Some("c")), vec![3; 10], cache(10));
        assert!(pc.bytes() <= 2 * one);
        assert!(
            pc.take(&key(1, Some("q")), &[2, 2, 5]).is_none(),
            "b evicted"
        );
        assert!(pc.take(&key(1, Some("q")), &[1, 1, 5]).is_some(), "a kept");
        // One entry larger than the whole budget is not kept.
        pc.put(key(1, Some("big")), vec![4; 100], cache(100));
        assert!(pc.take(&key(1, Some("big")), &[4, 4, 4]).is_none());
    }
}
