//! The five roles. Each lives in its own module with the same contract:
//! `Config` (data) -> `build(config, ctx)` does I/O and binds nothing -> `State` (cheap-clone
//! handles) -> `router(state)` is pure -> `run(listener, state, ctx)`; `openapi()` is the API
//! document its router serves at `/openapi.json`.

pub mod auth;
pub mod entitlements;
pub mod gateway;
pub mod metrics;
pub mod stream;

use std::fmt;

use serde::Serialize;

/// A role of the `access` binary, chosen by subcommand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// REST reverse proxy (port 8000).
    Gateway,
    /// Kafka to WebSocket/SSE fan-out (port 8001).
    Stream,
    /// JWT verification, revocation, user info (port 8010).
    Auth,
    /// Access rules and decisions (port 8011).
    Entitlements,
    /// Pushed metrics, exported to Prometheus (port 8012).
    Metrics,
}

impl Role {
    /// Every role, in the order `access all` starts them.
    pub const ALL: [Role; 5] =
        [Role::Auth, Role::Entitlements, Role::Metrics, Role::Gateway, Role::Stream];

    /// The subcommand and config-section name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Stream => "stream",
            Role::Auth => "auth",
            Role::Entitlements => "entitlements",
            Role::Metrics => "metrics",
        }
    }

    /// The port of `docs/contracts.md`.
    pub fn default_port(self) -> u16 {
        match self {
            Role::Gateway => 8000,
            Role::Stream => 8001,
            Role::Auth => 8010,
            Role::Entitlements => 8011,
            Role::Metrics => 8012,
        }
    }

    /// The service name reported by `/health` and in traces.
    pub fn service_name(self) -> &'static str {
        match self {
            Role::Gateway => "access-gateway",
            Role::Stream => "access-stream",
            Role::Auth => "access-auth",
            Role::Entitlements => "access-entitlements",
            Role::Metrics => "access-metrics",
        }
    }
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

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
