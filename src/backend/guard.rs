//! `GuardedRun`: a backend's token stream as the server consumes it. A
//! cancellation ends it at once, whatever the backend is doing, and every
//! run ends exactly once, even when a backend's stream just stops.

use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{
    Accepted, BackendError, ChoiceDelta, CompactString, FinishReason, TokenEvent, TokenStream,
    Usage,
};

pub struct GuardedRun {
    tokens: TokenStream,
    cancel: CancellationToken,
    usage: Usage,
    ended: bool,
}

/// One step of a run, as the server acts on it.
#[derive(Debug)]
pub enum Step {
    Text(CompactString),
    Delta(Box<ChoiceDelta>),
    Finished(FinishReason, Usage),
    Failed(BackendError),
}

impl GuardedRun {
    pub fn new(accepted: Accepted, cancel: CancellationToken) -> Self {
        Self {
            tokens: accepted.tokens,
            cancel,
            usage: Usage {
                prompt_tokens: accepted.prompt_tokens.unwrap_or(0),
                completion_tokens: 0,
            },
            ended: false,
        }
    }

    /// The next step; `None` after the end. Cancel-safe.
    pub async fn next(&mut self) -> Option<Step> {
        if self.ended {
            return None;
        }
        // Cancellation first, as in the wait below. A step that is there
        // already (most are, under load) is taken without registering a
        // waiter on the token and removing it again, each under its lock.
        let event = if self.cancel.is_cancelled() {
            None
        } else if let Some(event) = self.tokens.next().now_or_never() {
            Some(event)
        } else {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => None,
                event = self.tokens.next() => Some(event),
            }
        };
        let step = match event {
            None => Step::Finished(FinishReason::Cancelled, self.usage),
            Some(Some(Ok(TokenEvent::Token { text, .. }))) => {
                self.usage.completion_tokens += 1;
                return Some(Step::Text(text));
            }
            Some(Some(Ok(TokenEvent::Delta(delta)))) => {
                if delta.produces() {
                    self.usage.completion_tokens += 1;
                }
                return Some(Step::Delta(delta));
            }
            Some(Some(Ok(TokenEvent::Finished { reason, usage }))) => {
                // The backend's own figures are the ones everybody gets:
                // the client's usage, the log line and the metrics.
                self.usage = usage;
                Step::Finished(reason, usage)
            }
            Some(Some(Err(err))) => Step::Failed(err),
            Some(None) => Step::Failed(BackendError::Internal(
                "the token stream ended without a finish".into(),
            )),
        };
        self.ended = true;
        Some(step)
    }

    /// Usage as counted so far, or as the backend reported it at its end.
    pub fn usage(&self) -> Usage {
        self.usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    fn accepted(events: Vec<Result<TokenEvent, BackendError>>, pending: bool) -> Accepted {
        let tokens = stream::iter(events);
        Accepted {
            prompt_tokens: Some(3),
            tokens: if pending {
                tokens.chain(stream::pending()).boxed()
            } else {
                tokens.boxed()
            },
        }
    }

    fn token(text: &str) -> Result<TokenEvent, BackendError> {
        Ok(TokenEvent::Token {
            id: None,
            text: text.into(),
        })
    }

    #[tokio::test]
    async fn cancellation_ends_a_stalled_backend_at_once_with_counted_usage() {
        let cancel = CancellationToken::new();
        let mut run = GuardedRun::new(accepted(vec![token("a")], true), cancel.clone());
        assert!(matches!(run.next().await, Some(Step::Text(t)) if t == "a"));
        cancel.cancel();
        let end = run.next().await;
        assert!(matches!(
            end,
            Some(Step::Finished(
                FinishReason::Cancelled,
                Usage {
                    prompt_tokens: 3,
                    completion_tokens: 1
                }
            ))
        ));
        assert!(run.next().await.is_none());
    }

    /// A backend whose next token is always there: the step already
    /// waiting is not taken once the run is cancelled.
    #[tokio::test]
    async fn cancellation_ends_a_backend_that_never_waits() {
        let cancel = CancellationToken::new();
        let endless = Accepted {
            prompt_tokens: Some(3),
            tokens: stream::repeat_with(|| token("a")).boxed(),
        };
        let mut run = GuardedRun::new(endless, cancel.clone());
        assert!(matches!(run.next().await, Some(Step::Text(_))));
        cancel.cancel();
        assert!(matches!(
            run.next().await,
            Some(Step::Finished(FinishReason::Cancelled, _))
        ));
        assert!(run.next().await.is_none());
    }

    #[tokio::test]
    async fn a_stream_that_just_stops_is_a_failure() {
        let mut run = GuardedRun::new(accepted(vec![token("a")], false), CancellationToken::new());
        run.next().await;
        assert!(matches!(run.next().await, Some(Step::Failed(_))));
        assert!(run.next().await.is_none());
    }
}
