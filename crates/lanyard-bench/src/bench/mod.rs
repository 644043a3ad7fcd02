//! The benchmarks, and what they share.

use std::path::Path;
use std::time::Duration;

use crate::harness::{AgentKind, Target};
use crate::workload::AgentProcess;

pub(crate) mod batch;
pub(crate) mod fanin;
pub(crate) mod fanin_floor;
pub(crate) mod index;
pub(crate) mod jwt;
pub(crate) mod mint;
pub(crate) mod overhead;
pub(crate) mod propagation;
pub(crate) mod restart;
pub(crate) mod revoke;
pub(crate) mod revoke_nginx;
pub(crate) mod scale;
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

/// How long trial `trial` waits before it starts, so that trials fall evenly over every phase
/// of a periodic process of period `spread` (an agent's sync, a server's cache reload) rather
/// than just after the tick that ended the trial before: the fractional parts of multiples of
/// the golden ratio, which spread evenly over `[0, 1)` for any number of trials.
pub(crate) fn phase_offset(trial: usize, spread: Duration) -> Duration {
    let phase = ((trial + 1) as f64 * 0.618_033_988_749_895).fract();
    spread.mul_f64(phase)
}
