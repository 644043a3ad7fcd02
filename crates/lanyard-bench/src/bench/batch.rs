//! `batch`: `BatchNewX509SVID` over mTLS gRPC from simulated agents, by batch size and
//! number of concurrent agents, against the `mint` ceiling times the cores.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use lanyard_proto::spire::api::server::svid::v1::svid_client::SvidClient;
use lanyard_proto::spire::api::server::svid::v1::{BatchNewX509svidRequest, NewX509svidParams};

use crate::bench::mint::Ceiling;
use crate::harness::{SimAgent, Target, csr_pool, entry_message};
use crate::report::{Chart, ChartKind, Report, Series};
use crate::stats::{Samples, per_second};

/// The shape of one run.
#[derive(Debug, Clone)]
pub(crate) struct Scale {
    pub(crate) batch_sizes: Vec<usize>,
    pub(crate) agent_counts: Vec<usize>,
    pub(crate) duration: Duration,
}

/// SVIDs per second by (agents, batch size), for comparisons between servers.
pub(crate) type Grid = BTreeMap<(usize, usize), f64>;

/// Simulated agents, each authorized for one entry.
pub(crate) struct Fleet {
    pub(crate) agents: Vec<(SimAgent, String)>,
}

impl Fleet {
    /// Attests `n` agents on `target` and registers one entry under each.
    pub(crate) async fn register(target: &Target, n: usize, name: &str) -> anyhow::Result<Self> {
        let agents = target.attest_agents(n, 8).await?;
        let entries = agents
            .iter()
            .enumerate()
            .map(|(i, agent)| {
                entry_message(
                    agent.id.as_str(),
                    &format!("/bench/{name}/{i}"),
                    &["unix:uid:1000".to_owned()],
                )
            })
            .collect();
        let ids = target.create_entries(entries).await?;
        for agent in agents.first().into_iter().chain(agents.last()) {
            agent.wait_authorized(1).await?;
        }
        Ok(Self {
            agents: agents.into_iter().zip(ids).collect(),
        })
    }
}

/// One cell: `agents` agents each calling with `batch` CSRs for `duration`.
async fn measure(
    fleet: &Fleet,
    agents: usize,
    batch: usize,
    csrs: &Arc<Vec<Vec<u8>>>,
    duration: Duration,
) -> anyhow::Result<(f64, Samples)> {
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    let deadline = started + duration;
    for (agent, entry_id) in fleet.agents.iter().take(agents) {
        let mut client = SvidClient::new(agent.channel.clone());
        let entry_id = entry_id.clone();
        let csrs = Arc::clone(csrs);
        tasks.spawn(async move {
            let mut samples = Samples::new();
            let mut minted = 0u64;
            let mut next_csr = 0usize;
            while Instant::now() < deadline {
                let params = (0..batch)
                    .map(|_| {
                        next_csr = (next_csr + 1) % csrs.len().max(1);
                        NewX509svidParams {
                            entry_id: entry_id.clone(),
                            csr: csrs.get(next_csr).cloned().unwrap_or_default(),
                        }
                    })
                    .collect();
                let sent = Instant::now();
                let results = client
                    .batch_new_x509svid(BatchNewX509svidRequest { params })
                    .await?
                    .into_inner()
                    .results;
                samples.push(sent.elapsed());
                for result in &results {
                    let code = result.status.as_ref().map_or(0, |s| s.code);
                    if code != 0 || result.svid.is_none() {
                        bail!(
                            "minting failed: {}",
                            result
                                .status
                                .as_ref()
                                .map(|s| s.message.clone())
                                .unwrap_or_default()
                        );
                    }
                }
                minted += results.len() as u64;
            }
            Ok::<_, anyhow::Error>((minted, samples))
        });
    }
    let mut minted = 0;
    let mut samples = Samples::new();
    while let Some(joined) = tasks.join_next().await {
        let (n, s) = joined??;
        minted += n;
        samples.extend(s);
    }
    Ok((per_second(minted, started.elapsed()), samples))
}

/// Runs every cell of `scale` against `target`.
pub(crate) async fn run(
    report: &mut Report,
    target: &Target,
    ceiling: Ceiling,
    scale: &Scale,
) -> anyhow::Result<Grid> {
    let cores = report.machine.cores as f64;
    let max_agents = scale.agent_counts.iter().copied().max().unwrap_or(1);
    let max_batch = scale.batch_sizes.iter().copied().max().unwrap_or(1);
    let fleet = Fleet::register(target, max_agents, "batch").await?;
    let csrs = csr_pool(max_batch.min(500))?;
    // One call per agent first: connections, sessions and caches warm.
    measure(&fleet, max_agents, 1, &csrs, Duration::from_millis(50)).await?;

    let bench_name = if target.name == "lanyard" {
        "batch".to_owned()
    } else {
        format!("batch.{}", target.name)
    };
    let ceiling_rate = ceiling.mint_per_core * cores;
    let mint_us = 1e6 / ceiling.mint_per_core.max(f64::MIN_POSITIVE);
    let mut grid = Grid::new();
    let mut throughput_series = Vec::new();
    let mut p99_series = Vec::new();
    let mut single_csr_p50_ms = None;
    for &agents in &scale.agent_counts {
        let mut rates = Vec::new();
        let mut p99s = Vec::new();
        for &batch in &scale.batch_sizes {
            let cpu_before = target.cpu.cpu_time();
            let (rate, samples) = measure(&fleet, agents, batch, &csrs, scale.duration).await?;
            let cpu = target.cpu.cpu_time().saturating_sub(cpu_before);
            let svids = rate * scale.duration.as_secs_f64();
            let key = format!("agents_{agents}.size_{batch}");
            let mut bench = report.bench(&bench_name);
            bench.versus(
                &format!("{key}.svids_per_sec"),
                &format!("SVIDs/s, {agents} agent(s), batches of {batch}"),
                rate,
                "/s",
                ("mint ceiling × cores", ceiling_rate, "/s"),
            );
            let ideal_ms = mint_us * batch as f64 / 1e3;
            bench.versus(
                &format!("{key}.p50_ms"),
                &format!("p50 latency, {agents} agent(s), batches of {batch}"),
                samples.percentile_ms(50.0),
                "ms",
                ("mint time of one batch, 1 core", ideal_ms, "ms"),
            );
            bench.versus(
                &format!("{key}.p99_ms"),
                &format!("p99 latency, {agents} agent(s), batches of {batch}"),
                samples.percentile_ms(99.0),
                "ms",
                ("mint time of one batch, 1 core", ideal_ms, "ms"),
            );
            if svids > 0.0 {
                bench.versus(
                    &format!("{key}.server_cpu_us_per_svid"),
                    &format!("server CPU µs per SVID, {agents} agent(s), batches of {batch}"),
                    cpu.as_secs_f64() * 1e6 / svids,
                    "µs",
                    ("mint from CSR, 1 thread", mint_us, "µs"),
                );
            }
            if (agents, batch) == (1, 1) {
                single_csr_p50_ms = Some(samples.percentile_ms(50.0));
            }
            grid.insert((agents, batch), rate);
            rates.push(rate);
            p99s.push(samples.percentile_ms(99.0));
        }
        throughput_series.push(Series {
            name: format!("{agents} agent(s)"),
            values: rates,
        });
        p99_series.push(Series {
            name: format!("{agents} agent(s)"),
            values: p99s,
        });
    }
    // One CSR is one call plus one mint: what a call that does nothing takes is its floor.
    if let Some(p50_ms) = single_csr_p50_ms {
        let lone = Fleet {
            agents: fleet.agents.iter().take(1).cloned().collect(),
        };
        let (_, floor, _) = crate::bench::jwt::minimal_calls(target, &lone, scale.duration).await?;
        let floor_ms = floor.percentile_ms(50.0) + mint_us / 1e3;
        report.bench(&bench_name).versus(
            "agents_1.size_1.p50_ms_vs_call",
            "p50 latency, 1 agent, batches of 1, against a call that does nothing plus one mint",
            p50_ms,
            "ms",
            (
                "GetBundle with an empty mask, p50, + one mint",
                floor_ms,
                "ms",
            ),
        );
    }
    throughput_series.push(Series {
        name: "mint ceiling × cores".into(),
        values: vec![ceiling_rate; scale.batch_sizes.len()],
    });
    let categories: Vec<String> = scale.batch_sizes.iter().map(|b| b.to_string()).collect();
    let mut bench = report.bench(&bench_name);
    bench.chart(Chart {
        name: format!("{bench_name}_throughput").replace('.', "_"),
        title: format!("BatchNewX509SVID throughput ({})", target.name),
        x_label: "CSRs per call".into(),
        y_label: "SVIDs per second".into(),
        kind: ChartKind::Line,
        categories: categories.clone(),
        series: throughput_series,
    });
    bench.chart(Chart {
        name: format!("{bench_name}_p99").replace('.', "_"),
        title: format!("BatchNewX509SVID p99 latency ({})", target.name),
        x_label: "CSRs per call".into(),
        y_label: "p99 ms".into(),
        kind: ChartKind::Line,
        categories,
        series: p99_series,
    });
    Ok(grid)
}
