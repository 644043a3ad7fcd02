//! `revoke`: how fast a revocation reaches agents, and what CRLs cost.
//!
//! Simulated agents (join-token attested, mTLS) each hold a change stream open and do what a
//! Lanyard agent does with a revocation: on a notice whose revocation sequence is past the one
//! they applied, `FetchRevocations` then `AcknowledgeRevocations`. Each round revokes a JWT ID
//! through the admin socket and times, from the call, each agent's acknowledgement and the last
//! one. The CRL figures sign lists of random 128-bit serials with a P-256 CA, against an empty
//! list signed by the same CA.

use std::time::{Duration, Instant, SystemTime};

use lanyard_core::revocation::RevokedSerial;
use lanyard_core::x509::{CaSubject, X509Ca};
use lanyard_core::{KeyPair, KeyType};
use lanyard_proto::lanyard::api::v1::agent_change_service_client::AgentChangeServiceClient;
use lanyard_proto::lanyard::api::v1::agent_revocation_service_client::AgentRevocationServiceClient;
use lanyard_proto::lanyard::api::v1::revocation_service_client::RevocationServiceClient;
use lanyard_proto::lanyard::api::v1::{
    AcknowledgeRevocationsRequest, FetchRevocationsRequest, RevokeRequest, WatchChangesRequest,
};
use ring::rand::{SecureRandom as _, SystemRandom};
use tokio::sync::mpsc;

use crate::harness::{SimAgent, Target, trust_domain};
use crate::report::Report;
use crate::stats::{Samples, percentile};

#[derive(Debug, Clone)]
pub(crate) struct Scale {
    /// Simulated agents, each with its change stream.
    pub(crate) agents: usize,
    /// Revocations made one after another.
    pub(crate) rounds: usize,
    /// Serials on the CRLs measured.
    pub(crate) crl_serials: Vec<usize>,
    /// Revocations of the SVID a real nginx checks ([`super::revoke_nginx`]).
    pub(crate) nginx_rounds: usize,
}

/// One agent's acknowledgement: which sequence, when.
type Ack = (i64, Instant);

/// Runs an agent's revocation loop until its stream ends: every notice past the sequence it
/// applied is fetched and acknowledged, and the acknowledgement's time reported.
async fn agent_loop(agent: SimAgent, acks: mpsc::UnboundedSender<Ack>) -> anyhow::Result<()> {
    let mut stream = AgentChangeServiceClient::new(agent.channel.clone())
        .watch_changes(WatchChangesRequest {})
        .await?
        .into_inner();
    let mut revocations = AgentRevocationServiceClient::new(agent.channel.clone());
    let (mut applied, mut crl_number) = (0_i64, 0_u64);
    while let Some(notice) = stream.message().await? {
        if notice.revocation_sequence <= applied && notice.crl_number == crl_number {
            continue;
        }
        let fetched = revocations
            .fetch_revocations(FetchRevocationsRequest {
                after_sequence: applied,
                crl_number,
            })
            .await?
            .into_inner();
        crl_number = fetched.crl_number;
        if fetched.sequence > applied {
            applied = fetched.sequence;
            revocations
                .acknowledge_revocations(AcknowledgeRevocationsRequest {
                    sequence: applied,
                    dropped: Vec::new(),
                })
                .await?;
            if acks.send((applied, Instant::now())).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The figures; the nginx round runs when the `lanyard` binary (for its helper) is at hand.
pub(crate) async fn run(
    report: &mut Report,
    target: &Target,
    scale: &Scale,
    lanyard: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let agents = target.attest_agents(scale.agents, 8).await?;
    let n = agents.len();
    let (acks_tx, mut acks) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for agent in agents {
        tasks.spawn(agent_loop(agent, acks_tx.clone()));
    }
    drop(acks_tx);
    // Let every stream open and hear its first notice.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut admin = RevocationServiceClient::new(target.admin().await?);
    let mut all = Vec::with_capacity(scale.rounds);
    let mut each = Samples::new();
    for round in 0..scale.rounds {
        let started = Instant::now();
        let made = admin
            .revoke(RevokeRequest {
                kind: "jwt-id".to_owned(),
                value: format!("bench-{round}"),
                owner: "bench".to_owned(),
                reason: "benchmark".to_owned(),
                ticket: String::new(),
                dry_run: false,
            })
            .await?
            .into_inner();
        let sequence = made
            .revocation
            .map(|r| r.sequence)
            .ok_or_else(|| anyhow::anyhow!("no revocation in the answer"))?;
        let mut acknowledged = 0;
        let deadline = started + Duration::from_secs(60);
        while acknowledged < n {
            let timeout = deadline.saturating_duration_since(Instant::now());
            let (acked, at) = tokio::time::timeout(timeout, acks.recv())
                .await
                .map_err(|_| anyhow::anyhow!("{acknowledged} of {n} agents acknowledged in 60 s"))?
                .ok_or_else(|| anyhow::anyhow!("the agents' streams ended"))?;
            if acked >= sequence {
                acknowledged += 1;
                each.push(at.saturating_duration_since(started));
            }
        }
        all.push(started.elapsed().as_secs_f64() * 1e3);
        // Let the fleet settle between rounds.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tasks.abort_all();
    all.sort_by(f64::total_cmp);

    let sync_ms = 5_000.0;
    let mut bench = report.bench("revoke");
    for (key, p) in [("p50", 50.0), ("p99", 99.0)] {
        bench.versus(
            &format!("all_acknowledged_{key}_ms"),
            &format!(
                "revoke → acknowledged by all {n} agents, {key} of {} rounds",
                scale.rounds
            ),
            percentile(&all, p),
            "ms",
            (
                "agent sync interval (default, SPIRE's and Lanyard's)",
                sync_ms,
                "ms",
            ),
        );
    }
    for (key, p) in [("p50", 50.0), ("p99", 99.0)] {
        bench.versus(
            &format!("each_acknowledged_{key}_ms"),
            &format!("revoke → one agent's acknowledgement, {key}"),
            each.percentile_ms(p),
            "ms",
            ("agent sync interval (default)", sync_ms, "ms"),
        );
    }
    drop(bench);
    crl_costs(report, &scale.crl_serials)?;
    match lanyard {
        Some(lanyard) => {
            super::revoke_nginx::run(report, target, lanyard, scale.nginx_rounds).await
        }
        None => {
            report.notes.push(
                "revoke → nginx refuses: skipped, no `lanyard` binary for its helper \
                 (--lanyard-bin)"
                    .to_owned(),
            );
            Ok(())
        }
    }
}

/// CRL size and signing time with `sizes` serials, against an empty CRL.
fn crl_costs(report: &mut Report, sizes: &[usize]) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let ca = X509Ca::self_signed(
        &trust_domain(),
        KeyPair::generate(KeyType::EcP256)?,
        &CaSubject::default(),
        now,
        Duration::from_secs(86_400),
    )?;
    let next = now + Duration::from_secs(3600);
    let time_signing = |serials: &[RevokedSerial], times: usize| -> anyhow::Result<(f64, usize)> {
        let mut samples = Vec::with_capacity(times);
        let mut size = 0;
        for number in 0..times {
            let started = Instant::now();
            let der = ca.sign_crl(serials, number as u64 + 1, now, next)?;
            samples.push(started.elapsed().as_secs_f64() * 1e3);
            size = der.len();
        }
        samples.sort_by(f64::total_cmp);
        Ok((percentile(&samples, 50.0), size))
    };
    let (empty_ms, empty_size) = time_signing(&[], 20)?;
    let rng = SystemRandom::new();
    let mut bench = report.bench("revoke");
    for &n in sizes {
        let serials = (0..n)
            .map(|_| {
                let mut bytes = [0_u8; 16];
                rng.fill(&mut bytes)
                    .map_err(|_| anyhow::anyhow!("no randomness"))?;
                bytes[0] &= 0x7f;
                bytes[0] |= 0x01;
                Ok(RevokedSerial {
                    serial: be_to_decimal(&bytes),
                    authority_id: String::new(),
                    revoked_at: now,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let times = if n >= 100_000 { 3 } else { 5 };
        let (ms, size) = time_signing(&serials, times)?;
        bench.versus(
            &format!("crl_{n}.sign_ms"),
            &format!("signing a CRL of {n} serials, p50"),
            ms,
            "ms",
            ("an empty CRL", empty_ms, "ms"),
        );
        bench.versus(
            &format!("crl_{n}.bytes"),
            &format!("CRL size, {n} serials"),
            size as f64,
            "B",
            ("an empty CRL", empty_size as f64, "B"),
        );
        bench.figure(
            &format!("crl_{n}.bytes_per_serial"),
            &format!("CRL bytes per serial, {n} serials"),
            (size.saturating_sub(empty_size)) as f64 / n.max(1) as f64,
            "B",
        );
    }
    Ok(())
}

/// The decimal form of a big-endian unsigned integer.
fn be_to_decimal(bytes: &[u8]) -> String {
    let mut digits = vec![0_u8];
    for &byte in bytes {
        let mut carry = u32::from(byte);
        for digit in digits.iter_mut() {
            let value = u32::from(*digit) * 256 + carry;
            *digit = (value % 10) as u8;
            carry = value / 10;
        }
        while carry > 0 {
            digits.push((carry % 10) as u8);
            carry /= 10;
        }
    }
    while digits.len() > 1 && digits.last() == Some(&0) {
        digits.pop();
    }
    digits.iter().rev().map(|d| char::from(b'0' + d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_print_in_decimal() {
        assert_eq!(be_to_decimal(&[0]), "0");
        assert_eq!(be_to_decimal(&[1, 0]), "256");
        assert_eq!(
            be_to_decimal(&[0xff; 16]),
            "340282366920938463463374607431768211455"
        );
    }
}
