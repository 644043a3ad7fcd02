//! What the server knows about an agent it attested: the record SPIRE calls an "attested
//! node". The server stores it; admin clients read it.

use std::time::SystemTime;

use crate::{SelectorSet, SpiffeId};

/// An attested agent (SPIRE's "attested node"): what the server knows about an agent it issued
/// an SVID to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedAgent {
    /// The agent's SPIFFE ID, e.g. `spiffe://example.org/spire/agent/join_token/…`.
    pub spiffe_id: SpiffeId,
    /// The node attestor that attested it, e.g. `join_token`, `x509pop`.
    pub attestation_type: String,
    /// Decimal serial number of the agent's current SVID; empty when the agent is banned.
    pub serial: String,
    /// When the current SVID expires.
    pub not_after: SystemTime,
    /// Decimal serial of a renewed SVID not yet used by the agent; empty if none.
    pub new_serial: String,
    /// When the renewed SVID expires, if there is one.
    pub new_not_after: Option<SystemTime>,
    /// Whether the agent may attest again (rather than only renew).
    pub can_reattest: bool,
    /// The node selectors its attestation produced.
    pub selectors: SelectorSet,
    /// The version the agent last reported.
    pub agent_version: String,
    /// When the record was created. Set by the store; the value passed in is ignored.
    pub created_at: SystemTime,
    /// When the record last changed. Set by the store; the value passed in is ignored.
    pub updated_at: SystemTime,
}

impl AttestedAgent {
    /// A new agent record with no renewed SVID, no selectors and no version yet.
    pub fn new(
        spiffe_id: SpiffeId,
        attestation_type: impl Into<String>,
        serial: impl Into<String>,
        not_after: SystemTime,
    ) -> Self {
        Self {
            spiffe_id,
            attestation_type: attestation_type.into(),
            serial: serial.into(),
            not_after,
            new_serial: String::new(),
            new_not_after: None,
            can_reattest: false,
            selectors: SelectorSet::new(),
            agent_version: String::new(),
            created_at: SystemTime::UNIX_EPOCH,
            updated_at: SystemTime::UNIX_EPOCH,
        }
    }

    /// Whether the agent is banned: its serial was cleared, so it can neither sync nor
    /// re-attest until it is evicted.
    pub fn is_banned(&self) -> bool {
        self.serial.is_empty()
    }
}
