//! The in-memory authorization index: which registration entries each agent may obtain SVIDs
//! for. [`IndexFeed`] holds it and keeps it current from the datastore's change log alone; it
//! is never rebuilt per request.
//!
//! SPIRE's rule: an agent is authorized for entries whose parent is the agent's ID, or the
//! SPIFFE ID of a node alias entry (parent = the server ID) whose selectors are all among the
//! agent's node selectors; and, recursively, for entries whose parent is the SPIFFE ID of an
//! entry already found. Alias entries themselves are not returned. Expired entries authorize
//! nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use lanyard_core::agent::AttestedAgent;
use lanyard_core::{EntryId, RegistrationEntry, Selector, SpiffeId};

/// The index. Cheap to query; callers hold it behind a lock and apply changes as they commit.
#[derive(Debug)]
pub struct AuthorizationIndex {
    server_id: SpiffeId,
    entries: HashMap<EntryId, Arc<RegistrationEntry>>,
    /// Entry IDs by parent ID, ordered for stable output.
    by_parent: HashMap<SpiffeId, EntryIds>,
    /// Entry IDs by SPIFFE ID: the way from an entry up to what authorizes it.
    by_spiffe_id: HashMap<SpiffeId, EntryIds>,
    /// Alias entries (parent = server ID) by each of their selectors.
    aliases_by_selector: HashMap<Selector, Vec<EntryId>>,
    /// Each attested agent's record: its node selectors for aliases, and its serials and ban
    /// for the agent authorizer, which would otherwise read the datastore on every call.
    agents: HashMap<SpiffeId, Arc<AttestedAgent>>,
}

impl AuthorizationIndex {
    /// An empty index for the server whose ID is `server_id`.
    pub fn new(server_id: SpiffeId) -> Self {
        Self {
            server_id,
            entries: HashMap::new(),
            by_parent: HashMap::new(),
            by_spiffe_id: HashMap::new(),
            aliases_by_selector: HashMap::new(),
            agents: HashMap::new(),
        }
    }

    /// Builds an index from every entry and every attested agent.
    pub fn build(
        server_id: SpiffeId,
        entries: impl IntoIterator<Item = RegistrationEntry>,
        agents: impl IntoIterator<Item = AttestedAgent>,
    ) -> Self {
        let mut index = Self::new(server_id);
        for entry in entries {
            index.upsert_entry(entry);
        }
        for agent in agents {
            index.set_agent(agent);
        }
        index
    }

    /// Number of entries indexed.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Number of attested agents indexed.
    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }

    /// Up to `n` indexed entries, in no particular order: what a candidate policy is tried on.
    pub fn sample_entries(&self, n: usize) -> Vec<Arc<RegistrationEntry>> {
        self.entries.values().take(n).cloned().collect()
    }

    /// The entry with `id`, if indexed.
    pub fn entry(&self, id: &EntryId) -> Option<&Arc<RegistrationEntry>> {
        self.entries.get(id)
    }

    /// Adds or replaces an entry.
    pub fn upsert_entry(&mut self, entry: RegistrationEntry) {
        self.remove_entry(&entry.id);
        let entry = Arc::new(entry);
        insert_id(&mut self.by_parent, &entry.parent_id, &entry.id);
        insert_id(&mut self.by_spiffe_id, &entry.spiffe_id, &entry.id);
        if entry.parent_id == self.server_id {
            for selector in entry.selectors.iter() {
                self.aliases_by_selector
                    .entry(selector.clone())
                    .or_default()
                    .push(entry.id.clone());
            }
        }
        self.entries.insert(entry.id.clone(), entry);
    }

    /// Removes an entry; returns it if it was indexed.
    pub fn remove_entry(&mut self, id: &EntryId) -> Option<Arc<RegistrationEntry>> {
        let old = self.entries.remove(id)?;
        remove_id(&mut self.by_parent, &old.parent_id, id);
        remove_id(&mut self.by_spiffe_id, &old.spiffe_id, id);
        if old.parent_id == self.server_id {
            for selector in old.selectors.iter() {
                if let Some(ids) = self.aliases_by_selector.get_mut(selector) {
                    ids.retain(|other| other != id);
                    if ids.is_empty() {
                        self.aliases_by_selector.remove(selector);
                    }
                }
            }
        }
        Some(old)
    }

    /// Records (or replaces) an attested agent's record.
    pub fn set_agent(&mut self, agent: AttestedAgent) {
        self.agents.insert(agent.spiffe_id.clone(), Arc::new(agent));
    }

    /// The attested agent's record as of the last change applied.
    pub fn agent(&self, agent_id: &SpiffeId) -> Option<Arc<AttestedAgent>> {
        self.agents.get(agent_id).cloned()
    }

    /// Forgets an agent (it was evicted).
    pub fn remove_agent(&mut self, agent_id: &SpiffeId) {
        self.agents.remove(agent_id);
    }

    /// The SPIFFE IDs of the node alias entries that apply to this agent at `now`.
    pub fn aliases_of(&self, agent_id: &SpiffeId, now: SystemTime) -> Vec<SpiffeId> {
        let Some(agent) = self.agents.get(agent_id) else {
            return Vec::new();
        };
        let node_selectors = &agent.selectors;
        let mut seen = HashSet::new();
        let mut aliases = Vec::new();
        for selector in node_selectors.iter() {
            for id in self.aliases_by_selector.get(selector).into_iter().flatten() {
                if !seen.insert(id) {
                    continue;
                }
                if let Some(entry) = self.entries.get(id)
                    && !entry.is_expired(now)
                    && entry.selectors.matches(node_selectors)
                {
                    aliases.push(entry.spiffe_id.clone());
                }
            }
        }
        aliases.sort();
        aliases.dedup();
        aliases
    }

    /// Every entry the agent may obtain SVIDs for at `now`, ordered by entry ID.
    pub fn authorized_entries(
        &self,
        agent_id: &SpiffeId,
        now: SystemTime,
    ) -> Vec<Arc<RegistrationEntry>> {
        let mut roots = self.aliases_of(agent_id, now);
        roots.push(agent_id.clone());

        let mut visited_parents: HashSet<SpiffeId> = HashSet::new();
        let mut found: BTreeMap<EntryId, Arc<RegistrationEntry>> = BTreeMap::new();
        let mut queue = roots;
        while let Some(parent) = queue.pop() {
            if !visited_parents.insert(parent.clone()) {
                continue;
            }
            let Some(children) = self.by_parent.get(&parent) else {
                continue;
            };
            for id in children.iter() {
                let Some(entry) = self.entries.get(id) else {
                    continue;
                };
                if entry.is_expired(now) || found.contains_key(id) {
                    continue;
                }
                found.insert(id.clone(), Arc::clone(entry));
                queue.push(entry.spiffe_id.clone());
            }
        }
        found.into_values().collect()
    }

    /// The unexpired entries with SPIFFE ID `id` that satisfy `flag` (e.g. are `admin`).
    pub fn flagged_entries(
        &self,
        id: &SpiffeId,
        now: SystemTime,
        flag: impl Fn(&RegistrationEntry) -> bool,
    ) -> Vec<Arc<RegistrationEntry>> {
        self.with_spiffe_id(id)
            .filter(|e| !e.is_expired(now) && flag(e))
            .cloned()
            .collect()
    }

    /// The indexed entries whose SPIFFE ID is `id`.
    fn with_spiffe_id<'a>(
        &'a self,
        id: &SpiffeId,
    ) -> impl Iterator<Item = &'a Arc<RegistrationEntry>> + 'a {
        self.by_spiffe_id
            .get(id)
            .into_iter()
            .flat_map(EntryIds::iter)
            .filter_map(|id| self.entries.get(id))
    }

    /// The entry, if the agent is authorized for it at `now`: the same answer as looking it
    /// up in [`AuthorizationIndex::authorized_entries`], found by walking from the entry up
    /// through its parents instead of down through everything the agent may obtain, so its
    /// cost is the depth of the entry's chain, not the number of the agent's entries.
    pub fn authorized_entry(
        &self,
        agent_id: &SpiffeId,
        entry_id: &EntryId,
        now: SystemTime,
    ) -> Option<Arc<RegistrationEntry>> {
        let entry = self.entries.get(entry_id)?;
        if entry.is_expired(now) {
            return None;
        }
        let mut roots: HashSet<SpiffeId> = self.aliases_of(agent_id, now).into_iter().collect();
        roots.insert(agent_id.clone());
        // Parents already looked at: a chain that loops without reaching a root authorizes
        // nothing.
        let mut visited: HashSet<&SpiffeId> = HashSet::new();
        let mut queue = vec![&entry.parent_id];
        while let Some(parent) = queue.pop() {
            if roots.contains(parent) {
                return Some(Arc::clone(entry));
            }
            if !visited.insert(parent) {
                continue;
            }
            // The parent is the SPIFFE ID of an entry the agent obtains: an unexpired one
            // that is itself reached, so walk up from each.
            for above in self.with_spiffe_id(parent) {
                if !above.is_expired(now) {
                    queue.push(&above.parent_id);
                }
            }
        }
        None
    }
}

/// The authorization index and the change-log revision it reflects. The index changes only
/// by [`IndexFeed::catch_up`], which applies the datastore's change log in revision order.
#[derive(Debug)]
pub struct IndexFeed {
    index: std::sync::RwLock<AuthorizationIndex>,
    /// The revision applied last; held while a catch-up applies changes, so that they are
    /// applied one catch-up at a time, in revision order.
    applied: tokio::sync::Mutex<i64>,
}

impl IndexFeed {
    /// `index`, loaded from the datastore at change-log `revision` or later (read the
    /// revision before loading: a change applied twice is harmless, each re-reads its record).
    pub fn new(index: AuthorizationIndex, revision: i64) -> Self {
        Self {
            index: std::sync::RwLock::new(index),
            applied: tokio::sync::Mutex::new(revision),
        }
    }

    /// Read access to the index.
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, AuthorizationIndex> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, AuthorizationIndex> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The change-log revision the index reflects.
    pub async fn revision(&self) -> i64 {
        *self.applied.lock().await
    }

    /// Puts `entry` in the index without the datastore, for tests that need a state the
    /// datastore refuses to hold. Nothing but tests calls it.
    #[doc(hidden)]
    pub fn plant_for_tests(&self, entry: &RegistrationEntry) {
        self.write().upsert_entry(entry.clone());
    }

    /// Brings the index (and `judge`'s exceptions) up to date with `store`'s change log:
    /// every change past the revision the index reflects, in revision order, each applied by
    /// re-reading its record, so the index ends as the datastore is whatever order writers
    /// committed in, and whichever server made them. On a datastore error nothing past the
    /// last applied change is recorded as done, so the next catch-up tries again. Returns what
    /// changed outside the index: which bundles and federation relationships, and whether
    /// revocations or published CRLs did.
    pub async fn catch_up(
        &self,
        store: &dyn crate::datastore::Datastore,
        judge: &crate::judge::IssuanceJudge,
    ) -> Result<ChangedElsewhere, crate::datastore::DatastoreError> {
        use crate::datastore::ChangeSubject;

        let mut applied = self.applied.lock().await;
        let changes = store.changes_since(*applied).await?;
        let Some(last) = changes.last().map(|change| change.revision) else {
            return Ok(ChangedElsewhere::default());
        };
        let mut changed = ChangedElsewhere::default();
        // The record as it is now stands for every change to it; each subject is read once.
        let mut seen = HashSet::new();
        let mut exceptions_changed = false;
        for change in changes.iter().rev() {
            if !seen.insert(&change.subject) {
                continue;
            }
            match &change.subject {
                ChangeSubject::Entry(id) => match store.get_entry(id).await? {
                    Some(entry) => self.write().upsert_entry(entry),
                    None => {
                        self.write().remove_entry(id);
                        judge.forget(id);
                    }
                },
                ChangeSubject::Agent(id) => match store.get_agent(id).await? {
                    Some(agent) => self.write().set_agent(agent),
                    None => self.write().remove_agent(id),
                },
                ChangeSubject::Exception(_) => exceptions_changed = true,
                ChangeSubject::Bundle(trust_domain) => changed.bundles.push(trust_domain.clone()),
                ChangeSubject::FederationRelationship(trust_domain) => {
                    changed.relationships.push(trust_domain.clone());
                }
                ChangeSubject::Revocation(_) => changed.revocations = true,
                ChangeSubject::Crl(_) => changed.crls = true,
            }
        }
        if exceptions_changed {
            judge.reload_exceptions(store).await?;
        }
        *applied = last;
        Ok(changed)
    }
}

/// The IDs of the entries under one key of an index (a parent, a SPIFFE ID). Most SPIFFE
/// IDs have one entry, held inline; more go into an ordered set.
#[derive(Debug, Clone)]
enum EntryIds {
    One(EntryId),
    Many(BTreeSet<EntryId>),
}

impl EntryIds {
    fn iter(&self) -> impl Iterator<Item = &EntryId> {
        let (one, many) = match self {
            Self::One(id) => (Some(id), None),
            Self::Many(ids) => (None, Some(ids.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// Files `id` under `key`.
fn insert_id(index: &mut HashMap<SpiffeId, EntryIds>, key: &SpiffeId, id: &EntryId) {
    match index.get_mut(key) {
        None => {
            index.insert(key.clone(), EntryIds::One(id.clone()));
        }
        Some(EntryIds::One(existing)) if existing == id => {}
        Some(slot @ EntryIds::One(_)) => {
            let EntryIds::One(existing) = std::mem::replace(slot, EntryIds::Many(BTreeSet::new()))
            else {
                return;
            };
            *slot = EntryIds::Many(BTreeSet::from([existing, id.clone()]));
        }
        Some(EntryIds::Many(ids)) => {
            ids.insert(id.clone());
        }
    }
}

/// Takes `id` from under `key`, dropping the key when nothing is left.
fn remove_id(index: &mut HashMap<SpiffeId, EntryIds>, key: &SpiffeId, id: &EntryId) {
    let Some(slot) = index.get_mut(key) else {
        return;
    };
    let now_empty = match slot {
        EntryIds::One(existing) => existing == id,
        EntryIds::Many(ids) => {
            ids.remove(id);
            if ids.len() == 1
                && let Some(last) = ids.pop_first()
            {
                *slot = EntryIds::One(last);
                false
            } else {
                ids.is_empty()
            }
        }
    };
    if now_empty {
        index.remove(key);
    }
}

/// What an [`IndexFeed::catch_up`] found changed that the index does not hold.
#[derive(Debug, Default)]
pub struct ChangedElsewhere {
    /// The trust domains whose bundles changed.
    pub bundles: Vec<lanyard_core::TrustDomain>,
    /// The trust domains whose federation relationships changed.
    pub relationships: Vec<lanyard_core::TrustDomain>,
    /// Whether revocations were made or gained serials.
    pub revocations: bool,
    /// Whether a server published CRLs (this one or another sharing the datastore).
    pub crls: bool,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lanyard_core::TrustDomain;

    use super::*;

    #[test]
    fn entry_id_sets_go_from_one_to_many_and_back() {
        let key: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let id = |s: &str| EntryId::new(s).unwrap();
        let ids = |index: &HashMap<SpiffeId, EntryIds>| -> Vec<String> {
            index
                .get(&key)
                .map(|ids| ids.iter().map(ToString::to_string).collect())
                .unwrap_or_default()
        };
        let mut index = HashMap::new();
        insert_id(&mut index, &key, &id("b"));
        insert_id(&mut index, &key, &id("b"));
        assert!(matches!(index.get(&key), Some(EntryIds::One(_))));
        assert_eq!(ids(&index), ["b"]);
        insert_id(&mut index, &key, &id("a"));
        insert_id(&mut index, &key, &id("c"));
        assert_eq!(ids(&index), ["a", "b", "c"]);
        remove_id(&mut index, &key, &id("b"));
        remove_id(&mut index, &key, &id("missing"));
        assert_eq!(ids(&index), ["a", "c"]);
        remove_id(&mut index, &key, &id("a"));
        assert!(matches!(index.get(&key), Some(EntryIds::One(_))));
        assert_eq!(ids(&index), ["c"]);
        remove_id(&mut index, &key, &id("a"));
        assert_eq!(ids(&index), ["c"]);
        remove_id(&mut index, &key, &id("c"));
        assert!(index.is_empty(), "the key goes with its last entry");
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn id(path: &str) -> SpiffeId {
        SpiffeId::from_path(&td(), path).unwrap()
    }

    fn sels(items: &[&str]) -> lanyard_core::SelectorSet {
        items.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn node(agent_id: &SpiffeId, selectors: &[&str]) -> AttestedAgent {
        let mut agent =
            AttestedAgent::new(agent_id.clone(), "x509pop", "1", SystemTime::UNIX_EPOCH);
        agent.selectors = sels(selectors);
        agent
    }

    fn entry(eid: &str, spiffe: &str, parent: &SpiffeId, selectors: &[&str]) -> RegistrationEntry {
        RegistrationEntry::new(
            EntryId::new(eid).unwrap(),
            id(spiffe),
            parent.clone(),
            sels(selectors),
            SystemTime::UNIX_EPOCH,
        )
    }

    fn ids(entries: &[Arc<RegistrationEntry>]) -> Vec<&str> {
        entries.iter().map(|e| e.id.as_str()).collect()
    }

    /// A small deterministic generator (xorshift64*), so the random graphs below are the same
    /// in every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
            usize::try_from(x % n as u64).unwrap()
        }
    }

    /// The entry-by-entry lookup answers what the full list answers, on random graphs of
    /// entries: nested chains, cycles, aliases, shared SPIFFE IDs, expired links.
    #[test]
    fn one_entry_lookups_agree_with_the_full_list() {
        let server = td().server_id();
        let agents: Vec<SpiffeId> = (0..3)
            .map(|i| id(&format!("/spire/agent/join_token/{i}")))
            .collect();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let node_selectors = ["n:a", "n:b", "n:c"];
        for seed in 1..=200_u64 {
            let mut rng = Rng(seed);
            let n = 2 + rng.below(14);
            // SPIFFE IDs drawn from a small pool, so that chains, shared IDs and cycles occur.
            let pool: Vec<SpiffeId> = (0..6).map(|i| id(&format!("/w/{i}"))).collect();
            let mut entries = Vec::new();
            for i in 0..n {
                let parent = match rng.below(4) {
                    0 => agents[rng.below(agents.len())].clone(),
                    1 => server.clone(),
                    _ => pool[rng.below(pool.len())].clone(),
                };
                let selectors = if parent == server {
                    let k = 1 + rng.below(2);
                    (0..k)
                        .map(|_| node_selectors[rng.below(node_selectors.len())])
                        .collect::<Vec<_>>()
                } else {
                    vec!["unix:uid:1"]
                };
                let mut e = RegistrationEntry::new(
                    EntryId::new(&format!("e{i}")).unwrap(),
                    pool[rng.below(pool.len())].clone(),
                    parent,
                    sels(&selectors),
                    SystemTime::UNIX_EPOCH,
                );
                if rng.below(5) == 0 {
                    e.expires_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(500));
                }
                entries.push(e);
            }
            let agent_selectors = agents.iter().map(|agent| {
                let k = rng.below(4);
                let chosen: Vec<&str> = (0..k)
                    .map(|_| node_selectors[rng.below(node_selectors.len())])
                    .collect();
                node(agent, &chosen)
            });
            let agent_selectors: Vec<_> = agent_selectors.collect();
            let index = AuthorizationIndex::build(server.clone(), entries.clone(), agent_selectors);
            for agent in &agents {
                let listed: HashSet<EntryId> = index
                    .authorized_entries(agent, now)
                    .iter()
                    .map(|e| e.id.clone())
                    .collect();
                for e in &entries {
                    let found = index.authorized_entry(agent, &e.id, now).is_some();
                    assert_eq!(
                        found,
                        listed.contains(&e.id),
                        "seed {seed}, agent {agent}, entry {}: {entries:?}",
                        e.id
                    );
                }
            }
        }
    }

    #[test]
    fn direct_alias_and_nested_entries() {
        let server = td().server_id();
        let agent_a = id("/spire/agent/join_token/a");
        let agent_b = id("/spire/agent/join_token/b");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let mut index = AuthorizationIndex::build(
            server.clone(),
            [
                entry("direct", "/web", &agent_a, &["unix:uid:1"]),
                entry(
                    "alias",
                    "/nodes/prod",
                    &server,
                    &["x509pop:ca:1", "x509pop:dc:eu"],
                ),
                entry("via-alias", "/db", &id("/nodes/prod"), &["unix:uid:2"]),
                entry("nested", "/db/child", &id("/db"), &["unix:uid:3"]),
                entry("other", "/mail", &agent_b, &["unix:uid:4"]),
            ],
            [
                node(&agent_a, &["x509pop:ca:1", "x509pop:dc:eu", "x509pop:x:y"]),
                node(&agent_b, &["x509pop:ca:1"]),
            ],
        );
        assert_eq!(
            ids(&index.authorized_entries(&agent_a, now)),
            ["direct", "nested", "via-alias"]
        );
        assert_eq!(index.aliases_of(&agent_a, now), [id("/nodes/prod")]);
        // Agent B lacks one of the alias's selectors.
        assert_eq!(ids(&index.authorized_entries(&agent_b, now)), ["other"]);
        assert!(
            index
                .authorized_entry(&agent_b, &EntryId::new("direct").unwrap(), now)
                .is_none()
        );
        assert!(
            index
                .authorized_entry(&agent_a, &EntryId::new("nested").unwrap(), now)
                .is_some()
        );

        // Changes apply incrementally.
        index.set_agent(node(&agent_b, &["x509pop:ca:1", "x509pop:dc:eu"]));
        assert_eq!(
            ids(&index.authorized_entries(&agent_b, now)),
            ["nested", "other", "via-alias"]
        );
        index.remove_entry(&EntryId::new("alias").unwrap());
        assert_eq!(ids(&index.authorized_entries(&agent_b, now)), ["other"]);
        assert_eq!(ids(&index.authorized_entries(&agent_a, now)), ["direct"]);

        // Re-parenting an entry moves it.
        index.upsert_entry(entry("other", "/mail", &agent_a, &["unix:uid:4"]));
        assert!(index.authorized_entries(&agent_b, now).is_empty());
        assert_eq!(
            ids(&index.authorized_entries(&agent_a, now)),
            ["direct", "other"]
        );
        index.remove_agent(&agent_b);
        assert_eq!(index.agent_count(), 1);
    }

    #[test]
    fn expired_entries_authorize_nothing_including_their_children() {
        let server = td().server_id();
        let agent = id("/spire/agent/join_token/a");
        let mut parent = entry("parent", "/p", &agent, &["unix:uid:1"]);
        parent.expires_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(50));
        let index = AuthorizationIndex::build(
            server,
            [parent, entry("child", "/p/c", &id("/p"), &["unix:uid:2"])],
            [],
        );
        let before = SystemTime::UNIX_EPOCH + Duration::from_secs(49);
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(50);
        assert_eq!(
            ids(&index.authorized_entries(&agent, before)),
            ["child", "parent"]
        );
        assert!(index.authorized_entries(&agent, after).is_empty());
    }

    #[test]
    fn cycles_terminate() {
        let server = td().server_id();
        let agent = id("/spire/agent/join_token/a");
        let index = AuthorizationIndex::build(
            server,
            [
                entry("a", "/a", &agent, &["u:1"]),
                entry("b", "/b", &id("/a"), &["u:2"]),
                entry("c", "/a", &id("/b"), &["u:3"]),
            ],
            [],
        );
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(ids(&index.authorized_entries(&agent, now)), ["a", "b", "c"]);
    }
}
