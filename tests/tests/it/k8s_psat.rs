//! `k8s_psat` node attestation against a real Kubernetes API server: a Lanyard server reviews
//! agents' projected service account tokens as its own service account (bound to
//! `system:auth-delegator`, with `get` on pods and nodes) through a kubeconfig, and gives
//! SPIRE's agent ID and selectors. A Lanyard agent and SPIRE's own `spire-agent` (its
//! `k8s_psat` plugin) attest with a token bound to their pod; a token for another audience,
//! a service account not on the allow list and a deleted pod's token are refused, each with
//! its reason.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use lanyard_core::x509::verify_svid_chain;
use lanyard_e2e::kube::KubeCluster;
use lanyard_e2e::spire::{SPIRE_TIMEOUT, SpireAgent, SpireAttestation, spire_or_skip};
use lanyard_e2e::{
    Agent, Server, TestDir, current_uid, poll, spiffe_id, toml_string, trust_domain, uid_selector,
};
use serde_json::{Value, json};

use crate::spire_agent::agent_serial;

pub(crate) const CLUSTER: &str = "demo";
pub(crate) const AGENT_NAMESPACE: &str = "spire";
pub(crate) const AGENT_SERVICE_ACCOUNT: &str = "spire-agent";
pub(crate) const NODE: &str = "node-1";
pub(crate) const SERVER_NAMESPACE: &str = "lanyard";
pub(crate) const SERVER_SERVICE_ACCOUNT: &str = "server";
/// The ClusterRole giving the server what k8s_psat reads besides TokenReview.
const READER_ROLE: &str = "lanyard-k8s-psat-reader";

/// A cluster with the agents' namespace, service account and node, and a Lanyard server
/// configured for it as cluster [`CLUSTER`].
pub(crate) struct Testbed {
    pub(crate) cluster: KubeCluster,
    pub(crate) server: Server,
    pub(crate) node_uid: String,
    pub(crate) dir: TestDir,
}

impl Testbed {
    /// `extra_toml` goes at the top of the server's config (top-level keys).
    pub(crate) fn start(test: &str, extra_toml: &str) -> Option<Self> {
        let cluster = KubeCluster::start_or_skip(test)?;
        cluster.create_namespace(AGENT_NAMESPACE);
        cluster.create_service_account(AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT);
        cluster.create_service_account(AGENT_NAMESPACE, "intruder");
        let node = cluster.create_node(NODE, &[("topology.kubernetes.io/zone", "zone-a")]);
        let node_uid = node["metadata"]["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("node without uid: {node}"))
            .to_owned();

        // The server's own identity: TokenReview (system:auth-delegator), pods and nodes.
        cluster.create_namespace(SERVER_NAMESPACE);
        cluster.create_service_account(SERVER_NAMESPACE, SERVER_SERVICE_ACCOUNT);
        cluster.bind_cluster_role(
            "system:auth-delegator",
            SERVER_NAMESPACE,
            SERVER_SERVICE_ACCOUNT,
        );
        cluster.apply(&json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": READER_ROLE},
            "rules": [{"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get"]}],
        }));
        cluster.bind_cluster_role(READER_ROLE, SERVER_NAMESPACE, SERVER_SERVICE_ACCOUNT);
        let server_token =
            cluster.request_token(SERVER_NAMESPACE, SERVER_SERVICE_ACCOUNT, &[], None);

        let dir = TestDir::new();
        // YAML, as kubectl writes it.
        let kubeconfig = dir.join("kubeconfig");
        cluster.write_kubeconfig(&kubeconfig, &server_token);
        let server = Server::start_with(
            &dir.join("server"),
            &format!(
                "{extra_toml}\n\
                 [node_attestor.k8s_psat.clusters.{CLUSTER}]\n\
                 service_account_allow_list = [\"{AGENT_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}\"]\n\
                 kube_config_file = {}\n\
                 allowed_node_label_keys = [\"topology.kubernetes.io/zone\"]\n\
                 allowed_pod_label_keys = [\"app\"]\n",
                toml_string(kubeconfig.to_str().expect("UTF-8 path"))
            ),
        );
        Some(Self {
            cluster,
            server,
            node_uid,
            dir,
        })
    }

    /// The agent ID every agent on [`NODE`] gets.
    pub(crate) fn agent_id(&self) -> String {
        spiffe_id(&format!(
            "/spire/agent/k8s_psat/{CLUSTER}/{}",
            self.node_uid
        ))
    }

    /// Creates pod `name` on [`NODE`] as `service_account` and writes a token bound to it for
    /// `audiences` into a file; returns the pod and the file.
    pub(crate) fn pod_with_token(
        &self,
        name: &str,
        service_account: &str,
        audiences: &[&str],
    ) -> (Value, PathBuf) {
        let pod = self.cluster.create_pod(
            AGENT_NAMESPACE,
            name,
            service_account,
            NODE,
            &[("app", "spire-agent")],
        );
        let token =
            self.cluster
                .request_token(AGENT_NAMESPACE, service_account, audiences, Some(&pod));
        let path = self.dir.join(format!("{name}.token"));
        std::fs::write(&path, token).expect("writing the token");
        (pod, path)
    }

    /// A Lanyard agent's config for k8s_psat with the token at `token_path`.
    pub(crate) fn agent_toml(token_path: &Path) -> String {
        format!(
            "[node_attestor.k8s_psat]\ncluster = {}\ntoken_path = {}\n",
            toml_string(CLUSTER),
            toml_string(token_path.to_str().expect("UTF-8 path"))
        )
    }

    /// Runs a Lanyard agent with the token at `token_path`, expects it to give up, and
    /// returns its log.
    pub(crate) fn refused_agent(&self, name: &str, token_path: &Path) -> String {
        let mut agent = Agent::configure(
            &self.dir.join(name),
            &self.server,
            None,
            &Self::agent_toml(token_path),
        );
        agent.launch();
        let status = agent.process().wait_for_exit(Duration::from_secs(90));
        assert!(
            !status.success(),
            "agent {name} attested\n{}",
            agent.log_tail()
        );
        agent.process().log()
    }
}

/// `lanyard agent show` of `agent_id`: its selectors as `type:value`, sorted.
pub(crate) fn agent_selectors(server: &Server, agent_id: &str) -> Vec<String> {
    let shown = server.cli_json(&["agent", "show", "--spiffe-id", agent_id]);
    let mut selectors: Vec<String> = shown["selectors"]
        .as_array()
        .unwrap_or_else(|| panic!("no selectors in {shown}"))
        .iter()
        .map(|s| match s {
            Value::String(s) => s.clone(),
            other => format!(
                "{}:{}",
                other["type"].as_str().unwrap_or_default(),
                other["value"].as_str().unwrap_or_default()
            ),
        })
        .collect();
    selectors.sort();
    selectors
}

#[test]
fn k8s_psat_lanyard_agent_attests_from_its_pod_and_bad_tokens_are_refused_with_their_reason() {
    let Some(mut bed) = Testbed::start(
        "k8s_psat_lanyard_agent_attests_from_its_pod_and_bad_tokens_are_refused_with_their_reason",
        "",
    ) else {
        return;
    };
    let agent_id = bed.agent_id();
    let workload_id = spiffe_id("/e2e/k8s-psat/workload");
    bed.server.create_entry(
        &workload_id,
        &agent_id,
        &[&uid_selector(current_uid())],
        &[],
    );

    // Attested from its pod: SPIRE's ID and selectors, and its workload is served.
    let (pod, token_path) =
        bed.pod_with_token("spire-agent-0", AGENT_SERVICE_ACCOUNT, &["spire-server"]);
    let mut agent = Agent::start_with(
        &bed.dir.join("agent"),
        &bed.server,
        None,
        &Testbed::agent_toml(&token_path),
    );
    agent.wait_for_svids(None, &[&workload_id]);
    assert!(
        bed.server.agent_ids().contains(&agent_id),
        "{agent_id} is not among {:?}",
        bed.server.agent_ids()
    );
    let pod_uid = pod["metadata"]["uid"].as_str().expect("pod uid");
    let mut expected = vec![
        format!("k8s_psat:cluster:{CLUSTER}"),
        format!("k8s_psat:agent_ns:{AGENT_NAMESPACE}"),
        format!("k8s_psat:agent_sa:{AGENT_SERVICE_ACCOUNT}"),
        "k8s_psat:agent_pod_name:spire-agent-0".to_owned(),
        format!("k8s_psat:agent_pod_uid:{pod_uid}"),
        format!("k8s_psat:agent_node_name:{NODE}"),
        format!("k8s_psat:agent_node_uid:{}", bed.node_uid),
        "k8s_psat:agent_node_label:topology.kubernetes.io/zone:zone-a".to_owned(),
        "k8s_psat:agent_pod_label:app:spire-agent".to_owned(),
    ];
    expected.sort();
    assert_eq!(agent_selectors(&bed.server, &agent_id), expected);
    let listed = bed.server.cli_json(&["agent", "list"]);
    assert!(listed.to_string().contains("k8s_psat"), "{listed}");

    // Another agent pod on the same node, later: the same agent ID, attested again.
    agent.stop();
    let (_, second_token) =
        bed.pod_with_token("spire-agent-1", AGENT_SERVICE_ACCOUNT, &["spire-server"]);
    let second = Agent::start_with(
        &bed.dir.join("agent-again"),
        &bed.server,
        None,
        &Testbed::agent_toml(&second_token),
    );
    second.wait_for_svids(None, &[&workload_id]);
    assert_eq!(bed.server.agent_ids(), std::slice::from_ref(&agent_id));
    assert!(
        agent_selectors(&bed.server, &agent_id)
            .contains(&"k8s_psat:agent_pod_name:spire-agent-1".to_owned())
    );
    drop(second);

    // Refusals, each with its reason.
    let (_, other_audience) =
        bed.pod_with_token("spire-agent-2", AGENT_SERVICE_ACCOUNT, &["someone-else"]);
    let log = bed.refused_agent("wrong-audience", &other_audience);
    assert!(log.contains("is invalid for the target audiences"), "{log}");

    let (_, intruder) = bed.pod_with_token("intruder-0", "intruder", &["spire-server"]);
    let log = bed.refused_agent("unlisted", &intruder);
    // The log may escape the quotes; the names and the reason are what matter.
    let unescaped = log.replace("\\\"", "\"");
    assert!(
        unescaped.contains(&format!(
            "\"{AGENT_NAMESPACE}:intruder\" is not an allowed service account for cluster \"{CLUSTER}\""
        )),
        "{log}"
    );

    let (_, doomed) = bed.pod_with_token("spire-agent-3", AGENT_SERVICE_ACCOUNT, &["spire-server"]);
    bed.cluster.delete_pod(AGENT_NAMESPACE, "spire-agent-3");
    let log = bed.refused_agent("deleted-pod", &doomed);
    assert!(log.contains("has been invalidated"), "{log}");
    assert!(log.contains("no longer exists"), "{log}");

    // The tokens are credentials: the server never logs them.
    let server_log = bed.server.process().log();
    for token in [
        &token_path,
        &second_token,
        &other_audience,
        &intruder,
        &doomed,
    ] {
        let token = std::fs::read_to_string(token).expect("token");
        assert!(
            !server_log.contains(token.trim()),
            "the server logged a token"
        );
    }
}

#[test]
fn k8s_psat_spire_agent_attests_to_the_lanyard_server_and_serves_its_workload() {
    if spire_or_skip("k8s_psat_spire_agent_attests_to_the_lanyard_server_and_serves_its_workload")
        .is_none()
    {
        return;
    }
    // A short agent SVID, so that spire-agent re-attests (k8s_psat is re-attestable) while
    // the test runs.
    let Some(bed) = Testbed::start(
        "k8s_psat_spire_agent_attests_to_the_lanyard_server_and_serves_its_workload",
        "agent_ttl = \"20s\"",
    ) else {
        return;
    };
    let agent_id = bed.agent_id();
    let workload_id = spiffe_id("/e2e/k8s-psat/spire-agent-workload");
    bed.server.create_entry(
        &workload_id,
        &agent_id,
        &[&uid_selector(current_uid())],
        &[],
    );
    let (_, token_path) =
        bed.pod_with_token("spire-agent-0", AGENT_SERVICE_ACCOUNT, &["spire-server"]);
    let mut agent = SpireAgent::start_with(
        &bed.dir.join("spire-agent"),
        &bed.server.address(),
        &bed.server.bundle_pem(),
        SpireAttestation::K8sPsat {
            cluster: CLUSTER,
            token_path: &token_path,
        },
    );
    let svid = agent.wait_for_x509(&workload_id);
    verify_svid_chain(
        &svid.chain,
        &trust_domain(),
        &bed.server.bundle_der(),
        SystemTime::now(),
    )
    .unwrap_or_else(|e| panic!("the SVID does not verify: {e}\n{}", agent.log_tail()));
    assert!(
        bed.server.agent_ids().contains(&agent_id),
        "{agent_id} is not among {:?}",
        bed.server.agent_ids()
    );
    let shown = bed
        .server
        .cli_json(&["agent", "show", "--spiffe-id", &agent_id]);
    assert_eq!(shown["attestation_type"], "k8s_psat", "{shown}");
    assert_eq!(shown["can_reattest"], true, "{shown}");
    assert!(
        agent_selectors(&bed.server, &agent_id)
            .contains(&format!("k8s_psat:agent_node_uid:{}", bed.node_uid))
    );

    // At half its SVID's life it attests again with its token (AttestAgent, not RenewAgent):
    // a new serial under the same ID, and its workload is still served.
    let first_serial = agent_serial(&bed.server, &agent_id);
    poll("spire-agent to re-attest", SPIRE_TIMEOUT, || {
        agent.process().assert_running();
        if agent
            .process()
            .log()
            .contains("Successfully reattested node")
        {
            Ok(())
        } else {
            Err(agent.log_tail())
        }
    });
    assert_ne!(agent_serial(&bed.server, &agent_id), first_serial);
    assert_eq!(bed.server.agent_ids(), std::slice::from_ref(&agent_id));
    agent.wait_for_x509(&workload_id);
}
