//! `metrics_overhead` (`--metrics-overhead`): what Prometheus metrics cost `batch` and
//! `fanin`, and what the gRPC call metrics' layer costs one call.
//!
//! End to end, in rounds: each round is one run with metrics off and one with
//! `metrics_address` set on the server and the agent (each `/metrics` scraped every second,
//! as Prometheus does), every run on a fresh server and agent. The order within a round
//! follows the Thue–Morse sequence — off,on, on,off, on,off, off,on, … ([`schedule`]) — so
//! that whatever drifts over the runs (a warmer or busier machine) raises as many rounds'
//! on ÷ off ratios as it lowers, and cancels in their median. Each figure is the median of
//! the per-round ratios, with their least and greatest; for `batch`, a round's ratio is the
//! geometric mean over the cells. A ratio below 1 for a rate, or above 1 for a time or a
//! cost, is what metrics cost.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use anyhow::Context as _;
use http_body::{Body, Frame};
use lanyard_metrics::rpc::{GrpcMethods, RpcMetrics, RpcMetricsLayer};
use prometheus_client::registry::Registry;
use tower::{Layer as _, Service as _};

use crate::bench::mint::Ceiling;
use crate::bench::{batch, fanin};
use crate::harness::{LanyardServer, Scraper, scratch_dir};
use crate::report::{Report, Spread};

/// The shape of the end-to-end comparison.
#[derive(Debug, Clone)]
pub(crate) struct Scale {
    /// Rounds of one run with metrics off and one with them on. A multiple of 4 cancels a
    /// drift linear in time wholly (see [`schedule`]).
    pub(crate) rounds: usize,
    /// The `batch` cells of each run.
    pub(crate) batch: batch::Scale,
    /// The `fanin` of each run.
    pub(crate) fanin: fanin::Scale,
}

/// Metrics off or on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Metrics {
    Off,
    On,
}

impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::On => "on",
        })
    }
}

/// The order of the runs of `rounds` rounds: round `i` runs metrics off first when `i` has
/// an even number of ones in binary, on first otherwise (the Thue–Morse sequence: off,on,
/// on,off, on,off, off,on, …). Under a drift linear in time, the on-first rounds' ratios
/// move one way as much as the off-first rounds' move the other, and every 4 rounds hold
/// two of each.
pub(crate) fn schedule(rounds: usize) -> Vec<[Metrics; 2]> {
    (0..rounds)
        .map(|i| {
            if i.count_ones() % 2 == 0 {
                [Metrics::Off, Metrics::On]
            } else {
                [Metrics::On, Metrics::Off]
            }
        })
        .collect()
}

/// What the two runs of a round measured.
#[derive(Debug)]
pub(crate) struct Round {
    pub(crate) off: Report,
    pub(crate) on: Report,
}

/// One run: a fresh server with metrics `metrics`, then `batch` (if `with_batch`) and
/// `fanin` (if `with_fanin`, on a fresh agent) as `scale` says, their figures in a report of
/// their own, as `batch` and `fanin` name them with metrics off. Returns the report and the
/// scrapes made.
pub(crate) async fn run(
    metrics: Metrics,
    ceiling: Ceiling,
    scale: &Scale,
    (with_batch, with_fanin): (bool, bool),
    like: &Report,
) -> anyhow::Result<(Report, u64)> {
    let dir = scratch_dir("lanyard-bench-metrics")?;
    let mut config = LanyardServer::config_in(dir.path());
    if metrics == Metrics::On {
        config.metrics_address = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    let server = LanyardServer::start(config).await?;
    let mut target = server.target();
    let scraper = match metrics {
        Metrics::Off => None,
        Metrics::On => {
            let address = server
                .server()
                .metrics_addr()
                .context("the server serves no metrics")?;
            let scraper = Scraper::start(address);
            target.scraper = Some(Arc::clone(&scraper));
            Some(scraper)
        }
    };
    let mut report = Report::new(&like.mode, like.machine.clone());
    let measured = async {
        if with_batch {
            batch::run(&mut report, &target, ceiling, &scale.batch).await?;
        }
        if with_fanin {
            fanin::run(&mut report, &target, &scale.fanin).await?;
        }
        anyhow::Ok(())
    }
    .await;
    drop(target);
    let scrapes = scraper.map_or(0, |scraper| scraper.scrapes());
    server.shutdown().await;
    measured?;
    Ok((report, scrapes))
}

/// The last part of the key of each `batch` cell's figures that are compared, and what it
/// measures.
const BATCH: [(&str, &str); 2] = [
    ("svids_per_sec", "SVIDs/s"),
    ("server_cpu_us_per_svid", "server CPU per SVID"),
];

/// The `fanin` figures that are compared.
const FANIN: [&str; 6] = [
    "first_svid_p50_ms",
    "first_svid_p99_ms",
    "rotation_all_ms",
    "agent_rss_mib",
    "agent_rss_per_stream_bytes",
    "agent_rss_per_svid_bytes",
];

/// `on ÷ off` for two positive, finite values.
pub(crate) fn ratio(off: f64, on: f64) -> Option<f64> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    (positive(off) && positive(on)).then(|| on / off)
}

/// The median: the middle value, or the mean of the two middle ones. `None` for no values;
/// values that are not finite are left out.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => sorted.get(middle).copied(),
        _ => Some((sorted.get(middle - 1)? + sorted.get(middle)?) / 2.0),
    }
}

/// The geometric mean of positive, finite values; `None` if any is not.
pub(crate) fn geometric_mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| !v.is_finite() || *v <= 0.0) {
        return None;
    }
    let logs: f64 = values.iter().map(|v| v.ln()).sum();
    Some((logs / values.len() as f64).exp())
}

/// The median of `ratios` with their least and greatest, and the finite ones in order.
pub(crate) fn summarize(ratios: &[f64]) -> Option<(f64, Spread)> {
    let median = median(ratios)?;
    let values: Vec<f64> = ratios.iter().copied().filter(|v| v.is_finite()).collect();
    Some((
        median,
        Spread {
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            rounds: values.len(),
            values,
        },
    ))
}

fn value(report: &Report, key: &str) -> Option<f64> {
    report
        .figures
        .iter()
        .find(|f| f.key == key)
        .map(|f| f.value)
}

/// The on ÷ off ratios of one round, by key: each `batch` cell's figure (its own key), their
/// geometric mean over the cells measured in both runs (`batch.<figure>`), and each `fanin`
/// figure. A figure that is 0 in either run has no ratio.
pub(crate) fn round_ratios(round: &Round) -> BTreeMap<String, f64> {
    let mut ratios = BTreeMap::new();
    for (figure, _) in BATCH {
        let suffix = format!(".{figure}");
        let mut cells = Vec::new();
        for off in round
            .off
            .figures
            .iter()
            .filter(|f| f.bench == "batch" && f.key.ends_with(&suffix))
        {
            if let Some(r) = value(&round.on, &off.key).and_then(|on| ratio(off.value, on)) {
                cells.push(r);
                ratios.insert(off.key.clone(), r);
            }
        }
        if let Some(mean) = geometric_mean(&cells) {
            ratios.insert(format!("batch{suffix}"), mean);
        }
    }
    for figure in FANIN {
        let key = format!("fanin.{figure}");
        if let Some(r) = value(&round.off, &key)
            .zip(value(&round.on, &key))
            .and_then(|(off, on)| ratio(off, on))
        {
            ratios.insert(key, r);
        }
    }
    ratios
}

/// Records, under `metrics_overhead`, the median and spread of each figure's per-round
/// on ÷ off ratios: `batch.<figure>` (the geometric mean over the cells), the `fanin`
/// figures, then each `batch` cell's.
pub(crate) fn record(report: &mut Report, rounds: &[Round], scrapes: u64) {
    let per_round: Vec<BTreeMap<String, f64>> = rounds.iter().map(round_ratios).collect();
    let Some(first) = rounds.first() else {
        return;
    };
    let label_of = |key: &str| {
        first
            .off
            .figures
            .iter()
            .find(|f| f.key == key)
            .map(|f| f.label.clone())
    };
    let cells = |suffix: &str| -> Vec<String> {
        first
            .off
            .figures
            .iter()
            .filter(|f| f.bench == "batch" && f.key.ends_with(suffix))
            .map(|f| f.key.clone())
            .collect()
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    for (figure, what) in BATCH {
        let n = cells(&format!(".{figure}")).len();
        rows.push((
            format!("batch.{figure}"),
            format!("batch {what}, geometric mean of {n} cells"),
        ));
    }
    for figure in FANIN {
        let key = format!("fanin.{figure}");
        if let Some(label) = label_of(&key) {
            rows.push((key, label));
        }
    }
    for (figure, _) in BATCH {
        for key in cells(&format!(".{figure}")) {
            if let Some(label) = label_of(&key) {
                rows.push((key, label));
            }
        }
    }
    let mut bench = report.bench("metrics_overhead");
    for (key, label) in rows {
        let ratios: Vec<f64> = per_round
            .iter()
            .filter_map(|ratios| ratios.get(&key).copied())
            .collect();
        if let Some((median, spread)) = summarize(&ratios) {
            bench.median(
                &key,
                &format!("{label}: metrics on ÷ off, median of rounds"),
                median,
                "×",
                spread,
            );
        }
    }
    let order: Vec<String> = schedule(rounds.len())
        .iter()
        .map(|[a, b]| format!("{a},{b}"))
        .collect();
    report.notes.push(format!(
        "metrics_overhead: {} rounds, each a run with metrics off and one with them on, every \
         run on a fresh server and agent, in the order {}; each figure is the median of the \
         rounds' on ÷ off ratios, with the least and greatest in brackets. While metrics were \
         on, the server's and the agent's /metrics were scraped once a second ({scrapes} \
         scrapes)",
        rounds.len(),
        order.join(" · "),
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

    use Metrics::{Off, On};

    #[test]
    fn rounds_alternate_as_thue_morse() {
        let runs: Vec<Metrics> = schedule(8).into_iter().flatten().collect();
        assert_eq!(
            runs,
            [
                Off, On, On, Off, On, Off, Off, On, // rounds 0–3
                On, Off, Off, On, Off, On, On, Off, // rounds 4–7
            ]
        );
        assert!(schedule(0).is_empty());
        for rounds in [4, 8, 12, 16] {
            let off_first = schedule(rounds).iter().filter(|r| r[0] == Off).count();
            assert_eq!(off_first * 2, rounds, "{rounds} rounds");
        }
    }

    #[test]
    fn medians_means_and_ratios() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0, 5.0, 3.0]), Some(3.0));
        assert_eq!(geometric_mean(&[]), None);
        assert!((geometric_mean(&[2.0, 8.0]).unwrap() - 4.0).abs() < 1e-12);
        assert_eq!(geometric_mean(&[2.0, 0.0]), None);
        assert_eq!(ratio(100.0, 97.0), Some(0.97));
        assert_eq!(ratio(0.0, 97.0), None);
        assert_eq!(ratio(100.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
        let (median, spread) = summarize(&[1.02, 0.97, 1.0, 0.99]).unwrap();
        assert!((median - 0.995).abs() < 1e-12);
        assert_eq!(
            spread,
            Spread {
                min: 0.97,
                max: 1.02,
                rounds: 4,
                values: vec![1.02, 0.97, 1.0, 0.99],
            }
        );
        assert!(summarize(&[]).is_none());
    }

    /// Two runs' reports, as `batch` and `fanin` write them.
    fn measured(rate: [f64; 2], cpu_us: f64, p99_ms: f64, rss_per_svid: f64) -> Report {
        let mut report = Report::new("test", machine());
        let mut batch = report.bench("batch");
        for (cell, rate) in ["agents_1.size_1", "agents_10.size_10"].iter().zip(rate) {
            batch.figure(&format!("{cell}.svids_per_sec"), "SVIDs/s", rate, "/s");
            batch.figure(&format!("{cell}.p99_ms"), "p99", 1.0, "ms");
            batch.figure(
                &format!("{cell}.server_cpu_us_per_svid"),
                "server CPU µs per SVID",
                cpu_us,
                "µs",
            );
        }
        let mut fanin = report.bench("fanin");
        fanin.figure("first_svid_p99_ms", "first SVID p99", p99_ms, "ms");
        fanin.figure(
            "agent_rss_per_svid_bytes",
            "RSS per SVID",
            rss_per_svid,
            "B",
        );
        report
    }

    #[test]
    fn a_round_compares_each_cell_their_geometric_mean_and_fanin() {
        let round = Round {
            off: measured([100.0, 1000.0], 200.0, 10.0, 1000.0),
            on: measured([99.0, 1010.0], 202.0, 12.0, 0.0),
        };
        let ratios = round_ratios(&round);
        assert!((ratios["batch.agents_1.size_1.svids_per_sec"] - 0.99).abs() < 1e-12);
        assert!((ratios["batch.agents_10.size_10.svids_per_sec"] - 1.01).abs() < 1e-12);
        let mean = (0.99f64 * 1.01).sqrt();
        assert!((ratios["batch.svids_per_sec"] - mean).abs() < 1e-12);
        assert!((ratios["batch.server_cpu_us_per_svid"] - 1.01).abs() < 1e-12);
        assert!((ratios["fanin.first_svid_p99_ms"] - 1.2).abs() < 1e-12);
        // Latency per cell is not compared; a figure at 0 has no ratio.
        assert!(!ratios.contains_key("batch.agents_1.size_1.p99_ms"));
        assert!(!ratios.contains_key("fanin.agent_rss_per_svid_bytes"));
        assert!(!ratios.contains_key("fanin.rotation_all_ms"));
    }

    #[test]
    fn figures_are_medians_of_round_ratios_with_their_spread() {
        let rounds: Vec<Round> = [0.98, 1.02, 0.9, 1.0]
            .into_iter()
            .map(|r| Round {
                off: measured([100.0, 1000.0], 200.0, 10.0, 1000.0),
                on: measured([100.0 * r, 1000.0 * r], 200.0 / r, 10.0, 1000.0),
            })
            .collect();
        let mut report = Report::new("test", machine());
        record(&mut report, &rounds, 7);
        let rate = report
            .get("metrics_overhead.batch.svids_per_sec")
            .expect("the batch rate");
        assert!((rate.value - 0.99).abs() < 1e-9, "{rate:?}");
        assert_eq!(rate.unit, "×");
        assert!(rate.label.contains("geometric mean of 2 cells"), "{rate:?}");
        let spread = rate.spread.as_ref().expect("a spread");
        assert!((spread.min - 0.9).abs() < 1e-9 && (spread.max - 1.02).abs() < 1e-9);
        assert_eq!(spread.rounds, 4);
        // Each round's ratio, in the order the rounds ran.
        for (value, r) in spread.values.iter().zip([0.98, 1.02, 0.9, 1.0]) {
            assert!((value - r).abs() < 1e-9, "{spread:?}");
        }
        let cpu = report
            .value("metrics_overhead.batch.server_cpu_us_per_svid")
            .expect("the CPU per SVID");
        assert!((cpu - (1.0 / 0.98 + 1.0) / 2.0).abs() < 1e-9, "{cpu}");
        assert!(
            report
                .value("metrics_overhead.batch.agents_10.size_10.svids_per_sec")
                .is_some()
        );
        assert_eq!(
            report.value("metrics_overhead.fanin.first_svid_p99_ms"),
            Some(1.0)
        );
        assert!(
            report
                .get("metrics_overhead.fanin.first_svid_p50_ms")
                .is_none()
        );
        let note = report.notes.last().expect("a note");
        assert!(note.contains("4 rounds"), "{note}");
        assert!(note.contains("off,on · on,off · on,off · off,on"), "{note}");
        assert!(note.contains("7 scrapes"), "{note}");
    }

    /// A drift that makes every run slower than the one before it by the same factor — a
    /// machine getting busier — moves the off-first rounds' ratios up and the on-first rounds'
    /// down by the same factor, so the median over 4 rounds is the true ratio.
    #[test]
    fn a_linear_drift_cancels_in_the_median() {
        let cost = 0.97;
        let drift = 0.95f64;
        let mut rate_of_run = (0..).map(|n| 1000.0 * drift.powi(n));
        let rounds: Vec<Round> = schedule(4)
            .into_iter()
            .map(|order| {
                let mut round = Round {
                    off: Report::new("test", machine()),
                    on: Report::new("test", machine()),
                };
                for metrics in order {
                    let base = rate_of_run.next().expect("endless");
                    let (report, rate) = match metrics {
                        Off => (&mut round.off, base),
                        On => (&mut round.on, base * cost),
                    };
                    report.bench("batch").figure(
                        "agents_1.size_1.svids_per_sec",
                        "SVIDs/s",
                        rate,
                        "/s",
                    );
                }
                round
            })
            .collect();
        let ratios: Vec<f64> = rounds
            .iter()
            .map(|r| round_ratios(r)["batch.svids_per_sec"])
            .collect();
        // Each round alone is off by the drift of one run…
        assert!(ratios.iter().all(|r| (r - cost).abs() > 0.04), "{ratios:?}");
        // … but half are off one way and half the other.
        let (median, spread) = summarize(&ratios).unwrap();
        let expected = cost * (drift + 1.0 / drift) / 2.0;
        assert!((median - expected).abs() < 1e-9, "{median} {ratios:?}");
        assert!((median - cost).abs() < 0.002, "{median}");
        assert!(spread.min < cost && spread.max > cost);
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
