//! The agent's small plain-HTTP listeners (`health_address`, `metrics_address`): HTTP/1.1
//! (hyper), `GET` only, each answer a function of the path ([`Page`]). Bounded like the
//! server's public endpoints: at most [`MAX_CONNECTIONS`] connections (one more is closed
//! at accept), [`HEADER_READ_TIMEOUT`] to send each request's headers, request heads of at
//! most [`MAX_REQUEST_HEAD`] bytes, and no request body read.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Connections held at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// Time for a client to send its request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head read; hyper answers 431 beyond it.
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// What a listener answers to `GET path`.
pub trait Page: Send + Sync + 'static {
    /// The response to `GET path`.
    fn respond(&self, path: &str) -> Response<Full<Bytes>>;
}

/// Serves `page` on `listener` until `stopped`.
pub async fn serve(listener: TcpListener, page: Arc<dyn Page>, mut stopped: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|s| *s) => return,
        };
        let Ok((tcp, _)) = accepted else {
            // Out of descriptors or the like: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let page = Arc::clone(&page);
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = answer(&*page, request.method(), request.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD);
            let connection = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = connection => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
            drop(permit);
        });
    }
}

/// The answer to one request: `GET` only, then the page's.
pub fn answer(page: &dyn Page, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET {
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".to_owned(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    page.respond(path)
}

/// A plain-text response that caches nowhere.
pub fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Page for Fixed {
        fn respond(&self, path: &str) -> Response<Full<Bytes>> {
            plain(StatusCode::OK, path.to_owned())
        }
    }

    #[test]
    fn only_get_reaches_the_page() {
        assert_eq!(answer(&Fixed, &Method::GET, "/x").status(), StatusCode::OK);
        for method in [Method::POST, Method::HEAD, Method::PUT] {
            let response = answer(&Fixed, &method, "/x");
            assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(response.headers()[ALLOW], "GET");
        }
    }
}
