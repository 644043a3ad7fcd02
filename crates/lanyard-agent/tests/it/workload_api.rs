//! The Workload API on a real Unix socket, driven by the published `spiffe` client crate and
//! by a raw tonic client, with snapshots published by hand in place of the manager. The
//! caller is this test process, attested for real by the Unix attestor.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lanyard_agent::attestor::{AttestError, PeerCredentials, UnixAttestor, WorkloadAttestor as _};
use lanyard_agent::cache::{CachedEntry, Identity, JwtMintError, JwtMinter, Snapshot};
use lanyard_agent::config::UnixAttestorConfig;
use lanyard_agent::usage::UsageTracker;
use lanyard_agent::workload::{self, ServeError, WorkloadApi};
use lanyard_core::jwt::{JwtSigningKey, JwtSvid, JwtSvidParams, mint_jwt_svid};
use lanyard_core::x509::{CaSubject, SvidParams, X509Ca, verify_svid_chain};
use lanyard_core::{
    EntryId, JwtAuthority, KeyPair, KeyType, SelectorSet, SpiffeId, TrustBundle, TrustDomain,
    X509Authority,
};
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use lanyard_proto::workload::{
    JwtsvidRequest, ValidateJwtsvidRequest, WitBundlesRequest, WitsvidRequest, X509BundlesRequest,
    X509svidRequest,
};
use spiffe::{WorkloadApiClient, WorkloadApiError};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tonic::transport::{Channel, Endpoint};

const TD: &str = "example.org";
const FEDERATED_TD: &str = "federated.example";
const JWT_KEY_ID: &str = "jwt-key-1";
/// A bound on every wait for the server; tests fail instead of hanging.
pub const WAIT: Duration = Duration::from_secs(20);

fn now() -> SystemTime {
    SystemTime::now()
}

fn current_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

fn current_gid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().gid()
}

/// A trust domain's CA and JWT key, and a federated trust domain's CA.
pub struct Pki {
    trust_domain: TrustDomain,
    ca: X509Ca,
    jwt_key: Arc<KeyPair>,
    bundle: Arc<TrustBundle>,
    federated_trust_domain: TrustDomain,
    federated_bundle: Arc<TrustBundle>,
}

impl Pki {
    pub fn new() -> Self {
        let trust_domain = TrustDomain::new(TD).unwrap();
        // Backdated so that the tests can also mint SVIDs that have already expired.
        let issued = now() - Duration::from_secs(3 * 3600);
        let ca = X509Ca::self_signed(
            &trust_domain,
            KeyPair::generate(KeyType::EcP256).unwrap(),
            &CaSubject::default(),
            issued,
            Duration::from_secs(24 * 3600),
        )
        .unwrap();
        let jwt_key = Arc::new(KeyPair::generate(KeyType::EcP256).unwrap());
        let mut bundle = TrustBundle::new(trust_domain.clone());
        bundle.add_x509_authority(X509Authority::new(ca.cert_der().to_vec()).unwrap());
        bundle
            .add_jwt_authority(JwtAuthority::from_key_pair(JWT_KEY_ID, &jwt_key, None).unwrap())
            .unwrap();

        let federated_trust_domain = TrustDomain::new(FEDERATED_TD).unwrap();
        let federated_ca = X509Ca::self_signed(
            &federated_trust_domain,
            KeyPair::generate(KeyType::EcP256).unwrap(),
            &CaSubject::default(),
            issued,
            Duration::from_secs(24 * 3600),
        )
        .unwrap();
        let mut federated_bundle = TrustBundle::new(federated_trust_domain.clone());
        federated_bundle
            .add_x509_authority(X509Authority::new(federated_ca.cert_der().to_vec()).unwrap());
        Self {
            trust_domain,
            ca,
            jwt_key,
            bundle: Arc::new(bundle),
            federated_trust_domain,
            federated_bundle: Arc::new(federated_bundle),
        }
    }

    fn spiffe_id(&self, path: &str) -> SpiffeId {
        SpiffeId::from_path(&self.trust_domain, path).unwrap()
    }

    /// An entry for `path` matching `selectors`, federating with the federated domain.
    pub fn entry(
        &self,
        id: &str,
        path: &str,
        selectors: &[String],
        hint: &str,
    ) -> Arc<CachedEntry> {
        Arc::new(CachedEntry {
            id: EntryId::new(id).unwrap(),
            spiffe_id: self.spiffe_id(path),
            selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
            federates_with: BTreeSet::from([self.federated_trust_domain.clone()]),
            revision_number: 1,
            hint: hint.to_owned(),
            created_at: SystemTime::UNIX_EPOCH,
            admin: false,
            downstream: false,
            store_svid: false,
        })
    }

    /// An X.509-SVID for `entry`, minted at `issued` for `ttl`.
    fn identity(&self, entry: &Arc<CachedEntry>, issued: SystemTime, ttl: Duration) -> Identity {
        let key = KeyPair::generate(KeyType::EcP256).unwrap();
        let params = SvidParams::new(entry.spiffe_id.clone(), key.public_key_der(), ttl);
        let svid = self.ca.mint_svid(&params, issued).unwrap();
        Identity {
            entry: Arc::clone(entry),
            svid: Arc::new(svid),
            key: Arc::new(key),
        }
    }

    /// A synced snapshot with `entries`, each with a fresh one-hour SVID.
    pub fn snapshot(&self, entries: &[Arc<CachedEntry>]) -> Snapshot {
        let mut snapshot = self.empty_snapshot();
        for entry in entries {
            snapshot.entries.push(Arc::clone(entry));
            snapshot.identities.insert(
                entry.id.clone(),
                self.identity(entry, now(), Duration::from_secs(3600)),
            );
        }
        snapshot
    }

    fn empty_snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::new(self.trust_domain.clone(), Arc::clone(&self.bundle));
        snapshot.federated_bundles.insert(
            self.federated_trust_domain.clone(),
            Arc::clone(&self.federated_bundle),
        );
        snapshot.synced = true;
        snapshot
    }

    fn minter(&self) -> Arc<FakeMinter> {
        Arc::new(FakeMinter {
            key: Arc::clone(&self.jwt_key),
        })
    }
}

/// Mints JWT-SVIDs locally with the trust domain's JWT key, as the server would.
struct FakeMinter {
    key: Arc<KeyPair>,
}

impl FakeMinter {
    fn mint(&self, spiffe_id: &SpiffeId, audiences: &[String]) -> Result<JwtSvid, JwtMintError> {
        mint_jwt_svid(
            &JwtSigningKey {
                key: &self.key,
                key_id: JWT_KEY_ID,
                expires_at: None,
            },
            &JwtSvidParams {
                spiffe_id,
                audiences,
                ttl: Duration::from_secs(300),
                issuer: None,
            },
            now(),
        )
        .map_err(|e| JwtMintError::Server(e.to_string()))
    }
}

#[tonic::async_trait]
impl JwtMinter for FakeMinter {
    async fn jwt_svid(
        &self,
        entry: &CachedEntry,
        audiences: &[String],
    ) -> Result<JwtSvid, JwtMintError> {
        self.mint(&entry.spiffe_id, audiences)
    }
}

/// The selector every entry for this test process uses.
pub fn my_uid_selector() -> String {
    format!("unix:uid:{}", current_uid())
}

/// A running Workload API on a temporary socket.
pub struct Agent {
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    snapshots: watch::Sender<Arc<Snapshot>>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), ServeError>>,
}

impl Agent {
    async fn start(pki: &Pki, snapshot: Snapshot) -> Self {
        Self::start_with(pki, snapshot, |api| api).await
    }

    pub async fn start_with(
        pki: &Pki,
        snapshot: Snapshot,
        configure: impl FnOnce(WorkloadApi) -> WorkloadApi,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // A directory that does not exist yet, so that serve() creates it.
        let socket = dir.path().join("agent").join("public").join("api.sock");
        let (snapshots, receiver) = watch::channel(Arc::new(snapshot));
        let api = configure(WorkloadApi::new(
            receiver,
            pki.minter(),
            Arc::new(UnixAttestor::new(&UnixAttestorConfig::default())),
        ));
        let (shutdown, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn({
            let socket = socket.clone();
            async move {
                workload::serve(&socket, api, async move {
                    let _ = stopped.await;
                })
                .await
            }
        });
        wait_for_socket(&socket).await;
        Self {
            _dir: dir,
            socket,
            snapshots,
            shutdown: Some(shutdown),
            server,
        }
    }

    pub fn publish(&self, snapshot: Snapshot) {
        self.snapshots.send_replace(Arc::new(snapshot));
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    async fn client(&self) -> WorkloadApiClient {
        WorkloadApiClient::connect_to(self.endpoint())
            .await
            .unwrap()
    }

    pub async fn raw_client(&self) -> SpiffeWorkloadApiClient<Channel> {
        SpiffeWorkloadApiClient::new(raw_channel(&self.socket).await)
    }

    /// Shuts the server down and checks that it stops, even with streams still open.
    pub async fn stop(mut self) {
        self.shutdown.take().unwrap().send(()).unwrap();
        tokio::time::timeout(WAIT, &mut self.server)
            .await
            .expect("the server did not stop")
            .unwrap()
            .unwrap();
    }
}

async fn wait_for_socket(socket: &Path) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !socket.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "socket {} never appeared",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn raw_channel(socket: &Path) -> Channel {
    Endpoint::from_shared(format!("unix://{}", socket.display()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(workload::SECURITY_HEADER, "true".parse().unwrap());
    request
}

pub async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .expect("timed out waiting for the Workload API")
}

#[tokio::test]
async fn x509_svid_chain_verifies_against_the_served_bundle() {
    let pki = Pki::new();
    let web = pki.entry("web", "/web", &[my_uid_selector()], "");
    let other = pki.entry(
        "zzz-other-uid",
        "/other",
        &["unix:uid:4294967".to_owned()],
        "",
    );
    let snapshot = pki.snapshot(&[Arc::clone(&web), other]);
    let served_key = snapshot.identities[&web.id].key.secret_pkcs8_der().to_vec();
    let agent = Agent::start(&pki, snapshot).await;
    let client = agent.client().await;

    let context = within(client.fetch_x509_context()).await.unwrap();
    assert_eq!(context.svids().len(), 1, "only this process's identity");
    let svid = context.default_svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(svid.private_key().as_ref(), served_key.as_slice());

    let own = spiffe::TrustDomain::new(TD).unwrap();
    let federated = spiffe::TrustDomain::new(FEDERATED_TD).unwrap();
    let bundle = context.bundle_set().get(&own).unwrap();
    let authorities: Vec<&[u8]> = bundle.authorities().iter().map(|c| c.as_bytes()).collect();
    assert_eq!(authorities, [pki.ca.cert_der()]);
    assert!(context.bundle_set().get(&federated).is_some());
    let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
    let verified = verify_svid_chain(&chain, &pki.trust_domain, &authorities, now()).unwrap();
    assert_eq!(verified.spiffe_id(), &pki.spiffe_id("/web"));

    let bundles = within(client.fetch_x509_bundles()).await.unwrap();
    assert!(bundles.get(&own).is_some());
    assert!(bundles.get(&federated).is_some());

    // The raw message: DER chain leaf first, PKCS#8 key, bundle maps keyed by SPIFFE ID.
    let mut raw = agent.raw_client().await;
    let mut stream = within(raw.fetch_x509svid(with_header(X509svidRequest {})))
        .await
        .unwrap()
        .into_inner();
    let message = within(stream.message()).await.unwrap().unwrap();
    assert_eq!(message.svids.len(), 1);
    assert_eq!(message.svids[0].x509_svid_key, served_key);
    assert_eq!(message.svids[0].bundle, pki.ca.cert_der());
    let keys: Vec<&String> = message.federated_bundles.keys().collect();
    assert_eq!(keys, ["spiffe://federated.example"]);
    drop(stream);

    // The socket any UID can use, in a directory any UID can enter.
    let socket_mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(socket_mode & 0o777, 0o777, "socket mode {socket_mode:o}");
    let dir_mode = std::fs::metadata(agent.socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o755, "directory mode {dir_mode:o}");

    agent.stop().await;
}

/// The entry IDs the tracker holds as unreported, once they are exactly `expected` (a stream
/// records a response just after sending it, so the client may see it first).
async fn wait_for_unreported(tracker: &UsageTracker, expected: &[&str]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let unreported: Vec<String> = tracker
            .unreported()
            .iter()
            .map(|s| s.entry_id.as_str().to_owned())
            .collect();
        if unreported == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "unreported {unreported:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn served_svids_are_recorded_for_usage_reports() {
    let pki = Pki::new();
    let web = pki.entry("web", "/web", &[my_uid_selector()], "");
    let db = pki.entry("db", "/db", &[my_uid_selector()], "");
    let other = pki.entry("other", "/other", &["unix:uid:4294967".to_owned()], "");
    let entries = [Arc::clone(&web), Arc::clone(&db), Arc::clone(&other)];
    let tracker = Arc::new(UsageTracker::new());
    // A clock the test moves forward, so that each phase serves at a later second.
    let offset = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let clock: workload::Clock = {
        let offset = Arc::clone(&offset);
        Arc::new(move || {
            now() + Duration::from_secs(offset.load(std::sync::atomic::Ordering::SeqCst))
        })
    };
    let advance = || offset.fetch_add(10, std::sync::atomic::Ordering::SeqCst);
    let agent = Agent::start_with(&pki, pki.snapshot(&entries), |api| {
        api.with_usage(Arc::clone(&tracker)).with_clock(clock)
    })
    .await;
    let mut raw = agent.raw_client().await;

    // Bundles carry no SVID.
    let mut bundles = within(raw.fetch_x509_bundles(with_header(X509BundlesRequest {})))
        .await
        .unwrap()
        .into_inner();
    within(bundles.message()).await.unwrap().unwrap();
    drop(bundles);
    assert!(tracker.unreported().is_empty());

    // The first X.509 response counts for every SVID in it, and only those.
    let mut stream = within(raw.fetch_x509svid(with_header(X509svidRequest {})))
        .await
        .unwrap()
        .into_inner();
    within(stream.message()).await.unwrap().unwrap();
    wait_for_unreported(&tracker, &["db", "web"]).await;
    tracker.acknowledge(&tracker.unreported());
    assert!(tracker.unreported().is_empty());

    // A pushed response (rotated SVIDs) counts again.
    advance();
    agent.publish(pki.snapshot(&entries));
    within(stream.message()).await.unwrap().unwrap();
    wait_for_unreported(&tracker, &["db", "web"]).await;
    tracker.acknowledge(&tracker.unreported());
    drop(stream);

    // A JWT-SVID counts for the entry it was minted for.
    advance();
    let request = with_header(JwtsvidRequest {
        audience: vec!["api".to_owned()],
        spiffe_id: "spiffe://example.org/web".to_owned(),
    });
    within(raw.fetch_jwtsvid(request)).await.unwrap();
    wait_for_unreported(&tracker, &["web"]).await;

    agent.stop().await;
}

#[tokio::test]
async fn jwt_svid_validates_offline_and_through_the_api() {
    let pki = Pki::new();
    let web = pki.entry("web", "/web", &[my_uid_selector()], "");
    let db = pki.entry("db", "/db", &[my_uid_selector()], "database");
    let agent = Agent::start(&pki, pki.snapshot(&[web, db])).await;
    let client = agent.client().await;

    let all = within(client.fetch_all_jwt_svids(["service-a"], None))
        .await
        .unwrap();
    let ids: BTreeSet<String> = all.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            "spiffe://example.org/db".to_owned(),
            "spiffe://example.org/web".to_owned()
        ])
    );
    assert!(all.iter().any(|s| s.hint() == Some("database")));

    let web_id = spiffe::SpiffeId::new("spiffe://example.org/web").unwrap();
    let svid = within(client.fetch_jwt_svid(["service-a", "service-b"], Some(&web_id)))
        .await
        .unwrap();
    assert_eq!(svid.spiffe_id(), &web_id);

    // Offline, with the independent verifier and the JWKS the agent serves.
    let jwt_bundles = within(client.fetch_jwt_bundles()).await.unwrap();
    let offline =
        spiffe::JwtSvid::parse_and_validate(svid.token(), &jwt_bundles, &["service-b"]).unwrap();
    assert_eq!(offline.spiffe_id(), &web_id);
    assert!(
        jwt_bundles
            .get(&spiffe::TrustDomain::new(FEDERATED_TD).unwrap())
            .is_some(),
        "federated JWT bundle served"
    );

    // Through ValidateJWTSVID.
    let validated = within(client.validate_jwt_token("service-a", svid.token()))
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id(), &web_id);
    let mut raw = agent.raw_client().await;
    let response = within(raw.validate_jwtsvid(with_header(ValidateJwtsvidRequest {
        audience: "service-a".to_owned(),
        svid: svid.token().to_owned(),
    })))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(response.spiffe_id, "spiffe://example.org/web");
    let claims = response.claims.unwrap().fields;
    assert!(claims.contains_key("exp") && claims.contains_key("sub"));

    let status = within(raw.validate_jwtsvid(with_header(ValidateJwtsvidRequest {
        audience: "someone-else".to_owned(),
        svid: svid.token().to_owned(),
    })))
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("someone-else"), "{status:?}");

    // Argument checks, with SPIRE's messages.
    for (request, message) in [
        (
            JwtsvidRequest {
                audience: vec![],
                spiffe_id: String::new(),
            },
            "audience must be specified",
        ),
        (
            JwtsvidRequest {
                audience: vec!["a".to_owned()],
                spiffe_id: "not a spiffe id".to_owned(),
            },
            "invalid requested SPIFFE ID: ",
        ),
    ] {
        let status = within(raw.fetch_jwtsvid(with_header(request)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with(message), "{status:?}");
    }
    for (audience, svid, message) in [
        ("", "x", "audience must be specified"),
        ("a", "", "svid must be specified"),
    ] {
        let status = within(raw.validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: audience.to_owned(),
            svid: svid.to_owned(),
        })))
        .await
        .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::InvalidArgument, message)
        );
    }

    // An identity this caller does not have.
    let stranger = spiffe::SpiffeId::new("spiffe://example.org/not-mine").unwrap();
    let error = within(client.fetch_jwt_svid(["service-a"], Some(&stranger)))
        .await
        .unwrap_err();
    assert!(
        matches!(error, WorkloadApiError::NoIdentityIssued),
        "{error:?}"
    );

    agent.stop().await;
}

#[tokio::test]
async fn rotation_reaches_an_open_stream() {
    let pki = Pki::new();
    let web = pki.entry("web", "/web", &[my_uid_selector()], "");
    let first = pki.snapshot(&[Arc::clone(&web)]);
    let agent = Agent::start(&pki, first.clone()).await;
    let client = agent.client().await;
    let mut contexts = within(client.stream_x509_contexts()).await.unwrap();

    let initial = within(contexts.next()).await.unwrap().unwrap();
    let initial_leaf = initial.default_svid().unwrap().leaf().as_bytes().to_vec();

    // A change that does not concern this workload sends nothing; the rotation that
    // follows is the next message.
    let mut unrelated = first.clone();
    let other = pki.entry("other", "/other", &["unix:uid:4294967".to_owned()], "");
    unrelated.entries.push(Arc::clone(&other));
    unrelated.identities.insert(
        other.id.clone(),
        pki.identity(&other, now(), Duration::from_secs(3600)),
    );
    agent.publish(unrelated.clone());

    let mut rotated = unrelated;
    let new_identity = pki.identity(&web, now(), Duration::from_secs(7200));
    let new_leaf = new_identity.svid.leaf_der().to_vec();
    rotated.identities.insert(web.id.clone(), new_identity);
    agent.publish(rotated.clone());

    let next = within(contexts.next()).await.unwrap().unwrap();
    let next_leaf = next.default_svid().unwrap().leaf().as_bytes().to_vec();
    assert_ne!(next_leaf, initial_leaf);
    assert_eq!(next_leaf, new_leaf);

    // Withdrawing the workload's entry ends the stream with PermissionDenied.
    let mut withdrawn = rotated;
    withdrawn.entries.retain(|e| e.id != web.id);
    withdrawn.identities.remove(&web.id);
    agent.publish(withdrawn);
    let error = within(contexts.next()).await.unwrap().unwrap_err();
    assert!(
        matches!(error, WorkloadApiError::NoIdentityIssued),
        "{error:?}"
    );

    agent.stop().await;
}

#[tokio::test]
async fn a_workload_without_entries_gets_no_identity_issued() {
    let pki = Pki::new();
    let other = pki.entry("other", "/other", &["unix:uid:4294967".to_owned()], "");
    let agent = Agent::start(&pki, pki.snapshot(&[other])).await;
    let client = agent.client().await;

    let x509 = within(client.fetch_x509_svid()).await.unwrap_err();
    assert!(
        matches!(x509, WorkloadApiError::NoIdentityIssued),
        "{x509:?}"
    );
    let bundles = within(client.fetch_x509_bundles()).await.unwrap_err();
    assert!(
        matches!(bundles, WorkloadApiError::NoIdentityIssued),
        "{bundles:?}"
    );
    let jwt_bundles = within(client.fetch_jwt_bundles()).await.unwrap_err();
    assert!(
        matches!(jwt_bundles, WorkloadApiError::NoIdentityIssued),
        "{jwt_bundles:?}"
    );
    let jwt = within(client.fetch_jwt_svid(["a"], None))
        .await
        .unwrap_err();
    assert!(matches!(jwt, WorkloadApiError::NoIdentityIssued), "{jwt:?}");

    // The status itself, as go-spiffe and py-spiffe see it.
    let mut raw = agent.raw_client().await;
    let mut stream = within(raw.fetch_x509svid(with_header(X509svidRequest {})))
        .await
        .unwrap()
        .into_inner();
    let status = within(stream.message()).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::PermissionDenied, "no identity issued")
    );

    // Validation needs no identity of the caller's own, as in SPIRE.
    let token = pki
        .minter()
        .mint(&pki.spiffe_id("/somebody"), &["me".to_owned()])
        .unwrap();
    let validated = within(client.validate_jwt_token("me", &token.token))
        .await
        .unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/somebody"
    );

    agent.stop().await;
}

#[tokio::test]
async fn first_message_waits_for_sync_and_for_minted_svids() {
    let pki = Pki::new();
    let web = pki.entry("web", "/web", &[my_uid_selector()], "");
    let mut unsynced = pki.empty_snapshot();
    unsynced.synced = false;
    let agent = Agent::start(&pki, unsynced).await;
    let client = agent.client().await;
    let mut contexts = within(client.stream_x509_contexts()).await.unwrap();

    // Synced, with the entry but no SVID yet: still nothing to send.
    let mut entry_only = pki.empty_snapshot();
    entry_only.entries.push(Arc::clone(&web));
    agent.publish(entry_only);
    // Now the SVID.
    agent.publish(pki.snapshot(&[Arc::clone(&web)]));
    let context = within(contexts.next()).await.unwrap().unwrap();
    assert_eq!(
        context.default_svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    agent.stop().await;
}

#[tokio::test]
async fn an_expired_svid_is_never_served() {
    let pki = Pki::new();
    let web = pki.entry("web", "/web", &[my_uid_selector()], "");
    let mut snapshot = pki.empty_snapshot();
    snapshot.entries.push(Arc::clone(&web));
    let two_hours_ago = now() - Duration::from_secs(2 * 3600);
    snapshot.identities.insert(
        web.id.clone(),
        pki.identity(&web, two_hours_ago, Duration::from_secs(3600)),
    );
    let agent = Agent::start_with(&pki, snapshot, |api| {
        api.with_initial_wait(Duration::from_millis(300))
    })
    .await;

    let mut raw = agent.raw_client().await;
    let mut stream = within(raw.fetch_x509svid(with_header(X509svidRequest {})))
        .await
        .unwrap()
        .into_inner();
    let status = within(stream.message()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    agent.stop().await;
}

#[tokio::test]
async fn the_security_header_is_required_only_by_the_workload_api() {
    let pki = Pki::new();
    let web = pki.entry("web", "/web", &[my_uid_selector()], "");
    let snapshot = pki.snapshot(&[web]);

    // The Workload API next to a health service on one socket, as SDS will be.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let listener = workload::bind_socket(&socket).unwrap();
    let (_snapshots, receiver) = watch::channel(Arc::new(snapshot));
    let api = WorkloadApi::new(
        receiver,
        pki.minter(),
        Arc::new(UnixAttestor::new(&UnixAttestorConfig::default())),
    );
    let stopper = api.stream_stopper();
    let (_health_reporter, health_service) = tonic_health::server::health_reporter();
    let limits = lanyard_agent::config::WorkloadApiConfig::default();
    let router = workload::server_builder(&limits, None)
        .add_workload_api(api)
        .add_service(health_service);
    let (shutdown, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        workload::serve_router(listener, router, &limits, async move {
            let _ = stopped.await;
            stopper.stop();
        })
        .await
    });

    let channel = raw_channel(&socket).await;
    let mut raw = SpiffeWorkloadApiClient::new(channel.clone());
    let status = within(raw.fetch_x509svid(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            tonic::Code::InvalidArgument,
            "security header missing from request"
        )
    );
    let mut wrong = tonic::Request::new(JwtsvidRequest {
        audience: vec!["a".to_owned()],
        spiffe_id: String::new(),
    });
    wrong
        .metadata_mut()
        .insert(workload::SECURITY_HEADER, "false".parse().unwrap());
    let status = within(raw.fetch_jwtsvid(wrong)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // WIT-SVIDs are not served; clients stop asking on Unimplemented.
    let status = within(raw.fetch_witsvid(with_header(WitsvidRequest::default())))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    let status = within(raw.fetch_wit_bundles(with_header(WitBundlesRequest {})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    // Another service on the socket does not need the header.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = within(health.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    }))
    .await
    .unwrap();
    assert_eq!(
        response.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // An open stream does not hold up shutdown.
    let mut stream = within(raw.fetch_x509svid(with_header(X509svidRequest {})))
        .await
        .unwrap()
        .into_inner();
    within(stream.message()).await.unwrap().unwrap();
    shutdown.send(()).unwrap();
    within(server).await.unwrap().unwrap();
}

/// Sends one `FetchX509SVID` with `body` as its request body (and `extra` headers) on a raw
/// HTTP/2 connection, and returns the response's headers and its first data frame, if any.
async fn raw_fetch_x509svid(
    client: &mut h2::client::SendRequest<prost::bytes::Bytes>,
    body: Vec<u8>,
    extra: &[(&'static str, &'static str)],
) -> (http::HeaderMap, Option<prost::bytes::Bytes>) {
    let mut request = http::Request::post("http://localhost/SpiffeWorkloadAPI/FetchX509SVID")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(workload::SECURITY_HEADER, "true");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let request = request.body(()).unwrap();
    let (response, mut stream) = within(client.clone().ready())
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap();
    stream.send_data(body.into(), true).unwrap();
    let response = within(response).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let (parts, mut body) = response.into_parts();
    let first = if body.is_end_stream() {
        None
    } else {
        within(body.data()).await.map(Result::unwrap)
    };
    (parts.headers, first)
}

fn grpc_body(compressed: u8, messages: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    for message in messages {
        body.push(compressed);
        body.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        body.extend_from_slice(message);
    }
    body
}

#[tokio::test]
async fn fetch_x509svid_is_answered_on_its_stream_and_a_compressed_one_by_tonic() {
    let pki = Pki::new();
    let web = pki.entry("web", "/web", &[my_uid_selector()], "");
    let agent = Agent::start(&pki, pki.snapshot(&[Arc::clone(&web)])).await;

    // Answered on the stream itself, with or without a deadline (the client's to keep).
    let mut raw = agent.raw_client().await;
    let mut direct = within(raw.fetch_x509svid(with_header(X509svidRequest {})))
        .await
        .unwrap()
        .into_inner();
    let direct = within(direct.message()).await.unwrap().unwrap();
    let mut deadline = with_header(X509svidRequest {});
    deadline.set_timeout(Duration::from_secs(60));
    let mut deadline = within(raw.fetch_x509svid(deadline))
        .await
        .unwrap()
        .into_inner();
    let deadline = within(deadline.message()).await.unwrap().unwrap();
    assert_eq!(direct.svids.len(), 1);
    assert_eq!(direct.svids[0].spiffe_id, "spiffe://example.org/web");
    assert_eq!(direct, deadline);

    // Bodies that are not one whole uncompressed message get a status of their own, and the
    // connection goes on serving.
    let stream = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    let (mut client, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    for (body, code, message) in [
        (
            grpc_body(0, &[&[], &[]]),
            tonic::Code::Unimplemented,
            "more than one message",
        ),
        (grpc_body(1, &[&[]]), tonic::Code::Internal, "compressed"),
        (vec![0, 0, 0], tonic::Code::Internal, "length"),
        (grpc_body(0, &[&[8]]), tonic::Code::Internal, "decoding"),
        (
            Vec::new(),
            tonic::Code::Internal,
            "Missing request message.",
        ),
        (
            grpc_body(0, &[&[0; 70_000]]),
            tonic::Code::ResourceExhausted,
            "larger than 65536 bytes",
        ),
    ] {
        let (headers, data) = raw_fetch_x509svid(&mut client, body, &[]).await;
        let status = tonic::Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(message), "{status:?}");
        assert_eq!(data, None);
    }
    // A request naming a compression goes to tonic, which takes none.
    let (headers, _) = raw_fetch_x509svid(
        &mut client,
        grpc_body(1, &[&[]]),
        &[("grpc-encoding", "gzip")],
    )
    .await;
    let status = tonic::Status::from_header_map(&headers).unwrap();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("gzip"), "{status:?}");

    let (headers, data) = raw_fetch_x509svid(&mut client, grpc_body(0, &[&[]]), &[]).await;
    assert_eq!(headers.get("content-type").unwrap(), "application/grpc");
    assert_eq!(headers.get("grpc-status"), None);
    let data = data.unwrap();
    assert_eq!(data[0], 0);
    assert_eq!(
        usize::try_from(u32::from_be_bytes(data[1..5].try_into().unwrap())).unwrap(),
        data.len() - 5
    );
    let response: lanyard_proto::workload::X509svidResponse =
        prost::Message::decode(&data[5..]).unwrap();
    assert_eq!(response, direct);

    agent.stop().await;
}

#[tokio::test]
async fn a_stale_socket_is_replaced_but_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    drop(workload::bind_socket(&socket).unwrap());
    assert!(socket.exists());
    drop(workload::bind_socket(&socket).unwrap());

    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let error = workload::bind_socket(&file).unwrap_err();
    assert!(matches!(error, ServeError::NotASocket(_)), "{error:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

fn my_credentials() -> PeerCredentials {
    PeerCredentials {
        pid: Some(i32::try_from(std::process::id()).unwrap()),
        uid: current_uid(),
        gid: current_gid(),
        start_time: None,
        process: None,
    }
}

fn values_of(selectors: &SelectorSet, kind: &str) -> Vec<String> {
    let prefix = format!("{kind}:");
    selectors
        .iter()
        .filter(|s| s.kind() == "unix")
        .filter_map(|s| s.value().strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn unix_attestor_describes_this_process() {
    let attestor = UnixAttestor::new(&UnixAttestorConfig::default());
    let peer = my_credentials().with_current_start_time().unwrap();
    let selectors = attestor.attest(&peer).await.unwrap();
    assert_eq!(values_of(&selectors, "uid"), [current_uid().to_string()]);
    assert_eq!(values_of(&selectors, "gid"), [current_gid().to_string()]);
    assert!(values_of(&selectors, "path").is_empty(), "path is opt-in");
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let user = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.get(2) == Some(&current_uid().to_string().as_str())).then(|| fields[0].to_owned())
    });
    assert_eq!(values_of(&selectors, "user"), Vec::from_iter(user));
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let groups: BTreeSet<String> = status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let attested: BTreeSet<String> = values_of(&selectors, "supplementary_gid")
        .into_iter()
        .collect();
    assert_eq!(attested, groups);
}

#[tokio::test]
async fn unix_attestor_hashes_the_executable_when_asked() {
    let config = UnixAttestorConfig {
        discover_workload_path: true,
        workload_size_limit: 0,
    };
    let attestor = UnixAttestor::new(&config);
    let selectors = attestor.attest(&my_credentials()).await.unwrap();
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    assert_eq!(
        values_of(&selectors, "path"),
        [exe.to_string_lossy().into_owned()]
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(&exe).unwrap());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(values_of(&selectors, "sha256"), std::slice::from_ref(&hex));
    // Again, from the digest cache.
    let again = attestor.attest(&my_credentials()).await.unwrap();
    assert_eq!(values_of(&again, "sha256"), [hex]);

    let limited = UnixAttestor::new(&UnixAttestorConfig {
        discover_workload_path: true,
        workload_size_limit: 1,
    });
    let error = limited.attest(&my_credentials()).await.unwrap_err();
    assert!(matches!(error, AttestError::TooLarge { .. }), "{error:?}");
}

#[tokio::test]
async fn unix_attestor_refuses_dead_and_reused_processes() {
    let attestor = UnixAttestor::new(&UnixAttestorConfig::default());
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    child.wait().unwrap();
    let dead = PeerCredentials {
        pid: Some(pid),
        ..my_credentials()
    };
    let error = attestor.attest(&dead).await.unwrap_err();
    assert!(
        matches!(error, AttestError::ProcessGone { .. }),
        "{error:?}"
    );

    let me = my_credentials().with_current_start_time().unwrap();
    let impostor = PeerCredentials {
        start_time: me.start_time.map(|t| t + 1),
        ..me.clone()
    };
    let error = attestor.attest(&impostor).await.unwrap_err();
    assert!(matches!(error, AttestError::PidReused { .. }), "{error:?}");

    let other_user = PeerCredentials {
        uid: me.uid.wrapping_add(1),
        ..me
    };
    let error = attestor.attest(&other_user).await.unwrap_err();
    assert!(
        matches!(error, AttestError::CredentialsChanged { what: "uid", .. }),
        "{error:?}"
    );
}

/// Connections are pinned by a pidfd: a caller that has exited is refused even while its
/// `/proc` entry is still there (a zombie, not yet reaped, with its start time and
/// credentials unchanged), which a start-time pin would accept.
#[tokio::test]
async fn a_caller_pinned_by_pidfd_is_refused_once_it_exits() {
    let attestor = UnixAttestor::new(&UnixAttestorConfig::default());
    let pinned = my_credentials().pinned().unwrap();
    let process = pinned.process.clone().expect("this kernel has pidfds");
    assert!(!process.has_exited().unwrap());
    attestor.attest(&pinned).await.unwrap();

    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let caller = PeerCredentials {
        pid: Some(pid),
        ..my_credentials()
    };
    let pinned = caller.clone().pinned().unwrap();
    let by_start_time = caller.with_current_start_time().unwrap();
    attestor.attest(&pinned).await.unwrap();
    attestor.attest(&by_start_time).await.unwrap();

    child.kill().unwrap();
    let handle = pinned.process.clone().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !handle.has_exited().unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never exited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Not reaped: /proc still describes it, and its start time still matches.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("State:\tZ"), "{status}");
    attestor.attest(&by_start_time).await.unwrap();
    let error = attestor.attest(&pinned).await.unwrap_err();
    assert!(
        matches!(error, AttestError::ProcessGone { pid: gone } if gone == pid),
        "{error:?}"
    );

    child.wait().unwrap();
    let error = attestor.attest(&pinned).await.unwrap_err();
    assert!(
        matches!(error, AttestError::ProcessGone { .. }),
        "{error:?}"
    );
    assert!(matches!(
        PeerCredentials {
            pid: Some(pid),
            ..my_credentials()
        }
        .pinned(),
        Err(AttestError::ProcessGone { .. })
    ));
}
