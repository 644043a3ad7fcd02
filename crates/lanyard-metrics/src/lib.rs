//! Prometheus metrics shared by the server and the agent: the gRPC call metrics (a tower
//! layer, [`rpc`]), gauges computed when scraped ([`ScrapeTime`]), the outcome vocabulary
//! every family uses ([`Outcome`]), and the exposition ([`encode`]).
//!
//! Each process keeps one [`Registry`] under its prefix (`lanyard_server`, `lanyard_agent`);
//! the concrete families live in each crate's `metrics` module. Label values come from
//! closed sets (gRPC methods from the descriptor set, codes, outcomes, attestation types,
//! policy rule names capped in number), never SPIFFE IDs or entry IDs.
//!
//! The exposition is the Prometheus text format 0.0.4, which every Prometheus and
//! `promtool check metrics` reads.
#![warn(missing_docs)]

pub mod rpc;

use std::fmt;

pub use prometheus_client;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Latency buckets in seconds, from half a millisecond (a cached answer) to a minute (a
/// datastore stuck on a lock); a stream's lifetime past that lands in `+Inf`.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// The registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String fails only if an encoder does; ours do not.
    if prometheus_client::encoding::prometheus_text::encode(&mut text, registry).is_err() {
        text.clear();
    }
    text
}

/// Registers `<prefix>_build_info{version}`, always 1, as SPIRE's `started` gauge does.
pub fn register_build_info(registry: &mut Registry, version: &'static str) {
    registry.register(
        "build",
        "The running version; always 1",
        Info::new([("version", version)]),
    );
}

/// How a call ended, as every `result` label says it: `ok`; `refused` when the caller was
/// turned down for what it asked or who it is (the 4xx of gRPC); `error` when the process
/// could not do its part (the 5xx).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Turned down: invalid, not authorized, not found, rate limited, refused by policy.
    Refused,
    /// Failed on this side: internal, unavailable, timed out.
    Error,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Error => "error",
        }
    }

    /// The outcome of a call that ended with the gRPC status `code` (its number).
    pub fn of_grpc_code(code: i32) -> Self {
        match code {
            0 => Self::Ok,
            // InvalidArgument, NotFound, AlreadyExists, PermissionDenied, ResourceExhausted,
            // FailedPrecondition, Aborted, OutOfRange, Unimplemented, Unauthenticated.
            3 | 5 | 6 | 7 | 8 | 9 | 10 | 11 | 12 | 16 => Self::Refused,
            _ => Self::Error,
        }
    }
}

/// The names of the gRPC status codes as Go's `codes.Code` prints them (SPIRE's `status`
/// label), indexed by code.
const GRPC_CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The name of the gRPC status `code`; `Unknown` for a number outside the 17 codes.
pub fn grpc_code_name(code: i32) -> &'static str {
    usize::try_from(code)
        .ok()
        .and_then(|index| GRPC_CODE_NAMES.get(index))
        .copied()
        .unwrap_or("Unknown")
}

/// Gauges and counters whose values are read when Prometheus scrapes, from state the
/// process keeps anyway (the authorization index, the snapshot, the CA), so that nothing
/// has to keep them up to date on the hot paths. `read` writes them through [`Scrape`].
pub struct ScrapeTime<F> {
    read: F,
}

impl<F> ScrapeTime<F>
where
    F: Fn(&mut Scrape<'_>) -> fmt::Result + Send + Sync + 'static,
{
    /// A collector that runs `read` at each scrape.
    pub fn new(read: F) -> Self {
        Self { read }
    }

    /// Registers a collector running `read` at each scrape in `registry`.
    pub fn register(registry: &mut Registry, read: F) {
        registry.register_collector(Box::new(Self::new(read)));
    }
}

impl<F> fmt::Debug for ScrapeTime<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScrapeTime")
    }
}

impl<F> Collector for ScrapeTime<F>
where
    F: Fn(&mut Scrape<'_>) -> fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        (self.read)(&mut Scrape { encoder })
    }
}

/// Where a [`ScrapeTime`] collector writes its values.
#[derive(Debug)]
pub struct Scrape<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl Scrape<'_> {
    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: i64) -> fmt::Result {
        let gauge = ConstGauge::new(value);
        let metric = self
            .encoder
            .encode_descriptor(name, help, None, gauge.metric_type())?;
        gauge.encode(metric)
    }

    /// A gauge with one value per label set.
    pub fn gauge_family<S: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        values: &[(S, i64)],
    ) -> fmt::Result {
        let mut family = self.encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (labels, value) in values {
            ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }

    /// A counter without labels, kept elsewhere (an atomic the process already has).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let counter = ConstCounter::new(value);
        let metric = self
            .encoder
            .encode_descriptor(name, help, None, counter.metric_type())?;
        counter.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn codes_have_go_names_and_outcomes() {
        assert_eq!(grpc_code_name(0), "OK");
        assert_eq!(grpc_code_name(1), "Canceled");
        assert_eq!(grpc_code_name(7), "PermissionDenied");
        assert_eq!(grpc_code_name(16), "Unauthenticated");
        assert_eq!(grpc_code_name(17), "Unknown");
        assert_eq!(grpc_code_name(-1), "Unknown");
        assert_eq!(Outcome::of_grpc_code(0), Outcome::Ok);
        assert_eq!(Outcome::of_grpc_code(7), Outcome::Refused);
        assert_eq!(Outcome::of_grpc_code(8), Outcome::Refused);
        assert_eq!(Outcome::of_grpc_code(13), Outcome::Error);
        assert_eq!(Outcome::of_grpc_code(14), Outcome::Error);
        assert_eq!(Outcome::of_grpc_code(4), Outcome::Error);
    }

    #[test]
    fn scrape_time_values_are_read_at_each_scrape() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let value = Arc::new(AtomicU64::new(3));
        let mut registry = Registry::with_prefix("lanyard_test");
        let read = Arc::clone(&value);
        ScrapeTime::register(&mut registry, move |scrape| {
            let n = read.load(Ordering::Relaxed);
            scrape.gauge(
                "things",
                "Things held",
                i64::try_from(n).unwrap_or(i64::MAX),
            )?;
            scrape.counter("dropped", "Things dropped", n * 2)?;
            scrape.gauge_family(
                "by_kind",
                "Things by kind",
                &[([("kind", "a")], 1), ([("kind", "b")], 2)],
            )
        });
        register_build_info(&mut registry, "1.2.3");
        let text = encode(&registry);
        assert!(
            text.contains("# TYPE lanyard_test_things gauge\nlanyard_test_things 3\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "# TYPE lanyard_test_dropped_total counter\nlanyard_test_dropped_total 6\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("lanyard_test_by_kind{kind=\"b\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("lanyard_test_build_info{version=\"1.2.3\"} 1\n"),
            "{text}"
        );
        value.store(5, Ordering::Relaxed);
        assert!(encode(&registry).contains("lanyard_test_things 5\n"));
    }
}
