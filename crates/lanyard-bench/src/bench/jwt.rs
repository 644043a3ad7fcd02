//! `jwt`: `NewJWTSVID` throughput and latency from concurrent simulated agents, against raw
//! ES256 signing on every core.

use std::time::{Duration, Instant};

use lanyard_proto::spire::api::server::bundle::v1::GetBundleRequest;
use lanyard_proto::spire::api::server::bundle::v1::bundle_client::BundleClient;
use lanyard_proto::spire::api::server::svid::v1::NewJwtsvidRequest;
use lanyard_proto::spire::api::server::svid::v1::svid_client::SvidClient;
use lanyard_proto::spire::api::types;

use crate::bench::batch::Fleet;
use crate::bench::mint::{raw_es256_sign, run_threads};
use crate::harness::Target;
use crate::report::Report;
use crate::stats::{Samples, per_second};

/// The shape of one run.
#[derive(Debug, Clone)]
pub(crate) struct Scale {
    pub(crate) agents: usize,
    pub(crate) duration: Duration,
}

/// Results for comparisons between servers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    pub(crate) per_sec: f64,
    pub(crate) p99_ms: f64,
}

/// Raw ES256 signatures per second on every core.
pub(crate) fn raw_rate(cores: usize, duration: Duration) -> anyhow::Result<f64> {
    run_threads(cores, duration, raw_es256_sign)
}

/// What the same agents get from calls that do nothing (`GetBundle` with a mask that selects
/// no field) for `duration`: calls per second, their latencies and the server CPU per call. A
/// `NewJWTSVID` is one such call plus its work, so this is the floor it stands on.
pub(crate) async fn minimal_calls(
    target: &Target,
    fleet: &Fleet,
    duration: Duration,
) -> anyhow::Result<(f64, Samples, f64)> {
    let started = Instant::now();
    let deadline = started + duration;
    let cpu_before = target.cpu.cpu_time();
    let mut tasks = tokio::task::JoinSet::new();
    for (agent, _) in &fleet.agents {
        let mut client = BundleClient::new(agent.channel.clone());
        tasks.spawn(async move {
            let mut samples = Samples::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                client
                    .get_bundle(GetBundleRequest {
                        output_mask: Some(types::BundleMask::default()),
                    })
                    .await?;
                samples.push(sent.elapsed());
            }
            Ok::<_, anyhow::Error>(samples)
        });
    }
    let mut samples = Samples::new();
    while let Some(joined) = tasks.join_next().await {
        samples.extend(joined??);
    }
    let elapsed = started.elapsed();
    let cpu = target.cpu.cpu_time().saturating_sub(cpu_before);
    let per_sec = per_second(samples.len() as u64, elapsed);
    let cpu_us = cpu.as_secs_f64() * 1e6 / samples.len().max(1) as f64;
    Ok((per_sec, samples, cpu_us))
}

pub(crate) async fn run(
    report: &mut Report,
    target: &Target,
    raw_es256: f64,
    scale: &Scale,
) -> anyhow::Result<Outcome> {
    let fleet = Fleet::register(target, scale.agents, "jwt").await?;
    let started = Instant::now();
    let deadline = started + scale.duration;
    let cpu_before = target.cpu.cpu_time();
    let mut tasks = tokio::task::JoinSet::new();
    for (agent, entry_id) in &fleet.agents {
        let mut client = SvidClient::new(agent.channel.clone());
        let entry_id = entry_id.clone();
        tasks.spawn(async move {
            let mut samples = Samples::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                let svid = client
                    .new_jwtsvid(NewJwtsvidRequest {
                        entry_id: entry_id.clone(),
                        audience: vec!["bench".to_owned()],
                    })
                    .await?
                    .into_inner();
                samples.push(sent.elapsed());
                anyhow::ensure!(svid.svid.is_some(), "no JWT-SVID in the response");
            }
            Ok::<_, anyhow::Error>(samples)
        });
    }
    let mut samples = Samples::new();
    while let Some(joined) = tasks.join_next().await {
        samples.extend(joined??);
    }
    let elapsed = started.elapsed();
    let cpu = target.cpu.cpu_time().saturating_sub(cpu_before);
    let per_sec = per_second(samples.len() as u64, elapsed);
    let (floor_per_sec, floor_samples, floor_cpu_us) =
        minimal_calls(target, &fleet, scale.duration).await?;
    let cores = report.machine.cores;
    let name = if target.name == "lanyard" {
        "jwt".to_owned()
    } else {
        format!("jwt.{}", target.name)
    };
    let raw_us = 1e6 * cores as f64 / raw_es256.max(f64::MIN_POSITIVE);
    let mut bench = report.bench(&name);
    let agents = scale.agents;
    bench.versus(
        "per_sec",
        &format!("JWT-SVIDs/s, {agents} agents"),
        per_sec,
        "/s",
        ("raw ES256 signatures × cores", raw_es256, "/s"),
    );
    bench.versus(
        "p50_ms",
        &format!("p50 latency, {agents} agents"),
        samples.percentile_ms(50.0),
        "ms",
        ("one raw ES256 signature", raw_us / 1e3, "ms"),
    );
    bench.versus(
        "p99_ms",
        &format!("p99 latency, {agents} agents"),
        samples.percentile_ms(99.0),
        "ms",
        ("one raw ES256 signature", raw_us / 1e3, "ms"),
    );
    if !samples.is_empty() {
        bench.versus(
            "server_cpu_us_per_jwt",
            "server CPU µs per JWT-SVID",
            cpu.as_secs_f64() * 1e6 / samples.len() as f64,
            "µs",
            ("one raw ES256 signature", raw_us, "µs"),
        );
        bench.versus(
            "server_cpu_us_per_jwt_vs_call",
            "server CPU µs per JWT-SVID, against a call that does nothing plus one raw ES256 signature",
            cpu.as_secs_f64() * 1e6 / samples.len() as f64,
            "µs",
            (
                "GetBundle with an empty mask + one raw ES256 signature",
                floor_cpu_us + raw_us,
                "µs",
            ),
        );
    }
    bench.versus(
        "per_sec_vs_calls",
        &format!("JWT-SVIDs/s, {agents} agents, against calls that do nothing"),
        per_sec,
        "/s",
        ("GetBundle with an empty mask", floor_per_sec, "/s"),
    );
    bench.versus(
        "p50_ms_vs_call",
        &format!("p50 latency, {agents} agents, against a call that does nothing"),
        samples.percentile_ms(50.0),
        "ms",
        (
            "GetBundle with an empty mask",
            floor_samples.percentile_ms(50.0),
            "ms",
        ),
    );
    Ok(Outcome {
        per_sec,
        p99_ms: samples.percentile_ms(99.0),
    })
}
