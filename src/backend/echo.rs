//! The deterministic `echo` backend: streams the last user message back one
//! word per token. For tests, benches and frontend work without a model.

use std::time::Duration;

use async_stream::stream;
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::stop::StopMatcher;
use super::{
    Accepted, Backend, BackendError, Capabilities, FinishReason, GenerateRequest, ModelCard,
    Prompt, TokenEvent, Usage,
};

pub struct EchoBackend {
    model: String,
    token_delay: Duration,
}

impl EchoBackend {
    pub const DEFAULT_MODEL: &'static str = "echo";

    pub fn new(model: impl Into<String>, token_delay: Duration) -> Self {
        Self {
            model: model.into(),
            token_delay,
        }
    }
}

/// The words echo answers with: the last user message, or the raw prompt.
fn answer_words(prompt: &Prompt) -> Vec<String> {
    let text = match prompt {
        Prompt::Chat(messages) => messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or("", |m| m.content.as_str()),
        Prompt::Text(text) => text.as_str(),
    };
    text.split_whitespace()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

/// Echo's idea of a token: a whitespace-separated word.
fn prompt_tokens(prompt: &Prompt) -> u32 {
    let words = match prompt {
        Prompt::Chat(messages) => messages
            .iter()
            .map(|m| m.content.split_whitespace().count())
            .sum(),
        Prompt::Text(text) => text.split_whitespace().count(),
    };
    u32::try_from(words).unwrap_or(u32::MAX)
}

#[async_trait]
impl Backend for EchoBackend {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_choices: 1,
            // Echo costs next to nothing; the queue limit is what bounds it.
            default_concurrency: 1024,
            relays_fields: false,
        }
    }

    fn default_model(&self) -> Option<String> {
        Some(self.model.clone())
    }

    async fn models(&self) -> Result<Vec<ModelCard>, BackendError> {
        Ok(vec![ModelCard {
            id: self.model.clone(),
            owned_by: "sluicegate".into(),
            context_length: None,
        }])
    }

    async fn generate(
        &self,
        req: GenerateRequest,
        cancel: CancellationToken,
    ) -> Result<Accepted, BackendError> {
        if req.model != self.model {
            return Err(BackendError::ModelNotFound(req.model));
        }
        let words = answer_words(&req.prompt);
        let prompt_tokens = prompt_tokens(&req.prompt);
        let max_tokens = req.max_tokens.map_or(usize::MAX, |n| n as usize);
        let delay = self.token_delay;
        let mut stop = StopMatcher::new(req.stop);
        let tokens = stream! {
            let mut usage = Usage { prompt_tokens, completion_tokens: 0 };
            for (i, word) in words.into_iter().enumerate() {
                if i == max_tokens {
                    let held = stop.finish();
                    if !held.is_empty() {
                        yield Ok(TokenEvent::Token { id: None, text: held });
                    }
                    yield Ok(TokenEvent::Finished { reason: FinishReason::Length, usage });
                    return;
                }
                let cancelled = if delay.is_zero() {
                    cancel.is_cancelled()
                } else {
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => true,
                        () = tokio::time::sleep(delay) => false,
                    }
                };
                if cancelled {
                    yield Ok(TokenEvent::Finished { reason: FinishReason::Cancelled, usage });
                    return;
                }
                usage.completion_tokens += 1;
                let released = stop.push(word);
                yield Ok(TokenEvent::Token { id: None, text: released.text });
                if released.stopped {
                    yield Ok(TokenEvent::Finished { reason: FinishReason::Stop, usage });
                    return;
                }
            }
            let held = stop.finish();
            if !held.is_empty() {
                yield Ok(TokenEvent::Token { id: None, text: held });
            }
            yield Ok(TokenEvent::Finished { reason: FinishReason::Stop, usage });
        };
        Ok(Accepted {
            prompt_tokens: Some(prompt_tokens),
            tokens: Box::pin(tokens),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ChatMessage;
    use futures_util::StreamExt;

    fn chat(text: &str) -> GenerateRequest {
        GenerateRequest {
            model: "echo".into(),
            prompt: Prompt::Chat(vec![
                ChatMessage {
                    role: "user".into(),
                    content: "first question".into(),
                },
                ChatMessage {
                    role: "assistant".into(),
                    content: "an answer".into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: text.into(),
                },
            ]),
            ..GenerateRequest::default()
        }
    }

    async fn run(req: GenerateRequest, cancel: CancellationToken) -> Vec<TokenEvent> {
        let backend = EchoBackend::new("echo", Duration::ZERO);
        let accepted = backend.generate(req, cancel).await.expect("accepted");
        accepted
            .tokens
            .map(|e| e.expect("no error"))
            .collect()
            .await
    }

    fn text_of(events: &[TokenEvent]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                TokenEvent::Token { text, .. } => Some(text.as_str()),
                TokenEvent::Finished { .. } => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn echoes_the_last_user_message_word_by_word() {
        let events = run(chat("hello   big\nworld"), CancellationToken::new()).await;
        assert_eq!(text_of(&events), "hello big world");
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[3],
            TokenEvent::Finished {
                reason: FinishReason::Stop,
                usage: Usage {
                    prompt_tokens: 7,
                    completion_tokens: 3
                }
            }
        );
    }

    #[tokio::test]
    async fn max_tokens_ends_with_length_only_when_words_remain() {
        let mut req = chat("a b c");
        req.max_tokens = Some(2);
        let events = run(req.clone(), CancellationToken::new()).await;
        assert_eq!(text_of(&events), "a b");
        assert!(matches!(
            events.last(),
            Some(TokenEvent::Finished {
                reason: FinishReason::Length,
                ..
            })
        ));
        req.max_tokens = Some(3);
        let events = run(req, CancellationToken::new()).await;
        assert!(matches!(
            events.last(),
            Some(TokenEvent::Finished {
                reason: FinishReason::Stop,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_stop_sequence_ends_the_echo_before_it() {
        let mut req = chat("one two three four");
        req.stop = vec!["thr".into()];
        let events = run(req, CancellationToken::new()).await;
        assert_eq!(text_of(&events), "one two ");
        assert!(matches!(
            events.last(),
            Some(TokenEvent::Finished {
                reason: FinishReason::Stop,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn unknown_model_is_refused_before_streaming() {
        let backend = EchoBackend::new("echo", Duration::ZERO);
        let req = GenerateRequest {
            model: "gpt-5".into(),
            ..chat("x")
        };
        let err = backend.generate(req, CancellationToken::new()).await;
        assert!(matches!(err, Err(BackendError::ModelNotFound(m)) if m == "gpt-5"));
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_interrupts_the_token_delay() {
        let backend = EchoBackend::new("echo", Duration::from_secs(2));
        let cancel = CancellationToken::new();
        let accepted = backend
            .generate(chat("one two three"), cancel.clone())
            .await
            .expect("accepted");
        let mut tokens = accepted.tokens;
        let first = tokens.next().await;
        assert!(matches!(first, Some(Ok(TokenEvent::Token { .. }))));
        let started = tokio::time::Instant::now();
        cancel.cancel();
        let last = tokens.next().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(matches!(
            last,
            Some(Ok(TokenEvent::Finished {
                reason: FinishReason::Cancelled,
                usage: Usage {
                    completion_tokens: 1,
                    ..
                }
            }))
        ));
    }
}
