//! The agent's Prometheus metrics (`metrics_address`; every family is listed in
//! `docs/metrics.md`).
//!
//! The manager and the Workload API count into [`AgentMetrics`] whether or not metrics are
//! served: handles made at start, so counting is an atomic add. Cache sizes are read from
//! the published snapshot and the JWT-SVID cache when Prometheus scrapes. With
//! `metrics_address` set, [`registry`] assembles them with the Workload API's gRPC call
//! metrics, and [`MetricsPage`] serves them at `/metrics` through [`crate::http`].

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use lanyard_metrics::rpc::{GrpcMethods, RpcMetrics};
use lanyard_metrics::{LATENCY_BUCKETS, Outcome, Scrape, ScrapeTime};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::cache::Snapshot;

/// The metric name prefix of the agent.
pub const PREFIX: &str = "lanyard_agent";

/// The Workload API methods that can find the caller has no identity.
pub const IDENTITY_METHODS: [&str; 6] = [
    "FetchX509SVID",
    "FetchX509Bundles",
    "FetchJWTSVID",
    "FetchJWTBundles",
    "StreamSecrets",
    "FetchSecrets",
];

type Labels = [(&'static str, &'static str); 1];

/// The counters of the manager and the Workload API (see the module documentation).
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    sync_durations: Family<Labels, Histogram, fn() -> Histogram>,
    sync_ok: Histogram,
    sync_failed: Histogram,
    sync_entries: Histogram,
    rotations: Family<Labels, Counter>,
    agent_rotations: Counter,
    workload_rotations: Counter,
    no_identity: Family<Labels, Counter>,
    no_identity_by_method: [Counter; IDENTITY_METHODS.len()],
    streams: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl AgentMetrics {
    /// Counters at zero, every series made.
    pub fn new() -> Self {
        let sync_durations =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let sync_ok = sync_durations.get_or_create_owned(&[("result", Outcome::Ok.as_str())]);
        let sync_failed =
            sync_durations.get_or_create_owned(&[("result", Outcome::Error.as_str())]);
        let rotations = Family::<Labels, Counter>::default();
        let agent_rotations = rotations.get_or_create_owned(&[("svid", "agent")]);
        let workload_rotations = rotations.get_or_create_owned(&[("svid", "workload")]);
        let no_identity = Family::<Labels, Counter>::default();
        let no_identity_by_method =
            IDENTITY_METHODS.map(|method| no_identity.get_or_create_owned(&[("method", method)]));
        Self {
            sync_durations,
            sync_ok,
            sync_failed,
            // 1, 4, 16, … 65,536 entries.
            sync_entries: Histogram::new(exponential_buckets(1.0, 4.0, 9)),
            rotations,
            agent_rotations,
            workload_rotations,
            no_identity,
            no_identity_by_method,
            streams: Gauge::default(),
        }
    }

    /// A sync that started at `started` ended; on success the agent holds `entries`.
    pub fn sync_ended(&self, started: Instant, entries: Option<usize>) {
        let elapsed = started.elapsed().as_secs_f64();
        match entries {
            Some(entries) => {
                self.sync_ok.observe(elapsed);
                self.sync_entries.observe(entries as f64);
            }
            None => self.sync_failed.observe(elapsed),
        }
    }

    /// The agent's own SVID was replaced (renewed or re-attested).
    pub fn agent_svid_rotated(&self) {
        self.agent_rotations.inc();
    }

    /// A workload's X.509-SVID was replaced by a new one.
    pub fn workload_svid_rotated(&self) {
        self.workload_rotations.inc();
    }

    /// A Workload API call of `method` found no identity for its caller.
    pub fn no_identity(&self, method: &str) {
        if let Some(index) = IDENTITY_METHODS.iter().position(|m| *m == method)
            && let Some(counter) = self.no_identity_by_method.get(index)
        {
            counter.inc();
        }
    }

    /// A Workload API stream opened; it counts as open until the guard is dropped.
    pub fn stream_opened(&self) -> OpenStream {
        self.streams.inc();
        OpenStream {
            streams: self.streams.clone(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "sync_duration_seconds",
            "Syncs with the server (entries, bundles, then the SVIDs due), by result",
            self.sync_durations.clone(),
        );
        registry.register(
            "sync_entries",
            "Entries the agent is authorized for after each successful sync",
            self.sync_entries.clone(),
        );
        registry.register(
            "svid_rotations",
            "SVIDs replaced by new ones: the agent's own (svid=agent) and workloads' X.509-SVIDs \
             (svid=workload)",
            self.rotations.clone(),
        );
        registry.register(
            "workload_api_no_identity",
            "Workload API calls whose caller matches no entry (\"no identity issued\"), by method",
            self.no_identity.clone(),
        );
        registry.register(
            "workload_api_streams",
            "Workload API streams open",
            self.streams.clone(),
        );
    }
}

/// An open Workload API stream, counted until dropped.
#[derive(Debug)]
pub struct OpenStream {
    streams: Gauge,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.streams.dec();
    }
}

/// The gRPC methods the Workload API socket serves, for the `service` and `method` labels.
pub fn grpc_methods() -> GrpcMethods {
    let methods = GrpcMethods::from_descriptor_set(lanyard_proto::FILE_DESCRIPTOR_SET)
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "the gRPC descriptor set does not decode; RPC metrics name no method");
            GrpcMethods::default()
        });
    methods.with_service("grpc.health.v1.Health", &["Check", "Watch"])
}

/// What the scrape reads besides the counters.
pub struct ScrapeSources {
    /// The snapshots the manager publishes.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// How many JWT-SVIDs the cache holds.
    pub jwt_svids: Box<dyn Fn() -> usize + Send + Sync>,
}

impl fmt::Debug for ScrapeSources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScrapeSources")
    }
}

/// The agent's registry: `metrics`, the Workload API's call metrics (returned, for the
/// router's layer), and the cache sizes read from `sources` at each scrape.
pub fn registry(metrics: &AgentMetrics, sources: ScrapeSources) -> (Registry, Arc<RpcMetrics>) {
    let mut registry = Registry::with_prefix(PREFIX);
    lanyard_metrics::register_build_info(&mut registry, env!("CARGO_PKG_VERSION"));
    let rpc = RpcMetrics::register(&mut registry, grpc_methods());
    metrics.register(&mut registry);
    ScrapeTime::register(&mut registry, move |scrape| read_caches(&sources, scrape));
    (registry, rpc)
}

fn read_caches(sources: &ScrapeSources, scrape: &mut Scrape<'_>) -> fmt::Result {
    let (entries, x509_svids) = {
        let snapshot = sources.snapshots.borrow();
        (snapshot.entries.len(), snapshot.identities.len())
    };
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    scrape.gauge(
        "cached_entries",
        "Entries the agent is authorized for, as last synced",
        count(entries),
    )?;
    scrape.gauge_family(
        "cached_svids",
        "SVIDs the agent holds for its workloads, by type",
        &[
            ([("svid_type", "x509")], count(x509_svids)),
            ([("svid_type", "jwt")], count((sources.jwt_svids)())),
        ],
    )
}

/// The agent's `/metrics`.
#[derive(Debug)]
pub struct MetricsPage {
    registry: Registry,
}

impl MetricsPage {
    /// Serves `registry`, encoded at each request.
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }
}

impl crate::http::Page for MetricsPage {
    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        if path != "/metrics" {
            return crate::http::plain(StatusCode::NOT_FOUND, "not found\n".to_owned());
        }
        let mut response = Response::new(Full::new(Bytes::from(lanyard_metrics::encode(
            &self.registry,
        ))));
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(lanyard_metrics::CONTENT_TYPE),
        );
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;
    use lanyard_core::{TrustBundle, TrustDomain};

    use super::*;
    use crate::http::Page as _;

    #[tokio::test]
    async fn the_page_shows_counters_and_cache_sizes() {
        let metrics = AgentMetrics::new();
        let trust_domain: TrustDomain = "example.org".parse().expect("a trust domain");
        let snapshot = Snapshot::new(
            trust_domain.clone(),
            Arc::new(TrustBundle::new(trust_domain)),
        );
        let (_tx, snapshots) = watch::channel(Arc::new(snapshot));
        let (registry, _rpc) = registry(
            &metrics,
            ScrapeSources {
                snapshots,
                jwt_svids: Box::new(|| 3),
            },
        );
        metrics.no_identity("FetchX509SVID");
        metrics.no_identity("NotAMethod");
        metrics.agent_svid_rotated();
        metrics.sync_ended(Instant::now(), Some(5));
        metrics.sync_ended(Instant::now(), None);
        let open = metrics.stream_opened();
        let _other = metrics.stream_opened();
        drop(open);
        let page = MetricsPage::new(registry);
        let response = page.respond("/metrics");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        let text = String::from_utf8(body.to_vec()).expect("UTF-8");
        for line in [
            "lanyard_agent_workload_api_no_identity_total{method=\"FetchX509SVID\"} 1\n",
            "lanyard_agent_workload_api_no_identity_total{method=\"FetchJWTSVID\"} 0\n",
            "lanyard_agent_svid_rotations_total{svid=\"agent\"} 1\n",
            "lanyard_agent_svid_rotations_total{svid=\"workload\"} 0\n",
            "lanyard_agent_sync_duration_seconds_count{result=\"ok\"} 1\n",
            "lanyard_agent_sync_duration_seconds_count{result=\"error\"} 1\n",
            "lanyard_agent_sync_entries_sum 5.0\n",
            "lanyard_agent_workload_api_streams 1\n",
            "lanyard_agent_cached_entries 0\n",
            "lanyard_agent_cached_svids{svid_type=\"jwt\"} 3\n",
            "lanyard_agent_cached_svids{svid_type=\"x509\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(!text.contains("NotAMethod"), "{text}");
        assert_eq!(page.respond("/").status(), StatusCode::NOT_FOUND);
    }
}
