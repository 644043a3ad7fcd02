//! Revocations: an admin revokes X.509-SVIDs by serial, SPIFFE ID, entry or agent, or a
//! JWT-SVID by jti; the server lists the serials on CRLs signed by its authorities, tells the
//! agents' change streams, gives agents the revocations and CRLs, records their
//! acknowledgements (with the SVIDs they dropped, checked before they reach the CRLs), and
//! refuses bad input storing nothing.

use std::time::{Duration, SystemTime};

use lanyard_core::ledger::IssuanceKind;
use lanyard_core::x509::{X509Error, verify_svid_chain_with_crls};
use lanyard_proto::lanyard::api::v1::acknowledge_revocations_request::Dropped;
use lanyard_proto::lanyard::api::v1::agent_change_service_client::AgentChangeServiceClient;
use lanyard_proto::lanyard::api::v1::agent_revocation_service_client::AgentRevocationServiceClient;
use lanyard_proto::lanyard::api::v1::revocation_service_client::RevocationServiceClient;
use lanyard_proto::lanyard::api::v1::{
    AcknowledgeRevocationsRequest, FetchRevocationsRequest, FetchRevocationsResponse,
    GetRevocationRequest, ListRevocationsRequest, RevokeRequest, RevokeResponse,
    WatchChangesRequest,
};
use lanyard_server::datastore::IssuanceFilter;
use tonic::Code;

use crate::issuance::{create_entry, mint};
use crate::support::{AttestedAgentIdentity, TestServer, trust_domain};

fn request(kind: &str, value: &str) -> RevokeRequest {
    RevokeRequest {
        kind: kind.to_owned(),
        value: value.to_owned(),
        owner: "security".to_owned(),
        reason: "key material leaked".to_owned(),
        ticket: "INC-42".to_owned(),
        dry_run: false,
    }
}

async fn revoke(
    server: &TestServer,
    request: RevokeRequest,
) -> Result<RevokeResponse, tonic::Status> {
    RevocationServiceClient::new(server.admin().await)
        .revoke(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn fetch(
    server: &TestServer,
    agent: &AttestedAgentIdentity,
    after: i64,
) -> FetchRevocationsResponse {
    AgentRevocationServiceClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
        .fetch_revocations(FetchRevocationsRequest {
            after_sequence: after,
            crl_number: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

/// An X.509-SVID for `entry_id`, minted for `agent`: its chain and decimal serial.
async fn svid(
    server: &TestServer,
    agent: &AttestedAgentIdentity,
    entry_id: &str,
) -> (Vec<Vec<u8>>, String) {
    let result = mint(server, agent, entry_id).await;
    let chain = result.svid.unwrap().cert_chain;
    let serial = lanyard_core::x509::serial_decimal(&chain[0]).unwrap();
    (chain, serial)
}

/// Waits until the ledger holds `serials` (its writer runs behind the minting).
async fn wait_for_ledger(server: &TestServer, serials: &[&str]) {
    let store = &server.server().state().store;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (recorded, _) = store
            .list_issuances(&IssuanceFilter::default(), None)
            .await
            .unwrap();
        if serials
            .iter()
            .all(|serial| recorded.iter().any(|i| i.serial == *serial))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ledger never recorded {serials:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Acknowledges revocation sequence 1 for `agent`, reporting `chains` dropped for
/// `revocation_id`: the drops listed and refused.
async fn acknowledge(
    server: &TestServer,
    agent: &AttestedAgentIdentity,
    revocation_id: &str,
    chains: &[&[Vec<u8>]],
) -> (u32, u32) {
    let answer =
        AgentRevocationServiceClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
            .acknowledge_revocations(AcknowledgeRevocationsRequest {
                sequence: 1,
                dropped: chains
                    .iter()
                    .map(|chain| Dropped {
                        revocation_id: revocation_id.to_owned(),
                        certificates: chain.to_vec(),
                    })
                    .collect(),
            })
            .await
            .unwrap()
            .into_inner();
    (answer.listed, answer.refused)
}

fn verdict(server: &TestServer, chain: &[Vec<u8>], crls: &[Vec<u8>]) -> Result<(), X509Error> {
    verify_svid_chain_with_crls(
        chain,
        &trust_domain(),
        &server.authorities(),
        crls,
        SystemTime::now(),
    )
    .map(|_| ())
}

#[tokio::test]
async fn a_revoked_identity_is_on_the_crl_agents_hear_of_it_and_acknowledge() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let other = server.attest_new_agent().await;
    // The same identity on two agents; the ledger holds each one's SVID.
    let web = create_entry(&server, "/web", &agent.id, 0).await;
    let other_web = create_entry(&server, "/web", &other.id, 0).await;
    let db = create_entry(&server, "/db", &agent.id, 0).await;
    let (web_chain, web_serial) = svid(&server, &agent, &web).await;
    let (web_chain2, web_serial2) = svid(&server, &other, &other_web).await;
    let (db_chain, db_serial) = svid(&server, &agent, &db).await;
    wait_for_ledger(&server, &[&web_serial, &web_serial2, &db_serial]).await;
    // Minted again within the ledger's coalescing window: not recorded yet, so only the
    // agent's report of having dropped it can put it on the CRLs.
    let (web_mid_chain, web_mid_serial) = svid(&server, &agent, &web).await;
    let mut notices =
        AgentChangeServiceClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
            .watch_changes(WatchChangesRequest {})
            .await
            .unwrap()
            .into_inner();
    let first = notices.message().await.unwrap().unwrap();
    assert_eq!(first.revocation_sequence, 0);

    // A dry run answers the serials the ledger holds for the identity and stores nothing.
    let mut dry = request("spiffe-id", "spiffe://example.org/web");
    dry.dry_run = true;
    let preview = revoke(&server, dry).await.unwrap();
    let mut serials: Vec<String> = preview.serials.iter().map(|s| s.serial.clone()).collect();
    serials.sort();
    let mut expected = vec![web_serial.clone(), web_serial2.clone()];
    expected.sort();
    assert_eq!(serials, expected);
    assert_eq!(preview.revocation.as_ref().unwrap().sequence, 0);
    let listed = RevocationServiceClient::new(server.admin().await)
        .list_revocations(ListRevocationsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.revocations.is_empty(), "a dry run stores nothing");

    let made = revoke(&server, request("spiffe-id", "spiffe://example.org/web"))
        .await
        .unwrap();
    let revocation = made.revocation.unwrap();
    assert_eq!(revocation.sequence, 1);
    assert_eq!(revocation.owner, "security");
    assert_eq!(made.serials.len(), 2);
    let authority = server.server().state().ca.x509_ca().unwrap().authority_id();
    assert!(made.serials.iter().all(|s| s.authority_id == authority));

    // The agents' change streams announce it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let notice = tokio::time::timeout(Duration::from_secs(10), notices.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if notice.revocation_sequence == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no notice of the revocation"
        );
    }

    // The agent gets the revocation and CRLs that refuse both revoked SVIDs, and only them.
    let fetched = fetch(&server, &agent, 0).await;
    assert_eq!(fetched.sequence, 1);
    assert_eq!(fetched.revocations.len(), 1);
    assert_eq!(fetched.revocations[0].id, revocation.id);
    assert!(!fetched.crls.is_empty());
    assert!(matches!(
        verdict(&server, &web_chain, &fetched.crls),
        Err(X509Error::Revoked)
    ));
    assert!(matches!(
        verdict(&server, &web_chain2, &fetched.crls),
        Err(X509Error::Revoked)
    ));
    verdict(&server, &db_chain, &fetched.crls).unwrap();
    // What is minted for the identity afterwards (in a later second) is not covered.
    server.clock.advance(Duration::from_secs(1));
    let (fresh_chain, _) = svid(&server, &agent, &web).await;
    verdict(&server, &fresh_chain, &fetched.crls).unwrap();
    assert!(fetch(&server, &agent, 1).await.revocations.is_empty());
    // Lists the caller holds already are not sent again.
    let again =
        AgentRevocationServiceClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
            .fetch_revocations(FetchRevocationsRequest {
                after_sequence: 1,
                crl_number: fetched.crl_number,
            })
            .await
            .unwrap()
            .into_inner();
    assert!(again.crls.is_empty());
    assert_eq!(again.crl_number, fetched.crl_number);

    // Until the agent acknowledges, it is pending; its dropped SVIDs join the CRLs.
    let admin = || async { RevocationServiceClient::new(server.admin().await) };
    let detail = admin()
        .await
        .get_revocation(GetRevocationRequest {
            id: revocation.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut pending = detail.pending_agent_ids.clone();
    pending.sort();
    let mut both = vec![agent.id.to_string(), other.id.to_string()];
    both.sort();
    assert_eq!(pending, both);
    assert!(detail.acknowledged.is_empty());
    let agent_client = || async {
        AgentRevocationServiceClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
    };
    let too_far = agent_client()
        .await
        .acknowledge_revocations(AcknowledgeRevocationsRequest {
            sequence: 7,
            dropped: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(too_far.code(), Code::InvalidArgument);
    verdict(&server, &web_mid_chain, &fetched.crls).unwrap();
    let dropped = |chain: &[Vec<u8>]| Dropped {
        revocation_id: revocation.id.clone(),
        certificates: chain.to_vec(),
    };
    let mut forged = web_mid_chain.clone();
    let last = forged[0].len() - 1;
    forged[0][last] ^= 1;
    let answer = agent_client()
        .await
        .acknowledge_revocations(AcknowledgeRevocationsRequest {
            sequence: 1,
            dropped: vec![
                // Covered, and unknown to the ledger: listed.
                dropped(&web_mid_chain),
                // Covered and listed already.
                dropped(&web_chain),
                // Issued after the revocation was made.
                dropped(&fresh_chain),
                // Another identity, which the revocation does not cover.
                dropped(&db_chain),
                // A signature that does not verify.
                dropped(&forged),
                // No certificate.
                dropped(&[]),
                // A revocation that is not there.
                Dropped {
                    revocation_id: "no-such-revocation".to_owned(),
                    certificates: web_mid_chain.clone(),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((answer.listed, answer.refused), (2, 5));
    // Drops for a revocation acknowledged already are not taken again.
    let answer = agent_client()
        .await
        .acknowledge_revocations(AcknowledgeRevocationsRequest {
            sequence: 1,
            dropped: vec![dropped(&web_mid_chain)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((answer.listed, answer.refused), (0, 1));
    // The audit log records the acknowledgement, once.
    let log = std::fs::read_to_string(server.config.audit_log_path()).unwrap();
    let acks: Vec<serde_json::Value> = lanyard_core::audit::events(&log)
        .filter(|(_, _, event)| event["action"] == "revocations acknowledged")
        .map(|(_, _, event)| event.clone())
        .collect();
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert_eq!(acks[0]["caller"], agent.id.as_str());
    assert_eq!(acks[0]["details"]["sequence"], 1);
    assert_eq!(acks[0]["details"]["dropped_listed"], 2);
    assert_eq!(acks[0]["details"]["dropped_refused"], 5);
    let detail = admin()
        .await
        .get_revocation(GetRevocationRequest {
            id: revocation.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(detail.pending_agent_ids, [other.id.to_string()]);
    assert_eq!(detail.acknowledged.len(), 1);
    assert_eq!(detail.acknowledged[0].agent_id, agent.id.to_string());
    let mut listed: Vec<&str> = detail.serials.iter().map(|s| s.serial.as_str()).collect();
    listed.sort_unstable();
    let mut expected = vec![
        web_serial.as_str(),
        web_serial2.as_str(),
        web_mid_serial.as_str(),
    ];
    expected.sort_unstable();
    assert_eq!(listed, expected);
    assert!(detail.serials.iter().all(|s| s.authority_id == authority));
    let fetched = fetch(&server, &agent, 0).await;
    assert!(matches!(
        verdict(&server, &web_mid_chain, &fetched.crls),
        Err(X509Error::Revoked)
    ));
    verdict(&server, &fresh_chain, &fetched.crls).unwrap();
    verdict(&server, &db_chain, &fetched.crls).unwrap();

    // Only admins revoke; only agents fetch and acknowledge.
    let denied = RevocationServiceClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
        .revoke(request("x509-serial", "5"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = AgentRevocationServiceClient::new(server.admin().await)
        .fetch_revocations(FetchRevocationsRequest {
            after_sequence: 0,
            crl_number: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn an_entrys_revocation_takes_dropped_svids_only_from_agents_authorized_for_it() {
    let server = TestServer::start().await;
    let holder = server.attest_new_agent().await;
    let intruder = server.attest_new_agent().await;
    // The same identity through two entries, one per agent.
    let revoked_entry = create_entry(&server, "/web", &holder.id, 0).await;
    let intruders_entry = create_entry(&server, "/web", &intruder.id, 0).await;
    let (first, first_serial) = svid(&server, &holder, &revoked_entry).await;
    let (theirs, theirs_serial) = svid(&server, &intruder, &intruders_entry).await;
    wait_for_ledger(&server, &[&first_serial, &theirs_serial]).await;
    // Coalesced by the ledger: known to no one but the agent that holds it.
    let (held, held_serial) = svid(&server, &holder, &revoked_entry).await;
    let made = revoke(&server, request("entry", &revoked_entry))
        .await
        .unwrap();
    assert_eq!(made.serials.len(), 1);
    assert_eq!(made.serials[0].serial, first_serial);
    let revocation_id = made.revocation.unwrap().id;
    // Certificates are public: an agent not authorized for the revoked entry cannot put what
    // it has seen on the CRLs, neither the holder's SVID nor its own of the same identity.
    assert_eq!(
        acknowledge(&server, &intruder, &revocation_id, &[&held, &theirs]).await,
        (0, 2)
    );
    let fetched = fetch(&server, &intruder, 0).await;
    verdict(&server, &held, &fetched.crls).unwrap();
    verdict(&server, &theirs, &fetched.crls).unwrap();
    assert!(matches!(
        verdict(&server, &first, &fetched.crls),
        Err(X509Error::Revoked)
    ));
    // The holder's report is taken, once.
    assert_eq!(
        acknowledge(&server, &holder, &revocation_id, &[&held]).await,
        (1, 0)
    );
    assert_eq!(
        acknowledge(&server, &holder, &revocation_id, &[&held]).await,
        (0, 1)
    );
    let fetched = fetch(&server, &holder, 0).await;
    assert!(matches!(
        verdict(&server, &held, &fetched.crls),
        Err(X509Error::Revoked)
    ));
    verdict(&server, &theirs, &fetched.crls).unwrap();
    let serials = server
        .server()
        .state()
        .store
        .list_revoked_serials(None)
        .await
        .unwrap();
    let mut listed: Vec<&str> = serials.iter().map(|s| s.serial.as_str()).collect();
    listed.sort_unstable();
    let mut expected = vec![first_serial.as_str(), held_serial.as_str()];
    expected.sort_unstable();
    assert_eq!(listed, expected);
}

#[tokio::test]
async fn an_authority_replaced_by_a_rotation_keeps_signing_its_crl_until_it_expires() {
    use lanyard_server::ca::AuthorityKind;

    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let web = create_entry(&server, "/web", &agent.id, 0).await;
    let (old_chain, old_serial) = svid(&server, &agent, &web).await;
    let state = server.server().state();
    let old_authority = state.ca.x509_ca().unwrap().authority_id();
    // A rotation: the next authority prepared and activated; the SVID's issuer is now old.
    let now = state.now();
    let prepared = state
        .ca
        .prepare_authority(AuthorityKind::X509, now)
        .await
        .unwrap();
    state
        .ca
        .activate_authority(AuthorityKind::X509, &prepared.authority_id, now)
        .await
        .unwrap();
    assert_ne!(state.ca.x509_ca().unwrap().authority_id(), old_authority);
    let made = revoke(&server, request("x509-serial", &old_serial))
        .await
        .unwrap();
    assert_eq!(made.serials[0].authority_id, old_authority);
    // The old authority's key signs a list that refuses the SVID; every list is the issuer's.
    let fetched = fetch(&server, &agent, 0).await;
    let signers: Vec<String> = fetched.crls.iter().map(|der| crl_issuer(der)).collect();
    assert!(signers.contains(&old_authority), "{signers:?}");
    assert!(signers.contains(&prepared.authority_id), "{signers:?}");
    assert!(matches!(
        verdict(&server, &old_chain, &fetched.crls),
        Err(X509Error::Revoked)
    ));
    // Once the old authority has expired it signs no more.
    let old_expiry = lanyard_core::x509::validity_of(
        &server
            .authorities()
            .into_iter()
            .find(|der| lanyard_core::x509::authority_id_of(der).unwrap() == old_authority)
            .unwrap(),
    )
    .unwrap()
    .1;
    assert!(
        state
            .ca
            .crl_signers(old_expiry)
            .iter()
            .all(|ca| ca.authority_id() != old_authority)
    );
    assert!(
        state
            .ca
            .crl_signers(state.now())
            .iter()
            .any(|ca| ca.authority_id() == old_authority)
    );
}

/// The authority key ID (hex) of a DER CRL: the authority that signed it.
fn crl_issuer(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer as _;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der).unwrap();
    crl.extensions()
        .iter()
        .find_map(|extension| match extension.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => aki
                .key_identifier
                .as_ref()
                .map(|id| id.0.iter().map(|b| format!("{b:02x}")).collect()),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn a_serial_and_a_jwt_id_are_revoked_one_at_a_time() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let web = create_entry(&server, "/web", &agent.id, 0).await;
    let (chain, serial) = svid(&server, &agent, &web).await;
    let (other_chain, _) = svid(&server, &agent, &web).await;
    wait_for_ledger(&server, &[&serial]).await;
    let made = revoke(&server, request("x509-serial", &format!("000{serial}")))
        .await
        .unwrap();
    assert_eq!(made.serials.len(), 1);
    assert_eq!(made.serials[0].serial, serial, "leading zeros dropped");
    // Kept until the certificate expires, as the ledger knows it.
    let not_after = lanyard_core::x509::validity_of(&chain[0]).unwrap().1;
    let kept = made.revocation.as_ref().unwrap().expires_at;
    assert_eq!(
        kept,
        i64::try_from(
            not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        )
        .unwrap()
    );
    // A serial the ledger never saw is listed on every authority's CRL.
    let unknown = revoke(&server, request("x509-serial", "123456789"))
        .await
        .unwrap();
    assert_eq!(unknown.serials[0].authority_id, "");
    let jwt = revoke(&server, request("jwt-id", "0f3c-jti"))
        .await
        .unwrap();
    assert!(jwt.serials.is_empty());
    assert_eq!(jwt.revocation.unwrap().sequence, 3);

    let fetched = fetch(&server, &agent, 0).await;
    assert_eq!(fetched.sequence, 3);
    let kinds: Vec<&str> = fetched
        .revocations
        .iter()
        .map(|r| r.kind.as_str())
        .collect();
    assert_eq!(kinds, ["x509-serial", "x509-serial", "jwt-id"]);
    assert!(matches!(
        verdict(&server, &chain, &fetched.crls),
        Err(X509Error::Revoked)
    ));
    verdict(&server, &other_chain, &fetched.crls).unwrap();
}

#[tokio::test]
async fn revoking_an_agent_bans_it_and_lists_its_own_svid() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let bystander = server.attest_new_agent().await;
    let agent_serial = lanyard_core::x509::serial_decimal(&agent.chain[0]).unwrap();
    wait_for_ledger(&server, &[&agent_serial]).await;
    let made = revoke(&server, request("agent", agent.id.as_str()))
        .await
        .unwrap();
    assert!(made.banned);
    assert!(made.serials.iter().any(|s| s.serial == agent_serial));
    // Banned: its calls are refused at once.
    let refused =
        AgentRevocationServiceClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
            .fetch_revocations(FetchRevocationsRequest {
                after_sequence: 0,
                crl_number: 0,
            })
            .await
            .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let fetched = fetch(&server, &bystander, 0).await;
    assert!(matches!(
        verdict(&server, &agent.chain, &fetched.crls),
        Err(X509Error::Revoked)
    ));
    verdict(&server, &bystander.chain, &fetched.crls).unwrap();
    // The ledger's record of the agent's SVID was what listed it.
    let (ledger, _) = server
        .server()
        .state()
        .store
        .list_issuances(&IssuanceFilter::default(), None)
        .await
        .unwrap();
    assert!(
        ledger
            .iter()
            .any(|i| i.kind == IssuanceKind::AgentSvid && i.serial == agent_serial)
    );
}

#[tokio::test]
async fn bad_revocations_are_refused_and_store_nothing() {
    let server = TestServer::start().await;
    let cases = [
        (
            request("certificate", "1"),
            Code::InvalidArgument,
            "unknown revocation target kind",
        ),
        (
            request("x509-serial", "0xdead"),
            Code::InvalidArgument,
            "not a decimal number",
        ),
        (
            request("x509-serial", ""),
            Code::InvalidArgument,
            "not a decimal number",
        ),
        (
            request("spiffe-id", "spiffe://other.org/web"),
            Code::InvalidArgument,
            "not in trust domain",
        ),
        (
            request("spiffe-id", "https://example.org/web"),
            Code::InvalidArgument,
            "scheme",
        ),
        (
            request("entry", "no-such-entry"),
            Code::NotFound,
            "not found",
        ),
        (
            request(
                "agent",
                "spiffe://example.org/spire/agent/join_token/nobody",
            ),
            Code::NotFound,
            "not found",
        ),
        (
            request("jwt-id", &"j".repeat(300)),
            Code::InvalidArgument,
            "JWT ID",
        ),
        (
            RevokeRequest {
                owner: " ".into(),
                ..request("jwt-id", "j")
            },
            Code::InvalidArgument,
            "missing owner",
        ),
        (
            RevokeRequest {
                reason: String::new(),
                ..request("jwt-id", "j")
            },
            Code::InvalidArgument,
            "missing reason",
        ),
        (
            RevokeRequest {
                ticket: "a\nb".into(),
                ..request("jwt-id", "j")
            },
            Code::InvalidArgument,
            "control characters",
        ),
    ];
    for (request, code, text) in cases {
        let what = format!("{} {:?}", request.kind, request.value);
        let status = revoke(&server, request).await.unwrap_err();
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(text),
            "{what}: {}",
            status.message()
        );
    }
    let state = server.server().state();
    assert!(state.store.list_revocations(0).await.unwrap().is_empty());
    assert_eq!(state.revocations.sequence(), 0);
}
