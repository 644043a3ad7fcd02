//! `metrics_address`: the server's `/metrics` after real calls on both listeners — the
//! gRPC call metrics of the admin socket and the TLS API, attestations and signing by
//! result, the datastore's latency, and the values read at the scrape.

use crate::support::{TestServer, attest_join_token};

async fn scrape(server: &TestServer) -> String {
    let addr = server
        .server()
        .metrics_addr()
        .expect("metrics_address is set");
    let answer = crate::http::call_plain(addr, hyper::Method::GET, "/metrics", &[], Vec::new())
        .await
        .expect("GET /metrics");
    assert_eq!(answer.status.as_u16(), 200);
    String::from_utf8(answer.body).expect("UTF-8")
}

#[tokio::test]
async fn metrics_count_calls_on_both_listeners_and_read_state_at_the_scrape() {
    let server = TestServer::start_with(|config| {
        config.metrics_address = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    // CreateJoinToken on the admin socket, AttestAgent over TLS.
    server.attest_new_agent().await;
    let refused = attest_join_token(server.bootstrap_tls().await, "no-such-token").await;
    assert!(refused.is_err());

    let text = scrape(&server).await;
    for line in [
        "lanyard_server_rpc_calls_total{listener=\"admin\",service=\"spire.api.server.agent.v1.Agent\",method=\"CreateJoinToken\",code=\"OK\"} 1\n",
        "lanyard_server_rpc_calls_total{listener=\"tls\",service=\"spire.api.server.agent.v1.Agent\",method=\"AttestAgent\",code=\"OK\"} 1\n",
        "lanyard_server_rpc_calls_total{listener=\"tls\",service=\"spire.api.server.agent.v1.Agent\",method=\"AttestAgent\",code=\"PermissionDenied\"} 1\n",
        "lanyard_server_agent_attestations_total{attestation_type=\"join_token\",result=\"ok\"} 1\n",
        "lanyard_server_agent_attestations_total{attestation_type=\"join_token\",result=\"refused\"} 1\n",
        "lanyard_server_svids_signed_total{kind=\"agent_x509_svid\",result=\"ok\"} 1\n",
        "lanyard_server_agents 1\n",
        "lanyard_server_registration_entries 0\n",
        "lanyard_server_policy_exceptions_active 0\n",
        "lanyard_server_ledger_dropped_total 0\n",
        "lanyard_server_datastore_query_duration_seconds_count{operation=\"take_join_token\",result=\"refused\"} 1\n",
        "# TYPE lanyard_server_rpc_duration_seconds histogram\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    for authority in ["x509", "jwt"] {
        let prefix = format!("lanyard_server_ca_expires_in_seconds{{authority=\"{authority}\"}} ");
        let seconds: i64 = text
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
            .parse()
            .unwrap();
        assert!(seconds > 3600, "{authority} expires in {seconds} s");
    }
    assert!(
        text.contains("lanyard_server_build_info{version=\""),
        "{text}"
    );
}

#[tokio::test]
async fn without_metrics_address_nothing_is_served() {
    let server = TestServer::start().await;
    assert_eq!(server.server().metrics_addr(), None);
}
