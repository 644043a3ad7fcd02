//! `restart`: a server whose datastore holds many entries, from `Server::start` to answering
//! an agent's `GetAuthorizedEntries`, against reading the entries alone; on SQLite, and on
//! PostgreSQL against SQLite in the same run.

use std::time::{Duration, Instant, SystemTime};

use lanyard_core::{EntryId, RegistrationEntry, SelectorSet, SpiffeId};
use lanyard_proto::spire::api::server::entry::v1::GetAuthorizedEntriesRequest;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_server::ServerConfig;
use lanyard_server::datastore::{Datastore as _, PgStore, SqlStore};

use crate::harness::{LanyardServer, scratch_dir, trust_domain};
use crate::report::Report;

/// Entries per bulk insert.
const LOAD_CHUNK: usize = 10_000;
/// Entries under the agent that asks after the restart.
const AGENT_ENTRIES: usize = 10;

/// What one restart took.
#[derive(Debug, Clone, Copy)]
struct Restart {
    /// Until the agent was served its entries.
    serving: Duration,
    /// Until `Server::start` returned.
    started: Duration,
    /// The bulk load before the restart.
    load: Duration,
    /// Reading every entry back, as the server does at start.
    read: Duration,
}

/// Measures the restart on SQLite and, given a database URL, on PostgreSQL.
pub(crate) async fn run(
    report: &mut Report,
    entries: usize,
    postgres_url: Option<&str>,
) -> anyhow::Result<()> {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let per_sec = |d: Duration| entries as f64 / d.as_secs_f64().max(f64::MIN_POSITIVE);

    let dir = scratch_dir("lanyard-bench-restart")?;
    let sqlite = measure(LanyardServer::config_in(dir.path()), entries).await?;
    drop(dir);
    let mut bench = report.bench("restart");
    bench.versus(
        "start_to_serving_ms",
        &format!("start → authorized entries served, {entries} entries in SQLite"),
        ms(sqlite.serving),
        "ms",
        ("reading every entry from SQLite", ms(sqlite.read), "ms"),
    );
    bench.figure(
        "start_ms",
        "Server::start returns (datastore, CA, index, listeners)",
        ms(sqlite.started),
        "ms",
    );
    bench.figure(
        "bulk_load_entries_per_sec",
        "bulk load into SQLite (one transaction per 10k entries)",
        per_sec(sqlite.load),
        "/s",
    );

    let Some(url) = postgres_url else {
        return Ok(());
    };
    let dir = scratch_dir("lanyard-bench-restart-pg")?;
    let postgres = measure(
        LanyardServer::postgres_config_in(dir.path(), "local", url),
        entries,
    )
    .await?;
    drop(dir);
    bench.versus(
        "postgres.start_to_serving_ms",
        &format!("start → authorized entries served, {entries} entries in PostgreSQL"),
        ms(postgres.serving),
        "ms",
        ("the same on SQLite", ms(sqlite.serving), "ms"),
    );
    bench.versus(
        "postgres.start_vs_read_ms",
        "start → served on PostgreSQL, against reading its entries alone",
        ms(postgres.serving),
        "ms",
        (
            "reading every entry from PostgreSQL",
            ms(postgres.read),
            "ms",
        ),
    );
    bench.versus(
        "postgres.read_ms",
        &format!("reading every entry from PostgreSQL, {entries} entries"),
        ms(postgres.read),
        "ms",
        ("the same from SQLite", ms(sqlite.read), "ms"),
    );
    bench.versus(
        "postgres.bulk_load_entries_per_sec",
        "bulk load into PostgreSQL (one transaction per 10k entries)",
        per_sec(postgres.load),
        "/s",
        ("the same into SQLite", per_sec(sqlite.load), "/s"),
    );
    Ok(())
}

/// Bulk-loads `$entries` entries into `$store` and reads them all back; evaluates to the two
/// durations. A macro because `SqlStore` and `PgStore` share `create_entries` (one source,
/// `sql_body.rs`) but no trait for it.
macro_rules! load_and_read {
    ($store:expr, $entries:expr, $agent:expr) => {{
        let store = &$store;
        let entries: usize = $entries;
        let load_started = Instant::now();
        let mut created = 0;
        while created < entries {
            let chunk: Vec<RegistrationEntry> = (created..(created + LOAD_CHUNK).min(entries))
                .map(|i| restart_entry(i, $agent))
                .collect::<anyhow::Result<_>>()?;
            created += chunk.len();
            store.create_entries(chunk).await?;
        }
        let load = load_started.elapsed();
        // The baseline: reading every entry back, as the server does at start.
        let read_started = Instant::now();
        let read = store.list_all_entries().await?.len();
        let read_time = read_started.elapsed();
        anyhow::ensure!(read == entries, "read {read} entries, stored {entries}");
        (load, read_time)
    }};
}

/// The bulk load and the restart on the datastore `config` names.
async fn measure(config: ServerConfig, entries: usize) -> anyhow::Result<Restart> {
    // First life: the CA, keys and one attested agent.
    let server = LanyardServer::start(config.clone()).await?;
    let target = server.target();
    let agent = target
        .attest_agents(1, 1)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no agent"))?;
    server.shutdown().await;

    // Load the datastore directly, in large transactions, then read it all back.
    let (load, read) = match &config.datastore.connection_string {
        None => {
            let store = SqlStore::open(&config.datastore_path()).await?;
            let times = load_and_read!(store, entries, &agent.id);
            store.close().await;
            times
        }
        Some(url) => {
            let store = PgStore::connect(url.expose(), 8).await?;
            let times = load_and_read!(store, entries, &agent.id);
            store.close().await;
            times
        }
    };

    // Second life: time until the agent is served its entries again.
    let started = Instant::now();
    let server = LanyardServer::start(config).await?;
    let start_returned = started.elapsed();
    let target = server.target();
    let agent = agent.connect(target.addr).await?;
    let authorized = EntryClient::new(agent)
        .get_authorized_entries(GetAuthorizedEntriesRequest { output_mask: None })
        .await?
        .into_inner()
        .entries
        .len();
    let serving = started.elapsed();
    server.shutdown().await;
    anyhow::ensure!(
        authorized == AGENT_ENTRIES,
        "the agent got {authorized} entries, expected {AGENT_ENTRIES}"
    );
    Ok(Restart {
        serving,
        started: start_returned,
        load,
        read,
    })
}

fn restart_entry(i: usize, agent: &SpiffeId) -> anyhow::Result<RegistrationEntry> {
    let td = trust_domain();
    let parent = if i < AGENT_ENTRIES {
        agent.clone()
    } else {
        SpiffeId::from_path(&td, &format!("/spire/agent/join_token/other-{}", i / 10))?
    };
    let selectors: SelectorSet = [format!("unix:uid:{}", 1000 + i % 10).parse()?]
        .into_iter()
        .collect();
    let mut entry = RegistrationEntry::new(
        EntryId::new(&format!("restart-{i:08}"))?,
        SpiffeId::from_path(&td, &format!("/restart/{i}"))?,
        parent,
        selectors,
        SystemTime::now(),
    );
    entry.x509_svid_ttl = Some(Duration::from_secs(3600));
    Ok(entry)
}
