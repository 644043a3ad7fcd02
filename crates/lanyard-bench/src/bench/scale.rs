//! `scale`: one server whose SQLite datastore holds 100k registered agents and 1M entries
//! (10 per agent), with as many simulated agents connected at once as the machine holds
//! (10k), each syncing every 5 s (SPIRE's default) at its own phase, as SPIRE's agent does
//! (`SyncAuthorizedEntries`, then `GetBundle`). Measured: sustained syncs per second against
//! the rate the agents ask for, server CPU per sync and the agents one server core would
//! sustain at that interval, sync latency against a lone agent's on the same server, server
//! memory per connected agent and per entry, and the restart on the full datastore.
//!
//! The server runs as a child process (`lanyard server run`): the agents' 10k connections
//! and the server's 10k sockets do not fit in one process's file descriptors. The connected
//! agents attest through the API (join tokens) on an empty datastore; the other agents and
//! every entry are then written straight into SQLite before the server starts again, which is
//! how its index learns them (it reads every entry at start).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, anyhow};
use lanyard_core::{EntryId, RegistrationEntry, SelectorSet, SpiffeId};
use lanyard_server::ServerConfig;
use lanyard_server::datastore::{AttestedAgent, Datastore as _, SqlStore};
use tokio::time::Instant;

use crate::bench::index;
use crate::bench::phase_offset;
use crate::bench::sync::sync_once;
use crate::cpu::CpuMeter;
use crate::harness::{SimAgent, scratch_dir, trust_domain};
use crate::report::Report;
use crate::server_process::{ServerFiles, ServerProcess};
use crate::stats::Samples;

/// The shape of one run.
#[derive(Debug, Clone)]
pub(crate) struct Scale {
    /// Agents in the datastore, the connected ones among them.
    pub(crate) registered_agents: usize,
    /// Entries parented to each registered agent.
    pub(crate) entries_per_agent: usize,
    /// Simulated agents connected and syncing at once.
    pub(crate) connected_agents: usize,
    pub(crate) sync_interval: Duration,
    /// Syncing before the measured window (every agent syncs at least once).
    pub(crate) warm_up: Duration,
    pub(crate) window: Duration,
}

/// Attestations in flight at once.
const ATTEST_PARALLEL: usize = 16;
/// Connections (TLS handshake and first sync) in flight at once.
const CONNECT_PARALLEL: usize = 64;
/// Entries per bulk insert (one transaction each).
const LOAD_CHUNK: usize = 10_000;
/// Syncs of a lone agent on the loaded server: the latency baseline.
const LONE_SYNCS: usize = 200;
/// How long a start or a stop on the full datastore may take.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one sync may take before it counts as failed.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for the server's memory to settle after a start before it is read.
const SETTLE: Duration = Duration::from_secs(2);

/// The server's `[limits]`: rate limits off, since every simulated agent comes from
/// 127.0.0.1 and they attest in bulk, and no cap per address on connections still in their
/// handshake. The idle timeout keeps its default (2 min), far above the 5 s sync.
const LIMITS: &str = "attestations_per_ip_per_second = 0.0\n\
                      signings_per_ip_per_second = 0.0\n\
                      signings_per_agent_per_second = 0.0\n\
                      max_unauthenticated_connections = 1024\n\
                      max_unauthenticated_connections_per_ip = 0";

/// What writing the datastore directly took.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// Registered agents written, one `create_agent` transaction each.
    agents: usize,
    agents_time: Duration,
    entries: usize,
    entries_time: Duration,
    /// Reading every entry back, as the server does at start.
    read_time: Duration,
}

/// What the measured window saw.
#[derive(Debug, Default)]
struct Window {
    latencies: Samples,
    failures: usize,
    first_failure: Option<String>,
    server_cpu: Duration,
    client_cpu: Duration,
    elapsed: Duration,
}

pub(crate) async fn run(
    report: &mut Report,
    binary: &Path,
    index: &index::Outcome,
    scale: &Scale,
    progress: &dyn Fn(&str),
) -> anyhow::Result<()> {
    let n = scale.connected_agents.min(scale.registered_agents).max(1);
    let dir = scratch_dir("lanyard-bench-scale")?;
    let files = ServerFiles::write(dir.path(), LIMITS)?;

    // First life, on an empty datastore: its memory, then the connected agents attest.
    progress("scale: the server on an empty datastore");
    let mut server = ServerProcess::spawn(binary, &files)?;
    server.wait_admin(START_TIMEOUT).await?;
    tokio::time::sleep(SETTLE).await;
    let rss_empty = server.rss();
    progress(&format!("scale: attesting {n} agents through the API"));
    let started = Instant::now();
    let mut agents = server
        .target()
        .attest_agents(n, ATTEST_PARALLEL)
        .await
        .with_context(|| format!("attesting {n} agents"))?;
    let attest_time = started.elapsed();
    for agent in &mut agents {
        agent.disconnect();
    }
    server.stop(START_TIMEOUT).await?;

    progress(&format!(
        "scale: writing {} more agents and {} entries into SQLite",
        scale.registered_agents.saturating_sub(n),
        scale.registered_agents.max(n) * scale.entries_per_agent
    ));
    let load = preload(&files.config, &agents, scale).await?;

    // Second life, on the full datastore.
    progress("scale: the server on the full datastore");
    let mut server = ServerProcess::spawn(binary, &files)?;
    let first_start = server.wait_admin(START_TIMEOUT).await?;
    tokio::time::sleep(SETTLE).await;
    let rss_loaded = server.rss();
    let target = server.target();
    let lone = lone_syncs(&mut agents, &target.addr).await?;
    progress(&format!("scale: connecting {n} agents"));
    let connect_time = connect_all(&mut agents, target.addr).await?;
    progress(&format!(
        "scale: {n} agents syncing every {:?}: {:?} warm-up, {:?} measured",
        scale.sync_interval, scale.warm_up, scale.window
    ));
    let agents = Arc::new(agents);
    let window = sustain(&agents, &target.cpu, scale).await?;
    server.check_running()?;
    let rss_connected = server.rss();

    progress("scale: restart on the full datastore");
    let mut agents = Arc::try_unwrap(agents).unwrap_or_else(|shared| shared.as_ref().clone());
    for agent in &mut agents {
        agent.disconnect();
    }
    server.stop(START_TIMEOUT).await?;
    let restarted = Instant::now();
    let mut server = ServerProcess::spawn(binary, &files)?;
    let serving = first_sync_after_start(&mut server, &mut agents).await?;
    connect_all(&mut agents, target.addr).await?;
    let all_synced = restarted.elapsed();
    for agent in &mut agents {
        agent.disconnect();
    }
    server.stop(START_TIMEOUT).await?;
    drop(dir);

    record(
        report,
        scale,
        index,
        &Figures {
            n,
            load,
            attest_time,
            first_start,
            rss_empty,
            rss_loaded,
            rss_connected,
            lone,
            connect_time,
            window,
            serving,
            all_synced,
        },
    );
    Ok(())
}

/// Writes the registered agents that are not connected (one `create_agent` transaction
/// each: the store has no bulk method for agents) and every entry (10k per transaction)
/// straight into the server's SQLite file, then reads the entries back.
async fn preload(
    config: &ServerConfig,
    connected: &[SimAgent],
    scale: &Scale,
) -> anyhow::Result<Load> {
    let store = SqlStore::open(&config.datastore_path()).await?;
    let td = trust_domain();
    let others = scale.registered_agents.saturating_sub(connected.len());
    let not_after = SystemTime::now() + Duration::from_secs(24 * 3600);
    let mut ids: Vec<SpiffeId> = connected.iter().map(|agent| agent.id.clone()).collect();
    let started = Instant::now();
    for i in 0..others {
        let id = SpiffeId::from_path(&td, &format!("/spire/agent/join_token/scale-{i:06}"))?;
        let agent = AttestedAgent::new(
            id.clone(),
            "join_token",
            (1_000_000 + i).to_string(),
            not_after,
        );
        store.create_agent(agent).await?;
        ids.push(id);
    }
    let agents_time = started.elapsed();

    let started = Instant::now();
    let entries = ids.len() * scale.entries_per_agent;
    let mut chunk = Vec::with_capacity(LOAD_CHUNK);
    for (a, parent) in ids.iter().enumerate() {
        for k in 0..scale.entries_per_agent {
            chunk.push(scale_entry(a, k, parent)?);
            if chunk.len() == LOAD_CHUNK {
                store.create_entries(std::mem::take(&mut chunk)).await?;
            }
        }
    }
    if !chunk.is_empty() {
        store.create_entries(chunk).await?;
    }
    let entries_time = started.elapsed();

    let started = Instant::now();
    let read = store.list_all_entries().await?.len();
    let read_time = started.elapsed();
    store.close().await;
    anyhow::ensure!(read == entries, "read {read} entries, stored {entries}");
    Ok(Load {
        agents: others,
        agents_time,
        entries,
        entries_time,
        read_time,
    })
}

/// Entry `k` of agent `a`.
fn scale_entry(a: usize, k: usize, parent: &SpiffeId) -> anyhow::Result<RegistrationEntry> {
    let selectors: SelectorSet = [format!("unix:uid:{}", 1000 + k).parse()?]
        .into_iter()
        .collect();
    let mut entry = RegistrationEntry::new(
        EntryId::new(&format!("scale-{a:06}-{k:02}"))?,
        SpiffeId::from_path(&trust_domain(), &format!("/scale/a{a}/w{k}"))?,
        parent.clone(),
        selectors,
        SystemTime::now(),
    );
    entry.x509_svid_ttl = Some(Duration::from_secs(3600));
    Ok(entry)
}

/// The first agent alone on the loaded server: one sync to connect, then [`LONE_SYNCS`] one
/// after the other.
async fn lone_syncs(
    agents: &mut [SimAgent],
    addr: &std::net::SocketAddr,
) -> anyhow::Result<Samples> {
    let agent = agents.first_mut().ok_or_else(|| anyhow!("no agent"))?;
    agent.channel = agent.connect(*addr).await?;
    sync_once(agent).await?;
    let mut samples = Samples::new();
    for _ in 0..LONE_SYNCS {
        let started = Instant::now();
        sync_once(agent).await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// Connects every agent (a new mTLS connection) and has each sync once, [`CONNECT_PARALLEL`]
/// at a time; returns how long that took.
async fn connect_all(
    agents: &mut [SimAgent],
    addr: std::net::SocketAddr,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(CONNECT_PARALLEL));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, agent) in agents.iter().enumerate() {
        let permit = Arc::clone(&semaphore).acquire_owned().await?;
        let mut agent = agent.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let connected = async {
                agent.channel = agent.connect(addr).await?;
                sync_once(&agent).await?;
                Ok::<_, anyhow::Error>(())
            }
            .await;
            (i, connected.map(|()| agent.channel))
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let (i, channel) = joined?;
        let channel = channel.with_context(|| {
            format!(
                "connecting agent {i} of {} (file descriptors: `ulimit -n`; memory)",
                agents.len()
            )
        })?;
        if let Some(agent) = agents.get_mut(i) {
            agent.channel = channel;
        }
    }
    Ok(started.elapsed())
}

/// Every agent syncs every `sync_interval`, starting at its own phase, for the warm-up and
/// the window; the syncs that end inside the window are counted, with the CPU time the server
/// and this process (the load) spent in it.
async fn sustain(
    agents: &Arc<Vec<SimAgent>>,
    server_cpu: &CpuMeter,
    scale: &Scale,
) -> anyhow::Result<Window> {
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + scale.warm_up;
    let until = measure_from + scale.window;
    let interval = scale.sync_interval;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..agents.len() {
        let agents = Arc::clone(agents);
        tasks.spawn(async move {
            let mut seen = Window::default();
            let Some(agent) = agents.get(i) else {
                return seen;
            };
            let mut next = start + phase_offset(i, interval);
            while next < until {
                tokio::time::sleep_until(next).await;
                let began = Instant::now();
                let result = tokio::time::timeout(SYNC_TIMEOUT, sync_once(agent)).await;
                let done = Instant::now();
                if (measure_from..=until).contains(&done) {
                    match result {
                        Ok(Ok(_)) => seen.latencies.push(done - began),
                        Ok(Err(e)) => seen.fail(format!("{e:#}")),
                        Err(_) => seen.fail(format!("no answer within {SYNC_TIMEOUT:?}")),
                    }
                }
                // As the agent's ticker: the next sync is due an interval after this one was,
                // or at once if this one took longer than that.
                next = (next + interval).max(done);
            }
            seen
        });
    }

    let own_cpu = CpuMeter::Process(std::process::id());
    tokio::time::sleep_until(measure_from).await;
    let (server_before, own_before, began) =
        (server_cpu.cpu_time(), own_cpu.cpu_time(), Instant::now());
    tokio::time::sleep_until(until).await;
    let mut window = Window {
        server_cpu: server_cpu.cpu_time().saturating_sub(server_before),
        client_cpu: own_cpu.cpu_time().saturating_sub(own_before),
        elapsed: began.elapsed(),
        ..Window::default()
    };
    while let Some(joined) = tasks.join_next().await {
        let seen = joined?;
        window.latencies.extend(seen.latencies);
        window.failures += seen.failures;
        if window.first_failure.is_none() {
            window.first_failure = seen.first_failure;
        }
    }
    if window.latencies.is_empty() {
        anyhow::bail!(
            "no sync succeeded in the window; first failure: {}",
            window.first_failure.as_deref().unwrap_or("none")
        );
    }
    Ok(window)
}

impl Window {
    fn fail(&mut self, message: String) {
        self.failures += 1;
        self.first_failure.get_or_insert(message);
    }
}

/// Starts polling at once: until the first agent, reconnecting, has a sync answered.
async fn first_sync_after_start(
    server: &mut ServerProcess,
    agents: &mut [SimAgent],
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let addr = server.target().addr;
    let agent = agents.first_mut().ok_or_else(|| anyhow!("no agent"))?;
    loop {
        server.check_running()?;
        if let Ok(channel) = agent.connect(addr).await {
            agent.channel = channel;
            if sync_once(agent).await.is_ok() {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() >= START_TIMEOUT {
            anyhow::bail!(
                "no agent was served within {START_TIMEOUT:?} of the restart:\n{}",
                server.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Everything [`record`] reports.
#[derive(Debug)]
struct Figures {
    n: usize,
    load: Load,
    attest_time: Duration,
    first_start: Duration,
    rss_empty: u64,
    rss_loaded: u64,
    rss_connected: u64,
    lone: Samples,
    connect_time: Duration,
    window: Window,
    serving: Duration,
    all_synced: Duration,
}

fn record(report: &mut Report, scale: &Scale, index: &index::Outcome, figures: &Figures) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let per_sec = |count: usize, d: Duration| count as f64 / d.as_secs_f64().max(f64::MIN_POSITIVE);
    let Figures {
        n,
        load,
        ref window,
        ..
    } = *figures;
    let interval = scale.sync_interval.as_secs_f64();
    let syncs = window.latencies.len();
    let elapsed = window.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    let syncs_per_sec = syncs as f64 / elapsed;
    let cpu_us_per_sync = window.server_cpu.as_secs_f64() * 1e6 / syncs.max(1) as f64;
    let agents_per_core = interval * 1e6 / cpu_us_per_sync.max(f64::MIN_POSITIVE);
    let server_cores = window.server_cpu.as_secs_f64() / elapsed;
    let client_cores = window.client_cpu.as_secs_f64() / elapsed;
    let cores = report.machine.cores as f64;
    let registered = scale.registered_agents.max(n);
    let entries = load.entries;
    let interval_label = format!("{:?}", scale.sync_interval);

    let mut notes = Vec::new();
    if server_cores + client_cores > 0.9 * cores {
        notes.push(format!(
            "scale: the machine's {cores} cores were saturated in the window (server {server_cores:.2} \
             cores, the simulated agents in this process {client_cores:.2}): the syncs per second \
             and latencies are the machine's limit, not the server's alone; CPU per sync and \
             the agents per core are the server's own"
        ));
    }
    if window.failures > 0 {
        notes.push(format!(
            "scale: {} syncs failed in the window; the first: {}",
            window.failures,
            window.first_failure.as_deref().unwrap_or("")
        ));
    }

    let mut bench = report.bench("scale");
    bench.versus(
        "syncs_per_sec",
        &format!("syncs per second sustained, {n} agents connected, each every {interval_label}"),
        syncs_per_sec,
        "/s",
        (
            &format!("{n} agents ÷ {interval_label}"),
            n as f64 / interval,
            "/s",
        ),
    );
    bench.versus(
        "server_cpu_us_per_sync",
        &format!("server CPU per sync ({registered} agents and {entries} entries registered)"),
        cpu_us_per_sync,
        "µs",
        ("index lookup alone", index.lookup_us, "µs"),
    );
    bench.versus(
        "agents_per_core",
        &format!("agents one server core sustains at a {interval_label} interval ({interval_label} ÷ CPU per sync)"),
        agents_per_core,
        "agents",
        ("agents connected in this run", n as f64, "agents"),
    );
    bench.versus(
        "sync_p50_ms",
        &format!("sync latency p50, {n} agents"),
        window.latencies.percentile_ms(50.0),
        "ms",
        (
            "a lone agent's sync, same server",
            figures.lone.percentile_ms(50.0),
            "ms",
        ),
    );
    bench.versus(
        "sync_p99_ms",
        &format!("sync latency p99, {n} agents"),
        window.latencies.percentile_ms(99.0),
        "ms",
        (
            "a lone agent's sync, same server",
            figures.lone.percentile_ms(99.0),
            "ms",
        ),
    );
    bench.figure(
        "failed_syncs",
        "syncs failed in the window",
        window.failures as f64,
        "",
    );
    bench.versus(
        "server_cpu_cores",
        "server CPU in the window",
        server_cores,
        "cores",
        ("cores on this machine", cores, "cores"),
    );
    bench.versus(
        "load_cpu_cores",
        "the simulated agents' CPU (this process) in the window",
        client_cores,
        "cores",
        ("cores on this machine", cores, "cores"),
    );
    bench.figure(
        "rss_per_agent_kb",
        &format!("server RSS per connected agent ({n} connected, after the window)"),
        figures.rss_connected.saturating_sub(figures.rss_loaded) as f64 / n as f64 / 1e3,
        "kB",
    );
    let rss_per_entry =
        figures.rss_loaded.saturating_sub(figures.rss_empty) as f64 / entries.max(1) as f64;
    let label = format!(
        "server RSS per entry (full datastore against an empty one, {registered} agents, {entries} entries)"
    );
    match index.bytes_per_entry {
        Some((index_entries, bytes)) => bench.versus(
            "rss_per_entry_b",
            &label,
            rss_per_entry,
            "B",
            (
                &format!("the authorization index alone, {index_entries} entries"),
                bytes,
                "B",
            ),
        ),
        None => bench.figure("rss_per_entry_b", &label, rss_per_entry, "B"),
    }
    bench.figure(
        "rss_empty_mib",
        "server RSS, empty datastore",
        mib(figures.rss_empty),
        "MiB",
    );
    bench.figure(
        "rss_loaded_mib",
        "server RSS, full datastore, no agent connected",
        mib(figures.rss_loaded),
        "MiB",
    );
    bench.figure(
        "rss_connected_mib",
        &format!("server RSS, full datastore, {n} agents connected"),
        mib(figures.rss_connected),
        "MiB",
    );
    bench.versus(
        "restart_to_serving_ms",
        &format!("restart (SIGTERM, start) → an agent's sync answered, {entries} entries"),
        ms(figures.serving),
        "ms",
        ("reading every entry from SQLite", ms(load.read_time), "ms"),
    );
    bench.versus(
        "restart_all_synced_ms",
        &format!("restart → all {n} agents reconnected and synced"),
        ms(figures.all_synced),
        "ms",
        (
            &format!("connecting and syncing all {n} on the running server"),
            ms(figures.connect_time),
            "ms",
        ),
    );
    bench.figure(
        "first_start_ms",
        "first start on the written datastore → admin API answers (first the audit log \
         records every change written behind the server's back)",
        ms(figures.first_start),
        "ms",
    );
    bench.figure(
        "attest_per_sec",
        &format!("agents attested through the API (join tokens, {ATTEST_PARALLEL} at a time)"),
        per_sec(n, figures.attest_time),
        "/s",
    );
    bench.figure(
        "load_agents_per_sec",
        &format!(
            "registered agents written into SQLite, one transaction each ({} agents, {:.1} s)",
            load.agents,
            load.agents_time.as_secs_f64()
        ),
        per_sec(load.agents, load.agents_time),
        "/s",
    );
    bench.figure(
        "load_entries_per_sec",
        &format!(
            "entries written into SQLite, {LOAD_CHUNK} per transaction ({entries} entries, {:.1} s)",
            load.entries_time.as_secs_f64()
        ),
        per_sec(load.entries, load.entries_time),
        "/s",
    );
    report.notes.extend(notes);
}
