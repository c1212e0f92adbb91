//! The servers under test and the one streaming client both are measured
//! with: sluicegate on its local backend, and llama.cpp's `llama-server`
//! on the same GGUF when `LLAMA_SERVER` names its binary.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::process::{Child, Command};

use crate::support::Server;

/// Slots llama-server gets, and sluicegate's `--max-concurrent` to match.
pub(crate) const SLOTS: usize = 8;
/// llama-server's context per slot (its `-c` is the sum over slots).
const CONTEXT_PER_SLOT: usize = 2048;

/// One server under test.
pub(crate) struct Target {
    pub(crate) name: &'static str,
    pub(crate) base: String,
    pid: u32,
    /// Kills the process when dropped.
    _child: Child,
}

impl Target {
    /// The release binary on `--backend local` with its default model.
    pub(crate) async fn sluicegate() -> Self {
        let slots = SLOTS.to_string();
        let server = Server::spawn(&["--backend", "local", "--max-concurrent", &slots]).await;
        let target = Self {
            name: "sluicegate",
            pid: server.pid(),
            base: server.base,
            _child: server.child,
        };
        target.wait_healthy().await;
        target
    }

    /// `binary` on the same GGUF: `SLOTS` slots of `CONTEXT_PER_SLOT`
    /// tokens, `threads` threads, no repacked weights (the repacked AMX
    /// buffers crash at start on this machine class).
    pub(crate) async fn llama_server(binary: &str, model: &str, threads: usize) -> Self {
        let port = free_port();
        let context = (SLOTS * CONTEXT_PER_SLOT).to_string();
        let child = Command::new(binary)
            .args([
                "-m",
                model,
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args(["-np", &SLOTS.to_string(), "-c", &context])
            .args(["-t", &threads.to_string(), "--no-repack", "--log-disable"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn llama-server");
        let target = Self {
            name: "llama-server",
            base: format!("http://127.0.0.1:{port}"),
            pid: child.id().expect("running"),
            _child: child,
        };
        target.wait_healthy().await;
        target
    }

    /// `/health` answers 200 once the model is loaded (llama-server says
    /// 503 while loading).
    async fn wait_healthy(&self) {
        let client = reqwest::Client::new();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(120) {
            let health = client.get(format!("{}/health", self.base)).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("{} did not become healthy in 120 s", self.name);
    }

    /// Peak RSS of the server process (VmHWM), in MiB.
    pub(crate) fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .expect("VmHWM")
            / 1024.0
    }

    /// Streams one chat completion to its end. `session` goes in
    /// `X-Session-Id`, which llama-server ignores (its slots keep their
    /// prompt cache by default).
    pub(crate) async fn stream(
        &self,
        client: &reqwest::Client,
        body: &serde_json::Value,
        session: Option<&str>,
    ) -> Streamed {
        let mut request = client
            .post(format!("{}/v1/chat/completions", self.base))
            .json(body);
        if let Some(session) = session {
            request = request.header("x-session-id", session);
        }
        let sent = Instant::now();
        let resp = request.send().await.expect("sent");
        let status = resp.status();
        assert!(
            status.is_success(),
            "{}: {status}: {}",
            self.name,
            resp.text().await.unwrap_or_default()
        );
        let mut streamed = Streamed {
            sent,
            arrivals: Vec::new(),
            ended: sent,
            text: String::new(),
            prompt_tokens: None,
        };
        let mut pending = Vec::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let now = Instant::now();
            pending.extend_from_slice(&chunk.expect("chunk"));
            // Events end with a blank line; a partial one waits for more.
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                streamed.read_event(self.name, &event, now);
            }
        }
        streamed.ended = Instant::now();
        streamed
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// What one stream showed the client.
pub(crate) struct Streamed {
    pub(crate) sent: Instant,
    /// When each content chunk arrived: both servers send one per token.
    pub(crate) arrivals: Vec<Instant>,
    pub(crate) ended: Instant,
    pub(crate) text: String,
    /// From the `include_usage` chunk.
    pub(crate) prompt_tokens: Option<u64>,
}

impl Streamed {
    fn read_event(&mut self, server: &str, event: &[u8], at: Instant) {
        let event = String::from_utf8_lossy(event);
        for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if data == "[DONE]" {
                continue;
            }
            let chunk: serde_json::Value = serde_json::from_str(data).expect("a JSON chunk");
            assert!(chunk.get("error").is_none(), "{server}: {data}");
            if let Some(n) = chunk["usage"]["prompt_tokens"].as_u64() {
                self.prompt_tokens = Some(n);
            }
            let content = chunk["choices"][0]["delta"]["content"].as_str();
            if let Some(content) = content.filter(|c| !c.is_empty()) {
                self.arrivals.push(at);
                self.text.push_str(content);
            }
        }
    }

    /// Time to the first token; to the end for a stream without one.
    pub(crate) fn ttft(&self) -> Duration {
        self.arrivals
            .first()
            .unwrap_or(&self.ended)
            .duration_since(self.sent)
    }

    pub(crate) fn tokens(&self) -> usize {
        self.arrivals.len()
    }

    /// Gaps between consecutive tokens, with when each gap ended.
    pub(crate) fn gaps(&self) -> impl Iterator<Item = (Instant, Duration)> + '_ {
        self.arrivals.windows(2).map(|w| (w[1], w[1] - w[0]))
    }

    /// Tokens/s after the first token.
    pub(crate) fn decode_rate(&self) -> f64 {
        match (self.arrivals.first(), self.arrivals.last()) {
            (Some(first), Some(last)) if self.arrivals.len() > 1 => {
                (self.arrivals.len() - 1) as f64 / (*last - *first).as_secs_f64()
            }
            _ => f64::NAN,
        }
    }
}
