//! The usage ledger's records: every SVID the server issued ([`Issuance`]) and when agents
//! last served each entry ([`EntryUsage`]). The server keeps them; reports read them.

use std::time::SystemTime;

use crate::SpiffeId;

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
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "x509-svid" => Some(Self::X509Svid),
            "jwt-svid" => Some(Self::JwtSvid),
            "agent-svid" => Some(Self::AgentSvid),
            _ => None,
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
