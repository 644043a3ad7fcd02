//! `k8s_psat` node attestation: an agent running in a Kubernetes pod proves its identity with
//! a projected service account token, wire-compatible with SPIRE's `k8s_psat` plugins.
//!
//! The agent sends one JSON payload, `{"cluster": "<name>", "token": "<JWT>"}`, with no
//! challenge. The server asks the cluster's API server about the token (TokenReview), reads
//! the pod the token is bound to and that pod's node, and derives:
//! - the agent ID `spiffe://<td>/spire/agent/k8s_psat/<cluster>/<node UID>`, so an agent that
//!   restarts on the same node with a new token keeps its ID (re-attestation is allowed);
//! - selectors of type `k8s_psat`: `cluster`, `agent_ns`, `agent_sa`, `agent_pod_name`,
//!   `agent_pod_uid`, `agent_node_ip`, `agent_node_name`, `agent_node_uid`, and
//!   `agent_node_label:<key>:<value>` / `agent_pod_label:<key>:<value>` for allowed keys only.
//!
//! This module holds the pure parts for both sides; the server's HTTP calls live in
//! `lanyard-server`. The token is a credential: nothing here prints it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::SpiffeId;
use crate::id::{IdError, TrustDomain};
use crate::selector::Selector;

/// The attestor's name on the wire (`AttestationData.type`) and the type of its selectors.
pub const ATTESTOR_NAME: &str = "k8s_psat";

/// Whether agents attested this way re-attest instead of renewing (SPIRE: yes).
pub const CAN_REATTEST: bool = true;

/// The largest token accepted. Kubernetes tokens are one to two kilobytes; the bound keeps a
/// peer from making the server forward megabytes to the API server.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The largest payload accepted: a token, a cluster name and the JSON around them.
pub const MAX_PAYLOAD_LEN: usize = MAX_TOKEN_LEN + 1024;

/// The prefix of a service account's user name in a TokenReview.
pub const SERVICE_ACCOUNT_USER_PREFIX: &str = "system:serviceaccount:";

/// The TokenReview `extra` key holding the name of the pod a token is bound to.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";

/// The TokenReview `extra` key holding the UID of the pod a token is bound to.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Why a payload or a TokenReview answer cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PsatError {
    /// The payload is larger than [`MAX_PAYLOAD_LEN`].
    #[error("payload is {len} bytes long; the limit is {MAX_PAYLOAD_LEN}")]
    PayloadTooLong {
        /// Its length.
        len: usize,
    },
    /// The payload is not SPIRE's JSON object.
    #[error("failed to unmarshal data payload: {0}")]
    Malformed(String),
    /// The payload names no cluster.
    #[error("missing cluster in attestation data")]
    MissingCluster,
    /// The payload holds no token.
    #[error("missing token in attestation data")]
    MissingToken,
    /// The token is larger than [`MAX_TOKEN_LEN`].
    #[error("token is {len} bytes long; the limit is {MAX_TOKEN_LEN}")]
    TokenTooLong {
        /// Its length.
        len: usize,
    },
    /// The TokenReview user is not a service account.
    #[error("unexpected username format {0:?}: expected system:serviceaccount:<namespace>:<name>")]
    NotAServiceAccount(String),
    /// The TokenReview names no single pod (the token is not bound to a pod).
    #[error("the token is not bound to a pod: {0}")]
    NotBoundToPod(String),
    /// A fact that goes into the agent ID or a selector is unusable.
    #[error("{what} {value:?} cannot be used: {reason}")]
    BadFact {
        /// What it is (`node UID`, `pod name`, …).
        what: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// The attestation payload: the cluster the agent says it is in, and its token. A missing
/// field reads as empty, as in Go.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// The cluster name, as configured on both sides.
    #[serde(default)]
    pub cluster: String,
    /// The projected service account token (a JWT).
    #[serde(default)]
    pub token: String,
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payload")
            .field("cluster", &self.cluster)
            .field("token_len", &self.token.len())
            .finish_non_exhaustive()
    }
}

impl Payload {
    /// Parses and checks a payload as SPIRE's server plugin does, with size bounds.
    pub fn parse(payload: &[u8]) -> Result<Self, PsatError> {
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(PsatError::PayloadTooLong { len: payload.len() });
        }
        // serde_json's message names a position, never the input, so the token is not echoed.
        let payload: Self =
            serde_json::from_slice(payload).map_err(|e| PsatError::Malformed(e.to_string()))?;
        if payload.cluster.is_empty() {
            return Err(PsatError::MissingCluster);
        }
        if payload.token.is_empty() {
            return Err(PsatError::MissingToken);
        }
        if payload.token.len() > MAX_TOKEN_LEN {
            return Err(PsatError::TokenTooLong {
                len: payload.token.len(),
            });
        }
        Ok(payload)
    }

    /// The payload bytes, as SPIRE's agent plugin writes them.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing two strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The namespace and name of the service account in a TokenReview user name
/// (`system:serviceaccount:<namespace>:<name>`).
pub fn service_account_of(username: &str) -> Result<(&str, &str), PsatError> {
    let not_sa = || PsatError::NotAServiceAccount(username.to_owned());
    let rest = username
        .strip_prefix(SERVICE_ACCOUNT_USER_PREFIX)
        .ok_or_else(not_sa)?;
    let (namespace, name) = rest.split_once(':').ok_or_else(not_sa)?;
    if namespace.is_empty() || name.is_empty() || name.contains(':') {
        return Err(not_sa());
    }
    Ok((namespace, name))
}

/// The single value of a TokenReview `extra` key such as [`EXTRA_POD_NAME`].
pub fn single_extra<'a>(
    extra: &'a BTreeMap<String, Vec<String>>,
    key: &str,
) -> Result<&'a str, PsatError> {
    match extra.get(key).map(Vec::as_slice) {
        Some([value]) if !value.is_empty() => Ok(value),
        Some([]) | None => Err(PsatError::NotBoundToPod(format!("missing {key}"))),
        Some([_]) => Err(PsatError::NotBoundToPod(format!("{key} is empty"))),
        Some(values) => Err(PsatError::NotBoundToPod(format!(
            "expected one {key} but got {}",
            values.len()
        ))),
    }
}

/// Everything the server learned about an attesting agent from the API server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFacts {
    /// The cluster, as named in the payload and the server's configuration.
    pub cluster: String,
    /// The agent's service account namespace.
    pub namespace: String,
    /// The agent's service account name.
    pub service_account: String,
    /// The pod the token is bound to.
    pub pod_name: String,
    /// Its UID.
    pub pod_uid: String,
    /// Its labels.
    pub pod_labels: BTreeMap<String, String>,
    /// The pod's node (`spec.nodeName`).
    pub node_name: String,
    /// The node's UID.
    pub node_uid: String,
    /// The node's labels.
    pub node_labels: BTreeMap<String, String>,
    /// The pod's `status.hostIP`; empty while the pod has not been started on its node.
    pub node_ip: String,
}

/// Which labels may become selectors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedLabels {
    /// Node label keys.
    pub node: BTreeSet<String>,
    /// Pod label keys.
    pub pod: BTreeSet<String>,
}

impl AgentFacts {
    /// SPIRE's agent ID: `spiffe://<td>/spire/agent/k8s_psat/<cluster>/<node UID>`.
    pub fn agent_id(&self, trust_domain: &TrustDomain) -> Result<SpiffeId, PsatError> {
        if self.node_uid.is_empty() {
            return Err(PsatError::BadFact {
                what: "node UID",
                value: String::new(),
                reason: "it is empty".into(),
            });
        }
        trust_domain
            .agent_id(ATTESTOR_NAME, &[&self.cluster, &self.node_uid])
            .map_err(|e: IdError| PsatError::BadFact {
                what: "cluster name or node UID",
                value: format!("{}/{}", self.cluster, self.node_uid),
                reason: e.to_string(),
            })
    }

    /// SPIRE's selectors, all of type [`ATTESTOR_NAME`]. Labels become selectors only if their
    /// key is allowed; an empty host IP (a pod not yet running) gives no `agent_node_ip`.
    pub fn selectors(&self, allowed: &AllowedLabels) -> Result<Vec<Selector>, PsatError> {
        let mut values = vec![
            format!("cluster:{}", self.cluster),
            format!("agent_ns:{}", self.namespace),
            format!("agent_sa:{}", self.service_account),
            format!("agent_pod_name:{}", self.pod_name),
            format!("agent_pod_uid:{}", self.pod_uid),
            format!("agent_node_name:{}", self.node_name),
            format!("agent_node_uid:{}", self.node_uid),
        ];
        if !self.node_ip.is_empty() {
            values.push(format!("agent_node_ip:{}", self.node_ip));
        }
        values.extend(
            self.node_labels
                .iter()
                .filter(|(key, _)| allowed.node.contains(*key))
                .map(|(key, value)| format!("agent_node_label:{key}:{value}")),
        );
        values.extend(
            self.pod_labels
                .iter()
                .filter(|(key, _)| allowed.pod.contains(*key))
                .map(|(key, value)| format!("agent_pod_label:{key}:{value}")),
        );
        values
            .into_iter()
            .map(|value| {
                Selector::new(ATTESTOR_NAME, &value).map_err(|e| PsatError::BadFact {
                    what: "selector",
                    value,
                    reason: e.to_string(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> AgentFacts {
        AgentFacts {
            cluster: "demo".into(),
            namespace: "spire".into(),
            service_account: "spire-agent".into(),
            pod_name: "spire-agent-x7k2p".into(),
            pod_uid: "0b8c6a3e-5a1c-4a3f-9f2e-3c5d2b1a0f9e".into(),
            pod_labels: [("app", "spire-agent"), ("tier", "infra")]
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            node_name: "node-1".into(),
            node_uid: "7f3d1c2b-8e4a-4b6c-9d0e-1a2b3c4d5e6f".into(),
            node_labels: [("topology.kubernetes.io/zone", "eu-1a"), ("secret", "x")]
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            node_ip: "10.0.0.7".into(),
        }
    }

    #[test]
    fn payload_round_trips_in_spire_shape() {
        let payload = Payload {
            cluster: "demo".into(),
            token: "a.b.c".into(),
        };
        let bytes = payload.to_bytes();
        assert_eq!(bytes, br#"{"cluster":"demo","token":"a.b.c"}"#);
        assert_eq!(Payload::parse(&bytes), Ok(payload));
    }

    #[test]
    fn payload_refusals() {
        let cases: &[(&[u8], PsatError)] = &[
            (br#"{"cluster":"","token":"t"}"#, PsatError::MissingCluster),
            (br#"{"token":"t"}"#, PsatError::MissingCluster),
            (br#"{"cluster":"demo","token":""}"#, PsatError::MissingToken),
            (br#"{"cluster":"demo"}"#, PsatError::MissingToken),
        ];
        for (input, expected) in cases {
            assert_eq!(Payload::parse(input).as_ref(), Err(expected));
        }
        assert!(matches!(
            Payload::parse(b"not json"),
            Err(PsatError::Malformed(_))
        ));
        let long = format!(
            r#"{{"cluster":"demo","token":"{}"}}"#,
            "a".repeat(MAX_TOKEN_LEN + 1)
        );
        assert!(matches!(
            Payload::parse(long.as_bytes()),
            Err(PsatError::TokenTooLong { .. })
        ));
        let huge = vec![b' '; MAX_PAYLOAD_LEN + 1];
        assert!(matches!(
            Payload::parse(&huge),
            Err(PsatError::PayloadTooLong { .. })
        ));
    }

    #[test]
    fn malformed_payload_error_does_not_echo_the_token() {
        let secret = "eyJhbGciOiJSUzI1NiJ9.secret-part";
        let input = format!(r#"{{"cluster":"demo","token":"{secret}","token":1}}"#);
        let message = Payload::parse(input.as_bytes())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!message.contains("secret-part"), "{message}");
        let debug = format!(
            "{:?}",
            Payload {
                cluster: "demo".into(),
                token: secret.into()
            }
        );
        assert!(!debug.contains("secret-part"), "{debug}");
    }

    #[test]
    fn service_account_user_names() {
        assert_eq!(
            service_account_of("system:serviceaccount:spire:spire-agent"),
            Ok(("spire", "spire-agent"))
        );
        for bad in [
            "",
            "admin",
            "system:serviceaccount:spire",
            "system:serviceaccount::spire-agent",
            "system:serviceaccount:spire:",
            "system:serviceaccount:a:b:c",
            "system:node:node-1",
        ] {
            assert!(service_account_of(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn single_extra_values() {
        let mut extra = BTreeMap::new();
        assert!(single_extra(&extra, EXTRA_POD_NAME).is_err());
        extra.insert(EXTRA_POD_NAME.to_owned(), vec!["p".to_owned()]);
        assert_eq!(single_extra(&extra, EXTRA_POD_NAME), Ok("p"));
        extra.insert(
            EXTRA_POD_NAME.to_owned(),
            vec!["p".to_owned(), "q".to_owned()],
        );
        assert!(single_extra(&extra, EXTRA_POD_NAME).is_err());
        extra.insert(EXTRA_POD_NAME.to_owned(), vec![String::new()]);
        assert!(single_extra(&extra, EXTRA_POD_NAME).is_err());
    }

    #[test]
    fn agent_id_is_cluster_and_node_uid() {
        let td = TrustDomain::new("example.org").expect("valid");
        let id = facts().agent_id(&td).expect("agent ID");
        assert_eq!(
            id.as_str(),
            "spiffe://example.org/spire/agent/k8s_psat/demo/7f3d1c2b-8e4a-4b6c-9d0e-1a2b3c4d5e6f"
        );
        let mut no_uid = facts();
        no_uid.node_uid.clear();
        assert!(no_uid.agent_id(&td).is_err());
        let mut bad_uid = facts();
        bad_uid.node_uid = "../x".into();
        assert!(bad_uid.agent_id(&td).is_err());
    }

    #[test]
    fn selectors_follow_spire_and_filter_labels() {
        let allowed = AllowedLabels {
            node: ["topology.kubernetes.io/zone".to_owned()].into(),
            pod: ["app".to_owned()].into(),
        };
        let selectors: Vec<String> = facts()
            .selectors(&allowed)
            .expect("selectors")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            selectors,
            [
                "k8s_psat:cluster:demo",
                "k8s_psat:agent_ns:spire",
                "k8s_psat:agent_sa:spire-agent",
                "k8s_psat:agent_pod_name:spire-agent-x7k2p",
                "k8s_psat:agent_pod_uid:0b8c6a3e-5a1c-4a3f-9f2e-3c5d2b1a0f9e",
                "k8s_psat:agent_node_name:node-1",
                "k8s_psat:agent_node_uid:7f3d1c2b-8e4a-4b6c-9d0e-1a2b3c4d5e6f",
                "k8s_psat:agent_node_ip:10.0.0.7",
                "k8s_psat:agent_node_label:topology.kubernetes.io/zone:eu-1a",
                "k8s_psat:agent_pod_label:app:spire-agent",
            ]
        );
        let mut pending = facts();
        pending.node_ip.clear();
        let selectors = pending
            .selectors(&AllowedLabels::default())
            .expect("selectors");
        assert_eq!(selectors.len(), 7);
        assert!(
            selectors
                .iter()
                .all(|s| !s.value().starts_with("agent_node_ip"))
        );
    }
}
