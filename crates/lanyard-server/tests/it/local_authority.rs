//! SPIRE's LocalAuthority API on the Lanyard server: prepare, activate, taint and revoke the
//! X.509 CA and the JWT key, with SPIRE's refusals, and what each step does to the bundle,
//! to new SVIDs, and to the usage ledger's view of who holds SVIDs from an authority.

use std::time::{Duration, SystemTime};

use lanyard_core::x509;
use lanyard_proto::lanyard::api::v1 as gov;
use lanyard_proto::lanyard::api::v1::usage_service_client::UsageServiceClient;
use lanyard_proto::spire::api::server::localauthority::v1 as pb;
use lanyard_proto::spire::api::server::localauthority::v1::local_authority_client::LocalAuthorityClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::issuance::mint;
use crate::support::{TestServer, trust_domain};

async fn client(server: &TestServer) -> LocalAuthorityClient<Channel> {
    LocalAuthorityClient::new(server.admin().await)
}

async fn x509_state(server: &TestServer) -> pb::GetX509AuthorityStateResponse {
    client(server)
        .await
        .get_x509_authority_state(pb::GetX509AuthorityStateRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn id(state: Option<&pb::AuthorityState>) -> Option<&str> {
    state.map(|s| s.authority_id.as_str())
}

/// The bundle's X.509 authorities as (authority ID, tainted).
fn bundle_x509(server: &TestServer) -> Vec<(String, bool)> {
    server
        .server()
        .state()
        .bundle()
        .x509_authorities()
        .iter()
        .map(|a| (x509::authority_id_of(a.der()).unwrap(), a.is_tainted()))
        .collect()
}

#[tokio::test]
async fn the_x509_authority_is_prepared_activated_tainted_and_revoked_like_spires() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let entry = crate::issuance::create_entry(&server, "/web", &agent.id, 0).await;
    let first = server.server().state().ca.x509_ca().unwrap().authority_id();
    assert_eq!(mint(&server, &agent, &entry).await.status.unwrap().code, 0);

    let state = x509_state(&server).await;
    assert_eq!(id(state.active.as_ref()), Some(first.as_str()));
    assert!(state.prepared.is_none() && state.old.is_none(), "{state:?}");
    assert!(state.active.unwrap().expires_at > 0);

    // Nothing to activate yet; no ID at all is an invalid argument.
    let err = client(&server)
        .await
        .activate_x509_authority(pb::ActivateX509AuthorityRequest {
            authority_id: first.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = client(&server)
        .await
        .activate_x509_authority(pb::ActivateX509AuthorityRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Prepare: a second authority, published in the bundle before it signs anything.
    let prepared = client(&server)
        .await
        .prepare_x509_authority(pb::PrepareX509AuthorityRequest {})
        .await
        .unwrap()
        .into_inner()
        .prepared_authority
        .unwrap();
    assert_ne!(prepared.authority_id, first);
    let ids: Vec<String> = bundle_x509(&server).into_iter().map(|(id, _)| id).collect();
    assert!(
        ids.contains(&first) && ids.contains(&prepared.authority_id),
        "{ids:?}"
    );
    let err = client(&server)
        .await
        .activate_x509_authority(pb::ActivateX509AuthorityRequest {
            authority_id: first.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "only the prepared one activates"
    );

    // Activate: the new one signs, the first becomes old.
    let activated = client(&server)
        .await
        .activate_x509_authority(pb::ActivateX509AuthorityRequest {
            authority_id: prepared.authority_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .activated_authority
        .unwrap();
    assert_eq!(activated.authority_id, prepared.authority_id);
    let state = x509_state(&server).await;
    assert_eq!(
        id(state.active.as_ref()),
        Some(prepared.authority_id.as_str())
    );
    assert_eq!(id(state.old.as_ref()), Some(first.as_str()));
    let svid = mint(&server, &agent, &entry).await.svid.unwrap();
    let new_ca = server.server().state().ca.x509_ca().unwrap();
    x509::verify_svid_chain(
        &svid.cert_chain,
        &trust_domain(),
        &[new_ca.cert_der()],
        SystemTime::now(),
    )
    .expect("new SVIDs chain to the activated authority");

    // Before tainting: the ledger says which agents hold SVIDs from the old authority.
    let holders = wait_for_holders(&server, &first).await;
    assert!(holders.contains(&agent.id.to_string()), "{holders:?}");

    // Taint and revoke: only the old one, only in that order, each once.
    let err = client(&server)
        .await
        .taint_x509_authority(pb::TaintX509AuthorityRequest {
            authority_id: prepared.authority_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "the active authority cannot be tainted"
    );
    let err = client(&server)
        .await
        .revoke_x509_authority(pb::RevokeX509AuthorityRequest {
            authority_id: first.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "revoking needs a taint first"
    );
    let tainted = client(&server)
        .await
        .taint_x509_authority(pb::TaintX509AuthorityRequest {
            authority_id: first.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tainted_authority
        .unwrap();
    assert_eq!(tainted.authority_id, first);
    assert!(bundle_x509(&server).contains(&(first.clone(), true)));
    assert!(bundle_x509(&server).contains(&(prepared.authority_id.clone(), false)));
    let err = client(&server)
        .await
        .taint_x509_authority(pb::TaintX509AuthorityRequest {
            authority_id: first.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    client(&server)
        .await
        .revoke_x509_authority(pb::RevokeX509AuthorityRequest {
            authority_id: first.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        bundle_x509(&server),
        vec![(prepared.authority_id.clone(), false)]
    );
    assert!(x509_state(&server).await.old.is_none());
    let err = client(&server)
        .await
        .revoke_x509_authority(pb::RevokeX509AuthorityRequest {
            authority_id: first.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "gone from the bundle");

    // The server's own SVID moved to the new authority when it was activated, so clients
    // trusting only the bundle as it is now still reach the server.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while server.try_tls(None).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server still presents an SVID from the revoked authority"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The rotation survives a restart of the server on the same data.
    let mut server = server;
    server.restart().await;
    let state = x509_state(&server).await;
    assert_eq!(
        id(state.active.as_ref()),
        Some(prepared.authority_id.as_str())
    );
    assert_eq!(
        bundle_x509(&server),
        vec![(prepared.authority_id.clone(), false)]
    );

    // No upstream authority here.
    let err = client(&server)
        .await
        .taint_x509_upstream_authority(pb::TaintX509UpstreamAuthorityRequest {
            subject_key_id: "ab".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

async fn wait_for_holders(server: &TestServer, authority: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let issuances = UsageServiceClient::new(server.admin().await)
            .list_issuances(gov::ListIssuancesRequest {
                authority_id: authority.into(),
                unexpired_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .issuances;
        let agents: Vec<String> = issuances.into_iter().map(|i| i.agent_id).collect();
        if !agents.is_empty() || std::time::Instant::now() > deadline {
            return agents;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_jwt_key_goes_through_the_same_steps() {
    let server = TestServer::start().await;
    let first = server.server().state().ca.jwt_key().unwrap().key_id.clone();
    let state = client(&server)
        .await
        .get_jwt_authority_state(pb::GetJwtAuthorityStateRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(id(state.active.as_ref()), Some(first.as_str()));

    let prepared = client(&server)
        .await
        .prepare_jwt_authority(pb::PrepareJwtAuthorityRequest {})
        .await
        .unwrap()
        .into_inner()
        .prepared_authority
        .unwrap();
    assert!(
        server
            .server()
            .state()
            .bundle()
            .jwt_authority(&prepared.authority_id)
            .is_some()
    );
    client(&server)
        .await
        .activate_jwt_authority(pb::ActivateJwtAuthorityRequest {
            authority_id: prepared.authority_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        server.server().state().ca.jwt_key().unwrap().key_id,
        prepared.authority_id
    );
    let state = client(&server)
        .await
        .get_jwt_authority_state(pb::GetJwtAuthorityStateRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(id(state.old.as_ref()), Some(first.as_str()));

    client(&server)
        .await
        .taint_jwt_authority(pb::TaintJwtAuthorityRequest {
            authority_id: first.clone(),
        })
        .await
        .unwrap();
    assert!(
        server
            .server()
            .state()
            .bundle()
            .jwt_authority(&first)
            .unwrap()
            .is_tainted()
    );
    client(&server)
        .await
        .revoke_jwt_authority(pb::RevokeJwtAuthorityRequest {
            authority_id: first.clone(),
        })
        .await
        .unwrap();
    assert!(
        server
            .server()
            .state()
            .bundle()
            .jwt_authority(&first)
            .is_none()
    );
    let err = client(&server)
        .await
        .taint_jwt_authority(pb::TaintJwtAuthorityRequest {
            authority_id: prepared.authority_id,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
