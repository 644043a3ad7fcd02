//! `restart`: a server whose SQLite datastore holds many entries, from `Server::start` to
//! answering an agent's `GetAuthorizedEntries`, against reading the entries alone.

use std::time::{Duration, Instant, SystemTime};

use lanyard_core::{EntryId, RegistrationEntry, SelectorSet, SpiffeId};
use lanyard_proto::spire::api::server::entry::v1::GetAuthorizedEntriesRequest;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_server::datastore::{Datastore as _, SqlStore};

use crate::harness::{LanyardServer, scratch_dir, trust_domain};
use crate::report::Report;

/// Entries per bulk insert.
const LOAD_CHUNK: usize = 10_000;
/// Entries under the agent that asks after the restart.
const AGENT_ENTRIES: usize = 10;

pub(crate) async fn run(report: &mut Report, entries: usize) -> anyhow::Result<()> {
    let dir = scratch_dir("lanyard-bench-restart")?;
    let config = LanyardServer::config_in(dir.path());

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

    // Load the datastore directly, in large transactions.
    let store = SqlStore::open(&config.datastore_path()).await?;
    let load_started = Instant::now();
    let mut created = 0;
    while created < entries {
        let chunk: Vec<RegistrationEntry> = (created..(created + LOAD_CHUNK).min(entries))
            .map(|i| restart_entry(i, &agent.id))
            .collect::<anyhow::Result<_>>()?;
        created += chunk.len();
        store.create_entries(chunk).await?;
    }
    let load = load_started.elapsed();
    // The baseline: reading every entry back, as the server does at start.
    let read_started = Instant::now();
    let read = store.list_all_entries().await?.len();
    let read_time = read_started.elapsed();
    store.close().await;
    anyhow::ensure!(read == entries, "read {read} entries, stored {entries}");

    // Second life: time until the agent is served its entries again.
    let started = Instant::now();
    let server = LanyardServer::start(config).await?;
    let serving_started = started.elapsed();
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

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut bench = report.bench("restart");
    bench.versus(
        "start_to_serving_ms",
        &format!("start → authorized entries served, {entries} entries in SQLite"),
        ms(serving),
        "ms",
        ("reading every entry from SQLite", ms(read_time), "ms"),
    );
    bench.figure(
        "start_ms",
        "Server::start returns (datastore, CA, index, listeners)",
        ms(serving_started),
        "ms",
    );
    bench.figure(
        "bulk_load_entries_per_sec",
        "bulk load into SQLite (one transaction per 10k entries)",
        entries as f64 / load.as_secs_f64().max(f64::MIN_POSITIVE),
        "/s",
    );
    Ok(())
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
