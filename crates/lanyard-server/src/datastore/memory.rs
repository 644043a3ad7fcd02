//! [`MemoryStore`]: the datastore in process memory, for tests and throwaway servers. It follows
//! the same rules as the SQL store, checked by the shared conformance suite.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use lanyard_core::bundle::TrustBundle;
use lanyard_core::bundle_fetch::{FetchedBundleChange, compare_fetched};
use lanyard_core::federation::{FederationRelationship, RelationshipMask};
use lanyard_core::policy::Exception;
use lanyard_core::revocation::{Revocation, RevocationAck, RevokedSerial};
use lanyard_core::{EntryId, RegistrationEntry, SelectorSet, SpiffeId, TrustDomain};

use super::convert::{
    checked_bundle, normalize_agent, normalize_entry, normalize_exception, normalize_published_crl,
    normalize_revocation, normalize_revoked_serials, whole_second, with_stored_bundle,
};
use super::governance::usage_record;
use super::{
    AgentFilter, AttestedAgent, BundleDeleteMode, Change, ChangeKind, ChangeSubject, Datastore,
    DatastoreError, EntryFilter, EntryUsage, Issuance, IssuanceFilter, IssuanceKind,
    JoinTokenRecord, Page, PageRequest, PublishedCrl, Result, bundle_in_use, exception_conflict,
    merge_bundles, missing_federated_bundle, not_found, revision_conflict,
};

/// A datastore held in memory behind one mutex. Nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<String, RegistrationEntry>,
    agents: BTreeMap<String, AttestedAgent>,
    join_tokens: HashMap<String, SystemTime>,
    bundles: BTreeMap<String, TrustBundle>,
    /// Without their bundles, which are read from `bundles`.
    relationships: BTreeMap<String, FederationRelationship>,
    ca_journals: HashMap<String, Vec<u8>>,
    meta: HashMap<String, Vec<u8>>,
    revision: i64,
    changes: Vec<Change>,
    exceptions: BTreeMap<String, Exception>,
    issuances: BTreeMap<(IssuanceKind, String), Issuance>,
    served: BTreeMap<(String, String), SystemTime>,
    /// By ID.
    revocations: BTreeMap<String, Revocation>,
    /// By revocation ID, then serial.
    revoked_serials: BTreeMap<String, BTreeMap<String, RevokedSerial>>,
    /// By agent ID.
    revocation_acks: BTreeMap<String, RevocationAck>,
    /// The last revocation sequence given.
    revocation_sequence: i64,
    /// By authority ID.
    published_crls: BTreeMap<String, PublishedCrl>,
}

impl State {
    fn record(&mut self, kind: ChangeKind, subject: ChangeSubject) {
        self.revision += 1;
        self.changes.push(Change {
            revision: self.revision,
            kind,
            subject,
        });
    }

    fn similar_entry(&self, entry: &RegistrationEntry) -> Option<&RegistrationEntry> {
        self.entries
            .values()
            .find(|other| other.id != entry.id && other.is_similar(entry))
    }

    fn check_federated_bundles(&self, entry: &RegistrationEntry) -> Result<()> {
        match entry
            .federates_with
            .iter()
            .find(|td| !self.bundles.contains_key(td.name()))
        {
            Some(td) => Err(missing_federated_bundle(td)),
            None => Ok(()),
        }
    }

    /// The relationship with the trust domain's bundle as stored now.
    fn relationship_with_bundle(
        &self,
        relationship: &FederationRelationship,
    ) -> Result<FederationRelationship> {
        let bundle = self
            .bundles
            .get(relationship.trust_domain().name())
            .cloned();
        with_stored_bundle(relationship.clone(), bundle)
    }

    /// Makes `bundle` (already checked) the federated bundle of its trust domain.
    fn put_bundle(&mut self, bundle: TrustBundle) {
        let trust_domain = bundle.trust_domain().clone();
        let kind = match self.bundles.insert(trust_domain.name().to_owned(), bundle) {
            Some(_) => ChangeKind::Updated,
            None => ChangeKind::Created,
        };
        self.record(kind, ChangeSubject::Bundle(trust_domain));
    }

    fn entries_federating_with(&self, trust_domain: &TrustDomain) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, e)| e.federates_with.contains(trust_domain))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change: every method
        // checks first and mutates last. Keep serving rather than poisoning every caller.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One page of `items` (already filtered and ordered by key) after `page.token`.
fn paginate<'a, T: Clone + 'a>(
    items: impl Iterator<Item = (&'a String, &'a T)>,
    page: Option<PageRequest>,
) -> Result<Page<T>> {
    let Some(page) = page else {
        return Ok((items.map(|(_, v)| v.clone()).collect(), None));
    };
    page.validate()?;
    let size = usize::try_from(page.size).unwrap_or(usize::MAX);
    let mut out: Vec<(&String, &T)> = items
        .filter(|(key, _)| page.token.as_ref().is_none_or(|token| *key > token))
        .take(size.saturating_add(1))
        .collect();
    let next = if out.len() > size {
        out.truncate(size);
        out.last().map(|(key, _)| (*key).clone())
    } else {
        None
    };
    Ok((out.into_iter().map(|(_, v)| v.clone()).collect(), next))
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[async_trait::async_trait]
impl Datastore for MemoryStore {
    async fn create_entry(&self, entry: RegistrationEntry) -> Result<RegistrationEntry> {
        let mut entry = normalize_entry(entry)?;
        entry.revision_number = 0;
        if entry.selectors.is_empty() {
            return Err(DatastoreError::Invalid(
                "entry: selectors cannot be empty".into(),
            ));
        }
        let mut state = self.lock();
        if let Some(existing) = state.entries.get(entry.id.as_str()) {
            return Err(DatastoreError::entry_exists(
                existing,
                format!("entry {:?}", entry.id.as_str()),
            ));
        }
        if let Some(existing) = state.similar_entry(&entry) {
            return Err(DatastoreError::entry_exists(
                existing,
                "similar entry".to_owned(),
            ));
        }
        state.check_federated_bundles(&entry)?;
        state
            .entries
            .insert(entry.id.as_str().to_owned(), entry.clone());
        state.record(ChangeKind::Created, ChangeSubject::Entry(entry.id.clone()));
        Ok(entry)
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>> {
        Ok(self.lock().entries.get(id.as_str()).cloned())
    }

    async fn update_entry(
        &self,
        entry: RegistrationEntry,
        expected_revision: Option<i64>,
    ) -> Result<RegistrationEntry> {
        let mut entry = normalize_entry(entry)?;
        if entry.selectors.is_empty() {
            return Err(DatastoreError::Invalid(
                "entry: selectors cannot be empty".into(),
            ));
        }
        let mut state = self.lock();
        let Some(stored) = state.entries.get(entry.id.as_str()) else {
            return Err(not_found("entry", entry.id.as_str()));
        };
        if let Some(expected) = expected_revision
            && stored.revision_number != expected
        {
            return Err(revision_conflict(
                &entry.id,
                expected,
                stored.revision_number,
            ));
        }
        entry.created_at = stored.created_at;
        entry.revision_number = stored.revision_number + 1;
        if let Some(existing) = state.similar_entry(&entry) {
            return Err(DatastoreError::entry_exists(
                existing,
                "similar entry".to_owned(),
            ));
        }
        state.check_federated_bundles(&entry)?;
        state
            .entries
            .insert(entry.id.as_str().to_owned(), entry.clone());
        state.record(ChangeKind::Updated, ChangeSubject::Entry(entry.id.clone()));
        Ok(entry)
    }

    async fn delete_entry(
        &self,
        id: &EntryId,
        expected_revision: Option<i64>,
    ) -> Result<RegistrationEntry> {
        let mut state = self.lock();
        if let Some(expected) = expected_revision {
            let stored = state
                .entries
                .get(id.as_str())
                .ok_or_else(|| not_found("entry", id.as_str()))?;
            if stored.revision_number != expected {
                return Err(revision_conflict(id, expected, stored.revision_number));
            }
        }
        let entry = state
            .entries
            .remove(id.as_str())
            .ok_or_else(|| not_found("entry", id.as_str()))?;
        state.record(ChangeKind::Deleted, ChangeSubject::Entry(id.clone()));
        Ok(entry)
    }

    async fn list_entries(
        &self,
        filter: &EntryFilter,
        page: Option<PageRequest>,
    ) -> Result<Page<RegistrationEntry>> {
        filter.validate()?;
        let state = self.lock();
        paginate(
            state.entries.iter().filter(|(_, e)| filter.matches(e)),
            page,
        )
    }

    async fn count_entries(&self, filter: &EntryFilter) -> Result<u64> {
        filter.validate()?;
        let state = self.lock();
        Ok(count(
            state.entries.values().filter(|e| filter.matches(e)).count(),
        ))
    }

    async fn list_entries_page(&self, page: PageRequest) -> Result<Page<RegistrationEntry>> {
        let state = self.lock();
        paginate(state.entries.iter(), Some(page))
    }

    async fn prune_entries(&self, expires_before: SystemTime) -> Result<Vec<EntryId>> {
        let expires_before = whole_second(expires_before)?;
        let mut state = self.lock();
        let expired: Vec<EntryId> = state
            .entries
            .values()
            .filter(|e| e.expires_at.is_some_and(|at| at < expires_before))
            .map(|e| e.id.clone())
            .collect();
        for id in &expired {
            state.entries.remove(id.as_str());
            state.record(ChangeKind::Deleted, ChangeSubject::Entry(id.clone()));
        }
        Ok(expired)
    }

    async fn current_revision(&self) -> Result<i64> {
        Ok(self.lock().revision)
    }

    async fn changes_since(&self, revision: i64) -> Result<Vec<Change>> {
        let state = self.lock();
        Ok(state
            .changes
            .iter()
            .filter(|c| c.revision > revision)
            .cloned()
            .collect())
    }

    async fn prune_changes(&self, before: i64) -> Result<u64> {
        let mut state = self.lock();
        let n_before = state.changes.len();
        state.changes.retain(|c| c.revision >= before);
        Ok(count(n_before - state.changes.len()))
    }

    async fn create_agent(&self, agent: AttestedAgent) -> Result<AttestedAgent> {
        let mut agent = agent;
        let now = SystemTime::now();
        agent.created_at = now;
        agent.updated_at = now;
        let agent = normalize_agent(agent)?;
        let mut state = self.lock();
        if state.agents.contains_key(agent.spiffe_id.as_str()) {
            return Err(DatastoreError::exists(format!(
                "agent {:?}",
                agent.spiffe_id.as_str()
            )));
        }
        state
            .agents
            .insert(agent.spiffe_id.as_str().to_owned(), agent.clone());
        state.record(
            ChangeKind::Created,
            ChangeSubject::Agent(agent.spiffe_id.clone()),
        );
        Ok(agent)
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>> {
        Ok(self.lock().agents.get(id.as_str()).cloned())
    }

    async fn update_agent(&self, agent: AttestedAgent) -> Result<AttestedAgent> {
        let mut agent = agent;
        agent.updated_at = SystemTime::now();
        let mut agent = normalize_agent(agent)?;
        let mut state = self.lock();
        let Some(stored) = state.agents.get_mut(agent.spiffe_id.as_str()) else {
            return Err(not_found("agent", agent.spiffe_id.as_str()));
        };
        if stored.is_banned() {
            return Err(super::banned_agent(&agent.spiffe_id));
        }
        agent.created_at = stored.created_at;
        *stored = agent.clone();
        state.record(
            ChangeKind::Updated,
            ChangeSubject::Agent(agent.spiffe_id.clone()),
        );
        Ok(agent)
    }

    async fn set_agent_selectors(
        &self,
        id: &SpiffeId,
        selectors: SelectorSet,
    ) -> Result<AttestedAgent> {
        let updated_at = whole_second(SystemTime::now())?;
        self.modify_agent(id, |agent| {
            agent.selectors = selectors;
            agent.updated_at = updated_at;
        })
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<AttestedAgent> {
        let mut state = self.lock();
        let agent = state
            .agents
            .remove(id.as_str())
            .ok_or_else(|| not_found("agent", id.as_str()))?;
        state.record(ChangeKind::Deleted, ChangeSubject::Agent(id.clone()));
        Ok(agent)
    }

    async fn ban_agent(&self, id: &SpiffeId) -> Result<AttestedAgent> {
        let updated_at = whole_second(SystemTime::now())?;
        self.modify_agent(id, |agent| {
            agent.serial.clear();
            agent.new_serial.clear();
            agent.updated_at = updated_at;
        })
    }

    async fn list_agents(
        &self,
        filter: &AgentFilter,
        page: Option<PageRequest>,
    ) -> Result<Page<AttestedAgent>> {
        filter.validate()?;
        let filter = AgentFilter {
            by_expires_before: filter.by_expires_before.map(whole_second).transpose()?,
            ..filter.clone()
        };
        let state = self.lock();
        paginate(state.agents.iter().filter(|(_, a)| filter.matches(a)), page)
    }

    async fn count_agents(&self, filter: &AgentFilter) -> Result<u64> {
        filter.validate()?;
        let filter = AgentFilter {
            by_expires_before: filter.by_expires_before.map(whole_second).transpose()?,
            ..filter.clone()
        };
        let state = self.lock();
        Ok(count(
            state.agents.values().filter(|a| filter.matches(a)).count(),
        ))
    }

    async fn create_join_token(
        &self,
        token: &str,
        expires_at: SystemTime,
    ) -> Result<JoinTokenRecord> {
        if token.is_empty() {
            return Err(DatastoreError::Invalid("join token: empty".into()));
        }
        let expires_at = whole_second(expires_at)?;
        let mut state = self.lock();
        if state.join_tokens.contains_key(token) {
            return Err(DatastoreError::exists("join token"));
        }
        state.join_tokens.insert(token.to_owned(), expires_at);
        Ok(JoinTokenRecord {
            token: token.to_owned(),
            expires_at,
        })
    }

    async fn take_join_token(&self, token: &str) -> Result<JoinTokenRecord> {
        let expires_at = self
            .lock()
            .join_tokens
            .remove(token)
            .ok_or_else(|| DatastoreError::NotFound("join token".into()))?;
        Ok(JoinTokenRecord {
            token: token.to_owned(),
            expires_at,
        })
    }

    async fn prune_join_tokens(&self, expires_before: SystemTime) -> Result<u64> {
        let expires_before = whole_second(expires_before)?;
        let mut state = self.lock();
        let n_before = state.join_tokens.len();
        state.join_tokens.retain(|_, at| *at >= expires_before);
        Ok(count(n_before - state.join_tokens.len()))
    }

    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<TrustBundle>> {
        Ok(self.lock().bundles.get(trust_domain.name()).cloned())
    }

    async fn create_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle> {
        let (_, bundle) = checked_bundle(&bundle)?;
        let name = bundle.trust_domain().name().to_owned();
        let mut state = self.lock();
        if state.bundles.contains_key(&name) {
            return Err(DatastoreError::exists(format!("bundle of {name:?}")));
        }
        state.bundles.insert(name, bundle.clone());
        state.record(
            ChangeKind::Created,
            ChangeSubject::Bundle(bundle.trust_domain().clone()),
        );
        Ok(bundle)
    }

    async fn update_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle> {
        let (_, bundle) = checked_bundle(&bundle)?;
        let mut state = self.lock();
        let Some(stored) = state.bundles.get_mut(bundle.trust_domain().name()) else {
            return Err(not_found("bundle of", bundle.trust_domain().name()));
        };
        *stored = bundle.clone();
        state.record(
            ChangeKind::Updated,
            ChangeSubject::Bundle(bundle.trust_domain().clone()),
        );
        Ok(bundle)
    }

    async fn set_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle> {
        let (_, bundle) = checked_bundle(&bundle)?;
        let mut state = self.lock();
        let kind = match state
            .bundles
            .insert(bundle.trust_domain().name().to_owned(), bundle.clone())
        {
            Some(_) => ChangeKind::Updated,
            None => ChangeKind::Created,
        };
        state.record(kind, ChangeSubject::Bundle(bundle.trust_domain().clone()));
        Ok(bundle)
    }

    async fn store_fetched_bundle(&self, bundle: TrustBundle) -> Result<FetchedBundleChange> {
        let (_, bundle) = checked_bundle(&bundle)?;
        let mut state = self.lock();
        let name = bundle.trust_domain().name().to_owned();
        let stored = state.bundles.get(&name);
        let change = compare_fetched(stored, &bundle);
        if change == FetchedBundleChange::Newer {
            let kind = if stored.is_some() {
                ChangeKind::Updated
            } else {
                ChangeKind::Created
            };
            let trust_domain = bundle.trust_domain().clone();
            state.bundles.insert(name, bundle);
            state.record(kind, ChangeSubject::Bundle(trust_domain));
        }
        Ok(change)
    }

    async fn append_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle> {
        let (_, bundle) = checked_bundle(&bundle)?;
        let mut state = self.lock();
        let name = bundle.trust_domain().name().to_owned();
        let (merged, kind) = match state.bundles.get(&name) {
            None => (bundle, ChangeKind::Created),
            Some(stored) => match merge_bundles(stored, &bundle)? {
                Some(merged) => (merged, ChangeKind::Updated),
                None => return Ok(stored.clone()),
            },
        };
        state.bundles.insert(name, merged.clone());
        state.record(kind, ChangeSubject::Bundle(merged.trust_domain().clone()));
        Ok(merged)
    }

    async fn delete_bundle(
        &self,
        trust_domain: &TrustDomain,
        mode: BundleDeleteMode,
    ) -> Result<TrustBundle> {
        let mut state = self.lock();
        if !state.bundles.contains_key(trust_domain.name()) {
            return Err(not_found("bundle of", trust_domain.name()));
        }
        let federating = state.entries_federating_with(trust_domain);
        match mode {
            BundleDeleteMode::Restrict if !federating.is_empty() => {
                return Err(bundle_in_use(trust_domain, federating.len()));
            }
            BundleDeleteMode::Restrict => {}
            BundleDeleteMode::Delete => {
                for id in federating {
                    if let Some(entry) = state.entries.remove(&id) {
                        state.record(ChangeKind::Deleted, ChangeSubject::Entry(entry.id));
                    }
                }
            }
            BundleDeleteMode::Dissociate => {
                for id in federating {
                    if let Some(entry) = state.entries.get_mut(&id) {
                        entry.federates_with.remove(trust_domain);
                        entry.revision_number += 1;
                        let entry_id = entry.id.clone();
                        state.record(ChangeKind::Updated, ChangeSubject::Entry(entry_id));
                    }
                }
            }
        }
        let bundle = state
            .bundles
            .remove(trust_domain.name())
            .ok_or_else(|| not_found("bundle of", trust_domain.name()))?;
        state.record(
            ChangeKind::Deleted,
            ChangeSubject::Bundle(trust_domain.clone()),
        );
        Ok(bundle)
    }

    async fn list_bundles(&self, page: Option<PageRequest>) -> Result<Page<TrustBundle>> {
        let state = self.lock();
        paginate(state.bundles.iter(), page)
    }

    async fn count_bundles(&self) -> Result<u64> {
        Ok(count(self.lock().bundles.len()))
    }

    async fn create_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<FederationRelationship> {
        let bundle = relationship
            .trust_domain_bundle()
            .map(checked_bundle)
            .transpose()?
            .map(|(_, bundle)| bundle);
        let trust_domain = relationship.trust_domain().clone();
        let mut state = self.lock();
        if state.relationships.contains_key(trust_domain.name()) {
            return Err(DatastoreError::exists(format!(
                "federation relationship with {:?}",
                trust_domain.name()
            )));
        }
        if let Some(bundle) = &bundle {
            state.put_bundle(bundle.clone());
        }
        let relationship = relationship.without_trust_domain_bundle();
        state
            .relationships
            .insert(trust_domain.name().to_owned(), relationship.clone());
        state.record(
            ChangeKind::Created,
            ChangeSubject::FederationRelationship(trust_domain),
        );
        with_stored_bundle(relationship, bundle)
    }

    async fn get_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>> {
        let state = self.lock();
        state
            .relationships
            .get(trust_domain.name())
            .map(|relationship| state.relationship_with_bundle(relationship))
            .transpose()
    }

    async fn update_federation_relationship(
        &self,
        update: FederationRelationship,
        mask: RelationshipMask,
    ) -> Result<FederationRelationship> {
        let bundle = match update.trust_domain_bundle() {
            Some(bundle) if mask.trust_domain_bundle => Some(checked_bundle(bundle)?.1),
            _ => None,
        };
        let trust_domain = update.trust_domain().clone();
        let mut state = self.lock();
        let Some(stored) = state.relationships.get(trust_domain.name()) else {
            return Err(not_found(
                "federation relationship with",
                trust_domain.name(),
            ));
        };
        let updated = stored
            .updated(&update.without_trust_domain_bundle(), &mask)
            .map_err(|e| DatastoreError::Invalid(format!("federation relationship: {e}")))?;
        if let Some(bundle) = bundle {
            state.put_bundle(bundle);
        }
        state
            .relationships
            .insert(trust_domain.name().to_owned(), updated.clone());
        state.record(
            ChangeKind::Updated,
            ChangeSubject::FederationRelationship(trust_domain),
        );
        state.relationship_with_bundle(&updated)
    }

    async fn delete_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<FederationRelationship> {
        let mut state = self.lock();
        let Some(deleted) = state.relationships.remove(trust_domain.name()) else {
            return Err(not_found(
                "federation relationship with",
                trust_domain.name(),
            ));
        };
        state.record(
            ChangeKind::Deleted,
            ChangeSubject::FederationRelationship(trust_domain.clone()),
        );
        Ok(deleted)
    }

    async fn list_federation_relationships(
        &self,
        page: Option<PageRequest>,
    ) -> Result<Page<FederationRelationship>> {
        let state = self.lock();
        let (relationships, next) = paginate(state.relationships.iter(), page)?;
        let relationships = relationships
            .iter()
            .map(|relationship| state.relationship_with_bundle(relationship))
            .collect::<Result<_>>()?;
        Ok((relationships, next))
    }

    async fn get_ca_journal(&self, server_key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().ca_journals.get(server_key).cloned())
    }

    async fn set_ca_journal(&self, server_key: &str, journal: &[u8]) -> Result<()> {
        self.lock()
            .ca_journals
            .insert(server_key.to_owned(), journal.to_vec());
        Ok(())
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().meta.get(key).cloned())
    }

    async fn set_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock().meta.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    async fn create_exception(&self, exception: Exception) -> Result<Exception> {
        let mut exception = normalize_exception(exception)?;
        exception.revision = 1;
        let mut state = self.lock();
        if state.exceptions.contains_key(&exception.id) {
            return Err(DatastoreError::exists(format!(
                "exception {:?}",
                exception.id
            )));
        }
        state
            .exceptions
            .insert(exception.id.clone(), exception.clone());
        state.record(
            ChangeKind::Created,
            ChangeSubject::Exception(exception.id.clone()),
        );
        Ok(exception)
    }

    async fn get_exception(&self, id: &str) -> Result<Option<Exception>> {
        Ok(self.lock().exceptions.get(id).cloned())
    }

    async fn update_exception(&self, exception: Exception) -> Result<Exception> {
        let mut exception = normalize_exception(exception)?;
        let mut state = self.lock();
        let stored = state
            .exceptions
            .get_mut(&exception.id)
            .ok_or_else(|| not_found("exception", &exception.id))?;
        if stored.revision != exception.revision {
            return Err(exception_conflict(
                &exception.id,
                exception.revision,
                stored.revision,
            ));
        }
        exception.revision += 1;
        *stored = exception.clone();
        state.record(
            ChangeKind::Updated,
            ChangeSubject::Exception(exception.id.clone()),
        );
        Ok(exception)
    }

    async fn list_exceptions(&self) -> Result<Vec<Exception>> {
        Ok(self.lock().exceptions.values().cloned().collect())
    }

    async fn record_issuances(&self, issuances: &[Issuance]) -> Result<()> {
        let mut state = self.lock();
        for issuance in issuances {
            let mut issuance = issuance.clone();
            issuance.issued_at = whole_second(issuance.issued_at)?;
            issuance.not_after = whole_second(issuance.not_after)?;
            state
                .issuances
                .entry((issuance.kind, issuance.serial.clone()))
                .or_insert(issuance);
        }
        Ok(())
    }

    async fn list_issuances(
        &self,
        filter: &IssuanceFilter,
        page: Option<PageRequest>,
    ) -> Result<Page<Issuance>> {
        let mut matching: Vec<Issuance> = self
            .lock()
            .issuances
            .values()
            .filter(|issuance| filter.matches(issuance))
            .cloned()
            .collect();
        matching.sort_by(|a, b| {
            b.issued_at
                .cmp(&a.issued_at)
                .then_with(|| a.kind.as_str().cmp(b.kind.as_str()))
                .then_with(|| a.serial.cmp(&b.serial))
        });
        let Some(page) = page else {
            return Ok((matching, None));
        };
        page.validate()?;
        let offset = match page.token.as_deref() {
            None | Some("") => 0,
            Some(token) => token
                .parse::<usize>()
                .map_err(|_| DatastoreError::Invalid(format!("page token {token:?}")))?,
        };
        let size = page.size as usize;
        let rest: Vec<Issuance> = matching.into_iter().skip(offset).collect();
        let next = (rest.len() > size).then(|| offset.saturating_add(size).to_string());
        Ok((rest.into_iter().take(size).collect(), next))
    }

    async fn prune_issuances(&self, issued_before: SystemTime) -> Result<u64> {
        let mut state = self.lock();
        let before = state.issuances.len();
        state
            .issuances
            .retain(|_, issuance| issuance.issued_at >= issued_before);
        Ok((before - state.issuances.len()) as u64)
    }

    async fn record_served(
        &self,
        agent_id: &SpiffeId,
        served: &[(String, SystemTime)],
    ) -> Result<()> {
        let mut state = self.lock();
        for (entry_id, at) in served {
            let at = whole_second(*at)?;
            let stored = state
                .served
                .entry((entry_id.clone(), agent_id.as_str().to_owned()))
                .or_insert(at);
            *stored = (*stored).max(at);
        }
        Ok(())
    }

    async fn list_usage(&self, entry_ids: &[String]) -> Result<Vec<EntryUsage>> {
        let wanted = |id: &String| entry_ids.is_empty() || entry_ids.contains(id);
        let state = self.lock();
        let mut usage = BTreeMap::new();
        for issuance in state.issuances.values() {
            if issuance.entry_id.is_empty() || !wanted(&issuance.entry_id) {
                continue;
            }
            let key = (
                issuance.entry_id.clone(),
                issuance.agent_id.as_str().to_owned(),
            );
            let record = usage_record(&mut usage, key);
            record.issued += 1;
            record.last_issued_at = record.last_issued_at.max(Some(issuance.issued_at));
        }
        for ((entry_id, agent_id), at) in &state.served {
            if wanted(entry_id) {
                usage_record(&mut usage, (entry_id.clone(), agent_id.clone())).last_served_at =
                    Some(*at);
            }
        }
        Ok(usage.into_values().collect())
    }

    async fn create_revocation(
        &self,
        revocation: Revocation,
        serials: &[RevokedSerial],
    ) -> Result<Revocation> {
        let mut revocation = normalize_revocation(revocation)?;
        let serials = normalize_revoked_serials(serials)?;
        let mut state = self.lock();
        if state.revocations.contains_key(&revocation.id) {
            return Err(DatastoreError::exists(format!(
                "revocation {:?}",
                revocation.id
            )));
        }
        state.revocation_sequence += 1;
        revocation.sequence = state.revocation_sequence;
        let listed = state
            .revoked_serials
            .entry(revocation.id.clone())
            .or_default();
        for serial in serials {
            listed.entry(serial.serial.clone()).or_insert(serial);
        }
        state
            .revocations
            .insert(revocation.id.clone(), revocation.clone());
        state.record(
            ChangeKind::Created,
            ChangeSubject::Revocation(revocation.id.clone()),
        );
        Ok(revocation)
    }

    async fn get_revocation(&self, id: &str) -> Result<Option<Revocation>> {
        Ok(self.lock().revocations.get(id).cloned())
    }

    async fn list_revocations(&self, after_sequence: i64) -> Result<Vec<Revocation>> {
        let mut out: Vec<Revocation> = self
            .lock()
            .revocations
            .values()
            .filter(|r| r.sequence > after_sequence)
            .cloned()
            .collect();
        out.sort_by_key(|r| r.sequence);
        Ok(out)
    }

    async fn add_revoked_serials(
        &self,
        revocation_id: &str,
        serials: &[RevokedSerial],
    ) -> Result<()> {
        let serials = normalize_revoked_serials(serials)?;
        let mut state = self.lock();
        if !state.revocations.contains_key(revocation_id) {
            return Err(not_found("revocation", revocation_id));
        }
        let listed = state
            .revoked_serials
            .entry(revocation_id.to_owned())
            .or_default();
        let mut added = false;
        for serial in serials {
            if !listed.contains_key(&serial.serial) {
                listed.insert(serial.serial.clone(), serial);
                added = true;
            }
        }
        if added {
            state.record(
                ChangeKind::Updated,
                ChangeSubject::Revocation(revocation_id.to_owned()),
            );
        }
        Ok(())
    }

    async fn list_revoked_serials(
        &self,
        revocation_id: Option<&str>,
    ) -> Result<Vec<RevokedSerial>> {
        let state = self.lock();
        let mut out: Vec<RevokedSerial> = state
            .revoked_serials
            .iter()
            .filter(|(id, _)| revocation_id.is_none_or(|wanted| wanted == id.as_str()))
            .flat_map(|(_, serials)| serials.values().cloned())
            .collect();
        out.sort();
        Ok(out)
    }

    async fn acknowledge_revocations(
        &self,
        agent_id: &SpiffeId,
        sequence: i64,
        at: SystemTime,
    ) -> Result<()> {
        let at = whole_second(at)?;
        let mut state = self.lock();
        let ack = state
            .revocation_acks
            .entry(agent_id.as_str().to_owned())
            .or_insert_with(|| RevocationAck {
                agent_id: agent_id.clone(),
                sequence,
                acked_at: at,
            });
        if sequence >= ack.sequence {
            ack.sequence = sequence;
            ack.acked_at = at;
        }
        Ok(())
    }

    async fn list_revocation_acks(&self) -> Result<Vec<RevocationAck>> {
        Ok(self.lock().revocation_acks.values().cloned().collect())
    }

    async fn get_revocation_ack(&self, agent_id: &SpiffeId) -> Result<Option<RevocationAck>> {
        Ok(self.lock().revocation_acks.get(agent_id.as_str()).cloned())
    }

    async fn publish_crls(&self, crls: &[PublishedCrl]) -> Result<usize> {
        let mut state = self.lock();
        let mut written = 0;
        for crl in crls {
            let crl = normalize_published_crl(crl)?;
            if state
                .published_crls
                .get(&crl.authority_id)
                .is_some_and(|stored| stored.number >= crl.number)
            {
                continue;
            }
            let subject = ChangeSubject::Crl(crl.authority_id.clone());
            state.published_crls.insert(crl.authority_id.clone(), crl);
            state.record(ChangeKind::Updated, subject);
            written += 1;
        }
        Ok(written)
    }

    async fn list_published_crls(&self) -> Result<Vec<PublishedCrl>> {
        Ok(self.lock().published_crls.values().cloned().collect())
    }

    async fn prune_published_crls(&self, before: SystemTime) -> Result<u64> {
        let mut state = self.lock();
        let count = state.published_crls.len();
        state
            .published_crls
            .retain(|_, crl| crl.next_update >= before);
        Ok((count - state.published_crls.len()) as u64)
    }

    async fn prune_revocations(&self, expired_before: SystemTime) -> Result<u64> {
        let mut state = self.lock();
        let gone: Vec<String> = state
            .revocations
            .values()
            .filter(|r| r.expires_at < expired_before)
            .map(|r| r.id.clone())
            .collect();
        for id in &gone {
            state.revocations.remove(id);
            state.revoked_serials.remove(id);
        }
        Ok(gone.len() as u64)
    }
}

impl MemoryStore {
    fn modify_agent(
        &self,
        id: &SpiffeId,
        change: impl FnOnce(&mut AttestedAgent),
    ) -> Result<AttestedAgent> {
        let mut state = self.lock();
        let Some(agent) = state.agents.get_mut(id.as_str()) else {
            return Err(not_found("agent", id.as_str()));
        };
        change(agent);
        let agent = agent.clone();
        state.record(ChangeKind::Updated, ChangeSubject::Agent(id.clone()));
        Ok(agent)
    }
}
