//! The platform's response envelope, request ids and errors.
//!
//! Every `/api/v1` response is
//! `{status, success, message, data | error{code, details}, timestamp, request_id}`.
//! Handlers return a [`Reply`] or an [`ApiError`]; the [`envelope`] middleware (outermost)
//! takes or makes the request id, enforces the request timeout, and wraps whatever came
//! back — including axum's own refusals (bad JSON, body too large, no such route) — so no
//! response leaves without the envelope. The one exception is a successful stream (the
//! page's Server-Sent Events, marked [`Streamed`]): its body goes out as it is, with the
//! request id. Refusals made before a request is read (a client over its connection
//! limit, [`super::server`]) are enveloped too.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use std::time::Duration;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id: the caller's `X-Request-ID` when it is sane, else a new one.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// A successful answer: what the envelope carries.
pub struct Reply {
    pub status: StatusCode,
    pub message: String,
    pub data: Value,
}

impl Reply {
    pub fn ok(message: impl Into<String>, data: impl Serialize) -> Reply {
        Reply::with_status(StatusCode::OK, message, data)
    }

    pub fn created(message: impl Into<String>, data: impl Serialize) -> Reply {
        Reply::with_status(StatusCode::CREATED, message, data)
    }

    pub fn with_status(
        status: StatusCode,
        message: impl Into<String>,
        data: impl Serialize,
    ) -> Reply {
        Reply {
            status,
            message: message.into(),
            data: serde_json::to_value(data).unwrap_or(Value::Null),
        }
    }
}

/// A refusal, with a stable machine-readable code.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Value,
    /// What went wrong inside (a driver's words): logged with the request id, never sent.
    pub internal: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Value::Null,
            internal: None,
        }
    }

    pub fn details(mut self, details: impl Serialize) -> ApiError {
        self.details = serde_json::to_value(details).unwrap_or(Value::Null);
        self
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
            message,
        )
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "CONFLICT", message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
    }

    /// Storage failed: the client hears "storage unavailable" (and the request id); the
    /// driver's text goes to the log with that id.
    pub fn storage(detail: impl std::fmt::Display) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "STORAGE_UNAVAILABLE",
            "storage unavailable",
        );
        e.internal = Some(detail.to_string());
        e
    }
}

/// The body of an envelope, before the request id and time are known.
#[derive(Clone)]
pub(super) enum Outcome {
    Reply { message: String, data: Value },
    Error(ApiError),
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        response.extensions_mut().insert(Outcome::Reply {
            message: self.message,
            data: self.data,
        });
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        response.extensions_mut().insert(Outcome::Error(self));
        response
    }
}

fn sane_request_id(value: &HeaderValue) -> Option<String> {
    let s = value.to_str().ok()?;
    (!s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| s.to_string())
}

fn new_request_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// A code for a response that no handler shaped (axum's own refusals).
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "BAD_REQUEST",
        StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
        StatusCode::FORBIDDEN => "FORBIDDEN",
        StatusCode::NOT_FOUND => "NOT_FOUND",
        StatusCode::METHOD_NOT_ALLOWED => "METHOD_NOT_ALLOWED",
        StatusCode::PAYLOAD_TOO_LARGE => "PAYLOAD_TOO_LARGE",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "UNSUPPORTED_MEDIA_TYPE",
        StatusCode::UNPROCESSABLE_ENTITY => "INVALID_BODY",
        StatusCode::TOO_MANY_REQUESTS => "RATE_LIMITED",
        s if s.is_server_error() => "INTERNAL_ERROR",
        _ => "ERROR",
    }
}

/// The outermost middleware: request id in and out, the time limit, the envelope.
pub async fn envelope(timeout: Duration, mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(sane_request_id)
        .unwrap_or_else(new_request_id);
    request.extensions_mut().insert(RequestId(id.clone()));
    let response = match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "REQUEST_TIMEOUT",
            format!("the request took longer than {timeout:?}"),
        )
        .into_response(),
    };
    let mut response = wrap(response, &id).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(&REQUEST_ID, v);
    }
    response
}

/// Marks a successful response whose body is a stream (Server-Sent Events): it goes out as
/// it is, with the request id. Its refusals are enveloped like any other.
#[derive(Debug, Clone, Copy)]
pub struct Streamed;

/// Puts a response into the envelope.
async fn wrap(response: Response, request_id: &str) -> Response {
    if response.status().is_success() && response.extensions().get::<Streamed>().is_some() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let outcome = match parts.extensions.remove::<Outcome>() {
        Some(o) => o,
        None => {
            // axum's own refusal: keep its text as the details.
            let text = axum::body::to_bytes(body, 64 * 1024)
                .await
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&text).into_owned();
            let status = parts.status;
            if status.is_success() {
                Outcome::Reply {
                    message: "ok".into(),
                    data: Value::String(text),
                }
            } else {
                let message = status.canonical_reason().unwrap_or("error").to_string();
                Outcome::Error(ApiError::new(status, code_for(status), message).details(text))
            }
        }
    };
    if let Outcome::Error(ApiError {
        internal: Some(detail),
        code,
        ..
    }) = &outcome
    {
        tracing::error!(request_id, code, detail = %detail, "request failed");
    }
    let body = body_of(parts.status, outcome, request_id);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body.to_string()))
}

/// A whole HTTP/1.1 response, in the envelope, for a refusal made before a request was read
/// (the connection limit per client); it closes the connection.
pub(crate) fn raw_response(e: ApiError) -> Vec<u8> {
    let id = new_request_id();
    let status = e.status;
    let body = body_of(status, Outcome::Error(e), &id).to_string();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         x-request-id: {id}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

/// The envelope's JSON.
fn body_of(status: StatusCode, outcome: Outcome, request_id: &str) -> Value {
    let timestamp = chrono::DateTime::from_timestamp_millis(crate::model::now_millis())
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    match outcome {
        Outcome::Reply { message, data } => json!({
            "status": status.as_u16(),
            "success": true,
            "message": message,
            "data": data,
            "timestamp": timestamp,
            "request_id": request_id,
        }),
        Outcome::Error(e) => json!({
            "status": status.as_u16(),
            "success": false,
            "message": e.message,
            "error": { "code": e.code, "details": e.details },
            "timestamp": timestamp,
            "request_id": request_id,
        }),
    }
}
