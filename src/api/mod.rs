//! The HTTP surface: the route table only. Handlers translate between the
//! wire and `session`/`backend`; nothing outside `api` sees axum.

mod chat;
mod chunk;
mod control;
pub mod error;
mod extract;
pub mod head;
mod messages;
mod models;
mod page;
pub mod params;
mod responses;
mod run;
pub mod sse;
mod ui;
pub mod wire;

use axum::Router;
use axum::http::{Method, Uri};
use axum::routing::{get, post};

pub use error::ApiError;

use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/v1/chat/completions/{id}/cancel", post(control::cancel))
        .route("/v1/completions/{id}/cancel", post(control::cancel))
        .route("/v1/chat/completions/{id}/events", get(control::events))
        .route("/v1/completions/{id}/events", get(control::events))
        .route(
            "/v1/sessions/{session_id}/stream",
            get(control::session_stream),
        )
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route("/v1/responses/{id}/cancel", post(responses::cancel))
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items),
        )
        .merge(
            Router::new()
                .route("/v1/messages", post(messages::create))
                .route("/v1/messages/count_tokens", post(messages::count_tokens))
                .route_layer(axum::middleware::from_fn(messages::errors)),
        )
        .route("/v1/ui/chat", post(ui::chat))
        .route("/v1/ui/chat/{chat_id}/stream", get(ui::resume))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{model}", get(models::retrieve))
        .merge(
            // Only the page is compressed: a stream must reach the client
            // as each event is written.
            Router::new()
                .route("/", get(page::index))
                .route("/ui/{*path}", get(page::file))
                .layer(tower_http::compression::CompressionLayer::new()),
        )
        .route("/health", get(models::health))
        .route("/metrics", get(models::metrics))
        .fallback(|uri: Uri| async move { ApiError::RouteNotFound(uri.path().to_owned()) })
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::MethodNotAllowed(method.to_string())
        })
}
