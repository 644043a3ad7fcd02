//! The manager's background task: the thin async side of [`Machine`]. It owns the server
//! client, the clock, the sleeps and the caches, feeds the machine what happened and performs
//! what it decides: syncs, workload SVID minting, agent SVID rotation, reactions to the
//! server's denials, and snapshot publishing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::rotation::Jitter;
use lanyard_core::x509::{self, X509Svid};
use lanyard_core::{EntryId, SpiffeId, TrustBundle, TrustDomain};
use lanyard_proto::convert::x509_svid_from_proto;
use lanyard_proto::spire::api::server::svid::v1::NewX509svidParams;
use lanyard_proto::spire::api::types::permission_denied_details::Reason;
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;

use super::attest::{
    attest_once, attestation_refused, authorities, credentials_from_chain, load_attestor,
};
use super::client::{self, AgentCredentials, ClientError, ServerClient, ServerTrust};
use super::machine::{
    Action, AgentSvid, Event, Failure, HeldSvid, Machine, MintCandidate, Now, Operation, Settings,
    StopReason,
};
use super::report::UsageReporter;
use super::storage::{self, StoredState, StoredSvid};
use super::{Clock, ManagerError, blocking, sync};
use crate::cache::{CachedEntry, Identity, Snapshot};
use crate::config::AgentConfig;
use crate::usage::UsageTracker;

/// A task that is aborted when this is dropped: the change stream ends with the runner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A workload SVID the agent minted, with its key and when to renew it.
struct MintedSvid {
    entry: Arc<CachedEntry>,
    svid: Arc<X509Svid>,
    key: Arc<KeyPair>,
    renew_at: SystemTime,
    /// Set when the SVID chains to a tainted authority: renew at the next opportunity.
    force_renew: bool,
}

/// The manager's background task and everything it owns.
pub(super) struct Runner {
    config: AgentConfig,
    clock: Clock,
    client: Arc<ServerClient>,
    machine: Machine,
    snapshot_tx: watch::Sender<Arc<Snapshot>>,
    agent_id_tx: watch::Sender<SpiffeId>,
    credentials: Arc<AgentCredentials>,
    reattestable: bool,
    bundle: Arc<TrustBundle>,
    federated: BTreeMap<TrustDomain, Arc<TrustBundle>>,
    entries: BTreeMap<EntryId, Arc<CachedEntry>>,
    svids: BTreeMap<EntryId, MintedSvid>,
    synced: bool,
    /// Something changed since the last published snapshot.
    dirty: bool,
    usage: UsageReporter,
    /// Revocations applied, the CRLs and revoked JWT IDs.
    revocations: super::revoke::AgentRevocations,
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
        let settings = Settings {
            sync_interval: config.sync_interval,
            push_sync_interval: config.push_sync_interval,
            x509_svid_cache_size: config.x509_svid_cache_size,
            has_reattest_method: config.node_attestor.x509pop.is_some()
                || config.node_attestor.k8s_psat.is_some(),
        };
        let now = read_now(&clock);
        let machine = Machine::new(
            now,
            settings,
            agent_svid(&credentials, reattestable),
            Box::new(Jitter::random),
        );
        Self {
            config,
            clock,
            client,
            machine,
            snapshot_tx,
            agent_id_tx,
            credentials,
            reattestable,
            bundle,
            federated: BTreeMap::new(),
            entries: BTreeMap::new(),
            svids: BTreeMap::new(),
            synced: false,
            dirty: false,
            usage: UsageReporter::new(usage),
            revocations: super::revoke::AgentRevocations::default(),
            health,
            metrics,
        }
    }

    fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// Tells the machine what happened, now.
    fn tell(&mut self, event: Event) -> Vec<Action> {
        let now = read_now(&self.clock);
        self.machine.on_event(now, event)
    }

    pub(super) async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), ManagerError> {
        // The change stream runs beside the loop; its events wake the loop like its timers.
        let (push_tx, mut push_rx) = tokio::sync::mpsc::channel(16);
        let watcher = AbortOnDrop(tokio::spawn(super::push::watch_changes(
            Arc::clone(&self.client),
            push_tx,
            stop.clone(),
        )));
        let mut events = vec![Event::Wakeup];
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            // Every event that came in is told before any action is performed, so that a burst
            // of notices makes one sync (and one more if they overlap it), not one each.
            let mut pending: VecDeque<Action> = VecDeque::new();
            for event in events.drain(..) {
                pending.extend(self.tell(event));
            }
            while let Some(action) = pending.pop_front() {
                let next = tokio::select! {
                    next = self.perform(action) => next?,
                    _ = stop.changed() => return Ok(()),
                };
                pending.extend(next);
            }

            self.publish();

            let expiries = self
                .svids
                .iter()
                .map(|(entry_id, minted)| (entry_id.clone(), minted.svid.not_after()))
                .collect();
            let poll_interval = self.machine.poll_interval();
            self.health.send_if_modified(|health| {
                let moved = health.poll_interval != poll_interval;
                health.poll_interval = poll_interval;
                moved
            });
            let first_renewal = self.svids.values().map(|minted| minted.renew_at).min();
            self.tell(Event::WorkloadSvidsHeld {
                expiries,
                first_renewal,
            });
            let Some(wake) = self.machine.next_wakeup() else {
                return Ok(());
            };
            let first = tokio::select! {
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => Event::Wakeup,
                Some(pushed) = push_rx.recv(), if !watcher.0.is_finished() => pushed,
                _ = stop.changed() => return Ok(()),
            };
            events.push(first);
            while let Ok(pushed) = push_rx.try_recv() {
                events.push(pushed);
            }
        }
    }

    /// Performs one of the machine's actions; returns what the machine decides next.
    async fn perform(&mut self, action: Action) -> Result<Vec<Action>, ManagerError> {
        match action {
            Action::RenewAgentSvid => Ok(self.rotate(None).await),
            Action::Reattest { reason } => Ok(self.rotate(Some(reason)).await),
            Action::Sync => {
                let started = tokio::time::Instant::now().into_std();
                let result = self.sync().await;
                self.metrics
                    .sync_ended(started, result.is_ok().then_some(self.entries.len()));
                match result {
                    Ok(()) => {
                        let now = self.now();
                        self.health
                            .send_modify(|health| health.last_sync = Some(now));
                        if self.machine.sync_failures() > 0 {
                            tracing::info!("sync with the server resumed");
                        }
                        let n_entries = self.entries.len();
                        Ok(self.tell(Event::SyncSucceeded { n_entries }))
                    }
                    Err(error) => {
                        let actions = self.tell(Event::SyncFailed(classify(&error)));
                        log_retry(
                            &actions,
                            Operation::Sync,
                            &error,
                            "sync with the server failed",
                        );
                        Ok(actions)
                    }
                }
            }
            Action::ReportUsage => {
                // Serving what was just synced comes first: publish, then report.
                self.publish();
                let entries = &self.entries;
                self.usage
                    .after_sync(&self.client, |id| entries.contains_key(id))
                    .await;
                Ok(Vec::new())
            }
            Action::Reconnect => {
                self.client.reset();
                Ok(Vec::new())
            }
            Action::ForgetSvid => {
                self.forget_svid();
                Ok(Vec::new())
            }
            Action::WithdrawExpired(entry_ids) => {
                self.withdraw_expired(&entry_ids);
                Ok(Vec::new())
            }
            Action::Stop(reason) => Err(match reason {
                StopReason::Banned => ManagerError::Banned,
                StopReason::MustReattest(reason) => ManagerError::MustReattest {
                    reason: reason.to_owned(),
                },
                StopReason::AttestationRefused(message) => ManagerError::Attestation(message),
                StopReason::AgentSvidExpired { expired_at } => {
                    ManagerError::AgentSvidExpired { expired_at }
                }
            }),
            // Only a sync asks for these, and it performs them itself.
            Action::Evict(_) | Action::Mint(_) | Action::RetryLater { .. } => Ok(Vec::new()),
        }
    }

    /// Renews the agent SVID (`reattest` is `None`) or attests again, and tells the machine.
    async fn rotate(&mut self, reattest: Option<&'static str>) -> Vec<Action> {
        let result = match reattest {
            Some(reason) => self.reattest(reason).await,
            None => self.renew().await,
        };
        match result {
            Ok(()) => {
                let agent = agent_svid(&self.credentials, self.reattestable);
                self.tell(Event::RotationSucceeded(agent))
            }
            Err(error) => {
                let actions = self.tell(Event::RotationFailed(classify(&error)));
                log_retry(
                    &actions,
                    Operation::Rotation,
                    &error,
                    "agent SVID rotation failed",
                );
                actions
            }
        }
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

    /// Renews the agent SVID with `RenewAgent` and a new key.
    async fn renew(&mut self) -> Result<(), ClientError> {
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
        self.fetch_revocations(channel.clone(), now).await;
        self.mint(channel.clone(), now).await?;
        self.acknowledge_revocations(channel).await;
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
            self.tell(Event::AgentAuthorityUntrusted);
        }
        true
    }

    /// Asks the server for the revocations after the last applied (and newer CRLs), drops
    /// the SVIDs they cover and takes the CRLs and revoked JWT IDs. A failure is logged and
    /// tried again at the next sync; a server without the service is not asked again.
    async fn fetch_revocations(&mut self, channel: Channel, now: SystemTime) {
        if self.revocations.unsupported {
            return;
        }
        let result = client::with_deadline(
            client::FETCH_REVOCATIONS,
            client::fetch_revocations(
                channel,
                self.revocations.applied,
                self.revocations.crl_number,
            ),
        )
        .await;
        let response = match result {
            Ok(response) => response,
            Err(error) if error.code() == Some(tonic::Code::Unimplemented) => {
                tracing::info!("the server has no revocation service; this agent goes without");
                self.revocations.unsupported = true;
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "fetching revocations failed; trying again at the next sync");
                return;
            }
        };
        let agent_id = self.credentials.svid.spiffe_id().clone();
        let held = self
            .svids
            .iter()
            .map(|(entry_id, minted)| super::revoke::Held {
                entry_id: entry_id.as_str(),
                svid: &minted.svid,
            });
        let applied = self.revocations.apply(&response, held, &agent_id, now);
        for entry_id in &applied.drop {
            let removed = EntryId::new(entry_id)
                .ok()
                .and_then(|id| self.svids.remove(&id));
            if removed.is_some() {
                tracing::info!(entry_id = %entry_id, "dropped a revoked X509-SVID; minting a new one");
                self.dirty = true;
            }
        }
        if applied.changed {
            self.dirty = true;
        }
    }

    /// Tells the server which revocations are applied, with the SVIDs dropped for them.
    async fn acknowledge_revocations(&mut self, channel: Channel) {
        if self.revocations.unsupported || !self.revocations.ack_due() {
            return;
        }
        let sequence = self.revocations.applied;
        let mut dropped = std::mem::take(&mut self.revocations.dropped);
        let batch = super::revoke::ack_batch(&dropped);
        if batch < dropped.len() {
            // The server takes drops for the revocations an acknowledgement newly applies, in
            // one call: the rest are left to the ledger's records.
            tracing::warn!(
                dropped = dropped.len(),
                reported = batch,
                "more dropped X509-SVIDs than one acknowledgement reports"
            );
            dropped.truncate(batch);
        }
        let result = client::with_deadline(
            client::ACKNOWLEDGE_REVOCATIONS,
            client::acknowledge_revocations(channel, sequence, dropped.clone()),
        )
        .await;
        match result {
            Ok(answer) => {
                if answer.refused > 0 {
                    tracing::warn!(
                        listed = answer.listed,
                        refused = answer.refused,
                        "the server left some dropped X509-SVIDs off its CRLs"
                    );
                }
                self.revocations.acknowledged = sequence;
            }
            Err(error) => {
                tracing::warn!(%error, "acknowledging revocations failed; trying again at the next sync");
                let mut again = dropped;
                again.append(&mut self.revocations.dropped);
                self.revocations.dropped = again;
            }
        }
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

    /// Mints SVIDs as the machine plans it: for entries that have none, whose entry changed,
    /// that are due for renewal or chain to a tainted authority, at most
    /// `x509_svid_cache_size` entries (the first by ID), in batches.
    async fn mint(&mut self, channel: Channel, now: SystemTime) -> Result<(), ClientError> {
        let servable: Vec<Arc<CachedEntry>> = self
            .entries
            .values()
            .filter(|entry| !entry.store_svid)
            .cloned()
            .collect();
        let servable_ids: BTreeSet<&EntryId> = servable.iter().map(|e| &e.id).collect();
        let other_held: Vec<EntryId> = self
            .svids
            .keys()
            .filter(|id| !servable_ids.contains(id))
            .cloned()
            .collect();
        let candidates = servable
            .iter()
            .map(|entry| MintCandidate {
                entry_id: entry.id.clone(),
                held: self.svids.get(&entry.id).map(|minted| HeldSvid {
                    renew_at: minted.renew_at,
                    force_renew: minted.force_renew,
                    entry_changed: minted.entry.revision_number != entry.revision_number
                        || minted.entry.created_at != entry.created_at,
                }),
            })
            .collect();
        let plan = self.tell(Event::EntriesSynced {
            candidates,
            other_held,
        });
        let by_id: BTreeMap<&EntryId, &Arc<CachedEntry>> =
            servable.iter().map(|entry| (&entry.id, entry)).collect();
        for action in plan {
            let batch: Vec<Arc<CachedEntry>> = match action {
                Action::Evict(ids) => {
                    for id in ids {
                        if self.svids.remove(&id).is_some() {
                            self.dirty = true;
                        }
                    }
                    continue;
                }
                Action::Mint(ids) => ids
                    .iter()
                    .filter_map(|id| by_id.get(id).map(|entry| Arc::clone(entry)))
                    .collect(),
                _ => continue,
            };
            let mut keys = Vec::with_capacity(batch.len());
            let mut params = Vec::with_capacity(batch.len());
            for entry in &batch {
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
                    self.tell(Event::MintBatchFailed);
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
                        let renew_at = self.machine.renewal_time(not_before, svid.not_after());
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
        self.tell(Event::MintFinished);
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
    fn withdraw_expired(&mut self, entry_ids: &[EntryId]) {
        for entry_id in entry_ids {
            if self.svids.remove(entry_id).is_some() {
                tracing::warn!(
                    entry_id = %entry_id,
                    "an X509-SVID expired before it could be renewed"
                );
                self.dirty = true;
            }
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
            crls: Arc::clone(&self.revocations.crls),
            revoked_jtis: Arc::clone(&self.revocations.jtis),
        };
        self.snapshot_tx.send_replace(Arc::new(snapshot));
    }
}

/// Both clocks, read together.
fn read_now(clock: &Clock) -> Now {
    Now {
        instant: tokio::time::Instant::now().into_std(),
        wall: clock(),
    }
}

fn agent_svid(credentials: &AgentCredentials, reattestable: bool) -> AgentSvid {
    AgentSvid {
        not_before: credentials.not_before,
        not_after: credentials.svid.not_after(),
        reattestable,
    }
}

/// What a failed call means for the machine: SPIRE's denial reasons first, then the codes
/// that refuse an attestation for good.
fn classify(error: &ClientError) -> Failure {
    match error.denial_reason() {
        Some(Reason::AgentBanned) => Failure::Banned,
        Some(
            reason @ (Reason::AgentExpired
            | Reason::AgentNotAttested
            | Reason::AgentNotActive
            | Reason::AgentMustReattest),
        ) => Failure::MustReattest(reason.as_str_name()),
        _ if attestation_refused(error) => Failure::Refused(error.to_string()),
        _ => Failure::Retryable,
    }
}

/// Logs a failure the machine decided to retry later.
fn log_retry(actions: &[Action], operation: Operation, error: &ClientError, message: &str) {
    for action in actions {
        if let Action::RetryLater {
            operation: retried,
            after,
        } = action
            && *retried == operation
        {
            tracing::warn!(%error, retry_in = ?after, "{message}");
        }
    }
}
