//! sluicegate: streams LLM tokens to chat frontends as OpenAI-compatible
//! Server-Sent Events.
//!
//! # Layout
//!
//! - [`config`]: flags and `SLUICEGATE_*` variables into a `Config`.
//! - [`server`]: `AppState`, the router and its layers, `run` with drain.
//! - [`api`]: the HTTP surface. Handlers extract, call and map; `api::sse`
//!   frames events, `api::run` starts generations and writes their logs;
//!   `api::page` serves the chat page from `web/`; `api::ui` answers the
//!   Vercel AI SDK's `useChat` by transcoding the same logs into its UI
//!   message stream.
//! - [`session`]: generations apart from connections: the registry that
//!   cancels a session's previous generation, the per-generation event log
//!   that every connection (and every resume) reads.
//! - [`backend`]: the `Backend` trait and its implementations: `echo`,
//!   `local` (a decode thread over [`model`]) and `upstream` (the `openai`
//!   backend, relaying to OpenAI-compatible servers).
//! - [`model`]: the GGUF llama decoder on candle, its tokenizer, chat
//!   template and sampler. Knows nothing of HTTP or of the server.
//! - [`tls`]: rustls config and a handshake-in-its-own-task listener.
//! - [`telemetry`]: tracing setup and every metric name.
//!
//! Dependencies point one way: `api` -> `session`, `backend`;
//! `backend::local` -> `model`.

pub mod api;
pub mod backend;
pub mod config;
pub mod model;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod tls;
