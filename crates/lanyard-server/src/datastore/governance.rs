//! The governance records of the datastore: exceptions to the policy (the core's
//! [`Exception`](lanyard_core::policy::Exception)) and the usage ledger — every SVID issued
//! ([`Issuance`]) and when agents last served each entry ([`EntryUsage`]).

use std::time::SystemTime;

use lanyard_core::SpiffeId;

use super::{DatastoreError, Result};

/// What kind of SVID an [`Issuance`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IssuanceKind {
    /// A workload X.509-SVID (`BatchNewX509SVID`).
    X509Svid,
    /// A workload JWT-SVID (`NewJWTSVID`).
    JwtSvid,
    /// An agent's own X.509-SVID (attestation or renewal).
    AgentSvid,
}

impl IssuanceKind {
    /// The name stored and shown: `x509-svid`, `jwt-svid`, `agent-svid`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X509Svid => "x509-svid",
            Self::JwtSvid => "jwt-svid",
            Self::AgentSvid => "agent-svid",
        }
    }

    /// Parses [`IssuanceKind::as_str`]'s names.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "x509-svid" => Ok(Self::X509Svid),
            "jwt-svid" => Ok(Self::JwtSvid),
            "agent-svid" => Ok(Self::AgentSvid),
            other => Err(DatastoreError::Backend(format!(
                "unknown issuance kind {other:?} in the ledger"
            ))),
        }
    }
}

/// One SVID the server issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issuance {
    /// What was issued.
    pub kind: IssuanceKind,
    /// The decimal serial number of an X.509-SVID, or a JWT-SVID's `jti`.
    pub serial: String,
    /// The entry it was issued for; empty for agent SVIDs.
    pub entry_id: String,
    /// The SPIFFE ID it carries.
    pub spiffe_id: SpiffeId,
    /// The agent it was issued to (the agent itself for agent SVIDs).
    pub agent_id: SpiffeId,
    /// Who signed it: the X.509 CA's subject key ID in hex, or the JWT key ID.
    pub authority_id: String,
    /// When it was issued.
    pub issued_at: SystemTime,
    /// When it expires.
    pub not_after: SystemTime,
    /// The exceptions its entry passed the policy under.
    pub exception_ids: Vec<String>,
}

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

/// How one agent used one entry: the ledger's last issuance and the agent's last report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryUsage {
    /// The entry.
    pub entry_id: String,
    /// The agent.
    pub agent_id: String,
    /// The newest issuance in the ledger, if any.
    pub last_issued_at: Option<SystemTime>,
    /// When the agent last reported serving the entry to a workload, if ever.
    pub last_served_at: Option<SystemTime>,
    /// How many issuances the ledger holds.
    pub issued: u64,
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
