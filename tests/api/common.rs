//! `TestServer`: a real sluicegate on a loopback port (echo backend), and
//! client helpers that read its streams the way frontends do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use sluicegate::backend::Backend;
use sluicegate::backend::echo::EchoBackend;
use sluicegate::server::{self, AppState, Settings};
use sluicegate::session::RegistryConfig;
use tokio::sync::oneshot;

pub(crate) struct TestServer {
    pub(crate) base: String,
    pub(crate) state: AppState,
    /// Dropping it (with the server) starts the server's drain.
    _shutdown: oneshot::Sender<()>,
}

/// Options for [`TestServer`]; `Default` is the contract's defaults with
/// an instant echo.
#[derive(Clone)]
pub(crate) struct Options {
    /// The backend; `None`: echo with `token_delay`.
    pub(crate) backend: Option<Arc<dyn Backend>>,
    pub(crate) token_delay: Duration,
    pub(crate) api_keys: Vec<String>,
    pub(crate) registry: RegistryConfig,
    pub(crate) settings: Settings,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            backend: None,
            token_delay: Duration::ZERO,
            api_keys: Vec::new(),
            registry: RegistryConfig::default(),
            settings: Settings::default(),
        }
    }
}

impl Options {
    pub(crate) fn delay(mut self, delay: Duration) -> Self {
        self.token_delay = delay;
        self
    }

    pub(crate) fn backend(mut self, backend: Arc<dyn Backend>) -> Self {
        self.backend = Some(backend);
        self
    }

    pub(crate) fn keys(mut self, keys: &[&str]) -> Self {
        self.api_keys = keys.iter().map(|k| (*k).to_owned()).collect();
        self
    }

    pub(crate) fn grace(mut self, grace: Duration) -> Self {
        self.registry.reattach_grace = grace;
        self
    }

    pub(crate) fn keep_alive(mut self, every: Duration) -> Self {
        self.settings.keep_alive = every;
        self
    }

    pub(crate) async fn start(self) -> TestServer {
        TestServer::start(self).await
    }
}

impl TestServer {
    pub(crate) async fn echo() -> Self {
        Options::default().start().await
    }

    pub(crate) fn options() -> Options {
        Options::default()
    }

    async fn start(options: Options) -> Self {
        let backend = options
            .backend
            .unwrap_or_else(|| Arc::new(EchoBackend::new("echo", options.token_delay)));
        let state = AppState::new(
            backend,
            options.registry,
            options.api_keys,
            options.settings,
        )
        .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel();
        tokio::spawn(server::run(listener, None, state.clone(), async {
            let _ = rx.await;
        }));
        Self {
            base: format!("http://{addr}"),
            state,
            _shutdown: tx,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// A client builder; reqwest is built without a bundled TLS provider, so
/// this installs ring as the process default first.
pub(crate) fn client_builder() -> reqwest::ClientBuilder {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

pub(crate) fn client() -> reqwest::Client {
    // No pooling: an idle pooled connection (and the pool's timer task)
    // would outlive a test's requests and blur what the server keeps.
    client_builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// A chat request body for `text`.
pub(crate) fn chat(text: &str, stream: bool) -> Value {
    json!({
        "model": "echo",
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    })
}

pub(crate) fn post(server: &TestServer, path: &str, body: &Value) -> reqwest::RequestBuilder {
    client().post(server.url(path)).json(body)
}

/// Posts `body` and reads the JSON answer, whatever its status.
pub(crate) async fn post_json(server: &TestServer, path: &str, body: &Value) -> Value {
    json_reply(post(server, path, body)).await
}

/// Sends `request` and reads the JSON answer, whatever its status.
pub(crate) async fn json_reply(request: reqwest::RequestBuilder) -> Value {
    request
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json")
}

/// The id a stream's `X-Completion-Id` header names.
pub(crate) fn completion_id(resp: &reqwest::Response) -> String {
    resp.headers()["x-completion-id"]
        .to_str()
        .expect("ascii")
        .to_owned()
}

/// `POST /v1/chat/completions/{id}/cancel` on `server`, as the caller
/// with no key.
pub(crate) async fn cancel(server: &TestServer, id: &str) -> reqwest::Response {
    client()
        .post(server.url(&format!("/v1/chat/completions/{id}/cancel")))
        .send()
        .await
        .expect("sent")
}

/// What `/metrics` at `url` renders.
pub(crate) async fn metrics_text(url: String) -> String {
    client()
        .get(url)
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("text")
}

/// Posts a streaming chat request and checks the SSE headers.
pub(crate) async fn open_stream(
    server: &TestServer,
    text: &str,
    session: Option<&str>,
) -> reqwest::Response {
    let mut req = post(server, "/v1/chat/completions", &chat(text, true));
    if let Some(session) = session {
        req = req.header("x-session-id", session);
    }
    let resp = req.send().await.expect("sent");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    resp
}

/// Events as an SSE client parses them.
pub(crate) struct Events(std::pin::Pin<Box<dyn Stream<Item = Event> + Send>>);

impl Events {
    pub(crate) fn of(resp: reqwest::Response) -> Self {
        let events = resp
            .bytes_stream()
            .eventsource()
            .map(|e| e.expect("well-formed SSE"));
        Self(Box::pin(events))
    }

    pub(crate) async fn next(&mut self) -> Option<Event> {
        self.0.next().await
    }

    /// The next event's JSON; panics on `[DONE]` or the end.
    pub(crate) async fn next_json(&mut self) -> Value {
        let event = self.next().await.expect("an event");
        serde_json::from_str(&event.data).unwrap_or_else(|_| panic!("JSON data: {:?}", event.data))
    }

    /// Everything to the end of the stream.
    pub(crate) async fn rest(mut self) -> Vec<Event> {
        let mut all = Vec::new();
        while let Some(event) = self.next().await {
            all.push(event);
        }
        all
    }
}

/// What a finished stream said.
#[derive(Debug)]
pub(crate) struct Transcript {
    pub(crate) text: String,
    pub(crate) finish_reason: Option<String>,
    pub(crate) ids: Vec<String>,
    pub(crate) chunks: Vec<Value>,
    pub(crate) done: bool,
}

pub(crate) fn transcript(events: &[Event]) -> Transcript {
    let mut t = Transcript {
        text: String::new(),
        finish_reason: None,
        ids: Vec::new(),
        chunks: Vec::new(),
        done: false,
    };
    for event in events {
        t.ids.push(event.id.clone());
        assert!(!t.done, "nothing after [DONE]");
        if event.data == "[DONE]" {
            t.done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(&event.data).expect("JSON chunk");
        let choice = &chunk["choices"][0];
        if let Some(piece) = choice["delta"]["content"]
            .as_str()
            .or(choice["text"].as_str())
        {
            t.text.push_str(piece);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            t.finish_reason = Some(reason.to_owned());
        }
        t.chunks.push(chunk);
    }
    t
}

pub(crate) async fn read_all(resp: reqwest::Response) -> Transcript {
    transcript(&Events::of(resp).rest().await)
}

/// Raw body bytes, for checks below the SSE parser.
pub(crate) struct Raw {
    body: std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    pub(crate) seen: String,
}

impl Raw {
    pub(crate) fn of(resp: reqwest::Response) -> Self {
        Self {
            body: Box::pin(resp.bytes_stream()),
            seen: String::new(),
        }
    }

    /// Reads until `seen` contains `needle`; panics if the body ends first.
    pub(crate) async fn until(&mut self, needle: &str) {
        while !self.seen.contains(needle) {
            let chunk = self
                .body
                .next()
                .await
                .unwrap_or_else(|| panic!("body ended before {needle:?}; saw {:?}", self.seen))
                .expect("body chunk");
            self.seen
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// Reads to the end of the body.
    pub(crate) async fn read_to_end(&mut self) {
        while let Some(chunk) = self.body.next().await {
            self.seen
                .push_str(std::str::from_utf8(&chunk.expect("body chunk")).expect("UTF-8"));
        }
    }
}

/// Polls `check` until it holds, for state that settles asynchronously
/// (a task noticing a closed socket). Fails after `limit`.
pub(crate) async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
