//! `Caller`: the verified identity of a request, as an axum extractor.
//!
//! Reads `Authorization: Bearer <token>` and verifies it in-process. Identity headers sent by the
//! client (`X-User-Id` and friends) are never trusted.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use http::request::Parts;

use super::{AuthError, Reason, Verified, Verifier};
use crate::error::{ApiError, ErrorCode};

/// The verified caller.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Verified>);

impl Caller {
    /// Refuses with 403 unless the caller has `role`.
    pub fn require_role(&self, role: &str) -> Result<(), ApiError> {
        if self.0.identity.has_role(role) {
            Ok(())
        } else {
            Err(ApiError::new(ErrorCode::Forbidden, format!("this needs the {role} role")))
        }
    }

    /// Refuses with 403 unless the caller has one of `roles`.
    pub fn require_any_role(&self, roles: &[&str]) -> Result<(), ApiError> {
        if roles.iter().any(|role| self.0.identity.has_role(role)) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("this needs one of the roles {}", roles.join(", ")),
            ))
        }
    }
}

impl<S> FromRequestParts<S> for Caller
where
    Arc<Verifier>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let verifier = Arc::<Verifier>::from_ref(state);
        let header = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(AuthError::Rejected(Reason::Malformed))?;
        if !header.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("bearer ")) {
            return Err(AuthError::Rejected(Reason::Malformed).into());
        }
        Ok(Caller(verifier.verify(header).await?))
    }
}
