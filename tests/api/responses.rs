//! OpenAI's Responses API with the clients that speak it, unmodified:
//! openai-python and openai-node, the Agents SDK, the AI SDK's `openai`
//! provider (on echo and through the relay), Codex CLI; and the
//! guarantees every route keeps (sessions, isolation, resume, cancel).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::clients::run_at;
use crate::common::{Raw, TestServer, client, completion_id, metrics_text, post};
use crate::process::{Process, sample};
use crate::services::until;

fn python_packages() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-python")
}

async fn slow_echo() -> Process {
    Process::start(&["--backend", "echo", "--token-delay", "20ms"], &[]).await
}

#[tokio::test]
async fn openai_python_streams_resumes_cancels_chains_and_parses() {
    let server = slow_echo().await;
    let env = [("PYTHONPATH", python_packages())];
    let out = run_at(&server.base, "python3", "python/test_responses.py", &env).await;
    assert!(out.contains("openai-python responses: ok"), "{out}");
}

#[tokio::test]
async fn openai_node_streams_and_resumes_a_cut() {
    let server = slow_echo().await;
    let out = run_at(&server.base, "node", "node/openai_responses.mjs", &[]).await;
    assert!(out.contains("openai-node responses: ok"), "{out}");
}

#[tokio::test]
async fn the_agents_sdk_runs_a_tool_over_two_turns() {
    let server = slow_echo().await;
    let env = [("PYTHONPATH", python_packages())];
    let out = run_at(&server.base, "python3", "python/test_agents.py", &env).await;
    assert!(out.contains("openai-agents: ok"), "{out}");
}

/// The AI SDK's `openai` provider (the Responses API) with a tool over two
/// steps, against `base`.
async fn ai_sdk_openai(base: &str) {
    let env = [("PROVIDER", "openai"), ("TOOL_CHOICE", "get_weather")]
        .map(|(k, v)| (k, PathBuf::from(v)));
    let out = run_at(base, "node", "node/ai_sdk_tools.mjs", &env).await;
    assert!(
        out.contains(r#"["get_weather",{"city":"What is the weather in Paris?"}]"#),
        "{out}"
    );
}

#[tokio::test]
async fn the_ai_sdk_openai_provider_calls_a_tool_on_echo_and_through_the_relay() {
    let echo = slow_echo().await;
    ai_sdk_openai(&echo.base).await;
    let upstream = format!("{}/v1", echo.base);
    let relay = Process::start(&["--backend", "openai", "--upstream", &upstream], &[]).await;
    ai_sdk_openai(&relay.base).await;
}

#[tokio::test]
async fn codex_cli_answers_through_sluicegate_on_echo() {
    let server = slow_echo().await;
    let home = std::env::temp_dir().join(format!("sluicegate-codex-{}", std::process::id()));
    std::fs::create_dir_all(&home).expect("CODEX_HOME");
    let config = format!(
        "model = \"echo\"\nmodel_provider = \"sluicegate\"\n\n\
         [model_providers.sluicegate]\nname = \"sluicegate\"\n\
         base_url = \"{}/v1\"\nwire_api = \"responses\"\nenv_key = \"SLUICEGATE_KEY\"\n",
        server.base
    );
    std::fs::write(home.join("config.toml"), config).expect("config.toml");
    let codex = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node_modules/.bin/codex");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(codex)
            .args(["exec", "--skip-git-repo-check", "say hello from codex"])
            .current_dir(&home)
            .env("CODEX_HOME", &home)
            .env("SLUICEGATE_KEY", "not-needed")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("codex ends")
    .expect("codex runs (scripts/setup-clients)");
    let _ = std::fs::remove_dir_all(&home);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), "say hello from codex");
}

#[tokio::test]
async fn responses_on_the_model_parse_into_a_pydantic_model() {
    let server = crate::model::server().await;
    let env = [
        ("PYTHONPATH", python_packages()),
        ("MODEL", PathBuf::from("SmolLM2-135M-Instruct")),
    ];
    let out = run_at(
        &server.base,
        "python3",
        "python/test_responses_model.py",
        &env,
    )
    .await;
    assert!(out.contains("responses on the model: ok"), "{out}");
}

fn create(input: &str, extra: Value) -> Value {
    let mut body = json!({"model": "echo", "input": input, "stream": true});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

/// The `type` of each event of a raw Responses stream.
fn kinds(raw: &str) -> Vec<String> {
    raw.split_terminator("\n\n")
        .filter_map(|event| {
            let data = event.lines().find_map(|l| l.strip_prefix("data: "))?;
            let json: Value = serde_json::from_str(data).expect("JSON data");
            Some(json["type"].as_str().expect("a type").to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_sessions_next_response_cancels_the_one_still_running() {
    let server = TestServer::options()
        .delay(Duration::from_millis(20))
        .start()
        .await;
    let words: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
    let first = post(
        &server,
        "/v1/responses",
        &create(&words.join(" "), json!({})),
    )
    .header("x-session-id", "conv")
    .send()
    .await
    .expect("sent");
    let mut first = Raw::of(first);
    first.until("response.output_text.delta").await;
    let second = post(
        &server,
        "/v1/responses",
        &create("next", json!({"stream": false})),
    )
    .header("x-session-id", "conv")
    .send()
    .await
    .expect("sent");
    let second: Value = second.json().await.expect("json");
    assert_eq!(second["status"], "completed");
    tokio::time::timeout(Duration::from_secs(5), first.read_to_end())
        .await
        .expect("the first ends at once");
    let events = kinds(&first.seen);
    assert_eq!(
        events.last().map(String::as_str),
        Some("response.incomplete")
    );
    assert!(
        first.seen.contains(r#""status":"cancelled""#),
        "{}",
        first.seen
    );
    assert!(
        !first.seen.contains("[DONE]"),
        "no [DONE] on a Responses stream"
    );
}

#[tokio::test]
async fn another_callers_key_gets_404_for_a_response() {
    let server = TestServer::options()
        .keys(&["key-a", "key-b"])
        .start()
        .await;
    let created: Value = post(
        &server,
        "/v1/responses",
        &create("mine", json!({"stream": false})),
    )
    .bearer_auth("key-a")
    .send()
    .await
    .expect("sent")
    .json()
    .await
    .expect("json");
    let id = created["id"].as_str().expect("an id");
    for (method, path) in [
        ("GET", format!("/v1/responses/{id}")),
        ("GET", format!("/v1/responses/{id}/input_items")),
        ("POST", format!("/v1/responses/{id}/cancel")),
        ("DELETE", format!("/v1/responses/{id}")),
    ] {
        let url = server.url(&path);
        let req = match method {
            "GET" => client().get(&url),
            "POST" => client().post(&url),
            _ => client().delete(&url),
        };
        let resp = req.bearer_auth("key-b").send().await.expect("sent");
        assert_eq!(resp.status(), 404, "{method} {path}");
    }
    for forged in ["resp_a}b", "resp_*", "resp_a%20b"] {
        let resp = client()
            .get(server.url(&format!("/v1/responses/{forged}")))
            .bearer_auth("key-a")
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 404, "{forged}");
    }
    let mine = client()
        .get(server.url(&format!("/v1/responses/{id}")))
        .bearer_auth("key-a")
        .send()
        .await
        .expect("sent");
    assert_eq!(mine.status(), 200);
}

#[tokio::test]
async fn bad_input_is_refused_naming_its_path() {
    let server = TestServer::echo().await;
    let cases = [
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
            "input[0].content[0].type",
        ),
        (
            json!({"input": "x", "previous_response_id": "resp_nope"}),
            "previous_response_id",
        ),
        (
            json!({"input": "x", "background": true, "store": false}),
            "background",
        ),
        (
            json!({"input": "x", "truncation": "sometimes"}),
            "truncation",
        ),
        (json!({"input": 5}), "input"),
        (json!({}), "input"),
    ];
    for (body, param) in cases {
        let resp = post(&server, "/v1/responses", &body)
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.expect("json");
        assert_eq!(err["error"]["param"], param, "{err}");
        assert_eq!(err["error"]["type"], "invalid_request_error");
    }
}

#[tokio::test]
async fn a_cut_response_stream_resumes_byte_for_byte_by_last_event_id() {
    let server = TestServer::options()
        .delay(Duration::from_millis(10))
        .start()
        .await;
    let words: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
    let body = create(&words.join(" "), json!({}));
    let resp = post(&server, "/v1/responses", &body)
        .send()
        .await
        .expect("sent");
    let id = completion_id(&resp);
    let mut raw = Raw::of(resp);
    raw.until(&format!("id: {id}.6\n\n")).await;
    let cut = raw
        .seen
        .find(&format!("id: {id}.6\n\n"))
        .expect("cut point")
        + format!("id: {id}.6\n\n").len();
    let before = raw.seen[..cut].to_owned();
    drop(raw);
    // fetch-event-source's retry: the same POST with the last id it saw.
    let again = post(&server, "/v1/responses", &body)
        .header("last-event-id", format!("{id}.6"))
        .send()
        .await
        .expect("sent");
    let mut after = Raw::of(again);
    after.read_to_end().await;
    let whole = client()
        .get(server.url(&format!("/v1/chat/completions/{id}/events")))
        .send()
        .await
        .expect("sent");
    let mut whole = Raw::of(whole);
    whole.read_to_end().await;
    assert_eq!(format!("{before}{}", after.seen), whole.seen);
    assert_eq!(
        kinds(&whole.seen).last().map(String::as_str),
        Some("response.completed")
    );
    assert_eq!(server.state.registry.len(), 1, "no second generation");
}

#[tokio::test]
async fn cancelling_a_background_response_stops_its_compute() {
    let server = Process::start(&["--backend", "echo", "--token-delay", "30ms"], &[]).await;
    let words: Vec<String> = (0..500).map(|i| format!("w{i}")).collect();
    let created: Value = client()
        .post(server.url("/v1/responses"))
        .json(&create(
            &words.join(" "),
            json!({"stream": false, "background": true}),
        ))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    // Nobody reads it: it runs on.
    let url = server.url(&format!("/v1/responses/{id}"));
    until(Duration::from_secs(10), || async {
        let now: Value = client()
            .get(&url)
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("json");
        now["output"][0]["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.split(' ').count() >= 5)
    })
    .await;
    let cancelled: Value = client()
        .post(server.url(&format!("/v1/responses/{id}/cancel")))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let generated = || async {
        sample(
            &metrics_text(server.url("/metrics")).await,
            "sluicegate_tokens_generated_total",
            &[],
        )
    };
    // The answer as it ended holds every token the backend generated (one
    // at most was on its way when the cancel landed).
    let kept = cancelled["output"][0]["content"][0]["text"]
        .as_str()
        .map_or(0, |t| t.split(' ').count()) as f64;
    let generated = generated().await;
    assert!(
        kept < 500.0 && generated <= kept + 1.0,
        "{generated} generated, {kept} kept"
    );
}

/// The events of a raw Responses stream as JSON.
fn events_of(raw: &str) -> Vec<Value> {
    raw.split_terminator("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|data| serde_json::from_str(data).expect("JSON data"))
        .collect()
}

fn text_of(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().expect("delta"))
        .collect()
}

#[tokio::test]
async fn across_replicas_a_response_resumes_retrieves_chains_and_cancels_from_any_instance() {
    let cluster = crate::replicas::Cluster::start(&[]).await;
    let nginx = crate::services::Nginx::start(&[&cluster.a.base, &cluster.b.base]).await;
    let words = crate::replicas::words(40);
    let resp = client()
        .post(cluster.a.url("/v1/responses"))
        .json(&create(&words, json!({"background": true})))
        .send()
        .await
        .expect("sent");
    let id = completion_id(&resp);
    let mut raw = Raw::of(resp);
    raw.until(&format!("id: {id}.8\n\n")).await;
    let before = events_of(&raw.seen);
    drop(raw);
    let rest = client()
        .get(
            cluster
                .b
                .url(&format!("/v1/responses/{id}?stream=true&starting_after=8")),
        )
        .send()
        .await
        .expect("sent");
    assert_eq!(rest.status(), 200);
    let mut rest = Raw::of(rest);
    tokio::time::timeout(Duration::from_secs(20), rest.read_to_end())
        .await
        .expect("the stream ends");
    let all: Vec<Value> = before.into_iter().chain(events_of(&rest.seen)).collect();
    let numbers: Vec<u64> = all
        .iter()
        .map(|e| e["sequence_number"].as_u64().expect("n"))
        .collect();
    assert_eq!(
        numbers,
        (0..all.len() as u64).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    assert_eq!(text_of(&all), words);
    assert_eq!(all.last().expect("last")["type"], "response.completed");

    // Retrieve, input items and a chain, each through the balancer.
    let got: Value = client()
        .get(nginx.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(got["status"], "completed");
    assert_eq!(got["output"][0]["content"][0]["text"], words.as_str());
    let items: Value = client()
        .get(nginx.url(&format!("/v1/responses/{id}/input_items")))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(
        items["data"][0]["content"][0]["text"],
        words.as_str(),
        "{items}"
    );
    let next: Value = client()
        .post(nginx.url("/v1/responses"))
        .json(&create(
            "go on",
            json!({"stream": false, "previous_response_id": id}),
        ))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(next["output"][0]["content"][0]["text"], "go on", "{next}");

    // A background response on A, cancelled on B: A stops computing.
    let long = crate::replicas::words(1000);
    let created: Value = client()
        .post(cluster.a.url("/v1/responses"))
        .json(&create(&long, json!({"stream": false, "background": true})))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let long_id = created["id"].as_str().expect("id");
    let cancelled: Value = client()
        .post(cluster.b.url(&format!("/v1/responses/{long_id}/cancel")))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let generated = sample(
        &crate::replicas::metrics(&cluster.a).await,
        "sluicegate_tokens_generated_total",
        &[],
    );
    assert!(generated < 300.0, "{generated} tokens: the owner stopped");
}

#[tokio::test]
async fn a_killed_owners_background_response_fails_with_instance_gone_elsewhere() {
    let mut cluster = crate::replicas::Cluster::start(&[]).await;
    let created: Value = client()
        .post(cluster.a.url("/v1/responses"))
        .json(&create(
            &crate::replicas::words(1000),
            json!({"stream": false, "background": true}),
        ))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("id");
    let follow = client()
        .get(cluster.b.url(&format!("/v1/responses/{id}?stream=true")))
        .send()
        .await
        .expect("sent");
    let mut follow = Raw::of(follow);
    follow.until("response.output_text.delta").await;
    cluster.a.child.start_kill().expect("kill -9");
    tokio::time::timeout(Duration::from_secs(20), follow.read_to_end())
        .await
        .expect("the stream ends");
    let events = events_of(&follow.seen);
    let last = events.last().expect("events");
    assert_eq!(last["type"], "response.failed", "{last}");
    assert_eq!(last["response"]["error"]["code"], "instance_gone", "{last}");
    let got: Value = client()
        .get(cluster.b.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(got["status"], "failed", "{got}");
}
