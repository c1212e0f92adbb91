//! The OpenAI surface on the real model: log probabilities, structured
//! output by constrained decoding (llguidance), and tool calls, checked
//! with plain HTTP and with the clients apps use (openai-python's `parse`,
//! LangChain, the AI SDK).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::common::{post, post_json, read_all};
use crate::model::server;

const MODEL: &str = "SmolLM2-135M-Instruct";

fn ask(user: &str, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "temperature": 0, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": user},
    ]});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn logprobs_have_openais_shape_and_greedy_top_one_is_the_emitted_token() {
    let server = server().await;
    let body = ask(
        "What is the capital of France?",
        json!({"stream": true, "max_tokens": 12, "logprobs": true, "top_logprobs": 3}),
    );
    let t = read_all(
        post(&server, "/v1/chat/completions", &body)
            .send()
            .await
            .expect("sent"),
    )
    .await;
    let entries: Vec<Value> = t
        .chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    // One entry per generated token (the end-of-turn token has none).
    assert!((5..=12).contains(&entries.len()), "{:?}", t.chunks);
    let mut bytes = Vec::new();
    for entry in &entries {
        let logprob = entry["logprob"].as_f64().expect("logprob");
        assert!(logprob <= 0.0, "{entry}");
        let top = entry["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 3, "{entry}");
        assert_eq!(
            top[0]["token"], entry["token"],
            "greedy takes the most likely"
        );
        assert_eq!(top[0]["logprob"], entry["logprob"]);
        assert!(top[1]["logprob"].as_f64() <= top[0]["logprob"].as_f64());
        bytes.extend(
            entry["bytes"]
                .as_array()
                .expect("bytes")
                .iter()
                .map(|b| b.as_u64().expect("a byte") as u8),
        );
    }
    assert_eq!(
        String::from_utf8(bytes).expect("UTF-8"),
        t.text,
        "the tokens spell the text"
    );

    // Not streaming: the same list under choices[0].logprobs.
    let mut body = body;
    body["stream"] = json!(false);
    let answer: Value = post_json(&server, "/v1/chat/completions", &body).await;
    assert_eq!(answer["choices"][0]["logprobs"]["content"], json!(entries));
}

/// A schema of nested objects, arrays, enums, required fields and bounded
/// numbers, picked by `seed`.
fn schema(seed: u64) -> Value {
    let pick = |n: u64| (seed / n) % 4;
    let leaf = |k: u64| match pick(k) {
        0 => json!({"type": "integer", "minimum": seed % 7, "maximum": 10 + seed % 50}),
        1 => json!({"type": "string", "enum": ["red", "green", "blue"]}),
        2 => json!({"type": "number", "minimum": -1.5, "maximum": 99.5}),
        _ => json!({"type": "boolean"}),
    };
    let inner = json!({"type": "object",
        "properties": {"code": leaf(3), "label": {"type": "string", "maxLength": 12}},
        "required": ["code", "label"], "additionalProperties": false});
    let mut properties = json!({"name": {"type": "string", "maxLength": 20}, "value": leaf(1)});
    if seed.is_multiple_of(2) {
        properties["items"] =
            json!({"type": "array", "items": leaf(5), "minItems": 1, "maxItems": 3});
    }
    if seed % 3 != 1 {
        properties["detail"] = inner;
    }
    let required: Vec<&String> = properties.as_object().expect("object").keys().collect();
    json!({"type": "object", "properties": properties, "required": required,
        "additionalProperties": false})
}

/// Checks `value` against the subset of JSON Schema that [`schema`] uses.
fn validate(value: &Value, schema: &Value) -> Result<(), String> {
    let fail = |why: &str| Err(format!("{why}: {value} against {schema}"));
    if let Some(options) = schema["enum"].as_array() {
        return if options.contains(value) {
            Ok(())
        } else {
            fail("not in enum")
        };
    }
    let within = |n: f64| {
        schema["minimum"].as_f64().is_none_or(|m| n >= m)
            && schema["maximum"].as_f64().is_none_or(|m| n <= m)
    };
    match schema["type"].as_str() {
        Some("object") => {
            let Some(object) = value.as_object() else {
                return fail("not an object");
            };
            let properties = schema["properties"].as_object().expect("properties");
            for key in schema["required"].as_array().into_iter().flatten() {
                if !object.contains_key(key.as_str().expect("name")) {
                    return fail("a required property is missing");
                }
            }
            for (key, item) in object {
                match properties.get(key) {
                    Some(property) => validate(item, property)?,
                    None => return fail("an extra property"),
                }
            }
            Ok(())
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                return fail("not an array");
            };
            let count = items.len() as u64;
            if schema["minItems"].as_u64().is_some_and(|m| count < m)
                || schema["maxItems"].as_u64().is_some_and(|m| count > m)
            {
                return fail("wrong item count");
            }
            items
                .iter()
                .try_for_each(|item| validate(item, &schema["items"]))
        }
        Some("integer") if value.is_i64() || value.is_u64() => {
            if within(value.as_f64().expect("number")) {
                Ok(())
            } else {
                fail("out of bounds")
            }
        }
        Some("number") if value.is_number() => {
            if within(value.as_f64().expect("number")) {
                Ok(())
            } else {
                fail("out of bounds")
            }
        }
        Some("string") if value.is_string() => {
            let len = value.as_str().expect("string").chars().count() as u64;
            if schema["maxLength"].as_u64().is_some_and(|m| len > m) {
                fail("too long")
            } else {
                Ok(())
            }
        }
        Some("boolean") if value.is_boolean() => Ok(()),
        _ => fail("wrong type"),
    }
}

#[tokio::test]
async fn fifty_generated_schemas_all_validate() {
    let server = server().await;
    let mut complete = 0;
    for seed in 0..50u64 {
        let schema = schema(seed * 7 + 1);
        let body = ask(
            &format!("Describe item number {seed} as JSON."),
            json!({"max_tokens": 160, "response_format": {"type": "json_schema",
                "json_schema": {"name": "item", "schema": schema, "strict": true}}}),
        );
        let answer: Value = post_json(&server, "/v1/chat/completions", &body).await;
        let choice = &answer["choices"][0];
        if choice["finish_reason"] == "length" {
            continue;
        }
        assert_eq!(choice["finish_reason"], "stop", "{answer}");
        let text = choice["message"]["content"].as_str().expect("content");
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        if let Err(why) = validate(&value, &schema) {
            panic!("schema {seed}: {why}");
        }
        complete += 1;
    }
    assert!(
        complete >= 40,
        "only {complete} of 50 answers ended before max_tokens"
    );
}

#[tokio::test]
async fn json_object_and_a_forced_tool_call_on_the_model() {
    let server = server().await;
    let answer: Value = post(
        &server,
        "/v1/chat/completions",
        &ask(
            "Give me a JSON object about Paris.",
            json!({"max_tokens": 80,
            "response_format": {"type": "json_object"}}),
        ),
    )
    .send()
    .await
    .expect("sent")
    .json()
    .await
    .expect("json");
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    if answer["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text)
                .expect("JSON")
                .is_object(),
            "{text}"
        );
    }

    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"], "additionalProperties": false}}}]);
    let body = ask(
        "What is the weather in Paris?",
        json!({"max_tokens": 60, "stream": true, "tools": tools, "tool_choice": "required"}),
    );
    let t = read_all(
        post(&server, "/v1/chat/completions", &body)
            .send()
            .await
            .expect("sent"),
    )
    .await;
    assert_eq!(
        t.finish_reason.as_deref(),
        Some("tool_calls"),
        "{:?}",
        t.chunks
    );
    let fragments: Vec<&Value> = t
        .chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
        .collect();
    assert!(
        fragments.len() > 2,
        "arguments streamed in pieces: {fragments:?}"
    );
    assert_eq!(fragments[0][0]["function"]["name"], "get_weather");
    assert_eq!(fragments[0][0]["type"], "function");
    let arguments: String = fragments
        .iter()
        .filter_map(|f| f[0]["function"]["arguments"].as_str())
        .collect();
    let arguments: Value = serde_json::from_str(&arguments).expect("arguments are JSON");
    assert!(arguments["city"].is_string(), "{arguments}");

    // More choices than the local backend serves is a 400 naming `n`.
    let refused = post(&server, "/v1/chat/completions", &ask("x", json!({"n": 17})))
        .send()
        .await
        .expect("sent");
    assert_eq!(refused.status(), 400);
    let err: Value = refused.json().await.expect("json");
    assert_eq!(err["error"]["param"], "n");
}

fn clients() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-python")
}

#[tokio::test]
async fn openai_python_parse_and_langchain_on_the_model() {
    let server = server().await;
    let out = crate::clients::run_at(
        &server.base,
        "python3",
        "python/test_structured.py",
        &[("PYTHONPATH", clients()), ("MODEL", PathBuf::from(MODEL))],
    )
    .await;
    assert!(out.contains("structured: ok"), "{out}");
}

#[tokio::test]
async fn the_ai_sdk_calls_a_tool_on_the_model() {
    let server = server().await;
    let env =
        [("MODEL", MODEL), ("TOOL_CHOICE", "get_weather")].map(|(k, v)| (k, PathBuf::from(v)));
    let out = crate::clients::run_at(&server.base, "node", "node/ai_sdk_tools.mjs", &env).await;
    assert!(out.contains("ai-sdk tools: ok"), "{out}");
}
