//! SPIRE's `spire-controller-manager` (built by [`crate::toolchain::controller_manager`]) as a
//! child process between a real API server ([`crate::kube::KubeCluster`]) and a Lanyard
//! server's admin socket, outside any pod: it reads the API server through a kubeconfig
//! (`KUBECONFIG`), its validating webhook is off (`ENABLE_WEBHOOKS=false`: serving it needs
//! in-cluster credentials and an admission path to the process), leader election and metrics
//! are off.

use std::path::Path;
use std::process::Command;

use crate::kube::KubeCluster;
use crate::toolchain::controller_manager;
use crate::{ChildProcess, TestDir};

/// A running spire-controller-manager; killed on drop.
#[derive(Debug)]
pub struct RunningControllerManager {
    process: ChildProcess,
    // Last, so that the process dies before its directory goes.
    _dir: TestDir,
}

impl RunningControllerManager {
    /// Installs the controller manager's CRDs into `cluster` (idempotent) and starts it with
    /// `config` (a `ControllerManagerConfig` document), reading the API server as the holder
    /// of `kubeconfig`.
    pub fn start(cluster: &KubeCluster, kubeconfig: &Path, config: &str) -> Self {
        let built = controller_manager();
        for crd in &built.crds {
            cluster.apply_yaml_file(crd);
        }
        let dir = TestDir::new();
        let config_path = dir.join("controller-manager.yaml");
        std::fs::write(&config_path, config)
            .unwrap_or_else(|e| panic!("writing {}: {e}", config_path.display()));
        let mut process = ChildProcess::new(
            "spire-controller-manager",
            dir.join("spire-controller-manager.log"),
        );
        let mut command = Command::new(&built.binary);
        command
            .arg("-config")
            .arg(&config_path)
            .env("KUBECONFIG", kubeconfig)
            .env("ENABLE_WEBHOOKS", "false")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT");
        process.start(command);
        Self { process, _dir: dir }
    }

    /// The process, for its log and state.
    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(80)
    }
}
