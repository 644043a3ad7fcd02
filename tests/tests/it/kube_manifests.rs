//! The manifests under `deploy/kubernetes/` against a real API server: every object passes a
//! server-side dry run with strict field validation (schema checked by Kubernetes itself), the
//! kustomization names every file, and once applied, the RBAC grants the server and the agent
//! exactly what they need (checked with SubjectAccessReview).

use std::path::PathBuf;

use lanyard_e2e::kube::{KubeCluster, yaml_documents, yaml_identity};
use lanyard_e2e::workspace_root;
use serde_json::json;

const NAMESPACE: &str = "lanyard";

fn manifests_dir() -> PathBuf {
    workspace_root().join("deploy/kubernetes")
}

/// The files the kustomization lists, in its order.
fn kustomization_resources() -> Vec<String> {
    let text = std::fs::read_to_string(manifests_dir().join("kustomization.yaml")).unwrap();
    let mut resources = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("resources:") {
            inside = true;
        } else if inside {
            match line.trim_start().strip_prefix("- ") {
                Some(file) if line.starts_with("  ") => resources.push(file.trim().to_owned()),
                _ => inside = false,
            }
        }
    }
    resources
}

/// The YAML documents of a manifest file under `deploy/kubernetes/`.
fn documents(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(manifests_dir().join(file))
        .unwrap_or_else(|e| panic!("reading deploy/kubernetes/{file}: {e}"));
    yaml_documents(&text)
}

/// Whether the API server allows `user` to `verb` `resource` (with `subresource`).
fn allowed(cluster: &KubeCluster, user: &str, verb: &str, group: &str, resource: &str) -> bool {
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let review = cluster.admin().post(
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        &json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{NAMESPACE}")],
                "resourceAttributes": {
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                    "subresource": subresource,
                },
            },
        }),
    );
    review["status"]["allowed"] == true
}

#[test]
fn kube_manifests_pass_a_strict_dry_run_and_grant_what_the_pods_need() {
    // Every manifest file is in the kustomization, and every listed file exists.
    let mut listed = kustomization_resources();
    let mut present: Vec<String> = std::fs::read_dir(manifests_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    listed.sort();
    present.sort();
    assert_eq!(
        listed, present,
        "kustomization.yaml resources vs deploy/kubernetes/*.yaml"
    );

    let Some(cluster) = KubeCluster::start_or_skip(
        "kube_manifests_pass_a_strict_dry_run_and_grant_what_the_pods_need",
    ) else {
        return;
    };
    // The namespace for real (a dry run of objects inside it needs it), then every object as a
    // dry run: Kubernetes checks the schema and refuses unknown fields.
    let mut failures = Vec::new();
    let mut count = 0;
    for file in kustomization_resources() {
        for doc in documents(&file) {
            let real = yaml_identity(&doc)["kind"] == "Namespace";
            count += 1;
            if let Err(error) = cluster.apply_yaml(&doc, !real) {
                failures.push(format!("{file}: {error}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "refused by the API server:\n{}",
        failures.join("\n")
    );
    assert!(count >= 12, "only {count} objects in the manifests");

    // The dry run proves nothing about a typo in a subject or a role name: apply the RBAC for
    // real and ask the API server what each service account may do.
    for file in ["server-rbac.yaml", "agent-rbac.yaml"] {
        for doc in documents(file) {
            cluster.apply_yaml(&doc, false).unwrap();
        }
    }
    let server = format!("system:serviceaccount:{NAMESPACE}:lanyard-server");
    let agent = format!("system:serviceaccount:{NAMESPACE}:lanyard-agent");
    for (user, verb, group, resource, expected) in [
        (
            &server,
            "create",
            "authentication.k8s.io",
            "tokenreviews",
            true,
        ),
        (&server, "get", "", "pods", true),
        (&server, "get", "", "nodes", true),
        (&server, "list", "", "secrets", false),
        // spire-controller-manager, in the server's pod.
        (
            &server,
            "watch",
            "spire.spiffe.io",
            "clusterspiffeids",
            true,
        ),
        (
            &server,
            "list",
            "spire.spiffe.io",
            "clusterstaticentries",
            true,
        ),
        (
            &server,
            "update",
            "spire.spiffe.io",
            "clusterspiffeids/status",
            true,
        ),
        (&server, "list", "", "pods", true),
        (&server, "watch", "", "namespaces", true),
        (&server, "list", "", "endpoints", true),
        (
            &server,
            "delete",
            "spire.spiffe.io",
            "clusterspiffeids",
            false,
        ),
        (&agent, "get", "", "nodes/pods", true),
        // The kubelet's exec and attach: never the agent's.
        (&agent, "get", "", "nodes/proxy", false),
        (&agent, "create", "", "nodes/proxy", false),
        (&agent, "get", "", "pods", true),
        (
            &agent,
            "create",
            "authentication.k8s.io",
            "tokenreviews",
            false,
        ),
    ] {
        assert_eq!(
            allowed(&cluster, user, verb, group, resource),
            expected,
            "{user} {verb} {group}/{resource}"
        );
    }
}

#[test]
fn kube_manifest_examples_pass_a_strict_dry_run_with_the_controller_manager_crds() {
    let Some(cluster) = KubeCluster::start_or_skip(
        "kube_manifest_examples_pass_a_strict_dry_run_with_the_controller_manager_crds",
    ) else {
        return;
    };
    for crd in &lanyard_e2e::toolchain::controller_manager().crds {
        cluster.apply_yaml_file(crd);
    }
    let examples = manifests_dir().join("examples");
    let mut count = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in yaml_documents(&text) {
            count += 1;
            if let Err(error) = cluster.apply_yaml(&doc, true) {
                panic!("{}: {error}", path.display());
            }
        }
    }
    assert!(count >= 1, "no examples in {}", examples.display());
    // The schema is enforced: a misspelt field is refused, so the pass above means something.
    let misspelt = "apiVersion: spire.spiffe.io/v1alpha1\nkind: ClusterSPIFFEID\nmetadata:\n  name: bad\nspec:\n  spiffeIdTemplate: x\n";
    let refused = cluster.apply_yaml(misspelt, true).unwrap_err();
    assert!(refused.contains("spiffeIdTemplate"), "{refused}");
}
