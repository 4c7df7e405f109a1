//! The closed set of error codes every role answers with, and their one mapping to HTTP.
//!
//! A handler returns [`ApiError`]; its `IntoResponse` is the only place a code becomes a status and
//! a JSON body `{"code", "message", ...}`. 5xx bodies carry a fixed message per code, never the
//! internal cause: the cause goes to the log (with the request id) and stays there.

use std::fmt;

use axum::extract::rejection::JsonRejection;
use axum::extract::FromRequest;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Stable, documented error codes (`docs/contracts.md`). Clients branch on these, so a code is
/// never renamed; new causes of an existing code go in `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is malformed (bad JSON, missing body, bad query).
    InvalidRequest,
    /// 401: no credentials, or credentials that do not verify; `reason` says why.
    Unauthenticated,
    /// 403: authenticated, but not entitled.
    Forbidden,
    /// 404: no such route or resource.
    NotFound,
    /// 405: the route exists, the method does not.
    MethodNotAllowed,
    /// 408: the client did not send its request body in time (`server.body_read_timeout`).
    RequestTimeout,
    /// 409: a conflicting change (stale version, a name used with two types).
    Conflict,
    /// 413: a body or header over the configured limit.
    PayloadTooLarge,
    /// 422: well-formed input that fails validation; `field` names the culprit.
    ValidationFailed,
    /// 429: over a rate limit; `retry_after` in seconds.
    RateLimited,
    /// 500: a bug or an unexpected state on our side.
    Internal,
    /// 502: the upstream refused or broke the connection.
    UpstreamUnavailable,
    /// 503: the upstream's circuit breaker is open.
    CircuitOpen,
    /// 503: a dependency of ours (Redis, PostgreSQL, Kafka, another role) is unavailable, or the
    /// server is shedding load.
    DependencyUnavailable,
    /// 504: the upstream did not answer in time.
    UpstreamTimeout,
}

impl ErrorCode {
    /// The HTTP status of this code; the table in `docs/contracts.md`.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::ValidationFailed => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            ErrorCode::CircuitOpen | ErrorCode::DependencyUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The wire name of the code (`"rate_limited"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::ValidationFailed => "validation_failed",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::CircuitOpen => "circuit_open",
            ErrorCode::DependencyUnavailable => "dependency_unavailable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// Which side failed, for the gateway's errors and logs: the caller, a dependency, or us.
    pub fn side(self) -> &'static str {
        match self {
            ErrorCode::UpstreamUnavailable
            | ErrorCode::UpstreamTimeout
            | ErrorCode::CircuitOpen => "upstream",
            ErrorCode::DependencyUnavailable => "dependency",
            ErrorCode::Internal => "internal",
            _ => "client",
        }
    }

    /// The message a 5xx answers with: fixed per code so nothing internal reaches the caller.
    fn public_message(self) -> &'static str {
        match self {
            ErrorCode::Internal => "internal error; the request id identifies it in our logs",
            ErrorCode::UpstreamUnavailable => "the upstream service is unavailable",
            ErrorCode::CircuitOpen => {
                "the upstream service is failing; its circuit breaker is open"
            }
            ErrorCode::DependencyUnavailable => "a dependency of this service is unavailable",
            ErrorCode::UpstreamTimeout => "the upstream service did not answer in time",
            _ => "request refused",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error a handler returns. Build it with the constructors; add a `reason`, `field` or
/// `retry_after` where the caller can act on it.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    reason: Option<&'static str>,
    field: Option<String>,
    retry_after: Option<u64>,
    /// A 5xx's public message with a detail from a closed set ([`ApiError::with_public_detail`]).
    public: Option<String>,
    /// The internal cause of a 5xx; logged, never sent.
    source: Option<anyhow::Error>,
}

/// The JSON body of every error response; published in every role's API document as the
/// `ErrorBody` schema (the name `tests/it/all.rs` checks).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(example = json!({"code": "validation_failed", "message": "name must be 1 to 200 characters", "field": "name", "side": "client"}))]
pub(crate) struct ErrorBody<'a> {
    /// The stable error code; its HTTP status is fixed (`docs/contracts.md`, Errors).
    code: ErrorCode,
    /// For a human: the given message for 4xx, a fixed one per code for 5xx.
    message: &'a str,
    /// Why, where one code has several causes: for `unauthenticated` `expired`,
    /// `not_yet_valid`, `bad_signature`, `unknown_key`, `wrong_issuer`, `wrong_audience`,
    /// `algorithm_not_allowed`, `malformed`, `revoked`, `missing_tenant`; for `invalid_request`
    /// `invalid_path`, `invalid_host`; for `rate_limited` `too_many_in_flight`,
    /// `too_many_connections`; for `dependency_unavailable` `overloaded`; for the metrics role's
    /// refusals the guard that refused (`invalid_name`, `series_cap`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    /// The request field at fault (`validation_failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    /// Seconds to wait before retrying (429, load-shed 503); also sent as `Retry-After`.
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
    /// Which side failed.
    #[schema(value_type = Side)]
    side: &'static str,
}

/// Which side failed, in an error body (the schema of `ErrorCode::side`'s values).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub(crate) enum Side {
    /// The caller (every 4xx).
    Client,
    /// The gateway's upstream (502, 504, `circuit_open`).
    Upstream,
    /// A dependency of the role (`dependency_unavailable`).
    Dependency,
    /// The role itself (500).
    Internal,
}

impl ApiError {
    /// An error with this code and a message for the caller (4xx) or for the log (5xx).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            reason: None,
            field: None,
            retry_after: None,
            public: None,
            source: None,
        }
    }

    /// 400 `invalid_request`.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    /// 422 `validation_failed` naming the field.
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ValidationFailed, message).with_field(field)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// 500 `internal`, keeping the cause for the log only.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        let cause = cause.into();
        Self::new(ErrorCode::Internal, cause.to_string()).with_source(cause)
    }

    /// 503 `dependency_unavailable` naming the dependency in the log only.
    pub fn dependency(name: &str, cause: impl Into<anyhow::Error>) -> Self {
        let cause = cause.into();
        Self::new(ErrorCode::DependencyUnavailable, format!("{name}: {cause}")).with_source(cause)
    }

    /// Adds the machine-readable cause within the code (`expired`, `revoked`, ...).
    pub fn with_reason(mut self, reason: &'static str) -> Self {
        self.reason = Some(reason);
        self
    }

    /// Names the offending input field.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Seconds after which a retry may succeed; also sent as `Retry-After`.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// Adds to a 5xx's fixed public message a detail the caller can act on. Only a `'static`
    /// string is taken, so that the detail comes from a closed set written in the code and never
    /// from an internal cause (`upstream_tls`: "the upstream's certificate has expired").
    pub fn with_public_detail(mut self, detail: &'static str) -> Self {
        self.public = Some(format!("{}: {detail}", self.code.public_message()));
        self
    }

    /// Keeps an internal cause for the log.
    pub fn with_source(mut self, source: anyhow::Error) -> Self {
        self.source = Some(source);
        self
    }

    /// The code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The reason within the code, if any.
    pub fn reason(&self) -> Option<&'static str> {
        self.reason
    }

    /// The caller-facing message: the given one for 4xx, a fixed one for 5xx.
    pub fn public_message(&self) -> &str {
        if self.code.status().is_server_error() {
            self.public.as_deref().unwrap_or(self.code.public_message())
        } else {
            &self.message
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        if status.is_server_error() {
            tracing::error!(code = %self.code, side = self.code.side(), error = %self.message,
                cause = ?self.source, "request failed");
        }
        let body = ErrorBody {
            code: self.code,
            message: self.public_message(),
            reason: self.reason,
            field: self.field.as_deref(),
            retry_after: self.retry_after,
            side: self.code.side(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large")
            }
            StatusCode::UNPROCESSABLE_ENTITY => {
                // serde's message names the field ("missing field `token` at line 1 column 2").
                let text = rejection.body_text();
                let field = field_from_serde_message(&text).unwrap_or_else(|| "body".into());
                ApiError::validation(field, text)
            }
            _ => ApiError::invalid_request(rejection.body_text()),
        }
    }
}

/// The field a JSON body error is about. axum reports serde_path_to_error's form,
/// "...target type: <path>: <serde message>", where the path is "." at the root; serde's own
/// message names a missing or unknown field in backticks. Both are combined
/// (`conditions[0].operator`).
fn field_from_serde_message(message: &str) -> Option<String> {
    let rest = message.split_once("target type: ").map_or(message, |(_, r)| r);
    let (path, detail) = match rest.split_once(": ") {
        Some((path, detail)) if !path.contains(' ') => (Some(path).filter(|p| *p != "."), detail),
        _ => (None, rest),
    };
    let named = ["missing field `", "unknown field `"].iter().find_map(|lead| {
        let start = detail.find(lead)? + lead.len();
        let end = start + detail[start..].find('`')?;
        Some(&detail[start..end])
    });
    match (path, named) {
        (Some(p), Some(n)) => Some(format!("{p}.{n}")),
        (Some(p), None) => Some(p.to_string()),
        (None, Some(n)) => Some(n.to_string()),
        (None, None) => None,
    }
}

/// `axum::Json`, but its rejections are [`ApiError`]s, so a bad body gets the project's error body.
#[derive(Debug, Clone, Copy, Default, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// The result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(err: ApiError) -> (StatusCode, serde_json::Value, Option<String>) {
        let response = err.into_response();
        let status = response.status();
        let retry = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap(), retry)
    }

    #[tokio::test]
    async fn every_code_maps_to_its_documented_status() {
        let table = [
            (ErrorCode::InvalidRequest, 400),
            (ErrorCode::Unauthenticated, 401),
            (ErrorCode::Forbidden, 403),
            (ErrorCode::NotFound, 404),
            (ErrorCode::MethodNotAllowed, 405),
            (ErrorCode::RequestTimeout, 408),
            (ErrorCode::Conflict, 409),
            (ErrorCode::PayloadTooLarge, 413),
            (ErrorCode::ValidationFailed, 422),
            (ErrorCode::RateLimited, 429),
            (ErrorCode::Internal, 500),
            (ErrorCode::UpstreamUnavailable, 502),
            (ErrorCode::CircuitOpen, 503),
            (ErrorCode::DependencyUnavailable, 503),
            (ErrorCode::UpstreamTimeout, 504),
        ];
        for (code, status) in table {
            let (got, body, _) = body_of(ApiError::new(code, "m")).await;
            assert_eq!(got.as_u16(), status, "{code}");
            assert_eq!(body["code"], code.as_str());
            // The serde name and the hand-written name must agree.
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }

    #[tokio::test]
    async fn server_errors_never_carry_the_internal_cause() {
        let err = ApiError::internal(anyhow::anyhow!("password=hunter2 at db.internal:5432"));
        let (status, body, _) = body_of(err).await;
        assert_eq!(status, 500);
        let text = body.to_string();
        assert!(!text.contains("hunter2") && !text.contains("db.internal"), "{text}");
        assert_eq!(body["side"], "internal");
    }

    #[tokio::test]
    async fn client_errors_carry_reason_field_and_retry_after() {
        let err = ApiError::new(ErrorCode::RateLimited, "slow down").with_retry_after(7);
        let (status, body, retry) = body_of(err).await;
        assert_eq!(status, 429);
        assert_eq!(body["retry_after"], 7);
        assert_eq!(retry.as_deref(), Some("7"));

        let err = ApiError::new(ErrorCode::Unauthenticated, "token expired").with_reason("expired");
        let (_, body, _) = body_of(err).await;
        assert_eq!(body["reason"], "expired");
        assert_eq!(body["message"], "token expired");

        let (_, body, _) = body_of(ApiError::validation("effect", "bad")).await;
        assert_eq!(body["field"], "effect");
    }

    #[test]
    fn serde_field_names_are_extracted() {
        let table = [
            ("missing field `token` at line 1 column 2", Some("token")),
            ("Failed to deserialize the JSON body into the target type: missing field `name` at line 1", Some("name")),
            (
                "Failed to deserialize the JSON body into the target type: conditions[0].operator: unknown variant `resembles`, expected one of `equals`",
                Some("conditions[0].operator"),
            ),
            ("Failed to deserialize the JSON body into the target type: conditions[0]: missing field `field` at line 1", Some("conditions[0].field")),
            ("Failed to deserialize the JSON body into the target type: .: unknown field `nope`", Some("nope")),
            ("no backticks", None),
        ];
        for (message, field) in table {
            assert_eq!(field_from_serde_message(message).as_deref(), field, "{message}");
        }
    }
}
