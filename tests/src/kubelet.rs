//! What the k8s workload attestor reads on a real node, where no kubelet can run here: a
//! kubelet's `GET /pods` over HTTPS on loopback ([`FakeKubelet`], a certificate for
//! `127.0.0.1` from a CA made for the test, the bearer token checked, the pod list in the
//! kubelet's shape), and a process placed in a cgroup named as the kubelet names a pod's
//! container ([`PodCgroup`]), so that `/proc/<pid>/cgroup` says what it says in a pod.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The longest request head the fake kubelet reads.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// A kubelet's read API on `127.0.0.1`: `GET /pods` with the right bearer token answers the
/// pods set with [`Self::set_pods`]; a wrong or missing token gets 401, any other path 404.
/// Stops when dropped.
#[derive(Debug)]
pub struct FakeKubelet {
    port: u16,
    ca_path: PathBuf,
    token_path: PathBuf,
    pods: Arc<Mutex<Vec<Value>>>,
    requests: Arc<Mutex<usize>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeKubelet {
    /// Starts a kubelet whose CA certificate and accepted token go into files under `dir`.
    pub fn start(dir: &Path) -> Self {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let (ca_pem, cert_pem, key_pem) = kubelet_pki();
        let ca_path = dir.join("kubelet-ca.pem");
        fs::write(&ca_path, ca_pem).expect("writing the kubelet CA");
        let token = format!("kubelet-reader-token-{}", std::process::id());
        let token_path = dir.join("kubelet-token");
        fs::write(&token_path, &token).expect("writing the kubelet token");

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the fake kubelet");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding the fake kubelet");
        let port = listener.local_addr().expect("its address").port();
        let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("cert")];
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("the kubelet's certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let pods = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(0));
        let (served_pods, served_requests) = (Arc::clone(&pods), Arc::clone(&requests));
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let token = token.clone();
                let pods = Arc::clone(&served_pods);
                let requests = Arc::clone(&served_requests);
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let response = answer(&mut tls, &token, &pods, &requests).await;
                        let _ = tls.write_all(response.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        Self {
            port,
            ca_path,
            token_path,
            pods,
            requests,
            runtime: Some(runtime),
        }
    }

    /// The port on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA certificate (PEM) that signed the kubelet's serving certificate.
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// The token it accepts, as the agent's service account token file.
    pub fn token_path(&self) -> &Path {
        &self.token_path
    }

    /// Serves `pods` (Pod objects) as its pod list from now on.
    pub fn set_pods(&self, pods: Vec<Value>) {
        *self.pods.lock().expect("pods lock") = pods;
    }

    /// How many requests with the right token it has answered.
    pub fn requests(&self) -> usize {
        *self.requests.lock().expect("requests lock")
    }

    /// The `[workload_attestor.k8s]` table of an agent that reads this kubelet.
    pub fn agent_toml(&self) -> String {
        format!(
            "[workload_attestor.k8s]\n\
             kubelet_host = \"127.0.0.1\"\n\
             kubelet_secure_port = {}\n\
             kubelet_ca_path = {}\n\
             token_path = {}\n\
             max_poll_attempts = 20\n\
             poll_retry_interval = \"250ms\"\n",
            self.port,
            crate::toml_string(self.ca_path.to_str().expect("UTF-8 path")),
            crate::toml_string(self.token_path.to_str().expect("UTF-8 path")),
        )
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Reads one request head and returns the whole response, as the kubelet would answer it.
async fn answer<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    token: &str,
    pods: &Mutex<Vec<Value>>,
    requests: &Mutex<usize>,
) -> String {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return String::new(),
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
        if head.len() > MAX_REQUEST_HEAD {
            return String::new();
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let authorized = lines
        .filter_map(|line| line.split_once(':'))
        .any(|(name, value)| {
            name.eq_ignore_ascii_case("authorization") && value.trim() == format!("Bearer {token}")
        });
    let (status, body) = if !authorized {
        ("401 Unauthorized", "Unauthorized".to_owned())
    } else if request_line != "GET /pods HTTP/1.1" {
        ("404 Not Found", "404 page not found".to_owned())
    } else {
        *requests.lock().expect("requests lock") += 1;
        let items = pods.lock().expect("pods lock").clone();
        let list = json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {},
            "items": items,
        });
        ("200 OK", list.to_string())
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A CA, and a serving certificate for `127.0.0.1` it signed, as PEM.
fn kubelet_pki() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("a CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubelet-ca");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("the kubelet CA");
    let key = rcgen::KeyPair::generate().expect("a serving key");
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("serving params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "node-1");
    let cert = params
        .signed_by(&key, &*ca)
        .expect("the serving certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// `pod` (as the API server returns it) as the kubelet lists it once its containers run:
/// each container of its spec with a status naming `container_id` (a 64-hex containerd ID).
pub fn running_pod(pod: &Value, container_id: &str) -> Value {
    let mut pod = pod.clone();
    let statuses: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|container| {
            let image = container["image"].as_str().unwrap_or_default();
            json!({
                "name": container["name"],
                "image": image,
                "imageID": format!("{image}@sha256:{}", "ab".repeat(32)),
                "containerID": format!("containerd://{container_id}"),
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": {"running": {"startedAt": "2026-12-04T10:00:00Z"}},
            })
        })
        .collect();
    pod["status"]["phase"] = json!("Running");
    pod["status"]["containerStatuses"] = json!(statuses);
    pod
}

/// A cgroup named as the kubelet's cgroupfs driver names a pod's container
/// (`/kubepods/besteffort/pod<uid>/<container id>`), in the first writable cgroup hierarchy
/// of this machine (the v1 `pids` controller, else the v2 unified one). Processes written
/// into it see that path in `/proc/<pid>/cgroup`. Removed when dropped (once empty).
#[derive(Debug)]
pub struct PodCgroup {
    /// The directories made, innermost first.
    made: Vec<PathBuf>,
}

impl PodCgroup {
    /// Makes the cgroup of container `container_id` in pod `pod_uid`.
    pub fn new(pod_uid: &str, container_id: &str) -> Self {
        let roots = [
            "/sys/fs/cgroup/pids",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup",
        ];
        let mut failures = Vec::new();
        for root in roots {
            let root = Path::new(root);
            if !root.join("cgroup.procs").exists() {
                continue;
            }
            let mut made = Vec::new();
            let mut path = root.to_path_buf();
            let mut ok = true;
            for part in [
                "kubepods".to_owned(),
                "besteffort".to_owned(),
                format!("pod{pod_uid}"),
                container_id.to_owned(),
            ] {
                path.push(part);
                if path.is_dir() {
                    continue;
                }
                if let Err(e) = fs::create_dir(&path) {
                    failures.push(format!("{}: {e}", path.display()));
                    ok = false;
                    break;
                }
                made.push(path.clone());
            }
            made.reverse();
            if ok {
                return Self { made };
            }
            for dir in &made {
                let _ = fs::remove_dir(dir);
            }
        }
        panic!(
            "no writable cgroup hierarchy to place a workload in a pod's cgroup (the \
             Kubernetes end-to-end tests run as root on cgroupfs): {failures:?}"
        );
    }

    /// Its `cgroup.procs`: a PID written there moves that process in.
    pub fn procs_path(&self) -> PathBuf {
        self.made
            .first()
            .expect("the container's cgroup")
            .join("cgroup.procs")
    }

    /// `command` run in this cgroup: a shell that moves itself in, then becomes `command`
    /// (same PID), so the process that connects to the agent is inside from its start.
    pub fn wrap(&self, command: &std::process::Command) -> std::process::Command {
        let mut wrapped = std::process::Command::new("sh");
        wrapped
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(self.procs_path())
            .arg(command.get_program())
            .args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in &self.made {
            let _ = fs::remove_dir(dir);
        }
    }
}
