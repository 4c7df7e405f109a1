//! The contract every role implements, and what it is handed. A role module has:
//!
//! - `Config`: its own section of the configuration (`roles::Settings` holds them all);
//! - `build(config, deps) -> Result<State, RunError>`: the I/O of start-up (backends, mirrors,
//!   background tasks), binding nothing;
//! - `router(state)`: pure; and `service(state, ctx) -> Service`, what [`run`] serves;
//! - `openapi()`: the API document its router serves at `/openapi.json`;
//! - `names::describe()`: the descriptions of its own metrics.
//!
//! [`Deps`] carries what the process made once for every role: the context (shared config,
//! readiness, shutdown, metrics) and the auth handles with the process's one Redis command
//! connection. [`run`] is the one serve loop.

use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;

use crate::auth::Auth;
use crate::server::{self, Context, StartError};

/// Why a role stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A backend or the IdP could not be reached at start-up.
    #[error(transparent)]
    Unavailable(#[from] crate::backends::BackendError),
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<StartError> for RunError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Unavailable(e) => RunError::Unavailable(e),
            StartError::Invalid(message) => RunError::Other(anyhow::anyhow!(message)),
        }
    }
}

/// What a role is handed besides its own config: made once per process.
#[derive(Clone)]
pub struct Deps {
    /// The role's context: the shared configuration, readiness, shutdown, metrics.
    pub ctx: Context,
    /// Token verification, revocations, API keys, and the process's Redis command connection
    /// (`Auth::redis`); one per process (`access all` shares it between the roles).
    pub auth: Auth,
}

/// What [`run`] serves for a role.
pub struct Service {
    /// The role's routes.
    pub router: Router,
    /// The router's fallback is the role's own (the gateway's data routes), so the shared 404
    /// must not replace it.
    pub own_fallback: bool,
    /// Long-lived responses (WebSocket, SSE) the drain waits for: how many are still open.
    pub drained: Option<Arc<dyn Fn() -> usize + Send + Sync>>,
}

impl Service {
    /// A role whose responses all end by themselves.
    pub fn new(router: Router) -> Self {
        Service { router, own_fallback: false, drained: None }
    }
}

/// Serves a role on `listener` until shutdown, then drains: marks the role started (readiness),
/// wraps its routes in the shared layers and endpoints, and serves them.
pub async fn run(listener: TcpListener, service: Service, ctx: Context) -> Result<(), RunError> {
    ctx.readiness.mark_started();
    let app = if service.own_fallback {
        server::app_with_fallback(&ctx, service.router)
    } else {
        server::app(&ctx, service.router)
    };
    match &service.drained {
        None => server::serve(listener, app, &ctx).await.map_err(|e| RunError::Other(e.into())),
        Some(open) => {
            let left = open.clone();
            server::serve_until(listener, app, &ctx, move || left() == 0)
                .await
                .map_err(|e| RunError::Other(e.into()))?;
            if open() > 0 {
                tracing::warn!(role = %ctx.role, open = open(), "streams still open at the drain deadline");
            }
            Ok(())
        }
    }
}
