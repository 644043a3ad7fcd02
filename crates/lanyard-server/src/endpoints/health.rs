//! `health_address`: `/live` and `/ready` over plain HTTP, for probes that speak HTTP
//! (Kubernetes `httpGet`, load balancers), beside `grpc.health.v1` on the admin socket.
//!
//! - `/live`: 200 while the server's runtime answers requests at all. A server that cannot
//!   answer is restarted by whoever probes it; nothing else makes it "dead", because a
//!   restart fixes neither a full disk nor a lost database.
//! - `/ready`: 200 when the server can do its job, as SPIRE's readiness means it: the
//!   datastore takes writes (the probe write every 5 s, the one behind `grpc.health.v1`), and
//!   the CA has an active X.509 authority that has not expired and a JWT key. Otherwise 503,
//!   with the reason in the body.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

use super::Responder;
use crate::state::ServerState;

/// The server's `/live` and `/ready`.
#[derive(Debug)]
pub struct Health {
    state: Arc<ServerState>,
    datastore_writable: Arc<AtomicBool>,
}

impl Health {
    /// Readiness from `state`'s CA and `datastore_writable` (set by the datastore probe).
    pub fn new(state: Arc<ServerState>, datastore_writable: Arc<AtomicBool>) -> Self {
        Self {
            state,
            datastore_writable,
        }
    }

    /// Why the server is not ready, or `None` when it is.
    fn not_ready(&self) -> Option<&'static str> {
        if !self.datastore_writable.load(Ordering::Relaxed) {
            return Some("the datastore does not take writes");
        }
        let now = self.state.now();
        match self.state.ca.x509_ca() {
            None => return Some("no active X.509 authority"),
            Some(ca) if ca.not_after() <= now => return Some("the active X.509 authority expired"),
            Some(_) => {}
        }
        if self.state.ca.jwt_key().is_none() {
            return Some("no active JWT key");
        }
        None
    }
}

impl Responder for Health {
    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        match path {
            "/live" => plain(StatusCode::OK, "live\n".to_owned()),
            "/ready" => match self.not_ready() {
                None => plain(StatusCode::OK, "ready\n".to_owned()),
                Some(reason) => plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
            },
            _ => plain(StatusCode::NOT_FOUND, "not found\n".to_owned()),
        }
    }
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
