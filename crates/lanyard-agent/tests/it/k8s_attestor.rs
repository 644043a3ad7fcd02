//! The k8s workload attestor against a kubelet on loopback: a TLS server with a certificate
//! from a CA made for the test, serving `GET /pods` from pod lists in the kubelet's shape,
//! checking the bearer token, and changing its answer between requests as a test tells it.
//! The caller is a process tree made up under a temporary `/proc`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanyard_agent::attestor::k8s::{K8sAttestor, K8sSetupError};
use lanyard_agent::attestor::{
    AttestError, CombinedAttestor, PeerCredentials, UnixAttestor, WorkloadAttestor,
};
use lanyard_agent::config::{AgentConfig, K8sAttestorConfig, UnixAttestorConfig};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/k8s");
const PID: i32 = 31337;
const START_TIME: u64 = 8_675_309;
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.agent-token.sig";
const WEB_POD_UID: &str = "8e5f5a3c-2f4b-4a1d-9c6e-7b8a9d0c1e2f";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(Path::new(FIXTURES).join(name)).unwrap()
}

/// The pod list once the batch pod's worker container has started.
fn pods_with_worker_started() -> String {
    let mut list: Value = serde_json::from_str(&fixture("pods.json")).unwrap();
    for pod in list["items"].as_array_mut().unwrap() {
        if pod["metadata"]["name"] == "report-28473910-q8v4z" {
            let worker = &mut pod["status"]["containerStatuses"][0];
            worker["containerID"] =
                "containerd://5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f"
                    .into();
            worker["state"] = serde_json::json!({"running": {"startedAt": "2026-03-02T11:10:04Z"}});
            worker["imageID"] =
                "registry.example.com/batch/report@sha256:6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b"
                    .into();
        }
    }
    list.to_string()
}

/// A CA and a server certificate it signed, as PEM.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    /// A new CA and a certificate for these names (IP addresses become IP SANs).
    fn new(names: &[&str]) -> Self {
        Self::with_ca_name("node-a-ca@1772442867", names)
    }

    fn with_ca_name(ca_name: &str, names: &[&str]) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "node-a@1772442867");
        let cert = params.signed_by(&key, &*ca).unwrap();
        Self {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// What the fake kubelet answers and has seen.
#[derive(Default)]
struct KubeletState {
    /// Pod lists to serve in turn; the last one is served again and again.
    answers: VecDeque<String>,
    /// The token it accepts.
    token: String,
    /// The `Authorization` header of each request (`None`: absent).
    authorizations: Vec<Option<String>>,
}

/// A kubelet on 127.0.0.1 serving `GET /pods`, over TLS or (the read-only port) not.
struct FakeKubelet {
    port: u16,
    state: Arc<Mutex<KubeletState>>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeKubelet {
    async fn start(tls: Option<&Pki>, answers: Vec<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(KubeletState {
            answers: answers.into(),
            token: TOKEN.to_owned(),
            authorizations: Vec::new(),
        }));
        let acceptor = tls.map(|pki| {
            let chain = vec![CertificateDer::from_pem_slice(pki.cert_pem.as_bytes()).unwrap()];
            let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let served = Arc::clone(&state);
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let state = Arc::clone(&served);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(acceptor) => {
                            // A client that refuses the certificate ends here.
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                serve(tls, &state, true).await;
                            }
                        }
                        None => serve(tcp, &state, false).await,
                    }
                });
            }
        });
        Self {
            port,
            state,
            server,
        }
    }

    fn requests(&self) -> usize {
        self.state.lock().unwrap().authorizations.len()
    }

    fn authorizations(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().authorizations.clone()
    }

    fn accept_token(&self, token: &str) {
        self.state.lock().unwrap().token = token.to_owned();
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// One HTTP/1.1 exchange, as the kubelet answers it: 401 without the right bearer token on
/// the secure port, 404 for anything but `/pods`, else the next pod list.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    state: &Mutex<KubeletState>,
    secure: bool,
) {
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
        assert!(request.len() < 64 * 1024, "request too long");
    }
    let request = String::from_utf8_lossy(&request).into_owned();
    let mut lines = request.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let authorization = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        .map(|(_, value)| value.trim().to_owned());
    let (status, body) = {
        let mut state = state.lock().unwrap();
        state.authorizations.push(authorization.clone());
        if request_line != "GET /pods HTTP/1.1" {
            ("404 Not Found", "404 page not found".to_owned())
        } else if secure && authorization != Some(format!("Bearer {}", state.token)) {
            ("401 Unauthorized", "Unauthorized".to_owned())
        } else {
            let body = if state.answers.len() > 1 {
                state.answers.pop_front().unwrap_or_default()
            } else {
                state.answers.front().cloned().unwrap_or_default()
            };
            ("200 OK", body)
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A caller under a temporary `/proc`, with its account files and the kubelet's CA and
/// token files.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new(cgroup: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let process = dir.path().join("proc").join(PID.to_string());
        std::fs::create_dir_all(&process).unwrap();
        std::fs::write(
            process.join("stat"),
            format!("{PID} (web) S 1 {PID} {PID} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 4 0 {START_TIME} 0 0\n"),
        )
        .unwrap();
        std::fs::write(
            process.join("status"),
            "Name:\tweb\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t\n",
        )
        .unwrap();
        std::fs::write(process.join("cgroup"), cgroup).unwrap();
        std::fs::write(
            dir.path().join("passwd"),
            "app:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("group"), "app:x:1000:\n").unwrap();
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        Self { dir }
    }

    fn proc_root(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_ca(&self, pki: &Pki) -> PathBuf {
        let path = self.path("ca.crt");
        std::fs::write(&path, &pki.ca_pem).unwrap();
        path
    }

    /// The `[workload_attestor.k8s]` table a test would write for a kubelet on 127.0.0.1.
    fn agent_toml(&self, kubelet: &FakeKubelet, extra: &str) -> String {
        format!(
            "server_address = \"127.0.0.1:8081\"\ntrust_domain = \"example.org\"\n\
             data_dir = \"/unused\"\n\
             [workload_attestor.k8s]\n\
             kubelet_host = \"127.0.0.1\"\n\
             kubelet_secure_port = {}\n\
             kubelet_ca_path = \"{}\"\n\
             token_path = \"{}\"\n\
             {extra}",
            kubelet.port,
            self.path("ca.crt").display(),
            self.path("token").display(),
        )
    }

    /// The k8s settings of `agent_toml`, parsed as the agent parses them.
    fn config(&self, kubelet: &FakeKubelet, extra: &str) -> K8sAttestorConfig {
        AgentConfig::parse(&self.agent_toml(kubelet, extra))
            .unwrap()
            .workload_attestor
            .k8s
            .unwrap()
    }

    fn k8s(&self, config: &K8sAttestorConfig) -> Result<K8sAttestor, K8sSetupError> {
        K8sAttestor::with_paths(config, self.proc_root(), |_| None)
    }

    fn combined(&self, config: &K8sAttestorConfig) -> CombinedAttestor {
        let unix = UnixAttestor::with_paths(
            &UnixAttestorConfig::default(),
            self.proc_root(),
            self.path("passwd"),
            self.path("group"),
        );
        CombinedAttestor::with_parts(unix, Some(self.k8s(config).unwrap()))
    }
}

fn peer() -> PeerCredentials {
    PeerCredentials {
        pid: Some(PID),
        uid: 1000,
        gid: 1000,
        start_time: Some(START_TIME),
        process: None,
    }
}

fn strings(selectors: &lanyard_core::SelectorSet) -> Vec<String> {
    selectors.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn a_pod_workload_gets_its_unix_and_k8s_selectors_from_a_kubelet_over_https() {
    let pki = Pki::new(&["127.0.0.1"]);
    let kubelet = FakeKubelet::start(Some(&pki), vec![fixture("pods.json")]).await;
    let node = Node::new(&fixture("cgroup-v2-containerd-systemd.txt"));
    node.write_ca(&pki);
    let attestor = node.combined(&node.config(&kubelet, ""));

    let selectors = strings(&attestor.attest(&peer()).await.unwrap());
    assert_eq!(
        selectors,
        [
            "k8s:container-image:registry.example.com/shop/web:1.4.2",
            "k8s:container-image:registry.example.com/shop/web@sha256:5b0b1f6bc3c4a3dfe6e4b0e8a0c84c6a3f1d3f0a9b7c6d5e4f3a2b1c0d9e8f7a",
            "k8s:container-name:app",
            "k8s:node-name:node-a",
            "k8s:ns:shop",
            "k8s:pod-image-count:2",
            "k8s:pod-image:docker.io/envoyproxy/envoy:v1.31.0",
            "k8s:pod-image:docker.io/envoyproxy/envoy@sha256:8c2c1b0e6f5d4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b",
            "k8s:pod-image:registry.example.com/shop/web:1.4.2",
            "k8s:pod-image:registry.example.com/shop/web@sha256:5b0b1f6bc3c4a3dfe6e4b0e8a0c84c6a3f1d3f0a9b7c6d5e4f3a2b1c0d9e8f7a",
            "k8s:pod-init-image-count:1",
            "k8s:pod-init-image:registry.example.com/shop/migrate:1.4.2",
            "k8s:pod-init-image:registry.example.com/shop/migrate@sha256:0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e",
            "k8s:pod-label:app.kubernetes.io/name:web",
            "k8s:pod-label:pod-template-hash:7d4b9c8f6d",
            "k8s:pod-label:tier:frontend",
            "k8s:pod-name:web-7d4b9c8f6d-x2k9p",
            "k8s:pod-owner-uid:ReplicaSet:0b6c1f5e-8a2d-4d3b-9e7f-1c2a3b4d5e6f",
            "k8s:pod-owner:ReplicaSet:web-7d4b9c8f6d",
            "k8s:pod-uid:8e5f5a3c-2f4b-4a1d-9c6e-7b8a9d0c1e2f",
            "k8s:sa:web",
            "unix:gid:1000",
            "unix:group:app",
            "unix:uid:1000",
            "unix:user:app",
        ]
    );
    assert_eq!(kubelet.authorizations(), [Some(format!("Bearer {TOKEN}"))]);
}

#[tokio::test]
async fn the_token_is_read_again_when_it_rotates() {
    let pki = Pki::new(&["127.0.0.1"]);
    let kubelet = FakeKubelet::start(Some(&pki), vec![fixture("pods.json")]).await;
    let node = Node::new(&fixture("cgroup-v2-containerd-systemd.txt"));
    node.write_ca(&pki);
    // A short interval, so that the second call does not reuse the first answer.
    let attestor = node
        .k8s(&node.config(&kubelet, "poll_retry_interval = \"10ms\"\n"))
        .unwrap();
    attestor.attest(&peer()).await.unwrap();

    std::fs::write(node.path("token"), "rotated-token").unwrap();
    kubelet.accept_token("rotated-token");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let selectors = strings(&attestor.attest(&peer()).await.unwrap());
    assert!(
        selectors.contains(&"k8s:sa:web".to_owned()),
        "{selectors:?}"
    );
    assert_eq!(
        kubelet.authorizations(),
        [
            Some(format!("Bearer {TOKEN}")),
            Some("Bearer rotated-token".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_container_that_starts_after_two_polls_is_attested() {
    let pki = Pki::new(&["127.0.0.1"]);
    let pending = fixture("pods.json");
    let kubelet = FakeKubelet::start(
        Some(&pki),
        vec![pending.clone(), pending, pods_with_worker_started()],
    )
    .await;
    let node = Node::new(&fixture("cgroup-v2-batch-worker.txt"));
    node.write_ca(&pki);
    let attestor = node
        .k8s(&node.config(
            &kubelet,
            "max_poll_attempts = 10\npoll_retry_interval = \"50ms\"\n",
        ))
        .unwrap();

    let selectors = strings(&attestor.attest(&peer()).await.unwrap());
    for expected in [
        "k8s:container-name:worker",
        "k8s:container-image:registry.example.com/batch/report:2026.3",
        "k8s:pod-owner:Job:report-28473910",
        "k8s:pod-owner-uid:Job:5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d",
        "k8s:pod-label:job-name:report-28473910",
        "k8s:sa:report",
        "k8s:ns:batch",
    ] {
        assert!(
            selectors.contains(&expected.to_owned()),
            "{expected}: {selectors:?}"
        );
    }
    assert_eq!(kubelet.requests(), 3);
}

#[tokio::test]
async fn a_container_that_never_starts_fails_after_the_last_attempt() {
    let pki = Pki::new(&["127.0.0.1"]);
    let kubelet = FakeKubelet::start(Some(&pki), vec![fixture("pods.json")]).await;
    let node = Node::new(&fixture("cgroup-v2-batch-worker.txt"));
    node.write_ca(&pki);
    let attestor = node
        .k8s(&node.config(
            &kubelet,
            "max_poll_attempts = 3\npoll_retry_interval = \"30ms\"\n",
        ))
        .unwrap();

    let started = std::time::Instant::now();
    let error = attestor.attest(&peer()).await.unwrap_err();
    assert!(matches!(error, AttestError::Kubernetes(_)), "{error:?}");
    let error = error.to_string();
    assert!(
        error
            .contains("container 5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f")
            && error.contains("is not in the status of pod 3d2c1b0a-9f8e-4d7c-8b6a-5f4e3d2c1b0a")
            && error.contains("after 3 attempts"),
        "{error}"
    );
    assert_eq!(kubelet.requests(), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(60),
        "polls were not spaced"
    );
}

#[tokio::test]
async fn a_deleted_pod_fails_after_the_last_attempt() {
    let pki = Pki::new(&["127.0.0.1"]);
    let kubelet = FakeKubelet::start(Some(&pki), vec![fixture("pods.json")]).await;
    let node = Node::new(&fixture("cgroup-v2-deleted-pod.txt"));
    node.write_ca(&pki);
    let attestor = node
        .k8s(&node.config(
            &kubelet,
            "max_poll_attempts = 2\npoll_retry_interval = \"20ms\"\n",
        ))
        .unwrap();
    let error = attestor.attest(&peer()).await.unwrap_err().to_string();
    assert!(
        error.contains("pod 77777777-6666-4555-8444-333333333333 is not in the kubelet's pod list"),
        "{error}"
    );
    assert_eq!(kubelet.requests(), 2);
}

#[tokio::test]
async fn a_process_in_no_pod_keeps_its_unix_selectors_and_the_kubelet_is_not_asked() {
    let pki = Pki::new(&["127.0.0.1"]);
    let kubelet = FakeKubelet::start(Some(&pki), vec![fixture("pods.json")]).await;
    let node = Node::new(&fixture("cgroup-host-process.txt"));
    node.write_ca(&pki);
    let selectors = strings(
        &node
            .combined(&node.config(&kubelet, ""))
            .attest(&peer())
            .await
            .unwrap(),
    );
    assert_eq!(
        selectors,
        [
            "unix:gid:1000",
            "unix:group:app",
            "unix:uid:1000",
            "unix:user:app"
        ]
    );
    assert_eq!(kubelet.requests(), 0);
}

#[tokio::test]
async fn a_kubelet_certificate_from_another_ca_is_refused_and_named() {
    let kubelet_pki = Pki::new(&["127.0.0.1"]);
    let kubelet = FakeKubelet::start(Some(&kubelet_pki), vec![fixture("pods.json")]).await;
    let node = Node::new(&fixture("cgroup-v2-containerd-systemd.txt"));
    let ca_path = node.write_ca(&Pki::with_ca_name("another-cluster-ca", &["127.0.0.1"]));
    let attestor = node
        .k8s(&node.config(&kubelet, "max_poll_attempts = 1\n"))
        .unwrap();

    let error = attestor.attest(&peer()).await.unwrap_err().to_string();
    assert!(
        error.contains("TLS handshake with the kubelet at 127.0.0.1:")
            && error.contains(&format!("kubelet_ca_path {}", ca_path.display()))
            && error.contains("UnknownIssuer"),
        "{error}"
    );
    assert_eq!(
        kubelet.requests(),
        0,
        "the token went to an untrusted kubelet"
    );

    // With verification skipped, the same kubelet is used.
    let attestor = node
        .k8s(&node.config(&kubelet, "skip_kubelet_verification = true\n"))
        .unwrap();
    let selectors = strings(&attestor.attest(&peer()).await.unwrap());
    assert!(
        selectors.contains(&format!("k8s:pod-uid:{WEB_POD_UID}")),
        "{selectors:?}"
    );
    assert_eq!(kubelet.requests(), 1);
}

#[tokio::test]
async fn the_certificate_must_name_the_kubelet_host_unless_it_is_the_loopback_fallback() {
    // A certificate for the node's name only, served on 127.0.0.1.
    let pki = Pki::new(&["node-a"]);
    let kubelet = FakeKubelet::start(Some(&pki), vec![fixture("pods.json")]).await;
    let node = Node::new(&fixture("cgroup-v2-containerd-systemd.txt"));
    node.write_ca(&pki);
    let attestor = node
        .k8s(&node.config(&kubelet, "max_poll_attempts = 1\n"))
        .unwrap();
    let error = attestor.attest(&peer()).await.unwrap_err().to_string();
    assert!(
        error.contains("certificate not valid for name \"127.0.0.1\""),
        "{error}"
    );
    assert_eq!(kubelet.requests(), 0);

    // No kubelet_host and no node name: 127.0.0.1, the chain checked but not the name.
    let fallback = K8sAttestorConfig {
        kubelet_host: None,
        ..node.config(&kubelet, "")
    };
    let attestor = node.k8s(&fallback).unwrap();
    assert!(attestor.attest(&peer()).await.is_ok());
    assert_eq!(kubelet.requests(), 1);
}

#[tokio::test]
async fn a_refused_token_is_reported_with_the_kubelets_answer() {
    let pki = Pki::new(&["127.0.0.1"]);
    let kubelet = FakeKubelet::start(Some(&pki), vec![fixture("pods.json")]).await;
    kubelet.accept_token("another-token");
    let node = Node::new(&fixture("cgroup-v2-containerd-systemd.txt"));
    node.write_ca(&pki);
    let attestor = node
        .k8s(&node.config(&kubelet, "max_poll_attempts = 1\n"))
        .unwrap();
    let error = attestor.attest(&peer()).await.unwrap_err().to_string();
    assert!(
        error.contains("answered GET /pods with 401 Unauthorized: Unauthorized"),
        "{error}"
    );
    assert!(
        !error.contains(TOKEN),
        "the token leaked into the error: {error}"
    );
}

#[tokio::test]
async fn a_pod_list_over_the_bound_is_refused() {
    let pki = Pki::new(&["127.0.0.1"]);
    let oversized = format!(
        "{{\"items\":[]}}{}",
        " ".repeat(lanyard_agent::attestor::k8s::MAX_POD_LIST_LEN)
    );
    let kubelet = FakeKubelet::start(Some(&pki), vec![oversized]).await;
    let node = Node::new(&fixture("cgroup-v2-containerd-systemd.txt"));
    node.write_ca(&pki);
    let attestor = node
        .k8s(&node.config(&kubelet, "max_poll_attempts = 1\n"))
        .unwrap();
    let error = attestor.attest(&peer()).await.unwrap_err().to_string();
    assert!(error.contains("answered with more than 32 MiB"), "{error}");
}

#[tokio::test]
async fn the_read_only_port_is_plain_http_without_a_token() {
    let kubelet = FakeKubelet::start(None, vec![fixture("pods.json")]).await;
    let node = Node::new(&fixture("cgroup-v1-cgroupfs-docker.txt"));
    let config = AgentConfig::parse(&format!(
        "server_address = \"127.0.0.1:8081\"\ntrust_domain = \"example.org\"\n\
         data_dir = \"/unused\"\n[workload_attestor.k8s]\nkubelet_read_only_port = {}\n\
         kubelet_ca_path = \"/nonexistent/ca.crt\"\ntoken_path = \"/nonexistent/token\"\n",
        kubelet.port
    ))
    .unwrap()
    .workload_attestor
    .k8s
    .unwrap();
    let selectors = strings(&node.k8s(&config).unwrap().attest(&peer()).await.unwrap());
    assert!(
        selectors.contains(&"k8s:container-name:app".to_owned()),
        "{selectors:?}"
    );
    assert_eq!(kubelet.authorizations(), [None]);
}

#[tokio::test]
async fn unreadable_kubelet_files_stop_the_attestor_at_start_and_are_named() {
    let pki = Pki::new(&["127.0.0.1"]);
    let kubelet = FakeKubelet::start(Some(&pki), vec![fixture("pods.json")]).await;
    let node = Node::new(&fixture("cgroup-v2-containerd-systemd.txt"));
    // No CA file written.
    let error = node
        .k8s(&node.config(&kubelet, ""))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("workload_attestor.k8s: reading the kubelet CA (kubelet_ca_path"),
        "{error}"
    );
    std::fs::write(node.path("ca.crt"), "not a certificate\n").unwrap();
    let error = node
        .k8s(&node.config(&kubelet, ""))
        .unwrap_err()
        .to_string();
    assert!(error.contains("holds no certificate"), "{error}");
    node.write_ca(&pki);
    std::fs::write(node.path("token"), "\n").unwrap();
    let error = node
        .k8s(&node.config(&kubelet, ""))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("token_path") && error.contains("is empty"),
        "{error}"
    );
    // Skipping verification needs no CA file.
    std::fs::write(node.path("token"), TOKEN).unwrap();
    std::fs::remove_file(node.path("ca.crt")).unwrap();
    node.k8s(&node.config(&kubelet, "skip_kubelet_verification = true\n"))
        .unwrap();
    assert_eq!(kubelet.requests(), 0);
}
