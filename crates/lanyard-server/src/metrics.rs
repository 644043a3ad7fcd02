//! The server's Prometheus metrics (`metrics_address`; every family is listed in
//! `docs/metrics.md`).
//!
//! Counters on the hot paths (signing, attestation, policy decisions) are kept by the
//! state whether or not metrics are served: each is a handle created at start for every
//! label combination, so counting is one atomic add, with no lookup, lock or allocation.
//! Counts that the server holds anyway (entries, agents, exceptions, the CA's expiry, the
//! ledger's queue) are read when Prometheus scrapes, not kept up to date by anyone. With
//! `metrics_address` set, [`registry`] assembles them with the gRPC call metrics of both
//! listeners and the datastore's query latency ([`crate::datastore::metered`]).

use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use lanyard_metrics::rpc::{GrpcMethods, RpcMetrics};
use lanyard_metrics::{Outcome, Scrape, ScrapeTime};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::state::ServerState;

/// The metric name prefix of the server.
pub const PREFIX: &str = "lanyard_server";

/// Distinct policy rule names counted in refusals; past it, a new name is counted as
/// `other`, so a policy cannot grow the number of series without bound.
pub const MAX_RULE_LABELS: usize = 64;

const OUTCOMES: [Outcome; 3] = [Outcome::Ok, Outcome::Refused, Outcome::Error];

/// What the CA signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedKind {
    /// A workload X.509-SVID (`BatchNewX509SVID`, `MintX509SVID`).
    X509Svid,
    /// A workload JWT-SVID (`NewJWTSVID`, `MintJWTSVID`).
    JwtSvid,
    /// An agent's X.509-SVID (attestation, renewal).
    AgentSvid,
    /// An intermediate CA for a downstream server (`NewDownstreamX509CA`).
    DownstreamX509Ca,
}

impl SignedKind {
    const ALL: [Self; 4] = [
        Self::X509Svid,
        Self::JwtSvid,
        Self::AgentSvid,
        Self::DownstreamX509Ca,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::X509Svid => "x509_svid",
            Self::JwtSvid => "jwt_svid",
            Self::AgentSvid => "agent_x509_svid",
            Self::DownstreamX509Ca => "downstream_x509_ca",
        }
    }
}

/// A node attestation method, as the `attestation_type` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttestationType {
    /// `join_token`.
    JoinToken,
    /// `x509pop`.
    X509Pop,
    /// `k8s_psat`.
    K8sPsat,
    /// Not read yet, or a type this server does not serve.
    #[default]
    Unknown,
}

impl AttestationType {
    const ALL: [Self; 4] = [Self::JoinToken, Self::X509Pop, Self::K8sPsat, Self::Unknown];

    /// The label of the attestation data type `name` when this server serves it.
    pub fn served(name: &str, served: bool) -> Self {
        match name {
            _ if !served => Self::Unknown,
            "join_token" => Self::JoinToken,
            "x509pop" => Self::X509Pop,
            "k8s_psat" => Self::K8sPsat,
            _ => Self::Unknown,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::JoinToken => "join_token",
            Self::X509Pop => "x509pop",
            Self::K8sPsat => "k8s_psat",
            Self::Unknown => "unknown",
        }
    }
}

/// Where the policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyPoint {
    /// An entry write.
    Write,
    /// An issuance (a fresh decision; reused ones are not counted again).
    Issuance,
}

impl PolicyPoint {
    const ALL: [Self; 2] = [Self::Write, Self::Issuance];

    fn as_str(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Issuance => "issuance",
        }
    }
}

/// What the policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyDecision {
    /// No violation.
    Pass,
    /// Violations, each waived by an active exception.
    Waived,
    /// Violations not waived.
    Refused,
    /// The policy failed to evaluate (fails closed).
    Failed,
}

impl PolicyDecision {
    const ALL: [Self; 4] = [Self::Pass, Self::Waived, Self::Refused, Self::Failed];

    fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Waived => "waived",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

type StaticLabels = [(&'static str, &'static str); 2];

/// A counter family whose every series exists from the start, with a handle per series:
/// counting is an atomic add on a handle picked by index.
#[derive(Debug, Clone)]
struct CounterGrid<const ROWS: usize, const COLUMNS: usize> {
    family: Family<StaticLabels, Counter>,
    handles: [[Counter; COLUMNS]; ROWS],
}

impl<const ROWS: usize, const COLUMNS: usize> CounterGrid<ROWS, COLUMNS> {
    fn new(
        rows: (&'static str, [&'static str; ROWS]),
        columns: (&'static str, [&'static str; COLUMNS]),
    ) -> Self {
        let family = Family::<StaticLabels, Counter>::default();
        let handles = rows.1.map(|row| {
            columns
                .1
                .map(|column| family.get_or_create_owned(&[(rows.0, row), (columns.0, column)]))
        });
        Self { family, handles }
    }

    fn inc(&self, row: usize, column: usize) {
        if let Some(counter) = self.handles.get(row).and_then(|r| r.get(column)) {
            counter.inc();
        }
    }
}

fn outcome_index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Ok => 0,
        Outcome::Refused => 1,
        Outcome::Error => 2,
    }
}

/// SVIDs and CAs signed, by kind and result.
#[derive(Debug, Clone)]
pub struct SigningMetrics {
    grid: CounterGrid<4, 3>,
}

impl SigningMetrics {
    fn new() -> Self {
        Self {
            grid: CounterGrid::new(
                ("kind", SignedKind::ALL.map(SignedKind::as_str)),
                ("result", OUTCOMES.map(Outcome::as_str)),
            ),
        }
    }

    /// Counts one signing request for `kind` that ended with `outcome`.
    pub fn record(&self, kind: SignedKind, outcome: Outcome) {
        let row = SignedKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.grid.inc(row, outcome_index(outcome));
    }
}

/// Node attestations, by attestation type and result.
#[derive(Debug, Clone)]
pub struct AttestationMetrics {
    grid: CounterGrid<4, 3>,
}

impl AttestationMetrics {
    fn new() -> Self {
        Self {
            grid: CounterGrid::new(
                (
                    "attestation_type",
                    AttestationType::ALL.map(AttestationType::as_str),
                ),
                ("result", OUTCOMES.map(Outcome::as_str)),
            ),
        }
    }

    /// Counts one attestation of `kind` that ended with `outcome`.
    pub fn record(&self, kind: AttestationType, outcome: Outcome) {
        let row = AttestationType::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(AttestationType::ALL.len() - 1);
        self.grid.inc(row, outcome_index(outcome));
    }
}

/// The labels of a refusal: where, and the rule broken.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    point: &'static str,
    rule: String,
}

/// Policy decisions, and the rules behind refusals.
#[derive(Debug, Clone)]
pub struct PolicyMetrics {
    decisions: CounterGrid<2, 4>,
    refusals: Family<RefusalLabels, Counter>,
    /// How many label sets `refusals` holds (the family does not say).
    refusal_series: Arc<Mutex<usize>>,
}

impl PolicyMetrics {
    fn new() -> Self {
        Self {
            decisions: CounterGrid::new(
                ("point", PolicyPoint::ALL.map(PolicyPoint::as_str)),
                ("decision", PolicyDecision::ALL.map(PolicyDecision::as_str)),
            ),
            refusals: Family::default(),
            refusal_series: Arc::default(),
        }
    }

    /// Counts a decision at `point`; for a refusal, each broken rule in `rules` too.
    pub fn record<'a>(
        &self,
        point: PolicyPoint,
        decision: PolicyDecision,
        rules: impl IntoIterator<Item = &'a str>,
    ) {
        let row = PolicyPoint::ALL
            .iter()
            .position(|p| *p == point)
            .unwrap_or(0);
        let column = PolicyDecision::ALL
            .iter()
            .position(|d| *d == decision)
            .unwrap_or(0);
        self.decisions.inc(row, column);
        if decision != PolicyDecision::Refused {
            return;
        }
        for rule in rules {
            let mut labels = RefusalLabels {
                point: point.as_str(),
                rule: rule.to_owned(),
            };
            if let Some(counter) = self.refusals.get(&labels) {
                counter.inc();
                continue;
            }
            {
                let mut series = self
                    .refusal_series
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if *series >= MAX_RULE_LABELS {
                    labels.rule = "other".to_owned();
                } else {
                    *series += 1;
                }
            }
            self.refusals.get_or_create(&labels).inc();
        }
    }
}

/// The counters every service of a server shares (see the module documentation).
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    /// SVIDs and CAs signed.
    pub signing: SigningMetrics,
    /// Node attestations.
    pub attestation: AttestationMetrics,
    /// Policy decisions.
    pub policy: PolicyMetrics,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    /// Counters at zero.
    pub fn new() -> Self {
        Self {
            signing: SigningMetrics::new(),
            attestation: AttestationMetrics::new(),
            policy: PolicyMetrics::new(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "svids_signed",
            "Signing requests by kind (x509_svid, jwt_svid, agent_x509_svid, \
             downstream_x509_ca) and result (ok, refused, error)",
            self.signing.grid.family.clone(),
        );
        registry.register(
            "agent_attestations",
            "Node attestations by attestation_type and result",
            self.attestation.grid.family.clone(),
        );
        registry.register(
            "policy_decisions",
            "Policy decisions by point (write, issuance) and decision (pass, waived, refused, \
             failed); issuance decisions are counted when made, not when reused",
            self.policy.decisions.family.clone(),
        );
        registry.register(
            "policy_refusals",
            "Rules broken by refused entries, by point and rule",
            self.policy.refusals.clone(),
        );
    }
}

/// The gRPC methods the server serves, for the `service` and `method` labels.
pub fn grpc_methods() -> GrpcMethods {
    let methods = GrpcMethods::from_descriptor_set(lanyard_proto::FILE_DESCRIPTOR_SET)
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "the gRPC descriptor set does not decode; RPC metrics name no method");
            GrpcMethods::default()
        });
    methods.with_service("grpc.health.v1.Health", &["Check", "Watch"])
}

/// The server's registry: the shared counters, the RPC metrics, `datastore` (the metered
/// store's latency family, when the store is metered) and the values read from `state` at
/// each scrape. Returns the RPC metrics for the routers' layers.
pub fn registry(
    state: &Arc<ServerState>,
    datastore: Option<&crate::datastore::metered::DatastoreMetrics>,
) -> (Registry, Arc<RpcMetrics>) {
    let mut registry = Registry::with_prefix(PREFIX);
    lanyard_metrics::register_build_info(&mut registry, env!("CARGO_PKG_VERSION"));
    let rpc = RpcMetrics::register(&mut registry, grpc_methods());
    state.metrics.register(&mut registry);
    if let Some(datastore) = datastore {
        datastore.register(&mut registry);
    }
    let weak = Arc::downgrade(state);
    ScrapeTime::register(&mut registry, move |scrape| read_state(&weak, scrape));
    (registry, rpc)
}

/// The values read at each scrape.
fn read_state(state: &Weak<ServerState>, scrape: &mut Scrape<'_>) -> fmt::Result {
    let Some(state) = state.upgrade() else {
        return Ok(());
    };
    let now = state.now();
    let (entries, agents) = {
        let index = state.index.read();
        (index.entry_count(), index.agent_count())
    };
    scrape.gauge(
        "registration_entries",
        "Registration entries in the authorization index",
        count(entries),
    )?;
    scrape.gauge(
        "agents",
        "Attested agents in the authorization index",
        count(agents),
    )?;
    let active = state
        .judge
        .exceptions()
        .iter()
        .filter(|exception| exception.is_active(now))
        .count();
    scrape.gauge(
        "policy_exceptions_active",
        "Exceptions to the policy that are in force (not expired, not revoked)",
        count(active),
    )?;
    let seconds_left = |not_after: std::time::SystemTime| match not_after.duration_since(now) {
        Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
        Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let mut expiries = Vec::with_capacity(2);
    if let Some(ca) = state.ca.x509_ca() {
        expiries.push(([("authority", "x509")], seconds_left(ca.not_after())));
    }
    if let Some(key) = state.ca.jwt_key() {
        expiries.push(([("authority", "jwt")], seconds_left(key.not_after)));
    }
    scrape.gauge_family(
        "ca_expires_in_seconds",
        "Seconds until the active X.509 authority or JWT key expires (negative once expired)",
        &expiries,
    )?;
    if let Some(ledger) = state.ledger() {
        scrape.gauge(
            "ledger_queue_depth",
            "Issuances queued for the usage ledger, not yet written",
            count(ledger.queued()),
        )?;
        scrape.counter(
            "ledger_dropped",
            "Issuances the usage ledger dropped because its queue was full",
            ledger.dropped(),
        )?;
    }
    Ok(())
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_combination_exists_from_the_start() {
        let metrics = ServerMetrics::new();
        let mut registry = Registry::with_prefix(PREFIX);
        metrics.register(&mut registry);
        metrics
            .signing
            .record(SignedKind::JwtSvid, Outcome::Refused);
        metrics
            .signing
            .record(SignedKind::JwtSvid, Outcome::Refused);
        metrics
            .attestation
            .record(AttestationType::served("x509pop", true), Outcome::Ok);
        metrics
            .attestation
            .record(AttestationType::served("x509pop", false), Outcome::Error);
        let text = lanyard_metrics::encode(&registry);
        assert!(
            text.contains(
                "lanyard_server_svids_signed_total{kind=\"jwt_svid\",result=\"refused\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("lanyard_server_svids_signed_total{kind=\"downstream_x509_ca\",result=\"error\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("lanyard_server_agent_attestations_total{attestation_type=\"x509pop\",result=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("lanyard_server_agent_attestations_total{attestation_type=\"unknown\",result=\"error\"} 1\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("lanyard_server_svids_signed_total{").count(),
            12
        );
        assert_eq!(
            text.matches("lanyard_server_policy_decisions_total{")
                .count(),
            8
        );
    }

    #[test]
    fn refused_rules_are_counted_with_a_bounded_number_of_names() {
        let metrics = PolicyMetrics::new();
        metrics.record(
            PolicyPoint::Write,
            PolicyDecision::Refused,
            ["max_ttl", "owner"],
        );
        metrics.record(PolicyPoint::Write, PolicyDecision::Pass, ["ignored"]);
        for n in 0..(MAX_RULE_LABELS * 2) {
            metrics.record(
                PolicyPoint::Issuance,
                PolicyDecision::Refused,
                [format!("rule_{n}").as_str()],
            );
        }
        let mut registry = Registry::default();
        registry.register("policy_refusals", "", metrics.refusals.clone());
        let text = lanyard_metrics::encode(&registry);
        assert_eq!(
            text.matches("policy_refusals_total{").count(),
            MAX_RULE_LABELS + 1,
            "{text}"
        );
        assert!(
            text.contains("{point=\"write\",rule=\"max_ttl\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("ignored"), "{text}");
        assert!(
            text.contains(&format!(
                "{{point=\"issuance\",rule=\"other\"}} {}\n",
                MAX_RULE_LABELS + 2
            )),
            "{text}"
        );
    }
}
