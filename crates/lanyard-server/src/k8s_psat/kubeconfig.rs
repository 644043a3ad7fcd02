//! How the server reaches a cluster's API server: the subset of a kubeconfig file that names
//! one HTTPS endpoint and its credentials, or the pod's own service account (in-cluster).
//!
//! From a kubeconfig: `current-context` (or the only context) → its cluster's `server`,
//! `certificate-authority` / `certificate-authority-data`, and its user's `token` /
//! `tokenFile` or `client-certificate(-data)` + `client-key(-data)`. Relative paths are
//! relative to the kubeconfig's directory, as in kubectl. Exec plugins, auth providers and
//! `insecure-skip-tls-verify` are refused by name. The file is YAML, as kubectl writes it, or
//! JSON.
//!
//! In-cluster: `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT` and the service account's
//! `token` and `ca.crt`, the token re-read at every call because the kubelet rotates it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// Where a pod's service account credentials are mounted.
pub const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The largest kubeconfig read.
const MAX_KUBECONFIG_LEN: u64 = 1024 * 1024;

/// Why the API server cannot be reached as configured.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KubeconfigError(pub String);

/// One API server endpoint and how to authenticate to it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiServerAccess {
    /// `host` (a name, an IPv4 address or a bracket-less IPv6 address).
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// A path prefix before `/api…` (usually empty), without a trailing `/`.
    pub path_prefix: String,
    /// PEM CA certificates that the API server's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// How the server proves itself to the API server.
    pub credentials: Credentials,
}

impl fmt::Debug for ApiServerAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiServerAccess")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("path_prefix", &self.path_prefix)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl ApiServerAccess {
    /// `host:port` for the `Host` header, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Credentials for the API server. Secrets never appear in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// None (anonymous); rarely allowed to create TokenReviews.
    Anonymous,
    /// A bearer token given inline.
    Token(String),
    /// A bearer token read from this file at every call.
    TokenFile(PathBuf),
    /// A TLS client certificate chain and its private key, both PEM.
    ClientCertificate {
        /// The certificate chain.
        cert_pem: Vec<u8>,
        /// The private key.
        key_pem: Vec<u8>,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Token(_) => f.write_str("Token"),
            Self::TokenFile(path) => f.debug_tuple("TokenFile").field(path).finish(),
            Self::ClientCertificate { .. } => f.write_str("ClientCertificate"),
        }
    }
}

#[derive(Deserialize)]
struct Kubeconfig {
    #[serde(rename = "current-context", default)]
    current_context: String,
    #[serde(default)]
    clusters: Vec<Named<ClusterEntry>>,
    #[serde(default)]
    users: Vec<Named<UserEntry>>,
    #[serde(default)]
    contexts: Vec<Named<ContextEntry>>,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    value: Option<T>,
}

#[derive(Deserialize, Default)]
struct ClusterEntry {
    #[serde(default)]
    server: String,
    #[serde(rename = "certificate-authority", default)]
    certificate_authority: Option<String>,
    #[serde(rename = "certificate-authority-data", default)]
    certificate_authority_data: Option<String>,
    #[serde(rename = "insecure-skip-tls-verify", default)]
    insecure_skip_tls_verify: bool,
}

#[derive(Deserialize, Default)]
struct UserEntry {
    #[serde(default)]
    token: Option<String>,
    #[serde(rename = "tokenFile", default)]
    token_file: Option<String>,
    #[serde(rename = "client-certificate", default)]
    client_certificate: Option<String>,
    #[serde(rename = "client-certificate-data", default)]
    client_certificate_data: Option<String>,
    #[serde(rename = "client-key", default)]
    client_key: Option<String>,
    #[serde(rename = "client-key-data", default)]
    client_key_data: Option<String>,
    #[serde(default)]
    exec: Option<serde_json::Value>,
    #[serde(rename = "auth-provider", default)]
    auth_provider: Option<serde_json::Value>,
    #[serde(default)]
    username: Option<String>,
}

#[derive(Deserialize, Default)]
struct ContextEntry {
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    user: String,
}

/// Reads a kubeconfig file.
pub fn load_kubeconfig(path: &Path) -> Result<ApiServerAccess, KubeconfigError> {
    let error =
        |reason: String| KubeconfigError(format!("kubeconfig {}: {reason}", path.display()));
    let bytes = read_bounded(path).map_err(error)?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_kubeconfig(&bytes, base, &|file| read_bounded(file)).map_err(error)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_KUBECONFIG_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_KUBECONFIG_LEN {
        return Err(format!(
            "{} is larger than {MAX_KUBECONFIG_LEN} bytes",
            path.display()
        ));
    }
    Ok(bytes)
}

/// Parses a kubeconfig (YAML or JSON); `base` resolves relative paths, `read` reads the files they name.
pub fn parse_kubeconfig(
    bytes: &[u8],
    base: &Path,
    read: &dyn Fn(&Path) -> Result<Vec<u8>, String>,
) -> Result<ApiServerAccess, String> {
    // YAML, as kubectl writes it (JSON is YAML too). The parser's messages name a line and
    // column, never the input, so secrets are not echoed.
    let config: Kubeconfig =
        serde_norway::from_slice(bytes).map_err(|e| format!("malformed kubeconfig: {e}"))?;
    let context_name = if config.current_context.is_empty() {
        match config.contexts.as_slice() {
            [only] => only.name.clone(),
            _ => return Err("no current-context".into()),
        }
    } else {
        config.current_context.clone()
    };
    let context = find(&config.contexts, &context_name, "context")?;
    let cluster = find(&config.clusters, &context.cluster, "cluster")?;
    let user = if context.user.is_empty() {
        None
    } else {
        Some(find(&config.users, &context.user, "user")?)
    };
    let resolve = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };
    let (host, port, path_prefix) = parse_server_url(&cluster.server)?;
    if cluster.insecure_skip_tls_verify {
        return Err(format!(
            "cluster {:?} sets insecure-skip-tls-verify; the API server must be verified \
             (set certificate-authority or certificate-authority-data)",
            context.cluster
        ));
    }
    let ca_pem = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) if !data.is_empty() => decode_data("certificate-authority-data", data)?,
        (_, Some(file)) if !file.is_empty() => read(&resolve(file))?,
        _ => {
            return Err(format!(
                "cluster {:?} has neither certificate-authority nor certificate-authority-data",
                context.cluster
            ));
        }
    };
    let credentials = match user {
        None => Credentials::Anonymous,
        Some(user) => user_credentials(user, &context.user, &resolve, read)?,
    };
    Ok(ApiServerAccess {
        host,
        port,
        path_prefix,
        ca_pem,
        credentials,
    })
}

fn user_credentials(
    user: &UserEntry,
    name: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
    read: &dyn Fn(&Path) -> Result<Vec<u8>, String>,
) -> Result<Credentials, String> {
    if user.exec.is_some() || user.auth_provider.is_some() {
        return Err(format!(
            "user {name:?} uses an exec plugin or auth provider, which Lanyard does not run; \
             give it a token, tokenFile or client certificate"
        ));
    }
    if user.username.is_some() {
        return Err(format!(
            "user {name:?} uses basic authentication, which Kubernetes no longer supports"
        ));
    }
    let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    if let Some(token) = nonempty(&user.token) {
        return Ok(Credentials::Token(token.trim().to_owned()));
    }
    if let Some(file) = nonempty(&user.token_file) {
        return Ok(Credentials::TokenFile(resolve(&file)));
    }
    let cert = match (
        nonempty(&user.client_certificate_data),
        nonempty(&user.client_certificate),
    ) {
        (Some(data), _) => Some(decode_data("client-certificate-data", &data)?),
        (None, Some(file)) => Some(read(&resolve(&file))?),
        (None, None) => None,
    };
    let key = match (nonempty(&user.client_key_data), nonempty(&user.client_key)) {
        (Some(data), _) => Some(decode_data("client-key-data", &data)?),
        (None, Some(file)) => Some(read(&resolve(&file))?),
        (None, None) => None,
    };
    match (cert, key) {
        (Some(cert_pem), Some(key_pem)) => Ok(Credentials::ClientCertificate { cert_pem, key_pem }),
        (None, None) => Ok(Credentials::Anonymous),
        _ => Err(format!(
            "user {name:?} has a client certificate without a key, or a key without a certificate"
        )),
    }
}

fn decode_data(what: &str, data: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("{what} is not base64: {e}"))
}

fn find<'a, T>(list: &'a [Named<T>], name: &str, what: &str) -> Result<&'a T, String> {
    list.iter()
        .find(|n| n.name == name)
        .and_then(|n| n.value.as_ref())
        .ok_or_else(|| format!("no {what} named {name:?}"))
}

/// Splits `https://host[:port][/prefix]`; only HTTPS is accepted.
pub fn parse_server_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("server {url:?} is not an https:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let bad = || format!("server {url:?} has no valid host and port");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().map_err(|_| bad())?,
            None if after.is_empty() => 443,
            None => return Err(bad()),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().map_err(|_| bad())?),
            None => (authority, 443),
        }
    };
    if host.is_empty() || authority.contains('@') {
        return Err(bad());
    }
    Ok((host.to_owned(), port, path.to_owned()))
}

/// The pod's own service account, from the environment the kubelet provides.
pub fn in_cluster(
    env: &BTreeMap<String, String>,
    dir: &Path,
) -> Result<ApiServerAccess, KubeconfigError> {
    let error = |reason: String| {
        KubeconfigError(format!(
            "no kube_config_file, and not running in a pod: {reason}"
        ))
    };
    let host = env
        .get("KUBERNETES_SERVICE_HOST")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| error("KUBERNETES_SERVICE_HOST is not set".into()))?;
    let port = env
        .get("KUBERNETES_SERVICE_PORT")
        .ok_or_else(|| error("KUBERNETES_SERVICE_PORT is not set".into()))?
        .parse()
        .map_err(|_| error("KUBERNETES_SERVICE_PORT is not a port".into()))?;
    let ca_pem = read_bounded(&dir.join("ca.crt")).map_err(error)?;
    Ok(ApiServerAccess {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
        path_prefix: String::new(),
        ca_pem,
        credentials: Credentials::TokenFile(dir.join("token")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(path: &Path) -> Result<Vec<u8>, String> {
        match path.to_str() {
            Some("/etc/k/ca.crt") => Ok(b"CA PEM".to_vec()),
            Some("/etc/k/client.crt") => Ok(b"CERT PEM".to_vec()),
            Some("/abs/client.key") => Ok(b"KEY PEM".to_vec()),
            other => Err(format!("no file {other:?}")),
        }
    }

    fn parse(json: &str) -> Result<ApiServerAccess, String> {
        parse_kubeconfig(json.as_bytes(), Path::new("/etc/k"), &files)
    }

    /// `kubectl config view --raw -o json` of a token user.
    const TOKEN_KUBECONFIG: &str = r#"{
        "kind": "Config",
        "apiVersion": "v1",
        "preferences": {},
        "clusters": [
            {"name": "other", "cluster": {"server": "https://10.9.9.9:6443", "certificate-authority-data": "eA=="}},
            {"name": "demo", "cluster": {"server": "https://127.0.0.1:6443", "certificate-authority-data": "Q0EgUEVN"}}
        ],
        "users": [
            {"name": "lanyard", "user": {"token": "sekret-token"}}
        ],
        "contexts": [
            {"name": "other", "context": {"cluster": "other", "user": "lanyard"}},
            {"name": "lanyard@demo", "context": {"cluster": "demo", "user": "lanyard", "namespace": "spire"}}
        ],
        "current-context": "lanyard@demo"
    }"#;

    #[test]
    fn token_user_and_inline_ca() {
        let access = parse(TOKEN_KUBECONFIG).expect("parses");
        assert_eq!(access.host, "127.0.0.1");
        assert_eq!(access.port, 6443);
        assert_eq!(access.path_prefix, "");
        assert_eq!(access.ca_pem, b"CA PEM");
        assert_eq!(
            access.credentials,
            Credentials::Token("sekret-token".into())
        );
        assert!(!format!("{access:?}").contains("sekret"));
    }

    /// What `kubectl config view --raw` prints: YAML.
    const YAML_KUBECONFIG: &str = "\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: Q0EgUEVN
    server: https://127.0.0.1:6443
  name: demo
contexts:
- context:
    cluster: demo
    user: lanyard
  name: lanyard@demo
current-context: lanyard@demo
kind: Config
preferences: {}
users:
- name: lanyard
  user:
    token: sekret-token
";

    #[test]
    fn yaml_as_kubectl_writes_it() {
        let access = parse(YAML_KUBECONFIG).expect("parses");
        assert_eq!(access.authority(), "127.0.0.1:6443");
        assert_eq!(access.ca_pem, b"CA PEM");
        assert_eq!(
            access.credentials,
            Credentials::Token("sekret-token".into())
        );
        // A broken file's error never quotes it.
        let broken = parse(&YAML_KUBECONFIG.replace("  user:\n", "  user: [\n")).unwrap_err();
        assert!(!broken.contains("sekret"), "{broken}");
    }

    #[test]
    fn client_certificate_files_relative_and_absolute() {
        let json = r#"{
            "clusters": [{"name": "c", "cluster": {"server": "https://api.example.com/prefix/", "certificate-authority": "ca.crt"}}],
            "users": [{"name": "u", "user": {"client-certificate": "client.crt", "client-key": "/abs/client.key"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}]
        }"#;
        let access = parse(json).expect("parses");
        assert_eq!(access.host, "api.example.com");
        assert_eq!(access.port, 443);
        assert_eq!(access.path_prefix, "/prefix");
        assert_eq!(access.ca_pem, b"CA PEM");
        assert_eq!(
            access.credentials,
            Credentials::ClientCertificate {
                cert_pem: b"CERT PEM".to_vec(),
                key_pem: b"KEY PEM".to_vec()
            }
        );
    }

    #[test]
    fn token_file_and_inline_client_data() {
        let json = r#"{
            "current-context": "x",
            "clusters": [{"name": "c", "cluster": {"server": "https://[::1]:8443", "certificate-authority-data": "Q0E="}}],
            "users": [{"name": "u", "user": {"tokenFile": "token"}},
                      {"name": "v", "user": {"client-certificate-data": "Q0VSVA==", "client-key-data": "S0VZ"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}},
                         {"name": "y", "context": {"cluster": "c", "user": "v"}}]
        }"#;
        let access = parse(json).expect("parses");
        assert_eq!(access.host, "::1");
        assert_eq!(access.authority(), "[::1]:8443");
        assert_eq!(
            access.credentials,
            Credentials::TokenFile("/etc/k/token".into())
        );
        let access =
            parse(&json.replace("\"current-context\": \"x\"", "\"current-context\": \"y\""))
                .expect("parses");
        assert_eq!(
            access.credentials,
            Credentials::ClientCertificate {
                cert_pem: b"CERT".to_vec(),
                key_pem: b"KEY".to_vec()
            }
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        let cases = [
            ("{", "malformed kubeconfig"),
            ("clusters: [\n", "malformed kubeconfig"),
            ("apiVersion: v1\nkind: Config\n", "no current-context"),
            (
                &TOKEN_KUBECONFIG.replace(
                    "\"current-context\": \"lanyard@demo\"",
                    "\"current-context\": \"missing\"",
                ),
                "no context named \"missing\"",
            ),
            (
                &TOKEN_KUBECONFIG.replace("https://127.0.0.1:6443", "http://127.0.0.1:8080"),
                "not an https:// URL",
            ),
            (
                &TOKEN_KUBECONFIG.replace(
                    "\"certificate-authority-data\": \"Q0EgUEVN\"",
                    "\"insecure-skip-tls-verify\": true",
                ),
                "insecure-skip-tls-verify",
            ),
            (
                &TOKEN_KUBECONFIG.replace(
                    "{\"token\": \"sekret-token\"}",
                    "{\"exec\": {\"command\": \"aws\"}}",
                ),
                "exec plugin",
            ),
            (
                &TOKEN_KUBECONFIG.replace(
                    "{\"token\": \"sekret-token\"}",
                    "{\"client-key-data\": \"S0VZ\"}",
                ),
                "without a certificate",
            ),
        ];
        for (json, expected) in cases {
            let error = parse(json).err().unwrap_or_default();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
            assert!(!error.contains("sekret"), "{error}");
        }
    }

    #[test]
    fn server_urls() {
        assert_eq!(
            parse_server_url("https://k8s:6443"),
            Ok(("k8s".into(), 6443, String::new()))
        );
        assert!(parse_server_url("https://:6443").is_err());
        assert!(parse_server_url("https://user@host").is_err());
        assert!(parse_server_url("https://host:notaport").is_err());
    }

    #[test]
    fn in_cluster_from_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.crt"), b"CA").expect("write");
        let env: BTreeMap<String, String> = [
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let access = in_cluster(&env, dir.path()).expect("in cluster");
        assert_eq!(access.authority(), "10.96.0.1:443");
        assert_eq!(access.ca_pem, b"CA");
        assert_eq!(
            access.credentials,
            Credentials::TokenFile(dir.path().join("token"))
        );
        let error = in_cluster(&BTreeMap::new(), dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("KUBERNETES_SERVICE_HOST"), "{error}");
    }
}
