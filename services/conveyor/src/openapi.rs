//! The OpenAPI 3.1 document of Conveyor's HTTP API, generated from the handlers' own
//! annotations (`utoipa`): each crate describes its routes, and this joins them and adds what
//! holds for all of them. `GET /openapi.json` serves it, `conveyor openapi` prints it, and
//! `schemas/openapi.json` is the checked-in copy a test holds both to.

use utoipa::OpenApi;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{Object, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};

/// The whole API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Conveyor",
        description = "Uploads, media read models and events. Every response that is not a \
            success is `{\"error\": {\"code\", \"message\"}}` (`ErrorBody`), whatever answered \
            it. Clients authenticate with `Authorization: Bearer <key>`: a client key names an \
            owner; internal producers use a service key.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "media", description = "Uploads, reads and deletes of media items"),
        (name = "uploads", description = "Direct uploads: the bytes go straight to storage"),
        (name = "events", description = "The intake for internal producers"),
        (name = "operations", description = "Health, readiness and metrics"),
    ),
    components(schemas(conveyor_runtime::http::ErrorBody)),
)]
struct ConveyorApi;

/// What every route shares: the two key schemes, and the answers any `/v1` or `/media` route
/// may give whatever its handler does (503 when a backend is down).
struct Shared;

impl utoipa::Modify for Shared {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        let bearer = |what: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(what.to_owned());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme(
            "client_key",
            bearer("A client key, naming its owner: issued by `conveyor ops keys create`, or configured in `auth.api_keys`"),
        );
        components.add_security_scheme(
            "service_key",
            bearer("An internal producer's key: issued by `conveyor ops keys create --service`, or configured in `auth.service_keys`"),
        );
        // An error answer that says, in `Retry-After`, when to try again.
        let retry_after = |description: &str, wait: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(RefOr::Ref(Ref::from_schema_name("ErrorBody"))))
                        .build(),
                )
                .header(
                    "retry-after",
                    utoipa::openapi::HeaderBuilder::new()
                        .schema(Object::with_type(Type::String))
                        .description(Some(wait))
                        .build(),
                )
                .build()
        };
        let rate_limited = retry_after(
            "This key is over its request rate (`auth.rate_per_sec`)",
            "Seconds until a request would be allowed",
        );
        let unavailable = retry_after(
            "A backend is unavailable; retry after `Retry-After` seconds",
            "Seconds to wait before retrying",
        );
        for (path, item) in api.paths.paths.iter_mut() {
            let backed = path.starts_with("/v1/") || path.starts_with("/media/");
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                let responses = &mut operation.responses.responses;
                // Any request that presents a valid key counts against its rate.
                responses.insert("429".into(), RefOr::T(rate_limited.clone()));
                if backed {
                    responses.insert("503".into(), RefOr::T(unavailable.clone()));
                }
            }
        }
    }
}

/// Each crate's part of the document.
fn parts() -> [utoipa::openapi::OpenApi; 4] {
    [
        ConveyorApi::openapi(),
        conveyor_runtime::http::OpsApi::openapi(),
        conveyor_ingest::IngestApi::openapi(),
        conveyor_query::QueryApi::openapi(),
    ]
}

/// The document, as served at `/openapi.json`.
pub fn document() -> utoipa::openapi::OpenApi {
    let [mut api, rest @ ..] = parts();
    for part in rest {
        api.merge(part);
    }
    utoipa::Modify::modify(&Shared, &mut api);
    api
}

/// The document as pretty JSON with a final newline: the form checked in as
/// `schemas/openapi.json`.
pub fn to_json() -> String {
    let mut text = document()
        .to_pretty_json()
        .expect("the document serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    /// Schemas are named by their Rust type's name alone, and merging keeps the first of two
    /// with one name. (Within one crate the last wins silently, as when a `Deleted` response
    /// was documented with the `Deleted` event's body; schemathesis found that one.)
    #[test]
    fn no_two_schemas_share_a_name() {
        let mut seen: HashMap<String, String> = HashMap::new();
        for part in super::parts() {
            for (name, schema) in part.components.into_iter().flat_map(|c| c.schemas) {
                let text = serde_json::to_string(&schema).unwrap();
                if let Some(before) = seen.insert(name.clone(), text.clone()) {
                    assert_eq!(before, text, "two different schemas are named {name}");
                }
            }
        }
    }
}
