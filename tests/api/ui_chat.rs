//! `POST /v1/ui/chat` and `GET /v1/ui/chat/{chat_id}/stream`: the AI SDK's
//! UI message stream over real sockets, and the same generations seen
//! through the OpenAI routes. The `ai` package itself drives these routes
//! in `clients.rs`'s useChat tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use sluicegate::session::{CallerId, EndCause, GenerationId};

use crate::clients::run_at;
use crate::common::{Events, TestServer, client, completion_id, eventually, read_all};
use crate::process::Process;

fn words(n: usize, tag: &str) -> String {
    (0..n)
        .map(|i| format!("{tag}{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A `DefaultChatTransport` body: chat `id`, UI messages, the extras.
pub(crate) fn ui_body(chat: &str, text: &str) -> Value {
    json!({
        "id": chat,
        "trigger": "submit-message",
        "messageId": null,
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}],
        "model": "echo",
    })
}

async fn post_ui(server: &TestServer, body: &Value) -> reqwest::Response {
    let resp = client()
        .post(server.url("/v1/ui/chat"))
        .json(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    assert_ui_headers(&resp);
    resp
}

fn assert_ui_headers(resp: &reqwest::Response) {
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["x-vercel-ai-ui-message-stream"], "v1");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
}

/// UI parts as an SSE client reads them; `[DONE]` as the string.
pub(crate) struct Parts(Events);

impl Parts {
    pub(crate) fn of(resp: reqwest::Response) -> Self {
        Self(Events::of(resp))
    }

    async fn next(&mut self) -> Option<Value> {
        let event = tokio::time::timeout(Duration::from_secs(20), self.0.next())
            .await
            .expect("a part in time")?;
        assert!(event.id.is_empty(), "UI parts carry no ids");
        Some(match event.data.as_str() {
            "[DONE]" => json!("[DONE]"),
            data => serde_json::from_str(data).expect("JSON part"),
        })
    }

    /// Reads until a part of `kind`, returning everything read.
    async fn until(&mut self, kind: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let part = self.next().await.expect("the stream goes on");
            let found = part["type"] == kind;
            seen.push(part);
            if found {
                return seen;
            }
        }
    }

    pub(crate) async fn rest(mut self) -> Vec<Value> {
        let mut all = Vec::new();
        while let Some(part) = self.next().await {
            all.push(part);
        }
        all
    }
}

/// What a whole UI message stream said, checked the way the `ai`
/// package's `processUIMessageStream` would check it.
#[derive(Debug)]
pub(crate) struct Message {
    pub(crate) id: String,
    pub(crate) text: String,
    pub(crate) finish: Option<String>,
}

pub(crate) fn assemble(parts: &[Value]) -> Message {
    assert_eq!(parts[0]["type"], "start", "{parts:?}");
    assert_eq!(parts[1]["type"], "start-step", "{parts:?}");
    assert_eq!(parts.last(), Some(&json!("[DONE]")), "{parts:?}");
    let mut message = Message {
        id: parts[0]["messageId"]
            .as_str()
            .expect("a messageId")
            .to_owned(),
        text: String::new(),
        finish: None,
    };
    let mut open = false;
    for part in &parts[2..parts.len() - 1] {
        match part["type"].as_str().expect("a type") {
            "text-start" => {
                assert!(!open, "one text part at a time");
                open = true;
            }
            "text-delta" => {
                assert!(open, "text-delta after text-start: {parts:?}");
                message
                    .text
                    .push_str(part["delta"].as_str().expect("delta"));
            }
            "text-end" => {
                assert!(open);
                open = false;
            }
            "finish-step" => assert!(!open, "text-end before finish-step"),
            "finish" => message.finish = part["finishReason"].as_str().map(str::to_owned),
            other => panic!("unexpected part {other}: {parts:?}"),
        }
    }
    message
}

#[tokio::test]
async fn a_use_chat_request_streams_the_answer_as_ui_parts() {
    let server = TestServer::echo().await;
    let text = "hello \"ui\" message stream";
    let resp = post_ui(&server, &ui_body("chat-a", text)).await;
    let id = completion_id(&resp);
    let parts = Parts::of(resp).rest().await;
    let message = assemble(&parts);
    assert_eq!(message.text, text);
    assert_eq!(message.id, id, "the message id is the completion id");
    assert_eq!(message.finish.as_deref(), Some("stop"));
    let kinds: Vec<&str> = parts.iter().filter_map(|p| p["type"].as_str()).collect();
    assert_eq!(kinds[..3], ["start", "start-step", "text-start"]);
    assert_eq!(
        kinds[kinds.len() - 3..],
        ["text-end", "finish-step", "finish"]
    );
}

#[tokio::test]
async fn extras_and_max_tokens_reach_the_generation() {
    let server = TestServer::echo().await;
    let mut body = ui_body("chat-b", "one two three four");
    body["system"] = json!("ignored by echo");
    body["maxOutputTokens"] = json!(2);
    body["temperature"] = json!(0);
    let message = assemble(&Parts::of(post_ui(&server, &body).await).rest().await);
    assert_eq!(message.text, "one two");
    assert_eq!(message.finish.as_deref(), Some("length"));
}

#[tokio::test]
async fn a_generation_started_on_the_openai_route_resumes_as_ui_parts() {
    let server = TestServer::options()
        .delay(Duration::from_millis(10))
        .start()
        .await;
    let text = words(20, "o");
    let resp = client()
        .post(server.url("/v1/chat/completions"))
        .header("x-session-id", "shared-1")
        .json(&json!({"model": "echo", "stream": true, "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .expect("sent");
    let id = completion_id(&resp);
    let resumed = client()
        .get(server.url("/v1/ui/chat/shared-1/stream"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resumed.status(), 200);
    assert_ui_headers(&resumed);
    assert_eq!(completion_id(&resumed), id);
    let message = assemble(&Parts::of(resumed).rest().await);
    assert_eq!(message.text, text);
    assert_eq!(message.id, id);
    assert_eq!(read_all(resp).await.text, text, "the OpenAI reader too");
}

#[tokio::test]
async fn a_generation_started_as_ui_chat_resumes_on_the_openai_routes() {
    let server = TestServer::options()
        .delay(Duration::from_millis(10))
        .start()
        .await;
    let text = words(20, "u");
    let resp = post_ui(&server, &ui_body("shared-2", &text)).await;
    let id = completion_id(&resp);
    let session = client()
        .get(server.url("/v1/sessions/shared-2/stream"))
        .send()
        .await
        .expect("sent");
    assert_eq!(session.status(), 200);
    let by_session = read_all(session).await;
    assert_eq!(by_session.text, text);
    assert_eq!(by_session.finish_reason.as_deref(), Some("stop"));
    assert!(by_session.done);
    let by_id = client()
        .get(server.url(&format!("/v1/chat/completions/{id}/events")))
        .send()
        .await
        .expect("sent");
    assert_eq!(read_all(by_id).await.text, text);
    assert_eq!(assemble(&Parts::of(resp).rest().await).text, text);
}

#[tokio::test]
async fn a_new_message_in_the_chat_ends_the_unfinished_answer() {
    let server = TestServer::options()
        .delay(Duration::from_millis(20))
        .start()
        .await;
    let first = post_ui(&server, &ui_body("chat-c", &words(500, "w"))).await;
    let mut first = Parts::of(first);
    first.until("text-delta").await;
    let second = post_ui(&server, &ui_body("chat-c", "the next question")).await;
    let rest = tokio::time::timeout(Duration::from_secs(5), first.rest())
        .await
        .expect("the first answer ends at once");
    let kinds: Vec<&str> = rest.iter().filter_map(|p| p["type"].as_str()).collect();
    assert!(
        kinds.ends_with(&["text-end", "finish-step", "finish"]),
        "{rest:?}"
    );
    assert_eq!(
        rest[rest.len() - 2],
        json!({"type": "finish", "finishReason": "other"}),
        "cancelled is `other` in the UI stream"
    );
    assert_eq!(rest.last(), Some(&json!("[DONE]")));
    let message = assemble(&Parts::of(second).rest().await);
    assert_eq!(message.text, "the next question");
}

#[tokio::test]
async fn a_cut_connection_resumes_with_the_whole_message_no_gap_no_repeat() {
    // A grace far longer than the test: the generation waits for the resume.
    let server = TestServer::options()
        .delay(Duration::from_millis(10))
        .grace(Duration::from_secs(60))
        .start()
        .await;
    let text = words(40, "r");
    let resp = post_ui(&server, &ui_body("chat-d", &text)).await;
    let id = completion_id(&resp);
    let mut cut = Parts::of(resp);
    let before = [cut.until("text-delta").await, cut.until("text-delta").await].concat();
    drop(cut);
    let generation = server
        .state
        .registry
        .get(CallerId::ANONYMOUS, &GenerationId::from(id.as_str()))
        .expect("registered");
    eventually(Duration::from_secs(5), || generation.attached_count() == 0).await;

    let resumed = client()
        .get(server.url("/v1/ui/chat/chat-d/stream"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resumed.status(), 200);
    let replay = Parts::of(resumed).rest().await;
    assert_eq!(
        replay[..before.len()],
        before[..],
        "replayed from the start"
    );
    let message = assemble(&replay);
    assert_eq!(message.text, text);
    assert_eq!(message.id, id, "the same message, so the page replaces it");
    // Once finished, a resume within the retention replays the same parts.
    let again = client()
        .get(server.url("/v1/ui/chat/chat-d/stream"))
        .send()
        .await
        .expect("sent");
    assert_eq!(Parts::of(again).rest().await, replay);
}

#[tokio::test]
async fn nothing_to_resume_is_204_and_other_callers_see_nothing() {
    let server = TestServer::options()
        .keys(&["alpha", "beta"])
        .delay(Duration::from_millis(10))
        .start()
        .await;
    let idle = client()
        .get(server.url("/v1/ui/chat/never-used/stream"))
        .bearer_auth("alpha")
        .send()
        .await
        .expect("sent");
    assert_eq!(idle.status(), 204);
    let resp = client()
        .post(server.url("/v1/ui/chat"))
        .bearer_auth("alpha")
        .json(&ui_body("private", &words(30, "p")))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let other = client()
        .get(server.url("/v1/ui/chat/private/stream"))
        .bearer_auth("beta")
        .send()
        .await
        .expect("sent");
    assert_eq!(other.status(), 204, "beta's chat `private` has nothing");
    let owner = client()
        .get(server.url("/v1/ui/chat/private/stream"))
        .bearer_auth("alpha")
        .send()
        .await
        .expect("sent");
    assert_eq!(owner.status(), 200);
    let anonymous = client()
        .get(server.url("/v1/ui/chat/private/stream"))
        .send()
        .await
        .expect("sent");
    assert_eq!(anonymous.status(), 401);
    drop(resp);
}

#[tokio::test]
async fn stop_ends_the_generation_after_the_grace_or_at_once_without_one() {
    let server = TestServer::options()
        .delay(Duration::from_millis(20))
        .grace(Duration::ZERO)
        .start()
        .await;
    let resp = post_ui(&server, &ui_body("chat-e", &words(500, "s"))).await;
    let id = GenerationId::from(completion_id(&resp).as_str());
    let mut parts = Parts::of(resp);
    parts.until("text-delta").await;
    // useChat's stop() aborts the fetch: the connection goes away.
    drop(parts);
    let generation = server
        .state
        .registry
        .get(CallerId::ANONYMOUS, &id)
        .expect("registered");
    eventually(Duration::from_secs(5), || generation.is_done()).await;
    assert_eq!(generation.cancel_cause(), Some(EndCause::ClientGone));
    assert!(generation.log.len() < 500, "stopped well before the end");
}

#[tokio::test]
async fn refusals_before_the_stream_are_openai_json() {
    let server = TestServer::echo().await;
    let cases = [
        (json!({"messages": []}), 400, Some("id")),
        (json!({"id": "c"}), 400, Some("messages")),
        (json!({"id": "c", "messages": []}), 400, Some("messages")),
        (
            json!({"id": "c", "messages": [{"role": "user", "parts": [{"type": "file", "url": "data:,", "mediaType": "text/plain"}]}]}),
            400,
            Some("messages[0].parts[0]"),
        ),
        (
            json!({"id": "c", "messages": [{"role": "user", "parts": [{"type": "text", "text": "x"}]}], "temperature": 3}),
            400,
            Some("temperature"),
        ),
        (
            json!({"id": "c", "model": "nope", "messages": [{"role": "user", "parts": [{"type": "text", "text": "x"}]}]}),
            404,
            Some("model"),
        ),
    ];
    for (body, status, param) in cases {
        let resp = client()
            .post(server.url("/v1/ui/chat"))
            .json(&body)
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), status, "{body}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let error: Value = resp.json().await.expect("JSON");
        assert_eq!(error["error"]["param"].as_str(), param, "{body}: {error}");
        assert!(error["error"]["message"].is_string());
    }
}

// ---- the `ai` package's own client code against the binary ----

#[tokio::test]
async fn the_ai_transport_sends_resumes_a_cut_and_gets_204_when_idle() {
    // Keep-alive comments between most tokens: the SDK's parser meets them.
    let server = Process::start(
        &[
            "--backend",
            "echo",
            "--token-delay",
            "40ms",
            "--keep-alive",
            "25ms",
        ],
        &[],
    )
    .await;
    let out = run_at(&server.base, "node", "node/use_chat_transport.mjs", &[]).await;
    assert!(out.contains("ai-transport: ok"), "{out}");
}

#[tokio::test]
async fn stop_from_the_ai_transport_ends_the_generation() {
    let server = Process::start(
        &[
            "--backend",
            "echo",
            "--token-delay",
            "40ms",
            "--reattach-grace",
            "0s",
        ],
        &[],
    )
    .await;
    let out = run_at(&server.base, "node", "node/use_chat_stop.mjs", &[]).await;
    assert!(out.contains("ai-stop: ok"), "{out}");
}

#[tokio::test]
async fn the_real_model_answers_through_the_ai_transport() {
    let server = crate::model::server().await;
    let out = run_at(&server.base, "node", "node/use_chat_model.mjs", &[]).await;
    assert!(out.contains("ai-model: ok"), "{out}");
}

#[tokio::test]
async fn chromium_runs_a_use_chat_page_that_chats_stops_and_resumes() {
    let echo = [
        "--backend",
        "echo",
        "--token-delay",
        "60ms",
        "--cors-origin",
        "*",
    ];
    let stopping = Process::start(&[&echo[..], &["--reattach-grace", "0s"]].concat(), &[]).await;
    // A grace longer than the test: a reload is waited for.
    let waiting = Process::start(&[&echo[..], &["--reattach-grace", "60s"]].concat(), &[]).await;
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-tests");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let out = run_at(
        &stopping.base,
        "node",
        "browser/use_chat_page.mjs",
        &[
            ("SCREENSHOT_DIR", shots.clone()),
            ("SLUICEGATE_WAITING_URL", PathBuf::from(&waiting.base)),
        ],
    )
    .await;
    assert!(out.contains("chromium-use-chat: ok"), "{out}");
    assert!(shots.join("use-chat/use-chat.png").is_file());
}
