//! The clients frontends really use, unmodified, against the real binary:
//! the openai packages for Python and Node, fetch-event-source through a
//! connection-cutting proxy, the chat page in headless Chromium, and curl.
//! scripts/setup-clients installs them; tests/clients/ holds their scripts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use crate::common::{chat, read_all};
use crate::process::Process;

fn clients() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Runs a client script against `server`; fails the test with its output
/// when it fails.
async fn run(server: &Process, program: &str, script: &str, env: &[(&str, PathBuf)]) -> String {
    run_at(&server.base, program, script, env).await
}

/// [`run`] against the server at `base`.
pub(crate) async fn run_at(
    base: &str,
    program: &str,
    script: &str,
    env: &[(&str, PathBuf)],
) -> String {
    let mut command = Command::new(program);
    command
        .arg(clients().join(script))
        .current_dir(clients())
        .env("SLUICEGATE_URL", base)
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .unwrap_or_else(|_| panic!("{script} took over two minutes"))
        .unwrap_or_else(|e| panic!("cannot run {program} (run scripts/setup-clients): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{script} failed ({}); run scripts/setup-clients if a package is missing\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The binary on echo, slow enough to watch: 40 ms a token.
async fn slow_echo() -> Process {
    Process::start(&["--backend", "echo", "--token-delay", "40ms"], &[]).await
}

#[tokio::test]
async fn openai_python() {
    let server = slow_echo().await;
    let packages = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-python");
    let out = run(
        &server,
        "python3",
        "python/test_openai.py",
        &[("PYTHONPATH", packages)],
    )
    .await;
    assert!(out.contains("openai-python: ok"), "{out}");
}

#[tokio::test]
async fn the_ai_sdk_calls_tools_on_echo() {
    let server = slow_echo().await;
    let env = [("TOOL_CHOICE", "get_weather")].map(|(k, v)| (k, PathBuf::from(v)));
    let out = run(&server, "node", "node/ai_sdk_tools.mjs", &env).await;
    assert!(
        out.contains(r#"["get_weather",{"city":"What is the weather in Paris?"}]"#),
        "{out}"
    );
}

#[tokio::test]
async fn structured_output_and_langchain_on_echo() {
    let server = Process::start(&["--backend", "echo"], &[]).await;
    let packages = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-python");
    let out = run(
        &server,
        "python3",
        "python/test_structured.py",
        &[("PYTHONPATH", packages)],
    )
    .await;
    assert!(out.contains("structured: ok"), "{out}");
}

#[tokio::test]
async fn openai_node() {
    let server = slow_echo().await;
    let out = run(&server, "node", "node/openai_stream.mjs", &[]).await;
    assert!(out.contains("openai-node: ok"), "{out}");
}

#[tokio::test]
async fn fetch_event_source_retries_through_a_cut_connection() {
    let server = slow_echo().await;
    let out = run(&server, "node", "node/fetch_event_source_retry.mjs", &[]).await;
    assert!(out.contains("fetch-event-source: ok"), "{out}");
    let metrics = crate::common::metrics_text(server.url("/metrics")).await;
    let sample = |series: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(
        sample("sluicegate_resumes_total").as_deref(),
        Some("1"),
        "the retry resumed: {metrics}"
    );
    assert_eq!(
        sample("sluicegate_generations_ended_total").as_deref(),
        Some("1"),
        "one generation for both POSTs: {metrics}"
    );
}

#[tokio::test]
async fn chromium_runs_the_chat_page() {
    let server = Process::start(&["--backend", "echo", "--token-delay", "60ms"], &[]).await;
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-tests");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let out = run(
        &server,
        "node",
        "browser/chat_page.mjs",
        &[("SCREENSHOT_DIR", shots.clone())],
    )
    .await;
    assert!(out.contains("chromium: ok"), "{out}");
    assert!(shots.join("chat-desktop.png").is_file());
}

#[tokio::test]
async fn curl_sees_the_raw_framing() {
    let server = Process::start(&["--backend", "echo"], &[]).await;
    let output = Command::new("curl")
        .args(["-sN", "-H", "Content-Type: application/json", "-d"])
        .arg(r#"{"model":"echo","stream":true,"messages":[{"role":"user","content":"curl framing"}]}"#)
        .arg(format!("{}/v1/chat/completions", server.base))
        .output()
        .await
        .expect("curl");
    let body = String::from_utf8(output.stdout).expect("UTF-8");
    let events: Vec<&str> = body.trim_end().split("\n\n").collect();
    assert_eq!(events.len(), 5, "{body}");
    assert!(
        events
            .iter()
            .map(|e| e.strip_prefix("retry: 1000\n").unwrap_or(e))
            .all(|e| e.starts_with("data: ") && e.contains("\nid: ")),
        "{body}"
    );
    assert!(events[4].starts_with("data: [DONE]\nid: "), "{body}");
}

#[tokio::test]
async fn chromium_runs_the_chat_page_on_the_real_model() {
    let server = Process::start(&[], &[]).await;
    let out = run(&server, "node", "browser/chat_page_model.mjs", &[]).await;
    assert!(out.contains("chromium on the model: ok"), "{out}");
}

#[tokio::test]
async fn the_chat_pages_errors_say_what_to_do() {
    let server = Process::start(
        &[
            "--backend",
            "echo",
            "--token-delay",
            "60ms",
            "--api-key",
            "k",
            "--max-concurrent",
            "1",
            "--max-queue",
            "0",
        ],
        &[],
    )
    .await;
    let out = run(&server, "node", "browser/chat_page_errors.mjs", &[]).await;
    assert!(out.contains("chromium errors: ok"), "{out}");
}

#[tokio::test]
async fn the_page_and_its_files_are_served_with_a_policy_validators_and_compression() {
    let server = Process::start(&["--backend", "echo"], &[]).await;
    let http = crate::common::client();
    let get = |path: &str, headers: &[(&str, &str)]| {
        let mut req = http.get(server.url(path));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.send()
    };
    let header = |resp: &reqwest::Response, name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().expect("ascii").to_owned())
    };

    let page = get("/", &[]).await.expect("sent");
    assert_eq!(page.status(), 200);
    assert!(header(&page, "content-type").is_some_and(|t| t.starts_with("text/html")));
    let policy = header(&page, "content-security-policy").expect("a policy");
    assert!(policy.contains("script-src 'self'") && policy.contains("default-src 'none'"));
    let html = page.text().await.expect("text");
    assert!(html.contains("/ui/app.js"), "{html}");

    let app = get("/ui/app.js", &[]).await.expect("sent");
    assert!(header(&app, "content-type").is_some_and(|t| t.starts_with("text/javascript")));
    let tag = header(&app, "etag").expect("a validator");
    assert_eq!(header(&app, "cache-control").as_deref(), Some("no-cache"));
    let code = app.text().await.expect("text");
    assert!(
        code.contains("X-Session-Id") && code.contains("/cancel"),
        "the page uses sessions and cancel"
    );
    let again = get("/ui/app.js", &[("if-none-match", &tag)])
        .await
        .expect("sent");
    assert_eq!(again.status(), 304, "revalidated, not sent again");

    // The libraries go out compressed to a browser that accepts it.
    let plain = get("/ui/vendor/purify.es.mjs", &[]).await.expect("sent");
    let plain_len = plain.bytes().await.expect("bytes").len();
    let packed = get("/ui/vendor/purify.es.mjs", &[("accept-encoding", "gzip")])
        .await
        .expect("sent");
    assert_eq!(header(&packed, "content-encoding").as_deref(), Some("gzip"));
    let packed_len = packed.bytes().await.expect("bytes").len();
    assert!(packed_len * 2 < plain_len, "{packed_len} of {plain_len}");

    let missing = get("/ui/nothing.js", &[]).await.expect("sent");
    assert_eq!(missing.status(), 404);

    // A stream is never compressed: each event must reach the client as
    // it is written.
    let stream = http
        .post(server.url("/v1/chat/completions"))
        .header("accept-encoding", "gzip")
        .json(&chat("not compressed", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(header(&stream, "content-encoding"), None);
    assert_eq!(read_all(stream).await.text, "not compressed");
}
