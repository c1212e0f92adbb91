//! sluicegate: streams LLM tokens to chat frontends as OpenAI-compatible
//! Server-Sent Events.
//!
//! # Layout
//!
//! - [`config`]: flags and `SLUICEGATE_*` variables into a `Config`.
//! - [`state`]: `AppState`, what every request reads; [`auth`]: API keys
//!   to callers; [`types`]: plain data that `backend` and `model` share.
//! - [`server`]: the router and its layers, the state a `Config` builds,
//!   `run` with drain.
//! - [`api`]: the HTTP surface. Handlers extract, call and map; `api::sse`
//!   frames events, `api::run` encodes what `session` runs;
//!   `api::page` serves the chat page from `web/`; `api::ui` answers the
//!   Vercel AI SDK's `useChat` by transcoding the same logs into its UI
//!   message stream, and `api::responses` (OpenAI's Responses API) and
//!   `api::messages` (Anthropic's Messages API) into theirs, over the
//!   chunk reading of `api::chunk`.
//! - [`session`]: generations apart from connections: admission and the
//!   run slot, the registry that cancels a session's previous generation,
//!   the per-generation event log that every connection (and every
//!   resume) reads by position, stored Responses API responses, and the
//!   replicas that share all of it through Redis (`session::replicas`:
//!   the key schema and scripts, the owner's mirror, the follower, leases
//!   and write-backs).
//! - [`backend`]: the `Backend` trait and its implementations: `echo`,
//!   `local` (a decode thread over [`model`]) and `upstream` (the `openai`
//!   backend, relaying to OpenAI-compatible servers).
//! - [`model`]: the GGUF llama decoder on candle, its tokenizer, chat
//!   template and sampler. Knows nothing of HTTP or of the server.
//! - [`transport`]: the accept loop and each connection's task: HTTP/1.1
//!   and h2c on one port, the connection cap, header-read and idle
//!   timeouts, closing connections after the drain.
//! - [`tls`]: the rustls config.
//! - [`telemetry`]: tracing setup and every metric name.
//!
//! Dependencies point one way: `server` -> `api` -> `state` -> `session`
//! -> `backend` -> `model` -> `types`; `auth` and `telemetry` are leaves
//! that many import.

pub mod api;
pub mod auth;
pub mod backend;
pub mod config;
pub mod model;
pub mod server;
pub mod session;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod types;
