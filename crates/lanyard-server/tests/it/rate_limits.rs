//! The server API's rate limits: attestation per source address, signing per agent, and the
//! client address a load balancer passes in a PROXY protocol v2 header; and the usage ledger
//! under repeated identical requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::tls::{InsecureBootstrapVerifier, client_config};
use lanyard_core::x509;
use lanyard_proto::lanyard::api::v1 as gov;
use lanyard_proto::lanyard::api::v1::usage_service_client::UsageServiceClient;
use lanyard_proto::spire::api::server::svid::v1 as svid_pb;
use lanyard_proto::spire::api::server::svid::v1::svid_client::SvidClient;
use lanyard_server::proxy_protocol;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt as _;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::issuance::create_entry;
use crate::support::{AttestedAgentIdentity, TestServer, attest_join_token, trust_domain};

async fn batch_new_x509_svid(
    server: &TestServer,
    agent: &AttestedAgentIdentity,
    entry_id: &str,
) -> Result<(), tonic::Status> {
    let csr = x509::build_csr(&KeyPair::generate(KeyType::EcP256).unwrap(), None).unwrap();
    let results = SvidClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
        .batch_new_x509svid(svid_pb::BatchNewX509svidRequest {
            params: vec![svid_pb::NewX509svidParams {
                entry_id: entry_id.to_owned(),
                csr,
            }],
        })
        .await?
        .into_inner()
        .results;
    assert_eq!(results[0].status.as_ref().unwrap().code, 0, "{results:?}");
    Ok(())
}

async fn new_jwt_svid(
    server: &TestServer,
    agent: &AttestedAgentIdentity,
    entry_id: &str,
) -> Result<(), tonic::Status> {
    SvidClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
        .new_jwtsvid(svid_pb::NewJwtsvidRequest {
            entry_id: entry_id.to_owned(),
            audience: vec!["db".into()],
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn attestation_beyond_the_per_address_limit_is_resource_exhausted() {
    let server = TestServer::start_with(|config| {
        // One attestation, then the next token in 100 s.
        config.limits.attestations_per_ip_per_second = 0.01;
    })
    .await;
    let first = server.join_token(600).await;
    let second = server.join_token(600).await;
    attest_join_token(server.bootstrap_tls().await, &first)
        .await
        .unwrap();
    let refused = attest_join_token(server.bootstrap_tls().await, &second)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("rate limiting"), "{refused:?}");
}

#[tokio::test]
async fn signing_beyond_the_per_agent_limit_is_refused_and_other_agents_are_unaffected() {
    let mut agents = Vec::new();
    let server = TestServer::start_with(|config| {
        config.limits.signings_per_agent_per_second = 0.01;
    })
    .await;
    for _ in 0..2 {
        agents.push(server.attest_new_agent().await);
    }
    let (busy, quiet) = (&agents[0], &agents[1]);
    let busy_entry = create_entry(&server, "/busy", &busy.id, 0).await;
    let quiet_entry = create_entry(&server, "/quiet", &quiet.id, 0).await;

    batch_new_x509_svid(&server, busy, &busy_entry)
        .await
        .unwrap();
    let refused = batch_new_x509_svid(&server, busy, &busy_entry)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let refused = new_jwt_svid(&server, busy, &busy_entry).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // The other agent, on the same address, has its own allowance.
    new_jwt_svid(&server, quiet, &quiet_entry).await.unwrap();
}

/// A TLS channel through a stand-in load balancer: the connection opens with a PROXY v2
/// header saying the client is `client`.
async fn channel_from(server: &TestServer, client: SocketAddr) -> Channel {
    let addr = server.addr();
    let verifier = InsecureBootstrapVerifier::new(trust_domain().server_id());
    let config = client_config(Arc::new(verifier), None).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Endpoint::try_from(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let mut tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.write_all(&proxy_protocol::encode(client, addr)).await?;
                let name = ServerName::try_from("lanyard-server").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

#[tokio::test]
async fn behind_a_load_balancer_the_proxied_address_is_rate_limited() {
    let server = TestServer::start_with(|config| {
        config.proxy_protocol = true;
        config.limits.attestations_per_ip_per_second = 0.01;
    })
    .await;
    let client_a: SocketAddr = "192.0.2.10:40000".parse().unwrap();
    let client_b: SocketAddr = "[2001:db8::10]:40000".parse().unwrap();

    let token = server.join_token(600).await;
    attest_join_token(channel_from(&server, client_a).await, &token)
        .await
        .unwrap();
    // The same client again, through a new connection from another port: limited.
    let again: SocketAddr = "192.0.2.10:40001".parse().unwrap();
    let token = server.join_token(600).await;
    let refused = attest_join_token(channel_from(&server, again).await, &token)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Another client behind the same balancer (the same TCP peer) is not.
    attest_join_token(channel_from(&server, client_b).await, &token)
        .await
        .unwrap();

    // A connection without the header is not served.
    assert!(server.try_tls(None).await.is_err());
}

async fn ledger_rows(server: &TestServer, entry_id: &str) -> Vec<gov::Issuance> {
    UsageServiceClient::new(server.admin().await)
        .list_issuances(gov::ListIssuancesRequest {
            entry_id: entry_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .issuances
}

/// Polls the ledger until `entry_id` has `n` rows (or 10 s pass); returns what it has.
async fn wait_for_rows(server: &TestServer, entry_id: &str, n: usize) -> Vec<gov::Issuance> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows = ledger_rows(server, entry_id).await;
        if rows.len() >= n || tokio::time::Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn repeated_identical_requests_do_not_grow_the_ledger() {
    const REPEATS: usize = 20;
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let entry = create_entry(&server, "/repeated", &agent.id, 0).await;
    let marker = create_entry(&server, "/marker", &agent.id, 0).await;
    for _ in 0..REPEATS {
        batch_new_x509_svid(&server, &agent, &entry).await.unwrap();
    }
    // The ledger writes in order: once the marker's row is in, every repeat has been seen.
    batch_new_x509_svid(&server, &agent, &marker).await.unwrap();
    assert_eq!(wait_for_rows(&server, &marker, 1).await.len(), 1);
    let rows = ledger_rows(&server, &entry).await;
    assert_eq!(rows.len(), 1, "the first issuance only, so far: {rows:?}");

    // When the window closes, the newest repeat is written too: first and last, not twenty.
    server.clock.advance(Duration::from_secs(61));
    let rows = wait_for_rows(&server, &entry, 2).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_ne!(
        rows[0].serial, rows[1].serial,
        "two different SVIDs: {rows:?}"
    );
}
