//! Command line and environment (`SLUICEGATE_*`) into a validated `Config`.
//! Nothing else in the crate reads the environment.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The bundled GGUF model on this machine's CPU.
    Local,
    /// An OpenAI-compatible upstream server.
    Openai,
    /// Echoes the last user message, word by word: for tests and frontends.
    Echo,
}

/// Streams LLM tokens to chat frontends over OpenAI-compatible SSE.
#[derive(Debug, Clone, Parser)]
#[command(name = "sluicegate", version, about)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "SLUICEGATE_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "SLUICEGATE_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Which model backend serves requests.
    #[arg(long, env = "SLUICEGATE_BACKEND", value_enum, default_value_t = BackendKind::Local)]
    pub backend: BackendKind,

    /// `local`: path of a GGUF file (default: the bundled model, fetched by
    /// scripts/fetch-model into the cache directory).
    #[arg(long, env = "SLUICEGATE_MODEL")]
    pub model: Option<PathBuf>,

    /// `local`: chat template, a built-in name (`chatml`) or a Jinja file
    /// (default: the model's own).
    #[arg(long, env = "SLUICEGATE_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,

    /// The model id clients send and `/v1/models` lists (default: the backend's).
    #[arg(long, env = "SLUICEGATE_MODEL_NAME")]
    pub model_name: Option<String>,

    /// `local`: KV-cache memory in MiB the running generations may hold
    /// together; a generation starts while its prompt fits, and the newest
    /// gives its cache back (to compute it again later) when answers
    /// outgrow it.
    #[arg(long, env = "SLUICEGATE_KV_CACHE_MEMORY", default_value_t = 2048)]
    pub kv_cache_memory: usize,

    /// `local`: KV-cache memory in MiB kept after generations end, for the
    /// next turn of a conversation (or a prompt with the same start, of
    /// the same caller) to reuse; least recently used first out.
    #[arg(long, env = "SLUICEGATE_PROMPT_CACHE_MEMORY", default_value_t = 256)]
    pub prompt_cache_memory: usize,

    /// `local`: tokens per forward pass: each running generation's next
    /// token, then prompt chunks up to this many.
    #[arg(long, env = "SLUICEGATE_STEP_TOKENS", default_value_t = 256)]
    pub step_tokens: usize,

    /// `local`: tokens a decoding generation may draft per step from its
    /// own text (prompt lookup), verified in the same forward pass; the
    /// answer is the same token for token. 0: off.
    #[arg(long, env = "SLUICEGATE_PROMPT_LOOKUP", default_value_t = crate::backend::local::PROMPT_LOOKUP)]
    pub prompt_lookup: usize,

    /// `openai`: base URL of an OpenAI-compatible server; repeat for several.
    #[arg(long = "upstream", env = "SLUICEGATE_UPSTREAM", value_delimiter = ',')]
    pub upstreams: Vec<String>,

    /// `openai`: bearer key sent to the upstreams (never the client's own).
    #[arg(long, env = "SLUICEGATE_UPSTREAM_API_KEY", hide_env_values = true)]
    pub upstream_api_key: Option<String>,

    /// `openai`: give up connecting to an upstream after this long.
    #[arg(long, env = "SLUICEGATE_UPSTREAM_CONNECT_TIMEOUT", value_parser = duration, default_value = "5s")]
    pub upstream_connect_timeout: Duration,

    /// `openai`: speak HTTP/2 to the upstreams from the first byte (prior
    /// knowledge; h2c over `http://`): many streams over few connections.
    /// The upstreams must speak it (vLLM's server does not). Without it,
    /// `https://` upstreams still get HTTP/2 when their TLS handshake
    /// offers it.
    #[arg(long, env = "SLUICEGATE_UPSTREAM_HTTP2")]
    pub upstream_http2: bool,

    /// `openai`: give up on an upstream that sends nothing for this long.
    #[arg(long, env = "SLUICEGATE_UPSTREAM_FIRST_BYTE_TIMEOUT", value_parser = duration, default_value = "60s")]
    pub upstream_first_byte_timeout: Duration,

    /// `echo`: pause before each token.
    #[arg(long, env = "SLUICEGATE_TOKEN_DELAY", value_parser = duration, default_value = "0ms")]
    pub token_delay: Duration,

    /// Accepted bearer key; repeat for several. None: no authentication.
    #[arg(
        long = "api-key",
        env = "SLUICEGATE_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Interval of `: keep-alive` comments on idle streams.
    #[arg(long, env = "SLUICEGATE_KEEP_ALIVE", value_parser = duration, default_value = "15s")]
    pub keep_alive: Duration,

    /// How long a generation with no client attached keeps going, waiting
    /// for a resume; `0s` stops it at once.
    #[arg(long, env = "SLUICEGATE_REATTACH_GRACE", value_parser = duration, default_value = "10s")]
    pub reattach_grace: Duration,

    /// How long a finished generation's events stay resumable.
    #[arg(long, env = "SLUICEGATE_RESUME_TTL", value_parser = duration, default_value = "5m")]
    pub resume_ttl: Duration,

    /// Bytes of stream events kept for resume across all generations;
    /// finished ones beyond it are dropped, oldest first.
    #[arg(long, env = "SLUICEGATE_RESUME_BUDGET", default_value_t = 64 << 20)]
    pub resume_budget: usize,

    /// How long a stored Responses API response and its items are kept.
    #[arg(long, env = "SLUICEGATE_RESPONSE_TTL", value_parser = duration, default_value = "30m")]
    pub response_ttl: Duration,

    /// Bytes of stored Responses API responses kept in this process (with
    /// `--redis`, Redis keeps them under its own memory limit); the oldest
    /// go first.
    #[arg(long, env = "SLUICEGATE_RESPONSE_BUDGET", default_value_t = 64 << 20)]
    pub response_budget: usize,

    /// Largest event log of one generation in bytes; an answer that reaches
    /// it ends with `finish_reason: "length"`.
    #[arg(long, env = "SLUICEGATE_MAX_LOG_BYTES", default_value_t = 16 << 20)]
    pub max_log_bytes: usize,

    /// URL of the state shared by replicas (user and password in the
    /// URL): `redis://` or `rediss://` for one server,
    /// `redis+sentinel://host:port[,host:port]/<service>` for a primary
    /// that Sentinel watches, `redis+cluster://host:port[,host:port]` (or
    /// `rediss+cluster://`) for a Cluster. None: all state in this process.
    #[arg(long, env = "SLUICEGATE_REDIS", hide_env_values = true)]
    pub redis: Option<String>,

    /// With `--redis`: how long a generation's owner lease lasts. Readers
    /// on other instances end a generation whose owner has not renewed it
    /// for this long.
    #[arg(long, env = "SLUICEGATE_REDIS_LEASE", value_parser = duration, default_value = "3s")]
    pub redis_lease: Duration,

    /// With `--redis`: longest wait for one Redis command.
    #[arg(long, env = "SLUICEGATE_REDIS_TIMEOUT", value_parser = duration, default_value = "1s")]
    pub redis_timeout: Duration,

    /// With a `rediss://` `--redis`: a PEM file of the CA that signed the
    /// Redis server's certificate, trusted instead of the system's roots.
    #[arg(long, env = "SLUICEGATE_REDIS_CA")]
    pub redis_ca: Option<std::path::PathBuf>,

    /// With `--redis`: what every key and channel starts with, so that two
    /// deployments can share one Redis.
    #[arg(long, env = "SLUICEGATE_REDIS_PREFIX", default_value = "sg")]
    pub redis_prefix: String,

    /// With `--redis` and `--api-key`: the secret under which records name
    /// callers (an HMAC of the key), the same on every instance. Without
    /// it, anyone who can read Redis can test guesses of a weak API key.
    #[arg(long, env = "SLUICEGATE_REDIS_SECRET", hide_env_values = true)]
    pub redis_secret: Option<String>,

    /// Request body limit in bytes.
    #[arg(long, env = "SLUICEGATE_MAX_BODY", default_value_t = 1_048_576)]
    pub max_body: usize,

    /// Generations running at once (default: the backend's choice).
    #[arg(long, env = "SLUICEGATE_MAX_CONCURRENT")]
    pub max_concurrent: Option<usize>,

    /// Generations waiting for a run slot before new requests get 429.
    #[arg(long, env = "SLUICEGATE_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,

    /// Generations of one API key running at once (default: no own limit).
    #[arg(long, env = "SLUICEGATE_MAX_CONCURRENT_PER_KEY")]
    pub max_concurrent_per_key: Option<usize>,

    /// Generations of one API key running or waiting before it gets 429
    /// (default with two or more API keys: half of (--max-concurrent +
    /// --max-queue), rounded up; with one key or none, no limit of its own).
    #[arg(long, env = "SLUICEGATE_MAX_QUEUE_PER_KEY")]
    pub max_queue_per_key: Option<usize>,

    /// Origin allowed to call from a browser (CORS); repeatable; `*` for any.
    #[arg(
        long = "cors-origin",
        env = "SLUICEGATE_CORS_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,

    /// How long running streams may finish after SIGTERM or SIGINT.
    #[arg(long, env = "SLUICEGATE_SHUTDOWN_GRACE", value_parser = duration, default_value = "10s")]
    pub shutdown_grace: Duration,

    /// Time a client has to send a complete request head, from the moment
    /// it connects or sends the first byte of its next request.
    #[arg(long, env = "SLUICEGATE_HEADER_READ_TIMEOUT", value_parser = duration, default_value = "10s")]
    pub header_read_timeout: Duration,

    /// Time a client has to send a whole request body.
    #[arg(long, env = "SLUICEGATE_BODY_READ_TIMEOUT", value_parser = duration, default_value = "30s")]
    pub body_read_timeout: Duration,

    /// How long a connection with no request in flight stays open.
    #[arg(long, env = "SLUICEGATE_IDLE_TIMEOUT", value_parser = duration, default_value = "60s")]
    pub idle_timeout: Duration,

    /// Open client connections at most (default: from the descriptor
    /// limit, at most 10000). Beyond it the server stops accepting and
    /// closes connections that have sent nothing.
    #[arg(long, env = "SLUICEGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Host name clients may send in `Host` when no `--api-key` is set
    /// (besides IP addresses, `localhost` and `--host`); repeatable; `*`
    /// for any. Guards a keyless server against DNS rebinding.
    #[arg(
        long = "allowed-host",
        env = "SLUICEGATE_ALLOWED_HOST",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,

    /// PEM certificate chain: serve HTTPS (ALPN h2 and http/1.1).
    #[arg(long, env = "SLUICEGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "SLUICEGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Threads that serve requests (default: one per core).
    #[arg(long, env = "SLUICEGATE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "SLUICEGATE_LOG", default_value = "info")]
    pub log: String,

    /// OTLP/HTTP collector to export spans to (`http://host:4318`); none:
    /// no export. A client's W3C `traceparent` is then continued, and sent
    /// on to upstreams and to the instance that owns a generation.
    #[arg(long, env = "SLUICEGATE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// With `--otlp-endpoint`: the `service.name` of this instance's spans.
    #[arg(
        long,
        env = "SLUICEGATE_OTLP_SERVICE_NAME",
        default_value = "sluicegate"
    )]
    pub otlp_service_name: String,
}

/// Where scripts/fetch-model puts the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn default_model_path() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("sluicegate").join(DEFAULT_MODEL_FILE)
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write a duration with a unit, such as 500ms, 15s or 5m"))
}

impl Config {
    /// Cross-field checks, run once at startup.
    pub fn validate(&self) -> Result<(), String> {
        if self.keep_alive.is_zero() {
            return Err("--keep-alive must be longer than 0s".into());
        }
        if self.max_concurrent == Some(0) {
            return Err("--max-concurrent must be at least 1".into());
        }
        if self.worker_threads == Some(0) {
            return Err("--worker-threads must be at least 1".into());
        }
        if self.max_concurrent_per_key == Some(0) || self.max_queue_per_key == Some(0) {
            return Err(
                "--max-concurrent-per-key and --max-queue-per-key must be at least 1".into(),
            );
        }
        if let Some(bad) = self
            .cors_origins
            .iter()
            .find(|o| *o != "*" && axum::http::HeaderValue::from_str(o).is_err())
        {
            return Err(format!("--cors-origin {bad:?} is not a valid origin"));
        }
        if let Some(url) = &self.redis
            && ![
                "redis://",
                "rediss://",
                "redis+sentinel://",
                "redis+cluster://",
                "rediss+cluster://",
            ]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            return Err(
                "--redis must be a redis://, rediss://, redis+sentinel:// or redis+cluster:// URL"
                    .into(),
            );
        }
        if self.redis_lease < Duration::from_millis(300) {
            return Err("--redis-lease must be at least 300ms".into());
        }
        if self.redis_ca.is_some()
            && !self
                .redis
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss://"))
        {
            return Err("--redis-ca goes with a rediss:// --redis URL".into());
        }
        if self.redis_prefix.is_empty()
            || !self
                .redis_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(
                "--redis-prefix takes letters, digits, '-', '_' and '.' only, at least one".into(),
            );
        }
        if self.redis_timeout.is_zero() {
            return Err("--redis-timeout must be longer than 0s".into());
        }
        if self.step_tokens == 0 || self.kv_cache_memory == 0 {
            return Err("--step-tokens and --kv-cache-memory must be at least 1".into());
        }
        if self.max_log_bytes < 4096 {
            return Err("--max-log-bytes must be at least 4096".into());
        }
        for (flag, value) in [
            ("--header-read-timeout", self.header_read_timeout),
            ("--body-read-timeout", self.body_read_timeout),
            ("--idle-timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("{flag} must be longer than 0s"));
            }
        }
        if self.max_connections == Some(0) {
            return Err("--max-connections must be at least 1".into());
        }
        if self.max_body == 0 {
            return Err("--max-body must be at least 1 byte".into());
        }
        match self.backend {
            BackendKind::Echo | BackendKind::Local => Ok(()),
            BackendKind::Openai if self.upstreams.is_empty() => {
                Err("--backend openai needs at least one --upstream URL".into())
            }
            BackendKind::Openai => match self
                .upstreams
                .iter()
                .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
            {
                Some(bad) => Err(format!(
                    "--upstream {bad:?} must be an http:// or https:// URL"
                )),
                None => Ok(()),
            },
        }
    }

    /// The GGUF the local backend loads: `--model`, or the bundled model in
    /// the cache directory.
    pub fn model_path(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(default_model_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::try_parse_from(["sluicegate"]).expect("parses");
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8080));
        assert_eq!(c.backend, BackendKind::Local);
        assert_eq!(c.keep_alive, Duration::from_secs(15));
        assert_eq!(c.reattach_grace, Duration::from_secs(10));
        assert_eq!(c.resume_ttl, Duration::from_secs(300));
        assert_eq!(c.max_body, 1_048_576);
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.body_read_timeout, Duration::from_secs(30));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_connections, None);
        assert!(c.allowed_hosts.is_empty());
    }

    #[test]
    fn durations_take_units_and_keys_repeat() {
        let c = Config::try_parse_from([
            "sluicegate",
            "--backend",
            "echo",
            "--token-delay",
            "250ms",
            "--api-key",
            "a",
            "--api-key",
            "b,c",
        ])
        .expect("parses");
        assert_eq!(c.token_delay, Duration::from_millis(250));
        assert_eq!(c.api_keys, ["a", "b", "c"]);
        assert!(c.validate().is_ok());
        assert!(Config::try_parse_from(["sluicegate", "--keep-alive", "15"]).is_err());
    }
}
