//! Registration entries: which SPIFFE ID is issued to which workloads (by selectors) on which
//! nodes (by parent ID), with SPIRE's fields plus Lanyard's `owner`, `reason` and `ticket`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use crate::id::{SpiffeId, TrustDomain};
use crate::selector::SelectorSet;

/// The longest entry ID accepted, in bytes (SPIRE's limit).
pub const MAX_ENTRY_ID_LEN: usize = 255;
/// The longest hint accepted, in bytes (the Workload API's recommended limit).
pub const MAX_HINT_LEN: usize = 1024;
/// The longest SVID TTL an entry may ask for. Policy may cap it far lower.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// The longest DNS name accepted.
pub const MAX_DNS_NAME_LEN: usize = 253;
/// The most selectors one entry may have.
pub const MAX_SELECTORS_PER_ENTRY: usize = 128;
/// The most DNS names one entry may have.
pub const MAX_DNS_NAMES_PER_ENTRY: usize = 128;
/// The longest `owner` or `ticket` accepted, in bytes.
pub const MAX_OWNER_LEN: usize = 256;
/// The longest `reason` accepted, in bytes.
pub const MAX_REASON_LEN: usize = 1024;
/// The latest expiry accepted, in Unix seconds: 9999-12-31T23:59:59Z. Certificates hold times
/// with four-digit years (RFC 5280 GeneralizedTime) and an SVID ends no later than its entry,
/// so a later expiry could never be honoured, and tools that print it as a date fail on it.
pub const MAX_EXPIRES_AT_UNIX: u64 = 253_402_300_799;
/// [`MAX_EXPIRES_AT_UNIX`] as people read it.
pub const MAX_EXPIRES_AT_TEXT: &str = "9999-12-31T23:59:59Z";

/// Why an entry or entry ID is invalid. Each message names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The entry ID is empty.
    #[error("entry ID cannot be empty")]
    EmptyId,
    /// The entry ID is longer than [`MAX_ENTRY_ID_LEN`].
    #[error("entry ID is longer than {MAX_ENTRY_ID_LEN} bytes")]
    IdTooLong,
    /// The entry ID has characters outside `A-Z a-z 0-9 . - _`.
    #[error("entry ID {0:?} may contain only letters, digits, '.', '-' and '_'")]
    BadIdChar(String),
    /// The entry has no selectors.
    #[error("selectors cannot be empty")]
    NoSelectors,
    /// The SPIFFE ID is not in the server's trust domain.
    #[error("spiffe_id {id} is not in trust domain {trust_domain}")]
    ForeignSpiffeId {
        /// The offending ID.
        id: SpiffeId,
        /// The server's trust domain.
        trust_domain: TrustDomain,
    },
    /// The SPIFFE ID has no path.
    #[error("spiffe_id {0} must have a path; a trust domain ID cannot be issued to a workload")]
    RootSpiffeId(SpiffeId),
    /// The SPIFFE ID is reserved for the server or an agent.
    #[error(
        "spiffe_id {0} is reserved: IDs under /spire/ belong to the server and its agents and \
         are never issued to workloads"
    )]
    ReservedSpiffeId(SpiffeId),
    /// The parent ID is not in the server's trust domain.
    #[error("parent_id {id} is not in trust domain {trust_domain}")]
    ForeignParentId {
        /// The offending ID.
        id: SpiffeId,
        /// The server's trust domain.
        trust_domain: TrustDomain,
    },
    /// An SVID TTL is zero or too long.
    #[error("{field} must be between 1s and {max}s, got {got}s", max = MAX_SVID_TTL.as_secs())]
    BadTtl {
        /// `x509_svid_ttl` or `jwt_svid_ttl`.
        field: &'static str,
        /// The rejected value, in seconds.
        got: u64,
    },
    /// A DNS name is not a valid hostname.
    #[error("dns name {name:?} is invalid: {why}")]
    BadDnsName {
        /// The offending name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Too many selectors or DNS names.
    #[error("an entry may have at most {max} {what}; this one has {got}")]
    TooMany {
        /// "selectors" or "DNS names".
        what: &'static str,
        /// The limit.
        max: usize,
        /// How many it has.
        got: usize,
    },
    /// The hint is longer than [`MAX_HINT_LEN`].
    #[error("hint is longer than {MAX_HINT_LEN} bytes")]
    HintTooLong,
    /// `store_svid` is set but the selectors have different types.
    #[error("selector types must all be the same when store_svid is set")]
    MixedStoreSvidSelectors,
    /// An expiry is later than [`MAX_EXPIRES_AT_UNIX`].
    #[error(
        "expires_at {got} is after {MAX_EXPIRES_AT_TEXT} ({MAX_EXPIRES_AT_UNIX}), the last time a certificate can hold"
    )]
    ExpiryOutOfRange {
        /// The rejected value, in Unix seconds.
        got: u64,
    },
    /// A free-text governance field is too long or holds control characters.
    #[error("{field} is invalid: {why}")]
    BadText {
        /// `owner`, `reason`, `ticket` or `hint`.
        field: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// A registration entry's identifier: SPIRE's charset, at most 255 bytes.
///
/// Shared, not copied, when cloned: the server keys several indexes by it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(std::sync::Arc<str>);

impl EntryId {
    /// Validates an entry ID.
    pub fn new(id: &str) -> Result<Self, EntryError> {
        if id.is_empty() {
            return Err(EntryError::EmptyId);
        }
        if id.len() > MAX_ENTRY_ID_LEN {
            return Err(EntryError::IdTooLong);
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(EntryError::BadIdChar(id.to_owned()));
        }
        Ok(Self(id.into()))
    }

    /// A fresh random ID in UUIDv4 form, as SPIRE generates them.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        // The system RNG only fails when the OS has no entropy source at all; fall back to a
        // zero seed would be unsafe for uniqueness, so treat that as unrecoverable.
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .expect("the operating system's random number generator is unavailable");
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self(
            format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            )
            .into(),
        )
    }

    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for EntryId {
    type Err = EntryError;

    fn from_str(s: &str) -> Result<Self, EntryError> {
        Self::new(s)
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryId({})", self.0)
    }
}

impl serde::Serialize for EntryId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for EntryId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A registration entry.
///
/// Fields are public: an entry is plain data, checked as a whole by [`RegistrationEntry::validate`]
/// at the points where it enters the system (API, CLI, declared files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationEntry {
    /// Unique identifier.
    pub id: EntryId,
    /// The identity issued to matching workloads.
    pub spiffe_id: SpiffeId,
    /// The agent (or node alias, or parent entry) under which workloads must run.
    pub parent_id: SpiffeId,
    /// Selectors a workload (or, for alias entries, an agent) must all have.
    pub selectors: SelectorSet,
    /// X.509-SVID lifetime; `None` uses the server default.
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime; `None` uses the server default.
    pub jwt_svid_ttl: Option<Duration>,
    /// Foreign trust domains whose bundles matching workloads receive.
    pub federates_with: BTreeSet<TrustDomain>,
    /// SVIDs for this entry may call the admin API.
    pub admin: bool,
    /// SVIDs for this entry belong to a downstream server.
    pub downstream: bool,
    /// After this instant the entry authorizes nothing.
    pub expires_at: Option<SystemTime>,
    /// DNS SANs put in the X.509-SVID; the first is also the subject CN.
    pub dns_names: Vec<String>,
    /// Bumped on every update; agents re-mint when it changes.
    pub revision_number: i64,
    /// The SVID goes to an agent-side store rather than to workloads.
    pub store_svid: bool,
    /// Free text returned with the SVID on the Workload API.
    pub hint: String,
    /// When the entry was created.
    pub created_at: SystemTime,
    /// Who answers for this identity (Lanyard governance).
    pub owner: Option<String>,
    /// Why this identity exists (Lanyard governance).
    pub reason: Option<String>,
    /// A change or ticket reference (Lanyard governance).
    pub ticket: Option<String>,
    /// What created the entry: a declared entries file's label, `grant` for a just-in-time
    /// grant (Lanyard governance). `lanyard apply --prune` only deletes its own label's.
    pub source: Option<String>,
}

impl RegistrationEntry {
    /// A new entry with the required fields and every optional one at its default.
    pub fn new(
        id: EntryId,
        spiffe_id: SpiffeId,
        parent_id: SpiffeId,
        selectors: SelectorSet,
        created_at: SystemTime,
    ) -> Self {
        Self {
            id,
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            federates_with: BTreeSet::new(),
            admin: false,
            downstream: false,
            expires_at: None,
            dns_names: Vec::new(),
            revision_number: 0,
            store_svid: false,
            hint: String::new(),
            created_at,
            owner: None,
            reason: None,
            ticket: None,
            source: None,
        }
    }

    /// Checks the entry as a whole for a server of `trust_domain`.
    ///
    /// The checks are structural; whether the entry is *allowed* (TTL caps, required owner) is
    /// a policy question answered elsewhere.
    pub fn validate(&self, trust_domain: &TrustDomain) -> Result<(), EntryError> {
        if self.selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        if self.selectors.len() > MAX_SELECTORS_PER_ENTRY {
            return Err(EntryError::TooMany {
                what: "selectors",
                max: MAX_SELECTORS_PER_ENTRY,
                got: self.selectors.len(),
            });
        }
        if self.dns_names.len() > MAX_DNS_NAMES_PER_ENTRY {
            return Err(EntryError::TooMany {
                what: "DNS names",
                max: MAX_DNS_NAMES_PER_ENTRY,
                got: self.dns_names.len(),
            });
        }
        if !self.spiffe_id.is_member_of(trust_domain) {
            return Err(EntryError::ForeignSpiffeId {
                id: self.spiffe_id.clone(),
                trust_domain: trust_domain.clone(),
            });
        }
        if self.spiffe_id.is_trust_domain_id() {
            return Err(EntryError::RootSpiffeId(self.spiffe_id.clone()));
        }
        if self.spiffe_id.is_reserved() {
            return Err(EntryError::ReservedSpiffeId(self.spiffe_id.clone()));
        }
        if !self.parent_id.is_member_of(trust_domain) {
            return Err(EntryError::ForeignParentId {
                id: self.parent_id.clone(),
                trust_domain: trust_domain.clone(),
            });
        }
        if let Some(expires_at) = self.expires_at {
            validate_expiry(expires_at)?;
        }
        check_ttl("x509_svid_ttl", self.x509_svid_ttl)?;
        check_ttl("jwt_svid_ttl", self.jwt_svid_ttl)?;
        for name in &self.dns_names {
            validate_dns_name(name)?;
        }
        if self.hint.len() > MAX_HINT_LEN {
            return Err(EntryError::HintTooLong);
        }
        check_text("hint", Some(&self.hint), MAX_HINT_LEN)?;
        if self.store_svid {
            let mut kinds = self.selectors.iter().map(|s| s.kind());
            let first = kinds.next();
            if kinds.any(|k| Some(k) != first) {
                return Err(EntryError::MixedStoreSvidSelectors);
            }
        }
        check_text("owner", self.owner.as_deref(), MAX_OWNER_LEN)?;
        check_text("reason", self.reason.as_deref(), MAX_REASON_LEN)?;
        check_text("ticket", self.ticket.as_deref(), MAX_OWNER_LEN)?;
        check_text("source", self.source.as_deref(), MAX_OWNER_LEN)?;
        Ok(())
    }

    /// Whether the entry has expired at `now` (an expired entry authorizes nothing).
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether this entry and `other` register the same thing: SPIRE's duplicate rule is the
    /// same [`SimilarityKey`].
    pub fn is_similar(&self, other: &RegistrationEntry) -> bool {
        self.similarity_key() == other.similarity_key()
    }

    /// What makes two entries the same registration: its SPIFFE ID, parent ID and selectors.
    pub fn similarity_key(&self) -> SimilarityKey {
        SimilarityKey::new(
            self.spiffe_id.clone(),
            self.parent_id.clone(),
            self.selectors.clone(),
        )
    }
}

/// SPIRE's similarity key: entries with the same SPIFFE ID, parent ID and selector set are
/// the same registration, and a server refuses the second as a duplicate. Ordered, so that
/// tools can keep entries by it (`lanyard plan` matches declared entries to stored ones by it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SimilarityKey {
    /// The identity.
    pub spiffe_id: SpiffeId,
    /// The agent (or node alias, or parent entry) under which workloads must run.
    pub parent_id: SpiffeId,
    /// The selectors, as a set.
    pub selectors: SelectorSet,
}

impl SimilarityKey {
    /// The key of an entry with these fields.
    pub fn new(spiffe_id: SpiffeId, parent_id: SpiffeId, selectors: SelectorSet) -> Self {
        Self {
            spiffe_id,
            parent_id,
            selectors,
        }
    }
}

/// Checks that an expiry (of an entry, an exception, a grant) is no later than
/// [`MAX_EXPIRES_AT_UNIX`]. Times before the epoch pass: they are merely in the past.
pub fn validate_expiry(expires_at: SystemTime) -> Result<(), EntryError> {
    match expires_at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since_epoch) if since_epoch.as_secs() > MAX_EXPIRES_AT_UNIX => {
            Err(EntryError::ExpiryOutOfRange {
                got: since_epoch.as_secs(),
            })
        }
        _ => Ok(()),
    }
}

fn check_ttl(field: &'static str, ttl: Option<Duration>) -> Result<(), EntryError> {
    match ttl {
        Some(ttl) if ttl.as_secs() == 0 || ttl > MAX_SVID_TTL => Err(EntryError::BadTtl {
            field,
            got: ttl.as_secs(),
        }),
        _ => Ok(()),
    }
}

fn check_text(field: &'static str, text: Option<&str>, max: usize) -> Result<(), EntryError> {
    let Some(text) = text else {
        return Ok(());
    };
    if text.len() > max {
        return Err(EntryError::BadText {
            field,
            why: "too long",
        });
    }
    if text.chars().any(char::is_control) {
        return Err(EntryError::BadText {
            field,
            why: "contains control characters",
        });
    }
    Ok(())
}

/// Checks a DNS name for an X.509 SAN: RFC 1123 labels, optionally a leading `*.` wildcard.
pub fn validate_dns_name(name: &str) -> Result<(), EntryError> {
    let bad = |why| EntryError::BadDnsName {
        name: name.to_owned(),
        why,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > MAX_DNS_NAME_LEN {
        return Err(bad("longer than 253 bytes"));
    }
    let rest = name.strip_prefix("*.").unwrap_or(name);
    if rest.is_empty() {
        return Err(bad("a wildcard needs a domain after it"));
    }
    if rest.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(bad("an IP address, not a DNS name"));
    }
    for label in rest.split('.') {
        if label.is_empty() {
            return Err(bad("empty label"));
        }
        if label.len() > 63 {
            return Err(bad("label longer than 63 bytes"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad(
                "labels may contain only letters, digits and '-' (a '*' only as the whole first label)",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("labels cannot start or end with '-'"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::Selector;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn entry() -> RegistrationEntry {
        RegistrationEntry::new(
            EntryId::new("e1").unwrap(),
            "spiffe://example.org/web".parse().unwrap(),
            "spiffe://example.org/spire/agent/join_token/t"
                .parse()
                .unwrap(),
            ["unix:uid:1000".parse::<Selector>().unwrap()]
                .into_iter()
                .collect(),
            SystemTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn similarity_is_spiffe_id_parent_and_selector_set_only() {
        let a = entry();
        let mut b = entry();
        b.id = EntryId::new("e2").unwrap();
        b.hint = "other".into();
        b.x509_svid_ttl = Some(Duration::from_secs(60));
        b.owner = Some("team".into());
        assert!(a.is_similar(&b), "ID, TTL, hint and metadata do not count");
        assert_eq!(a.similarity_key(), b.similarity_key());

        let mut other_selectors = entry();
        other_selectors.selectors = ["unix:uid:1000", "unix:gid:1000"]
            .into_iter()
            .map(|s| s.parse::<Selector>().unwrap())
            .collect();
        assert!(!a.is_similar(&other_selectors));
        let mut other_parent = entry();
        other_parent.parent_id = "spiffe://example.org/spire/server".parse().unwrap();
        assert!(!a.is_similar(&other_parent));
        let mut other_id = entry();
        other_id.spiffe_id = "spiffe://example.org/db".parse().unwrap();
        assert!(!a.is_similar(&other_id));
        // Ordered, so that a tool can keep entries by it.
        assert!(a.similarity_key() > other_id.similarity_key());
    }

    #[test]
    fn limits_and_ip_literals_are_refused_but_an_entry_may_be_its_own_parent() {
        let td = TrustDomain::new("example.org").unwrap();
        // SPIRE accepts it, and spire-controller-manager probes the server with one.
        let mut e = entry();
        e.parent_id = e.spiffe_id.clone();
        assert!(e.validate(&td).is_ok());

        let mut e = entry();
        e.selectors = (0..=MAX_SELECTORS_PER_ENTRY)
            .map(|i| format!("unix:uid:{i}").parse::<Selector>().unwrap())
            .collect();
        assert!(matches!(
            e.validate(&td),
            Err(EntryError::TooMany {
                what: "selectors",
                ..
            })
        ));
        e.selectors = e
            .selectors
            .iter()
            .take(MAX_SELECTORS_PER_ENTRY)
            .cloned()
            .collect();
        e.validate(&td).unwrap();

        let mut e = entry();
        e.dns_names = (0..=MAX_DNS_NAMES_PER_ENTRY)
            .map(|i| format!("h{i}.example.org"))
            .collect();
        assert!(matches!(
            e.validate(&td),
            Err(EntryError::TooMany {
                what: "DNS names",
                ..
            })
        ));

        for ip in ["10.0.0.1", "*.10.0.0.1", "::1", "192.168.1.1"] {
            assert!(validate_dns_name(ip).is_err(), "{ip}");
        }
        validate_dns_name("10.0.0.1.example.org").unwrap();
    }

    #[test]
    fn a_plain_entry_is_valid() {
        entry().validate(&td()).unwrap();
    }

    #[test]
    fn entry_ids_follow_spires_charset() {
        assert!(EntryId::new("abc-DEF_1.2").is_ok());
        assert_eq!(EntryId::new(""), Err(EntryError::EmptyId));
        assert_eq!(EntryId::new(&"e".repeat(256)), Err(EntryError::IdTooLong));
        assert!(EntryId::new(&"e".repeat(255)).is_ok());
        assert!(matches!(
            EntryId::new("éntry"),
            Err(EntryError::BadIdChar(_))
        ));
        assert!(matches!(EntryId::new("a/b"), Err(EntryError::BadIdChar(_))));
    }

    #[test]
    fn generated_ids_are_uuid_v4_and_distinct() {
        let a = EntryId::generate();
        let b = EntryId::generate();
        assert_ne!(a, b);
        let s = a.as_str();
        assert_eq!(s.len(), 36);
        assert_eq!(s.as_bytes()[14], b'4');
        assert!(matches!(s.as_bytes()[19], b'8' | b'9' | b'a' | b'b'));
        EntryId::new(s).unwrap();
    }

    #[test]
    fn each_rule_is_enforced() {
        let td = td();
        let mut e = entry();
        e.selectors = SelectorSet::new();
        assert_eq!(e.validate(&td), Err(EntryError::NoSelectors));

        let mut e = entry();
        e.spiffe_id = "spiffe://other.org/web".parse().unwrap();
        assert!(matches!(
            e.validate(&td),
            Err(EntryError::ForeignSpiffeId { .. })
        ));

        let mut e = entry();
        e.spiffe_id = td.id();
        assert!(matches!(e.validate(&td), Err(EntryError::RootSpiffeId(_))));

        let mut e = entry();
        e.spiffe_id = td.server_id();
        assert!(matches!(
            e.validate(&td),
            Err(EntryError::ReservedSpiffeId(_))
        ));

        let mut e = entry();
        e.parent_id = "spiffe://other.org/agent".parse().unwrap();
        assert!(matches!(
            e.validate(&td),
            Err(EntryError::ForeignParentId { .. })
        ));

        let mut e = entry();
        e.x509_svid_ttl = Some(Duration::ZERO);
        assert_eq!(
            e.validate(&td),
            Err(EntryError::BadTtl {
                field: "x509_svid_ttl",
                got: 0
            })
        );
        e.x509_svid_ttl = Some(MAX_SVID_TTL + Duration::from_secs(1));
        assert!(matches!(e.validate(&td), Err(EntryError::BadTtl { .. })));

        let mut e = entry();
        e.jwt_svid_ttl = Some(Duration::ZERO);
        assert!(matches!(
            e.validate(&td),
            Err(EntryError::BadTtl {
                field: "jwt_svid_ttl",
                ..
            })
        ));

        let mut e = entry();
        e.hint = "h".repeat(MAX_HINT_LEN + 1);
        assert_eq!(e.validate(&td), Err(EntryError::HintTooLong));
        e.hint = "h".repeat(MAX_HINT_LEN);
        e.validate(&td).unwrap();

        let mut e = entry();
        e.store_svid = true;
        e.selectors.insert("aws:secret:x".parse().unwrap());
        assert_eq!(e.validate(&td), Err(EntryError::MixedStoreSvidSelectors));

        let mut e = entry();
        e.owner = Some("team\nweb".into());
        assert!(matches!(
            e.validate(&td),
            Err(EntryError::BadText { field: "owner", .. })
        ));
        e.owner = Some("o".repeat(MAX_OWNER_LEN + 1));
        assert!(matches!(
            e.validate(&td),
            Err(EntryError::BadText { field: "owner", .. })
        ));
    }

    #[test]
    fn dns_names() {
        for ok in [
            "example.org",
            "a-b.example.org",
            "*.example.org",
            "localhost",
            "x1",
        ] {
            validate_dns_name(ok).unwrap();
        }
        for bad in [
            "",
            "*.",
            "a..b",
            "-a.org",
            "a-.org",
            "a_b.org",
            "a.*.org",
            "exa mple.org",
            "ünï.org",
        ] {
            assert!(validate_dns_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_dns_name(&format!("{}.org", "a".repeat(64))).is_err());
        let mut e = entry();
        e.dns_names = vec!["ok.org".into(), "bad_name".into()];
        assert!(matches!(
            e.validate(&td()),
            Err(EntryError::BadDnsName { .. })
        ));
    }

    #[test]
    fn expiry_and_similarity() {
        let mut e = entry();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        assert!(!e.is_expired(now));
        e.expires_at = Some(now);
        assert!(e.is_expired(now));
        assert!(!e.is_expired(now - Duration::from_secs(1)));

        let mut other = entry();
        other.id = EntryId::new("e2").unwrap();
        other.hint = "different".into();
        assert!(e.is_similar(&other));
        other.selectors.insert("unix:gid:1".parse().unwrap());
        assert!(!e.is_similar(&other));
    }

    #[test]
    fn expiries_end_at_the_last_second_a_certificate_can_hold() {
        let td = td();
        let at = |seconds: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
        let mut e = entry();
        // 9999-12-31T23:59:59Z
        e.expires_at = Some(at(253_402_300_799));
        assert_eq!(e.validate(&td), Ok(()));
        // 10000-01-01T00:00:00Z
        e.expires_at = Some(at(253_402_300_800));
        assert_eq!(
            e.validate(&td),
            Err(EntryError::ExpiryOutOfRange {
                got: 253_402_300_800
            })
        );
        let message = e.validate(&td).unwrap_err().to_string();
        assert!(message.contains("9999-12-31T23:59:59Z"), "{message}");
        e.expires_at = Some(at(i64::MAX as u64));
        assert!(matches!(
            e.validate(&td),
            Err(EntryError::ExpiryOutOfRange { .. })
        ));
        e.expires_at = Some(at(1));
        assert_eq!(e.validate(&td), Ok(()));
    }
}
