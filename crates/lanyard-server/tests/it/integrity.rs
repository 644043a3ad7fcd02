//! The root of trust stays itself: a server that lost its datastore or a key file refuses to
//! start rather than mint a new CA over the old one, and the server's own identity (or any
//! reserved one) is never issued to an agent, however the entry got into the datastore.

use std::path::{Path, PathBuf};

use lanyard_core::{EntryId, RegistrationEntry, Selector};
use lanyard_proto::convert::spiffe_id_to_proto;
use lanyard_proto::spire::api::server::agent::v1 as agent_pb;
use lanyard_proto::spire::api::server::agent::v1::agent_client::AgentClient;
use lanyard_proto::spire::api::server::entry::v1 as entry_pb;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_server::{Server, ServerConfig, ServerError};
use tonic::Code;

use crate::issuance::mint;
use crate::support::{TestClock, TestServer, attest_join_token, trust_domain};

/// Every file under `dir`, with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

async fn start_error(config: &ServerConfig) -> ServerError {
    Server::start(config.clone(), TestClock::new().clock())
        .await
        .expect_err("the server must refuse to start")
}

fn remove_datastore(config: &ServerConfig) {
    let path = config.datastore_path();
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.clone().into_os_string();
        name.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
}

#[tokio::test]
async fn a_missing_or_empty_datastore_is_refused_and_no_key_is_touched() {
    let mut server = TestServer::start().await;
    let first_ca = server.authorities();
    // Something in the audit log.
    server.join_token(600).await;
    server.server.take().unwrap().shutdown().await;
    let config = server.config.clone();
    let keys_before = snapshot(&config.key_directory());
    assert_eq!(keys_before.len(), 2, "{keys_before:?}");

    for empty in [false, true] {
        remove_datastore(&config);
        if empty {
            std::fs::write(config.datastore_path(), b"").unwrap();
        }
        let error = start_error(&config).await;
        let message = error.to_string();
        assert!(
            matches!(error, ServerError::DatastoreLost { .. }),
            "{message}"
        );
        assert!(
            message.contains(if empty { "is empty" } else { "is missing" }),
            "{message}"
        );
        assert!(message.contains("x509-ca-a.key"), "{message}");
        assert!(message.contains("audit.log"), "{message}");
        assert!(message.contains("Restore the datastore"), "{message}");
        assert!(message.contains("--new-trust-domain"), "{message}");
        assert_eq!(snapshot(&config.key_directory()), keys_before);
        // A refused start creates no datastore either.
        let len = std::fs::metadata(config.datastore_path()).map_or(0, |m| m.len());
        assert_eq!(len, 0);
    }

    // An initialised but empty datastore (a replaced file) is caught by the CA journal.
    remove_datastore(&config);
    drop(
        lanyard_server::datastore::SqlStore::open(&config.datastore_path())
            .await
            .unwrap(),
    );
    let error = start_error(&config).await;
    assert!(error.to_string().contains("records no CA"), "{error}");
    assert_eq!(snapshot(&config.key_directory()), keys_before);

    // Asked for on purpose: a new trust domain, with the old keys kept under new names.
    remove_datastore(&config);
    let mut config = config;
    config.new_trust_domain = true;
    server.config = config.clone();
    server.restart().await;
    assert_ne!(server.authorities(), first_ca);
    let kept: Vec<String> = std::fs::read_dir(config.key_directory())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".previous-trust-domain-"))
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    for (path, bytes) in &keys_before {
        let name = path.file_name().unwrap().to_str().unwrap();
        let aside = kept.iter().find(|k| k.starts_with(name)).unwrap();
        assert_eq!(
            &std::fs::read(config.key_directory().join(aside)).unwrap(),
            bytes
        );
    }
}

#[tokio::test]
async fn a_deleted_active_key_file_is_refused_with_its_name() {
    let mut server = TestServer::start().await;
    let authorities = server.authorities();
    server.server.take().unwrap().shutdown().await;
    let config = server.config.clone();
    for key in ["x509-ca-a.key", "jwt-a.key"] {
        let path = config.key_directory().join(key);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let error = start_error(&config).await;
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("missing"), "{message}");
        std::fs::write(&path, bytes).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // Restored, the same CA comes back.
    server.restart().await;
    assert_eq!(server.authorities(), authorities);
}

#[tokio::test]
async fn a_key_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut server = TestServer::start().await;
    server.server.take().unwrap().shutdown().await;
    let path = server.config.key_directory().join("x509-ca-a.key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let message = start_error(&server.config).await.to_string();
    assert!(message.contains("readable by others"), "{message}");
    assert!(message.contains("chmod 600"), "{message}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    server.restart().await;
}

#[tokio::test]
async fn a_key_file_deleted_while_running_is_written_back() {
    let mut server = TestServer::start().await;
    let authorities = server.authorities();
    let path = server.config.key_directory().join("x509-ca-a.key");
    std::fs::remove_file(&path).unwrap();
    let restored = server.server().state().ca.check_key_files().unwrap();
    assert_eq!(restored, [path.display().to_string()]);
    server.restart().await;
    assert_eq!(server.authorities(), authorities);
}

#[tokio::test]
async fn a_join_token_cannot_alias_a_reserved_id() {
    let server = TestServer::start().await;
    let td = trust_domain();
    for path in ["/spire/server", "/spire/agent/join_token/other", "/spire"] {
        let id = lanyard_core::SpiffeId::from_path(&td, path).unwrap();
        let error = AgentClient::new(server.admin().await)
            .create_join_token(agent_pb::CreateJoinTokenRequest {
                ttl: 600,
                token: "t-reserved".into(),
                agent_id: Some(spiffe_id_to_proto(&id)),
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{path}: {error:?}");
        assert!(error.message().contains("reserved"), "{error:?}");
    }
    // Neither an entry nor a usable token was left behind.
    let entries = EntryClient::new(server.admin().await)
        .list_entries(entry_pb::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(entries.is_empty(), "{entries:?}");
    let attested = attest_join_token(server.bootstrap_tls().await, "t-reserved").await;
    assert!(attested.is_err());
}

#[tokio::test]
async fn a_join_token_alias_refused_by_the_policy_leaves_no_token() {
    let baseline =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policy/baseline.rego");
    let server = TestServer::start_with(|c| {
        c.policy = Some(lanyard_server::config::PolicyConfig::new(baseline));
    })
    .await;
    let id = lanyard_core::SpiffeId::from_path(&trust_domain(), "/web").unwrap();
    let error = AgentClient::new(server.admin().await)
        .create_join_token(agent_pb::CreateJoinTokenRequest {
            ttl: 600,
            token: "t-policy".into(),
            agent_id: Some(spiffe_id_to_proto(&id)),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("owner-required"), "{error:?}");
    assert!(
        attest_join_token(server.bootstrap_tls().await, "t-policy")
            .await
            .is_err()
    );
    // Without an alias the same token request works.
    AgentClient::new(server.admin().await)
        .create_join_token(agent_pb::CreateJoinTokenRequest {
            ttl: 600,
            token: "t-plain".into(),
            agent_id: None,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn an_entry_for_the_servers_id_in_the_datastore_is_never_issued() {
    let mut server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    // Written around every API, as a hand-edited or foreign datastore could hold it.
    let planted = RegistrationEntry::new(
        EntryId::generate(),
        trust_domain().server_id(),
        agent.id.clone(),
        [Selector::new("unix", "uid:0").unwrap()]
            .into_iter()
            .collect(),
        std::time::SystemTime::now(),
    );
    let planted = server
        .server()
        .state()
        .store
        .create_entry(planted)
        .await
        .unwrap();
    server.restart().await;
    let state = server.server().state();
    assert!(
        state
            .index
            .read()
            .authorized_entries(&agent.id, state.now())
            .len()
            == 1,
        "the index holds the planted entry"
    );
    assert!(state.authorized_entries(&agent.id).is_empty());
    let result = mint(&server, &agent, planted.id.as_str()).await;
    assert_ne!(result.status.as_ref().unwrap().code, 0, "{result:?}");
    assert!(result.svid.is_none());
}

/// Sends attestation parameters with `csr` and returns the first answer.
async fn attest_with_csr(server: &TestServer, token: &str, csr: Vec<u8>) -> tonic::Status {
    use agent_pb::attest_agent_request::{Params, Step};
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(agent_pb::AttestAgentRequest {
        step: Some(Step::Params(Params {
            data: Some(lanyard_proto::spire::api::types::AttestationData {
                r#type: "join_token".into(),
                payload: token.as_bytes().to_vec(),
            }),
            params: Some(agent_pb::AgentX509svidParams { csr }),
        })),
    })
    .await
    .unwrap();
    let result = async {
        AgentClient::new(server.bootstrap_tls().await)
            .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner()
            .message()
            .await
    }
    .await;
    result.expect_err("the attestation must be refused")
}

#[tokio::test]
async fn a_join_token_survives_an_attestation_with_a_bad_csr() {
    let server = TestServer::start().await;
    let token = server.join_token(600).await;
    for csr in [b"not a CSR".to_vec(), vec![0x30; 64 * 1024]] {
        let status = attest_with_csr(&server, &token, csr).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("CSR"), "{status:?}");
    }
    // The token was not used up.
    let agent = attest_join_token(server.bootstrap_tls().await, &token)
        .await
        .unwrap();
    assert!(agent.id.as_str().ends_with(&token));
}

/// The audit log's records, parsed.
fn audit_records(server: &TestServer) -> Vec<serde_json::Value> {
    std::fs::read_to_string(server.config.audit_log_path())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn recovered_ids(server: &TestServer) -> Vec<String> {
    audit_records(server)
        .iter()
        .filter(|r| r["event"]["action"] == "change recovered")
        .map(|r| r["event"]["details"]["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_change_committed_without_its_audit_record_is_recorded_at_restart() {
    let mut server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let audited = crate::issuance::create_entry(&server, "/audited", &agent.id, 0).await;

    // The periodic checkpoint runs; then the process dies between a commit and its audit
    // append: the write's guard is never released and its record never written.
    let state = std::sync::Arc::clone(server.server().state());
    state.checkpoint_audit().await;
    std::mem::forget(state.audit.guard());
    let entry = RegistrationEntry::new(
        EntryId::generate(),
        lanyard_core::SpiffeId::from_path(&trust_domain(), "/unrecorded").unwrap(),
        agent.id.clone(),
        [Selector::new("unix", "uid:7").unwrap()]
            .into_iter()
            .collect(),
        std::time::SystemTime::now(),
    );
    let unrecorded = state.store.create_entry(entry).await.unwrap();
    drop(state);
    let before = audit_records(&server);
    assert!(
        !before
            .iter()
            .any(|r| r.to_string().contains(unrecorded.id.as_str())),
        "the change has no record yet"
    );

    server.restart().await;
    assert_eq!(
        recovered_ids(&server),
        vec![unrecorded.id.as_str().to_owned()]
    );
    let records = audit_records(&server);
    let recovered = records
        .iter()
        .find(|r| r["event"]["action"] == "change recovered")
        .unwrap();
    assert_eq!(recovered["event"]["details"]["subject"], "entry");
    assert_eq!(recovered["event"]["details"]["change"], "created");
    assert!(
        !recovered_ids(&server).contains(&audited),
        "a change recorded in time is not recorded again"
    );

    // The chain still verifies, and a clean restart records nothing twice.
    server.restart().await;
    assert_eq!(recovered_ids(&server).len(), 1);
    lanyard_core::audit::verify(&std::fs::read_to_string(server.config.audit_log_path()).unwrap())
        .unwrap();
}

async fn health(server: &TestServer) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    HealthClient::new(server.admin().await)
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Waits (up to 20 s, four probe intervals) for the health service to report `status`.
async fn wait_for_health(server: &TestServer, status: tonic_health::ServingStatus) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while health(server).await != status as i32 {
        assert!(
            std::time::Instant::now() < deadline,
            "the health service never reported {status:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `GET path` on the server's `health_address`: the status and body.
async fn http_health(server: &TestServer, path: &str) -> (u16, String) {
    let addr = server
        .server()
        .health_addr()
        .expect("health_address is set");
    let answer = crate::http::call_plain(addr, hyper::Method::GET, path, &[], Vec::new())
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (
        answer.status.as_u16(),
        String::from_utf8_lossy(&answer.body).into_owned(),
    )
}

/// Waits (up to 20 s) for `/ready` to answer `status`.
async fn wait_for_ready(server: &TestServer, status: u16) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (got, body) = http_health(server, "/ready").await;
        if got == status {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/ready never answered {status}; last {got} {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn health_reports_a_datastore_that_cannot_write() {
    use sqlx::{ConnectOptions as _, Executor as _};

    let server = TestServer::start_with(|config| {
        config.health_address = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    wait_for_health(&server, tonic_health::ServingStatus::Serving).await;
    assert_eq!(http_health(&server, "/live").await.0, 200);
    assert_eq!(wait_for_ready(&server, 200).await, "ready\n");
    assert_eq!(http_health(&server, "/metrics").await.0, 404);
    let mut raw = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(server.config.datastore_path())
        .connect()
        .await
        .unwrap();
    // Every write to the meta table fails, as on a full disk.
    for sql in [
        "CREATE TRIGGER full_insert BEFORE INSERT ON meta \
         BEGIN SELECT RAISE(ABORT, 'database or disk is full (simulated)'); END",
        "CREATE TRIGGER full_update BEFORE UPDATE ON meta \
         BEGIN SELECT RAISE(ABORT, 'database or disk is full (simulated)'); END",
    ] {
        raw.execute(sql).await.unwrap();
    }
    wait_for_health(&server, tonic_health::ServingStatus::NotServing).await;
    let reason = wait_for_ready(&server, 503).await;
    assert!(
        reason.contains("the datastore does not take writes"),
        "{reason}"
    );
    // Not ready is not dead: a restart would not empty the disk.
    assert_eq!(http_health(&server, "/live").await.0, 200);
    for sql in ["DROP TRIGGER full_insert", "DROP TRIGGER full_update"] {
        raw.execute(sql).await.unwrap();
    }
    wait_for_health(&server, tonic_health::ServingStatus::Serving).await;
    wait_for_ready(&server, 200).await;
}
