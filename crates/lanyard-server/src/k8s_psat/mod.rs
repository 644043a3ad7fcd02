//! `k8s_psat` node attestation, server side: the agent's projected service account token is
//! checked by the cluster's own API server, then the pod it is bound to and that pod's node
//! give the agent ID and selectors (`lanyard_core::k8s_psat`).
//!
//! The calls, per attestation and with SPIRE's order: `POST
//! /apis/authentication.k8s.io/v1/tokenreviews` (the configured audiences; the server's
//! identity needs the `system:auth-delegator` ClusterRole), `GET /api/v1/namespaces/<ns>/pods/
//! <pod-name extra>` and `GET /api/v1/nodes/<spec.nodeName>` (it needs `get` on pods and
//! nodes). The decisions on each answer are pure functions below, tested on answers recorded
//! in the real API server's shape; only `attest` does I/O.
//!
//! Outcomes the agent can act on: a token the API server refuses (wrong audience, the pod was
//! deleted so the token "has been invalidated", expired), a service account not on the
//! cluster's allow list, or a pod or node that is gone are `PermissionDenied` (SPIRE's agent
//! stops at once instead of retrying); an API server that cannot be reached or answers 5xx is
//! `Unavailable` (the agent retries). SPIRE itself answers `Internal` when TokenReview carries
//! an error; Lanyard refuses instead, because retrying cannot help.

pub mod client;
pub mod kubeconfig;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use hyper::{Method, StatusCode};
use lanyard_core::k8s_psat::{
    self as psat, AgentFacts, AllowedLabels, EXTRA_POD_NAME, EXTRA_POD_UID, Payload, PsatError,
};
use lanyard_core::{SelectorSet, SpiffeId, TrustDomain};
use serde::Deserialize;

use crate::config::{K8sPsatClusterConfig, K8sPsatConfig};
use client::{CallError, KubeClient};

/// Why a `k8s_psat` attestation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum K8sPsatError {
    /// The payload is malformed (InvalidArgument).
    #[error(transparent)]
    Payload(#[from] PsatError),
    /// The payload names a cluster this server does not know (InvalidArgument).
    #[error("not configured for cluster {0:?}")]
    UnknownCluster(String),
    /// The evidence was checked and refused (PermissionDenied).
    #[error("{0}")]
    Refused(String),
    /// The API server could not be asked (Unavailable; worth retrying).
    #[error("{0}")]
    Unavailable(String),
    /// The server's own setup is wrong, e.g. its credentials for the API server (Internal).
    #[error("{0}")]
    Internal(String),
}

/// A successful attestation.
#[derive(Debug, Clone)]
pub struct PsatAttestation {
    /// `spiffe://<td>/spire/agent/k8s_psat/<cluster>/<node UID>`.
    pub agent_id: SpiffeId,
    /// The `k8s_psat` selectors.
    pub selectors: SelectorSet,
}

/// The configured clusters.
#[derive(Debug)]
pub struct K8sPsat {
    clusters: BTreeMap<String, Cluster>,
}

#[derive(Debug)]
struct Cluster {
    allow_list: BTreeSet<String>,
    audiences: Vec<String>,
    labels: AllowedLabels,
    client: KubeClient,
}

impl K8sPsat {
    /// Builds a client per cluster from its kubeconfig (or the pod's service account); fails
    /// with the cluster's name if one cannot be used.
    pub fn from_config(config: &K8sPsatConfig) -> Result<Self, String> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let mut clusters = BTreeMap::new();
        for (name, cluster) in &config.clusters {
            let error =
                |reason: String| format!("node_attestor.k8s_psat.clusters.{name}: {reason}");
            let access = match &cluster.kube_config_file {
                Some(path) => kubeconfig::load_kubeconfig(path),
                None => kubeconfig::in_cluster(&env, Path::new(kubeconfig::IN_CLUSTER_DIR)),
            }
            .map_err(|e| error(e.to_string()))?;
            let client = KubeClient::new(access).map_err(error)?;
            clusters.insert(name.clone(), Cluster::new(cluster, client));
        }
        Ok(Self { clusters })
    }

    /// Attests an agent from its payload.
    pub async fn attest(
        &self,
        payload: &[u8],
        trust_domain: &TrustDomain,
    ) -> Result<PsatAttestation, K8sPsatError> {
        let payload = Payload::parse(payload)?;
        let name = payload.cluster.as_str();
        let cluster = self
            .clusters
            .get(name)
            .ok_or_else(|| K8sPsatError::UnknownCluster(name.to_owned()))?;
        let unavailable = |what: &str, e: CallError| match e {
            CallError::Unreachable(reason) => K8sPsatError::Unavailable(format!(
                "unable to {what} with the API server of cluster {name:?}: {reason}"
            )),
            CallError::Local(reason) => {
                K8sPsatError::Internal(format!("unable to {what} for cluster {name:?}: {reason}"))
            }
        };
        let (status, body) = cluster
            .client
            .call(
                Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                Some(token_review_request(&payload.token, &cluster.audiences)),
            )
            .await
            .map_err(|e| unavailable("validate token", e))?;
        drop(payload.token);
        let reviewed = cluster.read_review(name, status, &body)?;
        let pod_path = format!(
            "/api/v1/namespaces/{}/pods/{}",
            reviewed.namespace, reviewed.pod_name
        );
        let (status, body) = cluster
            .client
            .call(Method::GET, &pod_path, None)
            .await
            .map_err(|e| unavailable("get pod", e))?;
        let pod: Pod = read_object(name, "pod", &reviewed.pod_name, status, &body)?;
        let node_name = pod.spec.node_name.clone();
        if node_name.is_empty() {
            return Err(K8sPsatError::Refused(format!(
                "pod {:?} in cluster {name:?} is not scheduled to a node",
                reviewed.pod_name
            )));
        }
        if !is_name(&node_name) {
            return Err(K8sPsatError::Internal(format!(
                "pod {:?} in cluster {name:?} names an invalid node {node_name:?}",
                reviewed.pod_name
            )));
        }
        let (status, body) = cluster
            .client
            .call(Method::GET, &format!("/api/v1/nodes/{node_name}"), None)
            .await
            .map_err(|e| unavailable("get node", e))?;
        let node: Node = read_object(name, "node", &node_name, status, &body)?;
        let facts = agent_facts(name, reviewed, pod, node)?;
        let agent_id = facts.agent_id(trust_domain)?;
        let selectors = facts.selectors(&cluster.labels)?.into_iter().collect();
        Ok(PsatAttestation {
            agent_id,
            selectors,
        })
    }
}

impl Cluster {
    fn new(config: &K8sPsatClusterConfig, client: KubeClient) -> Self {
        Self {
            allow_list: config.service_account_allow_list.iter().cloned().collect(),
            audiences: config.audience.clone(),
            labels: AllowedLabels {
                node: config.allowed_node_label_keys.iter().cloned().collect(),
                pod: config.allowed_pod_label_keys.iter().cloned().collect(),
            },
            client,
        }
    }

    /// The TokenReview's verdict, SPIRE's checks on it, and the allow list.
    fn read_review(
        &self,
        cluster: &str,
        status: StatusCode,
        body: &[u8],
    ) -> Result<Reviewed, K8sPsatError> {
        let review: TokenReview = read_api_answer(cluster, "create tokenreviews", status, body)?;
        let review = review.status;
        if !review.error.is_empty() {
            let hint = if review.error.contains("invalidated") {
                " (the pod or secret the token was bound to no longer exists)"
            } else if review.error.contains("audience") {
                " (the agent's token was requested for another audience than this cluster's \
                 `audience` setting)"
            } else {
                ""
            };
            return Err(K8sPsatError::Refused(format!(
                "token refused by the TokenReview API of cluster {cluster:?}: {}{hint}",
                review.error
            )));
        }
        if !review.authenticated {
            return Err(K8sPsatError::Refused(format!(
                "token not authenticated according to TokenReview API for cluster {cluster:?}"
            )));
        }
        if !self.audiences.is_empty()
            && !self.audiences.iter().any(|a| review.audiences.contains(a))
        {
            return Err(K8sPsatError::Refused(format!(
                "token review API did not validate audience for cluster {cluster:?}: wanted one \
                 of {:?} but got {:?}",
                self.audiences, review.audiences
            )));
        }
        let (namespace, service_account) = psat::service_account_of(&review.user.username)?;
        let full_name = format!("{namespace}:{service_account}");
        if !self.allow_list.contains(&full_name) {
            return Err(K8sPsatError::Refused(format!(
                "{full_name:?} is not an allowed service account for cluster {cluster:?}"
            )));
        }
        let pod_name = psat::single_extra(&review.user.extra, EXTRA_POD_NAME)?;
        let pod_uid = psat::single_extra(&review.user.extra, EXTRA_POD_UID)?;
        if !is_name(namespace) || !is_name(pod_name) {
            return Err(K8sPsatError::Internal(format!(
                "TokenReview of cluster {cluster:?} names an invalid pod {namespace:?}/{pod_name:?}"
            )));
        }
        Ok(Reviewed {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod_name: pod_name.to_owned(),
            pod_uid: pod_uid.to_owned(),
        })
    }
}

/// The body of a TokenReview for `token`. Never logged: it holds the token.
fn token_review_request(token: &str, audiences: &[String]) -> Vec<u8> {
    let mut spec = serde_json::json!({ "token": token });
    if !audiences.is_empty() {
        spec["audiences"] = serde_json::json!(audiences);
    }
    serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": spec,
    })
    .to_string()
    .into_bytes()
}

/// Whether `name` is safe as one path segment of an API URL (Kubernetes names are DNS
/// subdomains or labels: lowercase letters, digits, `-` and `.`).
fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// What the TokenReview established.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reviewed {
    namespace: String,
    service_account: String,
    pod_name: String,
    pod_uid: String,
}

#[derive(Deserialize)]
struct TokenReview {
    #[serde(default)]
    status: TokenReviewStatus,
}

#[derive(Deserialize, Default)]
struct TokenReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: UserInfo,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize, Default)]
struct UserInfo {
    #[serde(default)]
    username: String,
    #[serde(default)]
    extra: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize, Default)]
struct ObjectMeta {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Pod {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Deserialize, Default)]
struct PodSpec {
    #[serde(rename = "nodeName", default)]
    node_name: String,
}

#[derive(Deserialize, Default)]
struct PodStatus {
    #[serde(rename = "hostIP", default)]
    host_ip: String,
}

#[derive(Deserialize)]
struct Node {
    #[serde(default)]
    metadata: ObjectMeta,
}

/// The `Status` object the API server sends with an error.
#[derive(Deserialize, Default)]
struct ApiStatus {
    #[serde(default)]
    message: String,
}

/// A successful answer's object, or the error the API server gave, as one of ours.
fn read_api_answer<T: for<'de> Deserialize<'de>>(
    cluster: &str,
    what: &str,
    status: StatusCode,
    body: &[u8],
) -> Result<T, K8sPsatError> {
    if status.is_success() {
        // A TokenReview answer echoes the token: never put the body in a message.
        return serde_json::from_slice(body).map_err(|e| {
            K8sPsatError::Internal(format!(
                "unexpected answer to {what} from the API server of cluster {cluster:?}: {e}"
            ))
        });
    }
    let message = serde_json::from_slice::<ApiStatus>(body)
        .map(|s| s.message)
        .unwrap_or_default();
    let reason =
        format!("the API server of cluster {cluster:?} answered {what} with {status}: {message}");
    Err(match status {
        StatusCode::UNAUTHORIZED => K8sPsatError::Internal(format!(
            "{reason} (the server's own credentials in its kubeconfig are not accepted)"
        )),
        StatusCode::FORBIDDEN => K8sPsatError::Internal(format!(
            "{reason} (grant the server's identity the system:auth-delegator ClusterRole and \
             get on pods and nodes)"
        )),
        StatusCode::NOT_FOUND => K8sPsatError::Refused(reason),
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            K8sPsatError::Unavailable(reason)
        }
        _ => K8sPsatError::Internal(reason),
    })
}

fn read_object<T: for<'de> Deserialize<'de>>(
    cluster: &str,
    kind: &str,
    name: &str,
    status: StatusCode,
    body: &[u8],
) -> Result<T, K8sPsatError> {
    read_api_answer(cluster, &format!("get {kind} {name:?}"), status, body)
}

/// Joins the review, the pod and the node into the facts the ID and selectors come from.
fn agent_facts(
    cluster: &str,
    reviewed: Reviewed,
    pod: Pod,
    node: Node,
) -> Result<AgentFacts, K8sPsatError> {
    if pod.metadata.uid != reviewed.pod_uid {
        return Err(K8sPsatError::Refused(format!(
            "pod UID mismatch for pod {:?} in cluster {cluster:?}: token bound to pod UID {:?}",
            reviewed.pod_name, reviewed.pod_uid
        )));
    }
    if node.metadata.uid.is_empty() {
        return Err(K8sPsatError::Internal(format!(
            "node UID is empty for cluster {cluster:?}"
        )));
    }
    Ok(AgentFacts {
        cluster: cluster.to_owned(),
        namespace: reviewed.namespace,
        service_account: reviewed.service_account,
        pod_name: reviewed.pod_name,
        pod_uid: reviewed.pod_uid,
        pod_labels: pod.metadata.labels,
        node_name: pod.spec.node_name,
        node_uid: node.metadata.uid,
        node_labels: node.metadata.labels,
        node_ip: pod.status.host_ip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s_psat::kubeconfig::{ApiServerAccess, Credentials};

    /// A TokenReview answer in the shape kube-apiserver v1.36 returns (it echoes the token).
    const REVIEW_OK: &str = r#"{
      "kind": "TokenReview",
      "apiVersion": "authentication.k8s.io/v1",
      "metadata": {"creationTimestamp": null},
      "spec": {"token": "eyJhbGciOiJSUzI1NiIsImtpZCI6IngifQ.SECRET.sig", "audiences": ["spire-server"]},
      "status": {
        "authenticated": true,
        "user": {
          "username": "system:serviceaccount:spire:spire-agent",
          "uid": "5b2c2a4e-0b7e-4c53-a2f1-6d0f3f5c9d21",
          "groups": ["system:serviceaccounts", "system:serviceaccounts:spire", "system:authenticated"],
          "extra": {
            "authentication.kubernetes.io/credential-id": ["JTI=3f1b7c2e-8a47-4d0c-9b55-0e4f6a2d7c11"],
            "authentication.kubernetes.io/node-name": ["node-1"],
            "authentication.kubernetes.io/node-uid": ["7f3d1c2b-8e4a-4b6c-9d0e-1a2b3c4d5e6f"],
            "authentication.kubernetes.io/pod-name": ["spire-agent-x7k2p"],
            "authentication.kubernetes.io/pod-uid": ["0b8c6a3e-5a1c-4a3f-9f2e-3c5d2b1a0f9e"]
          }
        },
        "audiences": ["spire-server"]
      }
    }"#;

    const REVIEW_INVALIDATED: &str = r#"{
      "kind": "TokenReview",
      "apiVersion": "authentication.k8s.io/v1",
      "metadata": {"creationTimestamp": null},
      "spec": {"token": "eyJ.SECRET.sig", "audiences": ["spire-server"]},
      "status": {"user": {}, "error": "[invalid bearer token, service account token has been invalidated]"}
    }"#;

    const POD: &str = r#"{
      "kind": "Pod",
      "apiVersion": "v1",
      "metadata": {
        "name": "spire-agent-x7k2p",
        "namespace": "spire",
        "uid": "0b8c6a3e-5a1c-4a3f-9f2e-3c5d2b1a0f9e",
        "resourceVersion": "512",
        "creationTimestamp": "2026-12-04T09:00:00Z",
        "labels": {"app": "spire-agent", "pod-template-hash": "6d9f"}
      },
      "spec": {
        "containers": [{"name": "agent", "image": "spire-agent:1.13.6", "resources": {}}],
        "restartPolicy": "Always",
        "serviceAccountName": "spire-agent",
        "serviceAccount": "spire-agent",
        "nodeName": "node-1"
      },
      "status": {"phase": "Running", "hostIP": "10.0.0.7", "hostIPs": [{"ip": "10.0.0.7"}], "qosClass": "BestEffort"}
    }"#;

    const NODE: &str = r#"{
      "kind": "Node",
      "apiVersion": "v1",
      "metadata": {
        "name": "node-1",
        "uid": "7f3d1c2b-8e4a-4b6c-9d0e-1a2b3c4d5e6f",
        "resourceVersion": "498",
        "labels": {"kubernetes.io/hostname": "node-1", "topology.kubernetes.io/zone": "eu-1a"}
      },
      "spec": {},
      "status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": 0}}, "nodeInfo": {}}
    }"#;

    const POD_NOT_FOUND: &str = r#"{
      "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
      "message": "pods \"spire-agent-x7k2p\" not found", "reason": "NotFound",
      "details": {"name": "spire-agent-x7k2p", "kind": "pods"}, "code": 404
    }"#;

    const FORBIDDEN: &str = r#"{
      "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
      "message": "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:spire:spire-server\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
      "reason": "Forbidden", "details": {"group": "authentication.k8s.io", "kind": "tokenreviews"}, "code": 403
    }"#;

    fn cluster(allow: &[&str], audiences: &[&str]) -> Cluster {
        let config = K8sPsatClusterConfig {
            service_account_allow_list: allow.iter().map(|s| (*s).to_owned()).collect(),
            audience: audiences.iter().map(|s| (*s).to_owned()).collect(),
            kube_config_file: None,
            allowed_node_label_keys: vec!["topology.kubernetes.io/zone".into()],
            allowed_pod_label_keys: vec!["app".into()],
        };
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("certificate")
            .cert
            .pem();
        let client = KubeClient::new(ApiServerAccess {
            host: "127.0.0.1".into(),
            port: 1,
            path_prefix: String::new(),
            ca_pem: ca.into_bytes(),
            credentials: Credentials::Anonymous,
        })
        .expect("client");
        Cluster::new(&config, client)
    }

    fn message(result: Result<impl std::fmt::Debug, K8sPsatError>) -> String {
        match result {
            Ok(value) => panic!("expected an error, got {value:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn recorded_answers_give_spire_selectors_and_id() {
        let cluster = cluster(&["spire:spire-agent"], &["spire-server"]);
        let reviewed = cluster
            .read_review("demo", StatusCode::CREATED, REVIEW_OK.as_bytes())
            .expect("reviewed");
        let pod: Pod =
            read_object("demo", "pod", "p", StatusCode::OK, POD.as_bytes()).expect("pod");
        let node: Node =
            read_object("demo", "node", "n", StatusCode::OK, NODE.as_bytes()).expect("node");
        let facts = agent_facts("demo", reviewed, pod, node).expect("facts");
        let td = TrustDomain::new("example.org").expect("td");
        assert_eq!(
            facts.agent_id(&td).expect("id").as_str(),
            "spiffe://example.org/spire/agent/k8s_psat/demo/7f3d1c2b-8e4a-4b6c-9d0e-1a2b3c4d5e6f"
        );
        let mut selectors: Vec<String> = facts
            .selectors(&cluster.labels)
            .expect("selectors")
            .iter()
            .map(ToString::to_string)
            .collect();
        selectors.sort();
        assert_eq!(
            selectors,
            [
                "k8s_psat:agent_node_ip:10.0.0.7",
                "k8s_psat:agent_node_label:topology.kubernetes.io/zone:eu-1a",
                "k8s_psat:agent_node_name:node-1",
                "k8s_psat:agent_node_uid:7f3d1c2b-8e4a-4b6c-9d0e-1a2b3c4d5e6f",
                "k8s_psat:agent_ns:spire",
                "k8s_psat:agent_pod_label:app:spire-agent",
                "k8s_psat:agent_pod_name:spire-agent-x7k2p",
                "k8s_psat:agent_pod_uid:0b8c6a3e-5a1c-4a3f-9f2e-3c5d2b1a0f9e",
                "k8s_psat:agent_sa:spire-agent",
                "k8s_psat:cluster:demo",
            ]
        );
    }

    #[test]
    fn review_refusals_name_their_reason_and_never_the_token() {
        let allowed = cluster(&["spire:spire-agent"], &["spire-server"]);
        let invalidated = message(allowed.read_review(
            "demo",
            StatusCode::CREATED,
            REVIEW_INVALIDATED.as_bytes(),
        ));
        assert!(
            invalidated.contains("has been invalidated"),
            "{invalidated}"
        );
        assert!(invalidated.contains("no longer exists"), "{invalidated}");

        let other = cluster(&["spire:other"], &["spire-server"]);
        let not_listed =
            message(other.read_review("demo", StatusCode::CREATED, REVIEW_OK.as_bytes()));
        assert_eq!(
            not_listed,
            r#""spire:spire-agent" is not an allowed service account for cluster "demo""#
        );

        let audience = cluster(&["spire:spire-agent"], &["elsewhere"]);
        let wrong =
            message(audience.read_review("demo", StatusCode::CREATED, REVIEW_OK.as_bytes()));
        assert!(wrong.contains("did not validate audience"), "{wrong}");

        let unauthenticated =
            REVIEW_OK.replace("\"authenticated\": true", "\"authenticated\": false");
        let refused =
            message(allowed.read_review("demo", StatusCode::CREATED, unauthenticated.as_bytes()));
        assert!(refused.contains("not authenticated"), "{refused}");

        let unbound = REVIEW_OK.replace("authentication.kubernetes.io/pod-name", "x/pod-name");
        let refused = message(allowed.read_review("demo", StatusCode::CREATED, unbound.as_bytes()));
        assert!(refused.contains("not bound to a pod"), "{refused}");

        let forbidden = allowed.read_review("demo", StatusCode::FORBIDDEN, FORBIDDEN.as_bytes());
        assert!(
            matches!(forbidden, Err(K8sPsatError::Internal(ref m)) if m.contains("system:auth-delegator"))
        );

        let busy = allowed.read_review("demo", StatusCode::SERVICE_UNAVAILABLE, b"{}");
        assert!(matches!(busy, Err(K8sPsatError::Unavailable(_))));

        let garbage = allowed.read_review("demo", StatusCode::CREATED, b"<html>");
        assert!(matches!(garbage, Err(K8sPsatError::Internal(_))));

        for result in [invalidated, not_listed, wrong] {
            assert!(!result.contains("SECRET"), "{result}");
        }
    }

    #[test]
    fn pod_gone_or_replaced_is_refused() {
        let gone = read_object::<Pod>(
            "demo",
            "pod",
            "spire-agent-x7k2p",
            StatusCode::NOT_FOUND,
            POD_NOT_FOUND.as_bytes(),
        );
        assert!(matches!(gone, Err(K8sPsatError::Refused(ref m)) if m.contains("not found")));

        let cluster = cluster(&["spire:spire-agent"], &["spire-server"]);
        let reviewed = cluster
            .read_review("demo", StatusCode::CREATED, REVIEW_OK.as_bytes())
            .expect("reviewed");
        let replaced = POD.replace(
            "0b8c6a3e-5a1c-4a3f-9f2e-3c5d2b1a0f9e",
            "11111111-2222-3333-4444-555555555555",
        );
        let pod: Pod = serde_json::from_str(&replaced).expect("pod");
        let node: Node = serde_json::from_str(NODE).expect("node");
        let refused = message(agent_facts("demo", reviewed, pod, node));
        assert!(refused.contains("pod UID mismatch"), "{refused}");
    }

    #[test]
    fn review_request_shape() {
        let body: serde_json::Value =
            serde_json::from_slice(&token_review_request("t", &["spire-server".into()]))
                .expect("json");
        assert_eq!(
            body,
            serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": "t", "audiences": ["spire-server"]}
            })
        );
        let body: serde_json::Value =
            serde_json::from_slice(&token_review_request("t", &[])).expect("json");
        assert!(body["spec"].get("audiences").is_none());
    }

    #[test]
    fn names_safe_in_paths() {
        for good in ["spire", "node-1", "ip-10-0-0-7.ec2.internal"] {
            assert!(is_name(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "A", "a?b", "a%2fb"] {
            assert!(!is_name(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn unreachable_api_server_is_unavailable() {
        let cluster = cluster(&["spire:spire-agent"], &["spire-server"]);
        let psat = K8sPsat {
            clusters: [("demo".to_owned(), cluster)].into_iter().collect(),
        };
        let td = TrustDomain::new("example.org").expect("td");
        let payload = Payload {
            cluster: "demo".into(),
            token: "t".into(),
        };
        let result = psat.attest(&payload.to_bytes(), &td).await;
        assert!(
            matches!(result, Err(K8sPsatError::Unavailable(_))),
            "{result:?}"
        );
        let other = Payload {
            cluster: "prod".into(),
            token: "t".into(),
        };
        let result = psat.attest(&other.to_bytes(), &td).await;
        assert_eq!(message(result), r#"not configured for cluster "prod""#);
    }
}
