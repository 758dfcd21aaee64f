//! The CORS layer for the configured origins.

use axum::http::header;
use conveyor_config::CorsOrigins;

/// The CORS layer `origins` asks for (`http.cors_origins`, parsed and normalized when the
/// settings loaded), or `None` when it names none. Preflights are answered for a day; the
/// headers clients send and read are the API's own.
pub fn cors(origins: &CorsOrigins) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = match origins {
        CorsOrigins::None => return None,
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => AllowOrigin::list(list.iter().cloned()),
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                axum::http::Method::GET,
                axum::http::Method::HEAD,
                axum::http::Method::POST,
                axum::http::Method::PUT,
                axum::http::Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_NONE_MATCH,
                header::RANGE,
            ])
            .expose_headers([
                header::ETAG,
                header::LOCATION,
                header::RETRY_AFTER,
                header::CONTENT_RANGE,
            ])
            .max_age(std::time::Duration::from_secs(86_400)),
    )
}
