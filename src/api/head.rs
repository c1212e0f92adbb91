//! Checks on a request's head before it is routed: sizes hyper lets through
//! but the server does not serve, `Host` on a server without keys (DNS
//! rebinding), and an `X-Request-Id` fit to echo and log.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::uri::Authority;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::state::AppState;

/// Longest path and query served. Longer ones up to hyper's buffer get a
/// JSON 414; beyond it hyper answers 431 itself.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most header bytes served (names, values and their framing). Up to
/// hyper's buffer (`transport::MAX_HEAD_BYTES`) they get a JSON 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Longest `X-Request-Id` kept; anything longer, or with other characters
/// than letters, digits and `-_.:`, is replaced by a fresh id.
const MAX_REQUEST_ID: usize = 128;

pub async fn check(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let uri_bytes = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_bytes > MAX_URI_BYTES {
        return ApiError::UriTooLong(MAX_URI_BYTES).into_response();
    }
    if header_bytes(req.headers()) > MAX_HEADER_BYTES {
        return ApiError::HeadersTooLarge(MAX_HEADER_BYTES).into_response();
    }
    if state.keys.is_empty()
        && let Some(host) = request_host(&req)
        && !host_allowed(&host, &state.settings.allowed_hosts)
    {
        tracing::warn!(host = %host.escape_debug(), "request for a foreign host refused");
        return ApiError::HostNotAllowed(host).into_response();
    }
    next.run(req).await
}

fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// The host the client addressed: HTTP/2's `:authority`, else `Host`,
/// without the port. `None` when the request names none (HTTP/1.0).
fn request_host(req: &Request) -> Option<String> {
    let authority = match req.uri().authority() {
        Some(authority) => authority.clone(),
        None => {
            let value = req.headers().get(axum::http::header::HOST)?;
            match Authority::try_from(value.as_bytes()) {
                Ok(authority) => authority,
                // Not a host at all: refused with what was sent.
                Err(_) => return Some(String::from_utf8_lossy(value.as_bytes()).into_owned()),
            }
        }
    };
    Some(authority.host().to_owned())
}

/// IP literals cannot be rebound; `localhost` names resolve to loopback
/// only; anything else must be listed.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || allowed
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('.').eq_ignore_ascii_case(&name))
}

/// Removes an `X-Request-Id` that is too long or not plain ASCII, so that
/// a fresh one is issued in its place.
pub async fn drop_unfit_request_id(mut req: Request) -> Request {
    let unfit = req
        .headers()
        .get("x-request-id")
        .is_some_and(|v| !fit_request_id(v.as_bytes()));
    if unfit {
        req.headers_mut().remove("x-request-id");
    }
    req
}

fn fit_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_cannot_be_rebound_are_allowed() {
        let listed = ["chat.internal".to_owned()];
        for host in [
            "127.0.0.1",
            "[::1]",
            "10.1.2.3",
            "localhost",
            "app.localhost",
            "Chat.Internal.",
        ] {
            assert!(host_allowed(host, &listed), "{host}");
        }
        for host in [
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "",
        ] {
            assert!(!host_allowed(host, &listed), "{host}");
        }
        assert!(host_allowed("anything.example", &["*".to_owned()]));
    }

    #[test]
    fn request_ids_are_short_plain_ascii() {
        assert!(fit_request_id(b"3f2c9a1e-77aa-4c1b-9d7e-0123456789ab"));
        assert!(fit_request_id(b"00-4bf92f3577b34da6-00f067aa0ba902b7-01"));
        assert!(!fit_request_id(b""));
        assert!(!fit_request_id(&[b'a'; MAX_REQUEST_ID + 1]));
        assert!(!fit_request_id("caf\u{e9}".as_bytes()));
        assert!(!fit_request_id(b"a b"));
    }
}
