//! The real binary as users start it: configuration from the environment,
//! what it logs, and SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::{Events, chat, client, completion_id, metrics_text, read_all, transcript};
use crate::services::until;

/// The binary as users run it, on port 0.
pub(crate) struct Process {
    pub(crate) child: Child,
    pub(crate) base: String,
    log: Arc<Mutex<String>>,
}

impl Process {
    /// Starts the binary with `args` and `env`, port 0, and waits for the
    /// line on its stdout that says where it listens.
    pub(crate) async fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_under(&[], args, env).await
    }

    /// As `start`, run by `wrapper` (a command that runs the rest of its
    /// arguments, such as `prlimit --nofile=256:256 --`).
    pub(crate) async fn start_under(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Self {
        let binary = env!("CARGO_BIN_EXE_sluicegate");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let mut child = command
            .args(["--port", "0"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawned");
        let log = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let sink = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().expect("log");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .expect("listening in time")
            .expect("stdout")
            .expect("a listening line");
        let base = line
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("not a listening line: {line:?}"))
            .to_owned();
        Self { child, base, log }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    pub(crate) fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-s", name, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

#[tokio::test]
async fn the_environment_configures_it_and_keys_never_reach_the_log() {
    let server = Process::start(
        &[],
        &[
            ("SLUICEGATE_BACKEND", "echo"),
            ("SLUICEGATE_API_KEY", "sekrit-one,sekrit-two"),
            ("SLUICEGATE_TOKEN_DELAY", "50ms"),
        ],
    )
    .await;
    let url = server.url("/v1/chat/completions");
    let refused = client()
        .post(&url)
        .json(&chat("x", false))
        .send()
        .await
        .expect("sent");
    assert_eq!(refused.status(), 401);

    let open = |text: &str| {
        client()
            .post(&url)
            .bearer_auth("sekrit-two")
            .header("x-session-id", "conv")
            .json(&chat(text, true))
            .send()
    };
    let first = open("a b c d e f g h").await.expect("sent");
    let mut events = Events::of(first);
    events.next_json().await;
    let second = open("short").await.expect("sent");
    assert_eq!(
        transcript(&events.rest().await).finish_reason.as_deref(),
        Some("cancelled")
    );
    assert_eq!(read_all(second).await.text, "short");

    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = server.log();
    assert!(log.contains("session_replaced"), "{log}");
    assert!(log.contains("key-2"), "callers are labelled: {log}");
    assert!(log.contains("conv"), "session ids are logged: {log}");
    assert!(!log.contains("sekrit"), "keys must never be logged: {log}");
}

#[tokio::test]
async fn sigterm_lets_streams_finish_within_the_grace_then_cancels_and_exits_zero() {
    let mut server = Process::start(
        &[
            "--backend",
            "echo",
            "--token-delay",
            "200ms",
            "--shutdown-grace",
            "1s",
        ],
        &[],
    )
    .await;
    let url = server.url("/v1/chat/completions");
    let long = client()
        .post(&url)
        .json(&chat(&vec!["w"; 100].join(" "), true))
        .send()
        .await
        .expect("sent");
    let short = client()
        .post(&url)
        .json(&chat("two words", true))
        .send()
        .await
        .expect("sent");
    let mut long = Events::of(long);
    long.next_json().await;

    server.signal("TERM");
    let short = read_all(short).await;
    assert_eq!(
        (short.text.as_str(), short.finish_reason.as_deref()),
        ("two words", Some("stop"))
    );
    let long = transcript(&long.rest().await);
    assert_eq!(long.finish_reason.as_deref(), Some("cancelled"));
    assert!(long.done);

    let status = tokio::time::timeout(Duration::from_secs(20), server.child.wait())
        .await
        .expect("exits in time")
        .expect("status");
    assert!(status.success(), "{status:?}");
    let log = server.log();
    assert!(log.contains("cause=\"shutdown\""), "{log}");
}

/// The value of the sample `name` whose labels include all of `labels`.
pub(crate) fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let series = l.rsplit_once(' ').map_or("", |(s, _)| s);
            let bare = series.split('{').next() == Some(name);
            bare && labels.iter().all(|label| series.contains(label))
        })
        .and_then(|l| l.rsplit_once(' '))
        .map_or(0.0, |(_, v)| v.parse().expect("number"))
}

#[tokio::test]
async fn metrics_follow_a_known_sequence_of_requests() {
    let server = Process::start(
        &[
            "--backend",
            "echo",
            "--token-delay",
            "100ms",
            "--max-concurrent",
            "1",
            "--max-queue",
            "1",
        ],
        &[],
    )
    .await;
    let url = server.url("/v1/chat/completions");
    let open = |text: &str, session: Option<&str>| {
        let mut req = client().post(&url).json(&chat(text, true));
        if let Some(session) = session {
            req = req.header("x-session-id", session.to_owned());
        }
        req.send()
    };

    // Finishes: 3 tokens.
    read_all(open("a b c", None).await.expect("sent")).await;
    // Replaced by the session's next request, which finishes with 1 token.
    let mut replaced = Events::of(open("d e f g h i j k", Some("s")).await.expect("sent"));
    replaced.next_json().await;
    let next = open("x", Some("s")).await.expect("sent");
    replaced.rest().await;
    let next_id = completion_id(&next);
    read_all(next).await;
    // One resume of a finished generation.
    read_all(
        client()
            .get(server.url(&format!("/v1/chat/completions/{next_id}/events")))
            .send()
            .await
            .expect("sent"),
    )
    .await;
    // One 400.
    let bad = client()
        .post(&url)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .expect("sent");
    assert_eq!(bad.status(), 400);
    // One running, one queued, one refused; then both cancelled.
    let running = open("l m n o p q r s", None).await.expect("sent");
    let queued = open("t", None).await.expect("sent");
    let refused = open("u", None).await.expect("sent");
    assert_eq!(refused.status(), 429);
    // The queued one first: cancelling the running one would let it run.
    for resp in [&queued, &running] {
        let id = resp.headers()["x-completion-id"].to_str().expect("ascii");
        client()
            .post(server.url(&format!("/v1/chat/completions/{id}/cancel")))
            .send()
            .await
            .expect("sent");
    }
    read_all(running).await;
    read_all(queued).await;

    let metrics = client()
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("sent");
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    let m = metrics.text().await.expect("text");
    let ended = |cause: &str| {
        sample(
            &m,
            "sluicegate_generations_ended_total",
            &[&format!("cause=\"{cause}\"")],
        )
    };
    assert_eq!(ended("finished"), 2.0, "{m}");
    assert_eq!(ended("session_replaced"), 1.0, "{m}");
    assert_eq!(ended("cancel_endpoint"), 2.0, "{m}");
    let tokens = sample(&m, "sluicegate_tokens_generated_total", &[]);
    assert!(
        tokens >= 4.0,
        "3 + 1 + whatever the replaced and cancelled ones made: {m}"
    );
    let requests = |status: &str| {
        sample(
            &m,
            "sluicegate_requests_total",
            &[
                "route=\"/v1/chat/completions\"",
                &format!("status=\"{status}\""),
            ],
        )
    };
    assert_eq!(requests("200"), 5.0, "{m}");
    assert_eq!(requests("400"), 1.0, "{m}");
    assert_eq!(requests("429"), 1.0, "{m}");
    assert_eq!(
        sample(&m, "sluicegate_rejected_total", &["reason=\"queue_full\""]),
        1.0,
        "{m}"
    );
    assert_eq!(sample(&m, "sluicegate_resumes_total", &[]), 1.0, "{m}");
    assert!(
        sample(&m, "sluicegate_time_to_first_token_seconds_count", &[]) >= 2.0,
        "{m}"
    );
    assert!(
        sample(&m, "sluicegate_inter_token_seconds_count", &[]) >= 2.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "sluicegate_generations_running", &[]),
        0.0,
        "{m}"
    );
    assert_eq!(sample(&m, "sluicegate_generations_queued", &[]), 0.0, "{m}");

    // A client that leaves mid-stream counts as a disconnect.
    let mut leaving = Events::of(open("v w x y z", None).await.expect("sent"));
    leaving.next_json().await;
    drop(leaving);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = metrics_text(server.url("/metrics")).await;
    assert!(
        sample(&m, "sluicegate_disconnects_total", &[]) >= 1.0,
        "{m}"
    );
}

/// A self-signed certificate for `localhost`, and its certificate and key
/// written as PEM into a directory of this process named after `name`.
fn self_signed(
    name: &str,
) -> (
    rcgen::CertifiedKey<rcgen::KeyPair>,
    PathBuf,
    PathBuf,
    PathBuf,
) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("cert written");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("key written");
    (certified, dir, cert, key)
}

#[tokio::test]
async fn tls_serves_http2_by_alpn_and_http1_too() {
    let (certified, dir, cert, key) = self_signed("sluicegate-tls");

    let server = Process::start(
        &[
            "--backend",
            "echo",
            "--tls-cert",
            cert.to_str().expect("utf-8 path"),
            "--tls-key",
            key.to_str().expect("utf-8 path"),
        ],
        &[],
    )
    .await;
    // The binary says where it listens, scheme and all.
    let addr: std::net::SocketAddr = server
        .base
        .strip_prefix("https://")
        .expect("an https:// listening line")
        .parse()
        .expect("addr");
    let trust = reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).expect("pem");
    let url = format!("https://localhost:{}/v1/chat/completions", addr.port());

    let h2 = crate::common::client_builder()
        .tls_certs_only([trust.clone()])
        .resolve("localhost", addr)
        .build()
        .expect("client");
    let resp = h2
        .post(&url)
        .json(&chat("over tls", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "ALPN picked h2");
    assert_eq!(read_all(resp).await.text, "over tls");

    let h1 = crate::common::client_builder()
        .tls_certs_only([trust])
        .resolve("localhost", addr)
        .http1_only()
        .build()
        .expect("client");
    let resp = h1
        .post(&url)
        .json(&chat("plain old", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(read_all(resp).await.text, "plain old");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn with_upstream_http2_the_relay_speaks_http2_from_the_first_byte() {
    // What a relay sends first to a bare listener: the HTTP/2 preface.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bound");
    let bare = format!("http://{}", listener.local_addr().expect("addr"));
    let relay = Process::start(
        &[
            "--backend",
            "openai",
            "--upstream",
            &bare,
            "--upstream-http2",
        ],
        &[],
    )
    .await;
    let request = tokio::spawn(
        client()
            .post(relay.url("/v1/chat/completions"))
            .json(&chat("hello", true))
            .send(),
    );
    let (mut socket, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the relay connects")
        .expect("accepted");
    let mut preface = [0u8; 24];
    tokio::io::AsyncReadExt::read_exact(&mut socket, &mut preface)
        .await
        .expect("read");
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    drop(socket);
    drop(request);

    // And a whole answer through it, from an upstream that speaks h2c.
    let upstream = crate::common::TestServer::echo().await;
    let relay = Process::start(
        &[
            "--backend",
            "openai",
            "--upstream",
            &upstream.base,
            "--upstream-http2",
        ],
        &[],
    )
    .await;
    let resp = client()
        .post(relay.url("/v1/chat/completions"))
        .json(&chat("relayed over one multiplexed connection", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let answer = crate::common::read_all(resp).await;
    assert_eq!(answer.text, "relayed over one multiplexed connection");
    assert!(answer.done);
}

/// A TCP forwarder in front of `to` that counts the connections made
/// through it: each is a connection (over TLS, a handshake) the relay paid
/// for.
async fn counting_forwarder(to: std::net::SocketAddr) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bound");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, accepted)
}

#[tokio::test]
async fn over_tls_the_relay_shakes_hands_with_its_upstream_once() {
    let (_, dir, cert, key) = self_signed("sluicegate-upstream-tls");
    let cert = cert.to_str().expect("utf-8 path");
    let upstream = Process::start(
        &[
            "--backend",
            "echo",
            "--tls-cert",
            cert,
            "--tls-key",
            key.to_str().expect("utf-8 path"),
        ],
        &[],
    )
    .await;
    let addr = upstream
        .base
        .strip_prefix("https://")
        .expect("an https:// listening line")
        .parse()
        .expect("addr");
    let (port, accepted) = counting_forwarder(addr).await;
    // The relay trusts the upstream's certificate as a system would
    // (`SSL_CERT_FILE`), and names it as its certificate does.
    let relay = Process::start(
        &[
            "--backend",
            "openai",
            "--upstream",
            &format!("https://localhost:{port}"),
        ],
        &[("SSL_CERT_FILE", cert)],
    )
    .await;
    for i in 0..20 {
        let text = format!("answer number {i}");
        let resp = client()
            .post(relay.url("/v1/chat/completions"))
            .json(&chat(&text, true))
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 200);
        let answer = read_all(resp).await;
        assert_eq!(answer.text, text);
        assert!(answer.done);
    }
    // One TLS connection (HTTP/2, offered in the handshake) for the model
    // list and twenty streams: one handshake in all.
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "{}", relay.log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_binary_fronts_an_upstream_with_backend_openai() {
    let upstream = crate::common::TestServer::echo().await;
    let server = Process::start(
        &[
            "--backend",
            "openai",
            "--upstream",
            &upstream.base,
            "--upstream-api-key",
            "up-key",
        ],
        &[],
    )
    .await;
    let resp = client()
        .post(server.url("/v1/chat/completions"))
        .json(&chat("relayed by a process", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(read_all(resp).await.text, "relayed by a process");
    assert!(
        !server.log().contains("up-key"),
        "the upstream key is never logged"
    );
}

#[tokio::test]
async fn every_flag_in_help_is_in_the_readme_flag_table_and_back() {
    let help = Command::new(env!("CARGO_BIN_EXE_sluicegate"))
        .arg("--help")
        .output()
        .await
        .expect("ran");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let flag = |word: &str| {
        let name: String = word
            .trim_start_matches('-')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        (word.starts_with("--") && !name.is_empty()).then(|| format!("--{name}"))
    };
    let in_help: std::collections::BTreeSet<String> = help
        .lines()
        .filter_map(|l| l.trim_start().split([' ', ',', '=']).find_map(flag))
        .filter(|f| f != "--help" && f != "--version")
        .collect();
    let readme = include_str!("../../README.md");
    let in_table: std::collections::BTreeSet<String> = readme
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(|cell| cell.split('`').filter_map(flag).collect::<Vec<_>>())
        .collect();
    assert!(in_help.len() > 40, "{in_help:?}");
    let missing: Vec<_> = in_help.difference(&in_table).collect();
    assert!(
        missing.is_empty(),
        "in --help, not in the README's table: {missing:?}"
    );
    let stale: Vec<_> = in_table.difference(&in_help).collect();
    assert!(
        stale.is_empty(),
        "in the README's table, not in --help: {stale:?}"
    );
}

#[tokio::test]
async fn a_missing_or_corrupt_model_is_a_clear_startup_error() {
    let dir = std::env::temp_dir().join(format!("sluicegate-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let corrupt = dir.join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF but not really a model").expect("written");
    // Only the default model's file is fetched by scripts/fetch-model; a
    // path the user gave is theirs to check.
    let missing_default = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    for (path, hint) in [
        (
            dir.join("missing.gguf"),
            "check the path given with --model",
        ),
        (missing_default, "fetch-model"),
        (corrupt, "GGUF"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_sluicegate"))
            .args(["--port", "0", "--model"])
            .arg(&path)
            .output()
            .await
            .expect("ran");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(
            stderr.contains(path.to_str().expect("utf-8")),
            "names the path: {stderr}"
        );
        assert!(stderr.contains(hint), "says what to do: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn every_client_that_drops_a_stream_midway_is_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Process::start(&["--backend", "echo"], &[]).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let body = serde_json::to_string(&chat(&vec!["word"; 100].join(" "), true)).expect("json");
    let drops = 20;
    for _ in 0..drops {
        let mut tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(request.as_bytes()).await.expect("sent");
        // The headers and the first events, then away, the rest unread: an
        // abortive close, as the kernel makes it when unread data remains
        // (set here, so that it never depends on how much had arrived).
        let mut some = [0u8; 512];
        let read = tcp.read(&mut some).await.expect("read");
        assert!(read > 0);
        tcp.set_zero_linger().expect("linger");
        drop(tcp);
    }
    let metrics_url = server.url("/metrics");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = client()
            .get(&metrics_url)
            .send()
            .await
            .expect("sent")
            .text()
            .await
            .expect("text");
        let counted = sample(&text, "sluicegate_disconnects_total", &[]);
        if counted >= f64::from(drops) {
            assert!(counted <= f64::from(drops), "counted twice: {counted}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{counted} of {drops} drops counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One `sh` block of the README: the servers its `scripts/serve … &`
/// lines start, and the rest of it.
struct ShBlock {
    servers: Vec<Vec<String>>,
    rest: String,
}

/// Every `sh` block of the README but `scripts/test` (the suite itself).
fn readme_sh_blocks() -> Vec<ShBlock> {
    let readme = include_str!("../../README.md");
    readme
        .split("```sh\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap_or_default())
        .filter(|block| block.trim() != "scripts/test")
        .map(|block| {
            let mut servers = Vec::new();
            let mut rest = Vec::new();
            for line in block.lines() {
                match line.strip_prefix("scripts/serve") {
                    Some(args) => {
                        let args = args.split('&').next().unwrap_or_default();
                        servers.push(args.split_whitespace().map(str::to_owned).collect());
                    }
                    None => rest.push(line),
                }
            }
            ShBlock {
                servers,
                rest: rest.join("\n"),
            }
        })
        .collect()
}

/// Runs a block as pasted, but for ports: its servers are the test's own
/// on ports of their own (the release build, the model fetch and ports
/// 8080 to 8082 are the differences), Redis is the test's, its files go to
/// a directory of its own, and the `kill %1` that stops its server goes.
/// Where it starts no server, it talks to `default`. The servers, and what
/// the block printed.
async fn run_readme_block(
    block: &ShBlock,
    redis: &str,
    default: Option<&Process>,
) -> (Vec<Process>, String) {
    let mut servers = Vec::new();
    for args in &block.servers {
        let mut args: Vec<String> = args
            .iter()
            .map(|a| a.replace("redis://127.0.0.1:6379", redis))
            .collect();
        if let Some(at) = args.iter().position(|a| a == "--port") {
            args.drain(at..at + 2);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        servers.push(Process::start(&args, &[]).await);
    }
    let target = servers.first().or(default).expect("a server to talk to");
    let host = target.base.trim_start_matches("http://").to_owned();
    let scratch =
        std::env::temp_dir().join(format!("sluicegate-readme-{}", host.replace(':', "-")));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let script = block
        .rest
        .lines()
        .filter(|l| l.trim() != "kill %1")
        .collect::<Vec<_>>()
        .join("\n")
        .replace("127.0.0.1:8080", &host)
        .replace("/tmp/", &format!("{}/", scratch.display()));
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node_modules/.bin");
    let path = format!(
        "{}:{}",
        clients.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &format!("{script}\nwait")])
        .current_dir(&scratch)
        .env("PATH", path)
        .env("HOME", &scratch)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the block ends")
        .expect("bash runs");
    let _ = std::fs::remove_dir_all(&scratch);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script}\n{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    (servers, stdout)
}

#[tokio::test]
async fn every_shell_example_in_the_readme_runs_as_pasted() {
    let redis = crate::services::Redis::start().await;
    // For the blocks that talk to a server they do not start (Claude Code):
    // echo under the name they use.
    let named = Process::start(
        &["--backend", "echo", "--model-name", "SmolLM2-135M-Instruct"],
        &[],
    )
    .await;
    let blocks = readme_sh_blocks();
    assert_eq!(blocks.len(), 5, "the blocks this test knows");
    let mut checked = 0;
    for block in &blocks {
        let (servers, out) = run_readme_block(block, &redis.url(), Some(&named)).await;
        let rest = &block.rest;
        if rest.contains("claude -p") {
            // Echo answers the last user turn, which ends with the prompt.
            assert!(out.trim_end().ends_with("hello"), "{out}");
        } else if block.servers.len() == 2 {
            // Two replicas on one Redis: both reach it, and one's answer
            // replays on the other.
            for p in &servers {
                until(Duration::from_secs(10), || crate::replicas::redis_ok(p)).await;
            }
            let resp = crate::replicas::open(
                &servers[0].url("/v1/chat/completions"),
                "shared by two",
                None,
                None,
            )
            .await;
            let id = completion_id(&resp);
            read_all(resp).await;
            let replay = client()
                .get(servers[1].url(&format!("/v1/chat/completions/{id}/events")))
                .send()
                .await
                .expect("sent");
            assert_eq!(read_all(replay).await.text, "shared by two");
        } else if rest.contains("hello streaming world") {
            assert_echo_block(&out);
        } else {
            // The real model, asked for the capital of France, streamed or not.
            assert!(out.contains("Paris"), "{out}");
            let streamed = rest.contains("\"stream\":true");
            let ends = out.matches("data: [DONE]").count();
            assert_eq!(ends, usize::from(streamed), "{out}");
        }
        checked += 1;
    }
    assert_eq!(checked, 5);
}

/// What the echo block under "Try it with curl" shows.
fn assert_echo_block(out: &str) {
    for word in ["\"hello\"", "\" streaming\"", "\" world\""] {
        assert!(out.contains(word), "the first answer streams {word}: {out}");
    }
    assert!(
        out.contains("\"finish_reason\":\"cancelled\""),
        "the session's next question ends the first: {out}"
    );
    assert!(
        out.contains("\" question\""),
        "the next question's answer: {out}"
    );
    assert!(
        out.contains("\"cancelled\":true"),
        "the cancel by id: {out}"
    );
    // The resume after event 2 of the cancelled answer: events 3 and on,
    // then the end.
    let resumed = out
        .rsplit("\"cancelled\":true")
        .next()
        .expect("what follows the cancel");
    assert!(resumed.contains(".3\n"), "from event 3: {resumed}");
    assert!(!resumed.contains(".2\n"), "not event 2 again: {resumed}");
    assert_eq!(resumed.matches("data: [DONE]").count(), 1, "{resumed}");
}
