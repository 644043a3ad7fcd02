//! The manager's decisions as a state machine that does no I/O, reads no clock and runs on no
//! runtime: when to sync, when to renew or re-attest the agent SVID, how long to back off,
//! what a server's refusal means, which workload SVIDs to mint and in which batches, which to
//! drop over `x509_svid_cache_size`, and how a push stream changes the polling.
//!
//! The runner (`runner.rs`) owns the gRPC client, the clock and the sleeps. It tells the
//! [`Machine`] what happened with [`Machine::on_event`], performs the [`Action`]s it gets back
//! in order, and sleeps until [`Machine::next_wakeup`]. Time comes in with every event as a
//! [`Now`]: a monotonic `std::time::Instant` that paces syncs, rotations and backoff, and the
//! wall-clock `SystemTime` that certificate lifetimes are measured in, read together by the
//! runner. Randomness (jitter) comes from a source the machine is given. Tests drive it on a
//! virtual clock (one base instant plus offsets) with fixed jitter.
//!
//! Push events come from the agent's change stream to a Lanyard server (`push.rs`); against a
//! server without one (SPIRE's) none arrive and the agent polls every `sync_interval`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use lanyard_core::EntryId;
use lanyard_core::rotation::{self, Jitter};

use super::AGENT_SVID_EXPIRY_MARGIN;

/// The longest wait between failed syncs (SPIRE: min(8 min, 48 × sync interval)).
pub(super) const MAX_SYNC_BACKOFF: Duration = Duration::from_secs(8 * 60);

/// The most CSRs in one `BatchNewX509SVID` call (the server's per-call limit).
pub(super) const MAX_CSRS_PER_CALL: usize = 500;

/// The moment an event happened, on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Now {
    /// Monotonic time, for intervals and backoff.
    pub(super) instant: Instant,
    /// Wall-clock time, for certificate lifetimes.
    pub(super) wall: SystemTime,
}

impl Now {
    /// The monotonic instant at which the wall clock will show `at` (now, if it already has).
    fn instant_at(self, at: SystemTime) -> Instant {
        self.instant + at.duration_since(self.wall).unwrap_or_default()
    }
}

/// Where the machine's jitter comes from: `Jitter::random` in the agent, fixed in tests.
pub(super) type JitterSource = Box<dyn FnMut() -> Jitter + Send + Sync>;

/// The configuration the decisions depend on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    /// `sync_interval`: the poll interval, the first backoff step and the least time between
    /// two agent SVID rotations.
    pub(super) sync_interval: Duration,
    /// `push_sync_interval`: the poll interval while a push stream is healthy, a safety net
    /// for a notification lost on the way (never shorter than `sync_interval`).
    pub(super) push_sync_interval: Duration,
    /// `x509_svid_cache_size`: at most this many entries get workload SVIDs.
    pub(super) x509_svid_cache_size: usize,
    /// Whether a node attestor that can attest again (x509pop, k8s_psat) is configured.
    pub(super) has_reattest_method: bool,
}

/// The agent SVID's validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AgentSvid {
    pub(super) not_before: SystemTime,
    pub(super) not_after: SystemTime,
    /// Whether the server lets this agent re-attest (SPIRE's `reattestable`).
    pub(super) reattestable: bool,
}

/// What a failed call to the server means, as the runner reads it from the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// `PermissionDenied` with `AGENT_BANNED`.
    Banned,
    /// `PermissionDenied` with a reason that asks for a new attestation (`AGENT_EXPIRED`,
    /// `AGENT_NOT_ATTESTED`, `AGENT_NOT_ACTIVE`, `AGENT_MUST_REATTEST`).
    MustReattest(&'static str),
    /// A code that refuses an attestation for good (`PermissionDenied`, `InvalidArgument`,
    /// `Unauthenticated`, `Unimplemented`, `FailedPrecondition`), with the error's text.
    Refused(String),
    /// Anything else (unavailable, deadline exceeded, resource exhausted, a bad answer, a
    /// local error): worth trying again later.
    Retryable,
}

/// A workload SVID candidate: an entry that may hold an SVID, in entry ID order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MintCandidate {
    pub(super) entry_id: EntryId,
    /// The SVID the agent holds for it, if any.
    pub(super) held: Option<HeldSvid>,
}

/// What the machine needs to know about a workload SVID the agent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HeldSvid {
    /// When it is due for renewal ([`Machine::renewal_time`] when it was minted).
    pub(super) renew_at: SystemTime,
    /// It chains only to a tainted authority.
    pub(super) force_renew: bool,
    /// Its entry changed (revision or creation time) since it was minted.
    pub(super) entry_changed: bool,
}

/// Which operation backs off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Operation {
    Sync,
    Rotation,
}

/// Why the manager stops for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StopReason {
    Banned,
    /// Told to attest again by a server, and the agent cannot.
    MustReattest(&'static str),
    /// A re-attestation was refused, with the error's text.
    AttestationRefused(String),
    /// The agent SVID expired and the agent cannot attest again.
    AgentSvidExpired {
        expired_at: SystemTime,
    },
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Event {
    /// A timer fired: the time from [`Machine::next_wakeup`] came, or the runner looks again.
    Wakeup,
    /// The agent SVID was renewed or the node attested again.
    RotationSucceeded(AgentSvid),
    /// Renewing the agent SVID or attesting again failed.
    RotationFailed(Failure),
    /// The trust domain's bundle no longer vouches for the agent SVID's authority (tainted or
    /// gone): renew it at the next opportunity.
    AgentAuthorityUntrusted,
    /// A sync fetched the authorized entries: `candidates` are those that may hold an SVID,
    /// by entry ID; `other_held` are SVIDs held for entries that may no longer hold one.
    EntriesSynced {
        candidates: Vec<MintCandidate>,
        other_held: Vec<EntryId>,
    },
    /// A `BatchNewX509SVID` call failed; the sync fails with it.
    MintBatchFailed,
    /// Every planned batch was minted.
    MintFinished,
    /// The sync (entries, bundles, minting) completed, with this many entries.
    SyncSucceeded { n_entries: usize },
    /// The sync failed.
    SyncFailed(Failure),
    /// The workload SVIDs held now, by entry, with their expiry.
    WorkloadSvidsHeld {
        /// Each held SVID's expiry, by entry.
        expiries: BTreeMap<EntryId, SystemTime>,
        /// The earliest time one of them is due for renewal, if any is held.
        first_renewal: Option<SystemTime>,
    },
    /// A push stream from the server is up.
    PushConnected,
    /// The server says something changed for this agent.
    PushNotified,
    /// The push stream broke.
    PushLost,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Renew the agent SVID with `RenewAgent` and a new key.
    RenewAgentSvid,
    /// Attest the node again.
    Reattest { reason: &'static str },
    /// Sync entries and bundles, and mint what needs it.
    Sync,
    /// Report usage to the server (after every successful sync).
    ReportUsage,
    /// Drop the cached connection after a failed call: the next call dials again, the server
    /// that answered last first and then each next one ([`dial_order`]).
    Reconnect,
    /// Drop these workload SVIDs: they have expired, and are never served.
    WithdrawExpired(Vec<EntryId>),
    /// Drop these workload SVIDs (over capacity, or their entry may hold none).
    Evict(Vec<EntryId>),
    /// Mint SVIDs for these entries in one `BatchNewX509SVID` call.
    Mint(Vec<EntryId>),
    /// The operation failed and is tried again after this long (already in
    /// [`Machine::next_wakeup`]; the runner logs it).
    RetryLater {
        operation: Operation,
        after: Duration,
    },
    /// Delete the stored agent SVID so that the next start attests anew.
    ForgetSvid,
    /// Stop the manager.
    Stop(StopReason),
}

/// After a failure: try again, or attest again first.
enum NextStep {
    Retry,
    Reattest(&'static str),
}

/// The manager's decisions. See the [module documentation](self).
pub(super) struct Machine {
    settings: Settings,
    max_backoff: Duration,
    jitter: JitterSource,
    /// The time of the last event.
    now: Now,
    stopped: bool,

    next_sync: Instant,
    sync_failures: u32,
    sync_in_flight: bool,
    /// When a sync last succeeded.
    last_sync: Option<Instant>,
    push_connected: bool,
    /// A notification came while a sync was under way: sync again after it.
    notified_during_sync: bool,

    agent: AgentSvid,
    agent_renew_at: SystemTime,
    next_rotation: Instant,
    rotation_failures: u32,
    must_reattest: Option<&'static str>,
    /// The rotation under way, and the re-attestation reason it was started for.
    rotation_in_flight: Option<Option<&'static str>>,

    /// CSRs per `BatchNewX509SVID` call: halved after a failed call, doubled back after a
    /// sync that minted everything, like SPIRE's agent.
    batch_limit: usize,
    mint_planned: bool,
    /// Entries left without SVIDs by `x509_svid_cache_size`, when last warned about.
    n_over_capacity: usize,
    /// The workload SVIDs held, with their expiry.
    workload_expiries: BTreeMap<EntryId, SystemTime>,
    /// When the first held workload SVID is due for renewal (renewals happen in a sync).
    first_renewal: Option<SystemTime>,
    /// When the last sync was started: a renewal brings the next sync no closer than
    /// `sync_interval` after it, the pace the agent keeps without a push stream.
    sync_started_at: Option<Instant>,
}

impl Machine {
    /// A machine for an agent that holds `agent`, with a sync and (if due) a rotation to do
    /// at once.
    pub(super) fn new(
        now: Now,
        settings: Settings,
        agent: AgentSvid,
        jitter: JitterSource,
    ) -> Self {
        let interval = settings.sync_interval;
        let mut machine = Self {
            settings,
            max_backoff: MAX_SYNC_BACKOFF
                .min(interval.saturating_mul(48))
                .max(interval),
            jitter,
            now,
            stopped: false,
            next_sync: now.instant,
            sync_failures: 0,
            sync_in_flight: false,
            last_sync: None,
            push_connected: false,
            notified_during_sync: false,
            agent,
            agent_renew_at: agent.not_before,
            next_rotation: now.instant,
            rotation_failures: 0,
            must_reattest: None,
            rotation_in_flight: None,
            batch_limit: MAX_CSRS_PER_CALL,
            mint_planned: false,
            n_over_capacity: 0,
            workload_expiries: BTreeMap::new(),
            first_renewal: None,
            sync_started_at: None,
        };
        machine.agent_renew_at = machine.renewal_time(agent.not_before, agent.not_after);
        machine
    }

    /// When a credential valid over `[not_before, not_after]` is renewed: at half its life,
    /// with up to ±10% of that half as jitter.
    pub(super) fn renewal_time(
        &mut self,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> SystemTime {
        rotation::renewal_time(not_before, not_after, (self.jitter)())
    }

    /// The number of failed syncs in a row.
    pub(super) fn sync_failures(&self) -> u32 {
        self.sync_failures
    }

    /// CSRs per `BatchNewX509SVID` call for the next mint.
    #[cfg(test)]
    fn batch_limit(&self) -> usize {
        self.batch_limit
    }

    /// The poll interval: `sync_interval`, or with a healthy push stream the safety net.
    pub(super) fn poll_interval(&self) -> Duration {
        if self.push_connected {
            self.settings
                .push_sync_interval
                .max(self.settings.sync_interval)
        } else {
            self.settings.sync_interval
        }
    }

    fn can_reattest(&self) -> bool {
        self.agent.reattestable && self.settings.has_reattest_method
    }

    /// Takes in what happened at `now` and says what to do, in order.
    pub(super) fn on_event(&mut self, now: Now, event: Event) -> Vec<Action> {
        self.now = now;
        if self.stopped {
            return Vec::new();
        }
        match event {
            Event::Wakeup => self.wakeup(now),
            Event::RotationSucceeded(agent) => self.rotation_succeeded(now, agent),
            Event::RotationFailed(failure) => self.rotation_failed(now, failure),
            Event::AgentAuthorityUntrusted => {
                self.agent_renew_at = now.wall;
                Vec::new()
            }
            Event::EntriesSynced {
                candidates,
                other_held,
            } => self.plan_mint(now, candidates, other_held),
            Event::MintBatchFailed => {
                self.batch_limit = (self.batch_limit / 2).max(1);
                self.mint_planned = false;
                Vec::new()
            }
            Event::MintFinished => {
                if std::mem::take(&mut self.mint_planned) {
                    self.batch_limit = self.batch_limit.saturating_mul(2).min(MAX_CSRS_PER_CALL);
                }
                Vec::new()
            }
            Event::SyncSucceeded { n_entries: _ } => self.sync_succeeded(now),
            Event::SyncFailed(failure) => self.sync_failed(now, failure),
            Event::WorkloadSvidsHeld {
                expiries,
                first_renewal,
            } => {
                self.workload_expiries = expiries;
                self.first_renewal = first_renewal;
                Vec::new()
            }
            Event::PushConnected => {
                self.push_connected = true;
                Vec::new()
            }
            Event::PushNotified => self.push_notified(now),
            Event::PushLost => {
                self.push_connected = false;
                if !self.sync_in_flight && self.sync_failures == 0 {
                    // Back to the poll interval, counted from the last sync.
                    let due = self
                        .last_sync
                        .map_or(now.instant, |at| at + self.poll_interval());
                    self.next_sync = self.next_sync.min(due);
                }
                self.sync_if_due(now)
            }
        }
    }

    /// When to wake next; `None` once stopped.
    pub(super) fn next_wakeup(&self) -> Option<Instant> {
        if self.stopped {
            return None;
        }
        let now = self.now;
        let mut wake = self.next_sync;
        if self.must_reattest.is_some() {
            wake = wake.min(self.next_rotation);
        } else {
            wake = wake.min(now.instant_at(self.agent_renew_at).max(self.next_rotation));
        }
        // Wake when the agent SVID is about to expire, unless that has happened already (a
        // re-attestation is then pending and paced by `next_rotation`).
        let agent_expiry = self
            .agent
            .not_after
            .checked_sub(AGENT_SVID_EXPIRY_MARGIN)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        if agent_expiry > now.wall {
            wake = wake.min(now.instant_at(agent_expiry));
        }
        if let Some(&first_expiry) = self.workload_expiries.values().min() {
            wake = wake.min(now.instant_at(first_expiry));
        }
        if let Some(renewal_sync) = self.renewal_sync(now) {
            wake = wake.min(renewal_sync);
        }
        Some(wake)
    }

    /// When the first workload SVID renewal calls for a sync: at its time, but no sooner than
    /// `sync_interval` after the last sync started. With a push stream the poll interval is
    /// long, and renewals (which happen in a sync) would otherwise wait for it; this keeps
    /// them on the pace the agent polls at without one, never faster.
    fn renewal_sync(&self, now: Now) -> Option<Instant> {
        let renewal = now.instant_at(self.first_renewal?);
        let paced = self
            .sync_started_at
            .map_or(renewal, |started| started + self.settings.sync_interval);
        Some(renewal.max(paced))
    }

    fn stop(&mut self, reason: StopReason) -> Action {
        self.stopped = true;
        Action::Stop(reason)
    }

    fn wakeup(&mut self, now: Now) -> Vec<Action> {
        if self.rotation_in_flight.is_some() || self.sync_in_flight {
            return Vec::new();
        }
        let mut actions = Vec::new();
        let expired: Vec<EntryId> = self
            .workload_expiries
            .iter()
            .filter(|(_, not_after)| **not_after <= now.wall)
            .map(|(entry_id, _)| entry_id.clone())
            .collect();
        if !expired.is_empty() {
            for entry_id in &expired {
                self.workload_expiries.remove(entry_id);
            }
            actions.push(Action::WithdrawExpired(expired));
        }
        if now.wall + AGENT_SVID_EXPIRY_MARGIN >= self.agent.not_after {
            if !self.can_reattest() {
                let expired_at = self.agent.not_after;
                actions.push(self.stop(StopReason::AgentSvidExpired { expired_at }));
                return actions;
            }
            self.must_reattest.get_or_insert("the agent SVID expired");
        }
        let rotation_due = self.must_reattest.is_some() || now.wall >= self.agent_renew_at;
        if rotation_due && now.instant >= self.next_rotation {
            let reason = self.must_reattest.take();
            self.rotation_in_flight = Some(reason);
            actions.push(match reason {
                Some(reason) => Action::Reattest { reason },
                None if self.can_reattest() => Action::Reattest { reason: "rotation" },
                None => Action::RenewAgentSvid,
            });
            return actions;
        }
        if self.sync_failures == 0 && self.renewal_sync(now).is_some_and(|due| due <= now.instant) {
            self.next_sync = self.next_sync.min(now.instant);
        }
        actions.extend(self.sync_if_due(now));
        actions
    }

    fn sync_if_due(&mut self, now: Now) -> Vec<Action> {
        if self.must_reattest.is_some()
            || self.sync_in_flight
            || self.rotation_in_flight.is_some()
            || now.instant < self.next_sync
        {
            return Vec::new();
        }
        self.sync_in_flight = true;
        self.sync_started_at = Some(now.instant);
        vec![Action::Sync]
    }

    fn rotation_succeeded(&mut self, now: Now, agent: AgentSvid) -> Vec<Action> {
        let reattest_reason = self.rotation_in_flight.take().flatten();
        self.agent = agent;
        self.agent_renew_at = self.renewal_time(agent.not_before, agent.not_after);
        self.rotation_failures = 0;
        // Never rotate twice within an interval, even if the server hands out SVIDs that are
        // due at once.
        self.next_rotation = now.instant + self.settings.sync_interval;
        // A re-attestation may follow a failed sync; sync again now.
        if reattest_reason.is_some() {
            self.next_sync = now.instant;
        }
        self.sync_if_due(now)
    }

    fn rotation_failed(&mut self, now: Now, failure: Failure) -> Vec<Action> {
        let reattest_reason = self.rotation_in_flight.take().flatten();
        let mut actions = vec![Action::Reconnect];
        match self.next_step(failure, reattest_reason.is_some()) {
            Err(stop) => {
                actions.extend(stop);
                return actions;
            }
            Ok(NextStep::Reattest(reason)) => self.must_reattest = Some(reason),
            Ok(NextStep::Retry) => self.must_reattest = reattest_reason,
        }
        let after = rotation::backoff(
            self.rotation_failures,
            self.settings.sync_interval,
            self.max_backoff,
            (self.jitter)(),
        );
        self.rotation_failures = self.rotation_failures.saturating_add(1);
        self.next_rotation = now.instant + after;
        actions.push(Action::RetryLater {
            operation: Operation::Rotation,
            after,
        });
        actions.extend(self.sync_if_due(now));
        actions
    }

    fn sync_succeeded(&mut self, now: Now) -> Vec<Action> {
        self.sync_in_flight = false;
        self.sync_failures = 0;
        self.last_sync = Some(now.instant);
        self.next_sync = if std::mem::take(&mut self.notified_during_sync) {
            // What was notified may have changed after this sync read it.
            now.instant
        } else {
            now.instant + self.poll_interval()
        };
        vec![Action::ReportUsage]
    }

    fn sync_failed(&mut self, now: Now, failure: Failure) -> Vec<Action> {
        self.sync_in_flight = false;
        self.notified_during_sync = false;
        let mut actions = vec![Action::Reconnect];
        match self.next_step(failure, false) {
            Err(stop) => actions.extend(stop),
            Ok(NextStep::Reattest(reason)) => {
                self.must_reattest = Some(reason);
                self.next_rotation = self.next_rotation.max(now.instant);
                self.next_sync = now.instant;
            }
            Ok(NextStep::Retry) => {
                let after = rotation::backoff(
                    self.sync_failures,
                    self.settings.sync_interval,
                    self.max_backoff,
                    (self.jitter)(),
                );
                self.sync_failures = self.sync_failures.saturating_add(1);
                self.next_sync = now.instant + after;
                actions.push(Action::RetryLater {
                    operation: Operation::Sync,
                    after,
                });
            }
        }
        actions
    }

    fn push_notified(&mut self, now: Now) -> Vec<Action> {
        if self.sync_in_flight {
            // One more sync after this one, however many notifications come meanwhile.
            self.notified_during_sync = true;
            return Vec::new();
        }
        // A failing server is not asked sooner than its backoff allows.
        if self.sync_failures == 0 {
            self.next_sync = self.next_sync.min(now.instant);
        }
        self.sync_if_due(now)
    }

    /// How to go on after `failure`, or stop: banned, or told to re-attest when the agent
    /// cannot (SPIRE's agent then deletes its SVID and exits). A refused re-attestation is
    /// final too.
    fn next_step(&mut self, failure: Failure, reattesting: bool) -> Result<NextStep, [Action; 2]> {
        let reason = match failure {
            Failure::Banned => return Err([Action::ForgetSvid, self.stop(StopReason::Banned)]),
            Failure::MustReattest(reason) => reason,
            Failure::Refused(message) if reattesting => {
                return Err([
                    Action::ForgetSvid,
                    self.stop(StopReason::AttestationRefused(message)),
                ]);
            }
            Failure::Refused(_) | Failure::Retryable => return Ok(NextStep::Retry),
        };
        if !self.can_reattest() {
            return Err([
                Action::ForgetSvid,
                self.stop(StopReason::MustReattest(reason)),
            ]);
        }
        tracing::warn!(reason, "the server requires the agent to attest again");
        Ok(NextStep::Reattest(reason))
    }

    /// Which held SVIDs to drop and which entries to mint for, in batches: at most
    /// `x509_svid_cache_size` entries (the first by ID) hold SVIDs; an entry is minted for
    /// when it holds none, its SVID is due for renewal or chains to a tainted authority, or
    /// its entry changed.
    fn plan_mint(
        &mut self,
        now: Now,
        candidates: Vec<MintCandidate>,
        mut other_held: Vec<EntryId>,
    ) -> Vec<Action> {
        let capacity = self.settings.x509_svid_cache_size.max(1);
        let n_over = candidates.len().saturating_sub(capacity);
        if n_over != self.n_over_capacity {
            if n_over > 0 {
                tracing::warn!(
                    n_entries = candidates.len(),
                    x509_svid_cache_size = capacity,
                    "more entries than x509_svid_cache_size; only the first by entry ID get SVIDs"
                );
            }
            self.n_over_capacity = n_over;
        }
        let mut candidates = candidates;
        let over = candidates.split_off(candidates.len().min(capacity));
        other_held.extend(
            over.into_iter()
                .filter(|candidate| candidate.held.is_some())
                .map(|candidate| candidate.entry_id),
        );
        let mut actions = Vec::new();
        if !other_held.is_empty() {
            actions.push(Action::Evict(other_held));
        }
        let stale: Vec<EntryId> = candidates
            .into_iter()
            .filter(|candidate| match candidate.held {
                None => true,
                Some(held) => held.force_renew || now.wall >= held.renew_at || held.entry_changed,
            })
            .map(|candidate| candidate.entry_id)
            .collect();
        self.mint_planned = !stale.is_empty();
        actions.extend(
            stale
                .chunks(self.batch_limit.max(1))
                .map(|batch| Action::Mint(batch.to_vec())),
        );
        actions
    }
}

/// The order in which to dial `n_servers` configured servers: the one that answered last,
/// then each next one, wrapping around.
pub(super) fn dial_order(last_answered: usize, n_servers: usize) -> impl Iterator<Item = usize> {
    (0..n_servers).map(move |step| (last_answered + step) % n_servers)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};
    use std::time::UNIX_EPOCH;

    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    /// A virtual clock: one origin on both clocks, moved only by the test.
    #[derive(Clone, Copy)]
    struct VirtualClock {
        origin: Now,
        elapsed: Duration,
    }

    impl VirtualClock {
        fn new() -> Self {
            Self {
                origin: Now {
                    instant: Instant::now(),
                    wall: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
                },
                elapsed: Duration::ZERO,
            }
        }

        fn now(&self) -> Now {
            self.at(self.elapsed)
        }

        fn at(&self, elapsed: Duration) -> Now {
            Now {
                instant: self.origin.instant + elapsed,
                wall: self.origin.wall + elapsed,
            }
        }

        fn wall(&self, elapsed: Duration) -> SystemTime {
            self.origin.wall + elapsed
        }

        /// Moves to the machine's next wakeup.
        fn advance_to(&mut self, wake: Instant) {
            self.elapsed = wake - self.origin.instant;
        }

        fn advance(&mut self, by: Duration) {
            self.elapsed += by;
        }
    }

    /// The default `push_sync_interval`.
    const PUSH_SAFETY_NET_INTERVAL: Duration = crate::config::DEFAULT_PUSH_SYNC_INTERVAL;

    fn fixed(jitter: f64) -> JitterSource {
        Box::new(move || Jitter::new(jitter))
    }

    fn settings(sync_interval: Duration) -> Settings {
        Settings {
            sync_interval,
            push_sync_interval: PUSH_SAFETY_NET_INTERVAL,
            x509_svid_cache_size: 1000,
            has_reattest_method: false,
        }
    }

    /// An agent SVID valid for `lifetime` from the clock's origin.
    fn agent(clock: &VirtualClock, lifetime: Duration, reattestable: bool) -> AgentSvid {
        AgentSvid {
            not_before: clock.wall(Duration::ZERO),
            not_after: clock.wall(lifetime),
            reattestable,
        }
    }

    fn machine(clock: &VirtualClock, settings: Settings, jitter: f64) -> Machine {
        Machine::new(
            clock.now(),
            settings,
            agent(clock, 24 * HOUR, false),
            fixed(jitter),
        )
    }

    fn id(name: &str) -> EntryId {
        EntryId::new(name).unwrap()
    }

    fn retry_after(actions: &[Action], operation: Operation) -> Option<Duration> {
        actions.iter().find_map(|action| match action {
            Action::RetryLater {
                operation: o,
                after,
            } if *o == operation => Some(*after),
            _ => None,
        })
    }

    fn batch_sizes(actions: &[Action]) -> Vec<usize> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::Mint(ids) => Some(ids.len()),
                _ => None,
            })
            .collect()
    }

    fn fresh(names: &[String]) -> Vec<MintCandidate> {
        names
            .iter()
            .map(|name| MintCandidate {
                entry_id: id(name),
                held: None,
            })
            .collect()
    }

    #[test]
    fn the_agent_svid_is_renewed_at_half_life_within_the_jitter_bounds() {
        for (jitter, renew_after) in [
            (0.0, 30 * MINUTE),
            (1.0, 33 * MINUTE),
            (-1.0, 27 * MINUTE),
            (0.5, 31 * MINUTE + Duration::from_secs(30)),
        ] {
            let mut clock = VirtualClock::new();
            // A sync interval longer than the SVID's half-life, so that only rotation wakes.
            let mut m = Machine::new(
                clock.now(),
                settings(2 * HOUR),
                agent(&clock, HOUR, false),
                fixed(jitter),
            );
            assert_eq!(m.on_event(clock.now(), Event::Wakeup), [Action::Sync]);
            let after_sync = m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 0 });
            assert_eq!(after_sync, [Action::ReportUsage]);
            assert_eq!(
                m.next_wakeup(),
                Some(clock.at(renew_after).instant),
                "jitter {jitter}"
            );
            clock.advance(renew_after - Duration::from_secs(1));
            assert_eq!(
                m.on_event(clock.now(), Event::Wakeup),
                [],
                "jitter {jitter}"
            );
            clock.advance(Duration::from_secs(1));
            assert_eq!(
                m.on_event(clock.now(), Event::Wakeup),
                [Action::RenewAgentSvid],
                "jitter {jitter}"
            );
            // The renewed SVID is renewed at its own half-life, and never within an interval.
            let renewed = AgentSvid {
                not_before: clock.now().wall,
                not_after: clock.now().wall + HOUR,
                reattestable: false,
            };
            assert_eq!(
                m.on_event(clock.now(), Event::RotationSucceeded(renewed)),
                []
            );
            clock.advance(renew_after);
            assert_eq!(
                m.on_event(clock.now(), Event::Wakeup),
                [],
                "jitter {jitter}"
            );
        }

        // Whatever the random draw, a workload SVID is renewed within ±10% of its half-life.
        let clock = VirtualClock::new();
        let draws = Arc::new(Mutex::new(vec![
            0,
            u64::MAX,
            1 << 63,
            12_345_678_901,
            u64::MAX / 3,
        ]));
        let source = Arc::clone(&draws);
        let mut m = Machine::new(
            clock.now(),
            settings(MINUTE),
            agent(&clock, 24 * HOUR, false),
            Box::new(move || Jitter::from_random(source.lock().unwrap().pop().unwrap_or(0))),
        );
        let (not_before, not_after) = (clock.wall(Duration::ZERO), clock.wall(HOUR));
        let mut seen = BTreeSet::new();
        for _ in 0..5 {
            let renew_at = m.renewal_time(not_before, not_after);
            assert!(renew_at >= clock.wall(27 * MINUTE), "{renew_at:?}");
            assert!(renew_at <= clock.wall(33 * MINUTE), "{renew_at:?}");
            seen.insert(renew_at);
        }
        assert!(seen.len() > 1, "the jitter spreads renewals");
    }

    #[test]
    fn expired_workload_svids_wake_the_agent_and_are_withdrawn() {
        let mut clock = VirtualClock::new();
        let mut m = machine(&clock, settings(HOUR), 0.0);
        assert_eq!(m.on_event(clock.now(), Event::Wakeup), [Action::Sync]);
        m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 2 });
        let held = BTreeMap::from([
            (id("a"), clock.wall(10 * MINUTE)),
            (id("b"), clock.wall(20 * MINUTE)),
        ]);
        m.on_event(
            clock.now(),
            Event::WorkloadSvidsHeld {
                expiries: held,
                first_renewal: None,
            },
        );
        assert_eq!(m.next_wakeup(), Some(clock.at(10 * MINUTE).instant));
        clock.advance(10 * MINUTE - Duration::from_secs(1));
        assert_eq!(m.on_event(clock.now(), Event::Wakeup), []);
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            m.on_event(clock.now(), Event::Wakeup),
            [Action::WithdrawExpired(vec![id("a")])]
        );
        assert_eq!(m.next_wakeup(), Some(clock.at(20 * MINUTE).instant));
        clock.advance(HOUR);
        assert_eq!(
            m.on_event(clock.now(), Event::Wakeup),
            [Action::WithdrawExpired(vec![id("b")]), Action::Sync]
        );
    }

    #[test]
    fn an_untrusted_authority_makes_the_agent_svid_due_now() {
        let clock = VirtualClock::new();
        let mut m = machine(&clock, settings(5 * MINUTE), 0.0);
        assert_eq!(m.on_event(clock.now(), Event::Wakeup), [Action::Sync]);
        assert_eq!(m.on_event(clock.now(), Event::AgentAuthorityUntrusted), []);
        m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 1 });
        assert_eq!(
            m.on_event(clock.now(), Event::Wakeup),
            [Action::RenewAgentSvid]
        );
    }

    #[test]
    fn sync_backoff_doubles_up_to_the_cap_and_resets_on_success() {
        let mut clock = VirtualClock::new();
        let interval = Duration::from_secs(5);
        let mut m = machine(&clock, settings(interval), 0.0);
        let mut delays = Vec::new();
        for _ in 0..9 {
            assert_eq!(m.on_event(clock.now(), Event::Wakeup), [Action::Sync]);
            let actions = m.on_event(clock.now(), Event::SyncFailed(Failure::Retryable));
            assert_eq!(actions.first(), Some(&Action::Reconnect));
            let after = retry_after(&actions, Operation::Sync).unwrap();
            assert_eq!(m.next_wakeup(), Some(clock.now().instant + after));
            delays.push(after.as_secs());
            clock.advance_to(m.next_wakeup().unwrap());
        }
        // min(8 min, 48 × 5 s) = 240 s.
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 240, 240, 240]);

        assert_eq!(m.on_event(clock.now(), Event::Wakeup), [Action::Sync]);
        assert_eq!(
            m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 3 }),
            [Action::ReportUsage]
        );
        assert_eq!(m.sync_failures(), 0);
        assert_eq!(m.next_wakeup(), Some(clock.now().instant + interval));
        clock.advance(interval);
        assert_eq!(m.on_event(clock.now(), Event::Wakeup), [Action::Sync]);
        let actions = m.on_event(clock.now(), Event::SyncFailed(Failure::Retryable));
        assert_eq!(retry_after(&actions, Operation::Sync), Some(interval));

        // Jitter only shortens a delay, by up to 10%; the cap is 8 min for long intervals and
        // the interval itself beyond that.
        for (interval, jitter, expected) in [
            (Duration::from_secs(5), 1.0, Duration::from_millis(4500)),
            (Duration::from_secs(30), 0.0, Duration::from_secs(480)),
            (20 * MINUTE, 0.0, 20 * MINUTE),
        ] {
            let mut clock = VirtualClock::new();
            let mut m = machine(&clock, settings(interval), jitter);
            let mut last = Duration::ZERO;
            for _ in 0..12 {
                m.on_event(clock.now(), Event::Wakeup);
                let actions = m.on_event(clock.now(), Event::SyncFailed(Failure::Retryable));
                last = retry_after(&actions, Operation::Sync).unwrap();
                clock.advance_to(m.next_wakeup().unwrap());
                if jitter > 0.0 {
                    break;
                }
            }
            assert_eq!(last, expected, "interval {interval:?}");
        }
    }

    #[test]
    fn rotation_backs_off_and_the_servers_refusals_decide_what_follows() {
        let mut clock = VirtualClock::new();
        let interval = Duration::from_secs(5);
        let mut m = Machine::new(
            clock.now(),
            settings(interval),
            agent(&clock, Duration::from_secs(20), false),
            fixed(0.0),
        );
        m.on_event(clock.now(), Event::Wakeup);
        m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 0 });
        clock.advance(Duration::from_secs(10));
        assert_eq!(
            m.on_event(clock.now(), Event::Wakeup),
            [Action::RenewAgentSvid]
        );
        // A failed renewal backs off, and the sync that is due still runs.
        let actions = m.on_event(clock.now(), Event::RotationFailed(Failure::Retryable));
        assert_eq!(
            actions,
            [
                Action::Reconnect,
                Action::RetryLater {
                    operation: Operation::Rotation,
                    after: interval
                },
                Action::Sync
            ]
        );
        m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 0 });
        clock.advance(interval);
        assert_eq!(
            m.on_event(clock.now(), Event::Wakeup),
            [Action::RenewAgentSvid]
        );
        let actions = m.on_event(clock.now(), Event::RotationFailed(Failure::Retryable));
        assert_eq!(
            retry_after(&actions, Operation::Rotation),
            Some(2 * interval)
        );
        assert_eq!(actions.last(), Some(&Action::Sync));
        m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 0 });
        // Expired, and no way to attest again: stop.
        clock.advance(Duration::from_secs(5));
        let actions = m.on_event(clock.now(), Event::Wakeup);
        assert_eq!(
            actions,
            [Action::Stop(StopReason::AgentSvidExpired {
                expired_at: clock.wall(Duration::from_secs(20))
            })]
        );
        assert_eq!(m.next_wakeup(), None);
        assert_eq!(m.on_event(clock.now(), Event::Wakeup), []);

        // A ban stops the agent and forgets its SVID.
        let clock = VirtualClock::new();
        let mut m = machine(&clock, settings(interval), 0.0);
        m.on_event(clock.now(), Event::Wakeup);
        assert_eq!(
            m.on_event(clock.now(), Event::SyncFailed(Failure::Banned)),
            [
                Action::Reconnect,
                Action::ForgetSvid,
                Action::Stop(StopReason::Banned)
            ]
        );

        // Told to attest again by an agent that cannot: stop.
        let mut m = machine(&clock, settings(interval), 0.0);
        m.on_event(clock.now(), Event::Wakeup);
        assert_eq!(
            m.on_event(
                clock.now(),
                Event::SyncFailed(Failure::MustReattest("AGENT_EVICTED"))
            ),
            [
                Action::Reconnect,
                Action::ForgetSvid,
                Action::Stop(StopReason::MustReattest("AGENT_EVICTED"))
            ]
        );

        // An agent that can attests again at once, syncs right after, and a refused
        // re-attestation is final.
        let can = Settings {
            has_reattest_method: true,
            ..settings(interval)
        };
        let mut clock = VirtualClock::new();
        let mut m = Machine::new(clock.now(), can, agent(&clock, 24 * HOUR, true), fixed(0.0));
        m.on_event(clock.now(), Event::Wakeup);
        let actions = m.on_event(
            clock.now(),
            Event::SyncFailed(Failure::MustReattest("AGENT_NOT_ATTESTED")),
        );
        assert_eq!(actions, [Action::Reconnect]);
        assert_eq!(m.next_wakeup(), Some(clock.now().instant));
        assert_eq!(
            m.on_event(clock.now(), Event::Wakeup),
            [Action::Reattest {
                reason: "AGENT_NOT_ATTESTED"
            }]
        );
        clock.advance(Duration::from_secs(1));
        let renewed = AgentSvid {
            not_before: clock.now().wall,
            not_after: clock.now().wall + HOUR,
            reattestable: true,
        };
        assert_eq!(
            m.on_event(clock.now(), Event::RotationSucceeded(renewed)),
            [Action::Sync]
        );
        m.on_event(
            clock.now(),
            Event::SyncFailed(Failure::MustReattest("AGENT_NOT_ATTESTED")),
        );
        clock.advance(interval);
        m.on_event(clock.now(), Event::Wakeup);
        assert_eq!(
            m.on_event(
                clock.now(),
                Event::RotationFailed(Failure::Refused("no".into()))
            ),
            [
                Action::Reconnect,
                Action::ForgetSvid,
                Action::Stop(StopReason::AttestationRefused("no".into()))
            ]
        );

        // A re-attestable agent rotates by attesting again; a refusal then is retried.
        let mut clock = VirtualClock::new();
        let mut m = Machine::new(clock.now(), can, agent(&clock, HOUR, true), fixed(0.0));
        m.on_event(clock.now(), Event::Wakeup);
        m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 0 });
        clock.advance(30 * MINUTE);
        assert_eq!(
            m.on_event(clock.now(), Event::Wakeup),
            [Action::Reattest { reason: "rotation" }]
        );
        let actions = m.on_event(
            clock.now(),
            Event::RotationFailed(Failure::Refused("no".into())),
        );
        assert_eq!(retry_after(&actions, Operation::Rotation), Some(interval));
    }

    #[test]
    fn batches_halve_after_a_failed_call_and_recover_after_full_mints() {
        let clock = VirtualClock::new();
        let mut m = Machine::new(
            clock.now(),
            Settings {
                x509_svid_cache_size: 5000,
                ..settings(Duration::from_secs(5))
            },
            agent(&clock, 24 * HOUR, false),
            fixed(0.0),
        );
        let names: Vec<String> = (0..1200).map(|i| format!("e{i:04}")).collect();
        let plan = |m: &mut Machine| {
            let actions = m.on_event(
                clock.now(),
                Event::EntriesSynced {
                    candidates: fresh(&names),
                    other_held: Vec::new(),
                },
            );
            batch_sizes(&actions)
        };
        assert_eq!(plan(&mut m), [500, 500, 200]);
        m.on_event(clock.now(), Event::MintBatchFailed);
        assert_eq!(m.batch_limit(), 250);
        assert_eq!(plan(&mut m), [250, 250, 250, 250, 200]);
        m.on_event(clock.now(), Event::MintBatchFailed);
        assert_eq!(plan(&mut m)[0], 125);
        for _ in 0..10 {
            m.on_event(clock.now(), Event::MintBatchFailed);
        }
        assert_eq!(m.batch_limit(), 1);
        plan(&mut m);
        m.on_event(clock.now(), Event::MintFinished);
        assert_eq!(m.batch_limit(), 2);
        // Nothing to mint: no recovery step.
        m.on_event(
            clock.now(),
            Event::EntriesSynced {
                candidates: Vec::new(),
                other_held: Vec::new(),
            },
        );
        m.on_event(clock.now(), Event::MintFinished);
        assert_eq!(m.batch_limit(), 2);
        for _ in 0..20 {
            plan(&mut m);
            m.on_event(clock.now(), Event::MintFinished);
        }
        assert_eq!(m.batch_limit(), MAX_CSRS_PER_CALL);
        assert_eq!(plan(&mut m), [500, 500, 200]);
    }

    #[test]
    fn only_the_first_entries_by_id_hold_svids_and_only_stale_ones_are_minted() {
        let clock = VirtualClock::new();
        let mut m = Machine::new(
            clock.now(),
            Settings {
                x509_svid_cache_size: 4,
                ..settings(Duration::from_secs(5))
            },
            agent(&clock, 24 * HOUR, false),
            fixed(0.0),
        );
        let held = |renew_in: Duration, force_renew: bool, entry_changed: bool| {
            Some(HeldSvid {
                renew_at: clock.wall(renew_in),
                force_renew,
                entry_changed,
            })
        };
        let candidate = |name: &str, held: Option<HeldSvid>| MintCandidate {
            entry_id: id(name),
            held,
        };
        let candidates = vec![
            candidate("a", held(HOUR, false, false)),
            candidate("b", held(Duration::ZERO, false, false)),
            candidate("c", held(HOUR, true, false)),
            candidate("d", held(HOUR, false, true)),
            candidate("e", held(HOUR, false, false)),
            candidate("f", None),
        ];
        let actions = m.on_event(
            clock.now(),
            Event::EntriesSynced {
                candidates: candidates.clone(),
                other_held: vec![id("stored")],
            },
        );
        assert_eq!(
            actions,
            [
                Action::Evict(vec![id("stored"), id("e")]),
                Action::Mint(vec![id("b"), id("c"), id("d")]),
            ]
        );
        // With room for all, nothing is evicted and the new entry is minted for.
        let mut m = Machine::new(
            clock.now(),
            settings(Duration::from_secs(5)),
            agent(&clock, 24 * HOUR, false),
            fixed(0.0),
        );
        let actions = m.on_event(
            clock.now(),
            Event::EntriesSynced {
                candidates,
                other_held: Vec::new(),
            },
        );
        assert_eq!(
            actions,
            [Action::Mint(vec![id("b"), id("c"), id("d"), id("f")])]
        );
    }

    #[test]
    fn a_healthy_push_stream_lengthens_polling_and_notifications_sync_at_once_coalesced() {
        let mut clock = VirtualClock::new();
        let interval = Duration::from_secs(5);
        let mut m = machine(&clock, settings(interval), 0.0);
        // Without push: exactly the configured interval.
        for _ in 0..3 {
            assert_eq!(m.on_event(clock.now(), Event::Wakeup), [Action::Sync]);
            m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 0 });
            assert_eq!(m.next_wakeup(), Some(clock.now().instant + interval));
            clock.advance(interval);
        }

        assert_eq!(m.on_event(clock.now(), Event::PushConnected), []);
        assert_eq!(m.on_event(clock.now(), Event::Wakeup), [Action::Sync]);
        m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 0 });
        assert_eq!(
            m.next_wakeup(),
            Some(clock.now().instant + PUSH_SAFETY_NET_INTERVAL)
        );
        let synced_at = clock.now().instant;

        // A notification syncs at once; those during the sync make one more, not three.
        clock.advance(Duration::from_secs(7));
        assert_eq!(m.on_event(clock.now(), Event::PushNotified), [Action::Sync]);
        for _ in 0..3 {
            assert_eq!(m.on_event(clock.now(), Event::PushNotified), []);
        }
        assert_eq!(m.on_event(clock.now(), Event::Wakeup), []);
        m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 0 });
        assert_eq!(m.next_wakeup(), Some(clock.now().instant));
        assert_eq!(m.on_event(clock.now(), Event::Wakeup), [Action::Sync]);
        m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 0 });
        assert_eq!(
            m.next_wakeup(),
            Some(clock.now().instant + PUSH_SAFETY_NET_INTERVAL)
        );
        assert!(m.next_wakeup() > Some(synced_at + PUSH_SAFETY_NET_INTERVAL));

        // Losing the stream brings back the poll interval, counted from the last sync.
        clock.advance(Duration::from_secs(2));
        assert_eq!(m.on_event(clock.now(), Event::PushLost), []);
        assert_eq!(
            m.next_wakeup(),
            Some(clock.now().instant - Duration::from_secs(2) + interval)
        );
        clock.advance(MINUTE);
        assert_eq!(m.on_event(clock.now(), Event::PushLost), [Action::Sync]);

        // A notification does not cut a failing server's backoff short.
        m.on_event(clock.now(), Event::SyncFailed(Failure::Retryable));
        m.on_event(clock.now(), Event::PushConnected);
        assert_eq!(m.on_event(clock.now(), Event::PushNotified), []);
        assert_eq!(m.next_wakeup(), Some(clock.now().instant + interval));
    }

    /// With a push stream the poll interval is long; a workload SVID's renewal brings the next
    /// sync forward to its time, but never closer than `sync_interval` to the last one: a
    /// renewal the sync could not make (or one already due when its SVID was minted) is retried
    /// at the pace of polling without push, not in a loop.
    #[test]
    fn workload_renewals_are_not_left_to_the_push_safety_net() {
        let mut clock = VirtualClock::new();
        let interval = Duration::from_secs(5);
        let mut m = machine(&clock, settings(interval), 0.0);
        m.on_event(clock.now(), Event::PushConnected);
        assert_eq!(m.on_event(clock.now(), Event::Wakeup), [Action::Sync]);
        m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 1 });
        let renewal = clock.wall(MINUTE);
        let held = Event::WorkloadSvidsHeld {
            expiries: BTreeMap::from([(id("a"), clock.wall(HOUR))]),
            first_renewal: Some(renewal),
        };
        m.on_event(clock.now(), held.clone());
        assert_eq!(m.next_wakeup(), Some(clock.at(MINUTE).instant));
        clock.advance(MINUTE);
        assert_eq!(m.on_event(clock.now(), Event::Wakeup), [Action::Sync]);
        m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 1 });
        // The sync did not renew it (the same renewal time is reported again): the next try is
        // a sync interval later, not at once.
        m.on_event(clock.now(), held);
        assert_eq!(m.next_wakeup(), Some(clock.now().instant + interval));
        assert_eq!(m.on_event(clock.now(), Event::Wakeup), []);
        clock.advance(interval);
        assert_eq!(m.on_event(clock.now(), Event::Wakeup), [Action::Sync]);
        m.on_event(clock.now(), Event::SyncSucceeded { n_entries: 1 });
        // Renewed: the next renewal is in an hour, and the safety net comes first.
        m.on_event(
            clock.now(),
            Event::WorkloadSvidsHeld {
                expiries: BTreeMap::from([(id("a"), clock.wall(2 * HOUR))]),
                first_renewal: Some(clock.wall(HOUR)),
            },
        );
        assert_eq!(
            m.next_wakeup(),
            Some(clock.now().instant + PUSH_SAFETY_NET_INTERVAL)
        );
    }

    #[test]
    fn the_machine_does_no_io_and_reads_no_clock() {
        let source = include_str!("machine.rs");
        let decisions = source
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default();
        assert!(
            decisions.len() < source.len(),
            "the tests module was not found"
        );
        for forbidden in [
            "tokio::",
            "tonic::",
            "::now(",
            "std::fs",
            "std::net",
            "std::io",
            "thread::sleep",
            "async ",
            ".await",
        ] {
            assert!(
                !decisions.contains(forbidden),
                "manager/machine.rs must stay free of I/O, clocks and runtimes: it uses {forbidden:?}"
            );
        }
    }

    #[test]
    fn servers_are_dialled_from_the_one_that_answered_last_in_order() {
        assert_eq!(dial_order(2, 4).collect::<Vec<_>>(), [2, 3, 0, 1]);
        assert_eq!(dial_order(0, 3).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(dial_order(0, 1).collect::<Vec<_>>(), [0]);
        assert_eq!(dial_order(0, 0).count(), 0);
        // Every failed call drops the connection, so that the next dial moves on.
        let clock = VirtualClock::new();
        let mut m = machine(&clock, settings(Duration::from_secs(5)), 0.0);
        m.on_event(clock.now(), Event::Wakeup);
        let actions = m.on_event(clock.now(), Event::SyncFailed(Failure::Retryable));
        assert_eq!(actions.first(), Some(&Action::Reconnect));
    }
}
