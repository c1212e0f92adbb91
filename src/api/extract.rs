//! Extractors whose failures are `ApiError`s: the JSON body (with the
//! failing field named as `param`, read under the body-read timeout), path
//! and query parameters, the caller behind the API key, and the
//! `X-Session-Id` header.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::auth::KeyError;
use crate::session::CallerId;
use crate::state::AppState;

/// `Json<T>` whose every rejection is an OpenAI-shaped `ApiError`.
pub(crate) struct OpenAiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        // A client that stops sending mid-body must not hold the request.
        let limit = state.settings.body_read_timeout;
        let bytes = tokio::time::timeout(limit, Bytes::from_request(req, state))
            .await
            .map_err(|_| ApiError::BodyTimeout(limit))?
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(state.settings.max_body)
                } else {
                    ApiError::invalid(format!("Could not read the request body: {e}"), None)
                }
            })?;
        parse(&bytes).map(OpenAiJson)
    }
}

/// `Path<T>` whose rejection (an id that is not UTF-8, say) is an
/// OpenAI-shaped `ApiError`.
pub(crate) struct OpenAiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for OpenAiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(e) => Err(ApiError::invalid(
                format!("Invalid path: {}", e.body_text()),
                None,
            )),
        }
    }
}

/// `Query<T>` whose rejection (a repeated parameter, say) is an
/// OpenAI-shaped `ApiError`.
pub(crate) struct OpenAiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for OpenAiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(e) => Err(ApiError::invalid(
                format!("Invalid query string: {}", e.body_text()),
                None,
            )),
        }
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

/// Parses a body, naming the field that failed.
pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would read a struct from an array too; requests are objects.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::invalid("The body must be a JSON object.", None));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(format!("The body is not valid JSON: {inner}."), None)
        } else {
            ApiError::invalid(format!("Invalid value for `{path}`: {inner}."), path)
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid(format!("The body is not valid JSON: {e}."), None))?;
    Ok(value)
}

/// The authenticated caller of a request.
pub(crate) struct Caller(pub CallerId);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            // Anthropic's clients send the key in its own header.
            .or_else(|| {
                parts
                    .headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
            });
        let caller = state.keys.identify(presented).map_err(|e| {
            ApiError::Unauthorized(match e {
                KeyError::Missing => "Missing API key: send `Authorization: Bearer <key>`.",
                KeyError::Wrong => "Incorrect API key provided.",
            })
        })?;
        tracing::Span::current().record("caller", tracing::field::display(caller));
        Ok(Self(caller))
    }
}

/// The conversation named by `X-Session-Id`, if any.
pub(crate) struct SessionId(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for SessionId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get("x-session-id") else {
            return Ok(Self(None));
        };
        let session = value
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .ok_or_else(|| {
                ApiError::invalid(
                    "`X-Session-Id` must be 1 to 256 visible ASCII characters.",
                    Some("X-Session-Id".to_owned()),
                )
            })?;
        tracing::Span::current().record("session_id", session);
        Ok(Self(Some(session.to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::wire::CompletionRequest;

    #[test]
    fn type_errors_name_the_field() {
        let err = parse::<CompletionRequest>(br#"{"messages": [], "temperature": "hot"}"#)
            .expect_err("rejected");
        assert!(
            matches!(err, ApiError::InvalidRequest { param: Some(p), .. } if p == "temperature")
        );
        let err =
            parse::<CompletionRequest>(br#"{"messages": [{"role": 1}]}"#).expect_err("rejected");
        assert!(
            matches!(err, ApiError::InvalidRequest { param: Some(p), .. } if p == "messages[0].role")
        );
    }

    #[test]
    fn syntax_errors_and_trailing_bytes_are_rejected() {
        for body in [&b"{"[..], b"", b"{} x", b"\xff\xfe", b"[1,"] {
            let err = parse::<CompletionRequest>(body).expect_err("rejected");
            assert!(matches!(err, ApiError::InvalidRequest { param: None, .. }));
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = format!(
            "{{\"messages\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(parse::<CompletionRequest>(deep.as_bytes()).is_err());
    }
}
