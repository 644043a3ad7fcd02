//! The server's public HTTP endpoints, each on a listener of its own and off unless
//! configured: the SPIFFE bundle endpoint ([`bundle`], `[federation.bundle_endpoint]`),
//! OIDC discovery ([`oidc`], `[oidc_discovery]`), and over plain HTTP the health checks
//! ([`health`], `health_address`) and the metrics ([`metrics`], `metrics_address`).
//!
//! HTTP/1.1 only (hyper), over TLS 1.3 or 1.2 (rustls on ring, ALPN `http/1.1`), or plain
//! HTTP for OIDC discovery behind a TLS-terminating proxy when the config says so. TLS 1.2 is
//! accepted because these endpoints serve anyone: SPIFFE Federation asks for Mozilla's
//! "intermediate" compatibility (F-5), which includes it, as SPIRE's `MinVersion` of TLS 1.2
//! does; rustls offers only ECDHE suites with AEAD ciphers there. Neither endpoint asks who
//! the client is (F-9).
//!
//! Bounds, so that the public cannot use up the server: at most `max_connections`
//! connections at once (one more is closed as soon as it is accepted); `header_read_timeout`
//! to finish the TLS handshake, and again to send each request's headers, which also closes a
//! kept-alive connection quiet for that long; request heads of at most 16 KiB (431 beyond);
//! `GET` only (405); a request body is never read, and one declared over 4 KiB, or of
//! unknown length, is refused (413). Responses are a few kilobytes, computed from memory.

pub mod bundle;
pub mod cert_files;
pub mod health;
pub mod metrics;
pub mod oidc;

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::ResolvesServerCert;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::listener::{Backoff, Throttle};

/// The largest request head (request line and headers) read; hyper answers 431 beyond it.
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// The largest request body a request may declare; it is never read either way.
pub const MAX_REQUEST_BODY: u64 = 4 * 1024;

/// How often a repeated problem (failed `accept`, connections over the cap) is logged.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The first pause after a failed `accept`, and the longest.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

/// What one endpoint's listener enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointLimits {
    /// Connections held at once.
    pub max_connections: usize,
    /// Time to finish the TLS handshake, and to send each request's headers.
    pub header_read_timeout: Duration,
}

/// How an endpoint's connections are carried.
#[derive(Debug, Clone)]
pub enum Transport {
    /// TLS with this configuration (see [`tls_config`]).
    Tls(Arc<rustls::ServerConfig>),
    /// Plain HTTP, for a TLS-terminating proxy in front (`insecure_http = true`).
    InsecureHttp,
}

/// The TLS configuration of a public endpoint: TLS 1.3 and 1.2, no client authentication,
/// ALPN `http/1.1`, the certificate `resolver` gives at each handshake (a rotating SVID or
/// reloaded files).
pub fn tls_config(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// What an endpoint answers to a `GET` of `path`: a function of the path and the state the
/// endpoint reads (the bundle), nothing else of the request.
pub trait Responder: Send + Sync + 'static {
    /// The response to `GET path`.
    fn respond(&self, path: &str) -> Response<Full<Bytes>>;
}

/// The answer to one request: the checks every endpoint shares (method, then body), then the
/// endpoint's own. `declared_body` is the most the request's body may hold, `None` when it
/// does not say (chunked).
pub fn answer(
    responder: &dyn Responder,
    method: &Method,
    path: &str,
    declared_body: Option<u64>,
) -> Response<Full<Bytes>> {
    if method != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    if declared_body.is_none_or(|length| length > MAX_REQUEST_BODY) {
        // The body is not read; the connection cannot carry another request after it.
        let mut response = text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    responder.respond(path)
}

/// A plain-text response.
pub fn text(status: StatusCode, message: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(message.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A `200` JSON response.
pub fn json(body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Serves `responder` on `listener` until `stopped`; `name` names the endpoint in logs.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    transport: Transport,
    limits: EndpointLimits,
    responder: Arc<dyn Responder>,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let acceptor = match &transport {
        Transport::Tls(config) => Some(tokio_rustls::TlsAcceptor::from(Arc::clone(config))),
        Transport::InsecureHttp => None,
    };
    let (backoff_start, backoff_max) = ACCEPT_BACKOFF;
    let mut backoff = Backoff::new(backoff_start, backoff_max);
    let mut accept_errors = Throttle::new(LOG_INTERVAL);
    let mut over_cap = Throttle::new(LOG_INTERVAL);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|s| *s) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => {
                backoff.reset();
                pair
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                if let Some(failures) = accept_errors.hit(Instant::now()) {
                    tracing::warn!(endpoint = name, %error, failures, retry_in = ?delay, "accepting connections failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            drop(tcp);
            if let Some(refused) = over_cap.hit(Instant::now()) {
                tracing::warn!(
                    endpoint = name,
                    refused,
                    limit = limits.max_connections,
                    "closing connections at once: too many open (max_connections)"
                );
            }
            continue;
        };
        let acceptor = acceptor.clone();
        let responder = Arc::clone(&responder);
        let stopped = stopped.clone();
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                serve_connection(tcp, limits, responder, stopped, slot).await;
                return;
            };
            match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => serve_connection(tls, limits, responder, stopped, slot).await,
                Ok(Err(error)) => {
                    tracing::debug!(endpoint = name, %peer, %error, "TLS handshake failed")
                }
                Err(_) => tracing::debug!(endpoint = name, %peer, "TLS handshake timed out"),
            }
        });
    }
}

/// HTTP/1.1 on one connection until the client or the server is done; `_slot` is its place
/// among `max_connections`, given back when this returns.
async fn serve_connection<S>(
    stream: S,
    limits: EndpointLimits,
    responder: Arc<dyn Responder>,
    mut stopped: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let declared_body = request.body().size_hint().upper();
        let response = answer(
            &*responder,
            request.method(),
            request.uri().path(),
            declared_body,
        );
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
        }
        _ = stopped.wait_for(|s| *s) => {}
    }
}

/// A response's body, for tests (a `Full` body is ready at once).
#[cfg(test)]
pub(crate) fn body_of(response: Response<Full<Bytes>>) -> Vec<u8> {
    use http_body_util::BodyExt as _;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    match runtime.block_on(response.into_body().collect()) {
        Ok(collected) => collected.to_bytes().to_vec(),
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Responder for Fixed {
        fn respond(&self, path: &str) -> Response<Full<Bytes>> {
            if path == "/" {
                json("{}")
            } else {
                text(StatusCode::NOT_FOUND, "not found")
            }
        }
    }

    #[test]
    fn only_get_without_a_large_body_reaches_the_endpoint() {
        let status = |method: Method, path: &str, body: Option<u64>| {
            answer(&Fixed, &method, path, body).status()
        };
        assert_eq!(status(Method::GET, "/", Some(0)), StatusCode::OK);
        assert_eq!(status(Method::GET, "/x", Some(0)), StatusCode::NOT_FOUND);
        // A small body is ignored.
        assert_eq!(
            status(Method::GET, "/", Some(MAX_REQUEST_BODY)),
            StatusCode::OK
        );
        for method in [Method::POST, Method::HEAD, Method::PUT, Method::DELETE] {
            let response = answer(&Fixed, &method, "/", Some(0));
            assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(response.headers()[ALLOW], "GET");
        }
        for body in [Some(MAX_REQUEST_BODY + 1), None] {
            let response = answer(&Fixed, &Method::GET, "/", body);
            assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
            assert_eq!(response.headers()[CONNECTION], "close");
        }
    }
}
