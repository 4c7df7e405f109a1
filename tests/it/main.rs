//! The one integration-test binary: black-box tests against real servers on 127.0.0.1:0, the
//! machine's Redis and PostgreSQL, and the tansu broker started by `tests/services.sh`.

mod all;
mod auth;
mod backends;
mod binary;
mod cache;
mod consistency;
mod console;
mod e2e;
mod edge;
mod entitlements;
mod faults;
mod faults_stream;
mod gateway;
mod idp;
mod live_rules;
mod metrics;
mod ratelimit;
mod redis_cluster;
mod redis_ha;
mod runtime;
mod sse;
mod stream;
mod support;
mod telemetry;
mod upstream_tls;
