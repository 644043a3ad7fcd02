//! `metrics_overhead` (`--metrics-overhead`): `batch` and `fanin` again on a server and
//! agents with `metrics_address` set, each `/metrics` scraped every second, and every figure
//! of that run against the same figure with metrics off from this run. A ratio above 1 for a
//! rate, or below 1 for a time or a cost, is what metrics cost.

use std::convert::Infallible;
use std::future::Future as _;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use http_body::{Body, Frame};
use lanyard_metrics::rpc::{GrpcMethods, RpcMetrics, RpcMetricsLayer};
use prometheus_client::registry::Registry;
use tower::{Layer as _, Service as _};

use crate::report::Report;

/// The target name of the run with metrics on; its figures are `<bench>.<TARGET>.<key>`.
pub(crate) const TARGET: &str = "metrics_on";

/// Records, under `metrics_overhead`, each figure of `on` against the figure with the same
/// key from `report` (metrics off).
pub(crate) fn compare(report: &mut Report, on: &Report, scrapes: u64) {
    let mut pairs = Vec::new();
    for figure in &on.figures {
        let Some(bench) = figure.bench.strip_suffix(&format!(".{TARGET}")) else {
            continue;
        };
        let Some(key) = figure
            .key
            .strip_prefix(&format!("{}.", figure.bench))
            .map(|key| format!("{bench}.{key}"))
        else {
            continue;
        };
        if let Some(off) = report.figures.iter().find(|f| f.key == key) {
            pairs.push((key, figure.clone(), off.value, off.unit.clone()));
        }
    }
    let mut bench = report.bench("metrics_overhead");
    for (key, figure, off, unit) in pairs {
        bench.versus(
            &key,
            &format!("{}, metrics on", figure.label),
            figure.value,
            &figure.unit,
            ("metrics off, same run", off, &unit),
        );
    }
    report.notes.push(format!(
        "metrics_overhead: the server and every agent scraped once a second while metrics were \
         on ({scrapes} scrapes)"
    ));
}

/// A response body of one message and OK trailers, as a unary gRPC answer.
struct Answer {
    frames: Vec<Frame<&'static [u8]>>,
}

impl Answer {
    fn new() -> Self {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Self {
            frames: vec![Frame::trailers(trailers), Frame::data(&b"message"[..])],
        }
    }
}

impl Body for Answer {
    type Data = &'static [u8];
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Poll::Ready(self.frames.pop().map(Ok))
    }
}

/// Nanoseconds per call through `layer` around a service that answers at once, its body
/// read to the trailers.
fn ns_per_call(layer: &RpcMetricsLayer, calls: u32) -> f64 {
    let mut service = layer.layer(tower::service_fn(|_: http::Request<()>| {
        std::future::ready(Ok::<_, Infallible>(http::Response::new(Answer::new())))
    }));
    let mut cx = Context::from_waker(Waker::noop());
    let started = Instant::now();
    for _ in 0..calls {
        let request = http::Request::builder()
            .uri("/spire.api.server.svid.v1.SVID/BatchNewX509SVID")
            .body(())
            .unwrap_or_default();
        let future = pin!(service.call(request));
        let Poll::Ready(Ok(response)) = future.poll(&mut cx) else {
            continue;
        };
        let mut body = pin!(response.into_body());
        while let Poll::Ready(Some(_)) = body.as_mut().poll_frame(&mut cx) {}
    }
    started.elapsed().as_nanos() as f64 / f64::from(calls.max(1))
}

/// What the gRPC call metrics add to one call (a count and a latency observation, the
/// status read from the trailers), alone and as a share of the server CPU time of the
/// cheapest signing call, `server_cpu_us` (one agent, one CSR, metrics off).
pub(crate) fn rpc_layer_cost(report: &mut Report, server_cpu_us: Option<f64>, calls: u32) {
    let mut registry = Registry::default();
    let methods =
        GrpcMethods::default().with_service("spire.api.server.svid.v1.SVID", &["BatchNewX509SVID"]);
    let metrics = RpcMetrics::register(&mut registry, methods);
    let on = metrics.layer(Some("tls"));
    let off = RpcMetricsLayer::off();
    // Warm both, then alternate halves so that neither gets the quieter moment.
    ns_per_call(&on, calls / 10);
    ns_per_call(&off, calls / 10);
    let on_first = ns_per_call(&on, calls / 2);
    let off_first = ns_per_call(&off, calls / 2);
    let on_ns = (on_first + ns_per_call(&on, calls / 2)) / 2.0;
    let off_ns = (off_first + ns_per_call(&off, calls / 2)) / 2.0;
    let added = (on_ns - off_ns).max(0.0);
    let mut bench = report.bench("metrics_overhead");
    bench.versus(
        "rpc_layer_ns_per_call",
        "a call through the gRPC call metrics' layer, around a service that answers at once",
        on_ns,
        "ns",
        ("the same with the layer off", off_ns, "ns"),
    );
    bench.figure(
        "rpc_layer_added_ns",
        "gRPC call metrics, added per call (count, latency, status from the trailers)",
        added,
        "ns",
    );
    if let Some(cpu_us) = server_cpu_us.filter(|us| *us > 0.0) {
        bench.figure(
            "rpc_layer_added_percent_of_cheapest_call",
            "… as a share of the server CPU of the cheapest signing call (1 agent × 1 CSR, \
             metrics off)",
            added / (cpu_us * 1e3) * 100.0,
            "%",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Machine;

    fn machine() -> Machine {
        Machine {
            cpu_model: "test".into(),
            cores: 2,
            memory_gib: 1.0,
        }
    }

    #[test]
    fn each_figure_with_metrics_on_is_compared_with_the_same_figure_off() {
        let mut off = Report::new("quick", machine());
        off.bench("batch")
            .figure("agents_1.size_1.svids_per_sec", "SVIDs/s", 100.0, "/s");
        off.bench("fanin")
            .figure("first_svid_p50_ms", "first SVID p50", 10.0, "ms");
        let mut on = Report::new("quick", machine());
        on.bench(&format!("batch.{TARGET}")).figure(
            "agents_1.size_1.svids_per_sec",
            "SVIDs/s",
            98.0,
            "/s",
        );
        on.bench(&format!("fanin.{TARGET}")).figure(
            "first_svid_p50_ms",
            "first SVID p50",
            10.5,
            "ms",
        );
        on.bench(&format!("fanin.{TARGET}"))
            .figure("only_on", "not measured off", 1.0, "ms");
        compare(&mut off, &on, 7);
        let batch = off
            .get("metrics_overhead.batch.agents_1.size_1.svids_per_sec")
            .expect("the batch figure");
        assert_eq!(batch.value, 98.0);
        let baseline = batch.baseline.as_ref().expect("a baseline");
        assert_eq!(baseline.value, 100.0);
        assert!((baseline.ratio - 0.98).abs() < 1e-9);
        assert!(
            off.get("metrics_overhead.fanin.first_svid_p50_ms")
                .is_some()
        );
        assert!(off.get("metrics_overhead.fanin.only_on").is_none());
        assert!(off.notes.iter().any(|n| n.contains("7 scrapes")));
    }

    #[test]
    fn the_layer_cost_is_measured_against_the_cheapest_call() {
        let mut report = Report::new("quick", machine());
        rpc_layer_cost(&mut report, Some(200.0), 1_000);
        let call = report
            .get("metrics_overhead.rpc_layer_ns_per_call")
            .expect("the call figure");
        assert!(call.value > 0.0);
        assert!(call.baseline.as_ref().is_some_and(|b| b.value > 0.0));
        let added = report
            .value("metrics_overhead.rpc_layer_added_ns")
            .expect("the added cost");
        let share = report
            .value("metrics_overhead.rpc_layer_added_percent_of_cheapest_call")
            .expect("the share");
        assert!((share - added / 200_000.0 * 100.0).abs() < 1e-9);
    }
}
