//! The 254Carbon Access Layer: the edge of the market-data platform, one binary with five roles.
//!
//! - [`cli`]: the subcommands; binds the listeners and maps outcomes to exit codes.
//! - [`config`]: typed, layered, validated configuration (figment; `ACCESS_*` env).
//! - [`error`]: the closed set of error codes and their one mapping to HTTP.
//! - [`telemetry`]: JSON logs, the Prometheus registry, metric names.
//! - [`server`]: what every role reuses: serve on a bound listener, health/readiness, shutdown,
//!   common layers.
//! - [`backends`]: Redis, PostgreSQL and Kafka connections with readiness checks.
//! - [`cache`]: bounded in-process caches with expiring entries (quick_cache).
//! - [`auth`]: in-process JWT verification, revocation, dev key, service tokens.
//! - [`role`]: the roles by name (labels, ports, service names).
//! - [`policy`]: the entitlement model every role decides with (rules, evaluation, mirror).
//! - [`ratelimit`]: GCRA rate-limit policies and limiters, in Redis or in-process.
//! - [`resource`]: resource templates (`instrument:{instrument_id}`) rendered from data.
//! - [`roles`]: the roles, each `Config -> build(config, deps) -> State -> service -> run`, and
//!   the one dispatch from a role to its module.
//! - [`usage`]: usage counts pushed to the metrics role (by the gateway and the stream).
//! - [`sample`]: the sample upstream and update publisher of `access all`.

pub mod auth;
pub mod backends;
pub mod cache;
pub mod cli;
pub mod config;
pub mod error;
pub mod policy;
pub mod ratelimit;
pub mod resource;
pub mod role;
pub mod roles;
pub mod sample;
pub mod server;
pub mod telemetry;
pub mod usage;
