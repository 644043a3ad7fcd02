//! `writes`: registration entries created one per call through the Entry API
//! (`BatchCreateEntry` with one entry, as `lanyard entry create` and `spire-server entry
//! create` send it) by a few concurrent admin clients on the admin socket, each waiting for its
//! answer before the next; on SQLite and on PostgreSQL in the same run, PostgreSQL against
//! SQLite.

use std::sync::Arc;
use std::time::Duration;

use lanyard_proto::spire::api::server::entry::v1::BatchCreateEntryRequest;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_server::ServerConfig;
use tokio::time::Instant;

use crate::harness::{LanyardServer, Target, entry_message, scratch_dir};
use crate::report::Report;
use crate::stats::{Samples, per_second};

/// The shape of one run.
#[derive(Debug, Clone)]
pub(crate) struct Scale {
    /// Admin clients writing at once, each on its own connection.
    pub(crate) clients: usize,
    /// Entries written in all, per datastore.
    pub(crate) writes: usize,
}

/// What one datastore sustained.
#[derive(Debug, Clone)]
struct Throughput {
    per_sec: f64,
    latencies: Samples,
}

/// Entries written before the measured ones: connections, statements and pages warm.
const WARM_UP: usize = 20;
/// The parent of every written entry: an agent that need not exist.
const PARENT: &str = "spiffe://example.org/spire/agent/join_token/writes";

pub(crate) async fn run(
    report: &mut Report,
    postgres_url: &str,
    scale: &Scale,
) -> anyhow::Result<()> {
    let sqlite_dir = scratch_dir("lanyard-bench-writes")?;
    let sqlite = measure(LanyardServer::config_in(sqlite_dir.path()), scale).await?;
    drop(sqlite_dir);
    let postgres_dir = scratch_dir("lanyard-bench-writes-pg")?;
    let postgres = measure(
        LanyardServer::postgres_config_in(postgres_dir.path(), "local", postgres_url),
        scale,
    )
    .await?;
    drop(postgres_dir);

    let clients = scale.clients;
    let mut bench = report.bench("writes");
    bench.figure(
        "sqlite.per_sec",
        &format!("entries created per second, {clients} admin clients, one entry per call, SQLite"),
        sqlite.per_sec,
        "/s",
    );
    bench.versus(
        "postgres.per_sec",
        &format!(
            "entries created per second, {clients} admin clients, one entry per call, PostgreSQL"
        ),
        postgres.per_sec,
        "/s",
        ("SQLite", sqlite.per_sec, "/s"),
    );
    for (p, name) in [(50.0, "p50"), (99.0, "p99")] {
        bench.versus(
            &format!("postgres.{name}_ms"),
            &format!("one entry create, {name}, PostgreSQL"),
            postgres.latencies.percentile_ms(p),
            "ms",
            ("SQLite", sqlite.latencies.percentile_ms(p), "ms"),
        );
    }
    Ok(())
}

/// Starts a server with `config`, writes the entries, stops it.
async fn measure(config: ServerConfig, scale: &Scale) -> anyhow::Result<Throughput> {
    let server = LanyardServer::start(config).await?;
    let target = server.target();
    let outcome = write_entries(&target, scale).await;
    server.shutdown().await;
    outcome
}

async fn write_entries(target: &Target, scale: &Scale) -> anyhow::Result<Throughput> {
    let clients = scale.clients.max(1);
    let mut warm = EntryClient::new(target.admin().await?);
    for i in 0..WARM_UP {
        create_one(&mut warm, &format!("/bench/writes/warm/{i}")).await?;
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let channel = target.admin().await?;
        let next = Arc::clone(&next);
        let gate = Arc::clone(&gate);
        let writes = scale.writes;
        tasks.spawn(async move {
            let mut client = EntryClient::new(channel);
            let mut latencies = Samples::new();
            gate.wait().await;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= writes {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let started = Instant::now();
                create_one(&mut client, &format!("/bench/writes/{i}")).await?;
                latencies.push(started.elapsed());
            }
        });
    }
    gate.wait().await;
    let started = Instant::now();
    let mut latencies = Samples::new();
    while let Some(joined) = tasks.join_next().await {
        latencies.extend(joined??);
    }
    let elapsed = started.elapsed();
    anyhow::ensure!(
        latencies.len() == scale.writes,
        "{} of {} writes were made",
        latencies.len(),
        scale.writes
    );
    Ok(Throughput {
        per_sec: per_second(scale.writes as u64, elapsed.max(Duration::from_nanos(1))),
        latencies,
    })
}

/// Creates one entry for `spiffe://example.org<path>`, failing on any refusal.
async fn create_one(
    client: &mut EntryClient<tonic::transport::Channel>,
    path: &str,
) -> anyhow::Result<()> {
    let entry = entry_message(PARENT, path, &["unix:uid:1000".to_owned()]);
    let result = client
        .batch_create_entry(BatchCreateEntryRequest {
            entries: vec![entry],
            output_mask: None,
        })
        .await?
        .into_inner()
        .results
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("BatchCreateEntry answered without a result"))?;
    let status = result.status.unwrap_or_default();
    anyhow::ensure!(
        status.code == 0,
        "creating an entry failed: {}",
        status.message
    );
    Ok(())
}
