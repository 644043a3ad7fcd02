//! Governance end to end: the shipped baseline policy judges entry writes (SPIRE's Entry API
//! and Lanyard's governed entries), exceptions waive exactly their rules until they lapse or
//! are revoked, the usage ledger records issuances and agents' reports, and no SVID outlives
//! its entry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::{SpiffeId, x509};
use lanyard_proto::convert::spiffe_id_to_proto;
use lanyard_proto::lanyard::api::v1 as gov;
use lanyard_proto::lanyard::api::v1::entry_metadata_service_client::EntryMetadataServiceClient;
use lanyard_proto::lanyard::api::v1::exception_service_client::ExceptionServiceClient;
use lanyard_proto::lanyard::api::v1::governed_entry_service_client::GovernedEntryServiceClient;
use lanyard_proto::lanyard::api::v1::usage_service_client::UsageServiceClient;
use lanyard_proto::spire::api::server::entry::v1 as entry_pb;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_proto::spire::api::server::svid::v1 as svid_pb;
use lanyard_proto::spire::api::server::svid::v1::svid_client::SvidClient;
use lanyard_proto::spire::api::types;
use tonic::Code;

use crate::issuance::{mint, sync_ids};
use crate::support::{TestServer, trust_domain};

const DAY: u64 = 86_400;

fn baseline() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policy/baseline.rego")
}

pub(crate) async fn governed_server() -> TestServer {
    TestServer::start_with(|config| {
        config.policy = Some(lanyard_server::config::PolicyConfig::new(baseline()));
    })
    .await
}

fn unix(time: SystemTime) -> i64 {
    i64::try_from(time.duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

fn id(path: &str) -> SpiffeId {
    SpiffeId::from_path(&trust_domain(), path).unwrap()
}

/// An entry under `parent` for uid 1000, expiring `days` from the server's now.
pub(crate) fn entry(server: &TestServer, path: &str, parent: &SpiffeId, days: u64) -> types::Entry {
    let now = server.server().state().now();
    types::Entry {
        spiffe_id: Some(spiffe_id_to_proto(&id(path))),
        parent_id: Some(spiffe_id_to_proto(parent)),
        selectors: vec![types::Selector {
            r#type: "unix".into(),
            value: "uid:1000".into(),
        }],
        expires_at: unix(now + Duration::from_secs(days * DAY)),
        ..Default::default()
    }
}

pub(crate) fn metadata(owner: &str, reason: &str) -> gov::EntryMetadata {
    gov::EntryMetadata {
        owner: owner.into(),
        reason: reason.into(),
        ticket: String::new(),
        source: "test-suite".into(),
        entry_id: String::new(),
    }
}

pub(crate) async fn create_governed(
    server: &TestServer,
    entry: types::Entry,
    metadata: gov::EntryMetadata,
) -> gov::create_governed_entries_response::Result {
    GovernedEntryServiceClient::new(server.admin().await)
        .create_governed_entries(gov::CreateGovernedEntriesRequest {
            entries: vec![gov::GovernedEntry {
                entry: Some(entry),
                metadata: Some(metadata),
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0)
}

fn status(status: Option<&types::Status>) -> (i32, String) {
    let status = status.expect("every result has a status");
    (status.code, status.message.clone())
}

pub(crate) async fn create_exception(
    server: &TestServer,
    exception: gov::PolicyException,
) -> Result<gov::PolicyException, tonic::Status> {
    ExceptionServiceClient::new(server.admin().await)
        .create_exception(gov::CreateExceptionRequest {
            exception: Some(exception),
        })
        .await
        .map(tonic::Response::into_inner)
}

pub(crate) fn exception(
    rules: &[&str],
    pattern: &str,
    ticket: &str,
    days: u64,
    server: &TestServer,
) -> gov::PolicyException {
    gov::PolicyException {
        owner: "platform-team".into(),
        reason: "migration".into(),
        ticket: ticket.into(),
        rules: rules.iter().map(|r| (*r).to_owned()).collect(),
        spiffe_id_pattern: pattern.into(),
        expires_at: unix(server.server().state().now() + Duration::from_secs(days * DAY)),
        ..Default::default()
    }
}

#[tokio::test]
async fn entry_writes_are_judged_by_the_baseline_and_exceptions_waive_exactly_their_rules() {
    let server = governed_server().await;
    let parent = trust_domain().server_id();

    // SPIRE's API carries no owner or reason: refused, naming each rule and its fix.
    let response = EntryClient::new(server.admin().await)
        .batch_create_entry(entry_pb::BatchCreateEntryRequest {
            entries: vec![entry(&server, "/web", &parent, 30)],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    let (code, message) = status(response.results[0].status.as_ref());
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    for needle in ["owner-required", "reason-required", "fix: set --owner"] {
        assert!(message.contains(needle), "{needle} in {message}");
    }

    // With its metadata, the same entry passes and comes back with it.
    let created = create_governed(
        &server,
        entry(&server, "/web", &parent, 30),
        metadata("web-team", "serves the shop"),
    )
    .await;
    assert_eq!(status(created.status.as_ref()).0, 0, "{created:?}");
    let stored = created.entry.unwrap();
    let stored_meta = stored.metadata.unwrap();
    assert_eq!(stored_meta.owner, "web-team");
    assert_eq!(stored_meta.source, "test-suite");
    let web_id = stored.entry.unwrap().id;
    assert!(created.exception_ids.is_empty());

    // Too long an expiry, and an admin entry, are refused by their rules.
    let long = create_governed(
        &server,
        entry(&server, "/long", &parent, 91),
        metadata("o", "r"),
    )
    .await;
    let (code, message) = status(long.status.as_ref());
    assert_eq!(code, Code::InvalidArgument as i32);
    assert!(message.contains("expiry-max-90d"), "{message}");
    let mut admin = entry(&server, "/ops/admin", &parent, 30);
    admin.admin = true;
    let refused = create_governed(&server, admin.clone(), metadata("ops", "break glass")).await;
    let (code, message) = status(refused.status.as_ref());
    assert_eq!(code, Code::InvalidArgument as i32);
    assert!(message.contains("admin-needs-exception"), "{message}");

    // Exceptions are judged too: admin waivers need a ticket, and 30 days at most.
    let err = create_exception(
        &server,
        exception(
            &["admin-needs-exception"],
            "spiffe://example.org/ops/admin",
            "",
            1,
            &server,
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("exception-ticket-required"),
        "{}",
        err.message()
    );
    let err = create_exception(
        &server,
        exception(
            &["admin-needs-exception"],
            "spiffe://example.org/ops/admin",
            "CHG-1",
            31,
            &server,
        ),
    )
    .await
    .unwrap_err();
    assert!(
        err.message().contains("exception-max-30d"),
        "{}",
        err.message()
    );
    let err = create_exception(
        &server,
        exception(&["admin-needs-exception"], "", "CHG-1", 1, &server),
    )
    .await
    .unwrap_err();
    assert!(err.message().contains("scope"), "{}", err.message());
    let err = create_exception(
        &server,
        exception(
            &["admin-needs-exception"],
            "spiffe://other.org/x",
            "CHG-1",
            1,
            &server,
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // An exception for the admin rule, scoped to the ID: the admin entry passes under it,
    // and only the waived rule is waived (a missing owner still fails).
    let granted = create_exception(
        &server,
        exception(
            &["admin-needs-exception"],
            "spiffe://example.org/ops/*",
            "CHG-1",
            1,
            &server,
        ),
    )
    .await
    .unwrap();
    assert!(!granted.id.is_empty());
    assert_eq!(granted.created_by, "local uid ".to_owned() + &users_uid());
    let accepted = create_governed(&server, admin.clone(), metadata("ops", "break glass")).await;
    assert_eq!(status(accepted.status.as_ref()).0, 0, "{accepted:?}");
    assert_eq!(accepted.exception_ids, vec![granted.id.clone()]);
    let mut other_admin = entry(&server, "/ops/other", &parent, 30);
    other_admin.admin = true;
    let refused = create_governed(&server, other_admin, metadata("", "no owner")).await;
    let (_, message) = status(refused.status.as_ref());
    assert!(
        message.contains("owner-required") && !message.contains("admin-needs"),
        "{message}"
    );

    // Updates are judged as the entry will be: clearing the owner, or a 48h TTL, is refused.
    let cleared = EntryMetadataServiceClient::new(server.admin().await)
        .set_entry_metadata(gov::SetEntryMetadataRequest {
            metadata: vec![gov::EntryMetadata {
                entry_id: web_id.clone(),
                ..metadata("", "serves the shop")
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let (code, message) = status(cleared.results[0].status.as_ref());
    assert_eq!(code, Code::InvalidArgument as i32);
    assert!(message.contains("owner-required"), "{message}");
    let mut longer = entry(&server, "/web", &parent, 30);
    longer.id = web_id.clone();
    longer.x509_svid_ttl = 48 * 3600;
    let updated = EntryClient::new(server.admin().await)
        .batch_update_entry(entry_pb::BatchUpdateEntryRequest {
            entries: vec![longer],
            input_mask: Some(types::EntryMask {
                x509_svid_ttl: true,
                ..Default::default()
            }),
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    let (_, message) = status(updated.results[0].status.as_ref());
    assert!(message.contains("x509-ttl-max-24h"), "{message}");

    // Listing, extending past the cap, revoking twice.
    let client = || async { ExceptionServiceClient::new(server.admin().await) };
    let listed = client()
        .await
        .list_exceptions(gov::ListExceptionsRequest {
            include_inactive: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.exceptions.len(), 1);
    let too_far = client()
        .await
        .extend_exception(gov::ExtendExceptionRequest {
            id: granted.id.clone(),
            expires_at: unix(server.server().state().now() + Duration::from_secs(40 * DAY)),
            reason: "still migrating".into(),
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert!(
        too_far.message().contains("exception-max-30d"),
        "{}",
        too_far.message()
    );
    let extended = client()
        .await
        .extend_exception(gov::ExtendExceptionRequest {
            id: granted.id.clone(),
            expires_at: unix(server.server().state().now() + Duration::from_secs(2 * DAY)),
            reason: "still migrating".into(),
            expected_revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(extended.expires_at > granted.expires_at);
    let revoked = client()
        .await
        .revoke_exception(gov::RevokeExceptionRequest {
            id: granted.id.clone(),
            reason: "done".into(),
            expected_revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(revoked.revoked_at, 0);
    let again = client()
        .await
        .revoke_exception(gov::RevokeExceptionRequest {
            id: granted.id.clone(),
            reason: "done".into(),
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let active = client()
        .await
        .list_exceptions(gov::ListExceptionsRequest {
            include_inactive: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(active.exceptions.is_empty());
    let all = client()
        .await
        .list_exceptions(gov::ListExceptionsRequest {
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.exceptions.len(), 1);

    // Refusals are policy decisions too: each is in the audit log with its rules.
    let log = std::fs::read_to_string(server.config.audit_log_path()).unwrap();
    let refusals: Vec<serde_json::Value> = lanyard_core::audit::events(&log)
        .filter(|(_, _, event)| event["action"] == "entry refused by policy")
        .map(|(_, _, event)| event["details"].clone())
        .collect();
    assert!(
        refusals
            .iter()
            .any(|d| d["spiffe_id"] == "spiffe://example.org/web"
                && d["rules"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == "owner-required")),
        "{refusals:?}"
    );
}

/// This process's uid, as the kernel reports it for a file it creates.
fn users_uid() -> String {
    use std::os::unix::fs::MetadataExt as _;
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().metadata().unwrap().uid().to_string()
}

#[tokio::test]
async fn an_exception_lets_an_entry_issue_until_it_lapses_or_is_revoked() {
    let server = governed_server().await;
    let agent = server.attest_new_agent().await;
    let state = std::sync::Arc::clone(server.server().state());

    // A 48h TTL breaks x509-ttl-max-24h; an exception for /batch/* waives it for a day.
    let granted = create_exception(
        &server,
        exception(
            &["x509-ttl-max-24h"],
            "spiffe://example.org/batch/*",
            "",
            1,
            &server,
        ),
    )
    .await
    .unwrap();
    let mut batch = entry(&server, "/batch/nightly", &agent.id, 30);
    batch.x509_svid_ttl = 48 * 3600;
    let created = create_governed(&server, batch, metadata("data-team", "nightly batch")).await;
    assert_eq!(status(created.status.as_ref()).0, 0, "{created:?}");
    let batch_id = created.entry.unwrap().entry.unwrap().id;
    assert_eq!(created.exception_ids, vec![granted.id.clone()]);

    // In force: synced and minted, and the ledger records the exception with the SVID.
    assert_eq!(sync_ids(&server, &agent).await, vec![batch_id.clone()]);
    let minted = mint(&server, &agent, &batch_id).await;
    assert_eq!(minted.status.unwrap().code, 0);
    let issuances = wait_for_issuances(&server, &batch_id, 1).await;
    assert_eq!(issuances[0].exception_ids, vec![granted.id.clone()]);

    // Just before the exception's end it still holds; just after, it does not, with nobody
    // sweeping anything: the decision is made against the clock at issuance. (The test
    // clock moves in whole seconds from a fractional start, hence the one-second margins;
    // the exact boundary is tested in the core with an explicit `now`.)
    let expires = UNIX_EPOCH + Duration::from_secs(u64::try_from(granted.expires_at).unwrap());
    let until_end = expires.duration_since(state.now()).unwrap();
    server
        .clock
        .advance(Duration::from_secs(until_end.as_secs() - 1));
    assert!(state.now() < expires);
    assert_eq!(state.authorized_entries(&agent.id).len(), 1);
    server.clock.advance(Duration::from_secs(2));
    assert!(state.now() > expires);
    assert!(state.authorized_entries(&agent.id).is_empty());
}

#[tokio::test]
async fn revoking_an_exception_ends_what_it_allowed_at_once() {
    let server = governed_server().await;
    let agent = server.attest_new_agent().await;
    let state = std::sync::Arc::clone(server.server().state());
    let granted = create_exception(
        &server,
        exception(
            &["admin-needs-exception", "x509-ttl-max-24h"],
            "spiffe://example.org/ops/*",
            "CHG-7",
            1,
            &server,
        ),
    )
    .await
    .unwrap();
    let mut admin = entry(&server, "/ops/admin", &agent.id, 30);
    admin.admin = true;
    let created = create_governed(&server, admin, metadata("ops", "break glass")).await;
    let admin_entry = created.entry.unwrap().entry.unwrap().id;
    assert_eq!(sync_ids(&server, &agent).await, vec![admin_entry]);
    assert!(state.is_admin_id(&id("/ops/admin")));

    ExceptionServiceClient::new(server.admin().await)
        .revoke_exception(gov::RevokeExceptionRequest {
            id: granted.id,
            reason: "incident closed".into(),
            expected_revision: None,
        })
        .await
        .unwrap();
    assert!(sync_ids(&server, &agent).await.is_empty());
    assert!(
        !state.is_admin_id(&id("/ops/admin")),
        "an admin entry without its exception grants nothing"
    );

    // The audit log holds the exception's life and each change of the entry's standing.
    let log = std::fs::read_to_string(server.config.audit_log_path()).unwrap();
    lanyard_core::audit::verify(&log).unwrap();
    let actions: Vec<String> = lanyard_core::audit::events(&log)
        .map(|(_, _, event)| event["action"].as_str().unwrap().to_owned())
        .filter(|action| !action.starts_with("agent") && !action.starts_with("join"))
        .collect();
    assert_eq!(
        actions,
        [
            "exception created",
            "entry created",
            "entry authorizes at issuance",
            "exception revoked",
            "entry stopped authorizing at issuance",
        ]
    );
}

async fn wait_for_issuances(server: &TestServer, entry_id: &str, n: usize) -> Vec<gov::Issuance> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let issuances = UsageServiceClient::new(server.admin().await)
            .list_issuances(gov::ListIssuancesRequest {
                entry_id: entry_id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .issuances;
        if issuances.len() >= n || std::time::Instant::now() > deadline {
            return issuances;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_ledger_records_issuances_and_what_agents_report_serving() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let other = server.attest_new_agent().await;
    let state = std::sync::Arc::clone(server.server().state());
    let web = create_governed(
        &server,
        entry(&server, "/web", &agent.id, 30),
        metadata("web", "shop"),
    )
    .await
    .entry
    .unwrap()
    .entry
    .unwrap()
    .id;
    let theirs = create_governed(
        &server,
        entry(&server, "/theirs", &other.id, 30),
        metadata("x", "y"),
    )
    .await
    .entry
    .unwrap()
    .entry
    .unwrap()
    .id;

    assert_eq!(mint(&server, &agent, &web).await.status.unwrap().code, 0);
    let jwt = SvidClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
        .new_jwtsvid(svid_pb::NewJwtsvidRequest {
            entry_id: web.clone(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();

    let issuances = wait_for_issuances(&server, &web, 2).await;
    assert_eq!(issuances.len(), 2, "{issuances:?}");
    let x509_authority = state.ca.x509_ca().unwrap().authority_id();
    let jwt_key = state.ca.jwt_key().unwrap().key_id.clone();
    let x509_record = issuances.iter().find(|i| i.kind == "x509-svid").unwrap();
    assert_eq!(x509_record.authority_id, x509_authority);
    assert_eq!(x509_record.agent_id, agent.id.to_string());
    assert_eq!(x509_record.spiffe_id, "spiffe://example.org/web");
    let jwt_record = issuances.iter().find(|i| i.kind == "jwt-svid").unwrap();
    assert_eq!(jwt_record.authority_id, jwt_key);
    assert_eq!(jwt_record.not_after, jwt.expires_at);

    // Agents' own SVIDs are in the ledger too: both agents hold SVIDs from the CA.
    let holders = UsageServiceClient::new(server.admin().await)
        .list_issuances(gov::ListIssuancesRequest {
            authority_id: x509_authority.clone(),
            unexpired_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .issuances;
    let agents: std::collections::BTreeSet<&str> =
        holders.iter().map(|i| i.agent_id.as_str()).collect();
    assert!(
        agents.contains(agent.id.as_str()) && agents.contains(other.id.as_str()),
        "{agents:?}"
    );
    assert!(holders.iter().any(|i| i.kind == "agent-svid"));

    // The agent reports serving its entry; a claim on another agent's entry is ignored.
    let served_at = unix(state.now()) - 5;
    UsageServiceClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
        .report_usage(gov::ReportUsageRequest {
            served: vec![
                gov::report_usage_request::Served {
                    entry_id: web.clone(),
                    last_served_at: served_at,
                },
                gov::report_usage_request::Served {
                    entry_id: theirs.clone(),
                    last_served_at: served_at,
                },
            ],
        })
        .await
        .unwrap();
    let usage = UsageServiceClient::new(server.admin().await)
        .list_usage(gov::ListUsageRequest {
            entry_ids: vec![web.clone(), theirs.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .usage;
    assert_eq!(usage.len(), 1, "{usage:?}");
    assert_eq!(usage[0].entry_id, web);
    assert_eq!(usage[0].agent_id, agent.id.to_string());
    assert_eq!(usage[0].last_served_at, served_at);
    assert_eq!(usage[0].issued, 2);
    assert!(usage[0].last_issued_at > 0);

    // Only agents report usage; only admins read it.
    let err = UsageServiceClient::new(server.admin().await)
        .report_usage(gov::ReportUsageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = UsageServiceClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
        .list_usage(gov::ListUsageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn no_svid_outlives_its_entry() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let now = server.server().state().now();
    let mut short = entry(&server, "/grant", &agent.id, 0);
    let ends = now + Duration::from_secs(120);
    short.expires_at = unix(ends);
    short.x509_svid_ttl = 3600;
    short.jwt_svid_ttl = 3600;
    let id = create_governed(&server, short, metadata("me", "debugging"))
        .await
        .entry
        .unwrap()
        .entry
        .unwrap()
        .id;

    let svid = mint(&server, &agent, &id).await.svid.unwrap();
    let verified = x509::verify_svid_chain(
        &svid.cert_chain,
        &trust_domain(),
        &server.authorities(),
        SystemTime::now(),
    )
    .unwrap();
    assert!(
        verified.not_after() <= ends,
        "{:?} after {:?}",
        verified.not_after(),
        ends
    );
    assert!(verified.not_after() + Duration::from_secs(2) >= ends);
    let jwt = SvidClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
        .new_jwtsvid(svid_pb::NewJwtsvidRequest {
            entry_id: id,
            audience: vec!["db".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert!(jwt.expires_at <= unix(ends));
}

#[tokio::test]
async fn the_ledger_forgets_issuances_past_its_retention() {
    let server = TestServer::start_with(|config| {
        config.ledger_retention = Duration::from_secs(DAY);
    })
    .await;
    let agent = server.attest_new_agent().await;
    let web = create_governed(
        &server,
        entry(&server, "/web", &agent.id, 30),
        metadata("web", "shop"),
    )
    .await
    .entry
    .unwrap()
    .entry
    .unwrap()
    .id;
    assert_eq!(mint(&server, &agent, &web).await.status.unwrap().code, 0);
    assert_eq!(wait_for_issuances(&server, &web, 1).await.len(), 1);

    // A day and a second later, the server's periodic pass (every 5 s) prunes it.
    server.clock.advance(Duration::from_secs(DAY + 1));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = UsageServiceClient::new(server.admin().await)
            .list_issuances(gov::ListIssuancesRequest {
                entry_id: web.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .issuances;
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still in the ledger: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// 10000-01-01T00:00:00Z: the first second a certificate's validity cannot hold.
const PAST_YEAR_9999: i64 = 253_402_300_800;

/// An expiry after 9999-12-31T23:59:59Z is refused with InvalidArgument on every write path:
/// SPIRE's entry API and Lanyard's governed entries, on create and on update, and exceptions.
#[tokio::test]
async fn expiries_a_certificate_cannot_hold_are_refused_on_every_write_path() {
    let server = TestServer::start().await;
    let parent = trust_domain().server_id();
    let far = |path: &str, expires_at: i64| types::Entry {
        expires_at,
        ..entry(&server, path, &parent, 1)
    };
    let refused = |(code, message): (i32, String)| {
        assert_eq!(code, Code::InvalidArgument as i32, "{message}");
        assert!(message.contains("9999-12-31T23:59:59Z"), "{message}");
    };

    for expires_at in [PAST_YEAR_9999, i64::MAX] {
        let response = EntryClient::new(server.admin().await)
            .batch_create_entry(entry_pb::BatchCreateEntryRequest {
                entries: vec![far("/spire-api", expires_at)],
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner();
        refused(status(response.results[0].status.as_ref()));
        let result = create_governed(
            &server,
            far("/governed", expires_at),
            metadata("team", "test"),
        )
        .await;
        refused(status(result.status.as_ref()));
    }

    // The last second a certificate can hold is accepted on both, and can be updated past it
    // on neither.
    let response = EntryClient::new(server.admin().await)
        .batch_create_entry(entry_pb::BatchCreateEntryRequest {
            entries: vec![far("/spire-api", PAST_YEAR_9999 - 1)],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    let (code, message) = status(response.results[0].status.as_ref());
    assert_eq!(code, Code::Ok as i32, "{message}");
    let mut stored = response.results[0].entry.clone().expect("the stored entry");
    assert_eq!(stored.expires_at, PAST_YEAR_9999 - 1);
    stored.expires_at = PAST_YEAR_9999;
    let response = EntryClient::new(server.admin().await)
        .batch_update_entry(entry_pb::BatchUpdateEntryRequest {
            entries: vec![stored.clone()],
            input_mask: None,
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    refused(status(response.results[0].status.as_ref()));

    let result = create_governed(
        &server,
        far("/governed", PAST_YEAR_9999 - 1),
        metadata("team", "test"),
    )
    .await;
    let (code, message) = status(result.status.as_ref());
    assert_eq!(code, Code::Ok as i32, "{message}");
    let mut governed = result.entry.expect("the stored entry");
    if let Some(entry) = governed.entry.as_mut() {
        entry.expires_at = i64::MAX;
    }
    let response = GovernedEntryServiceClient::new(server.admin().await)
        .update_governed_entries(gov::UpdateGovernedEntriesRequest {
            entries: vec![governed],
            updates: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    refused(status(response.results[0].status.as_ref()));

    // Nothing refused was stored.
    let listed = EntryClient::new(server.admin().await)
        .list_entries(entry_pb::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 2);
    assert!(
        listed.iter().all(|e| e.expires_at == PAST_YEAR_9999 - 1),
        "{listed:?}"
    );

    // An exception cannot outlive what it waives for either.
    let mut too_late = exception(&["some-rule"], "spiffe://example.org/*", "T-1", 1, &server);
    too_late.expires_at = PAST_YEAR_9999;
    let error = create_exception(&server, too_late)
        .await
        .expect_err("past year 9999");
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert!(
        error.message().contains("9999-12-31T23:59:59Z"),
        "{error:?}"
    );
}

/// A server with the baseline policy and a named admin socket for spire-controller-manager.
async fn server_with_controller_socket() -> (TestServer, std::path::PathBuf) {
    let mut controller_socket = None;
    let server = TestServer::start_with(|config| {
        config.policy = Some(lanyard_server::config::PolicyConfig::new(baseline()));
        let path = config
            .socket_path
            .parent()
            .and_then(std::path::Path::parent)
            .unwrap()
            .join("controller")
            .join("api.sock");
        controller_socket = Some(path.clone());
        config
            .admin_sockets
            .push(lanyard_server::config::AdminSocketConfig {
                name: "spire-controller-manager".into(),
                path,
                owner: Some("platform-team".into()),
                reason: Some("kept from the cluster's ClusterSPIFFEIDs".into()),
                source: None,
            });
    })
    .await;
    (server, controller_socket.unwrap())
}

async fn entry_metadata(server: &TestServer, entry_id: &str) -> gov::EntryMetadata {
    EntryMetadataServiceClient::new(server.admin().await)
        .get_entry_metadata(gov::GetEntryMetadataRequest {
            entry_ids: vec![entry_id.to_owned()],
        })
        .await
        .unwrap()
        .into_inner()
        .metadata
        .remove(0)
}

#[tokio::test]
async fn entries_created_through_a_named_admin_socket_carry_its_owner_reason_and_source() {
    use std::os::unix::fs::PermissionsExt as _;

    let (server, controller_socket) = server_with_controller_socket().await;
    let mode = std::fs::metadata(&controller_socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the named socket is owner-only");
    let parent = trust_domain().server_id();
    // As spire-controller-manager sends it: SPIRE's Entry API, its own ID prefix, no expiry.
    let mut pod_entry = entry(&server, "/ns/apps/sa/web", &parent, 0);
    pod_entry.expires_at = 0;
    pod_entry.id = "demo.6c0f9f4e-0000-4000-8000-000000000001".into();
    let create = |channel, entry: types::Entry| async move {
        EntryClient::new(channel)
            .batch_create_entry(entry_pb::BatchCreateEntryRequest {
                entries: vec![entry],
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner()
            .results
            .remove(0)
    };

    // Through the main socket the baseline refuses it: no owner, reason or expiry.
    let refused = create(server.admin().await, pod_entry.clone()).await;
    let (code, message) = status(refused.status.as_ref());
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    for rule in ["owner-required", "reason-required", "expiry-required"] {
        assert!(message.contains(rule), "{rule} in {message}");
    }

    // Through the controller's socket it is attributed to the socket and passes.
    let created = create(
        crate::support::uds_channel(&controller_socket).await,
        pod_entry.clone(),
    )
    .await;
    assert_eq!(status(created.status.as_ref()).0, 0, "{created:?}");
    let created_id = created.entry.unwrap().id;
    assert_eq!(created_id, pod_entry.id, "the controller's own ID is kept");
    let meta = entry_metadata(&server, &created_id).await;
    assert_eq!(meta.owner, "platform-team");
    assert_eq!(meta.reason, "kept from the cluster's ClusterSPIFFEIDs");
    assert_eq!(meta.source, "spire-controller-manager");
    let audit = std::fs::read_to_string(server.config.audit_log_path()).unwrap();
    assert!(
        audit.contains("via admin socket spire-controller-manager"),
        "the audit log names the socket:\n{audit}"
    );

    // No one else may claim the socket's source: not on a new entry ...
    let mut claimed = metadata("intruder", "dodging the expiry rule");
    claimed.source = "spire-controller-manager".into();
    let mut forged = entry(&server, "/forged", &parent, 0);
    forged.expires_at = 0;
    let refused = create_governed(&server, forged, claimed.clone()).await;
    let (code, message) = status(refused.status.as_ref());
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    assert!(message.contains("kept for"), "{message}");

    // ... nor on an existing one.
    let hand = create_governed(
        &server,
        entry(&server, "/hand", &parent, 30),
        metadata("web-team", "by hand"),
    )
    .await;
    let mut hand = hand.entry.unwrap();
    let hand_id = hand.entry.as_ref().unwrap().id.clone();
    claimed.entry_id = hand_id.clone();
    hand.metadata = Some(claimed);
    let updated = GovernedEntryServiceClient::new(server.admin().await)
        .update_governed_entries(gov::UpdateGovernedEntriesRequest {
            entries: vec![hand],
            updates: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    let (code, message) = status(updated.status.as_ref());
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    assert!(message.contains("kept for"), "{message}");
    assert_eq!(entry_metadata(&server, &hand_id).await.source, "test-suite");

    // An operator may still edit the controller's entry without taking its source.
    let mut reowned = meta.clone();
    reowned.owner = "mesh-team".into();
    let set = EntryMetadataServiceClient::new(server.admin().await)
        .set_entry_metadata(gov::SetEntryMetadataRequest {
            metadata: vec![reowned],
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    let (code, message) = status(set.status.as_ref());
    assert_eq!(code, 0, "{message}");
    let meta = entry_metadata(&server, &created_id).await;
    assert_eq!(
        (meta.owner.as_str(), meta.source.as_str()),
        ("mesh-team", "spire-controller-manager")
    );
}

/// A governed update of `fields` (by `mask`) over `expected_revision`.
fn masked_update(
    entry: types::Entry,
    metadata: gov::EntryMetadata,
    mask: types::EntryMask,
    metadata_mask: gov::EntryMetadataMask,
    expected_revision: Option<i64>,
) -> gov::GovernedEntryUpdate {
    gov::GovernedEntryUpdate {
        entry: Some(gov::GovernedEntry {
            entry: Some(entry),
            metadata: Some(metadata),
        }),
        entry_mask: Some(mask),
        metadata_mask: Some(metadata_mask),
        expected_revision,
    }
}

async fn update_one(
    server: &TestServer,
    update: gov::GovernedEntryUpdate,
) -> gov::update_governed_entries_response::Result {
    GovernedEntryServiceClient::new(server.admin().await)
        .update_governed_entries(gov::UpdateGovernedEntriesRequest {
            entries: Vec::new(),
            updates: vec![update],
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0)
}

async fn stored_entry(server: &TestServer, id: &str) -> Option<types::Entry> {
    EntryClient::new(server.admin().await)
        .get_entry(entry_pb::GetEntryRequest {
            id: id.to_owned(),
            output_mask: None,
        })
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_refuse_a_revision_the_entry_has_left_and_masks_keep_other_fields() {
    let server = governed_server().await;
    let parent = trust_domain().server_id();
    let created = create_governed(
        &server,
        entry(&server, "/conditional", &parent, 30),
        metadata("team-a", "first reason"),
    )
    .await;
    let stored = created.entry.unwrap().entry.unwrap();
    let (id, read_at) = (stored.id.clone(), stored.revision_number);

    // Two writers read the same revision; the first changes the TTL, the second the hint.
    let ttl_only = types::EntryMask {
        x509_svid_ttl: true,
        ..Default::default()
    };
    let hint_only = types::EntryMask {
        hint: true,
        ..Default::default()
    };
    let no_metadata = gov::EntryMetadataMask::default();
    let mut first = stored.clone();
    first.x509_svid_ttl = 1800;
    let first = update_one(
        &server,
        masked_update(
            first,
            metadata("", ""),
            ttl_only,
            no_metadata,
            Some(read_at),
        ),
    )
    .await;
    let (code, message) = status(first.status.as_ref());
    assert_eq!(code, Code::Ok as i32, "{message}");
    let after_first = first.entry.unwrap().entry.unwrap();
    assert_eq!(after_first.revision_number, read_at + 1);

    // The second, over the revision it read, is refused with the current one, and writes
    // nothing.
    let mut second = stored.clone();
    second.hint = "edge".into();
    let refused = update_one(
        &server,
        masked_update(
            second.clone(),
            metadata("", ""),
            hint_only,
            no_metadata,
            Some(read_at),
        ),
    )
    .await;
    let (code, message) = status(refused.status.as_ref());
    assert_eq!(code, Code::Aborted as i32, "{message}");
    assert_eq!(refused.current_revision, read_at + 1);
    assert!(
        message.contains(&format!("revision {read_at}")),
        "{message}"
    );
    assert_eq!(stored_entry(&server, &id).await.unwrap(), after_first);

    // Over the new revision it goes through, and the first writer's TTL stays: only the
    // masked field was written.
    let second = update_one(
        &server,
        masked_update(
            second,
            metadata("", ""),
            hint_only,
            no_metadata,
            Some(read_at + 1),
        ),
    )
    .await;
    let (code, message) = status(second.status.as_ref());
    assert_eq!(code, Code::Ok as i32, "{message}");
    let now = stored_entry(&server, &id).await.unwrap();
    assert_eq!((now.x509_svid_ttl, now.hint.as_str()), (1800, "edge"));

    // A metadata mask writes only its fields: the owner changes, the reason stays.
    let owner_only = gov::EntryMetadataMask {
        owner: true,
        ..Default::default()
    };
    let renamed = update_one(
        &server,
        masked_update(
            now.clone(),
            metadata("team-b", "ignored"),
            types::EntryMask::default(),
            owner_only,
            None,
        ),
    )
    .await;
    let (code, message) = status(renamed.status.as_ref());
    assert_eq!(code, Code::Ok as i32, "{message}");
    let renamed = renamed.entry.unwrap();
    let renamed_metadata = renamed.metadata.unwrap();
    assert_eq!(
        (
            renamed_metadata.owner.as_str(),
            renamed_metadata.reason.as_str()
        ),
        ("team-b", "first reason")
    );
    let at = renamed.entry.unwrap().revision_number;

    // A delete over a revision the entry has left deletes nothing; over its own it deletes.
    let delete = async |expected_revision: Option<i64>| {
        GovernedEntryServiceClient::new(server.admin().await)
            .delete_governed_entries(gov::DeleteGovernedEntriesRequest {
                entries: vec![gov::delete_governed_entries_request::Item {
                    id: id.clone(),
                    expected_revision,
                }],
            })
            .await
            .unwrap()
            .into_inner()
            .results
            .remove(0)
    };
    let stale = delete(Some(read_at)).await;
    let (code, message) = status(stale.status.as_ref());
    assert_eq!(code, Code::Aborted as i32, "{message}");
    assert_eq!(stale.current_revision, at);
    assert!(stored_entry(&server, &id).await.is_some());
    let deleted = delete(Some(at)).await;
    let (code, message) = status(deleted.status.as_ref());
    assert_eq!(code, Code::Ok as i32, "{message}");
    assert!(stored_entry(&server, &id).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_count_their_revisions_and_refuse_a_stale_extend_or_revoke() {
    let server = governed_server().await;
    let client = async || ExceptionServiceClient::new(server.admin().await);
    let created = create_exception(
        &server,
        exception(
            &["x509-ttl-max-24h"],
            "spiffe://example.org/batch",
            "T-9",
            2,
            &server,
        ),
    )
    .await
    .unwrap();
    assert_eq!(created.revision, 1);
    let later = |days: u64| unix(server.server().state().now() + Duration::from_secs(days * DAY));
    let extended = client()
        .await
        .extend_exception(gov::ExtendExceptionRequest {
            id: created.id.clone(),
            expires_at: later(3),
            reason: "more time".into(),
            expected_revision: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(extended.revision, 2);
    // A writer that read revision 1 is refused, whichever change it makes.
    let stale = client()
        .await
        .extend_exception(gov::ExtendExceptionRequest {
            id: created.id.clone(),
            expires_at: later(4),
            reason: "even more".into(),
            expected_revision: Some(1),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    assert!(stale.message().contains("revision 2"), "{stale:?}");
    let stale = client()
        .await
        .revoke_exception(gov::RevokeExceptionRequest {
            id: created.id.clone(),
            reason: "done".into(),
            expected_revision: Some(1),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    let unchanged = client()
        .await
        .get_exception(gov::GetExceptionRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged, extended);
    let revoked = client()
        .await
        .revoke_exception(gov::RevokeExceptionRequest {
            id: created.id.clone(),
            reason: "done".into(),
            expected_revision: Some(2),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revision, 3);
    assert_ne!(revoked.revoked_at, 0);
}
