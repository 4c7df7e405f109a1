//! The five roles by name: the vocabulary every module uses for labels, ports and service
//! names. What each role does lives in `roles`; this module knows none of them.

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

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
