//! Node attestation and agent administration through the real gRPC API: join tokens and
//! x509pop over TLS, renewal, bans, eviction, restarts.

use std::time::Duration;

use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::x509::{self, CaSubject, SvidParams, X509Ca};
use lanyard_core::x509pop;
use lanyard_proto::convert::spiffe_id_to_proto;
use lanyard_proto::spire::api::server::agent::v1 as pb;
use lanyard_proto::spire::api::server::agent::v1::agent_client::AgentClient;
use lanyard_proto::spire::api::types::permission_denied_details::Reason;
use lanyard_server::api::errors::denial_reason;
use tonic::Code;

use crate::support::{TestServer, attest, attest_join_token, attest_with_key, trust_domain};

#[tokio::test]
async fn join_token_attestation_yields_an_agent_svid_that_verifies() {
    let server = TestServer::start().await;
    let token = server.join_token(600).await;
    let agent = attest_join_token(server.bootstrap_tls().await, &token)
        .await
        .unwrap();
    assert_eq!(
        agent.id,
        trust_domain().join_token_agent_id(&token).unwrap(),
        "SPIRE's join token agent ID"
    );
    assert!(!agent.reattestable);
    let verified = x509::verify_svid_chain(
        &agent.chain,
        &trust_domain(),
        &server.authorities(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    assert_eq!(verified.spiffe_id(), &agent.id);

    // The agent is recorded, with its serial.
    let listed = AgentClient::new(server.admin().await)
        .get_agent(pb::GetAgentRequest {
            id: Some(spiffe_id_to_proto(&agent.id)),
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.attestation_type, "join_token");
    assert_eq!(listed.x509svid_serial_number, verified.serial());
    assert!(!listed.banned);
}

#[tokio::test]
async fn a_join_token_works_once_and_not_after_it_expires() {
    let server = TestServer::start().await;
    let token = server.join_token(600).await;
    attest_join_token(server.bootstrap_tls().await, &token)
        .await
        .unwrap();
    let reused = attest_join_token(server.bootstrap_tls().await, &token)
        .await
        .err()
        .unwrap();
    assert_eq!(reused.code(), Code::PermissionDenied, "{reused:?}");

    let short = server.join_token(1).await;
    server.clock.advance(Duration::from_secs(5));
    let expired = attest_join_token(server.bootstrap_tls().await, &short)
        .await
        .err()
        .unwrap();
    assert_eq!(expired.code(), Code::PermissionDenied);
    assert!(expired.message().contains("expired"), "{expired:?}");

    let unknown = attest_join_token(server.bootstrap_tls().await, "no-such-token")
        .await
        .err()
        .unwrap();
    assert_eq!(unknown.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn malformed_attestation_requests_are_invalid_arguments() {
    let server = TestServer::start().await;
    let err = attest(
        server.bootstrap_tls().await,
        "tpm_magic",
        b"x".to_vec(),
        |_| None,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = attest(
        server.bootstrap_tls().await,
        "join_token",
        Vec::new(),
        |_| None,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    // x509pop is not configured on this server.
    let err = attest(
        server.bootstrap_tls().await,
        "x509pop",
        b"{}".to_vec(),
        |_| None,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn renewal_then_the_old_svid_is_no_longer_active() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let mut client = AgentClient::new(server.tls(Some((&agent.chain, &agent.key))).await);
    let new_key = KeyPair::generate(KeyType::EcP256).unwrap();
    let renewed = client
        .renew_agent(pb::RenewAgentRequest {
            params: Some(pb::AgentX509svidParams {
                csr: x509::build_csr(&new_key, None).unwrap(),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(
        x509::spiffe_id_of(&renewed.cert_chain[0]).unwrap(),
        agent.id
    );

    // Until the new SVID is used, the old one still works.
    let mut old_client = AgentClient::new(server.tls(Some((&agent.chain, &agent.key))).await);
    let again = old_client
        .renew_agent(pb::RenewAgentRequest {
            params: Some(pb::AgentX509svidParams {
                csr: x509::build_csr(&new_key, None).unwrap(),
            }),
        })
        .await;
    assert!(again.is_ok(), "{again:?}");
    let newest = again.unwrap().into_inner().svid.unwrap();

    // Using the newest SVID promotes it; the first one is then refused as not active.
    let mut new_client = AgentClient::new(server.tls(Some((&newest.cert_chain, &new_key))).await);
    new_client
        .renew_agent(pb::RenewAgentRequest {
            params: Some(pb::AgentX509svidParams {
                csr: x509::build_csr(&new_key, None).unwrap(),
            }),
        })
        .await
        .unwrap();
    let mut stale = AgentClient::new(server.tls(Some((&agent.chain, &agent.key))).await);
    let denied = stale
        .renew_agent(pb::RenewAgentRequest {
            params: Some(pb::AgentX509svidParams {
                csr: x509::build_csr(&new_key, None).unwrap(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(denial_reason(&denied), Some(Reason::AgentNotActive));
}

#[tokio::test]
async fn a_banned_agent_is_refused_and_eviction_removes_it() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let mut admin = AgentClient::new(server.admin().await);
    admin
        .ban_agent(pb::BanAgentRequest {
            id: Some(spiffe_id_to_proto(&agent.id)),
        })
        .await
        .unwrap();
    let listed = admin
        .list_agents(pb::ListAgentsRequest {
            filter: Some(pb::list_agents_request::Filter {
                by_banned: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.agents.len(), 1);
    assert!(listed.agents[0].banned);

    let mut client = AgentClient::new(server.tls(Some((&agent.chain, &agent.key))).await);
    let denied = client
        .renew_agent(pb::RenewAgentRequest {
            params: Some(pb::AgentX509svidParams {
                csr: x509::build_csr(&agent.key, None).unwrap(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(denial_reason(&denied), Some(Reason::AgentBanned));

    admin
        .delete_agent(pb::DeleteAgentRequest {
            id: Some(spiffe_id_to_proto(&agent.id)),
        })
        .await
        .unwrap();
    let count = admin
        .count_agents(pb::CountAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 0);
    let denied = client
        .renew_agent(pb::RenewAgentRequest {
            params: Some(pb::AgentX509svidParams {
                csr: x509::build_csr(&agent.key, None).unwrap(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(denial_reason(&denied), Some(Reason::AgentNotAttested));
}

#[tokio::test]
async fn admin_rpcs_refuse_agents_and_anonymous_tls_callers() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    for channel in [
        server.tls(Some((&agent.chain, &agent.key))).await,
        server.tls(None).await,
    ] {
        let err = AgentClient::new(channel)
            .create_join_token(pb::CreateJoinTokenRequest {
                ttl: 60,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(
            err.message(),
            "authorization denied for method /spire.api.server.agent.v1.Agent/CreateJoinToken"
        );
    }
}

#[tokio::test]
async fn a_restarted_server_keeps_its_ca_and_agents() {
    let mut server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let authorities = server.authorities();
    let entry = lanyard_core::RegistrationEntry::new(
        lanyard_core::EntryId::new("kept").unwrap(),
        "spiffe://example.org/kept".parse().unwrap(),
        agent.id.clone(),
        ["unix:uid:1".parse().unwrap()].into_iter().collect(),
        std::time::SystemTime::now(),
    );
    let state = server.server().state().clone();
    state.store.create_entry(entry).await.unwrap();
    state.catch_up().await.unwrap();
    drop(state);
    server.restart().await;
    assert_eq!(server.authorities(), authorities);
    // Entries survive and are authorized to the same agent again.
    let authorized = server.server().state().authorized_entries(&agent.id);
    assert_eq!(authorized.len(), 1);
    assert_eq!(authorized[0].id.as_str(), "kept");
    // The agent's SVID still authenticates it.
    let mut client = AgentClient::new(server.tls(Some((&agent.chain, &agent.key))).await);
    client
        .renew_agent(pb::RenewAgentRequest {
            params: Some(pb::AgentX509svidParams {
                csr: x509::build_csr(&agent.key, None).unwrap(),
            }),
        })
        .await
        .unwrap();
}

/// An x509pop setup: a CA file the server trusts and an agent certificate issued by it.
fn x509pop_pki(dir: &std::path::Path) -> (std::path::PathBuf, Vec<Vec<u8>>, KeyPair) {
    let td = lanyard_core::TrustDomain::new("agents.example").unwrap();
    let now = std::time::SystemTime::now();
    let ca = X509Ca::self_signed(
        &td,
        KeyPair::generate(KeyType::EcP256).unwrap(),
        &CaSubject::default(),
        now,
        Duration::from_secs(3600),
    )
    .unwrap();
    let leaf_key = KeyPair::generate(KeyType::EcP256).unwrap();
    let leaf = ca
        .mint_svid(
            &SvidParams::new(
                "spiffe://agents.example/node1".parse().unwrap(),
                leaf_key.public_key_der(),
                Duration::from_secs(3600),
            ),
            now,
        )
        .unwrap();
    let path = dir.join("agent-ca.pem");
    std::fs::write(
        &path,
        lanyard_core::keys::pem_encode("CERTIFICATE", ca.cert_der()),
    )
    .unwrap();
    (path, leaf.cert_chain().to_vec(), leaf_key)
}

#[tokio::test]
async fn x509pop_attests_with_the_right_key_only() {
    let pki_dir = tempfile::tempdir().unwrap();
    let (ca_path, chain, leaf_key) = x509pop_pki(pki_dir.path());
    let server = TestServer::start_with(|config| {
        config.node_attestor.x509pop = Some(lanyard_server::config::X509PopConfig {
            ca_bundle_path: ca_path.clone(),
        });
    })
    .await;

    let payload = x509pop::build_attestation_payload(&chain);
    let agent = attest(
        server.bootstrap_tls().await,
        "x509pop",
        payload.clone(),
        |challenge| x509pop::answer_challenge(&leaf_key, challenge).ok(),
    )
    .await
    .unwrap();
    let fingerprint = x509::fingerprint_sha1_hex(&chain[0]);
    assert_eq!(
        agent.id,
        trust_domain().x509pop_agent_id(&fingerprint).unwrap()
    );
    assert!(agent.reattestable);
    let record = AgentClient::new(server.admin().await)
        .get_agent(pb::GetAgentRequest {
            id: Some(spiffe_id_to_proto(&agent.id)),
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(record.can_reattest);
    assert!(
        record
            .selectors
            .iter()
            .any(|s| s.r#type == "x509pop" && s.value.starts_with("ca:fingerprint:")),
        "{:?}",
        record.selectors
    );

    // A reattestable agent may not renew; it must attest again.
    let mut client = AgentClient::new(server.tls(Some((&agent.chain, &agent.key))).await);
    let denied = client
        .renew_agent(pb::RenewAgentRequest {
            params: Some(pb::AgentX509svidParams {
                csr: x509::build_csr(&agent.key, None).unwrap(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(denial_reason(&denied), Some(Reason::AgentMustReattest));

    // Answering with a key that is not the certificate's is refused.
    let wrong_key = KeyPair::generate(KeyType::EcP256).unwrap();
    let err = attest_with_key(
        server.bootstrap_tls().await,
        "x509pop",
        payload,
        KeyPair::generate(KeyType::EcP256).unwrap(),
        |challenge| x509pop::answer_challenge(&wrong_key, challenge).ok(),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn agents_filter_by_expiry_in_the_layout_spire_server_cli_sends() {
    // `spire-server agent list -expiresBefore` and `agent count` pass the time through in Go's
    // `2006-01-02 15:04:05 -0700 -07` layout.
    let server = TestServer::start().await;
    server.attest_new_agent().await;
    let mut admin = AgentClient::new(server.admin().await);
    for (before, expected) in [
        ("2001-02-03 04:05:06 +0000 +00", 0),
        ("2999-01-02 15:04:05 -0700 -07", 1),
        ("2999-01-02 15:04:05 +0530 +05", 1),
        ("32503680000", 1),
        ("2999-01-01T00:00:00Z", 1),
    ] {
        let listed = admin
            .list_agents(pb::ListAgentsRequest {
                filter: Some(pb::list_agents_request::Filter {
                    by_expires_before: before.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("listing agents expiring before {before:?}: {e}"))
            .into_inner();
        assert_eq!(listed.agents.len(), expected, "{before}");
        let counted = admin
            .count_agents(pb::CountAgentsRequest {
                filter: Some(pb::count_agents_request::Filter {
                    by_expires_before: before.to_owned(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_or_else(|e| panic!("counting agents expiring before {before:?}: {e}"))
            .into_inner();
        assert_eq!(counted.count, i32::try_from(expected).unwrap(), "{before}");
    }
    for malformed in [
        "2030-01-02 15:04:05 +0100 +02",
        "2030-01-02 15:04:05 +01",
        "tomorrow",
    ] {
        let refused = admin
            .list_agents(pb::ListAgentsRequest {
                filter: Some(pb::list_agents_request::Filter {
                    by_expires_before: malformed.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{malformed}");
    }
}
