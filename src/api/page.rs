//! `GET /`: the built-in chat page, compiled into the binary.

use axum::http::header;
use axum::response::{Html, IntoResponse};

const PAGE: &str = include_str!("../../web/index.html");

pub(crate) async fn index() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE))
}
