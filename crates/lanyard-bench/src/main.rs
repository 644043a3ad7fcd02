//! `lanyard-bench`: starts real Lanyard servers and agents on loopback, simulates agents and
//! workloads, and reports throughput, latency and scale, each figure against a baseline
//! measured in the same run (the raw crypto, the index alone, a lone workload, the sync
//! interval) or against SPIRE on the same machine.
// A command-line tool: progress goes to stderr, the table to stdout.
#![allow(clippy::print_stderr, clippy::print_stdout)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

mod bench;
mod charts;
mod cpu;
mod harness;
mod plan;
mod postgres;
mod report;
mod server_process;
mod spire;
mod stats;
mod workload;

use crate::harness::{LanyardServer, scratch_dir};
use crate::plan::Plan;
use crate::report::{Machine, Report};

#[derive(Debug, Parser)]
#[command(name = "lanyard-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A small version of every benchmark (for CI: under two minutes).
    #[arg(long)]
    quick: bool,
    /// Write every figure, with its baseline and ratio, as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Directory for the markdown table and the PNG charts.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Run only these benchmarks (comma-separated): mint, batch, jwt, index, sync, fanin,
    /// revoke, restart, writes, propagation, scale. `scale` runs only when named here: 100k
    /// registered agents, 1M entries and 10k agents syncing every 5 s against a `lanyard
    /// server run` child (about 5 minutes; `--quick`: 2k agents, 20k entries, 200 syncing).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The `lanyard` binary that `scale` runs as its server (default: the one beside this
    /// executable, e.g. `target/release/lanyard` from `cargo build --release -p lanyard`).
    #[arg(long)]
    lanyard_bin: Option<PathBuf>,
    /// Also run batch, jwt, sync, fanin and propagation against SPIRE on this machine.
    #[arg(long)]
    against_spire: bool,
    /// Also run batch and fanin in rounds with metrics off and on (a server and agent with
    /// `metrics_address`, scraped every second), each run on a fresh server and agent, the
    /// order alternating so that drift cancels, and record the median and spread of each
    /// figure's per-round on ÷ off ratios.
    #[arg(long)]
    metrics_overhead: bool,
    /// Directory with spire-server and spire-agent (default: build them from the Go module
    /// proxy, as the interoperability tests do, cached under `<target>/interop/`).
    #[arg(long)]
    spire_bin: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a Lanyard agent (the benchmarks start it as a child process).
    #[command(hide = true)]
    AgentChild(AgentChildArgs),
}

#[derive(Debug, Args)]
struct AgentChildArgs {
    #[arg(long)]
    server_address: String,
    #[arg(long)]
    trust_bundle: PathBuf,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    socket: PathBuf,
    #[arg(long)]
    join_token: String,
    #[arg(long)]
    sync_interval_ms: u64,
    /// Serve `/metrics` here.
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
}

/// Thread-name prefix of this process's load runtime: simulated agents and workloads (and, in
/// an `agent-child`, the agent).
pub(crate) const LOAD_THREADS: &str = "lanyard-load";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let is_agent_child = matches!(cli.command, Some(Command::AgentChild(_)));
    install_logging(is_agent_child);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(2)
        .thread_name(LOAD_THREADS)
        .enable_all();
    if is_agent_child {
        // As `lanyard agent run` prepares its threads.
        builder.on_thread_park(lanyard_agent::heap::reserve_worker_heap);
    }
    let runtime = builder.build()?;
    match cli.command {
        Some(Command::AgentChild(args)) => runtime.block_on(agent_child(args)),
        None => runtime.block_on(run(cli)),
    }
}

/// Installs a subscriber as the `lanyard` binary does (`info`, unless `RUST_LOG` says
/// otherwise), so that what is measured pays for logging what a deployment pays: with none
/// installed, every disabled span and event of the HTTP/2 stack would take `tracing`'s `log`
/// fallback instead. An `agent-child` writes to its stderr (a file the benchmark names); this
/// process discards its lines unless `RUST_LOG` is set, to keep its report readable.
fn install_logging(agent_child: bool) {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let requested = std::env::var_os("RUST_LOG").is_some();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = if agent_child || requested {
        BoxMakeWriter::new(std::io::stderr)
    } else {
        BoxMakeWriter::new(std::io::sink)
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init();
}

async fn agent_child(args: AgentChildArgs) -> anyhow::Result<()> {
    let mut config = lanyard_agent::AgentConfig::new(
        args.server_address,
        harness::trust_domain(),
        args.data_dir,
    );
    config.trust_bundle_path = Some(args.trust_bundle);
    config.socket_path = args.socket;
    config.join_token = Some(args.join_token);
    config.sync_interval = Duration::from_millis(args.sync_interval_ms);
    config.metrics_address = args.metrics_address;
    // Every simulated workload is this benchmark's uid: the per-uid limits that protect
    // workloads from each other would measure themselves instead of the agent (SPIRE, which
    // the benchmarks compare against, has none).
    config.workload_api.max_connections_per_uid = usize::MAX;
    config.workload_api.requests_per_second_per_uid = 0;
    let parent = parent_pid();
    // Exit with the benchmark even if it is killed before it can stop us.
    let orphaned = async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if parent_pid() != parent {
                return;
            }
        }
    };
    lanyard_agent::run(config, orphaned).await?;
    Ok(())
}

fn parent_pid() -> u32 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let plan = if cli.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    let selected = |name: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == name);
    let mut report = Report::new(plan.mode, Machine::detect());
    let started = Instant::now();
    let step = |name: &str| eprintln!("[{:>6.1}s] {name}", started.elapsed().as_secs_f64());

    let ceiling = {
        step("mint");
        let duration = plan.mint_duration;
        let mut mint_report = Report::new(plan.mode, report.machine.clone());
        let (ceiling, mint_report) = tokio::task::spawn_blocking(move || {
            bench::mint::run(&mut mint_report, duration).map(|c| (c, mint_report))
        })
        .await??;
        if selected("mint") {
            report.merge(mint_report);
        }
        ceiling
    };
    let index = {
        step("index");
        let mut index_report = Report::new(plan.mode, report.machine.clone());
        let shapes = plan.index_shapes.clone();
        let (lookups, changes) = (plan.index_lookups, plan.index_changes);
        let (outcome, index_report) = tokio::task::spawn_blocking(move || {
            let outcome = bench::index::run(&mut index_report, &shapes, lookups, changes);
            (outcome, index_report)
        })
        .await?;
        if selected("index") {
            report.merge(index_report);
        }
        outcome
    };

    let mut lanyard = plan::Outcomes::default();
    if SINGLE_SERVER.iter().any(|b| selected(b)) {
        let dir = scratch_dir("lanyard-bench-server")?;
        let server = LanyardServer::start(LanyardServer::config_in(dir.path())).await?;
        let target = server.target();
        if selected("batch") {
            step("batch");
            lanyard.batch =
                Some(bench::batch::run(&mut report, &target, ceiling, &plan.batch).await?);
        }
        if selected("jwt") {
            step("jwt");
            let raw = bench::jwt::raw_rate(report.machine.cores, plan.mint_duration)?;
            lanyard.jwt = Some(bench::jwt::run(&mut report, &target, raw, &plan.jwt).await?);
        }
        if selected("sync") {
            step("sync");
            lanyard.sync =
                Some(bench::sync::run(&mut report, &target, index.lookup_us, &plan.sync).await?);
        }
        if selected("fanin") {
            step("fanin");
            lanyard.fanin = Some(bench::fanin::run(&mut report, &target, &plan.fanin).await?);
        }
        if selected("revoke") {
            step("revoke");
            let lanyard = server_process::lanyard_binary(cli.lanyard_bin.as_deref()).ok();
            bench::revoke::run(&mut report, &target, &plan.revoke, lanyard.as_deref()).await?;
        }
        server.shutdown().await;
        drop(dir);
    }

    if cli.metrics_overhead && (selected("batch") || selected("fanin")) {
        let scale = &plan.overhead;
        let which = (selected("batch"), selected("fanin"));
        let mut rounds = Vec::with_capacity(scale.rounds);
        let mut scrapes = 0;
        for (i, order) in bench::overhead::schedule(scale.rounds)
            .into_iter()
            .enumerate()
        {
            let (mut off, mut on) = (None, None);
            for metrics in order {
                step(&format!(
                    "metrics overhead: round {}/{}, metrics {metrics}",
                    i + 1,
                    scale.rounds
                ));
                let (run, n) =
                    bench::overhead::run(metrics, ceiling, scale, which, &report).await?;
                scrapes += n;
                match metrics {
                    bench::overhead::Metrics::Off => off = Some(run),
                    bench::overhead::Metrics::On => on = Some(run),
                }
            }
            if let (Some(off), Some(on)) = (off, on) {
                rounds.push(bench::overhead::Round { off, on });
            }
        }
        bench::overhead::record(&mut report, &rounds, scrapes);
        step("metrics overhead: the gRPC call metrics' layer");
        let cheapest_call_us = std::iter::once(&report)
            .chain(rounds.iter().map(|round| &round.off))
            .find_map(|r| {
                r.figures
                    .iter()
                    .find(|f| f.key == "batch.agents_1.size_1.server_cpu_us_per_svid")
                    .map(|f| f.value)
            });
        bench::overhead::rpc_layer_cost(&mut report, cheapest_call_us, plan.rpc_layer_calls);
    }

    if selected("restart") {
        step("restart");
        let url = postgres::fresh_database().await?;
        bench::restart::run(&mut report, plan.restart_entries, Some(&url)).await?;
    }
    if selected("writes") {
        step("writes");
        let url = postgres::fresh_database().await?;
        bench::writes::run(&mut report, &url, &plan.writes).await?;
    }
    if selected("propagation") {
        step("propagation");
        lanyard.propagation = Some(lanyard_propagation(&mut report, &plan.propagation).await?);
    }
    if ["restart", "writes", "propagation"]
        .iter()
        .any(|b| selected(b))
    {
        report.notes.push(postgres::CLUSTER_NOTE.to_owned());
    }

    if cli.only.iter().any(|o| o == "scale") {
        step("scale");
        let binary = server_process::lanyard_binary(cli.lanyard_bin.as_deref())?;
        bench::scale::run(&mut report, &binary, &index, &plan.scale, &step).await?;
    }

    if cli.against_spire {
        step("against SPIRE");
        let bin = match cli.spire_bin.clone() {
            Some(bin) => bin,
            None => build_spire()?,
        };
        let mut outcomes = plan::Outcomes::default();
        if SINGLE_SERVER.iter().any(|b| selected(b)) {
            let dir = scratch_dir("lanyard-bench-spire")?;
            let spire = spire::SpireServer::start(&bin, dir.path()).await?;
            let target = spire.target.clone();
            if selected("batch") {
                step("batch (SPIRE)");
                outcomes.batch =
                    Some(bench::batch::run(&mut report, &target, ceiling, &plan.batch).await?);
            }
            if selected("jwt") {
                step("jwt (SPIRE)");
                let raw = bench::jwt::raw_rate(report.machine.cores, plan.mint_duration)?;
                outcomes.jwt = Some(bench::jwt::run(&mut report, &target, raw, &plan.jwt).await?);
            }
            if selected("sync") {
                step("sync (SPIRE)");
                outcomes.sync = Some(
                    bench::sync::run(&mut report, &target, index.lookup_us, &plan.sync).await?,
                );
            }
            if selected("fanin") {
                step("fanin (SPIRE)");
                outcomes.fanin = Some(bench::fanin::run(&mut report, &target, &plan.fanin).await?);
            }
            drop(spire);
        }
        if selected("propagation") {
            step("propagation (SPIRE)");
            outcomes.propagation =
                Some(spire_propagation(&mut report, &bin, &plan.propagation).await?);
        }
        spire::compare(&mut report, &lanyard, &outcomes);
    }

    step("writing results");
    write_outputs(&report, &cli)?;
    step("done");
    Ok(())
}

/// The benchmarks that run against one server with its SQLite datastore.
const SINGLE_SERVER: [&str; 5] = ["batch", "jwt", "sync", "fanin", "revoke"];

/// `propagation` on two Lanyard servers, instances `a` and `b`, over a fresh PostgreSQL
/// database.
async fn lanyard_propagation(
    report: &mut Report,
    scale: &bench::propagation::Scale,
) -> anyhow::Result<bench::propagation::Outcome> {
    let url = postgres::fresh_database().await?;
    let dir = scratch_dir("lanyard-bench-pair")?;
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a)?;
    std::fs::create_dir_all(&dir_b)?;
    let config_a = LanyardServer::postgres_config_in(&dir_a, "a", &url);
    let poll_interval = config_a.datastore.poll_interval;
    // One after the other: the first brings the schema up to date.
    let a = LanyardServer::start(config_a).await?;
    let b = LanyardServer::start(LanyardServer::postgres_config_in(&dir_b, "b", &url)).await?;
    let outcome =
        bench::propagation::run(report, &a.target(), &b.target(), Some(poll_interval), scale).await;
    b.shutdown().await;
    a.shutdown().await;
    outcome
}

/// `propagation` on two `spire-server`s over a fresh PostgreSQL database.
async fn spire_propagation(
    report: &mut Report,
    bin: &std::path::Path,
    scale: &bench::propagation::Scale,
) -> anyhow::Result<bench::propagation::Outcome> {
    let datastore = spire::SpireDatastore::Postgres(postgres::fresh_database().await?);
    let dir = scratch_dir("lanyard-bench-spire-pair")?;
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a)?;
    std::fs::create_dir_all(&dir_b)?;
    // One after the other: the first creates the schema.
    let a = spire::SpireServer::start_on(bin, &dir_a, &datastore).await?;
    let b = spire::SpireServer::start_on(bin, &dir_b, &datastore).await?;
    bench::propagation::run(report, &a.target, &b.target, None, scale).await
}

fn write_outputs(report: &Report, cli: &Cli) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let mut report = report.clone();
    match charts::load_font() {
        Some(_) => {
            for chart in &report.charts {
                charts::draw(chart, &cli.out)?;
            }
        }
        None => report
            .notes
            .push("charts: no TrueType font found (set LANYARD_BENCH_FONT); PNGs skipped".into()),
    }
    let markdown = report.to_markdown();
    std::fs::write(cli.out.join("results.md"), &markdown)?;
    if let Some(json) = &cli.json {
        if let Some(parent) = json.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(json, report.to_json()?)?;
    }
    println!("{markdown}");
    Ok(())
}

/// Builds (or reuses) SPIRE the way the interoperability tests do, and returns the directory
/// that holds `spire-server` and `spire-agent`.
fn build_spire() -> anyhow::Result<PathBuf> {
    let spire = std::panic::catch_unwind(lanyard_e2e::toolchain::spire).map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        anyhow::anyhow!("cannot build SPIRE (or pass --spire-bin DIR): {message}")
    })?;
    spire
        .server
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("SPIRE was built into no directory"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::bench::index::{Layout, Shape};

    /// A small run of the in-process benchmarks, end to end, checking that every figure the
    /// report promises is there and that the JSON carries baselines and ratios.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_run_produces_every_expected_key() {
        let mut report = Report::new("test", Machine::detect());
        let mut mint_report = Report::new("test", report.machine.clone());
        let (ceiling, mint_report) = tokio::task::spawn_blocking(move || {
            let ceiling = bench::mint::run(&mut mint_report, Duration::from_millis(20)).unwrap();
            (ceiling, mint_report)
        })
        .await
        .unwrap();
        report.merge(mint_report);
        assert!(ceiling.mint_per_core > 0.0);
        let shapes = [
            Shape {
                name: "direct",
                agents: 20,
                layout: Layout::Direct { per_agent: 3 },
                spire_reference: false,
            },
            Shape {
                name: "spire_shape",
                agents: 50,
                layout: Layout::Aliased {
                    aliases: 5,
                    per_alias: 2,
                },
                spire_reference: true,
            },
        ];
        let index = bench::index::run(&mut report, &shapes, 10, 10);
        assert!(index.lookup_us > 0.0);

        let dir = scratch_dir("lanyard-bench-test").unwrap();
        let server = LanyardServer::start(LanyardServer::config_in(dir.path()))
            .await
            .unwrap();
        let target = server.target();
        let scale = bench::batch::Scale {
            batch_sizes: vec![1, 3],
            agent_counts: vec![1, 2],
            duration: Duration::from_millis(50),
        };
        let grid = bench::batch::run(&mut report, &target, ceiling, &scale)
            .await
            .unwrap();
        assert_eq!(grid.len(), 4);
        let jwt = bench::jwt::Scale {
            agents: 2,
            duration: Duration::from_millis(50),
        };
        bench::jwt::run(&mut report, &target, 1000.0, &jwt)
            .await
            .unwrap();
        server.shutdown().await;
        bench::restart::run(&mut report, 30, None).await.unwrap();

        let keys: BTreeSet<&str> = report.figures.iter().map(|f| f.key.as_str()).collect();
        let mut expected = vec![
            "jwt.per_sec".to_owned(),
            "jwt.p50_ms".to_owned(),
            "jwt.p99_ms".to_owned(),
            "jwt.server_cpu_us_per_jwt".to_owned(),
            "restart.start_to_serving_ms".to_owned(),
            "restart.start_ms".to_owned(),
            "restart.bulk_load_entries_per_sec".to_owned(),
        ];
        for threads in [1, 2] {
            expected.push(format!("mint.threads_{threads}.svids_per_sec"));
            expected.push(format!("mint.threads_{threads}.us_per_svid"));
        }
        for shape in ["direct", "spire_shape"] {
            for figure in [
                "build_ms",
                "lookup_us",
                "build_us_per_entry",
                "change_us",
                "bytes_per_entry",
            ] {
                expected.push(format!("index.{shape}.{figure}"));
            }
        }
        for agents in [1, 2] {
            for size in [1, 3] {
                for figure in [
                    "svids_per_sec",
                    "p50_ms",
                    "p99_ms",
                    "server_cpu_us_per_svid",
                ] {
                    expected.push(format!("batch.agents_{agents}.size_{size}.{figure}"));
                }
            }
        }
        for key in &expected {
            assert!(keys.contains(key.as_str()), "missing {key}; have {keys:?}");
        }

        let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        let figures = json["figures"].as_array().unwrap();
        assert_eq!(figures.len(), report.figures.len());
        for figure in figures {
            assert!(figure["value"].is_number(), "{figure}");
            assert!(figure["unit"].is_string(), "{figure}");
            if !figure["baseline"].is_null() {
                assert!(figure["baseline"]["value"].is_number(), "{figure}");
                assert!(figure["baseline"]["ratio"].is_number(), "{figure}");
            }
        }
        let spire = report.get("index.spire_shape.lookup_us").unwrap();
        let baseline = spire.baseline.as_ref().unwrap();
        assert_eq!(baseline.kind, crate::report::BaselineKind::Published);
        assert_eq!(baseline.value, 21.0);
        assert!(report.value("mint.threads_1.svids_per_sec").unwrap() > 0.0);
        assert_eq!(report.charts.len(), 4);
        let markdown = report.to_markdown();
        for bench in ["mint", "index", "batch", "jwt", "restart"] {
            assert!(markdown.contains(&format!("### `{bench}`")), "{bench}");
        }
    }
}
