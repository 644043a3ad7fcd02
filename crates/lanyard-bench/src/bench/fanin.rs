//! `fanin`: many workloads streaming `FetchX509SVID` from one agent: first-SVID latency
//! (workload attestation included) against a lone workload's, agent memory per stream and
//! per cached SVID, and how long a rotation takes to reach every stream.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanyard_proto::workload::X509svidRequest;
use tokio::time::Instant;

use crate::bench::fanin_floor::FloorServer;
use crate::cpu::{CpuMeter, rss_anon_bytes, rss_bytes};
use crate::harness::{TRUST_DOMAIN, Target, current_uid, entry_message, scratch_dir, wait_until};
use crate::report::Report;
use crate::stats::Samples;
use crate::workload::{AgentProcess, Gate, wait_for_socket, watch_arrivals, workload_client};

/// The shape of one run.
#[derive(Debug, Clone)]
pub(crate) struct Scale {
    pub(crate) workloads: usize,
    pub(crate) cached_svids: usize,
    pub(crate) sync_interval: Duration,
}

/// Results for comparisons between agents.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    pub(crate) first_svid_p50_ms: f64,
    pub(crate) first_svid_p99_ms: f64,
    pub(crate) rss_per_stream: f64,
    pub(crate) rotation_all_ms: f64,
}

/// What each stream saw: when its first SVID came and when a different one came.
#[derive(Debug, Default, Clone)]
struct StreamLog {
    first: Option<Instant>,
    first_svid: Vec<u8>,
    rotated: Option<Instant>,
}

pub(crate) async fn run(
    report: &mut Report,
    target: &Target,
    scale: &Scale,
) -> anyhow::Result<Outcome> {
    let dir = scratch_dir("lanyard-bench-fanin")?;
    let mut agent = crate::bench::start_agent(target, dir.path(), scale.sync_interval).await?;
    wait_for_socket(&mut agent, Duration::from_secs(30)).await?;
    let outcome = measure(report, target, &mut agent, scale).await;
    drop(agent);
    outcome
}

async fn measure(
    report: &mut Report,
    target: &Target,
    agent: &mut AgentProcess,
    scale: &Scale,
) -> anyhow::Result<Outcome> {
    let uid = current_uid();
    let selector = vec![format!("unix:uid:{uid}")];
    let parent = agent.agent_id.as_str().to_owned();
    let mut entry = entry_message(&parent, "/bench/fanin/workload", &selector);
    let ids = target.create_entries(vec![entry.clone()]).await?;
    entry.id = ids.into_iter().next().unwrap_or_default();
    let timeout = scale.sync_interval * 10 + Duration::from_secs(30);

    // A lone workload first: the baseline, and the agent has the SVID once it returns.
    let (arrivals, watcher) = watch_arrivals(&agent.socket).await?;
    let wanted = "spiffe://example.org/bench/fanin/workload";
    wait_until("the first SVID", timeout, || {
        let arrivals = arrivals.clone();
        async move { arrivals.first_seen(wanted).is_some() }
    })
    .await?;
    watcher.abort();
    let mut lone = Samples::new();
    let mut lone_answer = None;
    for _ in 0..5 {
        let started = Instant::now();
        let mut client = workload_client(&agent.socket).await?;
        let mut stream = client
            .fetch_x509svid(X509svidRequest {})
            .await?
            .into_inner();
        lone_answer = stream.message().await?;
        lone.push(started.elapsed());
    }
    let lone_ms = lone.percentile_ms(50.0);
    let rss_idle = rss_bytes(agent.pid()) as f64;
    let rss_anon_idle = rss_anon_bytes(agent.pid()) as f64;

    // Memory per cached SVID: more entries for this workload, seen by one stream. Measured on
    // the idle agent, before the burst leaves freed memory that an allocator keeps resident
    // and hands out again (the growth would then read as nothing); the entries are deleted
    // again, and the agent has dropped them, before the burst.
    let (arrivals, watcher) = watch_arrivals(&agent.socket).await?;
    let extra_paths: Vec<String> = (0..scale.cached_svids)
        .map(|i| format!("/bench/fanin/cached/{i}"))
        .collect();
    let extra_ids: Vec<String> = extra_paths
        .iter()
        .map(|path| format!("spiffe://{TRUST_DOMAIN}{path}"))
        .collect();
    let extra: Vec<_> = extra_paths
        .iter()
        .map(|path| entry_message(&parent, path, &selector))
        .collect();
    let created = target.create_entries(extra).await?;
    let expected = scale.cached_svids + 1;
    wait_until("the cached SVIDs", timeout, || {
        let arrivals = arrivals.clone();
        async move { arrivals.count() >= expected }
    })
    .await?;
    let rss_per_svid =
        (rss_bytes(agent.pid()) as f64 - rss_idle).max(0.0) / scale.cached_svids.max(1) as f64;
    target.delete_entries(created).await?;
    wait_until("the cached SVIDs dropped", timeout, || {
        let arrivals = arrivals.clone();
        let ids = &extra_ids;
        async move { ids.iter().all(|id| arrivals.first_gone(id).is_some()) }
    })
    .await?;
    watcher.abort();

    // Every workload at once, each on its own connection.
    let logs: Arc<Mutex<Vec<StreamLog>>> =
        Arc::new(Mutex::new(vec![StreamLog::default(); scale.workloads]));
    let gate = Gate::new(scale.workloads);
    let mut tasks = tokio::task::JoinSet::new();
    let latencies: Arc<Mutex<Samples>> = Arc::default();
    for i in 0..scale.workloads {
        let socket = agent.socket.clone();
        let logs = Arc::clone(&logs);
        let gate = gate.clone();
        let latencies = Arc::clone(&latencies);
        tasks.spawn(async move {
            let client = workload_client(&socket).await;
            gate.pass().await;
            let mut client = client?;
            let started = Instant::now();
            let mut stream = client
                .fetch_x509svid(X509svidRequest {})
                .await?
                .into_inner();
            while let Some(message) = stream.message().await? {
                let now = Instant::now();
                let svid = message
                    .svids
                    .into_iter()
                    .find(|s| s.spiffe_id == "spiffe://example.org/bench/fanin/workload")
                    .map(|s| s.x509_svid)
                    .unwrap_or_default();
                let Ok(mut logs) = logs.lock() else { break };
                let Some(log) = logs.get_mut(i) else { break };
                if log.first.is_none() {
                    log.first = Some(now);
                    log.first_svid = svid;
                    if let Ok(mut l) = latencies.lock() {
                        l.push(now - started);
                    }
                } else if log.rotated.is_none() && svid != log.first_svid && !svid.is_empty() {
                    log.rotated = Some(now);
                }
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    // Whose CPU the burst takes: the agent's, and this process's workload clients', which
    // share the machine's cores with it; read once every client is connected.
    gate.connected().await;
    let agent_cpu = CpuMeter::Process(agent.pid());
    let clients_cpu = CpuMeter::Threads(vec![crate::LOAD_THREADS]);
    let (agent_before, clients_before) = (agent_cpu.cpu_time(), clients_cpu.cpu_time());
    let released = Instant::now();
    gate.release().await;
    let all_first = || {
        let logs = Arc::clone(&logs);
        async move {
            logs.lock()
                .map(|l| l.iter().all(|s| s.first.is_some()))
                .unwrap_or(false)
        }
    };
    wait_until("every workload's first SVID", timeout, all_first).await?;
    let burst = released.elapsed();
    let per_workload = |cpu: Duration| cpu.as_secs_f64() * 1e6 / scale.workloads.max(1) as f64;
    let agent_us = per_workload(agent_cpu.cpu_time().saturating_sub(agent_before));
    let clients_us = per_workload(clients_cpu.cpu_time().saturating_sub(clients_before));
    let first = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    let rss_streams = rss_bytes(agent.pid()) as f64;
    let rss_per_stream = (rss_streams - rss_idle).max(0.0) / scale.workloads.max(1) as f64;

    // A rotation: a changed entry makes the agent mint a new SVID and push it to everyone.
    entry.x509_svid_ttl = 3599;
    let updated = Instant::now();
    target.update_entry(entry.clone()).await?;
    let all_rotated = || {
        let logs = Arc::clone(&logs);
        async move {
            logs.lock()
                .map(|l| l.iter().all(|s| s.rotated.is_some()))
                .unwrap_or(false)
        }
    };
    wait_until("every workload's rotated SVID", timeout, all_rotated).await?;
    let (first_rotated, last_rotated) = {
        let logs = logs
            .lock()
            .map_err(|_| anyhow::anyhow!("stream log poisoned"))?;
        let times: Vec<Instant> = logs.iter().filter_map(|s| s.rotated).collect();
        (
            times.iter().min().copied().unwrap_or(updated),
            times.iter().max().copied().unwrap_or(updated),
        )
    };
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let all_ms = (last_rotated - updated).as_secs_f64() * 1e3;
    let spread_ms = (last_rotated - first_rotated).as_secs_f64() * 1e3;

    // The floors: the same burst against a server that only sends the lone workload's answer,
    // on the agent's stack and on HTTP/2 alone.
    let floors = match (target.name == "lanyard", lone_answer) {
        (true, Some(answer)) => {
            let dir = scratch_dir("lanyard-bench-fanin-floor")?;
            let floor = |server| {
                crate::bench::fanin_floor::measure(
                    dir.path(),
                    answer.clone(),
                    scale.workloads,
                    lanyard_agent::config::DEFAULT_MAX_STREAMS_PER_CONNECTION,
                    server,
                )
            };
            Some((
                floor(FloorServer::Tonic).await?,
                floor(FloorServer::Http2).await?,
            ))
        }
        _ => None,
    };

    let name = if target.name == "lanyard" {
        "fanin".to_owned()
    } else {
        format!("fanin.{}", target.name)
    };
    let n = scale.workloads;
    let interval_ms = scale.sync_interval.as_secs_f64() * 1e3;
    let mut bench = report.bench(&name);
    bench.versus(
        "first_svid_p50_ms",
        &format!("first SVID, {n} workloads at once, p50 (attestation included)"),
        first.percentile_ms(50.0),
        "ms",
        ("a lone workload", lone_ms, "ms"),
    );
    bench.versus(
        "first_svid_p99_ms",
        &format!("first SVID, {n} workloads at once, p99"),
        first.percentile_ms(99.0),
        "ms",
        ("a lone workload", lone_ms, "ms"),
    );
    if let Some((floor, http2)) = &floors {
        bench.versus(
            "first_svid_p99_vs_floor_ms",
            &format!("first SVID, {n} workloads at once, p99, against the transport's floor"),
            first.percentile_ms(99.0),
            "ms",
            (
                "the same burst against a gRPC server that only sends a fixed answer, p99",
                floor.first.percentile_ms(99.0),
                "ms",
            ),
        );
        bench.versus(
            "first_svid_p50_vs_floor_ms",
            &format!("first SVID, {n} workloads at once, p50, against the transport's floor"),
            first.percentile_ms(50.0),
            "ms",
            (
                "the same burst against a gRPC server that only sends a fixed answer, p50",
                floor.first.percentile_ms(50.0),
                "ms",
            ),
        );
        bench.versus(
            "first_svid_agent_cpu_vs_floor_us",
            &format!("agent CPU per first SVID, {n} workloads at once, against the floor's"),
            agent_us,
            "µs",
            (
                "the fixed-answer server's CPU per first message",
                floor.server_us,
                "µs",
            ),
        );
        bench.versus(
            "first_svid_p99_vs_http2_floor_ms",
            &format!("first SVID, {n} workloads at once, p99, against HTTP/2's floor"),
            first.percentile_ms(99.0),
            "ms",
            (
                "the same burst against an h2 server (no hyper, no tonic) that only sends a fixed answer, p99",
                http2.first.percentile_ms(99.0),
                "ms",
            ),
        );
        bench.versus(
            "first_svid_agent_cpu_vs_http2_floor_us",
            &format!("agent CPU per first SVID, {n} workloads at once, against HTTP/2's floor"),
            agent_us,
            "µs",
            (
                "the h2 fixed-answer server's CPU per first message",
                http2.server_us,
                "µs",
            ),
        );
    }
    bench.figure(
        "first_svid_agent_cpu_us",
        &format!("agent CPU per first SVID, {n} workloads at once (attestation included)"),
        agent_us,
        "µs",
    );
    bench.figure(
        "first_svid_clients_cpu_us",
        &format!(
            "workload clients' CPU per first SVID (this process, on the same cores; the burst took {:.1} ms)",
            burst.as_secs_f64() * 1e3
        ),
        clients_us,
        "µs",
    );
    bench.figure(
        "agent_rss_mib",
        "agent RSS, idle with one SVID",
        rss_idle / (1 << 20) as f64,
        "MiB",
    );
    bench.figure(
        "agent_rss_anon_mib",
        "agent anonymous RSS (heap and stacks, not the executable's pages), idle with one SVID",
        rss_anon_idle / (1 << 20) as f64,
        "MiB",
    );
    bench.figure(
        "agent_rss_per_stream_bytes",
        "agent RSS per open stream",
        rss_per_stream,
        "B",
    );
    bench.figure(
        "agent_rss_per_svid_bytes",
        &format!(
            "agent RSS per cached SVID ({} more SVIDs)",
            scale.cached_svids
        ),
        rss_per_svid,
        "B",
    );
    bench.versus(
        "rotation_all_ms",
        &format!("entry change → rotated SVID at all {n} streams"),
        all_ms,
        "ms",
        ("agent sync interval", interval_ms, "ms"),
    );
    bench.figure(
        "rotation_spread_ms",
        &format!("first → last of {n} streams to get the rotation"),
        spread_ms,
        "ms",
    );
    Ok(Outcome {
        first_svid_p50_ms: first.percentile_ms(50.0),
        first_svid_p99_ms: first.percentile_ms(99.0),
        rss_per_stream,
        rotation_all_ms: all_ms,
    })
}
