//! API keys: which caller a presented key belongs to. Comparison is
//! constant-time and keys are never logged.

use subtle::ConstantTimeEq;

use crate::session::CallerId;

/// Why a request has no caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no API key was presented")]
    Missing,
    #[error("the API key is not one of the configured keys")]
    Wrong,
}

/// The configured API keys. Comparison is constant-time and the keys are
/// never logged: a caller is known by its position (`key-2`).
pub struct ApiKeys(Vec<String>);

impl ApiKeys {
    pub fn new(keys: Vec<String>) -> Self {
        Self(keys.into_iter().filter(|k| !k.is_empty()).collect())
    }

    /// Whether no key is configured (everyone is one anonymous caller).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many keys, so how many callers, there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The caller a presented key belongs to. With no keys configured
    /// everyone is the one anonymous caller.
    pub fn identify(&self, presented: Option<&str>) -> Result<CallerId, KeyError> {
        if self.0.is_empty() {
            return Ok(CallerId::ANONYMOUS);
        }
        let presented = presented.ok_or(KeyError::Missing)?;
        // Look at every key whatever matched, so timing tells nothing.
        let mut found = 0u32;
        for (index, key) in (1u32..).zip(&self.0) {
            let same: bool = key.as_bytes().ct_eq(presented.as_bytes()).into();
            if same {
                found = index;
            }
        }
        match found {
            0 => Err(KeyError::Wrong),
            n => Ok(CallerId(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_identify_callers_by_position() {
        let keys = ApiKeys::new(vec!["alpha".into(), "beta".into()]);
        assert_eq!(keys.identify(Some("beta")).ok(), Some(CallerId(2)));
        assert_eq!(keys.identify(Some("gamma")), Err(KeyError::Wrong));
        assert!(keys.identify(Some("bet")).is_err());
        assert_eq!(keys.identify(None), Err(KeyError::Missing));
        let open = ApiKeys::new(Vec::new());
        assert_eq!(open.identify(None).ok(), Some(CallerId::ANONYMOUS));
    }
}
