//! The governance records of the datastore: exceptions to the policy (the core's
//! [`Exception`](lanyard_core::policy::Exception)) and the usage ledger — every SVID issued
//! ([`Issuance`]) and when agents last served each entry ([`EntryUsage`]).

use std::time::SystemTime;

use lanyard_core::SpiffeId;
pub use lanyard_core::ledger::{EntryUsage, Issuance, IssuanceKind};

/// Which issuances [`Datastore::list_issuances`](super::Datastore::list_issuances) returns:
/// those matching every filter that is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IssuanceFilter {
    /// Issued for this entry.
    pub entry_id: Option<String>,
    /// Carrying this SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Issued to this agent.
    pub agent_id: Option<SpiffeId>,
    /// Signed by this authority.
    pub authority_id: Option<String>,
    /// Still valid after this instant (`not_after` strictly later).
    pub valid_after: Option<SystemTime>,
}

impl IssuanceFilter {
    /// Whether `issuance` passes every filter that is set.
    pub fn matches(&self, issuance: &Issuance) -> bool {
        self.entry_id
            .as_ref()
            .is_none_or(|id| *id == issuance.entry_id)
            && self
                .spiffe_id
                .as_ref()
                .is_none_or(|id| *id == issuance.spiffe_id)
            && self
                .agent_id
                .as_ref()
                .is_none_or(|id| *id == issuance.agent_id)
            && self
                .authority_id
                .as_ref()
                .is_none_or(|id| *id == issuance.authority_id)
            && self
                .valid_after
                .is_none_or(|instant| issuance.not_after > instant)
    }
}

/// The record for `key` in a usage map being assembled, created empty if absent.
pub(crate) fn usage_record(
    usage: &mut std::collections::BTreeMap<(String, String), EntryUsage>,
    key: (String, String),
) -> &mut EntryUsage {
    usage
        .entry(key)
        .or_insert_with_key(|(entry_id, agent_id)| EntryUsage {
            entry_id: entry_id.clone(),
            agent_id: agent_id.clone(),
            last_issued_at: None,
            last_served_at: None,
            issued: 0,
        })
}
