//! Revocation: records that stop credentials before they expire, and the certificate
//! revocation lists (CRLs) that carry them to TLS verifiers.
//!
//! A [`Revocation`] is a governance record like an exception: it names what it revokes (its
//! [`RevocationTarget`]), who asked and why, and when it can be forgotten (`expires_at`: once
//! every credential it can cover has expired). Records are numbered by the datastore in the
//! order they are made (`sequence`), so that an agent can say which it has applied by one
//! number.
//!
//! What a record covers is decided two ways, each exact for its reader:
//! - an agent holding SVIDs drops every one whose SPIFFE ID, entry or serial matches
//!   ([`RevocationTarget::covers_x509`]) at the moment it applies the record, and mints
//!   replacements: whatever it held then was issued before it learned of the record, and what
//!   it mints after is not covered (the server keeps issuing for the entry);
//! - a TLS verifier, which knows only serials, reads a CRL: the server lists there the serials
//!   that records name outright, those its issuance ledger holds for the target up to the
//!   record's creation, and those agents report having dropped.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use crate::entry::EntryId;
use crate::id::SpiffeId;

/// The longest owner, reason or ticket, in bytes.
pub const MAX_TEXT_LEN: usize = 1024;

/// The longest `jti` accepted, in bytes.
pub const MAX_JTI_LEN: usize = 256;

/// What a revocation stops.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RevocationTarget {
    /// One X.509-SVID, by its serial number in decimal (as the ledger and `lanyard x509`
    /// show it).
    X509Serial(String),
    /// Every X.509-SVID of this SPIFFE ID issued before the record.
    SpiffeId(SpiffeId),
    /// Every X.509-SVID of this entry issued before the record.
    Entry(EntryId),
    /// Every X.509-SVID issued to this agent before the record (its workloads' and its own);
    /// made together with a ban of the agent.
    Agent(SpiffeId),
    /// One JWT-SVID, by its `jti`.
    JwtId(String),
}

/// Why a [`RevocationTarget`] or a [`Revocation`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RevocationError {
    /// The target's kind is not one of `x509-serial`, `spiffe-id`, `entry`, `agent`, `jwt-id`.
    #[error("unknown revocation target kind {0:?}")]
    UnknownKind(String),
    /// A serial number that is not a positive decimal integer.
    #[error("serial number {0:?} is not a decimal number")]
    BadSerial(String),
    /// An empty or overlong `jti`.
    #[error("a JWT ID must be 1 to {MAX_JTI_LEN} bytes")]
    BadJwtId,
    /// The SPIFFE ID or entry ID does not parse.
    #[error("{0}")]
    BadId(String),
    /// A record without an owner or a reason.
    #[error("a revocation needs {0}")]
    Missing(&'static str),
    /// A text over [`MAX_TEXT_LEN`].
    #[error("{0} is longer than {MAX_TEXT_LEN} bytes")]
    TooLong(&'static str),
    /// A record that would be forgotten before it was made.
    #[error("a revocation cannot expire before it is made")]
    ExpiresBeforeCreated,
}

impl RevocationTarget {
    /// The kind's stored name: `x509-serial`, `spiffe-id`, `entry`, `agent` or `jwt-id`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::X509Serial(_) => "x509-serial",
            Self::SpiffeId(_) => "spiffe-id",
            Self::Entry(_) => "entry",
            Self::Agent(_) => "agent",
            Self::JwtId(_) => "jwt-id",
        }
    }

    /// The target's value: the serial, SPIFFE ID, entry ID, agent ID or `jti`.
    pub fn value(&self) -> String {
        match self {
            Self::X509Serial(serial) => serial.clone(),
            Self::SpiffeId(id) | Self::Agent(id) => id.to_string(),
            Self::Entry(id) => id.to_string(),
            Self::JwtId(jti) => jti.clone(),
        }
    }

    /// Builds a target from its kind and value, as stored and as sent on the wire.
    pub fn parse(kind: &str, value: &str) -> Result<Self, RevocationError> {
        match kind {
            "x509-serial" => Ok(Self::X509Serial(normalize_serial(value)?)),
            "spiffe-id" => Ok(Self::SpiffeId(parse_id(value)?)),
            "entry" => EntryId::new(value)
                .map(Self::Entry)
                .map_err(|e| RevocationError::BadId(e.to_string())),
            "agent" => Ok(Self::Agent(parse_id(value)?)),
            "jwt-id" => {
                if value.is_empty() || value.len() > MAX_JTI_LEN {
                    return Err(RevocationError::BadJwtId);
                }
                Ok(Self::JwtId(value.to_owned()))
            }
            other => Err(RevocationError::UnknownKind(other.to_owned())),
        }
    }

    /// Whether the target reaches X.509-SVIDs (every kind but `jwt-id`).
    pub fn is_x509(&self) -> bool {
        !matches!(self, Self::JwtId(_))
    }

    /// Whether an X.509-SVID held by `holder` (an agent) for `entry_id`, carrying
    /// `spiffe_id` with the decimal `serial`, is covered.
    pub fn covers_x509(
        &self,
        serial: &str,
        spiffe_id: &SpiffeId,
        entry_id: &str,
        holder: &SpiffeId,
    ) -> bool {
        match self {
            Self::X509Serial(revoked) => revoked == serial,
            Self::SpiffeId(id) => id == spiffe_id,
            Self::Entry(id) => id.as_str() == entry_id,
            Self::Agent(agent) => agent == holder,
            Self::JwtId(_) => false,
        }
    }

    /// Whether a JWT-SVID with this `jti` is covered.
    pub fn covers_jwt(&self, jti: &str) -> bool {
        matches!(self, Self::JwtId(revoked) if revoked == jti)
    }
}

impl fmt::Display for RevocationTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.value())
    }
}

fn parse_id(value: &str) -> Result<SpiffeId, RevocationError> {
    SpiffeId::from_str(value).map_err(|e| RevocationError::BadId(e.to_string()))
}

/// A decimal serial without leading zeros; refuses anything else (signs, hex, spaces, more
/// than 20 bytes' worth of digits).
pub fn normalize_serial(value: &str) -> Result<String, RevocationError> {
    let bad = || RevocationError::BadSerial(value.chars().take(64).collect());
    if value.is_empty() || value.len() > 64 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let trimmed = value.trim_start_matches('0');
    if trimmed.is_empty() {
        return Err(bad());
    }
    Ok(trimmed.to_owned())
}

/// The big-endian magnitude of a decimal serial, as a CRL lists it (no sign byte).
pub fn serial_bytes(decimal: &str) -> Result<Vec<u8>, RevocationError> {
    let normalized = normalize_serial(decimal)?;
    let mut bytes: Vec<u8> = Vec::new();
    for digit in normalized.bytes() {
        let mut carry = u32::from(digit - b'0');
        for byte in bytes.iter_mut().rev() {
            let value = u32::from(*byte) * 10 + carry;
            *byte = (value & 0xff) as u8;
            carry = value >> 8;
        }
        while carry > 0 {
            bytes.insert(0, (carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    Ok(bytes)
}

/// A revocation as stored: the target, the governance fields, and the store's numbering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The server-assigned ID.
    pub id: String,
    /// What it stops.
    pub target: RevocationTarget,
    /// Who answers for it.
    pub owner: String,
    /// Why.
    pub reason: String,
    /// A ticket reference, optional (empty).
    pub ticket: String,
    /// When it was made; what a scope target covers was issued up to here.
    pub created_at: SystemTime,
    /// The admin caller who made it.
    pub created_by: String,
    /// When every credential it can cover has expired: the record may be dropped then.
    pub expires_at: SystemTime,
    /// Its place in the order records were made (from 1); 0 until stored.
    pub sequence: i64,
}

impl Revocation {
    /// Checks the governance fields and the expiry against the creation time.
    pub fn validate(&self) -> Result<(), RevocationError> {
        if self.owner.trim().is_empty() {
            return Err(RevocationError::Missing("an owner"));
        }
        if self.reason.trim().is_empty() {
            return Err(RevocationError::Missing("a reason"));
        }
        for (name, text) in [
            ("the owner", &self.owner),
            ("the reason", &self.reason),
            ("the ticket", &self.ticket),
        ] {
            if text.len() > MAX_TEXT_LEN {
                return Err(RevocationError::TooLong(name));
            }
        }
        if self.expires_at < self.created_at {
            return Err(RevocationError::ExpiresBeforeCreated);
        }
        Ok(())
    }

    /// Whether the record is still needed at `now`.
    pub fn is_live(&self, now: SystemTime) -> bool {
        now < self.expires_at
    }

    /// Whether an X.509-SVID whose `notBefore` is `not_before` was issued by the time the
    /// revocation was made. Issuers backdate `notBefore` by [`crate::x509::BACKDATE`] (Lanyard
    /// and SPIRE alike), so the issue time is `not_before` plus that; one in the revocation's
    /// own second counts as issued by then, since revoking too much is the safe side.
    pub fn predates(&self, not_before: SystemTime) -> bool {
        not_before
            .checked_add(crate::x509::BACKDATE)
            .is_some_and(|issued| issued <= self.created_at)
    }
}

/// One serial a revocation puts on the CRLs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RevokedSerial {
    /// The decimal serial.
    pub serial: String,
    /// The authority (X.509 CA subject key ID in hex) that issued it, whose CRL lists it;
    /// empty when unknown: every authority's CRL lists it then.
    pub authority_id: String,
    /// When it was revoked.
    pub revoked_at: SystemTime,
}

impl RevokedSerial {
    /// Whether the CRL of the authority `authority_id` lists this serial.
    pub fn listed_by(&self, authority_id: &str) -> bool {
        self.authority_id.is_empty() || self.authority_id == authority_id
    }
}

/// An agent's word that it has applied every revocation up to `sequence`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationAck {
    /// The agent.
    pub agent_id: SpiffeId,
    /// The highest sequence it has applied.
    pub sequence: i64,
    /// When it said so.
    pub acked_at: SystemTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_round_trip_through_kind_and_value() {
        let targets = [
            RevocationTarget::X509Serial("1234567890123456789012345678901234567".into()),
            RevocationTarget::SpiffeId("spiffe://example.org/web".parse().unwrap()),
            RevocationTarget::Entry(EntryId::new("0d5a1c9e-7a10-4c2e-9a57-2f7f8d1c0a11").unwrap()),
            RevocationTarget::Agent(
                "spiffe://example.org/spire/agent/join_token/x"
                    .parse()
                    .unwrap(),
            ),
            RevocationTarget::JwtId("c2b6f1".into()),
        ];
        for target in targets {
            let parsed = RevocationTarget::parse(target.kind(), &target.value()).unwrap();
            assert_eq!(parsed, target);
        }
    }

    #[test]
    fn bad_targets_are_refused_with_their_reason() {
        for (kind, value, want) in [
            ("x509-serial", "", "is not a decimal number"),
            ("x509-serial", "0x1f", "is not a decimal number"),
            ("x509-serial", "-5", "is not a decimal number"),
            ("x509-serial", "000", "is not a decimal number"),
            ("spiffe-id", "spiffe://Example.org/x", "trust domain"),
            ("agent", "not an id", "scheme"),
            ("jwt-id", "", "1 to 256 bytes"),
            ("certificate", "1", "unknown revocation target kind"),
        ] {
            let error = RevocationTarget::parse(kind, value)
                .unwrap_err()
                .to_string();
            assert!(error.contains(want), "{kind} {value:?}: {error}");
        }
        assert_eq!(
            RevocationTarget::parse("x509-serial", "00042").unwrap(),
            RevocationTarget::X509Serial("42".into())
        );
    }

    #[test]
    fn serials_convert_to_the_bytes_a_crl_lists() {
        assert_eq!(serial_bytes("1").unwrap(), [1]);
        assert_eq!(serial_bytes("255").unwrap(), [0xff]);
        assert_eq!(serial_bytes("256").unwrap(), [1, 0]);
        assert_eq!(
            serial_bytes("340282366920938463463374607431768211455").unwrap(),
            [0xff; 16]
        );
        // Back through the certificate code's own conversion.
        for bytes in [
            vec![0x7f, 0, 3],
            vec![0x12; 16],
            vec![0xff, 0xee, 0x01, 0x00],
        ] {
            let decimal = crate::x509::be_bytes_to_decimal(&bytes);
            assert_eq!(serial_bytes(&decimal).unwrap(), bytes, "{decimal}");
        }
    }

    #[test]
    fn coverage_follows_the_target() {
        let web: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let db: SpiffeId = "spiffe://example.org/db".parse().unwrap();
        let agent: SpiffeId = "spiffe://example.org/spire/agent/a".parse().unwrap();
        let other_agent: SpiffeId = "spiffe://example.org/spire/agent/b".parse().unwrap();
        let entry = EntryId::new("e1").unwrap();
        let covers = |target: &RevocationTarget, serial, id, entry_id, holder| {
            target.covers_x509(serial, id, entry_id, holder)
        };
        let by_serial = RevocationTarget::X509Serial("7".into());
        assert!(covers(&by_serial, "7", &web, "e1", &agent));
        assert!(!covers(&by_serial, "8", &web, "e1", &agent));
        let by_id = RevocationTarget::SpiffeId(web.clone());
        assert!(covers(&by_id, "1", &web, "e9", &other_agent));
        assert!(!covers(&by_id, "1", &db, "e1", &agent));
        let by_entry = RevocationTarget::Entry(entry);
        assert!(covers(&by_entry, "1", &db, "e1", &agent));
        assert!(!covers(&by_entry, "1", &web, "e2", &agent));
        let by_agent = RevocationTarget::Agent(agent.clone());
        assert!(covers(&by_agent, "1", &db, "e2", &agent));
        assert!(!covers(&by_agent, "1", &db, "e2", &other_agent));
        let by_jti = RevocationTarget::JwtId("j1".into());
        assert!(!covers(&by_jti, "1", &web, "e1", &agent));
        assert!(by_jti.covers_jwt("j1") && !by_jti.covers_jwt("j2"));
        assert!(!by_serial.covers_jwt("7"));
    }

    #[test]
    fn records_need_an_owner_a_reason_and_a_sane_expiry() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let record = Revocation {
            id: "r1".into(),
            target: RevocationTarget::JwtId("j".into()),
            owner: "team-a".into(),
            reason: "key leaked".into(),
            ticket: String::new(),
            created_at: now,
            created_by: "admin".into(),
            expires_at: now + std::time::Duration::from_secs(3600),
            sequence: 0,
        };
        record.validate().unwrap();
        assert!(record.is_live(now) && !record.is_live(record.expires_at));
        // Issue time is notBefore plus the backdate; the revocation's own second counts.
        let backdate = crate::x509::BACKDATE;
        assert!(record.predates(now - backdate));
        assert!(record.predates(now - backdate - std::time::Duration::from_secs(1)));
        assert!(!record.predates(now - backdate + std::time::Duration::from_secs(1)));
        assert!(!record.predates(now));
        let mut bad = record.clone();
        bad.owner = " ".into();
        assert_eq!(bad.validate(), Err(RevocationError::Missing("an owner")));
        let mut bad = record.clone();
        bad.reason.clear();
        assert_eq!(bad.validate(), Err(RevocationError::Missing("a reason")));
        let mut bad = record.clone();
        bad.ticket = "x".repeat(MAX_TEXT_LEN + 1);
        assert_eq!(bad.validate(), Err(RevocationError::TooLong("the ticket")));
        let mut bad = record;
        bad.expires_at = now - std::time::Duration::from_secs(1);
        assert_eq!(bad.validate(), Err(RevocationError::ExpiresBeforeCreated));
    }
}
