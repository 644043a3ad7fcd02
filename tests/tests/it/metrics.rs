//! `metrics_address` on a server and an agent as processes, scraped by a real Prometheus
//! (Debian's, see `lanyard_e2e::prometheus`): after some traffic (a workload without an
//! identity, an entry created and one refused by the policy, an SVID fetched), one PromQL
//! query per family answers a sample, and `promtool check metrics` finds no problem in
//! either exposition.

use std::time::Duration;

use lanyard_e2e::prometheus::{Prometheus, check_metrics, http_get, prometheus_or_skip};
use lanyard_e2e::{Cluster, TestDir, current_uid, free_port, poll, toml_string};

/// Refuses entries whose SPIFFE ID contains `/forbidden`, so that a refusal has a rule.
const POLICY: &str = r#"package lanyard

import rego.v1

violations contains v if {
	contains(input.entry.spiffe_id, "/forbidden")
	v := {"rule": "no-forbidden", "message": "forbidden path", "fix": "use another path"}
}

exception_violations contains v if {
	false
	v := {}
}
"#;

/// One query per family (or per label worth checking) of the server.
const SERVER_QUERIES: &[&str] = &[
    "lanyard_server_build_info",
    r#"lanyard_server_rpc_calls_total{listener="admin",code="OK"}"#,
    r#"lanyard_server_rpc_calls_total{listener="tls",method="SyncAuthorizedEntries"}"#,
    r#"lanyard_server_rpc_duration_seconds_bucket{listener="tls",method="BatchNewX509SVID"}"#,
    r#"lanyard_server_svids_signed_total{kind="x509_svid",result="ok"} > 0"#,
    r#"lanyard_server_agent_attestations_total{attestation_type="join_token",result="ok"} > 0"#,
    "lanyard_server_registration_entries > 0",
    "lanyard_server_agents > 0",
    "lanyard_server_policy_exceptions_active",
    r#"lanyard_server_ca_expires_in_seconds{authority="x509"} > 0"#,
    r#"lanyard_server_ca_expires_in_seconds{authority="jwt"} > 0"#,
    r#"lanyard_server_policy_decisions_total{point="write",decision="refused"} > 0"#,
    r#"lanyard_server_policy_decisions_total{point="issuance",decision="pass"} > 0"#,
    r#"lanyard_server_policy_refusals_total{rule="no-forbidden"} > 0"#,
    "lanyard_server_ledger_queue_depth",
    "lanyard_server_ledger_dropped_total",
    r#"lanyard_server_datastore_query_duration_seconds_count{operation="create_entry",result="ok"} > 0"#,
];

/// One query per family of the agent.
const AGENT_QUERIES: &[&str] = &[
    "lanyard_agent_build_info",
    r#"lanyard_agent_rpc_calls_total{service="SpiffeWorkloadAPI",method="FetchX509SVID"}"#,
    r#"lanyard_agent_rpc_duration_seconds_count{method="FetchX509SVID"} > 0"#,
    r#"lanyard_agent_workload_api_no_identity_total{method="FetchX509SVID"} > 0"#,
    "lanyard_agent_workload_api_streams",
    r#"lanyard_agent_sync_duration_seconds_count{result="ok"} > 0"#,
    "lanyard_agent_sync_entries_count > 0",
    "lanyard_agent_cached_entries > 0",
    r#"lanyard_agent_cached_svids{svid_type="x509"} > 0"#,
    r#"lanyard_agent_cached_svids{svid_type="jwt"}"#,
    r#"lanyard_agent_svid_rotations_total{svid="agent"}"#,
];

#[test]
fn prometheus_scrapes_every_family_from_a_server_and_an_agent() {
    let Some(binaries) = prometheus_or_skip("prometheus_scrapes_every_family") else {
        return;
    };
    let policy_dir = TestDir::new();
    let policy = policy_dir.join("policy.rego");
    std::fs::write(&policy, POLICY).unwrap();
    let (server_port, agent_port) = (free_port(), free_port());
    let cluster = Cluster::start_with(
        &format!(
            "metrics_address = \"127.0.0.1:{server_port}\"\n[policy]\npath = {}\n",
            toml_string(&policy.display().to_string())
        ),
        &format!("metrics_address = \"127.0.0.1:{agent_port}\""),
    );

    // A caller with no identity, then an entry for it, one the policy refuses, and its SVID.
    let refused = cluster
        .agent
        .fetch_x509()
        .expect_err("no entries exist yet");
    assert!(refused.stderr.contains("PermissionDenied"), "{refused}");
    let id = cluster.register_uid("/e2e/metrics", current_uid(), &[]);
    let agent_id = cluster.agent_id();
    let forbidden = cluster.server.cli([
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/forbidden",
        "--parent-id",
        agent_id.as_str(),
        "--selector",
        "unix:uid:0",
    ]);
    assert!(!forbidden.success(), "the policy refuses it: {forbidden}");
    cluster.agent.wait_for_svids(None, &[&id]);

    // The expositions themselves pass promtool.
    for (what, port) in [("server", server_port), ("agent", agent_port)] {
        let (status, exposition) = http_get(port, "/metrics").unwrap();
        assert_eq!(status, 200, "{what}: {exposition}");
        if let Err(problems) = check_metrics(binaries, &exposition) {
            panic!("{what}'s /metrics: {problems}\n{exposition}");
        }
    }

    let prometheus = Prometheus::start(
        binaries,
        &[
            ("lanyard-server", format!("127.0.0.1:{server_port}")),
            ("lanyard-agent", format!("127.0.0.1:{agent_port}")),
        ],
    );
    for job in ["lanyard-server", "lanyard-agent"] {
        poll(
            &format!("Prometheus to scrape {job}"),
            Duration::from_secs(60),
            || match prometheus.query(&format!("up{{job=\"{job}\"}} == 1")) {
                Ok(samples) if !samples.is_empty() => Ok(()),
                Ok(_) => Err(format!("not up yet\n{}", prometheus.log_tail())),
                Err(error) => Err(error),
            },
        );
    }
    for query in SERVER_QUERIES.iter().chain(AGENT_QUERIES) {
        let samples = prometheus.wait_for_sample(query, Duration::from_secs(30));
        assert!(!samples.is_empty(), "{query}");
    }
    // No series names an ID.
    let series = prometheus
        .query(r#"{__name__=~"lanyard_.+"}"#)
        .expect("every lanyard series");
    let text = serde_json::to_string(&series).unwrap();
    assert!(
        !text.contains("spiffe://"),
        "a label holds a SPIFFE ID: {text}"
    );
}
