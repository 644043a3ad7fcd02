//! `propagation`: two servers of one trust domain over one PostgreSQL, A and B, and a node
//! agent attested to B. An entry is created through A's admin socket; measured are the time
//! until B authorizes it (an agent's `GetAuthorizedEntries` at B, polled; for Lanyard, B's
//! index catching up on A's `NOTIFY`, against the datastore poll that is the safety net) and
//! the time until a workload streaming from the agent holds its SVID (against the agent's
//! sync interval, which is how often the agent asks B). The same run drives two
//! `spire-server`s over one PostgreSQL with `spire-agent` on B for `--against-spire`.

use std::time::Duration;

use lanyard_proto::spire::api::server::entry::v1::GetAuthorizedEntriesRequest;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use tokio::time::Instant;

use crate::bench::sync::measure_propagation;
use crate::harness::{Target, entry_message, scratch_dir};
use crate::report::Report;
use crate::stats::Samples;
use crate::workload::wait_for_socket;

/// The shape of one run.
#[derive(Debug, Clone)]
pub(crate) struct Scale {
    /// Entries created through A for the agent's workload.
    pub(crate) trials: usize,
    /// Entries created through A for a simulated agent polling B. Each waits a
    /// [`phase_offset`](crate::bench::phase_offset) of the sync interval first, which also
    /// spreads them over SPIRE's cache reload (every 5 s by default) in full runs.
    pub(crate) authorize_trials: usize,
    /// The agent's sync interval (the same for Lanyard's agent and SPIRE's).
    pub(crate) sync_interval: Duration,
}

/// Results for comparisons between implementations.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    pub(crate) authorized_p50_ms: f64,
    pub(crate) authorized_p99_ms: f64,
    pub(crate) svid_p50_ms: f64,
    pub(crate) svid_p99_ms: f64,
}

/// How often B's `GetAuthorizedEntries` is asked while waiting for an entry.
const AUTHORIZE_POLL: Duration = Duration::from_millis(2);

/// Runs both measurements with entries written through `a` and read through `b`.
/// `poll_interval` is the interval at which B reads the change log whatever it hears (for
/// Lanyard, `[datastore] poll_interval`; SPIRE has no such figure here).
pub(crate) async fn run(
    report: &mut Report,
    a: &Target,
    b: &Target,
    poll_interval: Option<Duration>,
    scale: &Scale,
) -> anyhow::Result<Outcome> {
    let (authorized_p50_ms, authorized_p99_ms) = authorized_at_b(a, b, scale).await?;

    let dir = scratch_dir("lanyard-bench-propagation-agent")?;
    let mut agent = crate::bench::start_agent(b, dir.path(), scale.sync_interval).await?;
    wait_for_socket(&mut agent, Duration::from_secs(30)).await?;
    let (svid_p50_ms, svid_p99_ms) = measure_propagation(
        a,
        &agent,
        scale.trials,
        scale.sync_interval,
        scale.sync_interval,
    )
    .await?;
    drop(agent);

    let name = if a.name == "lanyard" {
        "propagation".to_owned()
    } else {
        format!("propagation.{}", a.name)
    };
    let interval_ms = scale.sync_interval.as_secs_f64() * 1e3;
    let mut bench = report.bench(&name);
    for (p, value) in [("p50", authorized_p50_ms), ("p99", authorized_p99_ms)] {
        let label = format!("entry created through A → authorized at B, {p}");
        match poll_interval {
            Some(poll) => bench.versus(
                &format!("authorized_at_b_{p}_ms"),
                &label,
                value,
                "ms",
                (
                    "B's datastore poll interval (the safety net)",
                    poll.as_secs_f64() * 1e3,
                    "ms",
                ),
            ),
            None => bench.figure(&format!("authorized_at_b_{p}_ms"), &label, value, "ms"),
        }
    }
    for (p, value) in [("p50", svid_p50_ms), ("p99", svid_p99_ms)] {
        bench.versus(
            &format!("svid_{p}_ms"),
            &format!(
                "entry created through A → SVID at a workload of an agent on B, {p} (creates \
                 spread over the agent's sync phase)"
            ),
            value,
            "ms",
            ("agent sync interval", interval_ms, "ms"),
        );
    }
    Ok(Outcome {
        authorized_p50_ms,
        authorized_p99_ms,
        svid_p50_ms,
        svid_p99_ms,
    })
}

/// Creates entries through `a` for a simulated agent attested to `b`, one at a time, and
/// returns the p50 and p99 until `b` answers the agent's `GetAuthorizedEntries` with each.
async fn authorized_at_b(a: &Target, b: &Target, scale: &Scale) -> anyhow::Result<(f64, f64)> {
    let agent = b
        .attest_agents(1, 1)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no agent"))?;
    let mut client = EntryClient::new(agent.channel.clone());
    let parent = agent.id.as_str().to_owned();
    let timeout = Duration::from_secs(60);
    let mut samples = Samples::new();
    for trial in 0..scale.authorize_trials {
        tokio::time::sleep(crate::bench::phase_offset(trial, scale.sync_interval)).await;
        let path = format!("/bench/authorize/{trial}");
        let created = Instant::now();
        a.create_entries(vec![entry_message(
            &parent,
            &path,
            &["unix:uid:1000".to_owned()],
        )])
        .await?;
        loop {
            let entries = client
                .get_authorized_entries(GetAuthorizedEntriesRequest { output_mask: None })
                .await?
                .into_inner()
                .entries;
            let found = entries
                .iter()
                .any(|entry| entry.spiffe_id.as_ref().is_some_and(|id| id.path == path));
            if found {
                samples.push(created.elapsed());
                break;
            }
            anyhow::ensure!(
                created.elapsed() < timeout,
                "B did not authorize {path} within {timeout:?}"
            );
            tokio::time::sleep(AUTHORIZE_POLL).await;
        }
    }
    Ok((samples.percentile_ms(50.0), samples.percentile_ms(99.0)))
}
