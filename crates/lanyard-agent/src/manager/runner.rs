//! The manager's background task: the sync loop, workload SVID minting and renewal,
//! agent SVID rotation, reactions to the server's denials, and snapshot publishing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::rotation::{self, Jitter};
use lanyard_core::x509::{self, X509Svid};
use lanyard_core::{EntryId, SpiffeId, TrustBundle, TrustDomain};
use lanyard_proto::convert::x509_svid_from_proto;
use lanyard_proto::spire::api::server::svid::v1::NewX509svidParams;
use lanyard_proto::spire::api::types::permission_denied_details::Reason;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use super::attest::{
    agent_renewal_time, attest_once, attestation_refused, authorities, credentials_from_chain,
    load_attestor,
};
use super::client::{self, AgentCredentials, ClientError, ServerClient, ServerTrust};
use super::report::UsageReporter;
use super::storage::{self, StoredState, StoredSvid};
use super::{AGENT_SVID_EXPIRY_MARGIN, Clock, ManagerError, blocking, sync};
use crate::cache::{CachedEntry, Identity, Snapshot};
use crate::config::AgentConfig;
use crate::usage::UsageTracker;

/// The longest wait between failed syncs (SPIRE: min(8 min, 48 × sync interval)).
const MAX_SYNC_BACKOFF: Duration = Duration::from_secs(8 * 60);

/// The most CSRs in one `BatchNewX509SVID` call (the server's per-call limit).
const MAX_CSRS_PER_CALL: usize = 500;

/// A workload SVID the agent minted, with its key and when to renew it.
struct MintedSvid {
    entry: Arc<CachedEntry>,
    svid: Arc<X509Svid>,
    key: Arc<KeyPair>,
    renew_at: SystemTime,
    /// Set when the SVID chains to a tainted authority: renew at the next opportunity.
    force_renew: bool,
}

/// What to do after a server error.
enum NextStep {
    /// Back off and try again.
    Retry,
    /// Attest again, for this reason.
    Reattest(&'static str),
}

/// The manager's background task and everything it owns.
pub(super) struct Runner {
    config: AgentConfig,
    clock: Clock,
    client: Arc<ServerClient>,
    snapshot_tx: watch::Sender<Arc<Snapshot>>,
    agent_id_tx: watch::Sender<SpiffeId>,
    credentials: Arc<AgentCredentials>,
    agent_renew_at: SystemTime,
    reattestable: bool,
    bundle: Arc<TrustBundle>,
    federated: BTreeMap<TrustDomain, Arc<TrustBundle>>,
    entries: BTreeMap<EntryId, Arc<CachedEntry>>,
    svids: BTreeMap<EntryId, MintedSvid>,
    synced: bool,
    /// Something changed since the last published snapshot.
    dirty: bool,
    /// CSRs per `BatchNewX509SVID` call: halved after a failed call, like SPIRE's agent.
    batch_limit: usize,
    /// Entries left without SVIDs because of `x509_svid_cache_size`, last time we warned.
    n_over_capacity: usize,
    usage: UsageReporter,
    /// Published for the health checks.
    health: watch::Sender<super::AgentHealth>,
    metrics: crate::metrics::AgentMetrics,
}

impl Runner {
    /// A runner for an agent with `credentials`, publishing through `snapshot_tx`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        config: AgentConfig,
        clock: Clock,
        client: Arc<ServerClient>,
        snapshot_tx: watch::Sender<Arc<Snapshot>>,
        agent_id_tx: watch::Sender<SpiffeId>,
        credentials: Arc<AgentCredentials>,
        reattestable: bool,
        bundle: Arc<TrustBundle>,
        usage: Arc<UsageTracker>,
        health: watch::Sender<super::AgentHealth>,
        metrics: crate::metrics::AgentMetrics,
    ) -> Self {
        Self {
            config,
            clock,
            client,
            snapshot_tx,
            agent_id_tx,
            agent_renew_at: agent_renewal_time(&credentials),
            credentials,
            reattestable,
            bundle,
            federated: BTreeMap::new(),
            entries: BTreeMap::new(),
            svids: BTreeMap::new(),
            synced: false,
            dirty: false,
            batch_limit: MAX_CSRS_PER_CALL,
            n_over_capacity: 0,
            usage: UsageReporter::new(usage),
            health,
            metrics,
        }
    }

    fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// The monotonic instant at which the clock will show `at`.
    fn instant_at(&self, at: SystemTime) -> Instant {
        Instant::now() + at.duration_since(self.now()).unwrap_or_default()
    }

    pub(super) async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), ManagerError> {
        let interval = self.config.sync_interval;
        let max_backoff = MAX_SYNC_BACKOFF
            .min(interval.saturating_mul(48))
            .max(interval);
        let mut next_sync = Instant::now();
        let mut sync_failures: u32 = 0;
        let mut next_rotation = Instant::now();
        let mut rotation_failures: u32 = 0;
        let mut must_reattest: Option<&'static str> = None;

        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let now = self.now();
            self.withdraw_expired(now);

            if now + AGENT_SVID_EXPIRY_MARGIN >= self.credentials.svid.not_after() {
                if !self.can_reattest() {
                    return Err(ManagerError::AgentSvidExpired {
                        expired_at: self.credentials.svid.not_after(),
                    });
                }
                must_reattest.get_or_insert("the agent SVID expired");
            }

            let rotation_due = must_reattest.is_some() || now >= self.agent_renew_at;
            if rotation_due && Instant::now() >= next_rotation {
                let reattest_reason = must_reattest.take();
                let result = tokio::select! {
                    result = self.rotate(reattest_reason) => result,
                    _ = stop.changed() => return Ok(()),
                };
                match result {
                    Ok(()) => {
                        rotation_failures = 0;
                        // Never rotate twice within an interval, even if the server hands
                        // out SVIDs that are due at once.
                        next_rotation = Instant::now() + interval;
                        // A re-attestation may follow a failed sync; sync again now.
                        if reattest_reason.is_some() {
                            next_sync = Instant::now();
                        }
                    }
                    Err(error) => {
                        self.client.reset();
                        let reattest = match self.next_step(&error, reattest_reason.is_some())? {
                            NextStep::Reattest(reason) => Some(reason),
                            NextStep::Retry => reattest_reason,
                        };
                        must_reattest = reattest;
                        let delay = rotation::backoff(
                            rotation_failures,
                            interval,
                            max_backoff,
                            Jitter::random(),
                        );
                        rotation_failures = rotation_failures.saturating_add(1);
                        next_rotation = Instant::now() + delay;
                        tracing::warn!(%error, retry_in = ?delay, "agent SVID rotation failed");
                    }
                }
            }

            if must_reattest.is_none() && Instant::now() >= next_sync {
                let started = Instant::now().into_std();
                let result = tokio::select! {
                    result = self.sync() => result,
                    _ = stop.changed() => return Ok(()),
                };
                self.metrics
                    .sync_ended(started, result.is_ok().then_some(self.entries.len()));
                match result {
                    Ok(()) => {
                        let now = self.now();
                        self.health
                            .send_modify(|health| health.last_sync = Some(now));
                        if sync_failures > 0 {
                            tracing::info!("sync with the server resumed");
                        }
                        sync_failures = 0;
                        next_sync = Instant::now() + interval;
                        // Serving what was just synced comes first: publish, then report.
                        self.publish();
                        let entries = &self.entries;
                        tokio::select! {
                            () = self.usage.after_sync(&self.client, |id| entries.contains_key(id)) => {}
                            _ = stop.changed() => return Ok(()),
                        }
                    }
                    Err(error) => {
                        self.client.reset();
                        match self.next_step(&error, false)? {
                            NextStep::Reattest(reason) => {
                                must_reattest = Some(reason);
                                next_rotation = next_rotation.max(Instant::now());
                                next_sync = Instant::now();
                            }
                            NextStep::Retry => {
                                let delay = rotation::backoff(
                                    sync_failures,
                                    interval,
                                    max_backoff,
                                    Jitter::random(),
                                );
                                sync_failures = sync_failures.saturating_add(1);
                                next_sync = Instant::now() + delay;
                                tracing::warn!(
                                    %error,
                                    retry_in = ?delay,
                                    "sync with the server failed"
                                );
                            }
                        }
                    }
                }
            }

            self.publish();

            let mut wake = next_sync;
            if must_reattest.is_some() {
                wake = wake.min(next_rotation);
            } else {
                wake = wake.min(self.instant_at(self.agent_renew_at).max(next_rotation));
            }
            // Wake when the agent SVID is about to expire, unless that has happened already
            // (a re-attestation is then pending and paced by `next_rotation`).
            let agent_expiry = self
                .credentials
                .svid
                .not_after()
                .checked_sub(AGENT_SVID_EXPIRY_MARGIN)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            if agent_expiry > self.now() {
                wake = wake.min(self.instant_at(agent_expiry));
            }
            if let Some(first_expiry) = self.svids.values().map(|s| s.svid.not_after()).min() {
                wake = wake.min(self.instant_at(first_expiry));
            }
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
    }

    fn can_reattest(&self) -> bool {
        self.reattestable
            && (self.config.node_attestor.x509pop.is_some()
                || self.config.node_attestor.k8s_psat.is_some())
    }

    /// Decides how to go on after `error`, or stops: banned, or told to re-attest when the
    /// agent cannot (SPIRE's agent then deletes its SVID and exits). A refused re-attestation
    /// is final too.
    fn next_step(&self, error: &ClientError, reattesting: bool) -> Result<NextStep, ManagerError> {
        let reason = match error.denial_reason() {
            Some(Reason::AgentBanned) => {
                self.forget_svid();
                return Err(ManagerError::Banned);
            }
            Some(
                reason @ (Reason::AgentExpired
                | Reason::AgentNotAttested
                | Reason::AgentNotActive
                | Reason::AgentMustReattest),
            ) => reason.as_str_name(),
            _ => {
                if reattesting && attestation_refused(error) {
                    self.forget_svid();
                    return Err(ManagerError::Attestation(error.to_string()));
                }
                return Ok(NextStep::Retry);
            }
        };
        if !self.can_reattest() {
            self.forget_svid();
            return Err(ManagerError::MustReattest {
                reason: reason.to_owned(),
            });
        }
        tracing::warn!(reason, "the server requires the agent to attest again");
        Ok(NextStep::Reattest(reason))
    }

    /// Deletes the stored SVID (keeping the bundle), so that the next start attests anew.
    fn forget_svid(&self) {
        let state = StoredState {
            svid: None,
            reattestable: self.reattestable,
            bundle: (*self.bundle).clone(),
        };
        if let Err(error) = storage::save(&self.config.data_dir, &state) {
            tracing::error!(%error, "could not delete the stored agent SVID");
        }
    }

    /// Saves the agent SVID, key and bundle.
    async fn persist(&self) {
        let state = StoredState {
            svid: Some(StoredSvid {
                chain: self.credentials.svid.cert_chain().to_vec(),
                key: Arc::clone(&self.credentials.key),
            }),
            reattestable: self.reattestable,
            bundle: (*self.bundle).clone(),
        };
        let data_dir = self.config.data_dir.clone();
        if let Err(error) = blocking(move || storage::save(&data_dir, &state)).await {
            tracing::error!(%error, "could not save the agent state");
        }
    }

    /// Renews the agent SVID: re-attestation when `reattest` gives a reason or the agent is
    /// re-attestable, else `RenewAgent` with a new key.
    async fn rotate(&mut self, reattest: Option<&'static str>) -> Result<(), ClientError> {
        if reattest.is_some() || self.can_reattest() {
            return self.reattest(reattest.unwrap_or("rotation")).await;
        }
        let key = KeyPair::generate(KeyType::EcP256)
            .map_err(|e| ClientError::Local(format!("generating the agent key: {e}")))?;
        let csr = x509::build_csr(&key, None)
            .map_err(|e| ClientError::Local(format!("building the agent CSR: {e}")))?;
        let channel = self.client.channel()?;
        let chain = client::with_deadline("RenewAgent", client::renew_agent(channel, csr)).await?;
        let credentials = credentials_from_chain(chain, Arc::new(key), &self.bundle, self.now())
            .map_err(|reason| ClientError::InvalidResponse {
                rpc: "RenewAgent",
                reason,
            })?;
        if credentials.svid.spiffe_id() != self.credentials.svid.spiffe_id() {
            return Err(ClientError::InvalidResponse {
                rpc: "RenewAgent",
                reason: format!(
                    "the renewed SVID is for {}, not {}",
                    credentials.svid.spiffe_id(),
                    self.credentials.svid.spiffe_id()
                ),
            });
        }
        tracing::info!(
            agent_id = %credentials.svid.spiffe_id(),
            expires_at = %humantime::format_rfc3339_seconds(credentials.svid.not_after()),
            "agent SVID renewed"
        );
        self.install_credentials(credentials).await;
        Ok(())
    }

    async fn reattest(&mut self, reason: &str) -> Result<(), ClientError> {
        let attestor =
            load_attestor(&self.config).map_err(|e| ClientError::Local(e.to_string()))?;
        let clock = Arc::clone(&self.clock);
        let attestation = attest_once(
            &self.client,
            &attestor,
            ServerTrust::Bundle,
            &self.config.trust_domain,
            move || clock(),
        )
        .await?;
        tracing::info!(
            agent_id = %attestation.credentials.svid.spiffe_id(),
            reason,
            "node attested again"
        );
        self.reattestable = attestation.reattestable;
        let now = self.now();
        self.apply_bundle(attestation.bundle, now);
        self.install_credentials(attestation.credentials).await;
        Ok(())
    }

    /// Switches to new agent credentials at once (the server makes a renewed SVID current on
    /// its first use) and saves them.
    async fn install_credentials(&mut self, credentials: AgentCredentials) {
        let credentials = Arc::new(credentials);
        self.agent_renew_at = agent_renewal_time(&credentials);
        self.client.set_credentials(Arc::clone(&credentials));
        self.agent_id_tx.send_if_modified(|id| {
            if id == credentials.svid.spiffe_id() {
                return false;
            }
            *id = credentials.svid.spiffe_id().clone();
            true
        });
        self.credentials = credentials;
        self.metrics.agent_svid_rotated();
        let expires_at = self.credentials.svid.not_after();
        self.health
            .send_modify(|health| health.svid_expires_at = expires_at);
        self.persist().await;
    }

    /// One sync: entries, the bundle, federated bundles, then SVIDs for what needs one.
    async fn sync(&mut self) -> Result<(), ClientError> {
        let channel = self.client.channel()?;
        let entries = {
            let mut stream = sync::GrpcSync::new(channel.clone());
            let result = client::with_deadline(
                sync::SYNC_AUTHORIZED_ENTRIES,
                sync::sync_entries(&mut stream, &self.entries),
            )
            .await;
            // Dropping the stream cancels it, as SPIRE's agent does.
            drop(stream);
            result?
        };
        let bundle = client::with_deadline(
            "GetBundle",
            client::get_bundle(channel.clone(), &self.config.trust_domain),
        )
        .await?;
        let federated_domains: BTreeSet<TrustDomain> = entries
            .values()
            .flat_map(|entry| entry.federates_with.iter().cloned())
            .filter(|td| *td != self.config.trust_domain)
            .collect();
        let mut federated = BTreeMap::new();
        for trust_domain in federated_domains {
            let fetched = client::with_deadline(
                "GetFederatedBundle",
                client::get_federated_bundle(channel.clone(), &trust_domain),
            )
            .await?;
            match fetched {
                Some(bundle) => {
                    federated.insert(trust_domain, Arc::new(bundle));
                }
                None => tracing::warn!(
                    trust_domain = %trust_domain,
                    "the server has no bundle for a federated trust domain"
                ),
            }
        }

        let now = self.now();
        if self.apply_bundle(bundle, now) {
            self.persist().await;
        }
        if self.federated != federated {
            self.federated = federated;
            self.dirty = true;
        }
        self.apply_entries(entries);
        self.mint(channel, now).await?;
        if !self.synced {
            self.synced = true;
            self.dirty = true;
        }
        Ok(())
    }

    /// Takes a new bundle of the trust domain; returns whether it changed. When the X.509
    /// authorities change, SVIDs that no longer chain to the bundle are withdrawn, and those
    /// that chain only to a tainted authority are renewed early (the agent's own too).
    fn apply_bundle(&mut self, bundle: TrustBundle, now: SystemTime) -> bool {
        if *self.bundle == bundle {
            return false;
        }
        let authorities_changed = self.bundle.x509_authorities() != bundle.x509_authorities();
        self.bundle = Arc::new(bundle);
        self.client.set_bundle(&self.bundle);
        self.dirty = true;
        if !authorities_changed {
            return true;
        }
        let trust_domain = self.config.trust_domain.clone();
        let all = authorities(&self.bundle, false);
        let untainted = authorities(&self.bundle, true);
        let chains_to = |chain: &[Vec<u8>], roots: &[Vec<u8>]| {
            x509::verify_svid_chain(chain, &trust_domain, roots, now).is_ok()
        };
        self.svids.retain(|entry_id, minted| {
            if !chains_to(minted.svid.cert_chain(), &all) {
                tracing::info!(
                    entry_id = %entry_id,
                    "withdrawing an SVID whose authority left the bundle"
                );
                return false;
            }
            if !chains_to(minted.svid.cert_chain(), &untainted) {
                tracing::info!(entry_id = %entry_id, "renewing an SVID of a tainted authority");
                minted.force_renew = true;
            }
            true
        });
        if !chains_to(self.credentials.svid.cert_chain(), &untainted) {
            tracing::info!("the agent SVID's authority is tainted or gone; renewing it now");
            self.agent_renew_at = now;
        }
        true
    }

    /// Takes the new set of authorized entries. SVIDs of entries that are gone, or whose
    /// SPIFFE ID changed, are withdrawn at once.
    fn apply_entries(&mut self, entries: BTreeMap<EntryId, Arc<CachedEntry>>) {
        self.svids.retain(|id, minted| match entries.get(id) {
            Some(entry) if entry.spiffe_id == minted.entry.spiffe_id => {
                if entry.revision_number == minted.entry.revision_number
                    && entry.created_at == minted.entry.created_at
                {
                    minted.entry = Arc::clone(entry);
                }
                true
            }
            _ => false,
        });
        if self.entries != entries {
            self.entries = entries;
            self.dirty = true;
        }
    }

    /// Mints SVIDs for entries that have none, whose entry changed, that are due for
    /// renewal or chain to a tainted authority, in calls of at most `batch_limit` CSRs. At
    /// most `x509_svid_cache_size` entries (the first by ID) get SVIDs.
    async fn mint(&mut self, channel: Channel, now: SystemTime) -> Result<(), ClientError> {
        let servable: Vec<Arc<CachedEntry>> = self
            .entries
            .values()
            .filter(|entry| !entry.store_svid)
            .cloned()
            .collect();
        let capacity = self.config.x509_svid_cache_size.max(1);
        let n_over = servable.len().saturating_sub(capacity);
        if n_over != self.n_over_capacity {
            if n_over > 0 {
                tracing::warn!(
                    n_entries = servable.len(),
                    x509_svid_cache_size = capacity,
                    "more entries than x509_svid_cache_size; only the first by entry ID get SVIDs"
                );
            }
            self.n_over_capacity = n_over;
        }
        let eligible: Vec<Arc<CachedEntry>> = servable.into_iter().take(capacity).collect();
        let eligible_ids: BTreeSet<&EntryId> = eligible.iter().map(|e| &e.id).collect();
        let n_before = self.svids.len();
        self.svids.retain(|id, _| eligible_ids.contains(id));
        if self.svids.len() != n_before {
            self.dirty = true;
        }

        let stale: Vec<Arc<CachedEntry>> = eligible
            .iter()
            .filter(|entry| match self.svids.get(&entry.id) {
                None => true,
                Some(minted) => {
                    minted.force_renew
                        || now >= minted.renew_at
                        || minted.entry.revision_number != entry.revision_number
                        || minted.entry.created_at != entry.created_at
                }
            })
            .cloned()
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        for batch in stale.chunks(self.batch_limit.max(1)) {
            let mut keys = Vec::with_capacity(batch.len());
            let mut params = Vec::with_capacity(batch.len());
            for entry in batch {
                let key = KeyPair::generate(self.config.workload_key_type)
                    .map_err(|e| ClientError::Local(format!("generating a workload key: {e}")))?;
                let csr = x509::build_csr(&key, Some(&entry.spiffe_id))
                    .map_err(|e| ClientError::Local(format!("building a workload CSR: {e}")))?;
                params.push(NewX509svidParams {
                    entry_id: entry.id.as_str().to_owned(),
                    csr,
                });
                keys.push(key);
            }
            let results = match client::with_deadline(
                "BatchNewX509SVID",
                client::batch_new_x509_svid(channel.clone(), params),
            )
            .await
            {
                Ok(results) => results,
                Err(error) => {
                    self.batch_limit = (self.batch_limit / 2).max(1);
                    return Err(error);
                }
            };
            for ((entry, key), result) in batch.iter().zip(keys).zip(results) {
                let (code, message) = result
                    .status
                    .as_ref()
                    .map_or((Code::Unknown as i32, "the result has no status"), |s| {
                        (s.code, s.message.as_str())
                    });
                if code != Code::Ok as i32 {
                    tracing::warn!(
                        entry_id = %entry.id,
                        spiffe_id = %entry.spiffe_id,
                        code = ?Code::from(code),
                        message,
                        "failed to mint X509-SVID"
                    );
                    continue;
                }
                match self.accept_svid(entry, result.svid.as_ref(), now) {
                    Ok((svid, not_before)) => {
                        let renew_at =
                            rotation::renewal_time(not_before, svid.not_after(), Jitter::random());
                        if self.svids.contains_key(&entry.id) {
                            self.metrics.workload_svid_rotated();
                        }
                        self.svids.insert(
                            entry.id.clone(),
                            MintedSvid {
                                entry: Arc::clone(entry),
                                svid: Arc::new(svid),
                                key: Arc::new(key),
                                renew_at,
                                force_renew: false,
                            },
                        );
                        self.dirty = true;
                    }
                    Err(reason) => tracing::warn!(
                        entry_id = %entry.id,
                        %reason,
                        "the server returned an unusable X509-SVID"
                    ),
                }
            }
        }
        self.batch_limit = (self.batch_limit * 2).min(MAX_CSRS_PER_CALL);
        Ok(())
    }

    /// Checks a minted SVID: it must chain to the bundle and carry the entry's SPIFFE ID.
    fn accept_svid(
        &self,
        entry: &CachedEntry,
        svid: Option<&lanyard_proto::spire::api::types::X509svid>,
        now: SystemTime,
    ) -> Result<(X509Svid, SystemTime), String> {
        let svid = x509_svid_from_proto(svid.ok_or("an OK result without an SVID")?)
            .map_err(|e| e.to_string())?;
        let verified = x509::verify_svid_chain(
            svid.cert_chain(),
            &self.config.trust_domain,
            &authorities(&self.bundle, false),
            now,
        )
        .map_err(|e| format!("it does not verify against the bundle: {e}"))?;
        if verified.spiffe_id() != &entry.spiffe_id {
            return Err(format!(
                "it is for {}, not {}",
                verified.spiffe_id(),
                entry.spiffe_id
            ));
        }
        Ok((svid, verified.not_before()))
    }

    /// Withdraws SVIDs that have expired; they are never served.
    fn withdraw_expired(&mut self, now: SystemTime) {
        let n_before = self.svids.len();
        self.svids.retain(|entry_id, minted| {
            let alive = minted.svid.not_after() > now;
            if !alive {
                tracing::warn!(
                    entry_id = %entry_id,
                    "an X509-SVID expired before it could be renewed"
                );
            }
            alive
        });
        if self.svids.len() != n_before {
            self.dirty = true;
        }
    }

    /// Publishes a snapshot if anything changed since the last one.
    fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let identities = self
            .svids
            .iter()
            .map(|(id, minted)| {
                (
                    id.clone(),
                    Identity {
                        entry: Arc::clone(&minted.entry),
                        svid: Arc::clone(&minted.svid),
                        key: Arc::clone(&minted.key),
                    },
                )
            })
            .collect();
        let snapshot = Snapshot {
            trust_domain: self.config.trust_domain.clone(),
            bundle: Arc::clone(&self.bundle),
            federated_bundles: self.federated.clone(),
            entries: self.entries.values().cloned().collect(),
            identities,
            synced: self.synced,
        };
        self.snapshot_tx.send_replace(Arc::new(snapshot));
    }
}
