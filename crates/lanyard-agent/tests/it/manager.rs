//! The manager against a real in-process Lanyard server: attestation (join token, x509pop),
//! persistence and restarts, entry sync, SVID minting and rotation, the server going away,
//! bans and evictions, and JWT-SVIDs.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lanyard_agent::AgentConfig;
use lanyard_agent::cache::{CachedEntry, JwtMintError, Snapshot};
use lanyard_agent::config::{NodeAttestorConfig, ServerAddresses, X509PopConfig};
use lanyard_agent::manager::{Manager, ManagerError, ManagerHandle, state_file, system_clock};
use lanyard_core::keys::{KeyPair, KeyType, pem_encode};
use lanyard_core::x509::{self, CaSubject, SvidParams, X509Ca};
use lanyard_core::{EntryId, SpiffeId, TrustDomain};
use lanyard_proto::convert::spiffe_id_to_proto;
use lanyard_proto::spire::api::server::agent::v1 as agent_pb;
use lanyard_proto::spire::api::server::agent::v1::agent_client::AgentClient;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_proto::spire::api::server::entry::v1::{
    BatchCreateEntryRequest, BatchDeleteEntryRequest, BatchUpdateEntryRequest,
};
use lanyard_proto::spire::api::types;
use lanyard_server::{Server, ServerConfig};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);
pub const WAIT: Duration = Duration::from_secs(30);

pub fn trust_domain() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// A server on a temporary directory whose port stays the same across restarts.
pub struct Env {
    server: Option<Server>,
    config: ServerConfig,
    addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub async fn start() -> Self {
        Self::start_with(|_, _| {}).await
    }

    async fn start_with(edit: impl FnOnce(&mut ServerConfig, &Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(trust_domain(), dir.path().join("server"));
        config.bind_address = "127.0.0.1:0".parse().unwrap();
        config.socket_path = dir.path().join("admin").join("api.sock");
        edit(&mut config, dir.path());
        let server = Server::start(config.clone(), lanyard_server::state::system_clock())
            .await
            .unwrap();
        let addr = server.tcp_addr();
        // Restarts bind the same port, so the agent finds the server again.
        config.bind_address = addr;
        Self {
            server: Some(server),
            config,
            addr,
            dir,
        }
    }

    async fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    async fn start_server_again(&mut self) {
        let server = Server::start(self.config.clone(), lanyard_server::state::system_clock())
            .await
            .unwrap();
        assert_eq!(server.tcp_addr(), self.addr);
        self.server = Some(server);
    }

    pub async fn admin(&self) -> Channel {
        let path = self.config.socket_path.clone();
        Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap()
    }

    pub async fn join_token(&self) -> String {
        AgentClient::new(self.admin().await)
            .create_join_token(agent_pb::CreateJoinTokenRequest {
                ttl: 600,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .value
    }

    /// The server's CA certificates as a PEM file, the agent's bootstrap bundle.
    fn bundle_pem(&self) -> PathBuf {
        let path = self.dir.path().join("bootstrap.pem");
        let bundle = self.server.as_ref().unwrap().state().bundle();
        std::fs::write(&path, bundle.x509_authorities_pem()).unwrap();
        path
    }

    /// An agent configuration with a fresh data directory named `name`.
    pub fn agent_config(&self, name: &str) -> AgentConfig {
        let mut config = AgentConfig::new(
            self.addr.to_string(),
            trust_domain(),
            self.dir.path().join(name),
        );
        config.trust_bundle_path = Some(self.bundle_pem());
        config.sync_interval = SYNC_INTERVAL;
        config
    }

    /// Registers `spiffe://example.org/<path>` under `parent`; returns the entry ID.
    pub async fn create_entry(
        &self,
        parent: &SpiffeId,
        path: &str,
        edit: impl FnOnce(&mut types::Entry),
    ) -> String {
        let mut entry = entry_message(parent, path);
        edit(&mut entry);
        let mut ids = self.create_entries(vec![entry]).await;
        ids.remove(0)
    }

    async fn create_entries(&self, entries: Vec<types::Entry>) -> Vec<String> {
        let results = EntryClient::new(self.admin().await)
            .batch_create_entry(BatchCreateEntryRequest {
                entries,
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        results
            .into_iter()
            .map(|result| {
                let status = result.status.unwrap();
                assert_eq!(status.code, 0, "{}", status.message);
                result.entry.unwrap().id
            })
            .collect()
    }

    async fn update_entry(&self, id: &str, edit: impl FnOnce(&mut types::Entry)) {
        let mut admin = EntryClient::new(self.admin().await);
        let mut entry = admin
            .get_entry(
                lanyard_proto::spire::api::server::entry::v1::GetEntryRequest {
                    id: id.to_owned(),
                    output_mask: None,
                },
            )
            .await
            .unwrap()
            .into_inner();
        edit(&mut entry);
        let result = admin
            .batch_update_entry(BatchUpdateEntryRequest {
                entries: vec![entry],
                input_mask: None,
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner()
            .results
            .remove(0);
        assert_eq!(result.status.unwrap().code, 0);
    }

    async fn delete_entry(&self, id: &str) {
        let result = EntryClient::new(self.admin().await)
            .batch_delete_entry(BatchDeleteEntryRequest {
                ids: vec![id.to_owned()],
            })
            .await
            .unwrap()
            .into_inner()
            .results
            .remove(0);
        assert_eq!(result.status.unwrap().code, 0);
    }

    async fn agent_record(&self, id: &SpiffeId) -> types::Agent {
        AgentClient::new(self.admin().await)
            .get_agent(agent_pb::GetAgentRequest {
                id: Some(spiffe_id_to_proto(id)),
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until the server's record of the agent has the serial of the stored SVID.
    async fn wait_for_current_serial(&self, agent_id: &SpiffeId, data_dir: &Path) {
        tokio::time::timeout(WAIT, async {
            loop {
                let record = self.agent_record(agent_id).await;
                if record.x509svid_serial_number == stored_agent_serial(data_dir) {
                    return;
                }
                tokio::time::sleep(SYNC_INTERVAL).await;
            }
        })
        .await
        .unwrap();
    }

    async fn count_agents(&self) -> i32 {
        AgentClient::new(self.admin().await)
            .count_agents(agent_pb::CountAgentsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .count
    }
}

fn entry_message(parent: &SpiffeId, path: &str) -> types::Entry {
    types::Entry {
        parent_id: Some(spiffe_id_to_proto(parent)),
        spiffe_id: Some(types::Spiffeid {
            trust_domain: "example.org".into(),
            path: format!("/{path}"),
        }),
        selectors: vec![types::Selector {
            r#type: "unix".into(),
            value: "uid:1000".into(),
        }],
        ..Default::default()
    }
}

pub fn join_token_agent(token: &str) -> SpiffeId {
    trust_domain().join_token_agent_id(token).unwrap()
}

/// Waits until a published snapshot satisfies `ready`.
async fn wait_for(
    handle: &ManagerHandle,
    what: &str,
    ready: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let mut snapshots = handle.snapshots();
    let result = tokio::time::timeout(WAIT, async {
        loop {
            let snapshot = Arc::clone(&snapshots.borrow_and_update());
            // Whatever is published is valid now.
            let now = SystemTime::now();
            for identity in snapshot.identities.values() {
                assert!(
                    identity.svid.not_after() > now,
                    "an expired SVID is published"
                );
            }
            if ready(&snapshot) {
                return snapshot;
            }
            snapshots.changed().await.unwrap();
        }
    })
    .await;
    match result {
        Ok(snapshot) => snapshot,
        Err(_) => panic!(
            "timed out waiting for {what}; failure: {:?}",
            handle.failure()
        ),
    }
}

fn entry_by_id<'a>(snapshot: &'a Snapshot, id: &str) -> Option<&'a Arc<CachedEntry>> {
    snapshot.entries.iter().find(|e| e.id.as_str() == id)
}

fn has_identity(snapshot: &Snapshot, id: &str) -> bool {
    snapshot.identities.contains_key(&EntryId::new(id).unwrap())
}

fn serial(snapshot: &Snapshot, id: &str) -> String {
    snapshot.identities[&EntryId::new(id).unwrap()]
        .svid
        .serial()
        .to_owned()
}

fn stored_state(data_dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(state_file(data_dir)).unwrap()).unwrap()
}

fn stored_agent_serial(data_dir: &Path) -> String {
    let state = stored_state(data_dir);
    let pem = state["svid_chain_pem"].as_str().unwrap();
    let (_, leaf) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    x509::serial_decimal(&leaf.contents).unwrap()
}

#[tokio::test]
async fn a_join_token_agent_attests_once_and_restarts_from_its_data_dir() {
    let env = Env::start().await;
    let token = env.join_token().await;
    let mut config = env.agent_config("agent");
    config.join_token = Some(token.clone());
    let data_dir = config.data_dir.clone();

    let handle = Manager::start(config.clone(), system_clock())
        .await
        .unwrap();
    assert_eq!(handle.agent_id(), join_token_agent(&token));
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data_dir), 0o700);
    assert_eq!(mode(&state_file(&data_dir)), 0o600);
    let state = stored_state(&data_dir);
    assert_eq!(state["reattestable"], false);
    assert!(
        state["svid_key_pem"]
            .as_str()
            .unwrap()
            .contains("PRIVATE KEY")
    );
    let snapshot = wait_for(&handle, "the first sync", |s| s.synced).await;
    assert!(snapshot.entries.is_empty());
    assert!(!snapshot.bundle.x509_authorities().is_empty());
    handle.shutdown().await;

    // The same data directory, no token: the stored SVID is used.
    config.join_token = None;
    config.trust_bundle_path = None;
    let handle = Manager::start(config.clone(), system_clock())
        .await
        .unwrap();
    assert_eq!(handle.agent_id(), join_token_agent(&token));
    wait_for(&handle, "a sync after the restart", |s| s.synced).await;
    assert_eq!(env.count_agents().await, 1);
    handle.shutdown().await;

    // A fresh data directory and no token cannot attest.
    let mut fresh = env.agent_config("fresh");
    fresh.join_token = None;
    let err = Manager::start(fresh, system_clock()).await.unwrap_err();
    assert!(matches!(err, ManagerError::NoAttestor), "{err}");

    // A used token is refused, and that is final.
    let mut reused = env.agent_config("reused");
    reused.join_token = Some(token);
    let err = Manager::start(reused, system_clock()).await.unwrap_err();
    assert!(matches!(err, ManagerError::Attestation(_)), "{err}");
}

#[tokio::test]
async fn entries_are_synced_minted_and_followed() {
    let env = Env::start().await;
    let token = env.join_token().await;
    let agent_id = join_token_agent(&token);
    let first = env
        .create_entry(&agent_id, "workload/a", |e| {
            e.dns_names = vec!["a.example.org".into(), "alt.example.org".into()];
            e.hint = "a-hint".into();
        })
        .await;
    // An entry for another agent is not ours.
    let other_agent = join_token_agent("someone-else");
    env.create_entry(&other_agent, "workload/other", |_| {})
        .await;

    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    let handle = Manager::start(config, system_clock()).await.unwrap();
    let snapshot = wait_for(&handle, "the first entry's SVID", |s| {
        s.synced && has_identity(s, &first)
    })
    .await;
    assert_eq!(snapshot.entries.len(), 1);
    let entry = entry_by_id(&snapshot, &first).unwrap();
    assert_eq!(entry.spiffe_id.as_str(), "spiffe://example.org/workload/a");
    assert_eq!(entry.hint, "a-hint");
    let identity = &snapshot.identities[&entry.id];
    let authorities: Vec<Vec<u8>> = snapshot
        .bundle
        .x509_authorities()
        .iter()
        .map(|a| a.der().to_vec())
        .collect();
    let verified = x509::verify_svid_chain(
        identity.svid.cert_chain(),
        &trust_domain(),
        &authorities,
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(verified.spiffe_id(), &entry.spiffe_id);
    let (_, leaf) = x509_parser::parse_x509_certificate(identity.svid.leaf_der()).unwrap();
    let dns: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(dns, ["a.example.org", "alt.example.org"]);
    // The key is the one the agent generated for the CSR.
    assert_eq!(leaf.public_key().raw, identity.key.public_key_der());
    assert_eq!(identity.key.key_type(), KeyType::EcP256);

    // A new entry shows up with its SVID.
    let second = env.create_entry(&agent_id, "workload/b", |_| {}).await;
    let snapshot = wait_for(&handle, "the second entry's SVID", |s| {
        has_identity(s, &second)
    })
    .await;
    let first_serial = serial(&snapshot, &first);
    let second_serial = serial(&snapshot, &second);

    // A deleted entry goes, with its SVID.
    env.delete_entry(&first).await;
    let snapshot = wait_for(&handle, "the deleted entry to go", |s| {
        entry_by_id(s, &first).is_none()
    })
    .await;
    assert!(!has_identity(&snapshot, &first));
    assert_eq!(serial(&snapshot, &second), second_serial);
    assert_ne!(first_serial, second_serial);

    // An updated entry gets a new SVID at once.
    env.update_entry(&second, |e| e.dns_names = vec!["b.example.org".into()])
        .await;
    let snapshot = wait_for(&handle, "the updated entry's new SVID", |s| {
        entry_by_id(s, &second).is_some_and(|e| e.revision_number == 1)
            && has_identity(s, &second)
            && serial(s, &second) != second_serial
    })
    .await;
    assert_eq!(snapshot.entries.len(), 1);
    assert!(handle.failure().is_none());
    handle.shutdown().await;
}

#[tokio::test]
async fn short_lived_svids_are_renewed_before_they_expire() {
    let env = Env::start().await;
    let token = env.join_token().await;
    // 20 s plus the server's 10 s backdating: renewal is due about 5 s after issuance.
    let id = env
        .create_entry(&join_token_agent(&token), "short", |e| e.x509_svid_ttl = 20)
        .await;
    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    let handle = Manager::start(config, system_clock()).await.unwrap();
    let snapshot = wait_for(&handle, "the SVID", |s| has_identity(s, &id)).await;
    let first = snapshot.identities[&EntryId::new(&id).unwrap()].clone();
    let snapshot = wait_for(&handle, "a renewed SVID", |s| {
        has_identity(s, &id) && serial(s, &id) != first.svid.serial()
    })
    .await;
    // Renewed well before the old one expired.
    assert!(first.svid.not_after() > SystemTime::now() + Duration::from_secs(10));
    let renewed = &snapshot.identities[&EntryId::new(&id).unwrap()];
    assert!(renewed.svid.not_after() > first.svid.not_after());
    assert_ne!(
        renewed.key.public_key_der(),
        first.key.public_key_der(),
        "every SVID gets a fresh key"
    );
    handle.shutdown().await;
}

#[tokio::test]
async fn the_agent_keeps_serving_while_the_server_is_down() {
    let mut env = Env::start().await;
    let token = env.join_token().await;
    let agent_id = join_token_agent(&token);
    let id = env.create_entry(&agent_id, "steady", |_| {}).await;
    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    let handle = Manager::start(config, system_clock()).await.unwrap();
    let snapshot = wait_for(&handle, "the SVID", |s| has_identity(s, &id)).await;
    let before = serial(&snapshot, &id);

    env.stop_server().await;
    tokio::time::sleep(SYNC_INTERVAL * 8).await;
    let snapshot = Arc::clone(&handle.snapshots().borrow());
    assert_eq!(
        serial(&snapshot, &id),
        before,
        "the valid SVID is still served"
    );
    assert_eq!(snapshot.entries.len(), 1);
    assert!(handle.failure().is_none());

    env.start_server_again().await;
    let later = env.create_entry(&agent_id, "later", |_| {}).await;
    let snapshot = wait_for(&handle, "sync to resume", |s| has_identity(s, &later)).await;
    assert_eq!(serial(&snapshot, &id), before);
    handle.shutdown().await;
}

/// With a sync interval far longer than the test, changes reach the agent only because the
/// server pushes them: a new entry, an update, a deletion; and again after the server restarts
/// (the stream is opened anew and its first notice syncs what was missed).
#[tokio::test]
async fn changes_are_pushed_to_the_agent_without_waiting_for_its_interval() {
    let mut env = Env::start().await;
    let token = env.join_token().await;
    let agent_id = join_token_agent(&token);
    let first = env.create_entry(&agent_id, "pushed/first", |_| {}).await;
    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    config.sync_interval = Duration::from_secs(3600);
    let handle = Manager::start(config, system_clock()).await.unwrap();
    wait_for(&handle, "the first SVID", |s| {
        s.synced && has_identity(s, &first)
    })
    .await;

    let second = env.create_entry(&agent_id, "pushed/second", |_| {}).await;
    wait_for(&handle, "the pushed entry's SVID", |s| {
        has_identity(s, &second)
    })
    .await;
    env.update_entry(&second, |e| e.hint = "pushed".into())
        .await;
    wait_for(&handle, "the pushed update", |s| {
        entry_by_id(s, &second).is_some_and(|e| e.hint == "pushed")
    })
    .await;
    env.delete_entry(&first).await;
    wait_for(&handle, "the pushed deletion", |s| {
        entry_by_id(s, &first).is_none() && !has_identity(s, &first)
    })
    .await;

    // The stream breaks with the server; a change made while it is back but before the agent
    // reconnects arrives with the new stream's first notice.
    env.stop_server().await;
    env.start_server_again().await;
    let third = env.create_entry(&agent_id, "pushed/third", |_| {}).await;
    wait_for(&handle, "a change after the server restarted", |s| {
        has_identity(s, &third)
    })
    .await;
    assert!(handle.failure().is_none());
    handle.shutdown().await;
}

/// A notice lost on the way (the server holds every notice back) is made up for by the push
/// safety net: the agent, its stream still up, syncs every `push_sync_interval` and gets the
/// change anyway. Without that poll the entry would never arrive.
#[tokio::test]
async fn a_lost_change_notice_is_caught_by_the_push_safety_net() {
    const SAFETY_NET: Duration = Duration::from_secs(3);
    let env = Env::start().await;
    let token = env.join_token().await;
    let agent_id = join_token_agent(&token);
    let first = env.create_entry(&agent_id, "net/first", |_| {}).await;
    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    config.sync_interval = Duration::from_millis(500);
    config.push_sync_interval = SAFETY_NET;
    let handle = Manager::start(config, system_clock()).await.unwrap();
    wait_for(&handle, "the first SVID", |s| {
        s.synced && has_identity(s, &first)
    })
    .await;
    let pushed = || handle.health().poll_interval == SAFETY_NET;
    tokio::time::timeout(WAIT, async {
        while !pushed() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the change stream is up, and polling slowed to the safety net");

    let state = std::sync::Arc::clone(env.server.as_ref().unwrap().state());
    state.hold_change_notices_for_tests(true);
    let second = env.create_entry(&agent_id, "net/second", |_| {}).await;
    wait_for(&handle, "the entry, by the safety net's poll", |s| {
        has_identity(s, &second)
    })
    .await;
    assert!(
        pushed(),
        "the stream stayed up: the entry came by the safety net"
    );
    state.hold_change_notices_for_tests(false);
    assert!(handle.failure().is_none());
    handle.shutdown().await;
}

/// Two servers of the trust domain sharing one PostgreSQL, each with its own keys: the agent
/// is given both addresses, attests through the first, and when that one dies goes on with the
/// second without attesting again.
#[tokio::test]
async fn the_agent_fails_over_to_another_server_of_the_trust_domain() {
    let url = crate::pg::fresh_database().await;
    let shared = |instance: &'static str| {
        let url = url.clone();
        move |config: &mut ServerConfig, _: &Path| {
            config.datastore.kind = lanyard_server::config::DatastoreKind::Postgres;
            config.datastore.connection_string =
                Some(lanyard_server::config::ConnectionString::new(url));
            config.instance = instance.to_owned();
        }
    };
    let mut a = Env::start_with(shared("a")).await;
    let b = Env::start_with(shared("b")).await;
    // The agent's bootstrap bundle (from A) must hold B's authority too.
    tokio::time::timeout(WAIT, async {
        while a
            .server
            .as_ref()
            .unwrap()
            .state()
            .bundle()
            .x509_authorities()
            .len()
            < 2
        {
            tokio::time::sleep(SYNC_INTERVAL).await;
        }
    })
    .await
    .expect("A serves B's authority");

    let token = a.join_token().await;
    let agent_id = join_token_agent(&token);
    let first = a.create_entry(&agent_id, "first", |_| {}).await;
    let mut config = a.agent_config("agent");
    config.server_address = ServerAddresses::new(vec![a.addr.to_string(), b.addr.to_string()]);
    config.join_token = Some(token);
    let handle = Manager::start(config, system_clock()).await.unwrap();
    wait_for(&handle, "the SVID", |s| has_identity(s, &first)).await;

    a.stop_server().await;
    let later = b.create_entry(&agent_id, "through-b", |_| {}).await;
    let snapshot = wait_for(&handle, "sync through B", |s| has_identity(s, &later)).await;
    assert!(
        has_identity(&snapshot, &first),
        "still serving the first entry"
    );
    assert!(handle.failure().is_none());
    // One agent, attested once: it kept its identity.
    assert_eq!(b.count_agents().await, 1);
    handle.shutdown().await;
}

#[tokio::test]
async fn a_banned_agent_stops_and_forgets_its_svid() {
    let env = Env::start().await;
    let token = env.join_token().await;
    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    let data_dir = config.data_dir.clone();
    let handle = Manager::start(config, system_clock()).await.unwrap();
    wait_for(&handle, "the first sync", |s| s.synced).await;
    AgentClient::new(env.admin().await)
        .ban_agent(agent_pb::BanAgentRequest {
            id: Some(spiffe_id_to_proto(&handle.agent_id())),
        })
        .await
        .unwrap();
    let error = tokio::time::timeout(WAIT, handle.failed()).await.unwrap();
    assert!(matches!(*error, ManagerError::Banned), "{error}");
    assert_eq!(error.to_string(), "agent is banned");
    let state = stored_state(&data_dir);
    assert!(state.get("svid_chain_pem").is_none());
    assert!(state.get("svid_key_pem").is_none());
    assert!(
        state["bundle"]["keys"]
            .as_array()
            .is_some_and(|k| !k.is_empty())
    );
    handle.shutdown().await;
}

#[tokio::test]
async fn an_evicted_join_token_agent_asks_for_a_new_token() {
    let env = Env::start().await;
    let token = env.join_token().await;
    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    let handle = Manager::start(config, system_clock()).await.unwrap();
    wait_for(&handle, "the first sync", |s| s.synced).await;
    AgentClient::new(env.admin().await)
        .delete_agent(agent_pb::DeleteAgentRequest {
            id: Some(spiffe_id_to_proto(&handle.agent_id())),
        })
        .await
        .unwrap();
    let error = tokio::time::timeout(WAIT, handle.failed()).await.unwrap();
    match &*error {
        ManagerError::MustReattest { reason } => assert_eq!(reason, "AGENT_NOT_ATTESTED"),
        other => panic!("unexpected {other}"),
    }
    assert!(error.to_string().contains("new join_token"), "{error}");
    handle.shutdown().await;
}

#[tokio::test]
async fn a_join_token_agent_renews_its_svid_at_half_life() {
    let env = Env::start_with(|config, _| config.agent_ttl = Some(Duration::from_secs(20))).await;
    let token = env.join_token().await;
    let agent_id = join_token_agent(&token);
    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    let data_dir = config.data_dir.clone();
    let handle = Manager::start(config, system_clock()).await.unwrap();
    wait_for(&handle, "the first sync", |s| s.synced).await;
    let first = stored_agent_serial(&data_dir);

    tokio::time::timeout(WAIT, async {
        while stored_agent_serial(&data_dir) == first {
            tokio::time::sleep(SYNC_INTERVAL).await;
        }
    })
    .await
    .unwrap();
    // The renewed SVID is used at once, which makes it current on the server, and syncs
    // go on with it.
    let id = env.create_entry(&agent_id, "after-renewal", |_| {}).await;
    wait_for(&handle, "an entry after renewal", |s| has_identity(s, &id)).await;
    env.wait_for_current_serial(&agent_id, &data_dir).await;
    let record = env.agent_record(&agent_id).await;
    assert_eq!(record.attestation_type, "join_token");
    assert!(!record.can_reattest);
    assert!(handle.failure().is_none());
    handle.shutdown().await;
}

/// An x509pop CA the server trusts, and a node certificate and key written as PEM files.
fn x509pop_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf, String) {
    let td = TrustDomain::new("nodes.example").unwrap();
    let now = SystemTime::now();
    let ca = X509Ca::self_signed(
        &td,
        KeyPair::generate(KeyType::EcP256).unwrap(),
        &CaSubject::default(),
        now,
        Duration::from_secs(3600),
    )
    .unwrap();
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let leaf = ca
        .mint_svid(
            &SvidParams::new(
                "spiffe://nodes.example/node1".parse().unwrap(),
                key.public_key_der(),
                Duration::from_secs(3600),
            ),
            now,
        )
        .unwrap();
    let ca_path = dir.join("node-ca.pem");
    std::fs::write(&ca_path, pem_encode("CERTIFICATE", ca.cert_der())).unwrap();
    let cert_path = dir.join("node.pem");
    std::fs::write(&cert_path, pem_encode("CERTIFICATE", leaf.leaf_der())).unwrap();
    let key_path = dir.join("node.key");
    std::fs::write(&key_path, key.secret_pkcs8_pem()).unwrap();
    let fingerprint = x509::fingerprint_sha1_hex(leaf.leaf_der());
    (ca_path, cert_path, key_path, fingerprint)
}

#[tokio::test]
async fn an_x509pop_agent_reattests_to_rotate_and_after_eviction() {
    let pki = tempfile::tempdir().unwrap();
    let (ca_path, cert_path, key_path, fingerprint) = x509pop_files(pki.path());
    let env = Env::start_with(|config, _| {
        config.node_attestor.x509pop = Some(lanyard_server::config::X509PopConfig {
            ca_bundle_path: ca_path.clone(),
        });
        config.agent_ttl = Some(Duration::from_secs(20));
    })
    .await;
    let mut config = env.agent_config("agent");
    // First contact without a bundle: only the server's ID is checked.
    config.trust_bundle_path = None;
    config.insecure_bootstrap = true;
    config.node_attestor = NodeAttestorConfig {
        x509pop: Some(X509PopConfig {
            certificate_path: cert_path,
            private_key_path: key_path,
        }),
        k8s_psat: None,
    };
    let data_dir = config.data_dir.clone();
    let handle = Manager::start(config.clone(), system_clock())
        .await
        .unwrap();
    let agent_id = trust_domain().x509pop_agent_id(&fingerprint).unwrap();
    assert_eq!(handle.agent_id(), agent_id);
    assert_eq!(stored_state(&data_dir)["reattestable"], true);
    let id = env.create_entry(&agent_id, "pop-workload", |_| {}).await;
    wait_for(&handle, "the SVID", |s| has_identity(s, &id)).await;

    // Rotation at half-life is a new attestation (x509pop agents may not renew).
    let first = stored_agent_serial(&data_dir);
    tokio::time::timeout(WAIT, async {
        while stored_agent_serial(&data_dir) == first {
            tokio::time::sleep(SYNC_INTERVAL).await;
        }
    })
    .await
    .unwrap();
    env.wait_for_current_serial(&agent_id, &data_dir).await;
    let record = env.agent_record(&agent_id).await;
    assert_eq!(record.attestation_type, "x509pop");
    assert!(record.can_reattest);

    // Evicted: the agent attests again in place and carries on.
    AgentClient::new(env.admin().await)
        .delete_agent(agent_pb::DeleteAgentRequest {
            id: Some(spiffe_id_to_proto(&agent_id)),
        })
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            let listed = AgentClient::new(env.admin().await)
                .get_agent(agent_pb::GetAgentRequest {
                    id: Some(spiffe_id_to_proto(&agent_id)),
                    output_mask: None,
                })
                .await;
            if listed.is_ok() {
                return;
            }
            assert_eq!(listed.unwrap_err().code(), Code::NotFound);
            tokio::time::sleep(SYNC_INTERVAL).await;
        }
    })
    .await
    .unwrap();
    let later = env.create_entry(&agent_id, "pop-later", |_| {}).await;
    wait_for(&handle, "sync after re-attestation", |s| {
        has_identity(s, &later)
    })
    .await;
    assert!(handle.failure().is_none());
    handle.shutdown().await;

    // A restart uses the stored SVID.
    let handle = Manager::start(config, system_clock()).await.unwrap();
    assert_eq!(handle.agent_id(), agent_id);
    wait_for(&handle, "a sync after restart", |s| has_identity(s, &later)).await;
    handle.shutdown().await;
}

#[tokio::test]
async fn jwt_svids_are_minted_cached_and_fall_back_while_the_server_is_down() {
    let mut env = Env::start().await;
    let token = env.join_token().await;
    let id = env
        .create_entry(&join_token_agent(&token), "jwt-workload", |e| {
            e.jwt_svid_ttl = 600;
        })
        .await;
    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    let clock = TestClock::new();
    let handle = Manager::start(config, clock.clock()).await.unwrap();
    let snapshot = wait_for(&handle, "the entry", |s| entry_by_id(s, &id).is_some()).await;
    let entry = entry_by_id(&snapshot, &id).unwrap().clone();
    let minter = handle.jwt_minter();

    let audiences = vec!["db".to_owned(), "cache".to_owned()];
    let svid = minter.jwt_svid(&entry, &audiences).await.unwrap();
    assert_eq!(svid.spiffe_id, entry.spiffe_id);
    assert!(svid.expires_at > SystemTime::now() + Duration::from_secs(500));
    let validated = lanyard_core::jwt::validate_jwt_svid_with_bundle(
        &svid.token,
        "db",
        &snapshot.bundle,
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(validated.spiffe_id, entry.spiffe_id);
    assert_eq!(validated.key_id, svid.key_id);
    assert!(!svid.jti.is_empty());

    // Within half its life the same token comes back, whatever the audience order.
    let again = minter.jwt_svid(&entry, &audiences).await.unwrap();
    assert_eq!(again.token, svid.token);
    let reordered = minter
        .jwt_svid(&entry, &["cache".to_owned(), "db".to_owned()])
        .await
        .unwrap();
    assert_eq!(reordered.token, svid.token);
    let other = minter.jwt_svid(&entry, &["db".to_owned()]).await.unwrap();
    assert_ne!(other.token, svid.token);

    // An entry the server does not authorize for this agent.
    let mut foreign = (*entry).clone();
    foreign.id = EntryId::new("not-ours").unwrap();
    foreign.spiffe_id = "spiffe://example.org/not-ours".parse().unwrap();
    let err = minter
        .jwt_svid(&foreign, &["db".to_owned()])
        .await
        .unwrap_err();
    assert!(matches!(err, JwtMintError::NotAuthorized(_)), "{err}");

    // Past half its life a new token is minted.
    clock.advance(Duration::from_secs(400));
    let renewed = minter.jwt_svid(&entry, &audiences).await.unwrap();
    assert_ne!(renewed.token, svid.token);

    // With the server gone, the unexpired cached token is returned …
    env.stop_server().await;
    let fallback = minter.jwt_svid(&entry, &audiences).await.unwrap();
    assert_eq!(fallback.token, renewed.token);
    // … until it expires.
    clock.advance(Duration::from_secs(300));
    let err = minter.jwt_svid(&entry, &audiences).await.unwrap_err();
    assert!(matches!(err, JwtMintError::Unavailable(_)), "{err}");
    handle.shutdown().await;
}

/// A clock that starts at the real time and moves ahead only when told.
#[derive(Clone)]
struct TestClock {
    offset_secs: Arc<std::sync::atomic::AtomicU64>,
}

impl TestClock {
    fn new() -> Self {
        Self {
            offset_secs: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    fn advance(&self, by: Duration) {
        self.offset_secs
            .fetch_add(by.as_secs(), std::sync::atomic::Ordering::SeqCst);
    }

    fn clock(&self) -> lanyard_agent::manager::Clock {
        let offset = Arc::clone(&self.offset_secs);
        Arc::new(move || {
            SystemTime::now()
                + Duration::from_secs(offset.load(std::sync::atomic::Ordering::SeqCst))
        })
    }
}

#[tokio::test]
async fn many_entries_page_by_revision_and_the_cache_size_is_respected() {
    let env = Env::start().await;
    let token = env.join_token().await;
    let agent_id = join_token_agent(&token);
    // More than one page (500), so the server answers with revisions.
    let mut ids = Vec::new();
    for chunk in 0..6 {
        let entries = (0..100)
            .map(|i| entry_message(&agent_id, &format!("bulk/{chunk}-{i:03}")))
            .collect();
        ids.extend(env.create_entries(entries).await);
    }
    let extra = env.create_entry(&agent_id, "bulk/extra", |_| {}).await;
    ids.push(extra);
    ids.sort();

    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    config.x509_svid_cache_size = 3;
    let handle = Manager::start(config, system_clock()).await.unwrap();
    let snapshot = wait_for(&handle, "all entries and three SVIDs", |s| {
        s.entries.len() == ids.len() && s.identities.len() == 3
    })
    .await;
    let minted: Vec<&str> = snapshot.identities.keys().map(EntryId::as_str).collect();
    assert_eq!(
        minted,
        ids[..3].iter().map(String::as_str).collect::<Vec<_>>()
    );
    let first_serial = serial(&snapshot, &ids[0]);

    // A change to one entry travels by revision and re-mints its SVID.
    env.update_entry(&ids[0], |e| e.hint = "changed".into())
        .await;
    let snapshot = wait_for(&handle, "the changed entry", |s| {
        entry_by_id(s, &ids[0]).is_some_and(|e| e.hint == "changed")
            && has_identity(s, &ids[0])
            && serial(s, &ids[0]) != first_serial
    })
    .await;
    assert_eq!(snapshot.entries.len(), ids.len());

    // Deleting one of the minted entries hands its slot to the next.
    env.delete_entry(&ids[1]).await;
    let snapshot = wait_for(&handle, "the next entry to get an SVID", |s| {
        s.entries.len() == ids.len() - 1 && has_identity(s, &ids[3])
    })
    .await;
    assert_eq!(snapshot.identities.len(), 3);
    handle.shutdown().await;
}

#[tokio::test]
async fn federated_bundles_are_fetched_for_the_trust_domains_entries_name() {
    use lanyard_proto::spire::api::server::bundle::v1::BatchSetFederatedBundleRequest;
    use lanyard_proto::spire::api::server::bundle::v1::bundle_client::BundleClient;

    let env = Env::start().await;
    let other = TrustDomain::new("other.org").unwrap();
    let other_ca = X509Ca::self_signed(
        &other,
        KeyPair::generate(KeyType::EcP256).unwrap(),
        &CaSubject::default(),
        SystemTime::now(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let results = BundleClient::new(env.admin().await)
        .batch_set_federated_bundle(BatchSetFederatedBundleRequest {
            bundle: vec![types::Bundle {
                trust_domain: "other.org".into(),
                x509_authorities: vec![types::X509Certificate {
                    asn1: other_ca.cert_der().to_vec(),
                    tainted: false,
                    hint: String::new(),
                }],
                ..Default::default()
            }],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].status.as_ref().unwrap().code, 0);

    let token = env.join_token().await;
    // One federated trust domain the server knows, and one it does not. The server refuses
    // to store such an entry, so it goes into the authorization index only, which is what
    // sync reads. The agent only logs the NotFound.
    let mut entry = lanyard_core::RegistrationEntry::new(
        EntryId::new("federated").unwrap(),
        "spiffe://example.org/federated".parse().unwrap(),
        join_token_agent(&token),
        ["unix:uid:1000".parse().unwrap()].into_iter().collect(),
        SystemTime::now(),
    );
    entry.federates_with = [other.clone(), TrustDomain::new("missing.org").unwrap()]
        .into_iter()
        .collect();
    // The datastore refuses an entry federating with a trust domain it has no bundle for;
    // the index is given one, as a datastore shared with an older server could hold.
    env.server
        .as_ref()
        .unwrap()
        .state()
        .index
        .plant_for_tests(&entry);
    let id = entry.id.to_string();
    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    let handle = Manager::start(config, system_clock()).await.unwrap();
    let snapshot = wait_for(&handle, "the federated entry", |s| has_identity(s, &id)).await;
    let federated: Vec<&str> = snapshot
        .federated_bundles
        .keys()
        .map(TrustDomain::name)
        .collect();
    assert_eq!(federated, ["other.org"]);
    assert_eq!(
        snapshot.federated_bundles[&other].x509_authorities()[0].der(),
        other_ca.cert_der()
    );
    assert!(handle.failure().is_none());
    handle.shutdown().await;
}

/// A revocation reaches the agent pushed, with no sync interval in the way: the covered SVID
/// is dropped and replaced (the old serial never comes back), the CRLs in the snapshot refuse
/// the old one and pass the new one, a revoked JWT-SVID is not handed out again, and the
/// server records the agent's acknowledgement.
#[tokio::test]
async fn revocations_are_applied_replaced_and_acknowledged() {
    use lanyard_proto::lanyard::api::v1::revocation_service_client::RevocationServiceClient;
    use lanyard_proto::lanyard::api::v1::{GetRevocationRequest, RevokeRequest};

    let env = Env::start().await;
    let token = env.join_token().await;
    let agent_id = join_token_agent(&token);
    let web = env
        .create_entry(&agent_id, "revoked/web", |e| {
            e.jwt_svid_ttl = 600;
        })
        .await;
    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    config.sync_interval = Duration::from_secs(3600);
    let handle = Manager::start(config, system_clock()).await.unwrap();
    let snapshot = wait_for(&handle, "the SVID", |s| s.synced && has_identity(s, &web)).await;
    let old = Arc::clone(&snapshot.identities[&EntryId::new(&web).unwrap()].svid);
    let entry = entry_by_id(&snapshot, &web).unwrap().clone();
    let minter = handle.jwt_minter();
    let jwt = minter.jwt_svid(&entry, &["db".to_owned()]).await.unwrap();
    assert!(snapshot.crls.len() <= 1);

    let revoke = |kind: &str, value: String| RevokeRequest {
        kind: kind.to_owned(),
        value,
        owner: "security".to_owned(),
        reason: "leaked".to_owned(),
        ticket: String::new(),
        dry_run: false,
    };
    let made = RevocationServiceClient::new(env.admin().await)
        .revoke(revoke("spiffe-id", old.spiffe_id().to_string()))
        .await
        .unwrap()
        .into_inner()
        .revocation
        .unwrap();
    let snapshot = wait_for(&handle, "a replacement SVID", |s| {
        has_identity(s, &web) && serial(s, &web) != old.serial()
    })
    .await;
    let new = Arc::clone(&snapshot.identities[&EntryId::new(&web).unwrap()].svid);
    let authorities: Vec<Vec<u8>> = snapshot
        .bundle
        .x509_authorities()
        .iter()
        .map(|a| a.der().to_vec())
        .collect();
    let snapshot = wait_for(&handle, "CRLs listing the old serial", |s| {
        matches!(
            x509::verify_svid_chain_with_crls(
                old.cert_chain(),
                &trust_domain(),
                &authorities,
                &s.crls,
                SystemTime::now(),
            ),
            Err(x509::X509Error::Revoked)
        )
    })
    .await;
    x509::verify_svid_chain_with_crls(
        new.cert_chain(),
        &trust_domain(),
        &authorities,
        &snapshot.crls,
        SystemTime::now(),
    )
    .expect("the replacement passes the CRLs");

    // The acknowledgement reaches the server.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let detail = RevocationServiceClient::new(env.admin().await)
            .get_revocation(GetRevocationRequest {
                id: made.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if detail
            .acknowledged
            .iter()
            .any(|a| a.agent_id == agent_id.to_string())
        {
            assert!(detail.pending_agent_ids.is_empty());
            assert!(detail.serials.iter().any(|s| s.serial == old.serial()));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no acknowledgement: {detail:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A revoked JWT-SVID is not handed out again.
    RevocationServiceClient::new(env.admin().await)
        .revoke(revoke("jwt-id", jwt.jti.clone()))
        .await
        .unwrap();
    wait_for(&handle, "the revoked JWT ID", |s| {
        s.jti_revoked(&jwt.jti, SystemTime::now())
    })
    .await;
    let fresh = minter.jwt_svid(&entry, &["db".to_owned()]).await.unwrap();
    assert_ne!(fresh.jti, jwt.jti);
    assert!(handle.failure().is_none());
    handle.shutdown().await;
}

/// Which agents the server lists as not having applied revocation `id`.
async fn pending_agents(env: &Env, id: &str) -> Vec<String> {
    use lanyard_proto::lanyard::api::v1::GetRevocationRequest;
    use lanyard_proto::lanyard::api::v1::revocation_service_client::RevocationServiceClient;
    let mut pending = RevocationServiceClient::new(env.admin().await)
        .get_revocation(GetRevocationRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner()
        .pending_agent_ids;
    pending.sort();
    pending
}

/// A running agent acknowledges a revocation at once; a stopped one is listed as pending
/// until it comes back, and then acknowledges it too.
#[tokio::test]
async fn a_stopped_agent_is_pending_until_it_returns_and_acknowledges() {
    use lanyard_proto::lanyard::api::v1::RevokeRequest;
    use lanyard_proto::lanyard::api::v1::revocation_service_client::RevocationServiceClient;

    let env = Env::start().await;
    let start = |name: &'static str, token: String| {
        let mut config = env.agent_config(name);
        config.join_token = Some(token);
        config.sync_interval = Duration::from_secs(3600);
        config
    };
    let running_token = env.join_token().await;
    let stopped_token = env.join_token().await;
    let running_id = join_token_agent(&running_token).to_string();
    let stopped_id = join_token_agent(&stopped_token).to_string();
    let running = Manager::start(start("running", running_token), system_clock())
        .await
        .unwrap();
    let mut stopped_config = start("stopped", stopped_token);
    let stopped = Manager::start(stopped_config.clone(), system_clock())
        .await
        .unwrap();
    wait_for(&running, "a sync", |s| s.synced).await;
    wait_for(&stopped, "a sync", |s| s.synced).await;
    stopped.shutdown().await;

    let made = RevocationServiceClient::new(env.admin().await)
        .revoke(RevokeRequest {
            kind: "jwt-id".to_owned(),
            value: "leaked-token".to_owned(),
            owner: "security".to_owned(),
            reason: "pasted in a chat".to_owned(),
            ticket: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner()
        .revocation
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let pending = pending_agents(&env, &made.id).await;
        if pending == [stopped_id.clone()] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the running agent never acknowledged: pending {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!pending_agents(&env, &made.id).await.contains(&running_id));

    // Back from its data directory, the stopped agent catches up and acknowledges.
    stopped_config.join_token = None;
    stopped_config.trust_bundle_path = None;
    let back = Manager::start(stopped_config, system_clock())
        .await
        .unwrap();
    wait_for(&back, "the revocation applied", |s| {
        s.jti_revoked("leaked-token", SystemTime::now())
    })
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    while !pending_agents(&env, &made.id).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the returning agent never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    back.shutdown().await;
    running.shutdown().await;
}
