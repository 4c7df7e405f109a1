//! The OpenAPI documents every role serves at `/openapi.json`, generated from the handlers' own
//! `#[utoipa::path]` annotations as the routes are registered (utoipa-axum's `OpenApiRouter`),
//! so a route cannot exist without its documentation or the other way round.
//!
//! Every request and response body is a Rust type deriving its schema (`utoipa::ToSchema`), next
//! to the handler that reads or writes it, so the document says what the code sends. Shared
//! here: the error body (`ErrorBody`, from `crate::error`, with its closed `code` enum), the error
//! responses every operation may give, the bearer-token security scheme, the probes every role
//! serves, and [`undescribed_bodies`], which the tests use to keep every body described.

use std::collections::BTreeMap;

use utoipa::openapi::path::Operation;
use utoipa::openapi::request_body::RequestBody;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, RefOr, Response, ResponseBuilder};
use utoipa::ToSchema;

use crate::role::Role;

/// The error responses any operation may give (each with the `ErrorBody` schema).
pub struct Errors;

impl utoipa::IntoResponses for Errors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        [
            (400, "The request is malformed (invalid_request)"),
            (401, "No valid credential (unauthenticated, with a reason)"),
            (403, "Not allowed (forbidden)"),
            (404, "No such resource or route (not_found)"),
            (405, "Method not allowed on this route"),
            (408, "The request body did not arrive in time (request_timeout)"),
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
    let mut schemas = vec![(
        "ErrorBody".to_string(),
        <crate::error::ErrorBody<'static> as utoipa::PartialSchema>::schema(),
    )];
    <crate::error::ErrorBody<'static> as ToSchema>::schemas(&mut schemas);
    components.schemas.extend(schemas);
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

/// The operations of `doc` whose request or response bodies are not described: a body whose
/// schema is not a named type (a `$ref`, or an array of one), an operation that takes a body
/// without an example, a response schema that names no component, or a path or query
/// parameter without a type. Each as `"<METHOD> <path>: <what>"`; empty when every body is
/// described.
pub fn undescribed_bodies(doc: &OpenApi) -> Vec<String> {
    let components = doc.components.as_ref().map(|c| &c.schemas);
    let known = |name: &str| components.is_some_and(|c| c.contains_key(name));
    // A body is described when it names a component, directly, as the items of an array, or
    // as an optional body (`oneOf` the component and `null`).
    let described = |schema: &RefOr<utoipa::openapi::Schema>| -> Result<(), String> {
        let schema = match schema {
            RefOr::T(utoipa::openapi::Schema::OneOf(one)) => {
                let mut named = one.items.iter().filter(|s| !is_null(s));
                match (named.next(), named.next()) {
                    (Some(only), None) => only,
                    _ => return Err("is a oneOf of several bodies".to_string()),
                }
            }
            schema => schema,
        };
        let named = match schema {
            RefOr::Ref(r) => Some(r.ref_location.clone()),
            RefOr::T(utoipa::openapi::Schema::Array(array)) => match &array.items {
                utoipa::openapi::schema::ArrayItems::RefOrSchema(items) => match items.as_ref() {
                    RefOr::Ref(r) => Some(r.ref_location.clone()),
                    _ => None,
                },
                _ => None,
            },
            // Text bodies (the Prometheus exposition) are plain strings.
            RefOr::T(utoipa::openapi::Schema::Object(o))
                if matches!(
                    o.schema_type,
                    utoipa::openapi::schema::SchemaType::Type(utoipa::openapi::Type::String)
                ) =>
            {
                return Ok(())
            }
            _ => None,
        };
        match named {
            Some(location) => {
                let name = location.trim_start_matches("#/components/schemas/");
                if known(name) {
                    Ok(())
                } else {
                    Err(format!("refers to {location}, which is not in the document"))
                }
            }
            None => Err("is not a named type".to_string()),
        }
    };
    let mut problems = Vec::new();
    for (path, item) in &doc.paths.paths {
        let operations: [(&str, &Option<Operation>); 5] = [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("DELETE", &item.delete),
            ("PATCH", &item.patch),
        ];
        for (method, operation) in operations {
            let Some(op) = operation else { continue };
            let mut fail = |what: String| problems.push(format!("{method} {path}: {what}"));
            if let Some(RequestBody { content, .. }) = &op.request_body {
                for (media, c) in content {
                    match &c.schema {
                        Some(schema) => {
                            if let Err(e) = described(schema) {
                                fail(format!("the {media} request body {e}"));
                            }
                        }
                        None => fail(format!("the {media} request body has no schema")),
                    }
                    if c.example.is_none() && c.examples.is_empty() {
                        fail(format!("the {media} request body has no example"));
                    }
                }
            }
            for (status, response) in &op.responses.responses {
                let RefOr::T(response) = response else { continue };
                for (media, c) in &response.content {
                    match &c.schema {
                        Some(schema) => {
                            if let Err(e) = described(schema) {
                                fail(format!("the {status} {media} response {e}"));
                            }
                        }
                        None => fail(format!("the {status} {media} response has no schema")),
                    }
                }
            }
            for parameter in op.parameters.iter().flatten() {
                if parameter.schema.is_none() {
                    fail(format!("parameter {} has no type", parameter.name));
                }
            }
        }
    }
    problems
}

/// Whether `schema` is the `null` type (the other half of an optional body).
fn is_null(schema: &RefOr<utoipa::openapi::Schema>) -> bool {
    matches!(schema, RefOr::T(utoipa::openapi::Schema::Object(o))
        if matches!(o.schema_type, utoipa::openapi::schema::SchemaType::Type(utoipa::openapi::Type::Null)))
}

/// The schema of a struct that `#[serde(flatten)]`s a struct with the schema `base` beside its
/// own fields (`own`): one object with the properties and required fields of both (`own`'s win
/// on a name both have), closed to others when `base` is. utoipa's own rendering of `flatten` is an `allOf`,
/// which cannot hold a `base` that denies unknown fields (`additionalProperties: false` would
/// refuse `own`'s fields); this is what serde reads and writes.
pub fn flattened(
    base: RefOr<utoipa::openapi::Schema>,
    own: RefOr<utoipa::openapi::Schema>,
) -> RefOr<utoipa::openapi::Schema> {
    use utoipa::openapi::schema::Schema;
    match (base, own) {
        (RefOr::T(Schema::Object(mut base)), RefOr::T(Schema::Object(own))) => {
            for (name, property) in own.properties {
                base.properties.insert(name, property);
            }
            for name in own.required {
                if !base.required.contains(&name) {
                    base.required.push(name);
                }
            }
            base.description = own.description.or(base.description);
            base.examples = own.examples;
            RefOr::T(Schema::Object(base))
        }
        (_, own) => own,
    }
}
