//! The benchmarks, and what they share.

use std::path::Path;
use std::time::Duration;

use crate::harness::{AgentKind, Target};
use crate::workload::AgentProcess;

pub(crate) mod batch;
pub(crate) mod fanin;
pub(crate) mod index;
pub(crate) mod jwt;
pub(crate) mod mint;
pub(crate) mod restart;
pub(crate) mod sync;
pub(crate) mod writes;

/// Starts the node agent that pairs with `target`, attesting with a join token.
pub(crate) async fn start_agent(
    target: &Target,
    dir: &Path,
    sync_interval: Duration,
) -> anyhow::Result<AgentProcess> {
    match &target.agent {
        AgentKind::Lanyard => AgentProcess::start_lanyard(target, dir, sync_interval).await,
        AgentKind::Spire(bin) => crate::spire::start_agent(bin, target, dir, sync_interval).await,
    }
}
