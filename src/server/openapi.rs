//! The OpenAPI documents every role serves at `/openapi.json`, generated from the handlers' own
//! `#[utoipa::path]` annotations as the routes are registered (utoipa-axum's `OpenApiRouter`),
//! so a route cannot exist without its documentation or the other way round.
//!
//! Shared here: the error body of `docs/contracts.md`, the error responses every operation may
//! give, the bearer-token security scheme, and the probes every role serves.

use std::collections::BTreeMap;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, RefOr, Response, ResponseBuilder};
use utoipa::ToSchema;

use crate::roles::Role;

/// The JSON error body (`docs/contracts.md`, Errors).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// The stable error code (`forbidden`, `rate_limited`, ...).
    code: String,
    /// For a human.
    message: String,
    /// Which side failed: `client`, `upstream` or `internal`.
    side: Option<String>,
    /// Why, where one code has several causes (`expired`, `revoked`, ...).
    reason: Option<String>,
    /// The request field at fault.
    field: Option<String>,
    /// Seconds to wait before retrying (429, 503).
    retry_after: Option<u64>,
}

/// The error responses any operation may give (each with [`ErrorBody`]).
pub struct Errors;

impl utoipa::IntoResponses for Errors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        [
            (400, "The request is malformed (invalid_request)"),
            (401, "No valid credential (unauthenticated, with a reason)"),
            (403, "Not allowed (forbidden)"),
            (404, "No such resource or route (not_found)"),
            (405, "Method not allowed on this route"),
            (409, "Conflicts with the current state (conflict)"),
            (413, "The body is too large (payload_too_large)"),
            (415, "The body is not JSON"),
            (422, "The body is well-formed but invalid (validation_failed, with the field)"),
            (429, "Rate limited (rate_limited, with retry_after)"),
            (500, "An internal error (never its details)"),
            (502, "The upstream failed (upstream_unavailable)"),
            (503, "A dependency is unavailable, the circuit is open, or the role is shedding load"),
            (504, "The upstream timed out (upstream_timeout)"),
        ]
        .into_iter()
        .map(|(status, description)| {
            let content = ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name("ErrorBody"))))
                .build();
            let response = ResponseBuilder::new()
                .description(description)
                .content("application/json", content);
            (status.to_string(), RefOr::T(response.build()))
        })
        .collect()
    }
}

/// The base document of a role: its title, the security scheme, the shared schemas and probes.
pub fn base(role: Role) -> OpenApi {
    #[derive(utoipa::OpenApi)]
    #[openapi(
        paths(super::health, super::ready, super::render_metrics),
        components(schemas(ErrorBody)),
        info(license(name = "Apache-2.0"))
    )]
    struct Common;

    let mut doc = <Common as utoipa::OpenApi>::openapi();
    doc.info.title = format!("254Carbon Access Layer: {}", role.service_name());
    doc.info.description = Some(format!(
        "The {role} role's API. Errors are JSON bodies with a stable code (see ErrorBody)."
    ));
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build(),
        ),
    );
    doc
}

/// The role's router with its document served at `/openapi.json`: the routes and the document
/// come out of the same `OpenApiRouter`, so neither can drift from the other.
pub fn finish(routes: utoipa_axum::router::OpenApiRouter) -> axum::Router {
    let (router, doc) = routes.split_for_parts();
    let doc = std::sync::Arc::new(doc);
    router.route(
        "/openapi.json",
        axum::routing::get(move || {
            let doc = doc.clone();
            async move { axum::Json((*doc).clone()) }
        }),
    )
}
