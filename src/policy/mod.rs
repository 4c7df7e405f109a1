//! The entitlement model every role shares (`docs/entitlements.md`): the actions and rules
//! ([`rules`]), their evaluation over an immutable snapshot ([`eval`]), the rules mirror the
//! gateway and the stream decide from ([`mirror`]), the client of the entitlements role
//! ([`client`]) and the rules board through which every replica reports the version it decides
//! at ([`board`]). The entitlements role stores and serves the rules; it and every other role
//! decide with this one model.

pub mod board;
pub mod client;
pub mod eval;
pub mod mirror;
pub mod rules;
