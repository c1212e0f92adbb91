//! `GET /v1/models`, `GET /v1/models/{id}`, `GET /health` and `GET /metrics`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::error::ApiError;
use super::extract::Caller;
use super::wire::{ModelList, ModelObject};
use crate::backend::ModelCard;
use crate::state::AppState;
use crate::telemetry;

pub(crate) async fn list(
    State(state): State<AppState>,
    _: Caller,
) -> Result<Json<ModelList>, ApiError> {
    let cards = state.backend.models().await?;
    Ok(Json(ModelList {
        object: "list",
        data: cards
            .into_iter()
            .map(|c| object(c, state.started))
            .collect(),
    }))
}

pub(crate) async fn retrieve(
    State(state): State<AppState>,
    _: Caller,
    Path(id): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    let card = state
        .backend
        .models()
        .await?
        .into_iter()
        .find(|c| c.id == id)
        .ok_or(ApiError::ModelNotFound(id))?;
    Ok(Json(object(card, state.started)))
}

fn object(card: ModelCard, created: u64) -> ModelObject {
    ModelObject {
        id: card.id,
        object: "model",
        created,
        owned_by: card.owned_by,
        context_length: card.context_length,
    }
}

/// Liveness, 200 while the process serves; with `--redis`, whether Redis
/// answered the last command (an instance serves on without it).
pub(crate) async fn health(State(state): State<AppState>) -> Json<Value> {
    match &state.replicas {
        Some(replicas) => Json(json!({
            "status": "ok",
            "redis": if replicas.is_up() { "ok" } else { "unreachable" },
        })),
        None => Json(json!({"status": "ok"})),
    }
}

/// Prometheus text; gauges are read off the live state at scrape time.
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    telemetry::generation_load(state.admission.running(), state.admission.waiting());
    let registry = &state.registry;
    telemetry::retained(
        registry.len().saturating_sub(registry.running()),
        registry.retained_bytes(),
    );
    let body = state.metrics.as_ref().map(|handle| {
        handle.run_upkeep();
        handle.render()
    });
    let mut response = body.unwrap_or_default().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
