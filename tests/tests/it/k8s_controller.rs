//! SPIRE's own `spire-controller-manager` against a Lanyard server and a real API server, as
//! `deploy/kubernetes/` runs it: its config from the ConfigMap there, its cluster rights from
//! the server's RBAC there, writing through the admin socket the server keeps for it, under the
//! baseline policy. A `ClusterSPIFFEID` makes an entry for each matching pod (parented to its
//! node's k8s_psat agent, selecting the pod by UID) that carries the socket's owner and reason,
//! a `ClusterStaticEntry` makes its entry, a `ClusterFederatedTrustDomain` a federation
//! relationship, deleting the pod deletes its entry, and entries that are not the
//! controller's are left alone.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use lanyard_core::x509::verify_svid_chain;
use lanyard_e2e::controller_manager::RunningControllerManager;
use lanyard_e2e::kubelet::{FakeKubelet, PodCgroup, running_pod};
use lanyard_e2e::spire::{SPIRE_TIMEOUT, SpireAgent, SpireAttestation, spire_or_skip};
use lanyard_e2e::{
    Agent, CliOutput, TestDir, current_uid, parse_fetch, poll, spiffe_id, toml_string,
    trust_domain, uid_selector, workspace_root,
};
use serde_json::{Value, json};

use crate::k8s_psat::{
    AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, CLUSTER, NODE, SERVER_NAMESPACE, Testbed,
};

/// The namespace of the workloads the controller registers.
const WORKLOAD_NAMESPACE: &str = "apps";

/// The ID prefix of the controller's entries (`entryIDPrefix` in the ConfigMap).
const ENTRY_ID_PREFIX: &str = "demo.";

/// How long the controller may take to reconcile a change: it watches pods and resources,
/// and reconciles at least every 10 s besides.
const RECONCILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The owner and reason the server gives what the controller creates.
const OWNER: &str = "platform-team";
const REASON: &str = "kept by spire-controller-manager";

/// A file of `deploy/kubernetes/`.
fn manifest(file: &str) -> PathBuf {
    workspace_root().join("deploy/kubernetes").join(file)
}

/// The block under `key: |` of a ConfigMap of ours (its lines indented four spaces).
fn embedded(path: &Path, key: &str) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut lines = text
        .lines()
        .skip_while(|line| line.trim() != format!("{key}: |"));
    assert!(lines.next().is_some(), "no {key} in {}", path.display());
    lines
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A controller manager and the server it writes to, in a cluster with the server's testbed.
struct ControllerBed {
    bed: Testbed,
    controller: RunningControllerManager,
    _sockets: TestDir,
}

impl ControllerBed {
    /// `extra_toml`: more top-level keys of the server's config.
    fn start(test: &str, extra_toml: &str) -> Option<Self> {
        let sockets = TestDir::new();
        let controller_socket = sockets.join("controller").join("api.sock");
        let baseline = workspace_root().join("deploy/policy/baseline.rego");
        let bed = Testbed::start(
            test,
            &format!(
                "{extra_toml}\n\
                 [[admin_socket]]\n\
                 name = \"spire-controller-manager\"\n\
                 path = {}\n\
                 owner = {}\n\
                 reason = {}\n\
                 [policy]\n\
                 path = {}\n",
                toml_string(controller_socket.to_str().expect("UTF-8 path")),
                toml_string(OWNER),
                toml_string(REASON),
                toml_string(baseline.to_str().expect("UTF-8 path")),
            ),
        )?;

        // The controller's rights are the server's service account's, from the manifests.
        let rbac = manifest("server-rbac.yaml");
        bed.cluster.apply_yaml_file(&rbac);
        let token = bed
            .cluster
            .request_token(SERVER_NAMESPACE, "lanyard-server", &[], None);
        let kubeconfig = bed.dir.join("controller-kubeconfig");
        bed.cluster.write_kubeconfig(&kubeconfig, &token);

        // Its configuration is the ConfigMap's, with the socket where this server has it.
        let config = embedded(
            &manifest("controller-manager-config.yaml"),
            "controller-manager.yaml",
        );
        let shipped_socket = "/run/lanyard/controller/api.sock";
        assert!(config.contains(shipped_socket), "{config}");
        let config = config.replace(
            shipped_socket,
            controller_socket.to_str().expect("UTF-8 path"),
        );
        assert!(
            config.contains(&format!("clusterName: {CLUSTER}")),
            "{config}"
        );
        let controller = RunningControllerManager::start(&bed.cluster, &kubeconfig, &config);
        Some(Self {
            bed,
            controller,
            _sockets: sockets,
        })
    }

    /// The entries with `spiffe_id`, as `lanyard entry show --output json` gives them.
    fn entries(&self, spiffe_id: &str) -> Vec<Value> {
        let shown = self
            .bed
            .server
            .cli_json(&["entry", "show", "--spiffe-id", spiffe_id]);
        shown["entries"]
            .as_array()
            .or_else(|| shown.as_array())
            .cloned()
            .unwrap_or_default()
    }

    /// Waits for the one entry with `spiffe_id`.
    fn wait_for_entry(&mut self, spiffe_id: &str) -> Value {
        poll(
            &format!("spire-controller-manager to register {spiffe_id}"),
            RECONCILE_TIMEOUT,
            || {
                self.controller.process().assert_running();
                match self.entries(spiffe_id).as_slice() {
                    [entry] => Ok(entry.clone()),
                    other => Err(format!("{other:?}\n{}", self.controller.log_tail())),
                }
            },
        )
    }
}

/// A SPIFFE ID as `lanyard ... --output json` gives it (`{"trust_domain", "path"}`), as text.
fn id_text(id: &Value) -> String {
    format!(
        "spiffe://{}{}",
        id["trust_domain"].as_str().unwrap_or_default(),
        id["path"].as_str().unwrap_or_default()
    )
}

fn selectors_of(entry: &Value) -> Vec<String> {
    let mut selectors: Vec<String> = entry["selectors"]
        .as_array()
        .unwrap_or_else(|| panic!("no selectors in {entry}"))
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
fn k8s_controller_manager_registers_pods_and_static_entries_under_the_baseline() {
    let Some(mut cb) = ControllerBed::start(
        "k8s_controller_manager_registers_pods_and_static_entries_under_the_baseline",
        "",
    ) else {
        return;
    };
    let agent_id = cb.bed.agent_id();

    // An entry made by hand, with its own metadata: not the controller's to delete.
    let hand_id = spiffe_id("/hand/made");
    let in_thirty_days = (std::time::SystemTime::now()
        + std::time::Duration::from_secs(30 * 86_400))
    .duration_since(std::time::UNIX_EPOCH)
    .expect("after 1970")
    .as_secs()
    .to_string();
    let hand_entry = cb.bed.server.create_entry(
        &hand_id,
        &agent_id,
        &["unix:uid:4242"],
        &[
            "--owner",
            "web-team",
            "--reason",
            "made by hand",
            "--expires-at",
            &in_thirty_days,
        ],
    );

    // A ClusterSPIFFEID and a pod it selects, scheduled on the agent's node.
    cb.bed.cluster.create_namespace(WORKLOAD_NAMESPACE);
    cb.bed
        .cluster
        .create_service_account(WORKLOAD_NAMESPACE, "web");
    cb.bed.cluster.apply(&json!({
        "apiVersion": "spire.spiffe.io/v1alpha1",
        "kind": "ClusterSPIFFEID",
        "metadata": {"name": "web"},
        "spec": {
            "spiffeIDTemplate":
                "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}",
            "podSelector": {"matchLabels": {"app": "web"}},
            "workloadSelectorTemplates": ["k8s:ns:{{ .PodMeta.Namespace }}"],
            "ttl": "1h",
        },
    }));
    let pod =
        cb.bed
            .cluster
            .create_pod(WORKLOAD_NAMESPACE, "web-1", "web", NODE, &[("app", "web")]);
    let pod_uid = pod["metadata"]["uid"].as_str().expect("pod uid").to_owned();

    let web_id = spiffe_id(&format!("/ns/{WORKLOAD_NAMESPACE}/sa/web"));
    let entry = cb.wait_for_entry(&web_id);
    let entry_id = entry["id"].as_str().expect("entry id").to_owned();
    assert!(entry_id.starts_with(ENTRY_ID_PREFIX), "{entry}");
    assert_eq!(id_text(&entry["parent_id"]), agent_id, "{entry}");
    assert_eq!(
        selectors_of(&entry),
        [
            format!("k8s:ns:{WORKLOAD_NAMESPACE}"),
            format!("k8s:pod-uid:{pod_uid}")
        ],
        "{entry}"
    );
    assert_eq!(entry["x509_svid_ttl"].as_i64(), Some(3600), "{entry}");
    // Attributed to the controller's socket, so the baseline let it in without an expiry.
    assert_eq!(entry["owner"].as_str(), Some(OWNER), "{entry}");
    assert_eq!(entry["reason"].as_str(), Some(REASON), "{entry}");
    assert_eq!(
        entry["source"].as_str(),
        Some("spire-controller-manager"),
        "{entry}"
    );

    // Its status counts the entry as set, with no failures.
    let status = poll("the ClusterSPIFFEID's status", RECONCILE_TIMEOUT, || {
        let web = cb
            .bed
            .cluster
            .get("/apis/spire.spiffe.io/v1alpha1/clusterspiffeids/web");
        let stats = &web["status"]["stats"];
        if stats["entriesToSet"] == 1 {
            Ok(stats.clone())
        } else {
            Err(web.to_string())
        }
    });
    assert_eq!(status["podsSelected"], 1, "{status}");
    assert!(
        status["entryFailures"].as_i64().unwrap_or(0) == 0,
        "{status}"
    );

    // A ClusterStaticEntry becomes an entry as written.
    let static_id = spiffe_id("/static/db");
    cb.bed.cluster.apply(&json!({
        "apiVersion": "spire.spiffe.io/v1alpha1",
        "kind": "ClusterStaticEntry",
        "metadata": {"name": "db"},
        "spec": {
            "spiffeID": static_id,
            "parentID": agent_id,
            "selectors": ["unix:uid:5432"],
        },
    }));
    let static_entry = cb.wait_for_entry(&static_id);
    assert!(
        static_entry["id"]
            .as_str()
            .is_some_and(|id| id.starts_with(ENTRY_ID_PREFIX)),
        "{static_entry}"
    );
    assert_eq!(selectors_of(&static_entry), ["unix:uid:5432"]);

    // A ClusterFederatedTrustDomain becomes a federation relationship (SPIRE's TrustDomain
    // API), and goes with the resource.
    cb.bed.cluster.apply(&json!({
        "apiVersion": "spire.spiffe.io/v1alpha1",
        "kind": "ClusterFederatedTrustDomain",
        "metadata": {"name": "partner"},
        "spec": {
            "trustDomain": "partner.example",
            "bundleEndpointURL": "https://partner.example:8443",
            "bundleEndpointProfile": {
                "type": "https_spiffe",
                "endpointSPIFFEID": "spiffe://partner.example/spire/server",
            },
        },
    }));
    let relationship = poll(
        "spire-controller-manager to create the federation relationship",
        RECONCILE_TIMEOUT,
        || {
            let shown = cb
                .bed
                .server
                .cli(["federation", "list", "--output", "json"]);
            if shown.stdout.contains("partner.example") {
                Ok(shown.stdout)
            } else {
                Err(format!("{shown}\n{}", cb.controller.log_tail()))
            }
        },
    );
    assert!(
        relationship.contains("https://partner.example:8443")
            && relationship.contains("spiffe://partner.example/spire/server"),
        "{relationship}"
    );
    cb.bed.cluster.admin().request(
        "DELETE",
        "/apis/spire.spiffe.io/v1alpha1/clusterfederatedtrustdomains/partner",
        None,
        None,
    );
    poll(
        "spire-controller-manager to delete the federation relationship",
        RECONCILE_TIMEOUT,
        || {
            let shown = cb
                .bed
                .server
                .cli(["federation", "list", "--output", "json"]);
            if shown.success() && !shown.stdout.contains("partner.example") {
                Ok(())
            } else {
                Err(format!("{shown}"))
            }
        },
    );

    // The pod goes: so does its entry, and nothing else.
    cb.bed.cluster.delete_pod(WORKLOAD_NAMESPACE, "web-1");
    poll(
        "spire-controller-manager to delete the pod's entry",
        RECONCILE_TIMEOUT,
        || {
            if cb.entries(&web_id).is_empty() {
                Ok(())
            } else {
                Err(cb.controller.log_tail())
            }
        },
    );
    assert_eq!(cb.entries(&static_id).len(), 1);
    let hand = cb.entries(&hand_id);
    assert_eq!(hand.len(), 1, "the hand-made entry survives");
    assert_eq!(hand[0]["id"].as_str(), Some(hand_entry.as_str()));

    // Nothing the controller asked of the entry API failed, its probe of the server's
    // supported fields (an entry that is its own parent) included.
    let log = cb.controller.process().log();
    let entry_errors: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("ERROR") && line.contains("entry-reconciler"))
        .collect();
    assert!(entry_errors.is_empty(), "{entry_errors:#?}");

    // The audit log names the program behind every change it made.
    let audit = std::fs::read_to_string(cb.bed.server.dir().join("data/audit.log"))
        .or_else(|_| std::fs::read_to_string(cb.bed.server.dir().join("audit.log")))
        .unwrap_or_default();
    assert!(
        audit.contains("via admin socket spire-controller-manager"),
        "the audit log names the controller's socket"
    );
}

/// The ClusterSPIFFEID `web`: pods labelled `app=web` get `…/ns/<ns>/sa/<sa>`, selected by
/// pod UID (always) and namespace.
fn apply_web_cluster_spiffeid(cb: &ControllerBed) {
    cb.bed.cluster.apply(&json!({
        "apiVersion": "spire.spiffe.io/v1alpha1",
        "kind": "ClusterSPIFFEID",
        "metadata": {"name": "web"},
        "spec": {
            "spiffeIDTemplate":
                "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}",
            "podSelector": {"matchLabels": {"app": "web"}},
            "workloadSelectorTemplates": ["k8s:ns:{{ .PodMeta.Namespace }}"],
            "ttl": "1h",
        },
    }));
}

/// The containerd ID of the web pod's container.
const WEB_CONTAINER_ID: &str = "4f1c2d3e5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d";

#[test]
fn k8s_end_to_end_a_pod_workload_gets_its_cluster_spiffeid_svid_and_a_deleted_agent_pod_cannot_reattest()
 {
    let test = "k8s_end_to_end_a_pod_workload_gets_its_cluster_spiffeid_svid_and_a_deleted_agent_pod_cannot_reattest";
    if spire_or_skip(test).is_none() {
        return;
    }
    // A short agent SVID: agents attested by k8s_psat attest again at half its life.
    let Some(mut cb) = ControllerBed::start(test, "agent_ttl = \"20s\"") else {
        return;
    };
    apply_web_cluster_spiffeid(&cb);

    // The workload's pod, scheduled on the Lanyard agent's node, and the entry the
    // controller makes for it.
    cb.bed.cluster.create_namespace(WORKLOAD_NAMESPACE);
    cb.bed
        .cluster
        .create_service_account(WORKLOAD_NAMESPACE, "web");
    let pod =
        cb.bed
            .cluster
            .create_pod(WORKLOAD_NAMESPACE, "web-1", "web", NODE, &[("app", "web")]);
    let pod_uid = pod["metadata"]["uid"].as_str().expect("pod uid").to_owned();
    let web_id = spiffe_id(&format!("/ns/{WORKLOAD_NAMESPACE}/sa/web"));
    cb.wait_for_entry(&web_id);

    // The node's kubelet lists the pod with its container running; the workload process is
    // in that container's cgroup.
    let kubelet = FakeKubelet::start(&cb.bed.dir.join("kubelet"));
    let listed = cb.bed.cluster.get(&format!(
        "/api/v1/namespaces/{WORKLOAD_NAMESPACE}/pods/web-1"
    ));
    kubelet.set_pods(vec![running_pod(&listed, WEB_CONTAINER_ID)]);
    let cgroup = PodCgroup::new(&pod_uid, WEB_CONTAINER_ID);

    // A Lanyard agent attested by k8s_psat from its own pod, attesting workloads by pod.
    let (_, agent_token) =
        cb.bed
            .pod_with_token("lanyard-agent-0", AGENT_SERVICE_ACCOUNT, &["spire-server"]);
    let mut agent = Agent::start_with(
        &cb.bed.dir.join("agent"),
        &cb.bed.server,
        None,
        &format!(
            "{}{}",
            Testbed::agent_toml(&agent_token),
            kubelet.agent_toml()
        ),
    );

    // The workload in the pod gets the SVID of the controller's entry.
    let svid = poll(
        "the pod's workload to get its SVID",
        RECONCILE_TIMEOUT,
        || {
            let mut fetch = agent.workload_command(None);
            fetch
                .args(["fetch", "x509", "--output", "json", "--socket"])
                .arg(agent.socket_path());
            let output = CliOutput::run(&mut cgroup.wrap(&fetch));
            match parse_fetch(output) {
                Ok(svids) => svids
                    .into_iter()
                    .find(|svid| svid.spiffe_id == web_id)
                    .ok_or_else(|| "no web SVID yet".to_owned()),
                Err(output) => Err(format!("{output}\n{}", agent.log_tail())),
            }
        },
    );
    verify_svid_chain(
        &svid.chain,
        &trust_domain(),
        &cb.bed.server.bundle_der(),
        SystemTime::now(),
    )
    .unwrap_or_else(|e| panic!("the SVID does not verify: {e}"));
    assert!(kubelet.requests() > 0, "the agent asked the kubelet");
    // The same program outside the pod gets nothing of the pod's.
    let outside = agent.fetch_x509().unwrap_or_default();
    assert!(
        outside.iter().all(|svid| svid.spiffe_id != web_id),
        "a process outside the pod got its SVID"
    );

    // spire-agent on another node, attested by k8s_psat from its own pod, serves an entry
    // the controller keeps from a ClusterStaticEntry under its agent ID.
    let node2 = cb.bed.cluster.create_node("node-2", &[]);
    let node2_agent = spiffe_id(&format!(
        "/spire/agent/k8s_psat/{CLUSTER}/{}",
        node2["metadata"]["uid"].as_str().expect("node uid")
    ));
    let spire_pod = cb.bed.cluster.create_pod(
        AGENT_NAMESPACE,
        "spire-agent-0",
        AGENT_SERVICE_ACCOUNT,
        "node-2",
        &[("app", "spire-agent")],
    );
    let spire_token_path = cb.bed.dir.join("spire-agent.token");
    std::fs::write(
        &spire_token_path,
        cb.bed.cluster.request_token(
            AGENT_NAMESPACE,
            AGENT_SERVICE_ACCOUNT,
            &["spire-server"],
            Some(&spire_pod),
        ),
    )
    .expect("writing the token");
    let static_id = spiffe_id("/static/node-2-tool");
    cb.bed.cluster.apply(&json!({
        "apiVersion": "spire.spiffe.io/v1alpha1",
        "kind": "ClusterStaticEntry",
        "metadata": {"name": "node-2-tool"},
        "spec": {
            "spiffeID": static_id,
            "parentID": node2_agent,
            "selectors": [uid_selector(current_uid())],
        },
    }));
    cb.wait_for_entry(&static_id);
    let mut spire_agent = SpireAgent::start_with(
        &cb.bed.dir.join("spire-agent"),
        &cb.bed.server.address(),
        &cb.bed.server.bundle_pem(),
        SpireAttestation::K8sPsat {
            cluster: CLUSTER,
            token_path: &spire_token_path,
        },
    );
    spire_agent.wait_for_x509(&static_id);
    assert!(cb.bed.server.agent_ids().contains(&node2_agent));

    // The Lanyard agent's pod is deleted: its token dies with it, and its next attestation
    // is refused, with the reason.
    cb.bed
        .cluster
        .delete_pod(AGENT_NAMESPACE, "lanyard-agent-0");
    poll(
        "the Lanyard agent's re-attestation to be refused",
        SPIRE_TIMEOUT,
        || {
            let log = agent.process().log();
            let refused = log.lines().any(|line| {
                line.contains("agent SVID rotation failed")
                    && (line.contains("invalidated") || line.contains("no longer exists"))
            });
            if refused {
                Ok(())
            } else {
                Err(agent.log_tail())
            }
        },
    );
    drop(cgroup);
}
