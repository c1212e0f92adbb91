//! The Redis key schema and the scripts that change it. Every change that
//! touches more than one key, or that must not run twice, is one script,
//! so that a retried call, a late reply or two instances at once can
//! never leave a half-done state.
//!
//! Per generation `g`, all keys share the hash tag `{g}`:
//!
//! - `<p>{g}:m`, a hash: `caller` (the caller's name), `inst` (the owner),
//!   `streamed`, `state` (`run` or `done`), `n` (events in the log),
//!   `cancel` once some instance asked the owner to stop, `end`
//!   (`orphan`) when another instance ended it for a dead owner, and `z`
//!   when the whole log is one batch written at once (a short answer):
//!   entry `0-1` of the log, kept here with no log key.
//! - `<p>{g}:l`, a stream: each entry is a batch of whole events; entry
//!   `0-(k+1)` starts with event `k` and holds them in field `z`, LZ4
//!   compressed (a block with its size first), or in field `f` as they
//!   are (the few events of an orphan ending). Explicit
//!   ids and `n` make every append a compare-and-set.
//! - `<p>{g}:lease`, renewed by the owner while the generation runs.
//! - `<p>{g}:rd`, renewed by instances that have readers of `g`.
//!
//! A session's latest generation is `<p>s:{<caller>}:<session>`. Owners
//! listen on `<p>ctl:{<instance>}` for cancels, readers on `<p>{g}:ev` for
//! appends (in the generation's slot, so that a script on a Cluster can
//! publish there with `SPUBLISH`), and `<p>inst:{<instance>}` tells an
//! instance whether Redis kept its data since the last look (on a
//! Cluster one `<p>inst:{<instance>.<k>}` on each master). Every key
//! has an expiry from its first write.

use redis::Script;

use super::super::GenerationId;

/// Names every key and channel under one prefix, so that deployments can
/// share a Redis.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` without its trailing colon (`sg`).
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: format!("{prefix}:"),
        }
    }

    /// The prefix with its colon (`sg:`).
    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(super) fn meta(&self, id: &GenerationId) -> String {
        format!("{}{{{id}}}:m", self.prefix)
    }

    pub(super) fn log(&self, id: &GenerationId) -> String {
        format!("{}{{{id}}}:l", self.prefix)
    }

    pub(super) fn lease(&self, id: &GenerationId) -> String {
        format!("{}{{{id}}}:lease", self.prefix)
    }

    pub(super) fn readers(&self, id: &GenerationId) -> String {
        format!("{}{{{id}}}:rd", self.prefix)
    }

    /// A stored document (a stored response), in its generation's slot.
    pub(super) fn document(&self, id: &str) -> String {
        format!("{}{{{id}}}:doc", self.prefix)
    }

    pub(super) fn session(&self, caller: &str, session: &str) -> String {
        format!("{}s:{{{caller}}}:{session}", self.prefix)
    }

    pub(super) fn events_channel(&self, id: &GenerationId) -> String {
        format!("{}{{{id}}}:ev", self.prefix)
    }

    pub(super) fn control_channel(&self, instance: &str) -> String {
        format!("{}ctl:{{{instance}}}", self.prefix)
    }

    /// The generation whose appends a channel announces, if it is one.
    pub(super) fn events_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('{')?
            .strip_suffix("}:ev")
    }

    /// The instance a control channel belongs to, if it is one.
    pub(super) fn control_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("ctl:{")?
            .strip_suffix('}')
    }

    pub(super) fn instance_marker(&self, instance: &str) -> String {
        format!("{}inst:{{{instance}}}", self.prefix)
    }

    /// An instance's markers on a Cluster, one on each master: the first
    /// `<p>inst:{<instance>.<k>}` whose slot is among that master's
    /// ranges. A master restarted empty is found by its own marker.
    pub(super) fn instance_markers(
        &self,
        instance: &str,
        masters: &[Vec<(u16, u16)>],
    ) -> Vec<String> {
        masters
            .iter()
            .filter_map(|ranges| {
                (0..1u32 << 20)
                    .map(|k| format!("{instance}.{k}"))
                    .find(|tag| {
                        let slot = slot_of(tag);
                        ranges.iter().any(|&(from, to)| (from..=to).contains(&slot))
                    })
                    .map(|tag| self.instance_marker(&tag))
            })
            .collect()
    }
}

/// The Cluster slot of a hash tag.
pub(super) fn slot_of(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % 16384
}

/// The slot ranges of each master in a `CLUSTER SLOTS` reply.
pub(super) fn masters_of(reply: Vec<redis::Value>) -> Vec<Vec<(u16, u16)>> {
    use redis::Value;
    let mut masters: Vec<(Value, Vec<(u16, u16)>)> = Vec::new();
    for entry in reply {
        let Value::Array(fields) = entry else {
            continue;
        };
        let (Some(Value::Int(from)), Some(Value::Int(to)), Some(Value::Array(node))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        let (Ok(from), Ok(to)) = (u16::try_from(*from), u16::try_from(*to)) else {
            continue;
        };
        // A master is its address (host and port).
        let address = Value::Array(node.iter().take(2).cloned().collect());
        match masters.iter_mut().find(|(a, _)| *a == address) {
            Some((_, ranges)) => ranges.push((from, to)),
            None => masters.push((address, vec![(from, to)])),
        }
    }
    masters.into_iter().map(|(_, ranges)| ranges).collect()
}

/// The stream entry that starts with event `seq`.
pub(super) fn entry_id(seq: usize) -> String {
    format!("0-{}", seq + 1)
}

/// The number of the first event in the entry with this id.
pub(super) fn entry_start(id: &str) -> Option<usize> {
    id.strip_prefix("0-")?.parse::<usize>().ok()?.checked_sub(1)
}

/// The whole events of an entry: each ends with a blank line, and no
/// event holds one inside (data is one JSON line).
pub(super) fn split_events(blob: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = blob;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .windows(2)
            .position(|w| w == b"\n\n")
            .map_or(rest.len(), |p| p + 2);
        let (event, tail) = rest.split_at(end);
        rest = tail;
        Some(event)
    })
}

/// (Re)writes a running generation's record and lease. Refuses (-1) when
/// the generation was ended elsewhere: an owner back from a partition
/// must not revive it. `n` is kept when the record exists; when Redis
/// lost the record (a restart, an eviction) whatever is left of the log
/// goes too, and the owner writes it again from event 0.
///
/// KEYS: meta, lease, log. ARGV: caller, instance, streamed, running TTL
/// ms, lease ms.
const RECORD: &str = r"
local m = redis.call('HMGET', KEYS[1], 'state', 'n')
if m[1] == 'done' then return -1 end
local n = 0
if m[1] then
  n = tonumber(m[2] or '0')
  redis.call('HSET', KEYS[1], 'caller', ARGV[1], 'inst', ARGV[2], 'streamed', ARGV[3], 'state', 'run')
else
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[1], 'caller', ARGV[1], 'inst', ARGV[2], 'streamed', ARGV[3], 'state', 'run', 'n', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], 1, 'PX', ARGV[5])
return n
";

/// Appends a batch of events that starts at event `first`, only if the
/// log holds exactly `first` events: a retry of an append that did run
/// changes nothing. Returns the log's length after (the caller goes on
/// from there), -1 when the generation was ended elsewhere, -2 when
/// Redis lost the record. The batch that ends the log also marks the
/// end (state `done`, the resume TTL on what is kept, no lease): a
/// short answer costs one script call for all its events and its end.
///
/// The owner's first append also writes the record when there is none
/// (as [`RECORD`] does). When that first append is also the last (a
/// short answer), the batch goes into the record's field `z` instead of
/// a log: the answer is one script call of four commands, and one key.
///
/// KEYS: meta, log, lease. ARGV: channel, first, events in the batch, log
/// TTL ms, the batch (compressed), the publishing command (`SPUBLISH` on a Cluster),
/// and for the last batch the TTL ms left to the ended generation (`0`
/// for any other batch); then, on a first append only, the record's
/// caller, instance, streamed, running TTL ms and lease ms.
const APPEND: &str = r"
local m = redis.call('HMGET', KEYS[1], 'state', 'n')
local fresh = not m[1]
if fresh then
  if not ARGV[8] then return -2 end
  m = {'run', '0'}
end
local first = tonumber(ARGV[2])
local after = first + tonumber(ARGV[3])
local n = tonumber(m[2] or '0')
if m[1] == 'done' then
  if ARGV[7] ~= '0' and n == after then return n end
  return -1
end
if first ~= n then return n end
if fresh and ARGV[7] ~= '0' then
  -- A whole answer in one batch lives in its record: one key, no log.
  redis.call('HSET', KEYS[1], 'caller', ARGV[8], 'inst', ARGV[9], 'streamed', ARGV[10], 'state', 'done', 'n', after, 'z', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  redis.call(ARGV[6], ARGV[1], after)
  return after
end
if fresh then
  -- A log left from a record that Redis lost (evicted) starts over.
  local added = redis.pcall('XADD', KEYS[2], '0-1', 'z', ARGV[5])
  if type(added) == 'table' and added.err then
    redis.call('DEL', KEYS[2])
    redis.call('XADD', KEYS[2], '0-1', 'z', ARGV[5])
  end
else
  redis.call('XADD', KEYS[2], '0-' .. (first + 1), 'z', ARGV[5])
end
if ARGV[7] == '0' then
  if fresh then
    redis.call('HSET', KEYS[1], 'caller', ARGV[8], 'inst', ARGV[9], 'streamed', ARGV[10], 'state', 'run', 'n', after)
    redis.call('PEXPIRE', KEYS[1], ARGV[11])
    redis.call('SET', KEYS[3], 1, 'PX', ARGV[12])
  else
    redis.call('HSET', KEYS[1], 'n', after)
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
else
  redis.call('HSET', KEYS[1], 'n', after, 'state', 'done')
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  redis.call('DEL', KEYS[3])
end
redis.call(ARGV[6], ARGV[1], after)
return after
";

/// Ends a log whose owner died, at its current end, with the given
/// events, once: only while the record says it runs, its lease is gone
/// and its length is still the one the epilogue was numbered from.
///
/// KEYS: meta, log, lease. ARGV: channel, expected length, events in the
/// epilogue, TTL ms, the epilogue, the publishing command.
const END_ORPHAN: &str = r"
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local m = redis.call('HMGET', KEYS[1], 'state', 'n')
if m[1] ~= 'run' then return 0 end
local n = tonumber(m[2] or '0')
if n ~= tonumber(ARGV[2]) then return 0 end
redis.call('XADD', KEYS[2], '0-' .. (n + 1), 'f', ARGV[5])
n = n + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'done', 'n', n, 'end', 'orphan')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call(ARGV[6], ARGV[1], n)
return 1
";

/// Marks a running generation for its owner to stop: `{-1, nil}` when the
/// caller does not own it (or it is unknown), `{0, nil}` when it already ended
/// or was already asked, `{1, owner}` when this call asked. The caller
/// then tells the owner on its control channel, which on a Cluster lives
/// in another slot; an owner that misses the message finds the mark on
/// its next renewal.
///
/// KEYS: meta. ARGV: caller, cause.
const CANCEL: &str = r"
local m = redis.call('HMGET', KEYS[1], 'caller', 'inst', 'state')
if not m[1] or m[1] ~= ARGV[1] then return {-1, false} end
if m[3] ~= 'run' then return {0, false} end
if redis.call('HSETNX', KEYS[1], 'cancel', ARGV[2]) == 0 then return {0, false} end
return {1, m[2]}
";

/// Compiled once per process.
pub(super) struct Scripts {
    pub(super) record: Script,
    pub(super) append: Script,
    pub(super) end_orphan: Script,
    pub(super) cancel: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            record: Script::new(RECORD),
            append: Script::new(APPEND),
            end_orphan: Script::new(END_ORPHAN),
            cancel: Script::new(CANCEL),
        }
    }
}

/// Rounds of the key derivation that names callers when the deployment
/// has no secret: each guess at a key then costs as much, about a tenth of
/// a second of one core.
const UNKEYED_ROUNDS: u32 = 200_000;

/// The caller as records name it, the same on every instance whatever the
/// order of its `--api-key` flags: an HMAC of the API key under the
/// deployment's secret, which gives someone who reads Redis nothing to
/// guess against. Without a secret, a slow derivation (PBKDF2-SHA256) of
/// the key instead, so that testing guessed keys against what Redis holds
/// is slow. Computed once per key, at start-up.
pub fn caller_hash(secret: &[u8], key: Option<&str>) -> String {
    let Some(key) = key else {
        return "anonymous".to_owned();
    };
    let mut tag = [0u8; 16];
    if secret.is_empty() {
        let rounds = std::num::NonZeroU32::new(UNKEYED_ROUNDS).unwrap_or(std::num::NonZeroU32::MIN);
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            rounds,
            b"sluicegate caller",
            key.as_bytes(),
            &mut tag,
        );
    } else {
        let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        tag.copy_from_slice(&ring::hmac::sign(&mac, key.as_bytes()).as_ref()[..16]);
    }
    tag.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_has_a_marker_in_each_masters_slots() {
        // As `CLUSTER KEYSLOT` answers.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("somekey"), 11058);
        let keys = Keys::new("sg");
        let masters = vec![vec![(0, 5460)], vec![(5461, 10922)], vec![(10923, 16383)]];
        let markers = keys.instance_markers("i-abc", &masters);
        assert_eq!(markers.len(), 3);
        for (marker, ranges) in markers.iter().zip(&masters) {
            let tag = marker
                .strip_prefix("sg:inst:{")
                .and_then(|t| t.strip_suffix('}'))
                .expect("a marker");
            assert!(tag.starts_with("i-abc."), "{marker}");
            let (from, to) = ranges[0];
            assert!((from..=to).contains(&slot_of(tag)), "{marker}");
        }
        // A master of one slot has one too.
        assert_eq!(keys.instance_markers("i-abc", &[vec![(7, 7)]]).len(), 1);
    }

    #[test]
    fn caller_hashes_are_stable_keyed_and_reveal_nothing_of_the_key() {
        let a = caller_hash(b"one secret", Some("sekrit-one"));
        assert_eq!(a, caller_hash(b"one secret", Some("sekrit-one")));
        assert_ne!(a, caller_hash(b"one secret", Some("sekrit-two")));
        assert_ne!(a, caller_hash(b"another secret", Some("sekrit-one")));
        assert_eq!(a.len(), 32);
        assert!(!a.contains("sekrit"));
        assert_eq!(caller_hash(b"one secret", None), "anonymous");
        // Without a secret: still one name per key, and not the HMAC
        // under an empty key that a guesser could run at full speed.
        let unkeyed = caller_hash(b"", Some("sekrit-one"));
        assert_eq!(unkeyed, caller_hash(b"", Some("sekrit-one")));
        assert_ne!(unkeyed, caller_hash(b"", Some("sekrit-two")));
        let fast = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b""),
            b"sekrit-one",
        );
        let fast: String = fast.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_ne!(unkeyed, fast);
    }

    #[test]
    fn keys_of_one_generation_share_a_hash_tag_under_the_prefix() {
        let keys = Keys::new("tenant-a");
        let id = GenerationId::from("chatcmpl-abc");
        for key in [
            keys.meta(&id),
            keys.log(&id),
            keys.lease(&id),
            keys.readers(&id),
            keys.events_channel(&id),
        ] {
            assert!(key.starts_with("tenant-a:{chatcmpl-abc}:"), "{key}");
        }
        assert_eq!(
            keys.events_of(&keys.events_channel(&id)),
            Some("chatcmpl-abc")
        );
        assert_eq!(keys.control_of(&keys.control_channel("i-x")), Some("i-x"));
        assert_eq!(Keys::new("sg").events_of("tenant-a:{x}:ev"), None);
        assert_eq!(keys.events_of("tenant-a:{x}:m"), None);
    }

    #[test]
    fn entry_ids_name_their_first_event() {
        assert_eq!(entry_id(0), "0-1");
        assert_eq!(entry_start(&entry_id(41)), Some(41));
        assert_eq!(entry_start("0-0"), None);
        assert_eq!(entry_start("1-5"), None);
    }

    #[test]
    fn an_entry_splits_into_its_whole_events() {
        let blob = b"retry: 1000\ndata: {}\nid: a.0\n\ndata: {\"x\":1}\nid: a.1\n\n";
        let events: Vec<&[u8]> = split_events(blob).collect();
        assert_eq!(
            events,
            [
                &b"retry: 1000\ndata: {}\nid: a.0\n\n"[..],
                b"data: {\"x\":1}\nid: a.1\n\n"
            ]
        );
        assert_eq!(split_events(b"").count(), 0);
    }
}
