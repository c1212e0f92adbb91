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

impl GenerationId {
    /// A fresh random id with the given prefix.
    pub fn new(prefix: &str) -> Self {
        let suffix: String = rand::rng()
            .sample_iter(Alphanumeric)
            .take(24)
            .map(char::from)
            .collect();
        Self(format!("{prefix}{suffix}"))
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
