//! Revocations on the agent. At each sync the agent asks the server
//! (`AgentRevocationService.FetchRevocations`) for the revocations after the last one it
//! applied, and for the CRLs when the server's are newer than its own. Applying a revocation
//! drops every X.509-SVID it holds that the revocation covers and was issued before it was made
//! (the sync then mints replacements where the entry still authorizes them), and remembers a
//! revoked JWT ID until the revocation expires, so that the JWT-SVID cache never hands it out
//! and `ValidateJWTSVID` refuses it. The agent then acknowledges the sequence it has applied,
//! with the certificates it dropped, which the server checks and adds to the CRLs (at most
//! [`MAX_DROPPED_PER_ACK`] a call, as the server takes).
//!
//! A server without the service (SPIRE's) answers `Unimplemented`: the agent stops asking.
//! Nothing here fails a sync: a failed call is tried again at the next one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use lanyard_core::SpiffeId;
use lanyard_core::revocation::{Revocation, RevocationTarget};
use lanyard_core::x509::{self, X509Svid};
use lanyard_proto::lanyard::api::v1::FetchRevocationsResponse;
use lanyard_proto::lanyard::api::v1::acknowledge_revocations_request::Dropped;

/// Dropped SVIDs one acknowledgement reports, at most (the server refuses more).
pub(super) const MAX_DROPPED_PER_ACK: usize = 10_000;

/// Certificate bytes one acknowledgement reports, at most: under the 4 MiB a gRPC server
/// takes by default, with room for the rest of the message.
pub(super) const MAX_DROPPED_BYTES_PER_ACK: usize = 3 << 20;

/// The largest `FetchRevocations` answer the agent takes.
pub(super) const MAX_FETCH_BYTES: usize = 64 << 20;

/// The most CRL bytes the agent serves in a Workload API response. Clients take 4 MiB per
/// message by default (go-spiffe, grpc-java), and an X.509-SVID response that outgrows it
/// fails whole: beyond this, the lists are left out of the Workload API (and an error
/// logged), so that workloads keep getting their SVIDs.
pub(super) const MAX_WORKLOAD_CRL_BYTES: usize = 2 << 20;

/// The dropped SVIDs one acknowledgement reports, from the front of `dropped`: at most
/// [`MAX_DROPPED_PER_ACK`] and [`MAX_DROPPED_BYTES_PER_ACK`] of certificates (one at least).
pub(super) fn ack_batch(dropped: &[Dropped]) -> usize {
    let mut bytes = 0;
    let mut count = 0;
    for drop in dropped.iter().take(MAX_DROPPED_PER_ACK) {
        bytes += drop.certificates.iter().map(Vec::len).sum::<usize>();
        if count > 0 && bytes > MAX_DROPPED_BYTES_PER_ACK {
            break;
        }
        count += 1;
    }
    count
}

/// What the agent knows of revocations.
#[derive(Debug, Default)]
pub(super) struct AgentRevocations {
    /// The highest sequence applied.
    pub(super) applied: i64,
    /// The highest sequence the server has been told of.
    pub(super) acknowledged: i64,
    /// The server's version of `crls` (its `crl_number`).
    pub(super) crl_number: u64,
    /// The trust domain's CRLs (DER), as the Workload API serves them.
    pub(super) crls: Arc<Vec<Vec<u8>>>,
    /// Revoked JWT IDs, each until its revocation expires.
    pub(super) jtis: Arc<BTreeMap<String, SystemTime>>,
    /// SVIDs dropped since the last acknowledgement.
    pub(super) dropped: Vec<Dropped>,
    /// The server has no revocation service.
    pub(super) unsupported: bool,
}

/// An X.509-SVID the agent holds, as a revocation sees it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Held<'a> {
    /// The entry it was minted for.
    pub(super) entry_id: &'a str,
    /// The SVID.
    pub(super) svid: &'a X509Svid,
}

/// What applying a fetch changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Applied {
    /// Entries whose SVIDs are to be dropped.
    pub(super) drop: Vec<String>,
    /// Whether the CRLs or the revoked JWT IDs changed (the snapshot must be published).
    pub(super) changed: bool,
}

impl AgentRevocations {
    /// Takes a fetch's answer at `now`: which held SVIDs of `agent_id` it revokes, new CRLs,
    /// revoked JWT IDs. Revocations that do not parse are skipped with a warning (a newer
    /// server's kinds); their sequence still counts as applied.
    pub(super) fn apply<'a>(
        &mut self,
        response: &FetchRevocationsResponse,
        held: impl IntoIterator<Item = Held<'a>>,
        agent_id: &SpiffeId,
        now: SystemTime,
    ) -> Applied {
        let mut applied = Applied::default();
        if !response.crls.is_empty() && response.crl_number != self.crl_number {
            let size: usize = response.crls.iter().map(Vec::len).sum();
            self.crls = if size > MAX_WORKLOAD_CRL_BYTES {
                tracing::error!(
                    bytes = size,
                    limit = MAX_WORKLOAD_CRL_BYTES,
                    "the trust domain's CRLs are too large for Workload API clients; they are left out of the Workload API until revocations expire"
                );
                Arc::new(Vec::new())
            } else {
                Arc::new(response.crls.clone())
            };
            self.crl_number = response.crl_number;
            applied.changed = true;
        }
        let revocations: Vec<Revocation> = response
            .revocations
            .iter()
            .filter_map(|proto| {
                match lanyard_proto::convert::revocation_from_proto(proto) {
                    Ok(revocation) => Some(revocation),
                    Err(error) => {
                        tracing::warn!(id = %proto.id, %error, "skipping a revocation this agent cannot read");
                        None
                    }
                }
            })
            .collect();
        let held: Vec<Held<'a>> = held.into_iter().collect();
        let mut jtis = (*self.jtis).clone();
        let before = jtis.len();
        jtis.retain(|_, until| *until > now);
        let mut jtis_changed = jtis.len() != before;
        for revocation in &revocations {
            if let RevocationTarget::JwtId(jti) = &revocation.target {
                if revocation.is_live(now) {
                    jtis.insert(jti.clone(), revocation.expires_at);
                    jtis_changed = true;
                }
                continue;
            }
            for svid in &held {
                if covers(revocation, *svid, agent_id) {
                    applied.drop.push(svid.entry_id.to_owned());
                    self.dropped.push(Dropped {
                        revocation_id: revocation.id.clone(),
                        certificates: svid.svid.cert_chain().to_vec(),
                    });
                }
            }
        }
        if jtis_changed {
            self.jtis = Arc::new(jtis);
            applied.changed = true;
        }
        applied.drop.sort();
        applied.drop.dedup();
        self.applied = self.applied.max(response.sequence);
        applied
    }

    /// Whether there is something to acknowledge.
    pub(super) fn ack_due(&self) -> bool {
        self.applied > self.acknowledged || !self.dropped.is_empty()
    }
}

/// Whether `revocation` covers `held`, an SVID of `agent_id`: its target matches, and the
/// SVID was issued by the time the revocation was made ([`Revocation::predates`]), so that
/// what the agent mints afterwards is not dropped again.
pub(super) fn covers(revocation: &Revocation, held: Held<'_>, agent_id: &SpiffeId) -> bool {
    let issued_before = x509::validity_of(held.svid.leaf_der())
        .is_ok_and(|(not_before, _)| revocation.predates(not_before));
    issued_before
        && revocation.target.covers_x509(
            held.svid.serial(),
            held.svid.spiffe_id(),
            held.entry_id,
            agent_id,
        )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lanyard_core::keys::{KeyPair, KeyType};
    use lanyard_core::revocation::Revocation;
    use lanyard_core::x509::{CaSubject, SvidParams, X509Ca};
    use lanyard_core::{SpiffeId, TrustDomain};
    use lanyard_proto::convert::revocation_to_proto;

    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn ca() -> X509Ca {
        X509Ca::self_signed(
            &TrustDomain::new("example.org").unwrap(),
            KeyPair::generate(KeyType::EcP256).unwrap(),
            &CaSubject::default(),
            at(1_800_000_000),
            Duration::from_secs(30 * 86_400),
        )
        .unwrap()
    }

    fn mint(ca: &X509Ca, path: &str, now: SystemTime) -> X509Svid {
        let key = KeyPair::generate(KeyType::EcP256).unwrap();
        let id: SpiffeId = format!("spiffe://example.org{path}").parse().unwrap();
        ca.mint_svid(
            &SvidParams::new(id, key.public_key_der(), Duration::from_secs(3600)),
            now,
        )
        .unwrap()
    }

    fn revocation(
        id: &str,
        target: RevocationTarget,
        created_at: SystemTime,
        sequence: i64,
    ) -> Revocation {
        Revocation {
            id: id.to_owned(),
            target,
            owner: "security".into(),
            reason: "leak".into(),
            ticket: String::new(),
            created_at,
            created_by: "admin".into(),
            expires_at: created_at + Duration::from_secs(7200),
            sequence,
        }
    }

    fn response(
        revocations: &[Revocation],
        sequence: i64,
        crl_number: u64,
    ) -> FetchRevocationsResponse {
        FetchRevocationsResponse {
            revocations: revocations.iter().map(revocation_to_proto).collect(),
            sequence,
            crls: if crl_number == 0 {
                Vec::new()
            } else {
                vec![vec![0x30, 0x00]]
            },
            crl_number,
        }
    }

    #[test]
    fn svids_issued_before_a_revocation_are_dropped_and_later_ones_kept() {
        let ca = ca();
        let agent: SpiffeId = "spiffe://example.org/spire/agent/a".parse().unwrap();
        let web_old = mint(&ca, "/web", at(1_800_001_000));
        let web_new = mint(&ca, "/web", at(1_800_002_000));
        let db = mint(&ca, "/db", at(1_800_001_000));
        // Made between the two mints of /web (the later one's notBefore, backdated, is after).
        let made = at(1_800_001_500);
        let by_id = revocation(
            "r1",
            RevocationTarget::SpiffeId("spiffe://example.org/web".parse().unwrap()),
            made,
            1,
        );
        let mut state = AgentRevocations::default();
        let held = [
            Held {
                entry_id: "e-web-old",
                svid: &web_old,
            },
            Held {
                entry_id: "e-web-new",
                svid: &web_new,
            },
            Held {
                entry_id: "e-db",
                svid: &db,
            },
        ];
        let applied = state.apply(&response(&[by_id], 1, 7), held, &agent, made);
        assert_eq!(applied.drop, ["e-web-old"]);
        assert!(applied.changed, "new CRLs");
        assert_eq!(state.applied, 1);
        assert_eq!(state.crl_number, 7);
        assert_eq!(state.dropped.len(), 1);
        assert_eq!(state.dropped[0].certificates, web_old.cert_chain());
        assert_eq!(state.dropped[0].revocation_id, "r1");
        assert!(state.ack_due());

        // The same CRLs again change nothing; an agent's own revocation covers all it holds.
        let by_agent = revocation(
            "r2",
            RevocationTarget::Agent(agent.clone()),
            at(1_800_003_000),
            2,
        );
        let applied = state.apply(
            &response(&[by_agent], 2, 7),
            held,
            &agent,
            at(1_800_003_000),
        );
        assert_eq!(applied.drop, ["e-db", "e-web-new", "e-web-old"]);
        assert!(!applied.changed);
        let other_agent: SpiffeId = "spiffe://example.org/spire/agent/b".parse().unwrap();
        let by_other = revocation(
            "r3",
            RevocationTarget::Agent(other_agent),
            at(1_800_003_000),
            3,
        );
        assert!(
            state
                .apply(
                    &response(&[by_other], 3, 7),
                    held,
                    &agent,
                    at(1_800_003_000)
                )
                .drop
                .is_empty()
        );
        assert_eq!(state.applied, 3);
    }

    #[test]
    fn acknowledgements_are_bounded_in_count_and_bytes() {
        let drop = |bytes: usize| Dropped {
            revocation_id: "r".into(),
            certificates: vec![vec![0; bytes]],
        };
        assert_eq!(ack_batch(&[]), 0);
        let small: Vec<Dropped> = (0..MAX_DROPPED_PER_ACK + 5).map(|_| drop(10)).collect();
        assert_eq!(ack_batch(&small), MAX_DROPPED_PER_ACK);
        let large: Vec<Dropped> = (0..10).map(|_| drop(1 << 20)).collect();
        assert_eq!(ack_batch(&large), 3);
        // One larger than the budget still goes alone, rather than never.
        assert_eq!(
            ack_batch(&[drop(MAX_DROPPED_BYTES_PER_ACK + 1), drop(1)]),
            1
        );
    }

    #[test]
    fn crls_too_large_for_workload_clients_are_left_out() {
        let agent: SpiffeId = "spiffe://example.org/spire/agent/a".parse().unwrap();
        let mut state = AgentRevocations::default();
        let mut big = response(&[], 0, 9);
        big.crls = vec![vec![0x30; MAX_WORKLOAD_CRL_BYTES + 1]];
        let applied = state.apply(&big, [], &agent, at(1_800_000_000));
        assert!(applied.changed);
        assert!(state.crls.is_empty());
        assert_eq!(state.crl_number, 9, "not fetched again and again");
        let fits = response(&[], 0, 10);
        state.apply(&fits, [], &agent, at(1_800_000_000));
        assert_eq!(state.crls.len(), 1);
    }

    #[test]
    fn revoked_jwt_ids_are_kept_until_their_revocation_expires() {
        let agent: SpiffeId = "spiffe://example.org/spire/agent/a".parse().unwrap();
        let made = at(1_800_000_000);
        let by_jti = revocation("r1", RevocationTarget::JwtId("j-1".into()), made, 1);
        let mut state = AgentRevocations::default();
        let applied = state.apply(
            &response(std::slice::from_ref(&by_jti), 1, 0),
            [],
            &agent,
            made,
        );
        assert!(applied.changed && applied.drop.is_empty());
        assert_eq!(state.jtis.get("j-1"), Some(&by_jti.expires_at));
        assert_eq!(state.crl_number, 0, "no lists given, none taken");
        // Past its expiry it is forgotten at the next fetch.
        let later = by_jti.expires_at + Duration::from_secs(1);
        let applied = state.apply(&response(&[], 1, 0), [], &agent, later);
        assert!(applied.changed);
        assert!(state.jtis.is_empty());
        // A revocation that expired before it arrived adds nothing.
        let stale = revocation("r2", RevocationTarget::JwtId("j-2".into()), made, 2);
        let applied = state.apply(&response(&[stale], 2, 0), [], &agent, later);
        assert!(!applied.changed);
        assert_eq!(state.applied, 2);
    }
}
