//! Request validation: an OpenAI body becomes a backend `GenerateRequest`,
//! or a 400 that names the field and says what to change.

use super::error::ApiError;
use super::sse::Flavor;
use super::wire::{CompletionRequest, MessageContent, PromptInput, StopInput};
use crate::backend::features::{self, Features};
use crate::backend::{Capabilities, ChatMessage, GenerateRequest, Prompt, Sampling};

/// A validated request and how to answer it.
#[derive(Debug)]
pub struct Plan {
    pub request: GenerateRequest,
    pub stream: bool,
    /// Which request field set `max_tokens` (`max_tokens` or
    /// `max_completion_tokens`), for a dialect that names it in errors.
    pub max_tokens_field: &'static str,
    pub include_usage: bool,
}

const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];
const MAX_STOP: usize = 4;

/// Refuses, with a 400 naming it, a field the backend neither relays nor
/// serves (set to its "off" value it is fine), then reads what it serves.
/// Fields never heard of are ignored, as the contract says.
fn features(
    extra: &serde_json::Map<String, serde_json::Value>,
    capabilities: Capabilities,
) -> Result<Features, ApiError> {
    if capabilities.relays_fields {
        return Ok(Features::default());
    }
    for (key, value) in extra {
        let known = features::FIELDS.contains(&key.as_str());
        if !known || value.is_null() || features::is_off(key, value) {
            continue;
        }
        if !capabilities.serves.contains(&key.as_str()) {
            return Err(ApiError::invalid(
                format!(
                    "`{key}` is not supported by this server's backend; the `openai` backend relays it to its upstream."
                ),
                Some(key.clone()),
            ));
        }
    }
    Features::parse(extra).map_err(|e| ApiError::invalid(e.message, Some(e.param)))
}

pub fn plan(
    body: CompletionRequest,
    flavor: Flavor,
    default_model: &str,
    capabilities: Capabilities,
) -> Result<Plan, ApiError> {
    let prompt = match flavor {
        Flavor::Chat => Prompt::Chat(messages(body.messages)?),
        Flavor::Legacy => Prompt::Text(prompt(body.prompt)?),
    };
    let (max_tokens, max_tokens_field) = match (body.max_completion_tokens, body.max_tokens) {
        (Some(0), _) => return Err(positive("max_completion_tokens")),
        (None, Some(0)) => return Err(positive("max_tokens")),
        (n @ Some(_), _) => (n, "max_completion_tokens"),
        (None, n) => (n, "max_tokens"),
    };
    let n = body.n.unwrap_or(1);
    if n == 0 || n > capabilities.max_choices {
        return Err(ApiError::invalid(
            format!(
                "`n` must be between 1 and {} for this backend, got {n}.",
                capabilities.max_choices
            ),
            Some("n".to_owned()),
        ));
    }
    let sampling = Sampling {
        temperature: in_range("temperature", body.temperature, 0.0, 2.0)?,
        top_p: in_range("top_p", body.top_p, 0.0, 1.0)?,
        top_k: body.top_k,
        // Negative seeds are valid in OpenAI's API; any fixed mapping keeps
        // "same seed, same output".
        seed: body.seed.map(|s| s as u64),
        presence_penalty: in_range("presence_penalty", body.presence_penalty, -2.0, 2.0)?,
        frequency_penalty: in_range("frequency_penalty", body.frequency_penalty, -2.0, 2.0)?,
        repetition_penalty: match body.repetition_penalty {
            Some(p) if p <= 0.0 || p > 10.0 => {
                return Err(ApiError::invalid(
                    format!("`repetition_penalty` must be above 0 and at most 10, got {p}."),
                    Some("repetition_penalty".to_owned()),
                ));
            }
            p => p,
        },
    };
    let features = features(&body.extra, capabilities)?;
    let stream = body.stream.unwrap_or(false);
    Ok(Plan {
        request: GenerateRequest {
            model: body.model.unwrap_or_else(|| default_model.to_owned()),
            prompt,
            sampling,
            max_tokens,
            // Refused beyond the room only where the caller says so.
            max_tokens_field: None,
            stop: stop(body.stop)?,
            demand: Default::default(),
            extra: body.extra,
            choices: n,
            features,
            cache_key: None,
        },
        stream,
        max_tokens_field,
        include_usage: stream
            && body
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
    })
}

fn positive(param: &str) -> ApiError {
    ApiError::invalid(
        format!("`{param}` must be at least 1."),
        Some(param.to_owned()),
    )
}

fn in_range(param: &str, value: Option<f32>, min: f32, max: f32) -> Result<Option<f32>, ApiError> {
    match value {
        Some(v) if !(min..=max).contains(&v) => Err(ApiError::invalid(
            format!("`{param}` must be between {min} and {max}, got {v}."),
            Some(param.to_owned()),
        )),
        v => Ok(v),
    }
}

fn messages(
    messages: Option<Vec<super::wire::RequestMessage>>,
) -> Result<Vec<ChatMessage>, ApiError> {
    let messages = messages.ok_or_else(|| {
        ApiError::invalid(
            "`messages` is required: an array of {\"role\", \"content\"} objects.",
            Some("messages".to_owned()),
        )
    })?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must contain at least one message.",
            Some("messages".to_owned()),
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    format!(
                        "`messages[{i}].role` must be one of {}, got `{}`.",
                        ROLES.join(", "),
                        m.role
                    ),
                    Some(format!("messages[{i}].role")),
                ));
            }
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(text)) => text,
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.into_iter().enumerate() {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            _ => {
                                return Err(ApiError::invalid(
                                    format!(
                                        "`messages[{i}].content[{j}]` must be a {{\"type\": \"text\", \"text\": ...}} part; this model takes text only."
                                    ),
                                    Some(format!("messages[{i}].content[{j}]")),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage {
                role: m.role,
                content,
                extra: m.extra,
            })
        })
        .collect()
}

fn prompt(prompt: Option<PromptInput>) -> Result<String, ApiError> {
    let param = || Some("prompt".to_owned());
    match prompt {
        None => Err(ApiError::invalid(
            "`prompt` is required: a string.",
            param(),
        )),
        Some(PromptInput::One(text)) => Ok(text),
        Some(PromptInput::Many(mut texts)) if texts.len() == 1 => Ok(texts.remove(0)),
        Some(PromptInput::Many(_)) => Err(ApiError::invalid(
            "`prompt` must be one string (or an array of exactly one); send one request per prompt.",
            param(),
        )),
    }
}

fn stop(stop: Option<StopInput>) -> Result<Vec<String>, ApiError> {
    let stop = match stop {
        None => Vec::new(),
        Some(StopInput::One(s)) => vec![s],
        Some(StopInput::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            format!(
                "`stop` takes at most {MAX_STOP} sequences, got {}.",
                stop.len()
            ),
            Some("stop".to_owned()),
        ));
    }
    Ok(stop.into_iter().filter(|s| !s.is_empty()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::extract::parse;

    const CAPS: Capabilities = Capabilities {
        max_choices: 1,
        default_concurrency: 1,
        relays_fields: false,
        serves: &[],
    };

    fn plan_of(json: &str, flavor: Flavor) -> Result<Plan, ApiError> {
        plan(parse(json.as_bytes())?, flavor, "echo", CAPS)
    }

    #[test]
    fn fields_a_backend_cannot_serve_are_named_and_off_values_pass() {
        let chat =
            |extra: &str| format!(r#"{{"messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
        for (field, value) in [
            ("tools", r#"[{"type":"function","function":{"name":"f"}}]"#),
            ("tool_choice", r#""required""#),
            ("response_format", r#"{"type":"json_object"}"#),
            ("logprobs", "true"),
            ("top_logprobs", "3"),
            ("logit_bias", r#"{"50256": -100}"#),
        ] {
            let err = plan_of(&chat(&format!(r#","{field}":{value}"#)), Flavor::Chat)
                .expect_err("refused");
            assert!(
                matches!(&err, ApiError::InvalidRequest { param: Some(p), .. } if p == field),
                "{field}: {err:?}"
            );
        }
        for fine in [
            r#","tools":[]"#,
            r#","tool_choice":"none""#,
            r#","response_format":{"type":"text"}"#,
            r#","logprobs":false"#,
            r#","user":"u-1","metadata":{"a":"b"},"never_heard_of":1"#,
        ] {
            assert!(plan_of(&chat(fine), Flavor::Chat).is_ok(), "{fine}");
        }
        let relayed = plan(
            parse(chat(r#","tools":[1],"user":"u-1""#).as_bytes()).expect("parses"),
            Flavor::Chat,
            "m",
            Capabilities {
                relays_fields: true,
                serves: &[],
                ..CAPS
            },
        )
        .expect("a relay takes it");
        assert_eq!(relayed.request.extra["user"], "u-1");
        assert_eq!(relayed.request.extra["tools"], serde_json::json!([1]));
    }

    fn param_of(json: &str) -> Option<String> {
        match plan_of(json, Flavor::Chat) {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn a_full_chat_request_maps_every_field() {
        let p = plan_of(
            r#"{"model":"echo","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                "stream":true,"stream_options":{"include_usage":true},"max_tokens":9,"max_completion_tokens":5,
                "temperature":0.5,"top_p":0.9,"top_k":40,"seed":-1,"stop":"x","presence_penalty":1,"frequency_penalty":-1,
                "repetition_penalty":1.1,"n":1,"user":"ignored","logit_bias":{}}"#,
            Flavor::Chat,
        )
        .expect("valid");
        assert!(p.stream && p.include_usage);
        assert_eq!(p.request.max_tokens, Some(5));
        assert_eq!(p.request.stop, vec!["x".to_owned()]);
        assert_eq!(p.request.sampling.top_k, Some(40));
        assert_eq!(p.request.sampling.seed, Some(u64::MAX));
        let Prompt::Chat(messages) = &p.request.prompt else {
            panic!("chat prompt")
        };
        assert_eq!(messages[1].content, "ab");
    }

    #[test]
    fn defaults_fill_in_what_the_client_left_out() {
        let p = plan_of(r#"{"messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#, Flavor::Chat)
            .expect("valid");
        assert_eq!(p.request.model, "echo");
        assert!(!p.stream && !p.include_usage);
    }

    #[test]
    fn bad_values_name_their_param() {
        let cases = [
            (r#"{}"#, "messages"),
            (r#"{"messages":[]}"#, "messages"),
            (
                r#"{"messages":[{"role":"wizard","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "messages[0].content[0]",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":2.5}"#,
                "temperature",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_p":-0.1}"#,
                "top_p",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"presence_penalty":3}"#,
                "presence_penalty",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"frequency_penalty":-3}"#,
                "frequency_penalty",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"repetition_penalty":0}"#,
                "repetition_penalty",
            ),
            (r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#, "n"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
                "max_tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
                "stop",
            ),
        ];
        for (json, param) in cases {
            assert_eq!(param_of(json).as_deref(), Some(param), "{json}");
        }
    }

    #[test]
    fn legacy_takes_one_prompt() {
        let p = plan_of(r#"{"prompt":["once upon"]}"#, Flavor::Legacy).expect("valid");
        assert!(matches!(p.request.prompt, Prompt::Text(t) if t == "once upon"));
        assert!(plan_of(r#"{"prompt":["a","b"]}"#, Flavor::Legacy).is_err());
        assert!(
            plan_of(
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Flavor::Legacy
            )
            .is_err()
        );
    }
}
