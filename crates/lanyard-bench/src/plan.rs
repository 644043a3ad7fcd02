//! How big each benchmark runs: `--quick` (CI, under two minutes even in a debug build) or
//! the full run (about ten minutes in release on two cores).

use std::time::Duration;

use crate::bench::index::{Layout, Shape};
use crate::bench::{batch, fanin, jwt, overhead, propagation, revoke, scale, sync, writes};

/// Every benchmark's scale.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) mode: &'static str,
    pub(crate) mint_duration: Duration,
    pub(crate) batch: batch::Scale,
    pub(crate) jwt: jwt::Scale,
    pub(crate) index_shapes: Vec<Shape>,
    pub(crate) index_lookups: usize,
    pub(crate) index_changes: usize,
    pub(crate) sync: sync::Scale,
    pub(crate) fanin: fanin::Scale,
    pub(crate) revoke: revoke::Scale,
    pub(crate) restart_entries: usize,
    pub(crate) writes: writes::Scale,
    pub(crate) propagation: propagation::Scale,
    /// Only with `--only scale`.
    pub(crate) scale: scale::Scale,
    /// Rounds of `batch` and `fanin` with metrics off and on (`--metrics-overhead`).
    pub(crate) overhead: overhead::Scale,
    /// Calls through the gRPC call metrics' layer, on and off (`--metrics-overhead`).
    pub(crate) rpc_layer_calls: u32,
}

impl Plan {
    pub(crate) fn full() -> Self {
        Self {
            mode: "full",
            mint_duration: Duration::from_secs(2),
            rpc_layer_calls: 2_000_000,
            batch: batch::Scale {
                batch_sizes: vec![1, 10, 100, 500],
                agent_counts: vec![1, 10, 100],
                duration: Duration::from_secs(3),
            },
            jwt: jwt::Scale {
                agents: 10,
                duration: Duration::from_secs(4),
            },
            index_shapes: vec![
                Shape {
                    name: "direct_10k",
                    agents: 1_000,
                    layout: Layout::Direct { per_agent: 10 },
                    spire_reference: false,
                },
                Shape {
                    name: "direct_100k",
                    agents: 10_000,
                    layout: Layout::Direct { per_agent: 10 },
                    spire_reference: false,
                },
                Shape {
                    name: "spire_shape",
                    agents: 50_000,
                    layout: Layout::Aliased {
                        aliases: 100,
                        per_alias: 5,
                    },
                    spire_reference: true,
                },
            ],
            index_lookups: 10_000,
            index_changes: 10_000,
            sync: sync::Scale {
                agents: 1_000,
                entries_per_agent: 5,
                rounds: 5,
                propagation_trials: 20,
                sync_interval: Duration::from_secs(1),
            },
            fanin: fanin::Scale {
                workloads: 1_000,
                cached_svids: 100,
                sync_interval: Duration::from_secs(1),
            },
            revoke: revoke::Scale {
                agents: 1_000,
                rounds: 20,
                crl_serials: vec![10_000, 100_000],
                nginx_rounds: 10,
            },
            // 16 rounds, 32 runs of about 13 s: about 7 minutes on 2 cores. Four cells of
            // the grid, its corners (the cheapest call, the largest batches, many agents at
            // once), for 2 s each rather than all twelve for 3 s, so that there are enough
            // rounds for a median.
            overhead: overhead::Scale {
                rounds: 16,
                batch: batch::Scale {
                    batch_sizes: vec![1, 100],
                    agent_counts: vec![1, 100],
                    duration: Duration::from_secs(2),
                },
                fanin: fanin::Scale {
                    workloads: 1_000,
                    cached_svids: 100,
                    sync_interval: Duration::from_secs(1),
                },
            },
            restart_entries: 100_000,
            writes: writes::Scale {
                clients: 4,
                writes: 4_000,
            },
            propagation: propagation::Scale {
                trials: 20,
                authorize_trials: 20,
                // The agent's default, so that the figure is what a deployment sees.
                sync_interval: lanyard_agent::config::DEFAULT_SYNC_INTERVAL,
            },
            scale: scale::Scale {
                registered_agents: 100_000,
                entries_per_agent: 10,
                connected_agents: 10_000,
                sync_interval: lanyard_agent::config::DEFAULT_SYNC_INTERVAL,
                warm_up: Duration::from_secs(10),
                window: Duration::from_secs(60),
            },
        }
    }

    pub(crate) fn quick() -> Self {
        Self {
            mode: "quick",
            mint_duration: Duration::from_millis(300),
            rpc_layer_calls: 100_000,
            batch: batch::Scale {
                batch_sizes: vec![1, 10, 100],
                agent_counts: vec![1, 10],
                duration: Duration::from_millis(300),
            },
            jwt: jwt::Scale {
                agents: 4,
                duration: Duration::from_millis(500),
            },
            index_shapes: vec![
                Shape {
                    name: "direct_10k",
                    agents: 100,
                    layout: Layout::Direct { per_agent: 10 },
                    spire_reference: false,
                },
                Shape {
                    name: "direct_100k",
                    agents: 1_000,
                    layout: Layout::Direct { per_agent: 10 },
                    spire_reference: false,
                },
                Shape {
                    name: "spire_shape",
                    agents: 5_000,
                    layout: Layout::Aliased {
                        aliases: 100,
                        per_alias: 5,
                    },
                    spire_reference: true,
                },
            ],
            index_lookups: 1_000,
            index_changes: 1_000,
            sync: sync::Scale {
                agents: 50,
                entries_per_agent: 5,
                rounds: 3,
                propagation_trials: 3,
                sync_interval: Duration::from_millis(300),
            },
            fanin: fanin::Scale {
                workloads: 50,
                cached_svids: 10,
                sync_interval: Duration::from_millis(300),
            },
            revoke: revoke::Scale {
                agents: 20,
                rounds: 3,
                crl_serials: vec![100, 1_000],
                nginx_rounds: 2,
            },
            // One round each way: the code path, not a figure.
            overhead: overhead::Scale {
                rounds: 2,
                batch: batch::Scale {
                    batch_sizes: vec![1, 10],
                    agent_counts: vec![1, 2],
                    duration: Duration::from_millis(200),
                },
                fanin: fanin::Scale {
                    workloads: 20,
                    cached_svids: 5,
                    sync_interval: Duration::from_millis(300),
                },
            },
            restart_entries: 5_000,
            writes: writes::Scale {
                clients: 4,
                writes: 200,
            },
            propagation: propagation::Scale {
                trials: 3,
                authorize_trials: 5,
                sync_interval: Duration::from_millis(300),
            },
            // The agents' interval stays SPIRE's 5 s: fewer agents, not faster ones.
            scale: scale::Scale {
                registered_agents: 2_000,
                entries_per_agent: 10,
                connected_agents: 200,
                sync_interval: lanyard_agent::config::DEFAULT_SYNC_INTERVAL,
                warm_up: Duration::from_secs(5),
                window: Duration::from_secs(10),
            },
        }
    }
}

/// What the Lanyard runs produced, for the comparison with SPIRE.
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    pub(crate) batch: Option<batch::Grid>,
    pub(crate) jwt: Option<jwt::Outcome>,
    pub(crate) sync: Option<sync::Outcome>,
    pub(crate) fanin: Option<fanin::Outcome>,
    pub(crate) propagation: Option<propagation::Outcome>,
}
