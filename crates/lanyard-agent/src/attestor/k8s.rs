//! SPIRE's `k8s` workload attestor: the caller's pod and container from its cgroups, then the
//! pod from the kubelet, as the selectors `k8s:ns`, `k8s:sa`, `k8s:pod-name`, `k8s:pod-uid`,
//! `k8s:node-name`, `k8s:pod-label:<key>:<value>`, `k8s:pod-owner:<kind>:<name>`,
//! `k8s:pod-owner-uid:<kind>:<uid>`, `k8s:pod-image:<image>` and `k8s:pod-init-image:<image>`
//! (the image and the image ID of every container, or init container, in the status),
//! `k8s:pod-image-count:<n>`, `k8s:pod-init-image-count:<n>`, and for the caller's own
//! container `k8s:container-name` and `k8s:container-image` (image and image ID).
//!
//! A process whose cgroups name no container gets no `k8s` selectors, and the kubelet is not
//! asked. A container the pod list does not show yet (it just started), or whose pod it no
//! longer shows, is looked for again every `poll_retry_interval` up to `max_poll_attempts`
//! times before attestation fails. The caller's PID is pinned by its start time across the
//! whole lookup, so a process that took over the PID meanwhile is refused.
//!
//! Lanyard differs from SPIRE in three places: it reads no mount table (the kernel's cgroup
//! file alone, which a workload cannot forge), it takes CRI-O's `conmon` monitor for the
//! host process it is, and it also finds ephemeral (debug) containers.

mod cgroup;
mod kubelet;
mod pods;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lanyard_core::{Selector, SelectorSet};

use self::kubelet::{KubeletClient, PodListFetcher, PodSource};
use self::pods::Lookup;
use super::{AttestError, CallerPin, PeerCredentials, WorkloadAttestor, read_proc_file};
use crate::config::{K8sAttestorConfig, KubeletEndpoint};

pub use self::kubelet::{KUBELET_REQUEST_TIMEOUT, MAX_POD_LIST_LEN};

/// The selector type the k8s attestor produces.
pub const K8S_SELECTOR_TYPE: &str = "k8s";

/// Why the k8s attestor cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum K8sSetupError {
    /// The kubelet cannot be asked with these settings (a file missing or unusable, a bad
    /// host name).
    #[error("workload_attestor.k8s: {0}")]
    Kubelet(String),
}

/// Why a caller in a pod could not be attested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum K8sAttestError {
    /// The cgroups place the process in two pods or two containers.
    #[error("{path}: {reason}")]
    CgroupConflict {
        /// The cgroup file.
        path: PathBuf,
        /// The two names found.
        reason: String,
    },
    /// The container did not show in the kubelet's pod list in time.
    #[error(
        "container {container_id} {missing} after {attempts} attempts over {elapsed:?}; no selectors found"
    )]
    NotFound {
        /// The container's runtime ID.
        container_id: String,
        /// What was missing at the last attempt.
        missing: String,
        /// How many pod lists were searched.
        attempts: u32,
        /// How long the search took.
        elapsed: Duration,
    },
    /// The kubelet gave no pod list at the last attempt.
    #[error("the kubelet's pod list is unavailable after {attempts} attempts: {last_error}")]
    Kubelet {
        /// How many times it was asked.
        attempts: u32,
        /// Its last failure.
        last_error: String,
    },
    /// Two pods in the list claim the container.
    #[error("two pods found with the same container ID {container_id}")]
    Ambiguous {
        /// The container's runtime ID.
        container_id: String,
    },
}

/// SPIRE's `k8s` workload attestor.
#[derive(Debug, Clone)]
pub struct K8sAttestor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    proc_root: PathBuf,
    max_poll_attempts: u32,
    disable_container_selectors: bool,
    fetcher: PodListFetcher,
}

impl K8sAttestor {
    /// An attestor with the agent's `[workload_attestor.k8s]` settings, reading `/proc` and
    /// the node name from the process environment.
    pub fn new(config: &K8sAttestorConfig) -> Result<Self, K8sSetupError> {
        Self::with_paths(config, PathBuf::from("/proc"), |name| {
            std::env::var(name).ok()
        })
    }

    /// An attestor reading process information under `proc_root`, and environment
    /// variables through `env`. Fails if the kubelet's CA or token cannot be read now.
    pub fn with_paths(
        config: &K8sAttestorConfig,
        proc_root: PathBuf,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, K8sSetupError> {
        let node_name = config.resolve_node_name(env);
        let endpoint = config.kubelet_endpoint(node_name.as_deref());
        let client = KubeletClient::new(
            endpoint.clone(),
            config.kubelet_ca_path.clone(),
            config.token_path.clone(),
        );
        client.check().map_err(K8sSetupError::Kubelet)?;
        match &endpoint {
            KubeletEndpoint::Secure {
                host,
                port,
                verification,
            } => tracing::info!(
                host,
                port,
                ?verification,
                node_name = node_name.as_deref(),
                "k8s workload attestor asks the kubelet over HTTPS"
            ),
            KubeletEndpoint::ReadOnly { port } => tracing::info!(
                port,
                "k8s workload attestor asks the kubelet's read-only port on 127.0.0.1"
            ),
        }
        Ok(Self::with_source(config, proc_root, Box::new(client)))
    }

    fn with_source(
        config: &K8sAttestorConfig,
        proc_root: PathBuf,
        source: Box<dyn PodSource>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                proc_root,
                max_poll_attempts: config.max_poll_attempts.max(1),
                disable_container_selectors: config.disable_container_selectors,
                fetcher: PodListFetcher::new(source, config.poll_retry_interval),
            }),
        }
    }
}

#[tonic::async_trait]
impl WorkloadAttestor for K8sAttestor {
    async fn attest(&self, peer: &PeerCredentials) -> Result<SelectorSet, AttestError> {
        let pid = peer.pid.ok_or(AttestError::NoPid)?;
        let process_dir = self.inner.proc_root.join(pid.to_string());
        let pin = CallerPin::checked_now(peer, &process_dir, pid)?;
        let cgroup_path = process_dir.join("cgroup");
        let placement = cgroup::placement(&read_proc_file(&cgroup_path, pid)?);
        let placement = match placement {
            Ok(placement) => placement,
            Err(cgroup::CgroupError::Malformed) => {
                return Err(AttestError::Malformed {
                    path: cgroup_path,
                    reason: "a line is not hierarchy-ID:controllers:path",
                });
            }
            Err(conflict) => {
                return Err(AttestError::Kubernetes(K8sAttestError::CgroupConflict {
                    path: cgroup_path,
                    reason: conflict.to_string(),
                }));
            }
        };
        let selectors = match placement {
            None => SelectorSet::new(),
            Some(placement) => self
                .inner
                .search(pid, &placement)
                .await
                .map_err(AttestError::Kubernetes)?,
        };
        // The kubelet may have been asked for seconds: the PID must still be the caller's.
        pin.check(&process_dir, pid)?;
        Ok(selectors)
    }
}

impl Inner {
    /// Searches the kubelet's pod lists for the container, up to `max_poll_attempts` lists.
    async fn search(
        &self,
        pid: i32,
        placement: &cgroup::Placement,
    ) -> Result<SelectorSet, K8sAttestError> {
        let container_id = placement.container_id.as_str();
        let pod_uid = placement.pod_uid.as_deref();
        let began = tokio::time::Instant::now();
        let mut seen = 0;
        let mut last_problem = None;
        let mut last_error = None;
        for attempt in 1..=self.max_poll_attempts {
            let fetched = self.fetcher.newer_than(seen).await;
            seen = fetched.version;
            match &fetched.pods {
                Ok(index) => {
                    last_error = None;
                    match pods::lookup(
                        index,
                        pod_uid,
                        container_id,
                        self.disable_container_selectors,
                    ) {
                        Lookup::Found(values) => {
                            tracing::debug!(pid, container_id, pod_uid, attempt, "pod found");
                            return Ok(selectors(&values));
                        }
                        Lookup::Ambiguous => {
                            tracing::warn!(container_id, "two pods found with one container ID");
                            return Err(K8sAttestError::Ambiguous {
                                container_id: container_id.to_owned(),
                            });
                        }
                        missing => last_problem = Some(missing),
                    }
                }
                Err(error) => {
                    tracing::debug!(attempt, %error, "the kubelet gave no pod list");
                    last_error = Some(error.clone());
                }
            }
            tracing::debug!(
                pid,
                container_id,
                pod_uid,
                attempt,
                "container not found yet"
            );
        }
        let attempts = self.max_poll_attempts;
        if let Some(last_error) = last_error {
            tracing::warn!(container_id, attempts, %last_error, "no pod list from the kubelet; giving up");
            return Err(K8sAttestError::Kubelet {
                attempts,
                last_error,
            });
        }
        let missing = match (last_problem, pod_uid) {
            (Some(Lookup::PodAbsent), Some(uid)) => {
                format!("not found: pod {uid} is not in the kubelet's pod list")
            }
            (_, Some(uid)) => format!("is not in the status of pod {uid}"),
            (_, None) => "is in no pod of the kubelet's pod list".to_owned(),
        };
        tracing::warn!(
            container_id,
            pod_uid,
            attempts,
            "container not found; giving up"
        );
        Err(K8sAttestError::NotFound {
            container_id: container_id.to_owned(),
            missing,
            attempts,
            elapsed: began.elapsed(),
        })
    }
}

fn selectors(values: &[String]) -> SelectorSet {
    let mut selectors = SelectorSet::new();
    for value in values {
        // A value no selector can hold (over-long, control characters) matches no entry
        // either; leaving it out never grants more than including it would.
        match Selector::new(K8S_SELECTOR_TYPE, value) {
            Ok(selector) => {
                selectors.insert(selector);
            }
            Err(error) => tracing::warn!(%error, "skipping unrepresentable k8s selector"),
        }
    }
    selectors
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::Value;

    use super::*;
    use crate::attestor::ProcessHandle;
    use crate::attestor::k8s::pods::PodIndex;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/k8s");

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(Path::new(FIXTURES).join(name)).unwrap()
    }

    /// Pod lists from a queue; the last one repeats.
    struct Script {
        answers: Mutex<Vec<Result<String, String>>>,
        calls: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl PodSource for Script {
        async fn pods(&self) -> Result<PodIndex, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut answers = self.answers.lock().unwrap();
            let answer = if answers.len() > 1 {
                answers.remove(0)
            } else {
                answers[0].clone()
            };
            PodIndex::parse(answer?.as_bytes())
        }
    }

    struct Process {
        _dir: tempfile::TempDir,
        proc_root: PathBuf,
    }

    const PID: i32 = 4242;

    fn process(cgroup: &str) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().to_owned();
        let process_dir = proc_root.join(PID.to_string());
        std::fs::create_dir_all(&process_dir).unwrap();
        std::fs::write(
            process_dir.join("stat"),
            format!("{PID} (app) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 555 0 0\n"),
        )
        .unwrap();
        std::fs::write(process_dir.join("cgroup"), cgroup).unwrap();
        Process {
            _dir: dir,
            proc_root,
        }
    }

    fn peer() -> PeerCredentials {
        PeerCredentials {
            pid: Some(PID),
            uid: 1000,
            gid: 1000,
            start_time: Some(555),
            process: None,
        }
    }

    fn attestor(
        process: &Process,
        config: &K8sAttestorConfig,
        answers: Vec<Result<String, String>>,
    ) -> (K8sAttestor, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let script = Script {
            answers: Mutex::new(answers),
            calls: Arc::clone(&calls),
        };
        let attestor =
            K8sAttestor::with_source(config, process.proc_root.clone(), Box::new(script));
        (attestor, calls)
    }

    /// The pod list as a node with another runtime reports it (`cri-o://…`, `docker://…`).
    fn pods_with_runtime(scheme: &str) -> String {
        let mut list: Value = serde_json::from_str(&fixture("pods.json")).unwrap();
        for pod in list["items"].as_array_mut().unwrap() {
            for kind in [
                "containerStatuses",
                "initContainerStatuses",
                "ephemeralContainerStatuses",
            ] {
                for status in pod["status"][kind].as_array_mut().into_iter().flatten() {
                    if let Some(id) = status["containerID"].as_str() {
                        let id = id.replace("containerd://", &format!("{scheme}://"));
                        status["containerID"] = id.into();
                    }
                }
            }
        }
        list.to_string()
    }

    /// The pod list once the batch pod's worker container has started.
    fn pods_with_worker_started() -> String {
        let mut list: Value = serde_json::from_str(&fixture("pods.json")).unwrap();
        let batch = list["items"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|pod| pod["metadata"]["name"] == "report-28473910-q8v4z")
            .unwrap();
        let worker = &mut batch["status"]["containerStatuses"][0];
        assert_eq!(worker["name"], "worker");
        assert!(worker.get("containerID").is_none(), "the fixture changed");
        worker["containerID"] =
            "containerd://5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f".into();
        list.to_string()
    }

    fn strings(selectors: &SelectorSet) -> Vec<String> {
        selectors.iter().map(ToString::to_string).collect()
    }

    /// The selectors of the `app` container of the web pod, as SPIRE gives them.
    const WEB_APP: &[&str] = &[
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
    ];

    #[tokio::test]
    async fn the_pod_and_container_of_each_cgroup_layout() {
        for (cgroup, runtime, container_name) in [
            ("cgroup-v1-cgroupfs-docker.txt", "docker", "app"),
            ("cgroup-v1-systemd-docker.txt", "docker", "app"),
            ("cgroup-v1-kind.txt", "containerd", "app"),
            ("cgroup-v2-containerd-systemd.txt", "containerd", "app"),
            ("cgroup-v2-containerd-namespaced.txt", "containerd", "app"),
            ("cgroup-v2-cgroupfs.txt", "containerd", "app"),
            ("cgroup-v2-crio-systemd.txt", "cri-o", "envoy"),
            ("cgroup-v2-crio-namespaced.txt", "cri-o", "envoy"),
        ] {
            let process = process(&fixture(cgroup));
            let config = K8sAttestorConfig::default();
            let (attestor, calls) =
                attestor(&process, &config, vec![Ok(pods_with_runtime(runtime))]);
            let selectors = strings(&attestor.attest(&peer()).await.unwrap());
            assert!(
                selectors.contains(&format!("k8s:container-name:{container_name}")),
                "{cgroup}: {selectors:?}"
            );
            assert!(
                selectors.contains(&"k8s:pod-uid:8e5f5a3c-2f4b-4a1d-9c6e-7b8a9d0c1e2f".into()),
                "{cgroup}: {selectors:?}"
            );
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{cgroup}");
            if container_name == "app" {
                assert_eq!(selectors, WEB_APP, "{cgroup}");
            }
        }
    }

    #[tokio::test]
    async fn a_process_in_no_pod_gets_nothing_and_the_kubelet_is_not_asked() {
        for cgroup in [
            fixture("cgroup-host-process.txt"),
            fixture("cgroup-v1-host-process.txt"),
            fixture("cgroup-v2-crio-conmon.txt"),
        ] {
            let process = process(&cgroup);
            let (attestor, calls) = attestor(
                &process,
                &K8sAttestorConfig::default(),
                vec![Err("must not be asked".into())],
            );
            assert!(
                attestor.attest(&peer()).await.unwrap().is_empty(),
                "{cgroup}"
            );
            assert_eq!(calls.load(Ordering::SeqCst), 0);
        }
    }

    #[tokio::test]
    async fn a_malformed_cgroup_file_fails_with_its_path() {
        let process = process(&fixture("cgroup-malformed.txt"));
        let (attestor, calls) = attestor(&process, &K8sAttestorConfig::default(), vec![]);
        let error = attestor.attest(&peer()).await.unwrap_err();
        assert!(
            matches!(&error, AttestError::Malformed { path, .. } if path.ends_with("cgroup")),
            "{error}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn init_and_ephemeral_containers_are_found_and_a_container_without_a_pod_too() {
        let web = "8e5f5a3c-2f4b-4a1d-9c6e-7b8a9d0c1e2f";
        let in_web_pod = |id: &str| {
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope\n",
                web.replace('-', "_")
            )
        };
        let cases = [
            (
                in_web_pod("1a7b3e9d5f2c8a4e6b0d1f3a5c7e9b2d4f6a8c0e1b3d5f7a9c2e4b6d8f0a1c3e"),
                "containerd",
                "k8s:container-name:migrate",
            ),
            (
                in_web_pod("e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3"),
                "containerd",
                "k8s:container-name:debugger-x7k2q",
            ),
            // CRI-O seen through a cgroup namespace names no pod: every pod is searched.
            (
                fixture("cgroup-v2-crio-namespaced.txt"),
                "cri-o",
                "k8s:container-name:envoy",
            ),
        ];
        for (cgroup, runtime, expected) in cases {
            let process = process(&cgroup);
            let (attestor, _) = attestor(
                &process,
                &K8sAttestorConfig::default(),
                vec![Ok(pods_with_runtime(runtime))],
            );
            let selectors = strings(&attestor.attest(&peer()).await.unwrap());
            assert!(selectors.contains(&expected.to_owned()), "{selectors:?}");
            assert!(
                selectors.contains(&format!("k8s:pod-uid:{web}")),
                "{selectors:?}"
            );
        }
    }

    fn quick() -> K8sAttestorConfig {
        K8sAttestorConfig {
            max_poll_attempts: 4,
            poll_retry_interval: Duration::from_millis(100),
            ..K8sAttestorConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_that_never_shows_fails_after_the_attempts() {
        // The batch pod's worker has not started: no container ID in its status.
        let process = process(&fixture("cgroup-v2-batch-worker.txt"));
        let (attestor, calls) = attestor(&process, &quick(), vec![Ok(fixture("pods.json"))]);
        let started = tokio::time::Instant::now();
        let error = attestor.attest(&peer()).await.unwrap_err().to_string();
        assert!(
            error.contains("is not in the status of pod 3d2c1b0a-9f8e-4d7c-8b6a-5f4e3d2c1b0a")
                && error.contains("after 4 attempts"),
            "{error}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_that_shows_on_the_third_list_is_attested() {
        let process = process(&fixture("cgroup-v2-batch-worker.txt"));
        let (attestor, calls) = attestor(
            &process,
            &quick(),
            vec![
                Ok(fixture("pods.json")),
                Err("the kubelet restarts".into()),
                Ok(pods_with_worker_started()),
            ],
        );
        let selectors = strings(&attestor.attest(&peer()).await.unwrap());
        assert!(
            selectors.contains(&"k8s:container-name:worker".to_owned()),
            "{selectors:?}"
        );
        assert!(
            selectors.contains(&"k8s:pod-owner:Job:report-28473910".to_owned()),
            "{selectors:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_absent_from_the_list_fails_and_says_so() {
        let process = process(&fixture("cgroup-v2-deleted-pod.txt"));
        let (attestor, calls) = attestor(&process, &quick(), vec![Ok(fixture("pods.json"))]);
        let error = attestor.attest(&peer()).await.unwrap_err().to_string();
        assert!(
            error.contains(
                "pod 77777777-6666-4555-8444-333333333333 is not in the kubelet's pod list"
            ),
            "{error}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_kubelet_that_never_answers_fails_with_its_last_error() {
        let process = process(&fixture("cgroup-v2-containerd-systemd.txt"));
        let (attestor, _) = attestor(&process, &quick(), vec![Err("connection refused".into())]);
        let error = attestor.attest(&peer()).await.unwrap_err().to_string();
        assert_eq!(
            error,
            "kubernetes: the kubelet's pod list is unavailable after 4 attempts: \
             connection refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_container_selectors_attest_a_known_pod_before_its_container_shows() {
        let config = K8sAttestorConfig {
            disable_container_selectors: true,
            ..quick()
        };
        let batch = process(&fixture("cgroup-v2-batch-worker.txt"));
        let (attestor_of_batch, calls) = attestor(&batch, &config, vec![Ok(fixture("pods.json"))]);
        let selectors = strings(&attestor_of_batch.attest(&peer()).await.unwrap());
        assert!(
            selectors.contains(&"k8s:pod-name:report-28473910-q8v4z".to_owned()),
            "{selectors:?}"
        );
        assert!(
            !selectors.iter().any(|s| s.starts_with("k8s:container-")),
            "{selectors:?}"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no waiting for the container"
        );
        // A container that is found gives its pod's selectors alone too.
        let web = process(&fixture("cgroup-v2-containerd-systemd.txt"));
        let (attestor_of_web, _) = attestor(&web, &config, vec![Ok(fixture("pods.json"))]);
        let selectors = strings(&attestor_of_web.attest(&peer()).await.unwrap());
        let expected: Vec<&str> = WEB_APP
            .iter()
            .copied()
            .filter(|s| !s.starts_with("k8s:container-"))
            .collect();
        assert_eq!(selectors, expected);
    }

    #[tokio::test]
    async fn two_pods_with_one_container_are_refused() {
        let mut list: Value = serde_json::from_str(&pods_with_runtime("cri-o")).unwrap();
        let mut twin = list["items"][0].clone();
        assert_eq!(twin["metadata"]["name"], "web-7d4b9c8f6d-x2k9p");
        twin["metadata"]["uid"] = "11111111-2222-4333-8444-555555555555".into();
        list["items"].as_array_mut().unwrap().push(twin);
        let process = process(&fixture("cgroup-v2-crio-namespaced.txt"));
        let (attestor, _) = attestor(
            &process,
            &K8sAttestorConfig::default(),
            vec![Ok(list.to_string())],
        );
        let error = attestor.attest(&peer()).await.unwrap_err().to_string();
        assert!(
            error.contains("two pods found with the same container ID"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_pid_taken_over_during_the_lookup_is_refused() {
        struct TakeOverDuringLookup {
            stat: PathBuf,
        }
        #[tonic::async_trait]
        impl PodSource for TakeOverDuringLookup {
            async fn pods(&self) -> Result<PodIndex, String> {
                std::fs::write(
                    &self.stat,
                    format!("{PID} (other) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 999 0 0\n"),
                )
                .unwrap();
                PodIndex::parse(fixture("pods.json").as_bytes())
            }
        }

        let process = process(&fixture("cgroup-v2-containerd-systemd.txt"));
        let (attestor, _) = attestor(
            &process,
            &K8sAttestorConfig::default(),
            vec![Ok(fixture("pods.json"))],
        );
        assert!(attestor.attest(&peer()).await.is_ok());
        // Another process, started later, holds the PID when attestation begins…
        let later = PeerCredentials {
            start_time: Some(554),
            ..peer()
        };
        assert!(matches!(
            attestor.attest(&later).await,
            Err(AttestError::PidReused { pid: PID })
        ));
        // …or by the time the kubelet has answered.
        let stat = process.proc_root.join(PID.to_string()).join("stat");
        let taken_over = K8sAttestor::with_source(
            &K8sAttestorConfig::default(),
            process.proc_root.clone(),
            Box::new(TakeOverDuringLookup { stat }),
        );
        assert!(matches!(
            taken_over.attest(&peer()).await,
            Err(AttestError::PidReused { pid: PID })
        ));
        // A process that has exited is gone.
        let gone = PeerCredentials {
            pid: Some(PID + 1),
            ..peer()
        };
        assert!(matches!(
            attestor.attest(&gone).await,
            Err(AttestError::ProcessGone { .. })
        ));
    }

    /// A caller pinned by a pidfd at accept: one that exits while the kubelet is asked is
    /// refused, whatever `/proc` then says under its PID.
    #[tokio::test]
    async fn a_caller_pinned_by_pidfd_that_exits_during_the_lookup_is_refused() {
        struct ExitDuringLookup {
            child: Mutex<std::process::Child>,
        }
        #[tonic::async_trait]
        impl PodSource for ExitDuringLookup {
            async fn pods(&self) -> Result<PodIndex, String> {
                let mut child = self.child.lock().unwrap();
                child.kill().unwrap();
                child.wait().unwrap();
                PodIndex::parse(fixture("pods.json").as_bytes())
            }
        }

        let process = process(&fixture("cgroup-v2-containerd-systemd.txt"));
        let spawn = || {
            let child = std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap();
            let pid = i32::try_from(child.id()).unwrap();
            let handle = ProcessHandle::open(pid).unwrap().expect("pidfds");
            (child, handle)
        };
        let (mut alive, handle) = spawn();
        let pinned = PeerCredentials {
            start_time: None,
            process: Some(handle),
            ..peer()
        };
        let (attestor, _) = attestor(
            &process,
            &K8sAttestorConfig::default(),
            vec![Ok(fixture("pods.json"))],
        );
        assert!(attestor.attest(&pinned).await.is_ok());
        alive.kill().unwrap();
        alive.wait().unwrap();

        let (child, handle) = spawn();
        let exits = K8sAttestor::with_source(
            &K8sAttestorConfig::default(),
            process.proc_root.clone(),
            Box::new(ExitDuringLookup {
                child: Mutex::new(child),
            }),
        );
        let pinned = PeerCredentials {
            start_time: None,
            process: Some(handle),
            ..peer()
        };
        assert!(matches!(
            exits.attest(&pinned).await,
            Err(AttestError::ProcessGone { pid: PID })
        ));
    }
}
