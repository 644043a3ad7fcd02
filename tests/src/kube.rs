//! A real Kubernetes API server for the tests: `kube-apiserver` and `etcd` (built by
//! [`crate::toolchain::kubernetes`]) as child processes on free loopback ports, with a PKI
//! generated at start.
//!
//! - [`KubeCluster::start`] writes a CA, the API server's serving certificate for
//!   `127.0.0.1`, an admin client certificate (`O=system:masters`) and a service-account
//!   signing key pair, starts etcd and the API server (authorization `Node,RBAC`, so RBAC is
//!   real), and waits for `/readyz`.
//! - [`KubeClient`] speaks HTTPS to it as the admin (client certificate) or with a bearer
//!   token; [`KubeCluster`]'s helpers create namespaces, service accounts, nodes and pods,
//!   bind cluster roles, request bound service-account tokens, review tokens and apply
//!   arbitrary objects (server-side apply, or its `dryRun=All` variant to validate them).
//! - [`KubeCluster::admin_kubeconfig`] and [`KubeCluster::write_kubeconfig`] are kubeconfig
//!   files for programs under test, such as a server that calls TokenReview as its own
//!   service account.
//!
//! There is no kubelet (it needs a container runtime): pods stay `Pending` on the node named
//! in `spec.nodeName`, which is all that token binding and TokenReview look at. Without a
//! kubelet to confirm a graceful deletion, [`KubeCluster::delete_pod`] deletes at once
//! (`gracePeriodSeconds=0`).
//!
//! Without Go the tests fail with a message saying how to get it; `LANYARD_E2E_SKIP_KUBERNETES=1`
//! skips them instead ([`KubeCluster::start_or_skip`]).

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};

use crate::toolchain::{KUBERNETES_VERSION, Kubernetes, kubernetes};
use crate::{ChildProcess, TIMEOUT, TestDir, free_port, poll};

/// Set to `1` to skip the Kubernetes tests (CI never does).
pub const SKIP_VAR: &str = "LANYARD_E2E_SKIP_KUBERNETES";

/// The issuer of the service-account tokens the API server signs, and the audience of those
/// that name none (`--api-audiences`).
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// How long the API server may take to answer `/readyz`: about five seconds on an idle
/// machine, much more for the first start of a freshly built binary on a loaded one.
pub const KUBE_START_TIMEOUT: Duration = Duration::from_secs(120);

/// The field manager of the harness's server-side applies.
const FIELD_MANAGER: &str = "lanyard-e2e";

/// The name of the cluster and context in generated kubeconfigs.
const KUBECONFIG_CLUSTER: &str = "lanyard-e2e";

/// Kubernetes' binaries, built on first use; `None` (with a notice naming `test`) when
/// `LANYARD_E2E_SKIP_KUBERNETES=1`. Without Go it panics with how to get it.
pub fn kubernetes_or_skip(test: &str) -> Option<&'static Kubernetes> {
    if std::env::var_os(SKIP_VAR).is_some_and(|value| value == "1") {
        let _ = writeln!(
            std::io::stderr(),
            "lanyard-e2e: {SKIP_VAR}=1, skipping {test}"
        );
        return None;
    }
    if !Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|output| output.status.success())
    {
        panic!(
            "{test} builds kube-apiserver {KUBERNETES_VERSION} and etcd from the Go module \
             proxy and needs the Go toolchain, 1.26 or newer (`go` on PATH, \
             https://go.dev/dl/), and about 3 GB for Go's caches; set {SKIP_VAR}=1 to skip the \
             Kubernetes tests"
        );
    }
    Some(kubernetes())
}

// ---------------------------------------------------------------------------------------------
// The cluster

/// An API server and its etcd on free loopback ports, in a temporary directory with their
/// PKI and kubeconfigs. Both are killed on drop.
#[derive(Debug)]
pub struct KubeCluster {
    url: String,
    ca_pem: String,
    ca_path: PathBuf,
    admin_kubeconfig: PathBuf,
    admin: KubeClient,
    apiserver: ChildProcess,
    etcd: ChildProcess,
    // Last, so that the processes die before their directory goes.
    dir: TestDir,
}

/// The PEM files a cluster is started with.
struct Pki {
    ca_pem: String,
    admin_cert_pem: String,
    admin_key_pem: String,
}

impl KubeCluster {
    /// Builds Kubernetes if needed ([`kubernetes_or_skip`]), then starts a cluster; `None`
    /// when `LANYARD_E2E_SKIP_KUBERNETES=1`.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        kubernetes_or_skip(test)?;
        Some(Self::start())
    }

    /// Starts etcd and the API server in a fresh temporary directory and waits until
    /// `/readyz` answers `ok` (its built-in roles are then in place). Builds Kubernetes first
    /// if needed; prefer [`Self::start_or_skip`] in tests.
    pub fn start() -> Self {
        let binaries = kubernetes();
        let dir = TestDir::new();
        let pki_dir = dir.subdir("pki");
        let pki = write_pki(&pki_dir);

        let etcd_port = free_port();
        let etcd_peer_port = free_port();
        let api_port = free_port();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer_port}");

        let mut etcd = ChildProcess::new("etcd", dir.join("etcd.log"));
        let mut command = Command::new(&binaries.etcd);
        command
            .arg("--name=default")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={etcd_peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={etcd_peer_url}"))
            .arg(format!("--initial-cluster=default={etcd_peer_url}"))
            // Test data: durability across a machine crash is not worth the fsyncs.
            .arg("--unsafe-no-fsync");
        etcd.start(command);

        let mut apiserver = ChildProcess::new("kube-apiserver", dir.join("kube-apiserver.log"));
        let pki_path = |name: &str| pki_dir.join(name).display().to_string();
        let mut command = Command::new(&binaries.apiserver);
        command
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={api_port}"))
            .arg(format!("--tls-cert-file={}", pki_path("apiserver.crt")))
            .arg(format!(
                "--tls-private-key-file={}",
                pki_path("apiserver.key")
            ))
            .arg(format!("--client-ca-file={}", pki_path("ca.crt")))
            .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
            .arg(format!("--service-account-key-file={}", pki_path("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                pki_path("sa.key")
            ))
            .arg(format!("--api-audiences={SERVICE_ACCOUNT_ISSUER}"))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            // No `kubernetes` Service endpoints to keep: nothing in the cluster dials it.
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--cert-dir={}", dir.subdir("certs").display()))
            .arg("--enable-priority-and-fairness=false")
            .arg("--profiling=false");
        apiserver.start(command);

        let url = format!("https://127.0.0.1:{api_port}");
        let admin = KubeClient::new(
            &url,
            &pki.ca_pem,
            Credentials::ClientCertificate {
                cert_pem: pki.admin_cert_pem.clone(),
                key_pem: pki.admin_key_pem.clone(),
            },
        );
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        write_file(
            &admin_kubeconfig,
            &kubeconfig(
                &url,
                &pki.ca_pem,
                "admin",
                &[
                    (
                        "client-certificate-data",
                        &BASE64.encode(&pki.admin_cert_pem),
                    ),
                    ("client-key-data", &BASE64.encode(&pki.admin_key_pem)),
                ],
            ),
        );
        let mut cluster = Self {
            url,
            ca_pem: pki.ca_pem,
            ca_path: pki_dir.join("ca.crt"),
            admin_kubeconfig,
            admin,
            apiserver,
            etcd,
            dir,
        };
        cluster.wait_until_ready();
        cluster
    }

    fn wait_until_ready(&mut self) {
        poll("kube-apiserver /readyz", KUBE_START_TIMEOUT, || {
            self.etcd.assert_running();
            self.apiserver.assert_running();
            let response = self.admin.try_request("GET", "/readyz", None, None)?;
            if response.status == 200 {
                Ok(())
            } else {
                Err(response.to_string())
            }
        });
    }

    /// The API server's URL, `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA certificate (PEM) that signed the API server's serving certificate and the
    /// admin's client certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The file holding [`Self::ca_pem`].
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// A kubeconfig for the admin (a client certificate in `system:masters`), its data
    /// inline.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// Writes a kubeconfig at `path` that reaches this API server (CA inline) as the holder
    /// of `token`, for example a service account's token from [`Self::request_token`].
    pub fn write_kubeconfig(&self, path: &Path, token: &str) {
        write_file(
            path,
            &kubeconfig(&self.url, &self.ca_pem, "token", &[("token", token)]),
        );
    }

    /// The directory holding the PKI, kubeconfigs, logs and etcd's data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The client that acts as the admin.
    pub fn admin(&self) -> &KubeClient {
        &self.admin
    }

    /// A client that authenticates with `token`.
    pub fn client_with_token(&self, token: &str) -> KubeClient {
        KubeClient::new(
            &self.url,
            &self.ca_pem,
            Credentials::BearerToken(token.to_owned()),
        )
    }

    /// The API server's log, for failure messages.
    pub fn apiserver_log_tail(&self) -> String {
        self.apiserver.log_tail(60)
    }

    /// `GET <path>` as the admin; panics unless it succeeds.
    pub fn get(&self, path: &str) -> Value {
        self.admin.get(path)
    }

    /// Creates namespace `name`.
    pub fn create_namespace(&self, name: &str) -> Value {
        self.admin.post(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        )
    }

    /// Creates service account `namespace/name`.
    pub fn create_service_account(&self, namespace: &str, name: &str) -> Value {
        self.admin.post(
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts"),
            &json!({
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": name, "namespace": namespace},
            }),
        )
    }

    /// Creates node `name` with `labels`. No kubelet runs for it.
    pub fn create_node(&self, name: &str, labels: &[(&str, &str)]) -> Value {
        self.admin.post(
            "/api/v1/nodes",
            &json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels_object(labels)},
            }),
        )
    }

    /// Creates pod `namespace/name`, running as `service_account` (which must exist) and
    /// assigned to node `node_name` (`spec.nodeName`), with `labels` and one container. It
    /// stays `Pending`: no kubelet runs it.
    pub fn create_pod(
        &self,
        namespace: &str,
        name: &str,
        service_account: &str,
        node_name: &str,
        labels: &[(&str, &str)],
    ) -> Value {
        self.admin.post(
            &format!("/api/v1/namespaces/{namespace}/pods"),
            &json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": labels_object(labels)},
                "spec": {
                    "serviceAccountName": service_account,
                    "nodeName": node_name,
                    "containers": [{"name": "workload", "image": "registry.invalid/workload:1"}],
                },
            }),
        )
    }

    /// Deletes pod `namespace/name` at once (`gracePeriodSeconds=0`: no kubelet would confirm
    /// a graceful deletion) and waits until it is gone.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
        self.admin
            .request(
                "DELETE",
                &format!("{path}?gracePeriodSeconds=0"),
                None,
                None,
            )
            .expect_success();
        poll(
            &format!("pod {namespace}/{name} to be gone"),
            TIMEOUT,
            || {
                let response = self.admin.request("GET", &path, None, None);
                match response.status {
                    404 => Ok(()),
                    _ => Err(response.to_string()),
                }
            },
        );
    }

    /// Binds cluster role `cluster_role` (e.g. `system:auth-delegator`) to service account
    /// `namespace/service_account` with a ClusterRoleBinding named
    /// `<cluster_role>:<namespace>:<service_account>`, applied server-side.
    pub fn bind_cluster_role(
        &self,
        cluster_role: &str,
        namespace: &str,
        service_account: &str,
    ) -> Value {
        self.apply(&json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("{cluster_role}:{namespace}:{service_account}")},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": cluster_role,
            },
            "subjects": [{
                "kind": "ServiceAccount",
                "name": service_account,
                "namespace": namespace,
            }],
        }))
    }

    /// A token for service account `namespace/service_account` from the TokenRequest API,
    /// valid for an hour, for `audiences` (none: the API server's own,
    /// [`SERVICE_ACCOUNT_ISSUER`]), and bound to `bound_pod` (a pod object as returned by
    /// [`Self::create_pod`]) if given: a bound token carries the pod's and its node's names
    /// and uids, and dies with the pod.
    pub fn request_token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        bound_pod: Option<&Value>,
    ) -> String {
        let mut spec = json!({"expirationSeconds": 3600});
        if !audiences.is_empty() {
            spec["audiences"] = json!(audiences);
        }
        if let Some(pod) = bound_pod {
            spec["boundObjectRef"] = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            });
        }
        let response = self.admin.post(
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"),
            &json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": spec,
            }),
        );
        response["status"]["token"]
            .as_str()
            .unwrap_or_else(|| panic!("TokenRequest returned no token: {response}"))
            .to_owned()
    }

    /// Applies `object` server-side (field manager `lanyard-e2e`, conflicts forced): creates
    /// it or updates the fields it names. Its resource path comes from `apiVersion`, `kind`,
    /// `metadata.name` and `metadata.namespace` (default `default` for namespaced kinds)
    /// through API discovery, so custom resources work once their CRD is established.
    /// Panics unless it succeeds.
    pub fn apply(&self, object: &Value) -> Value {
        self.apply_response(object, false).json()
    }

    /// Like [`Self::apply`] with `dryRun=All`: the API server validates and admits `object`
    /// without storing it. Returns the response, success or not, for tests that check a
    /// manifest.
    pub fn apply_dry_run(&self, object: &Value) -> KubeResponse {
        self.apply_response(object, true)
    }

    fn apply_response(&self, object: &Value, dry_run: bool) -> KubeResponse {
        let path = self.object_path(object);
        let mut query = format!("fieldManager={FIELD_MANAGER}&force=true");
        if dry_run {
            query.push_str("&dryRun=All");
        }
        let body = serde_json::to_vec(object).expect("serializing JSON");
        // Server-side apply takes YAML, of which JSON is a subset.
        self.admin.request(
            "PATCH",
            &format!("{path}?{query}"),
            Some("application/apply-patch+yaml"),
            Some(body),
        )
    }

    /// Server-side apply of one YAML document as written (the API server parses it, with
    /// strict field validation; `dry_run` stores nothing). Its path comes from
    /// [`yaml_identity`]. Returns the API server's refusal as an `Err`.
    pub fn apply_yaml(&self, doc: &str, dry_run: bool) -> Result<(), String> {
        let object = yaml_identity(doc);
        let path = self.object_path(&object);
        let mut query = format!("fieldManager={FIELD_MANAGER}&force=true&fieldValidation=Strict");
        if dry_run {
            query.push_str("&dryRun=All");
        }
        let response = self.admin.request(
            "PATCH",
            &format!("{path}?{query}"),
            Some("application/apply-patch+yaml"),
            Some(doc.as_bytes().to_vec()),
        );
        if response.is_success() {
            Ok(())
        } else {
            Err(format!(
                "{} {}: {response}",
                object["kind"], object["metadata"]["name"]
            ))
        }
    }

    /// Applies every document of the YAML file at `path` ([`Self::apply_yaml`], stored);
    /// panics on the first refusal.
    pub fn apply_yaml_file(&self, path: &Path) {
        let text =
            fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for doc in yaml_documents(&text) {
            if let Err(refused) = self.apply_yaml(&doc, false) {
                panic!("applying {}: {refused}", path.display());
            }
        }
    }

    /// The API path of `object`, found through discovery.
    pub fn object_path(&self, object: &Value) -> String {
        let api_version = object["apiVersion"]
            .as_str()
            .unwrap_or_else(|| panic!("no apiVersion in {object}"));
        let kind = object["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("no kind in {object}"));
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("no metadata.name in {object}"));
        let group_path = if api_version.contains('/') {
            format!("/apis/{api_version}")
        } else {
            format!("/api/{api_version}")
        };
        // A CRD's kinds appear in discovery a moment after the CRD is created.
        let (resource, namespaced) = poll(
            &format!("API discovery to list kind {kind} in {group_path}"),
            TIMEOUT,
            || {
                let response = self.admin.request("GET", &group_path, None, None);
                if !response.is_success() {
                    return Err(response.to_string());
                }
                response.json()["resources"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|resource| {
                        resource["kind"] == kind
                            && resource["name"].as_str().is_some_and(|n| !n.contains('/'))
                    })
                    .map(|resource| {
                        (
                            resource["name"].as_str().unwrap_or_default().to_owned(),
                            resource["namespaced"].as_bool().unwrap_or(false),
                        )
                    })
                    .ok_or_else(|| format!("no resource of kind {kind}"))
            },
        );
        if namespaced {
            let namespace = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default");
            format!("{group_path}/namespaces/{namespace}/{resource}/{name}")
        } else {
            format!("{group_path}/{resource}/{name}")
        }
    }
}

fn labels_object(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), Value::String((*value).to_owned())))
            .collect(),
    )
}

/// A YAML double-quoted scalar holding `value` (JSON's string escapes are YAML's).
fn yaml_string(value: &str) -> String {
    Value::String(value.to_owned()).to_string()
}

/// A kubeconfig with one cluster, one user (named `user`, with credentials `user_fields`)
/// and one context.
fn kubeconfig(url: &str, ca_pem: &str, user: &str, user_fields: &[(&str, &str)]) -> String {
    let mut lines = vec![
        "apiVersion: v1".to_owned(),
        "kind: Config".to_owned(),
        "clusters:".to_owned(),
        format!("- name: {KUBECONFIG_CLUSTER}"),
        "  cluster:".to_owned(),
        format!("    server: {}", yaml_string(url)),
        format!(
            "    certificate-authority-data: {}",
            yaml_string(&BASE64.encode(ca_pem))
        ),
        "users:".to_owned(),
        format!("- name: {user}"),
        "  user:".to_owned(),
    ];
    for (field, value) in user_fields {
        lines.push(format!("    {field}: {}", yaml_string(value)));
    }
    lines.extend([
        "contexts:".to_owned(),
        format!("- name: {KUBECONFIG_CLUSTER}"),
        "  context:".to_owned(),
        format!("    cluster: {KUBECONFIG_CLUSTER}"),
        format!("    user: {user}"),
        format!("current-context: {KUBECONFIG_CLUSTER}"),
    ]);
    lines.join("\n") + "\n"
}

fn write_file(path: &Path, contents: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
    }
    fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Generates the cluster's PKI into `dir`: `ca.crt`, `apiserver.crt`/`.key` (for
/// `127.0.0.1` and `localhost`), `admin.crt`/`.key` (`CN=lanyard-e2e-admin`,
/// `O=system:masters`) and the service-account signing pair `sa.key`/`sa.pub` (ECDSA P-256,
/// so tokens are ES256).
fn write_pki(dir: &Path) -> Pki {
    let generate = || KeyPair::generate().expect("generating a P-256 key");
    let ca_key = generate();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "lanyard-e2e kubernetes CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("signing the CA");
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |sans: Vec<String>,
                common_name: &str,
                organization: Option<&str>,
                usage: ExtendedKeyUsagePurpose| {
        let key = generate();
        let mut params = CertificateParams::new(sans).expect("certificate parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if let Some(organization) = organization {
            params
                .distinguished_name
                .push(DnType::OrganizationName, organization);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).expect("signing a leaf");
        (cert.pem(), key.serialize_pem())
    };
    let (apiserver_cert, apiserver_key) = leaf(
        vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
        "kube-apiserver",
        None,
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (admin_cert, admin_key) = leaf(
        Vec::new(),
        "lanyard-e2e-admin",
        Some("system:masters"),
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let service_account_key = generate();

    let ca_pem = ca_cert.pem();
    for (name, contents) in [
        ("ca.crt", ca_pem.as_str()),
        ("apiserver.crt", &apiserver_cert),
        ("apiserver.key", &apiserver_key),
        ("admin.crt", &admin_cert),
        ("admin.key", &admin_key),
        ("sa.key", &service_account_key.serialize_pem()),
        ("sa.pub", &service_account_key.public_key_pem()),
    ] {
        write_file(&dir.join(name), contents);
    }
    Pki {
        ca_pem,
        admin_cert_pem: admin_cert,
        admin_key_pem: admin_key,
    }
}

// ---------------------------------------------------------------------------------------------
// HTTPS

/// How a [`KubeClient`] authenticates.
enum Credentials {
    ClientCertificate { cert_pem: String, key_pem: String },
    BearerToken(String),
}

/// An HTTPS/1.1 client of one API server, trusting only its CA, authenticating with a client
/// certificate or a bearer token. Synchronous, like the rest of the harness: each request
/// opens a connection on the client's own single-threaded runtime.
pub struct KubeClient {
    address: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    bearer_token: Option<String>,
    runtime: tokio::runtime::Runtime,
}

impl fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeClient")
            .field("address", &self.address)
            .field("bearer_token", &self.bearer_token.is_some())
            .finish_non_exhaustive()
    }
}

impl KubeClient {
    fn new(url: &str, ca_pem: &str, credentials: Credentials) -> Self {
        let address: SocketAddr = url
            .strip_prefix("https://")
            .and_then(|address| address.parse().ok())
            .unwrap_or_else(|| panic!("{url} is not https://<ip>:<port>"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots
                .add(cert.expect("parsing the CA PEM"))
                .expect("adding the CA to the root store");
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("rustls protocol versions")
        .with_root_certificates(roots);
        let (mut config, bearer_token) = match credentials {
            Credentials::ClientCertificate { cert_pem, key_pem } => {
                let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("parsing the client certificate PEM");
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .expect("parsing the client key PEM");
                let config = builder
                    .with_client_auth_cert(chain, key)
                    .expect("client certificate and key");
                (config, None)
            }
            Credentials::BearerToken(token) => (builder.with_no_client_auth(), Some(token)),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a tokio runtime");
        Self {
            address,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            bearer_token,
            runtime,
        }
    }

    /// `method path` with `body` of `content_type`; panics if no response comes (connection
    /// refused, TLS failure, [`TIMEOUT`]). Any status is returned.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> KubeResponse {
        self.try_request(method, path, content_type, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Like [`Self::request`], but a failure to get a response is an `Err`.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<KubeResponse, String> {
        let request = self.build_request(method, path, content_type, body)?;
        let what = format!("{method} {path}");
        self.runtime.block_on(async {
            match tokio::time::timeout(TIMEOUT, self.send(request)).await {
                Ok(result) => result.map(|(status, body)| KubeResponse {
                    request: what,
                    status,
                    body,
                }),
                Err(_) => Err(format!("no response within {TIMEOUT:?}")),
            }
        })
    }

    fn build_request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Request<Full<Bytes>>, String> {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.address.to_string())
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(token) = &self.bearer_token {
            builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(content_type) = content_type {
            builder = builder.header(hyper::header::CONTENT_TYPE, content_type);
        }
        builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("building the request: {e}"))
    }

    async fn send(&self, request: hyper::Request<Full<Bytes>>) -> Result<(u16, String), String> {
        let tcp = tokio::net::TcpStream::connect(self.address)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.address))?;
        let server_name = ServerName::IpAddress(self.address.ip().into());
        let tls = self
            .tls
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {}: {e}", self.address))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        let connection = tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the response body: {e}"))?
            .to_bytes();
        drop(sender);
        connection.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// `GET <path>`; panics unless it succeeds.
    pub fn get(&self, path: &str) -> Value {
        self.request("GET", path, None, None).json()
    }

    /// `POST`s a TokenReview of `token` for `audiences` (none: the API server's own) as this
    /// client and returns the response: its `status` says whether the token is authenticated
    /// and as whom; the response is a 403 if this client may not create TokenReviews.
    pub fn token_review(&self, token: &str, audiences: &[&str]) -> KubeResponse {
        let mut spec = json!({"token": token});
        if !audiences.is_empty() {
            spec["audiences"] = json!(audiences);
        }
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": spec,
        });
        self.request(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            Some("application/json"),
            Some(serde_json::to_vec(&body).expect("serializing JSON")),
        )
    }

    /// `POST <path>` with a JSON `body`; panics unless it succeeds.
    pub fn post(&self, path: &str, body: &Value) -> Value {
        self.request(
            "POST",
            path,
            Some("application/json"),
            Some(serde_json::to_vec(body).expect("serializing JSON")),
        )
        .json()
    }
}

/// What the API server answered. `Display` shows all of it, for failure messages.
#[derive(Debug, Clone)]
pub struct KubeResponse {
    /// `METHOD path`, for messages.
    pub request: String,
    /// The HTTP status.
    pub status: u16,
    /// The body, usually JSON (an object, or a `Status` on failure).
    pub body: String,
}

impl KubeResponse {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body parsed as JSON; panics unless the status is 2xx and the body is JSON.
    pub fn json(&self) -> Value {
        assert!(self.is_success(), "expected success: {self}");
        self.any_json()
    }

    /// The body parsed as JSON whatever the status (a failure's body is a `Status` object);
    /// panics if it is not JSON.
    pub fn any_json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self}"))
    }

    /// The body; panics unless the status is 2xx.
    pub fn expect_success(&self) -> &str {
        assert!(self.is_success(), "expected success: {self}");
        &self.body
    }
}

impl fmt::Display for KubeResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} answered {}: {}",
            self.request,
            self.status,
            self.body.trim_end()
        )
    }
}

/// The YAML documents of a manifest file (split on `---` lines), those that name a `kind`.
pub fn yaml_documents(text: &str) -> Vec<String> {
    let mut documents = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim_end() == "---" {
            documents.push(std::mem::take(&mut current));
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    documents.push(current);
    documents
        .into_iter()
        .filter(|doc| doc.lines().any(|line| line.starts_with("kind:")))
        .collect()
}

/// What the harness needs to find an object's API path: `apiVersion`, `kind`, and
/// `metadata.name`/`namespace`, read from the top-level lines of a YAML document written in
/// block style (as ours and controller-gen's are).
pub fn yaml_identity(doc: &str) -> Value {
    let top = |key: &str| {
        doc.lines()
            .find_map(|line| line.strip_prefix(&format!("{key}: ")))
            .map(|value| value.trim().to_owned())
            .unwrap_or_else(|| panic!("no top-level {key} in\n{doc}"))
    };
    let metadata = |key: &str| {
        doc.lines()
            .skip_while(|line| *line != "metadata:")
            .skip(1)
            .take_while(|line| line.starts_with("  "))
            .find_map(|line| line.strip_prefix(&format!("  {key}: ")))
            .map(|value| value.trim().to_owned())
    };
    let mut object = json!({
        "apiVersion": top("apiVersion"),
        "kind": top("kind"),
        "metadata": { "name": metadata("name").unwrap_or_else(|| panic!("no name in\n{doc}")) },
    });
    if let Some(namespace) = metadata("namespace") {
        object["metadata"]["namespace"] = json!(namespace);
    }
    object
}

#[cfg(test)]
mod tests {
    use super::kubeconfig;

    #[test]
    fn kubeconfigs_are_the_shape_kubectl_writes() {
        let config = kubeconfig(
            "https://127.0.0.1:6443",
            "PEM",
            "token",
            &[("token", "eyJ.x\"y")],
        );
        assert_eq!(
            config,
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: lanyard-e2e\n  \
             cluster:\n    \
             server: \"https://127.0.0.1:6443\"\n    \
             certificate-authority-data: \"UEVN\"\n\
             users:\n\
             - name: token\n  \
             user:\n    \
             token: \"eyJ.x\\\"y\"\n\
             contexts:\n\
             - name: lanyard-e2e\n  \
             context:\n    \
             cluster: lanyard-e2e\n    \
             user: token\n\
             current-context: lanyard-e2e\n"
        );
    }
}
