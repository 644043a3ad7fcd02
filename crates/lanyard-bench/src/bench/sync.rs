//! `sync`: steady-state entry sync of many simulated agents with nothing changing (server
//! CPU and wire bytes per sync, against the bare index lookup, two calls that do nothing and
//! the protobuf payload), and the propagation latency from creating an entry to its SVID
//! reaching a streaming workload through a real agent, and from deleting it to the SVID
//! leaving that stream, against the agent's sync interval.

use std::sync::Arc;
use std::time::Duration;

use lanyard_proto::spire::api::server::bundle::v1::GetBundleRequest;
use lanyard_proto::spire::api::server::bundle::v1::bundle_client::BundleClient;
use lanyard_proto::spire::api::server::entry::v1::SyncAuthorizedEntriesRequest;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_proto::spire::api::types;
use prost::Message as _;
use tokio::time::Instant;

use crate::harness::{SimAgent, Target, current_uid, entry_message, scratch_dir, wait_until};
use crate::report::Report;
use crate::stats::Samples;
use crate::workload::{AgentProcess, wait_for_socket, watch_arrivals};

/// The shape of one run.
#[derive(Debug, Clone)]
pub(crate) struct Scale {
    pub(crate) agents: usize,
    pub(crate) entries_per_agent: usize,
    pub(crate) rounds: usize,
    pub(crate) propagation_trials: usize,
    pub(crate) sync_interval: Duration,
}

/// Results for comparisons between servers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    pub(crate) cpu_us_per_sync: f64,
    pub(crate) bytes_per_sync: f64,
    pub(crate) propagation_p50_ms: f64,
    pub(crate) propagation_p99_ms: f64,
}

/// The fields SPIRE's agent asks for in `SyncAuthorizedEntries`.
fn agent_sync_mask() -> types::EntryMask {
    types::EntryMask {
        spiffe_id: true,
        selectors: true,
        federates_with: true,
        admin: true,
        downstream: true,
        revision_number: true,
        store_svid: true,
        hint: true,
        created_at: true,
        ..Default::default()
    }
}

/// One sync as an agent with nothing to learn runs it: `SyncAuthorizedEntries` (read to the
/// end, or cancelled once the revisions are in) and `GetBundle`. Returns the payload bytes.
pub(crate) async fn sync_once(agent: &SimAgent) -> anyhow::Result<usize> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(SyncAuthorizedEntriesRequest {
        output_mask: Some(agent_sync_mask()),
        ids: Vec::new(),
    })
    .await?;
    let mut payload = 0;
    {
        let mut stream = EntryClient::new(agent.channel.clone())
            .sync_authorized_entries(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        while let Some(message) = stream.message().await? {
            payload += message.encoded_len();
            if !message.entry_revisions.is_empty() && !message.more {
                // Revision mode: every entry is cached and unchanged; cancel.
                break;
            }
        }
    }
    drop(tx);
    let bundle = BundleClient::new(agent.channel.clone())
        .get_bundle(GetBundleRequest { output_mask: None })
        .await?
        .into_inner();
    payload += bundle.encoded_len();
    Ok(payload)
}

/// Two of the cheapest calls an agent can make: `GetBundle` with a mask that selects no
/// field, twice, on the agent's connection. A sync is two calls too (a stream and a unary
/// call); this is what they cost the server without entries, authorization or bundle.
async fn two_minimal_calls(agent: &SimAgent) -> anyhow::Result<usize> {
    let mut payload = 0;
    for _ in 0..2 {
        let answer = BundleClient::new(agent.channel.clone())
            .get_bundle(GetBundleRequest {
                output_mask: Some(types::BundleMask::default()),
            })
            .await?
            .into_inner();
        payload += answer.encoded_len();
    }
    Ok(payload)
}

/// What each simulated agent does in a measured round.
#[derive(Debug, Clone, Copy)]
enum RoundOp {
    Sync,
    TwoMinimalCalls,
}

pub(crate) async fn run(
    report: &mut Report,
    target: &Target,
    index_lookup_us: f64,
    scale: &Scale,
) -> anyhow::Result<Outcome> {
    let agents = target.attest_agents(scale.agents, 16).await?;
    let entries = agents
        .iter()
        .enumerate()
        .flat_map(|(a, agent)| {
            (0..scale.entries_per_agent).map(move |k| {
                entry_message(
                    agent.id.as_str(),
                    &format!("/bench/sync/{a}/{k}"),
                    &[format!("unix:uid:{}", 10_000 + k)],
                )
            })
        })
        .collect();
    target.create_entries(entries).await?;
    for agent in agents.first().into_iter().chain(agents.last()) {
        agent.wait_authorized(scale.entries_per_agent).await?;
    }
    let agents = Arc::new(agents);

    // A first sync fills each agent's cache; the measured ones find nothing new.
    let run_round = |agents: Arc<Vec<SimAgent>>, op: RoundOp| async move {
        let semaphore = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..agents.len() {
            let permit = Arc::clone(&semaphore).acquire_owned().await?;
            let agents = Arc::clone(&agents);
            tasks.spawn(async move {
                let _permit = permit;
                match (agents.get(i), op) {
                    (Some(agent), RoundOp::Sync) => sync_once(agent).await,
                    (Some(agent), RoundOp::TwoMinimalCalls) => two_minimal_calls(agent).await,
                    (None, _) => Ok(0),
                }
            });
        }
        let mut payload = 0usize;
        while let Some(joined) = tasks.join_next().await {
            payload += joined??;
        }
        Ok::<_, anyhow::Error>(payload)
    };
    run_round(Arc::clone(&agents), RoundOp::Sync).await?;

    let bytes_before: u64 = agents.iter().map(|a| a.bytes.total()).sum();
    let cpu_before = target.cpu.cpu_time();
    let started = Instant::now();
    let mut payload = 0usize;
    for _ in 0..scale.rounds {
        payload += run_round(Arc::clone(&agents), RoundOp::Sync).await?;
    }
    let elapsed = started.elapsed();
    let cpu = target.cpu.cpu_time().saturating_sub(cpu_before);
    let floor_before = target.cpu.cpu_time();
    for _ in 0..scale.rounds {
        run_round(Arc::clone(&agents), RoundOp::TwoMinimalCalls).await?;
    }
    let floor = target.cpu.cpu_time().saturating_sub(floor_before);
    let bytes = agents.iter().map(|a| a.bytes.total()).sum::<u64>() - bytes_before;
    let syncs = (scale.agents * scale.rounds).max(1) as f64;
    let cpu_us_per_sync = cpu.as_secs_f64() * 1e6 / syncs;
    let bytes_per_sync = bytes as f64 / syncs;
    let payload_per_sync = payload as f64 / syncs;
    let floor_us = floor.as_secs_f64() * 1e6 / syncs;

    let name = if target.name == "lanyard" {
        "sync".to_owned()
    } else {
        format!("sync.{}", target.name)
    };
    let n = scale.agents;
    let k = scale.entries_per_agent;
    {
        let mut bench = report.bench(&name);
        bench.versus(
            "server_cpu_us_per_sync",
            &format!("server CPU per steady-state sync, {n} agents × {k} entries"),
            cpu_us_per_sync,
            "µs",
            ("index lookup alone", index_lookup_us, "µs"),
        );
        bench.versus(
            "server_cpu_us_per_sync_vs_calls",
            "server CPU per steady-state sync, against two calls that do nothing",
            cpu_us_per_sync,
            "µs",
            ("two GetBundle calls with an empty mask", floor_us, "µs"),
        );
        bench.versus(
            "bytes_per_sync",
            "bytes on the wire per sync (TLS, both directions)",
            bytes_per_sync,
            "B",
            ("protobuf payload", payload_per_sync, "B"),
        );
        bench.figure(
            "syncs_per_sec",
            &format!("steady-state syncs per second, {n} agents"),
            syncs / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
            "/s",
        );
    }
    drop(agents);

    let (p50, p99) = propagation(report, &name, target, scale).await?;
    Ok(Outcome {
        cpu_us_per_sync,
        bytes_per_sync,
        propagation_p50_ms: p50,
        propagation_p99_ms: p99,
    })
}

/// Creates entries one at a time for a workload streaming from a real agent, and measures
/// until each one's SVID arrives.
async fn propagation(
    report: &mut Report,
    name: &str,
    target: &Target,
    scale: &Scale,
) -> anyhow::Result<(f64, f64)> {
    let dir = scratch_dir("lanyard-bench-agent")?;
    let mut agent = crate::bench::start_agent(target, dir.path(), scale.sync_interval).await?;
    wait_for_socket(&mut agent, Duration::from_secs(30)).await?;
    let (p50, p99) = measure_propagation(
        target,
        &agent,
        scale.propagation_trials,
        scale.sync_interval,
        Duration::ZERO,
    )
    .await?;
    let (gone_p50, gone_p99) = measure_removal(
        target,
        &agent,
        scale.propagation_trials,
        scale.sync_interval,
    )
    .await?;
    let interval_ms = scale.sync_interval.as_secs_f64() * 1e3;
    let mut bench = report.bench(name);
    bench.versus(
        "removal_p50_ms",
        "entry delete → its SVID gone from a streaming workload, p50",
        gone_p50,
        "ms",
        ("agent sync interval", interval_ms, "ms"),
    );
    bench.versus(
        "removal_p99_ms",
        "entry delete → its SVID gone from a streaming workload, p99",
        gone_p99,
        "ms",
        ("agent sync interval", interval_ms, "ms"),
    );
    bench.versus(
        "propagation_p50_ms",
        "entry create → SVID at a streaming workload, p50",
        p50,
        "ms",
        ("agent sync interval", interval_ms, "ms"),
    );
    bench.versus(
        "propagation_p99_ms",
        "entry create → SVID at a streaming workload, p99",
        p99,
        "ms",
        ("agent sync interval", interval_ms, "ms"),
    );
    drop(agent);
    Ok((p50, p99))
}

/// Creates `trials` entries one at a time through `target` for a workload streaming from
/// `agent` (which may be attached to another server of the trust domain), and returns the
/// p50 and p99 from each create call to the SVID's arrival, in milliseconds. With a non-zero
/// `spread`, each create first waits [`phase_offset`](crate::bench::phase_offset) of it, so
/// that the creates fall at every phase of the agent's sync rather than just after the sync
/// that delivered the last SVID.
pub(crate) async fn measure_propagation(
    target: &Target,
    agent: &AgentProcess,
    trials: usize,
    sync_interval: Duration,
    spread: Duration,
) -> anyhow::Result<(f64, f64)> {
    let uid = current_uid();
    let selector = [format!("unix:uid:{uid}")];
    let parent = agent.agent_id.as_str().to_owned();
    target
        .create_entries(vec![entry_message(&parent, "/bench/prop/seed", &selector)])
        .await?;
    let (arrivals, watcher) = watch_arrivals(&agent.socket).await?;
    let seed = "spiffe://example.org/bench/prop/seed";
    let timeout = sync_interval * 10 + Duration::from_secs(20);
    wait_until("the first SVID", timeout, || {
        let arrivals = arrivals.clone();
        async move { arrivals.first_seen(seed).is_some() }
    })
    .await?;
    let mut samples = Samples::new();
    for trial in 0..trials {
        tokio::time::sleep(crate::bench::phase_offset(trial, spread)).await;
        let path = format!("/bench/prop/{trial}");
        let id = format!("spiffe://example.org{path}");
        let created = Instant::now();
        target
            .create_entries(vec![entry_message(&parent, &path, &selector)])
            .await?;
        wait_until("a new SVID", timeout, || {
            let arrivals = arrivals.clone();
            let id = id.clone();
            async move { arrivals.first_seen(&id).is_some() }
        })
        .await?;
        if let Some(seen) = arrivals.first_seen(&id) {
            samples.push(seen.saturating_duration_since(created));
        }
        // Decorrelate from the sync phase.
        tokio::time::sleep(Duration::from_millis(37 * (trial as u64 % 7))).await;
    }
    watcher.abort();
    let _ = arrivals.count();
    Ok((samples.percentile_ms(50.0), samples.percentile_ms(99.0)))
}

/// Creates `trials` entries one at a time for a workload streaming from `agent`, and once each
/// one's SVID is at the workload, deletes the entry: returns the p50 and p99 from each delete
/// call to the first message the workload gets without that SVID, in milliseconds.
async fn measure_removal(
    target: &Target,
    agent: &AgentProcess,
    trials: usize,
    sync_interval: Duration,
) -> anyhow::Result<(f64, f64)> {
    let uid = current_uid();
    let selector = [format!("unix:uid:{uid}")];
    let parent = agent.agent_id.as_str().to_owned();
    // The workload keeps one entry throughout, so its stream never ends for lack of one.
    target
        .create_entries(vec![entry_message(
            &parent,
            "/bench/removal/stays",
            &selector,
        )])
        .await?;
    let (arrivals, watcher) = watch_arrivals(&agent.socket).await?;
    let timeout = sync_interval * 10 + Duration::from_secs(20);
    let mut samples = Samples::new();
    for trial in 0..trials {
        let path = format!("/bench/removal/{trial}");
        let id = format!("spiffe://example.org{path}");
        let ids = target
            .create_entries(vec![entry_message(&parent, &path, &selector)])
            .await?;
        wait_until("the SVID to remove", timeout, || {
            let arrivals = arrivals.clone();
            let id = id.clone();
            async move { arrivals.first_seen(&id).is_some() }
        })
        .await?;
        let deleted = Instant::now();
        target.delete_entries(ids).await?;
        wait_until("the SVID to be gone", timeout, || {
            let arrivals = arrivals.clone();
            let id = id.clone();
            async move { arrivals.first_gone(&id).is_some() }
        })
        .await?;
        if let Some(gone) = arrivals.first_gone(&id) {
            samples.push(gone.saturating_duration_since(deleted));
        }
        tokio::time::sleep(Duration::from_millis(37 * (trial as u64 % 7))).await;
    }
    watcher.abort();
    Ok((samples.percentile_ms(50.0), samples.percentile_ms(99.0)))
}
