//! The Kubernetes testbed itself: a real API server (built from the Go module proxy) issues
//! bound service-account tokens and reviews them with real RBAC, which is what `k8s_psat`
//! node attestation relies on.

use lanyard_e2e::kube::{KubeCluster, SERVICE_ACCOUNT_ISSUER};
use lanyard_e2e::poll;
use lanyard_e2e::toolchain::KUBERNETES_VERSION;
use serde_json::json;

const NAMESPACE: &str = "workloads";
const SERVICE_ACCOUNT: &str = "workload";
const NODE: &str = "node-1";
const POD: &str = "workload-0";
const AUDIENCE: &str = "spire-server";

/// The namespace of the service account a Lanyard server would review tokens as.
const SERVER_NAMESPACE: &str = "lanyard";

#[test]
fn kube_bound_pod_tokens_pass_token_review_for_their_audience_until_the_pod_is_deleted() {
    let Some(cluster) = KubeCluster::start_or_skip(
        "kube_bound_pod_tokens_pass_token_review_for_their_audience_until_the_pod_is_deleted",
    ) else {
        return;
    };
    assert_eq!(cluster.get("/version")["gitVersion"], KUBERNETES_VERSION);

    cluster.create_namespace(NAMESPACE);
    cluster.create_service_account(NAMESPACE, SERVICE_ACCOUNT);
    let node = cluster.create_node(NODE, &[("topology.kubernetes.io/zone", "zone-a")]);
    let pod = cluster.create_pod(
        NAMESPACE,
        POD,
        SERVICE_ACCOUNT,
        NODE,
        &[("app", "workload")],
    );
    assert_eq!(pod["spec"]["nodeName"], NODE);
    assert_eq!(pod["metadata"]["labels"]["app"], "workload");

    cluster.create_namespace(SERVER_NAMESPACE);
    cluster.create_service_account(SERVER_NAMESPACE, "server");
    cluster.bind_cluster_role("system:auth-delegator", SERVER_NAMESPACE, "server");
    let server_token = cluster.request_token(SERVER_NAMESPACE, "server", &[], None);
    let server = cluster.client_with_token(&server_token);

    let token = cluster.request_token(NAMESPACE, SERVICE_ACCOUNT, &[AUDIENCE], Some(&pod));
    let review = server.token_review(&token, &[AUDIENCE]).json();
    let status = &review["status"];
    assert_eq!(status["authenticated"], true, "{review}");
    assert_eq!(status["audiences"], json!([AUDIENCE]), "{review}");
    let user = &status["user"];
    assert_eq!(
        user["username"],
        format!("system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"),
        "{review}"
    );
    let extra = &user["extra"];
    for (key, expected) in [
        ("pod-name", &pod["metadata"]["name"]),
        ("pod-uid", &pod["metadata"]["uid"]),
        ("node-name", &node["metadata"]["name"]),
        ("node-uid", &node["metadata"]["uid"]),
    ] {
        assert_eq!(
            extra[format!("authentication.kubernetes.io/{key}")],
            json!([expected]),
            "{key} in {review}"
        );
    }

    // The audience is checked: a token for the SPIRE server is nobody else's.
    let review = server.token_review(&token, &["someone-else"]).json();
    assert_refused(&review, "is invalid for the target audiences");
    let review = server.token_review(&token, &[]).json();
    assert_refused(&review, SERVICE_ACCOUNT_ISSUER);

    // The token dies with its pod.
    cluster.delete_pod(NAMESPACE, POD);
    let review = poll(
        "the deleted pod's token to be refused",
        lanyard_e2e::TIMEOUT,
        || {
            let review = server.token_review(&token, &[AUDIENCE]).json();
            match review["status"]["authenticated"].as_bool() {
                Some(true) => Err(review.to_string()),
                _ => Ok(review),
            }
        },
    );
    assert_refused(&review, "has been invalidated");
}

/// Asserts that a TokenReview refused its token (`authenticated` is then left out) with an
/// error that mentions `reason`.
#[track_caller]
fn assert_refused(review: &serde_json::Value, reason: &str) {
    let status = &review["status"];
    assert_ne!(status["authenticated"], true, "{review}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(reason),
        "expected an error naming {reason:?}: {review}"
    );
}

#[test]
fn kube_token_review_needs_system_auth_delegator() {
    let Some(cluster) = KubeCluster::start_or_skip("kube_token_review_needs_system_auth_delegator")
    else {
        return;
    };
    cluster.create_namespace(SERVER_NAMESPACE);
    cluster.create_service_account(SERVER_NAMESPACE, "without-rights");
    cluster.create_service_account(SERVER_NAMESPACE, "delegator");
    cluster.bind_cluster_role("system:auth-delegator", SERVER_NAMESPACE, "delegator");

    // Any token to review: the reviewers' own, for the API server's audience.
    let token = cluster.request_token(SERVER_NAMESPACE, "without-rights", &[], None);
    let without_rights = cluster.client_with_token(&token);
    let response = without_rights.token_review(&token, &[]);
    assert_eq!(response.status, 403, "{response}");
    assert_eq!(response.any_json()["reason"], "Forbidden", "{response}");

    let delegator =
        cluster.client_with_token(&cluster.request_token(SERVER_NAMESPACE, "delegator", &[], None));
    let review = delegator.token_review(&token, &[]).json();
    assert_eq!(review["status"]["authenticated"], true, "{review}");
    assert_eq!(
        review["status"]["user"]["username"],
        format!("system:serviceaccount:{SERVER_NAMESPACE}:without-rights")
    );

    // A dry run validates without storing; an invalid object is refused with the reason.
    let binding = |role: &str| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "dry-run"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "x", "namespace": SERVER_NAMESPACE}],
        })
    };
    let response = cluster.apply_dry_run(&binding("system:auth-delegator"));
    assert!(response.is_success(), "{response}");
    let stored = cluster.admin().request(
        "GET",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/dry-run",
        None,
        None,
    );
    assert_eq!(stored.status, 404, "a dry run stored its object: {stored}");
    let response = cluster.apply_dry_run(&binding(""));
    assert_eq!(response.status, 422, "{response}");
}
