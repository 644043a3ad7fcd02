//! gRPC call metrics as a tower layer over a tonic router: a count and a latency histogram
//! per listener, service, method and status code.
//!
//! A gRPC status travels in the response headers when a call fails before answering
//! ("trailers-only") and otherwise in the trailers after the last message, so a call is
//! recorded when its response body ends: at the trailers, at the end of a body without
//! them (`Unknown`), or when the body is dropped before either (`Canceled`: the client
//! went away). A stream's latency is therefore its whole life.
//!
//! The `service` and `method` labels come only from the methods the process serves (the
//! descriptor set it was built from, plus any named); any other path, which a client may
//! make up, is counted as `unknown`, so clients cannot grow the number of series.
//!
//! Cost per call: one `Instant::now`, a hash lookup of the path, two family lookups (a
//! read lock each, never held across an await) and a histogram observation; no allocation
//! once a label set has been seen.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::{EncodeLabel as _, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use prost::Message as _;
use tower::{Layer, Service};

use crate::{LATENCY_BUCKETS, grpc_code_name};

/// The label value of a path that names no method served here.
pub const UNKNOWN: &str = "unknown";

/// The gRPC methods a process serves: `/package.Service/Method` → its labels.
#[derive(Debug, Clone, Default)]
pub struct GrpcMethods {
    by_path: HashMap<Box<str>, MethodLabels>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MethodLabels {
    service: Arc<str>,
    method: Arc<str>,
}

impl GrpcMethods {
    /// Every method of every service in an encoded `FileDescriptorSet`.
    pub fn from_descriptor_set(encoded: &[u8]) -> Result<Self, prost::DecodeError> {
        let set = prost_types::FileDescriptorSet::decode(encoded)?;
        let mut methods = Self::default();
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                let service_name = if package.is_empty() {
                    service.name().to_owned()
                } else {
                    format!("{package}.{}", service.name())
                };
                let names: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
                methods = methods.with_service(&service_name, &names);
            }
        }
        Ok(methods)
    }

    /// These methods of `service` (its full name) too.
    pub fn with_service(mut self, service: &str, methods: &[&str]) -> Self {
        let service_label: Arc<str> = Arc::from(service);
        for method in methods {
            self.by_path.insert(
                format!("/{service}/{method}").into_boxed_str(),
                MethodLabels {
                    service: Arc::clone(&service_label),
                    method: Arc::from(*method),
                },
            );
        }
        self
    }

    /// How many methods are known.
    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    /// Whether no method is known.
    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }

    fn labels(&self, path: &str) -> MethodLabels {
        self.by_path.get(path).cloned().unwrap_or_else(|| {
            let unknown: Arc<str> = Arc::from(UNKNOWN);
            MethodLabels {
                service: Arc::clone(&unknown),
                method: unknown,
            }
        })
    }
}

/// The labels of one series: `listener` (when the process serves on several), `service`,
/// `method` and `code`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RpcLabels {
    listener: Option<&'static str>,
    service: Arc<str>,
    method: Arc<str>,
    code: &'static str,
}

impl EncodeLabelSet for RpcLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        if let Some(listener) = self.listener {
            ("listener", listener).encode(encoder.encode_label())?;
        }
        ("service", &*self.service).encode(encoder.encode_label())?;
        ("method", &*self.method).encode(encoder.encode_label())?;
        ("code", self.code).encode(encoder.encode_label())
    }
}

/// The call counter and latency histogram of one process.
pub struct RpcMetrics {
    methods: GrpcMethods,
    calls: Family<RpcLabels, Counter>,
    durations: Family<RpcLabels, Histogram, fn() -> Histogram>,
}

impl fmt::Debug for RpcMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcMetrics")
            .field("methods", &self.methods.len())
            .finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl RpcMetrics {
    /// Registers `rpc_calls_total` and `rpc_duration_seconds` in `registry`, labelled with
    /// `methods`.
    pub fn register(registry: &mut Registry, methods: GrpcMethods) -> Arc<Self> {
        let metrics = Arc::new(Self {
            methods,
            calls: Family::default(),
            durations: Family::new_with_constructor(latency_histogram),
        });
        registry.register(
            "rpc_calls",
            "gRPC calls ended, by service, method and status code",
            metrics.calls.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "Time from a gRPC call's request to its status (a stream's whole life), by \
             service, method and status code",
            metrics.durations.clone(),
        );
        metrics
    }

    /// A layer recording the calls of a router served on `listener` (`None` when the
    /// process serves one).
    pub fn layer(self: &Arc<Self>, listener: Option<&'static str>) -> RpcMetricsLayer {
        RpcMetricsLayer {
            metrics: Some(Arc::clone(self)),
            listener,
        }
    }

    fn record(&self, call: &CallStart, code: i32) {
        let labels = RpcLabels {
            listener: call.listener,
            service: Arc::clone(&call.method.service),
            method: Arc::clone(&call.method.method),
            code: grpc_code_name(code),
        };
        self.calls.get_or_create(&labels).inc();
        self.durations
            .get_or_create(&labels)
            .observe(call.started.elapsed().as_secs_f64());
    }
}

/// The tower layer; [`RpcMetricsLayer::off`] passes calls through unrecorded, so that a
/// router has one type whether metrics are on or not.
#[derive(Debug, Clone, Default)]
pub struct RpcMetricsLayer {
    metrics: Option<Arc<RpcMetrics>>,
    listener: Option<&'static str>,
}

impl RpcMetricsLayer {
    /// A layer that records nothing.
    pub fn off() -> Self {
        Self::default()
    }
}

impl RpcMetricsLayer {
    /// Starts recording a call to `path` that a server answers itself, outside the layer.
    pub fn start_call(&self, path: &str) -> CallRecord {
        CallRecord(Recorder(self.call_start(path)))
    }

    fn call_start(&self, path: &str) -> Option<CallStart> {
        self.metrics.as_ref().map(|metrics| CallStart {
            metrics: Arc::clone(metrics),
            listener: self.listener,
            method: metrics.methods.labels(path),
            started: Instant::now(),
        })
    }
}

/// A call recorded outside [`RpcMetricsLayer`]: with its status code when finished, or as
/// canceled when dropped unfinished (the client went away).
pub struct CallRecord(Recorder);

impl CallRecord {
    /// Records the call as ended with the gRPC status `code`.
    pub fn finish(mut self, code: i32) {
        self.0.finish(code);
    }
}

impl fmt::Debug for CallRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallRecord")
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around a router.
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    layer: RpcMetricsLayer,
}

/// A call under way: what it will be recorded as, and since when.
struct CallStart {
    metrics: Arc<RpcMetrics>,
    listener: Option<&'static str>,
    method: MethodLabels,
    started: Instant,
}

impl CallStart {
    fn finish(self, code: i32) {
        self.metrics.record(&self, code);
    }
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for RpcMetricsService<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    ResponseBody: Body,
{
    type Response = http::Response<MeteredBody<ResponseBody>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let call = self.layer.call_start(request.uri().path());
        MeteredFuture {
            inner: self.inner.call(request),
            call,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RpcMetricsService`].
    pub struct MeteredFuture<F> {
        #[pin]
        inner: F,
        call: Option<CallStart>,
    }
}

impl<F> fmt::Debug for MeteredFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeteredFuture")
    }
}

impl<F, ResponseBody, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<http::Response<ResponseBody>, E>>,
    ResponseBody: Body,
{
    type Output = Result<http::Response<MeteredBody<ResponseBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only response carries the status in its headers.
                if let Some(code) = grpc_status(response.headers())
                    && let Some(call) = call.take()
                {
                    call.finish(code);
                }
                Ok(response.map(|inner| MeteredBody {
                    inner,
                    call: Recorder(call),
                }))
            }
            Err(error) => {
                if let Some(call) = call {
                    call.finish(2);
                }
                Err(error)
            }
        })
    }
}

/// Records a call not yet recorded when dropped: the client went away.
struct Recorder(Option<CallStart>);

impl Recorder {
    fn finish(&mut self, code: i32) {
        if let Some(call) = self.0.take() {
            call.finish(code);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Canceled.
        self.finish(1);
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call when the status goes by.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Recorder,
    }
}

impl<B> fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeteredBody")
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    // Unknown when the trailers carry no status.
                    this.call.finish(grpc_status(trailers).unwrap_or(2));
                }
            }
            Some(Err(_)) => this.call.finish(2),
            None => this.call.finish(2),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc-status` in `headers`, if any; a value that is not a number is `Unknown`.
fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    let value = headers.get("grpc-status")?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(2),
    )
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::task::Waker;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::encode;

    /// A body of one data frame and, optionally, trailers.
    struct TestBody {
        frames: Vec<Frame<&'static [u8]>>,
    }

    impl Body for TestBody {
        type Data = &'static [u8];
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            if self.frames.is_empty() {
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Ok(self.frames.remove(0))))
        }
    }

    fn response(headers: &[(&str, &str)], trailers: Option<&str>) -> http::Response<TestBody> {
        let mut frames = vec![Frame::data(&b"message"[..])];
        if let Some(code) = trailers {
            let mut map = http::HeaderMap::new();
            map.insert(
                "grpc-status",
                http::HeaderValue::from_str(code).expect("a header value"),
            );
            frames.push(Frame::trailers(map));
        }
        let mut builder = http::Response::builder();
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(TestBody { frames }).expect("a response")
    }

    /// Calls `service` with `path` and reads the body to its end (or drops it at once).
    fn call<S>(service: &mut S, path: &str, read_body: bool)
    where
        S: Service<
                http::Request<()>,
                Response = http::Response<MeteredBody<TestBody>>,
                Error = Infallible,
            >,
    {
        let mut cx = Context::from_waker(Waker::noop());
        let request = http::Request::builder()
            .uri(path)
            .body(())
            .expect("a request");
        let mut future = std::pin::pin!(service.call(request));
        let Poll::Ready(Ok(response)) = future.as_mut().poll(&mut cx) else {
            panic!("the test service answers at once");
        };
        let mut body = response.into_body();
        if read_body {
            while let Poll::Ready(Some(_)) = Pin::new(&mut body).poll_frame(&mut cx) {}
        }
    }

    fn methods() -> GrpcMethods {
        GrpcMethods::default()
            .with_service("spire.api.server.svid.v1.SVID", &["BatchNewX509SVID"])
            .with_service("SpiffeWorkloadAPI", &["FetchX509SVID"])
    }

    #[test]
    fn calls_are_recorded_by_method_and_code_when_the_status_goes_by() {
        let mut registry = Registry::with_prefix("lanyard_test");
        let metrics = RpcMetrics::register(&mut registry, methods());
        let respond = |trailers: Option<&'static str>, headers: &'static [(&str, &str)]| {
            metrics.layer(Some("tls")).layer(tower::service_fn(
                move |_: http::Request<()>| async move {
                    Ok::<_, Infallible>(response(headers, trailers))
                },
            ))
        };
        let svid = "/spire.api.server.svid.v1.SVID/BatchNewX509SVID";
        // OK in the trailers, twice.
        let mut ok = respond(Some("0"), &[]);
        call(&mut ok, svid, true);
        call(&mut ok, svid, true);
        // A trailers-only refusal.
        call(&mut respond(None, &[("grpc-status", "7")]), svid, false);
        // A made-up path, and a body dropped before its trailers.
        call(&mut respond(Some("0"), &[]), "/evil.Service/x1", true);
        call(
            &mut respond(Some("0"), &[]),
            "/SpiffeWorkloadAPI/FetchX509SVID",
            false,
        );
        // A body ending without a status.
        call(&mut respond(None, &[]), svid, true);

        let text = encode(&registry);
        let series = |labels: &str| format!("lanyard_test_rpc_calls_total{{{labels}}} ");
        for (labels, count) in [
            (
                "listener=\"tls\",service=\"spire.api.server.svid.v1.SVID\",method=\"BatchNewX509SVID\",code=\"OK\"",
                2,
            ),
            (
                "listener=\"tls\",service=\"spire.api.server.svid.v1.SVID\",method=\"BatchNewX509SVID\",code=\"PermissionDenied\"",
                1,
            ),
            (
                "listener=\"tls\",service=\"spire.api.server.svid.v1.SVID\",method=\"BatchNewX509SVID\",code=\"Unknown\"",
                1,
            ),
            (
                "listener=\"tls\",service=\"unknown\",method=\"unknown\",code=\"OK\"",
                1,
            ),
            (
                "listener=\"tls\",service=\"SpiffeWorkloadAPI\",method=\"FetchX509SVID\",code=\"Canceled\"",
                1,
            ),
        ] {
            assert!(
                text.contains(&format!("{}{count}\n", series(labels))),
                "{labels} {count}:\n{text}"
            );
        }
        assert!(!text.contains("evil"), "{text}");
        assert!(
            text.contains("# TYPE lanyard_test_rpc_duration_seconds histogram\n"),
            "{text}"
        );
    }

    #[test]
    fn calls_answered_outside_the_layer_are_recorded_alike() {
        let mut registry = Registry::with_prefix("lanyard_test");
        let metrics = RpcMetrics::register(&mut registry, methods());
        let layer = metrics.layer(None);
        let path = "/SpiffeWorkloadAPI/FetchX509SVID";
        layer.start_call(path).finish(0);
        layer.start_call(path).finish(7);
        drop(layer.start_call(path));
        RpcMetricsLayer::off().start_call(path).finish(0);

        let text = encode(&registry);
        for (code, count) in [("OK", 1), ("PermissionDenied", 1), ("Canceled", 1)] {
            let series = format!(
                "lanyard_test_rpc_calls_total{{service=\"SpiffeWorkloadAPI\",method=\"FetchX509SVID\",code=\"{code}\"}} {count}\n"
            );
            assert!(text.contains(&series), "{series}{text}");
        }
    }

    #[test]
    fn an_off_layer_records_nothing() {
        let mut service =
            RpcMetricsLayer::off().layer(tower::service_fn(|_: http::Request<()>| async {
                Ok::<_, Infallible>(response(&[], Some("0")))
            }));
        call(&mut service, "/SpiffeWorkloadAPI/FetchX509SVID", true);
    }

    #[test]
    fn the_descriptor_set_names_every_served_method() {
        let methods = GrpcMethods::from_descriptor_set(lanyard_proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        for path in [
            "/spire.api.server.agent.v1.Agent/AttestAgent",
            "/spire.api.server.entry.v1.Entry/SyncAuthorizedEntries",
            "/spire.api.server.svid.v1.SVID/BatchNewX509SVID",
            "/SpiffeWorkloadAPI/FetchX509SVID",
            "/SpiffeWorkloadAPI/FetchJWTSVID",
        ] {
            let labels = methods.labels(path);
            assert_ne!(&*labels.method, UNKNOWN, "{path}");
            assert!(path.ends_with(&*labels.method), "{path}");
        }
        assert_eq!(&*methods.labels("/SpiffeWorkloadAPI/Nope").method, UNKNOWN);
    }
}
