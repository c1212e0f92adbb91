//! Anthropic's Messages API with the clients that speak it, unmodified:
//! the anthropic packages for Python and Node, the AI SDK's `anthropic`
//! provider and Claude Code (on echo and through the relay); and the
//! guarantees every route keeps, in Anthropic's shapes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::clients::run_at;
use crate::common::{Raw, TestServer, client, completion_id, post};
use crate::process::Process;

fn python_packages() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-python")
}

async fn slow_echo(extra: &[&str]) -> Process {
    let mut args = vec!["--backend", "echo", "--token-delay", "20ms"];
    args.extend_from_slice(extra);
    Process::start(&args, &[]).await
}

async fn anthropic_python(base: &str, extra: &[(&str, &str)]) -> String {
    let mut env = vec![("PYTHONPATH", python_packages())];
    env.extend(extra.iter().map(|(k, v)| (*k, PathBuf::from(v))));
    run_at(base, "python3", "python/test_anthropic.py", &env).await
}

#[tokio::test]
async fn anthropic_python_streams_calls_tools_counts_resumes_and_raises_its_errors() {
    let server = slow_echo(&[]).await;
    let out = anthropic_python(&server.base, &[]).await;
    assert!(out.contains("anthropic-python: ok"), "{out}");
    let limited = slow_echo(&[
        "--api-key",
        "good",
        "--max-concurrent",
        "1",
        "--max-queue",
        "0",
    ])
    .await;
    let out = anthropic_python(&limited.base, &[("KEY", "good"), ("LIMITS", "1")]).await;
    assert!(out.contains("anthropic-python limits: ok"), "{out}");
}

#[tokio::test]
async fn anthropic_python_calls_a_tool_on_the_model() {
    let server = crate::model::server().await;
    let out = anthropic_python(&server.base, &[("MODEL", "SmolLM2-135M-Instruct")]).await;
    assert!(out.contains("anthropic-python: ok"), "{out}");
}

#[tokio::test]
async fn anthropic_node_streams_and_aborts() {
    let server = slow_echo(&[]).await;
    let out = run_at(&server.base, "node", "node/anthropic_stream.mjs", &[]).await;
    assert!(out.contains("anthropic-node: ok"), "{out}");
}

async fn ai_sdk_anthropic(base: &str) {
    let env = [("PROVIDER", "anthropic"), ("TOOL_CHOICE", "get_weather")]
        .map(|(k, v)| (k, PathBuf::from(v)));
    let out = run_at(base, "node", "node/ai_sdk_tools.mjs", &env).await;
    assert!(
        out.contains(r#"["get_weather",{"city":"What is the weather in Paris?"}]"#),
        "{out}"
    );
}

/// Claude Code's print mode against `base`, with everything but the API
/// off; what it printed.
async fn claude_print(base: &str, prompt: &str) -> String {
    let home = std::env::temp_dir().join(format!(
        "sluicegate-claude-{}-{}",
        std::process::id(),
        base.rsplit(':').next().unwrap_or("0")
    ));
    std::fs::create_dir_all(&home).expect("a home");
    let claude =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node_modules/.bin/claude");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(claude)
            .args(["-p", prompt])
            .current_dir(&home)
            .env("HOME", &home)
            .env("ANTHROPIC_BASE_URL", base)
            .env("ANTHROPIC_API_KEY", "not-needed")
            .env("ANTHROPIC_MODEL", "echo")
            .env("ANTHROPIC_SMALL_FAST_MODEL", "echo")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("DISABLE_TELEMETRY", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("claude ends")
    .expect("claude runs (scripts/setup-clients)");
    let _ = std::fs::remove_dir_all(&home);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_ai_sdk_and_claude_code_work_on_echo_and_through_the_relay() {
    let echo = slow_echo(&[]).await;
    let upstream = format!("{}/v1", echo.base);
    let relay = Process::start(&["--backend", "openai", "--upstream", &upstream], &[]).await;
    for base in [&echo.base, &relay.base] {
        ai_sdk_anthropic(base).await;
        // Echo answers the last user turn, which Claude Code ends with the
        // prompt.
        let printed = claude_print(base, "say hello from claude").await;
        assert!(
            printed.trim_end().ends_with("say hello from claude"),
            "{printed}"
        );
    }
}

fn ask(text: &str, extra: Value) -> Value {
    let mut body = json!({"model": "echo", "max_tokens": 500, "stream": true,
        "messages": [{"role": "user", "content": text}]});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

/// The `event:` name of each event of a raw stream.
fn names(raw: &str) -> Vec<&str> {
    raw.split_terminator("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("event: ")))
        .collect()
}

#[tokio::test]
async fn errors_are_in_anthropics_shape_with_a_request_id() {
    let server = TestServer::options()
        .keys(&["key-a", "key-b"])
        .start()
        .await;
    let send = |body: Value, key: Option<&'static str>| {
        let mut req = client().post(server.url("/v1/messages")).json(&body);
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        req.send()
    };
    let cases = [
        (
            send(ask("x", json!({})), None).await.expect("sent"),
            401,
            "authentication_error",
        ),
        (
            send(json!({"model": "echo", "messages": []}), Some("key-a"))
                .await
                .expect("sent"),
            400,
            "invalid_request_error",
        ),
        (
            send(ask("x", json!({"model": "nope"})), Some("key-a"))
                .await
                .expect("sent"),
            404,
            "not_found_error",
        ),
    ];
    for (resp, status, kind) in cases {
        assert_eq!(resp.status(), status);
        assert!(
            resp.headers().contains_key("request-id"),
            "{:?}",
            resp.headers()
        );
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], kind, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // The key in `x-api-key` is the caller: another key's message is 404.
    let mine = send(ask("mine", json!({"stream": false})), Some("key-a"))
        .await
        .expect("sent");
    assert_eq!(mine.status(), 200);
    let id = completion_id(&mine);
    let theirs = client()
        .get(server.url(&format!("/v1/chat/completions/{id}/events")))
        .header("x-api-key", "key-b")
        .send()
        .await
        .expect("sent");
    assert_eq!(theirs.status(), 404);
}

#[tokio::test]
async fn a_sessions_next_message_cancels_the_running_one_which_ends_well_formed() {
    let server = TestServer::options()
        .delay(Duration::from_millis(20))
        .start()
        .await;
    let words: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
    let first = post(&server, "/v1/messages", &ask(&words.join(" "), json!({})))
        .header("x-session-id", "conv")
        .send()
        .await
        .expect("sent");
    let id = completion_id(&first);
    let mut first = Raw::of(first);
    first.until("text_delta").await;
    let second = post(
        &server,
        "/v1/messages",
        &ask("next", json!({"stream": false})),
    )
    .header("x-session-id", "conv")
    .send()
    .await
    .expect("sent");
    let second: Value = second.json().await.expect("json");
    assert_eq!(second["content"][0]["text"], "next");
    tokio::time::timeout(Duration::from_secs(5), first.read_to_end())
        .await
        .expect("the first ends at once");
    let events = names(&first.seen);
    assert_eq!(events[..2], ["message_start", "content_block_start"]);
    assert_eq!(
        events[events.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(
        first.seen.contains(r#""stop_reason":"cancelled""#),
        "{}",
        first.seen
    );
    // Every event has an id, and the events route replays the same bytes.
    for event in first.seen.split_terminator("\n\n") {
        assert!(event.contains(&format!("\nid: {id}.")), "{event:?}");
    }
    let replay = client()
        .get(server.url(&format!("/v1/chat/completions/{id}/events")))
        .send()
        .await
        .expect("sent");
    let mut replay = Raw::of(replay);
    replay.read_to_end().await;
    assert_eq!(replay.seen, first.seen);
}

#[tokio::test]
async fn across_replicas_a_message_resumes_by_re_post_on_the_other_instance() {
    let cluster = crate::replicas::Cluster::start(&[]).await;
    let body = ask(&crate::replicas::words(30), json!({}));
    let resp = client()
        .post(cluster.a.url("/v1/messages"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    let id = completion_id(&resp);
    let mut raw = Raw::of(resp);
    let cut_at = format!("id: {id}.5\n\n");
    raw.until(&cut_at).await;
    let cut = raw.seen.find(&cut_at).expect("cut") + cut_at.len();
    let before = raw.seen[..cut].to_owned();
    drop(raw);
    let rest = client()
        .post(cluster.b.url("/v1/messages"))
        .header("last-event-id", format!("{id}.5"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    let mut rest = Raw::of(rest);
    tokio::time::timeout(Duration::from_secs(20), rest.read_to_end())
        .await
        .expect("the stream ends");
    let whole = client()
        .get(cluster.a.url(&format!("/v1/chat/completions/{id}/events")))
        .send()
        .await
        .expect("sent");
    let mut whole = Raw::of(whole);
    whole.read_to_end().await;
    assert_eq!(
        format!("{before}{}", rest.seen),
        whole.seen,
        "no gap, no repeat"
    );
    assert_eq!(names(&whole.seen).last(), Some(&"message_stop"));
}
