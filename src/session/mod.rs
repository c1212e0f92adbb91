//! Generations as things that live apart from connections: who owns them,
//! which session they belong to, how they end, and their event logs, in
//! this process or shared with other instances through Redis.

pub mod admission;
pub mod generation;
pub mod log;
pub mod registry;
pub mod replicas;
pub mod run;
pub mod stored;

use std::fmt;

use rand::RngExt;
use rand::distr::Alphanumeric;

pub use admission::{Admission, PerCaller, QueueFull, Ticket};
pub use generation::{Attachment, Generation};
pub use log::{LogError, LogReader, LogSource, MemoryLog, READ_LIMIT};
pub use registry::{GenerationRegistry, RegistryConfig, RetireOnDrop};
pub use replicas::{RemoteGeneration, ReplicaConfig, Replicas, SharedStateError};
pub use run::{Collected, EventEncoder, Generations, Start, StartError};
pub use stored::{Stored, StoredConfig};

/// Who is asking: one per configured API key, or the one anonymous caller.
/// Generations, sessions and ids are visible to their owner only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallerId(pub u32);

impl CallerId {
    pub const ANONYMOUS: Self = Self(0);
}

impl fmt::Display for CallerId {
    /// A label safe to log: never the key itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("anonymous"),
            n => write!(f, "key-{n}"),
        }
    }
}

/// The id a client sees (`chatcmpl-…` or `cmpl-…`), and the key of the
/// registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GenerationId(String);

/// Base-62 digits, in the order `Alphanumeric` does not promise: ours.
const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Characters after the prefix: the minting time in milliseconds, then
/// random ones (95 bits).
const TIME_CHARS: usize = 8;
const RANDOM_CHARS: usize = 16;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl GenerationId {
    /// A fresh id with the given prefix: when it was minted, then random.
    pub fn new(prefix: &str) -> Self {
        let mut ms = now_ms();
        let mut time = [b'0'; TIME_CHARS];
        for digit in time.iter_mut().rev() {
            *digit = DIGITS[(ms % 62) as usize];
            ms /= 62;
        }
        let random: String = rand::rng()
            .sample_iter(Alphanumeric)
            .take(RANDOM_CHARS)
            .map(char::from)
            .collect();
        Self(format!(
            "{prefix}{}{random}",
            String::from_utf8_lossy(&time)
        ))
    }

    /// Whether the id reads as minted (by some instance) less than
    /// `window` ago, or as far ahead: the record of such an id may still
    /// be on its way to Redis. Any string may claim it; that costs its
    /// sender one bounded wait.
    pub fn minted_within(&self, window: std::time::Duration) -> bool {
        let Some(tail) = self
            .0
            .len()
            .checked_sub(TIME_CHARS + RANDOM_CHARS)
            .and_then(|start| self.0.get(start..start + TIME_CHARS))
        else {
            return false;
        };
        let mut ms: u64 = 0;
        for c in tail.bytes() {
            let Some(digit) = DIGITS.iter().position(|d| *d == c) else {
                return false;
            };
            ms = ms.saturating_mul(62).saturating_add(digit as u64);
        }
        let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        now_ms().abs_diff(ms) <= window
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for GenerationId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a generation ended, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCause {
    Finished,
    Length,
    SessionReplaced,
    CancelEndpoint,
    ClientGone,
    Shutdown,
    Error,
    /// Another instance ended it while this one, its owner, was out of
    /// reach and taken for dead.
    EndedElsewhere,
}

impl EndCause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Finished => "finished",
            Self::Length => "length",
            Self::SessionReplaced => "session_replaced",
            Self::CancelEndpoint => "cancel_endpoint",
            Self::ClientGone => "client_gone",
            Self::Shutdown => "shutdown",
            Self::Error => "error",
            Self::EndedElsewhere => "ended_elsewhere",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::GenerationId;

    #[test]
    fn ids_tell_whether_they_are_young() {
        let id = GenerationId::new("chatcmpl-");
        assert_eq!(id.as_str().len(), "chatcmpl-".len() + 24);
        assert!(id.minted_within(Duration::from_secs(1)));
        assert_ne!(id, GenerationId::new("chatcmpl-"));
        // Minted in 1970, or not ours at all.
        assert!(
            !GenerationId::from("chatcmpl-00000001abcdefghijklmnop")
                .minted_within(Duration::from_secs(1))
        );
        assert!(!GenerationId::from("chatcmpl-short").minted_within(Duration::from_secs(1)));
        assert!(
            !GenerationId::from("chatcmpl-!!!!!!!!abcdefghijklmnop")
                .minted_within(Duration::from_secs(1))
        );
    }
}
