//! The local engine on the real model: held to llama.cpp's greedy ids and
//! candle's logits, batching that changes no answer, prompts cancelled
//! while they are fed, and a conversation's second turn reusing the first
//! turn's KV cache.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use futures_util::future::join_all;
use serde_json::{Value, json};
use sluicegate::backend::local::{LocalBackend, LocalSettings};

use crate::common::{
    Events, TestServer, cancel, client, completion_id, eventually, json_reply, metrics_text, post,
    post_json, transcript,
};
use crate::model::{backend_with, chat, model_path, shared};
use crate::process::{Process, sample};

const SYSTEM: &str = "You are a helpful assistant.";

fn reference_cases() -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/llama_cpp_greedy.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference data")).expect("json")
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| u32::try_from(v.as_u64().expect("id")).expect("u32"))
        .collect()
}

fn argmax(logits: &[f32]) -> u32 {
    let best = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    u32::try_from(best).expect("u32")
}

/// Greedy ids from llama.cpp itself on the same GGUF and prompt ids (see
/// benches/README.md). Fed llama.cpp's own tokens, the engine picks each
/// one, except at a near tie: two engines that round differently may split
/// those, so there llama.cpp's pick must be within 0.5 of the engine's
/// top logit. Nine in ten ids of every case, and all of the chat's, are
/// exact.
#[test]
fn greedy_ids_match_llama_cpp() {
    let backend = shared();
    let weights = &backend.model().weights;
    for case in reference_cases() {
        let (prompt, want) = (ids(&case["prompt_ids"]), ids(&case["greedy_ids"]));
        let mut cache = weights.new_cache();
        let mut input = prompt.clone();
        let mut exact = 0;
        for (i, &token) in want.iter().enumerate() {
            let logits = weights.forward(&input, &mut cache).expect("forward");
            let top = logits[argmax(&logits) as usize];
            if argmax(&logits) == token {
                exact += 1;
            } else {
                assert!(
                    top - logits[token as usize] < 0.5,
                    "{} at {i}: llama.cpp's {token} has {} where our top {} has {top}",
                    case["name"],
                    logits[token as usize],
                    argmax(&logits)
                );
            }
            input = vec![token];
        }
        if case["name"] == "chat_capital_of_france" {
            assert_eq!(exact, want.len());
        }
        assert!(
            exact * 10 >= want.len() * 9,
            "{}: {exact} exact",
            case["name"]
        );
    }
}

/// Logits after the chat prompt against candle-transformers'
/// `quantized_llama` on the same GGUF. Both quantize activations to 8
/// bits for the 4-bit products, but in different ways (candle's Q8_1
/// blocks, ours with their sums kept in f32), and thirty layers add that
/// rounding up. The two differ mostly by one offset over all logits
/// (measured 0.97), which no softmax sees, so each is taken about its own
/// mean: then they agree within 1.5 at most and 0.25 on average (measured
/// 1.04 and 0.15) over logits that span about 37, and on the top token.
#[test]
fn logits_match_candle_quantized_llama() {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let path = model_path();
    let mut file = File::open(&path).expect("model");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    let mut reference = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).expect("loads");
    let case = &reference_cases()[0];
    let prompt = ids(&case["prompt_ids"]);
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("tensor");
    let want: Vec<f32> = reference
        .forward(&input, 0)
        .and_then(|t| t.squeeze(0))
        .and_then(|t| t.to_vec1())
        .expect("candle forward");
    let backend = shared();
    let weights = &backend.model().weights;
    let got = weights
        .forward(&prompt, &mut weights.new_cache())
        .expect("forward");
    assert_eq!(got.len(), want.len());
    let average = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (offset_got, offset_want) = (average(&got), average(&want));
    let diffs: Vec<f32> = got
        .iter()
        .zip(&want)
        .map(|(a, b)| ((a - offset_got) - (b - offset_want)).abs())
        .collect();
    let max = diffs.iter().copied().fold(0.0, f32::max);
    let mean = average(&diffs);
    assert!(
        max < 1.5 && mean < 0.25,
        "max {max}, mean {mean}, offset {}",
        offset_got - offset_want
    );
    assert_eq!(argmax(&got), argmax(&want));
}

/// A backend of its own, so that other tests' work does not count,
/// behind a server of its own.
async fn own(name: Option<&str>, settings: LocalSettings) -> (Arc<LocalBackend>, TestServer) {
    let backend = Arc::new(backend_with(name, settings));
    let server = TestServer::options()
        .backend(Arc::clone(&backend) as _)
        .start()
        .await;
    (backend, server)
}

async fn answer(server: &TestServer, model: &str, body: Value) -> Value {
    let mut body = body;
    body["model"] = json!(model);
    post_json(server, "/v1/chat/completions", &body).await
}

fn text(answer: &Value) -> String {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Prompt lookup drafts tokens from the text so far and verifies them in
/// one pass: the answers are the same token for token, greedy or seeded
/// sampling, with or without a schema, and a quoting answer keeps drafts.
#[tokio::test]
async fn prompt_lookup_changes_no_token_of_any_answer() {
    let (_, plain) = own(Some("plain"), LocalSettings::default()).await;
    let (drafting, fast) = own(
        Some("drafting"),
        LocalSettings {
            prompt_lookup: 8,
            ..LocalSettings::default()
        },
    )
    .await;
    let quote = "Repeat this text exactly, word for word: The river bends around the old \
                 mill, where the miller keeps his sacks of flour and his grey cat sleeps \
                 beside the warm stones of the oven.";
    let schema = json!({"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
    }}});
    let bodies = [
        chat(
            Some(SYSTEM),
            quote,
            json!({"temperature": 0, "max_tokens": 64}),
        ),
        chat(
            Some(SYSTEM),
            "What is the capital of France?",
            json!({"temperature": 0, "max_tokens": 24}),
        ),
        chat(
            Some(SYSTEM),
            quote,
            json!({"temperature": 0.8, "seed": 7, "max_tokens": 64}),
        ),
        chat(
            Some(SYSTEM),
            quote,
            json!({"temperature": 0, "max_tokens": 48, "response_format": schema, "logprobs": true, "top_logprobs": 2}),
        ),
    ];
    for body in bodies {
        let alone = answer(&plain, "plain", body.clone()).await;
        let drafted = answer(&fast, "drafting", body.clone()).await;
        assert_eq!(text(&drafted), text(&alone), "{body}");
        assert_eq!(drafted["usage"], alone["usage"], "{body}");
        assert_eq!(
            drafted["choices"][0]["logprobs"], alone["choices"][0]["logprobs"],
            "{body}"
        );
    }
    let (drafted, kept) = drafting.drafts();
    assert!(
        kept > 0 && drafted > kept,
        "{kept} of {drafted} drafted tokens kept"
    );
}

/// `n` choices compute their prompt once and share its cache blocks,
/// then each answers as a request of its own would: greedy, the same
/// answer; seeded, choice `i` as the request with seed + `i`. Usage
/// counts the prompt once and every choice's tokens. Streamed, each
/// choice has its index and its own finish, before one `[DONE]`.
#[tokio::test]
async fn choices_share_the_prompt_and_each_answers_as_its_own_request_would() {
    let (backend, server) = own(Some("choices"), LocalSettings::default()).await;
    let model = "choices";
    let question = |extra: Value| chat(Some(SYSTEM), "What is the capital of France?", extra);
    let texts = |answer: &Value| -> Vec<String> {
        let choices = answer["choices"].as_array().expect("choices");
        (0..choices.len())
            .map(|i| {
                assert_eq!(choices[i]["index"], i, "{answer}");
                choices[i]["message"]["content"]
                    .as_str()
                    .expect("text")
                    .to_owned()
            })
            .collect()
    };
    // First, so that no kept cache serves its prompt.
    let seeded = json!({"temperature": 1.0, "seed": 11, "max_tokens": 24});
    let mut three = question(seeded.clone());
    three["n"] = json!(3);
    let together = answer(&server, model, three).await;
    let (computed, reused) = backend.prompt_tokens();
    let prompt = together["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert_eq!((computed, reused), (prompt, 0), "the prompt computed once");
    let mut completion = 0;
    for (i, text) in texts(&together).iter().enumerate() {
        let mut body = seeded.clone();
        body["seed"] = json!(11 + i);
        let alone = answer(&server, model, question(body)).await;
        assert_eq!(
            text,
            &self::text(&alone),
            "choice {i} against seed {}",
            11 + i
        );
        assert_eq!(alone["usage"]["prompt_tokens"], prompt);
        completion += alone["usage"]["completion_tokens"].as_u64().expect("usage");
    }
    assert_eq!(together["usage"]["completion_tokens"], completion);

    let greedy = json!({"temperature": 0, "max_tokens": 12, "n": 2, "stream": true,
        "stream_options": {"include_usage": true}});
    let resp = post(&server, "/v1/chat/completions", &{
        let mut body = question(greedy);
        body["model"] = json!(model);
        body
    })
    .send()
    .await
    .expect("sent");
    assert_eq!(resp.status(), 200);
    let t = transcript(&Events::of(resp).rest().await);
    assert!(t.done);
    let (mut streamed, mut finishes) = (vec![String::new(); 2], vec![Vec::new(); 2]);
    for chunk in &t.chunks {
        for choice in chunk["choices"].as_array().expect("choices") {
            let i = usize::try_from(choice["index"].as_u64().expect("index")).expect("index");
            streamed[i].push_str(choice["delta"]["content"].as_str().unwrap_or_default());
            if !choice["finish_reason"].is_null() {
                finishes[i].push(choice["finish_reason"].clone());
            }
        }
    }
    let alone = answer(
        &server,
        model,
        question(json!({"temperature": 0, "max_tokens": 12})),
    )
    .await;
    assert!(text(&alone).contains("Paris"), "{alone}");
    assert_eq!(streamed, [text(&alone), text(&alone)]);
    let finish = alone["choices"][0]["finish_reason"].clone();
    assert_eq!(
        finishes,
        [[finish.clone()], [finish]],
        "each choice ends once"
    );
    let usage = &t.chunks.last().expect("usage chunk")["usage"];
    let each = alone["usage"]["completion_tokens"].as_u64().expect("usage");
    assert_eq!(usage["completion_tokens"], 2 * each, "{usage}");
}

/// Eight greedy answers at once are the eight answers one at a time: the
/// batch changes no token. And the eight shared forward passes.
#[tokio::test]
async fn eight_concurrent_greedy_streams_give_the_sequential_answers() {
    let (backend, server) = own(Some("batch-probe"), LocalSettings::default()).await;
    let questions = [
        "What is the capital of France?",
        "Name three colours.",
        "What is two plus two?",
        "Write a haiku about rain.",
        "Who wrote Hamlet?",
        "What do bees make?",
        "Say hello in Spanish.",
        "Count from 1 to 10.",
    ];
    let body = |q: &str| chat(Some(SYSTEM), q, json!({"temperature": 0, "max_tokens": 24}));
    let mut sequential = Vec::new();
    for q in questions {
        sequential.push(text(&answer(&server, "batch-probe", body(q)).await));
    }
    let steps_alone = backend.decode_steps();
    let together = join_all(
        questions
            .iter()
            .map(|q| answer(&server, "batch-probe", body(q))),
    )
    .await;
    let steps_together = backend.decode_steps() - steps_alone;
    let together: Vec<String> = together.iter().map(text).collect();
    assert_eq!(together, sequential);
    assert!(
        steps_together * 2 < steps_alone,
        "batched: {steps_together} forward passes against {steps_alone} one at a time"
    );
}

/// A long prompt is fed in chunks, and a cancel lands between two of
/// them: at most the chunk under way when it came is computed after it.
#[tokio::test]
async fn a_prompt_being_prefilled_is_cancelled_within_one_chunk() {
    const CHUNK: usize = 32;
    let settings = LocalSettings {
        step_tokens: CHUNK,
        ..LocalSettings::default()
    };
    let (backend, server) = own(None, settings).await;
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(150);
    let body = chat(
        None,
        &long,
        json!({"stream": true, "temperature": 0, "max_tokens": 4}),
    );
    let resp = post(&server, "/v1/chat/completions", &body)
        .send()
        .await
        .expect("sent");
    let id = completion_id(&resp);
    let events = Events::of(resp);
    eventually(Duration::from_secs(60), || {
        backend.prompt_tokens().0 >= 2 * CHUNK as u64
    })
    .await;
    let cancelled = cancel(&server, &id).await;
    assert_eq!(cancelled.status(), 200);
    let at_cancel = backend.prompt_tokens().0;
    let rest = transcript(&events.rest().await);
    assert_eq!(rest.finish_reason.as_deref(), Some("cancelled"));
    eventually(Duration::from_secs(30), || backend.generations() == 0).await;
    let computed = backend.prompt_tokens().0;
    assert!(
        computed <= at_cancel + CHUNK as u64,
        "{computed} prompt tokens computed, {at_cancel} when the cancel answered"
    );
    assert!(computed < 1000, "the prompt was not fed to its end");
}

async fn prompt_metrics(server: &Process) -> (f64, f64) {
    let metrics = metrics_text(server.url("/metrics")).await;
    (
        sample(&metrics, "sluicegate_prompt_tokens_computed_total", &[]),
        sample(&metrics, "sluicegate_prompt_tokens_reused_total", &[]),
    )
}

/// The KV cache's blocks (64 positions each) show in `/metrics`: used and
/// free add up to `--kv-cache-memory` in blocks, a paused generation keeps
/// its blocks, and they come back when it ends. The choices of one
/// request share their prompt's blocks.
#[tokio::test]
async fn kv_cache_blocks_show_in_the_metrics_and_add_up_to_the_budget() {
    // SmolLM2-135M: 30 layers, 3 KV heads of 64, keys and values in f16.
    let block_bytes = 30 * 2 * 3 * 64 * 2 * 64;
    let budget = f64::from((64u32 << 20) / block_bytes);
    let server = Process::start(
        &[
            "--backend",
            "local",
            "--kv-cache-memory",
            "64",
            "--reattach-grace",
            "10m",
        ],
        &[],
    )
    .await;
    let blocks = || async {
        let m = metrics_text(server.url("/metrics")).await;
        (
            sample(&m, "sluicegate_kv_cache_blocks_used", &[]),
            sample(&m, "sluicegate_kv_cache_blocks_free", &[]),
        )
    };
    // The end tokens (`<|endoftext|>`, `<|im_end|>`) barred: no answer
    // ends before the client leaves.
    let endless = json!({"0": -100, "2": -100});
    let prompt = "Tell me about the sea. ".repeat(40);
    let body = json!({
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 2000,
        "stream": true,
        "logit_bias": endless,
    });
    let id = leave_after_a_token(&server, &body).await;
    crate::services::until(Duration::from_secs(30), || async {
        let (used, free) = blocks().await;
        used >= 4.0 && used + free == budget
    })
    .await;
    cancel_by_id(&server, &id).await;
    crate::services::until(Duration::from_secs(30), || async {
        blocks().await == (0.0, budget)
    })
    .await;

    // Four choices of a long prompt share its whole blocks: each holds
    // a block or two of its own past them, not a copy of the prompt.
    let long = json!({
        "messages": [{"role": "user", "content": "Tell me about the sea. ".repeat(120)}],
        "temperature": 0,
        "max_tokens": 1,
    });
    let counted = json_reply(
        client()
            .post(server.url("/v1/chat/completions"))
            .json(&long),
    )
    .await;
    let prompt = counted["usage"]["prompt_tokens"].as_u64().expect("usage");
    let whole = f64::from(u32::try_from(prompt / 64).expect("blocks"));
    assert!(whole >= 10.0, "{prompt} prompt tokens");
    let mut body = long;
    body["n"] = json!(4);
    body["max_tokens"] = json!(2000);
    body["logit_bias"] = endless;
    body["stream"] = json!(true);
    let id = leave_after_a_token(&server, &body).await;
    // The whole prompt is in: its shared blocks and the tail each choice
    // copies once it writes (the client may leave before they do).
    crate::services::until(Duration::from_secs(30), || async {
        blocks().await.0 > whole
    })
    .await;
    let (used, _) = blocks().await;
    assert!(
        used <= whole + 8.0,
        "{used} blocks for four choices of {whole} whole prompt blocks"
    );
    cancel_by_id(&server, &id).await;
    crate::services::until(Duration::from_secs(30), || async {
        blocks().await == (0.0, budget)
    })
    .await;
}

/// Starts a stream, reads it up to a content chunk (its prompt is in the
/// cache; with `n` > 1 the opening has a chunk per choice), and leaves:
/// the generation pauses with its cache for the grace. Its id.
async fn leave_after_a_token(server: &Process, body: &Value) -> String {
    let resp = client()
        .post(server.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("sent");
    let id = completion_id(&resp);
    let mut events = Events::of(resp);
    while events.next_json().await["choices"][0]["delta"]["content"]
        .as_str()
        .is_none_or(str::is_empty)
    {}
    id
}

async fn cancel_by_id(server: &Process, id: &str) {
    let cancelled = client()
        .post(server.url(&format!("/v1/chat/completions/{id}/cancel")))
        .send()
        .await
        .expect("sent");
    assert_eq!(cancelled.status(), 200);
}

/// A chat client re-sends the conversation: the second turn computes only
/// what the first turn's cache (prompt and answer) does not hold, as the
/// server's own metrics show, and answers what an engine that never saw
/// the first turn answers.
#[tokio::test]
async fn a_conversations_second_turn_reuses_the_first_turns_cache() {
    let server = Process::start(&["--backend", "local"], &[]).await;
    let turn = |messages: &Value| {
        let body = json!({"messages": messages, "temperature": 0, "max_tokens": 16});
        let req = client()
            .post(server.url("/v1/chat/completions"))
            .header("x-session-id", "conv-1")
            .json(&body);
        async move {
            req.send()
                .await
                .expect("sent")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    let mut messages = json!([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the capital of France?"},
    ]);
    let first = turn(&messages).await;
    let first_prompt = first["usage"]["prompt_tokens"]
        .as_f64()
        .unwrap_or_else(|| panic!("usage in {first}"));
    let (computed, reused) = prompt_metrics(&server).await;
    assert_eq!((computed, reused), (first_prompt, 0.0), "cold");

    let list = messages.as_array_mut().expect("array");
    list.push(json!({"role": "assistant", "content": text(&first)}));
    list.push(json!({"role": "user", "content": "And of Germany?"}));
    let second = turn(&messages).await;
    let second_prompt = second["usage"]["prompt_tokens"]
        .as_f64()
        .unwrap_or_else(|| panic!("usage in {second}"));
    let (after, reused) = prompt_metrics(&server).await;
    assert!(
        reused > first_prompt,
        "reused {reused}: the first turn's {first_prompt} prompt tokens and its answer"
    );
    assert_eq!(after - computed, second_prompt - reused);

    let other = json!({"messages": messages, "temperature": 0, "max_tokens": 16});
    let other_server = crate::model::server().await;
    let other = answer(&other_server, "SmolLM2-135M-Instruct", other).await;
    assert_eq!(text(&second), text(&other));
}

/// Answers that outgrow the KV-cache budget together: the newest gives
/// its cache back and computes it again once there is room, and every
/// answer is the one it gives alone.
#[tokio::test]
async fn answers_that_outgrow_the_kv_budget_are_evicted_and_resumed_unchanged() {
    let probe = shared();
    let per_position = probe.model().weights.kv_bytes_per_position();
    let settings = LocalSettings {
        kv_cache_memory: 128 * per_position,
        ..LocalSettings::default()
    };
    let (backend, server) = own(Some("evict-probe"), settings).await;
    let questions = [
        "Count from 1 to 40, separated by commas.",
        "List the months of the year.",
        "Write a short story about a cat.",
    ];
    let body = |q: &str| chat(Some(SYSTEM), q, json!({"temperature": 0, "max_tokens": 48}));
    let mut alone = Vec::new();
    for q in questions {
        alone.push(text(&answer(&server, "evict-probe", body(q)).await));
    }
    assert_eq!(backend.evictions(), 0, "each fits alone");
    let together = join_all(
        questions
            .iter()
            .map(|q| answer(&server, "evict-probe", body(q))),
    )
    .await;
    let together: Vec<String> = together.iter().map(text).collect();
    assert_eq!(together, alone);
    assert!(backend.evictions() > 0, "together they outgrew the budget");
}
