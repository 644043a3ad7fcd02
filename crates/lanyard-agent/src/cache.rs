//! What the agent knows at a moment: its authorized entries, the SVIDs minted for them, and
//! the bundles. The manager publishes a new [`Snapshot`] on every change (sync, rotation,
//! bundle update) through a `watch` channel; the Workload API reads snapshots and never talks
//! to the server itself, except to mint JWT-SVIDs through [`JwtMinter`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use lanyard_core::jwt::JwtSvid;
use lanyard_core::keys::KeyPair;
use lanyard_core::x509::X509Svid;
use lanyard_core::{EntryId, SelectorSet, SpiffeId, TrustBundle, TrustDomain};

/// An authorized entry as the agent sees it (SPIRE's agent never learns parent IDs or TTLs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedEntry {
    /// The entry ID.
    pub id: EntryId,
    /// The identity it grants.
    pub spiffe_id: SpiffeId,
    /// The selectors a workload must have.
    pub selectors: SelectorSet,
    /// Foreign trust domains whose bundles matching workloads get.
    pub federates_with: BTreeSet<TrustDomain>,
    /// Bumped by the server on every change.
    pub revision_number: i64,
    /// The Workload API hint.
    pub hint: String,
    /// When the entry was created (orders entries that share a hint).
    pub created_at: SystemTime,
    /// Whether this is an admin identity.
    pub admin: bool,
    /// Whether this is a downstream identity.
    pub downstream: bool,
    /// Whether the SVID goes to an SVID store rather than to workloads.
    pub store_svid: bool,
}

/// An X.509-SVID ready to hand to a workload: its entry, chain and private key.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The entry the SVID was minted for.
    pub entry: Arc<CachedEntry>,
    /// The certificate chain, leaf first.
    pub svid: Arc<X509Svid>,
    /// The private key, generated on this agent.
    pub key: Arc<KeyPair>,
}

/// A consistent view of everything the Workload API serves.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The agent's own trust domain.
    pub trust_domain: TrustDomain,
    /// The bundle of the agent's trust domain.
    pub bundle: Arc<TrustBundle>,
    /// Bundles of foreign trust domains that some entry federates with.
    pub federated_bundles: BTreeMap<TrustDomain, Arc<TrustBundle>>,
    /// Authorized entries, ordered by entry ID.
    pub entries: Vec<Arc<CachedEntry>>,
    /// Minted SVIDs by entry ID. An entry without an SVID yet has none here.
    pub identities: BTreeMap<EntryId, Identity>,
    /// Whether the agent has completed at least one sync since it started; before that an
    /// empty entry list does not yet mean "no identity".
    pub synced: bool,
    /// The trust domain's certificate revocation lists (DER), one per X.509 authority whose
    /// key the server holds; empty when the server gives none (SPIRE's).
    pub crls: Arc<Vec<Vec<u8>>>,
    /// Revoked JWT-SVID IDs, each until its revocation expires: never handed out, refused by
    /// `ValidateJWTSVID`.
    pub revoked_jtis: Arc<BTreeMap<String, SystemTime>>,
}

impl Snapshot {
    /// An empty snapshot for `trust_domain` with `bundle`.
    pub fn new(trust_domain: TrustDomain, bundle: Arc<TrustBundle>) -> Self {
        Self {
            trust_domain,
            bundle,
            federated_bundles: BTreeMap::new(),
            entries: Vec::new(),
            identities: BTreeMap::new(),
            synced: false,
            crls: Arc::default(),
            revoked_jtis: Arc::default(),
        }
    }

    /// Whether the JWT-SVID with this `jti` is revoked at `now`.
    pub fn jti_revoked(&self, jti: &str, now: SystemTime) -> bool {
        self.revoked_jtis.get(jti).is_some_and(|until| *until > now)
    }

    /// The entries whose selectors are all among `selectors`, in SPIRE's order (oldest
    /// first, then by ID), with SPIRE's hint rule applied: of entries sharing a non-empty
    /// hint only the oldest is kept. Entries marked `store_svid` are never served.
    pub fn entries_for(&self, selectors: &SelectorSet) -> Vec<Arc<CachedEntry>> {
        let mut matching: Vec<Arc<CachedEntry>> = self
            .entries
            .iter()
            .filter(|e| !e.store_svid && e.selectors.matches(selectors))
            .cloned()
            .collect();
        matching.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        let mut seen_hints = BTreeSet::new();
        matching.retain(|e| e.hint.is_empty() || seen_hints.insert(e.hint.clone()));
        matching
    }

    /// The minted, unexpired identities for a workload with `selectors` at `now`, in the
    /// order of [`Snapshot::entries_for`].
    pub fn identities_for(&self, selectors: &SelectorSet, now: SystemTime) -> Vec<Identity> {
        self.entries_for(selectors)
            .iter()
            .filter_map(|e| self.identities.get(&e.id))
            .filter(|i| i.svid.not_after() > now)
            .cloned()
            .collect()
    }

    /// The federated bundles the given entries federate with, by trust domain.
    pub fn federated_for<'a>(
        &self,
        entries: impl IntoIterator<Item = &'a CachedEntry>,
    ) -> BTreeMap<TrustDomain, Arc<TrustBundle>> {
        let mut out = BTreeMap::new();
        for entry in entries {
            for td in &entry.federates_with {
                if let Some(bundle) = self.federated_bundles.get(td) {
                    out.insert(td.clone(), Arc::clone(bundle));
                }
            }
        }
        out
    }
}

/// Errors from minting a JWT-SVID through the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtMintError {
    /// The entry is not (or no longer) authorized for this agent.
    #[error("entry {0} is not authorized")]
    NotAuthorized(EntryId),
    /// The server could not be reached and no cached token is valid.
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// The server refused or answered nonsense.
    #[error("{0}")]
    Server(String),
}

/// Mints (or returns a cached) JWT-SVID for an entry and audience set. Implemented by the
/// agent's manager, which caches tokens per (SPIFFE ID, audiences) and renews them at half
/// their life.
#[tonic::async_trait]
pub trait JwtMinter: Send + Sync + 'static {
    /// A JWT-SVID for `entry` with exactly these audiences.
    async fn jwt_svid(
        &self,
        entry: &CachedEntry,
        audiences: &[String],
    ) -> Result<JwtSvid, JwtMintError>;
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn entry(id: &str, selectors: &[&str], hint: &str, created: u64) -> Arc<CachedEntry> {
        Arc::new(CachedEntry {
            id: EntryId::new(id).unwrap(),
            spiffe_id: format!("spiffe://example.org/{id}").parse().unwrap(),
            selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
            federates_with: BTreeSet::new(),
            revision_number: 0,
            hint: hint.to_owned(),
            created_at: UNIX_EPOCH + Duration::from_secs(created),
            admin: false,
            downstream: false,
            store_svid: false,
        })
    }

    #[test]
    fn matching_order_and_hint_dedup() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut snapshot = Snapshot::new(td.clone(), Arc::new(TrustBundle::new(td)));
        snapshot.entries = vec![
            entry("a", &["unix:uid:1"], "", 30),
            entry("b", &["unix:uid:1", "unix:gid:1"], "db", 20),
            entry("c", &["unix:uid:1"], "db", 10),
            entry("d", &["unix:uid:2"], "", 5),
            entry("e", &["unix:uid:1"], "", 30),
        ];
        let workload: SelectorSet = ["unix:uid:1", "unix:gid:1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let ids: Vec<String> = snapshot
            .entries_for(&workload)
            .iter()
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(ids, ["c", "a", "e"]);
    }
}
