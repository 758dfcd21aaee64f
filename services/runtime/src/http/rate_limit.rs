//! Per-key request rates: 429 with `Retry-After` past a key's rate and burst.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, bearer};

/// Per-key request rates (`auth.rate_per_sec`, `auth.rate_burst`): every request that
/// presents a valid key is counted against it, on this replica; past the rate and its burst
/// it gets 429 with `Retry-After`. Requests without a valid key are not counted here (they
/// get their 401 from the route, or read public media, which the CDN fronts).
pub struct RateLimit {
    keys: crate::keys::Keys,
    /// Keyed by the presented key's fingerprint: each key has its own rate, so one noisy
    /// key cannot starve its owner's others.
    limiter: Option<governor::DefaultKeyedRateLimiter<[u8; 32]>>,
}

impl RateLimit {
    /// A limit of `per_sec` requests per second per key on average, with bursts of up to
    /// `burst` requests (raised to `per_sec` when it is smaller), checking keys against
    /// `keys`. A `per_sec` of 0 turns the limit off: every request passes.
    pub fn new(keys: crate::keys::Keys, per_sec: u32, burst: u32) -> Arc<RateLimit> {
        let limiter = std::num::NonZeroU32::new(per_sec).map(|rate| {
            let burst = std::num::NonZeroU32::new(burst.max(per_sec)).unwrap_or(rate);
            governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst))
        });
        Arc::new(RateLimit { keys, limiter })
    }
}

/// The middleware for [`RateLimit`].
pub async fn rate_limit(State(limit): State<Arc<RateLimit>>, req: Request, next: Next) -> Response {
    use governor::clock::{Clock, DefaultClock};
    let Some(limiter) = &limit.limiter else {
        return next.run(req).await;
    };
    let verdict = bearer(req.headers())
        .filter(|key| limit.keys.identify(key).is_some())
        .map(|key| limiter.check_key(&crate::keys::fingerprint(key)));
    if let Some(Err(not_until)) = verdict {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        metrics::counter!("conveyor_rate_limited_total").increment(1);
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "this key is over its request rate; retry in {} s",
                seconds.max(1)
            ),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        return response;
    }
    next.run(req).await
}
