//! The five roles, and the one dispatch from a role's name to its module. Each role lives in its
//! own module with the same contract (`common`): `Config` (its section) -> `build(config, deps)`
//! does the I/O and binds nothing -> `State` (cheap-clone handles) -> `router(state)` is pure ->
//! `service(state, ctx)` -> [`common::run`]; `openapi()` is the API document its router serves at
//! `/openapi.json`. Dependencies point one way: `cli` -> here -> each role -> `common` -> the
//! shared modules; no role imports another (`tests/layers.rs` checks it).

pub mod auth;
pub mod common;
pub mod entitlements;
pub mod gateway;
pub mod metrics;
pub mod stream;

use std::ops::{Deref, DerefMut};

use serde::Serialize;
use tokio::net::TcpListener;

use crate::config::{self, Extract, Problem};
pub use crate::role::Role;
use crate::server::Context;
pub use common::{Deps, RunError};

/// The whole configuration of one process: the shared sections ([`config::Config`], which this
/// derefs to) and every role's own.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Settings {
    /// What every role shares.
    #[serde(flatten)]
    pub shared: config::Config,
    /// The gateway role.
    pub gateway: gateway::Config,
    /// The stream role.
    pub stream: stream::Config,
    /// The entitlements role.
    pub entitlements: entitlements::Config,
    /// The metrics role.
    pub metrics: metrics::Config,
    /// The operator's console on the auth role.
    pub console: auth::console::Config,
}

impl Deref for Settings {
    type Target = config::Config;
    fn deref(&self) -> &config::Config {
        &self.shared
    }
}

impl DerefMut for Settings {
    fn deref_mut(&mut self) -> &mut config::Config {
        &mut self.shared
    }
}

impl Settings {
    /// The port a role listens on.
    pub fn port(&self, role: Role) -> u16 {
        match role {
            Role::Gateway => self.gateway.port,
            Role::Stream => self.stream.port,
            Role::Auth => self.shared.auth.port,
            Role::Entitlements => self.entitlements.port,
            Role::Metrics => self.metrics.port,
        }
    }
}

impl config::Sections for Settings {
    fn defaults() -> Self {
        Settings::default()
    }

    fn extract(mut shared: config::Config, from: &mut Extract<'_>) -> Self {
        let gateway: gateway::Config = from.section("gateway", gateway::Config::default());
        // The older `gateway.trusted_proxies` is still honoured: the same list as the server's.
        shared.server.trusted_proxies.extend(gateway.trusted_proxies.iter().copied());
        Settings {
            shared,
            gateway,
            stream: from.section("stream", stream::Config::default()),
            entitlements: from.section("entitlements", entitlements::Config::default()),
            metrics: from.section("metrics", metrics::Config::default()),
            console: from.section("console", auth::console::Config::default()),
        }
    }

    fn validate(&self) -> Vec<Problem> {
        let mut problems = self.shared.validate();
        problems.extend(crate::auth::devkey::config_problems(&self.shared.auth));
        problems.extend(self.entitlements.validate());
        problems.extend(self.metrics.validate());
        problems.extend(self.gateway.validate());
        problems.extend(self.stream.validate());
        problems.extend(self.console.validate());
        problems
    }

    fn open_maps() -> &'static [&'static str] {
        &["gateway.rate_limits", "gateway.upstreams", "gateway.upstream_tls"]
    }
}

/// Loads, type-checks and validates the whole configuration, or returns every problem found.
pub fn load(sources: &config::Sources) -> Result<Settings, config::ConfigErrors> {
    config::load::<Settings>(sources)
}

/// Describes the metrics a process running `role` exports: the shared modules' and the role's
/// own (each module describes its own names).
pub fn describe_metrics(role: Role) {
    crate::telemetry::describe();
    crate::backends::breaker::names::describe();
    crate::auth::token_source::names::describe();
    crate::auth::jwks::names::describe();
    crate::auth::verifier::names::describe();
    crate::policy::client::names::describe();
    crate::policy::mirror::names::describe();
    match role {
        Role::Gateway => gateway::names::describe(),
        Role::Stream => stream::names::describe(),
        Role::Auth => {}
        Role::Entitlements => entitlements::names::describe(),
        Role::Metrics => metrics::names::describe(),
    }
}

/// Builds the auth handles for the role's context, then [`start_with`].
pub async fn start(
    role: Role,
    listener: TcpListener,
    ctx: Context,
    settings: &Settings,
) -> Result<(), RunError> {
    let auth = crate::auth::Auth::build(&ctx).await?;
    start_with(role, listener, Deps { ctx, auth }, settings).await
}

/// The one dispatch from a role to its module: build the role's state from its own config and
/// the process's dependencies (I/O, no binding), then run it on the listener. `deps.auth` may be
/// shared (`access all` gives every role the same one, so the embedded revocations and API keys
/// are one set).
pub async fn start_with(
    role: Role,
    listener: TcpListener,
    deps: Deps,
    settings: &Settings,
) -> Result<(), RunError> {
    describe_metrics(role);
    let ctx = deps.ctx.clone();
    let service = match role {
        Role::Auth => auth::service(auth::build(&settings.console, &deps).await?, &ctx),
        Role::Entitlements => {
            entitlements::service(entitlements::build(&settings.entitlements, &deps).await?, &ctx)
        }
        Role::Metrics => metrics::service(metrics::build(&settings.metrics, &deps).await?, &ctx),
        Role::Gateway => gateway::service(gateway::build(&settings.gateway, &deps).await?, &ctx),
        Role::Stream => stream::service(stream::build(&settings.stream, &deps).await?, &ctx),
    };
    common::run(listener, service, ctx).await
}

/// The API document `role` serves at `/openapi.json` (built without a state).
pub fn openapi(role: Role) -> utoipa::openapi::OpenApi {
    match role {
        Role::Gateway => gateway::openapi(),
        Role::Stream => stream::openapi(),
        Role::Auth => auth::openapi(),
        Role::Entitlements => entitlements::openapi(),
        Role::Metrics => metrics::openapi(),
    }
}

#[cfg(test)]
mod config_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation of every role's document describes its bodies with named schemas, gives
    /// an example of each request body, and types its parameters; no body is left as `{}`.
    #[test]
    fn every_body_of_every_document_is_described() {
        for role in Role::ALL {
            let doc = openapi(role);
            assert!(!doc.paths.paths.is_empty(), "{role}: no operations");
            let problems = crate::server::openapi::undescribed_bodies(&doc);
            assert!(problems.is_empty(), "{role}:\n{}", problems.join("\n"));
        }
    }

    /// Every error response names the one error schema, whose `code` is the closed enum of
    /// `crate::error::ErrorCode`.
    #[test]
    fn errors_are_the_api_error_schema_with_its_code_enum() {
        for role in Role::ALL {
            let doc = serde_json::to_value(openapi(role)).unwrap();
            let schemas = &doc["components"]["schemas"];
            let codes = &schemas["ErrorCode"]["enum"];
            assert!(
                codes.as_array().is_some_and(|c| c.iter().any(|c| c == "rate_limited")),
                "{role}: {codes}"
            );
            assert_eq!(
                schemas["ErrorBody"]["properties"]["code"]["$ref"],
                "#/components/schemas/ErrorCode",
                "{role}"
            );
            for (path, item) in doc["paths"].as_object().unwrap() {
                for (method, op) in item.as_object().unwrap() {
                    for (status, response) in op["responses"].as_object().unwrap() {
                        if status.starts_with('4') || status.starts_with('5') {
                            let schema = &response["content"]["application/json"]["schema"];
                            if path != "/ready" {
                                assert_eq!(
                                    schema["$ref"], "#/components/schemas/ErrorBody",
                                    "{role} {method} {path} {status}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
