//! `metrics_address`: `GET /metrics` in the Prometheus text format over plain HTTP, on a
//! listener of its own with the bounds of every public endpoint (connections, header
//! time, request size). It says how busy the server is and when its CA expires, nothing
//! secret, but keep it on loopback or a private network all the same.

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use prometheus_client::registry::Registry;

use super::Responder;

/// The server's `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
}

impl Metrics {
    /// Serves `registry`, encoded at each request.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

impl Responder for Metrics {
    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        if path != "/metrics" {
            return super::text(StatusCode::NOT_FOUND, "not found");
        }
        exposition(&self.registry)
    }
}

/// A `200` response carrying `registry` in the Prometheus text format.
pub fn exposition(registry: &Registry) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(lanyard_metrics::encode(registry))));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(lanyard_metrics::CONTENT_TYPE),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;
    use crate::endpoints::body_of;

    #[test]
    fn serves_the_registry_at_metrics_only() {
        let mut registry = Registry::with_prefix("lanyard_server");
        let counter = Counter::<u64>::default();
        registry.register("things", "Things", counter.clone());
        counter.inc();
        let metrics = Metrics::new(Arc::new(registry));
        let response = metrics.respond("/metrics");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let body = String::from_utf8(body_of(response)).expect("UTF-8");
        assert!(body.contains("lanyard_server_things_total 1\n"), "{body}");
        assert_eq!(metrics.respond("/").status(), StatusCode::NOT_FOUND);
    }
}
