//! SPIFFE IDs and trust domain names, parsed strictly as the SPIFFE-ID standard and go-spiffe
//! define them, plus SPIRE's identity conventions for servers and agents.
//!
//! Parsing is strict: the scheme must be exactly `spiffe`, the trust domain lowercase. This is
//! what go-spiffe accepts; IDs that Go clients would reject are never issued by Lanyard.

use std::fmt;
use std::str::FromStr;

/// The only accepted scheme prefix, case-sensitive.
pub const SCHEME_PREFIX: &str = "spiffe://";

/// The longest trust domain name accepted, in bytes (the RFC 3986 host limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The longest SPIFFE ID accepted or generated, in bytes, scheme included.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a string is not a valid SPIFFE ID or trust domain name.
///
/// The messages match go-spiffe's, so operators see the same text whichever side rejects an ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The input is empty.
    #[error("cannot be empty")]
    Empty,
    /// The input does not start with `spiffe://`.
    #[error("scheme is missing or invalid")]
    WrongScheme,
    /// The trust domain part is empty.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// The trust domain holds something other than `a-z`, `0-9`, `.`, `-`, `_`.
    #[error(
        "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
    )]
    BadTrustDomainChar,
    /// A path segment holds something other than `a-z`, `A-Z`, `0-9`, `.`, `-`, `_`.
    #[error(
        "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
    )]
    BadPathSegmentChar,
    /// The path has an empty segment (`//`).
    #[error("path cannot contain empty segments")]
    EmptySegment,
    /// The path has a `.` or `..` segment.
    #[error("path cannot contain dot segments")]
    DotSegment,
    /// The path ends with `/`.
    #[error("path cannot have a trailing slash")]
    TrailingSlash,
    /// A path given on its own does not start with `/`.
    #[error("path must have a leading slash")]
    NoLeadingSlash,
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain is {len} bytes long; the limit is {MAX_TRUST_DOMAIN_LEN}")]
    TrustDomainTooLong {
        /// Length of the rejected trust domain, in bytes.
        len: usize,
    },
    /// The whole ID is longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is {len} bytes long; the limit is {MAX_SPIFFE_ID_LEN}")]
    TooLong {
        /// Length of the rejected ID, in bytes.
        len: usize,
    },
}

/// A trust domain name such as `example.org`: lowercase, at most 255 bytes, no scheme.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain {
    name: String,
}

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`).
    ///
    /// Use [`FromStr`] to also accept the trust domain's SPIFFE ID or any SPIFFE ID in it, as
    /// go-spiffe's `TrustDomainFromString` does.
    pub fn new(name: &str) -> Result<Self, IdError> {
        validate_trust_domain(name)?;
        Ok(Self {
            name: name.to_owned(),
        })
    }

    /// The bare name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`, used as the key of bundle maps.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            td_len: self.name.len(),
            id: format!("{SCHEME_PREFIX}{}", self.name).into(),
        }
    }

    /// SPIRE's server ID in this trust domain: `spiffe://<name>/spire/server`.
    pub fn server_id(&self) -> SpiffeId {
        SpiffeId {
            td_len: self.name.len(),
            id: format!("{SCHEME_PREFIX}{}/spire/server", self.name).into(),
        }
    }

    /// An agent ID following SPIRE's convention `spiffe://<name>/spire/agent/<attestor>/<parts…>`.
    ///
    /// Each element of `parts` must be a valid path segment.
    pub fn agent_id(&self, attestor: &str, parts: &[&str]) -> Result<SpiffeId, IdError> {
        let mut segments = Vec::with_capacity(parts.len() + 3);
        segments.extend_from_slice(&["spire", "agent", attestor]);
        segments.extend_from_slice(parts);
        SpiffeId::from_segments(self, &segments)
    }

    /// The agent ID SPIRE gives an agent attested with a join token.
    pub fn join_token_agent_id(&self, token: &str) -> Result<SpiffeId, IdError> {
        self.agent_id("join_token", &[token])
    }

    /// The agent ID SPIRE gives an agent attested with x509pop: the lowercase hex SHA-1
    /// fingerprint of its leaf certificate.
    pub fn x509pop_agent_id(&self, leaf_sha1_hex: &str) -> Result<SpiffeId, IdError> {
        self.agent_id("x509pop", &[leaf_sha1_hex])
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;

    /// Accepts `example.org`, `spiffe://example.org` or any SPIFFE ID and keeps its trust domain.
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.contains(":/") {
            return Ok(s.parse::<SpiffeId>()?.trust_domain());
        }
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.name)
    }
}

/// A SPIFFE ID such as `spiffe://example.org/ns/prod/sa/web`, kept in canonical form.
///
/// Equality is byte-for-byte, which is correct because parsing accepts only the canonical
/// (lowercase scheme and trust domain) form.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// Shared, not copied, when an ID is cloned: the server holds one per entry in several
    /// indexes.
    id: std::sync::Arc<str>,
    td_len: usize,
}

impl SpiffeId {
    /// Builds `spiffe://<td><path>`. The path must be empty or start with `/`.
    pub fn from_path(trust_domain: &TrustDomain, path: &str) -> Result<Self, IdError> {
        if !path.is_empty() && !path.starts_with('/') {
            return Err(IdError::NoLeadingSlash);
        }
        validate_path(path)?;
        let id = format!("{SCHEME_PREFIX}{}{path}", trust_domain.name);
        check_len(&id)?;
        Ok(Self {
            td_len: trust_domain.name.len(),
            id: id.into(),
        })
    }

    /// Builds `spiffe://<td>/<seg1>/<seg2>…` from path segments, each validated on its own.
    pub fn from_segments(trust_domain: &TrustDomain, segments: &[&str]) -> Result<Self, IdError> {
        let mut id = format!("{SCHEME_PREFIX}{}", trust_domain.name);
        for segment in segments {
            validate_segment(segment)?;
            id.push('/');
            id.push_str(segment);
        }
        check_len(&id)?;
        Ok(Self {
            td_len: trust_domain.name.len(),
            id: id.into(),
        })
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain name, borrowed.
    pub fn trust_domain_name(&self) -> &str {
        &self.id[SCHEME_PREFIX.len()..SCHEME_PREFIX.len() + self.td_len]
    }

    /// The trust domain, owned.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain {
            name: self.trust_domain_name().to_owned(),
        }
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[SCHEME_PREFIX.len() + self.td_len..]
    }

    /// Whether this is a trust domain's own ID (no path), as CA certificates carry.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path().is_empty()
    }

    /// Whether this ID belongs to `trust_domain`.
    pub fn is_member_of(&self, trust_domain: &TrustDomain) -> bool {
        self.trust_domain_name() == trust_domain.name
    }

    /// Whether this ID is SPIRE's server ID for its trust domain.
    pub fn is_server_id(&self) -> bool {
        self.path() == "/spire/server"
    }

    /// Whether this ID is reserved for the infrastructure: SPIRE's `/spire` namespace, which
    /// holds the server's ID and every agent's. No registration entry may carry one, and no
    /// workload is ever issued one.
    pub fn is_reserved(&self) -> bool {
        let path = self.path();
        path == "/spire" || path.starts_with("/spire/")
    }

    /// Whether this ID follows SPIRE's agent ID convention (`/spire/agent/…`).
    pub fn is_agent_id(&self) -> bool {
        self.path().starts_with("/spire/agent/")
    }

    /// A new ID with `segment` appended to this one's path.
    pub fn join(&self, segment: &str) -> Result<Self, IdError> {
        validate_segment(segment)?;
        let id = format!("{}/{segment}", self.id);
        check_len(&id)?;
        Ok(Self {
            td_len: self.td_len,
            id: id.into(),
        })
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        check_len(s)?;
        let rest = s.strip_prefix(SCHEME_PREFIX).ok_or(IdError::WrongScheme)?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        let (trust_domain, path) = rest.split_at(td_len);
        validate_trust_domain(trust_domain)?;
        validate_path(path)?;
        Ok(Self {
            id: s.into(),
            td_len,
        })
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = IdError;

    fn try_from(s: &str) -> Result<Self, IdError> {
        s.parse()
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdError;

    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.id
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn check_len(id: &str) -> Result<(), IdError> {
    if id.len() > MAX_SPIFFE_ID_LEN {
        return Err(IdError::TooLong { len: id.len() });
    }
    Ok(())
}

fn is_trust_domain_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

fn validate_trust_domain(name: &str) -> Result<(), IdError> {
    // Character errors come first so that e.g. `spiffe://%41/` reports the bad character, as
    // go-spiffe does, rather than an empty or overlong name.
    if !name.bytes().all(is_trust_domain_char) {
        return Err(IdError::BadTrustDomainChar);
    }
    if name.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong { len: name.len() });
    }
    Ok(())
}

/// Validates a path that is empty or starts with `/`.
fn validate_path(path: &str) -> Result<(), IdError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Ok(());
    };
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() {
            // An empty last segment is a trailing slash; any other is `//`.
            return Err(if segments.peek().is_none() {
                IdError::TrailingSlash
            } else {
                IdError::EmptySegment
            });
        }
        validate_segment(segment)?;
    }
    Ok(())
}

fn validate_segment(segment: &str) -> Result<(), IdError> {
    if segment.is_empty() {
        return Err(IdError::EmptySegment);
    }
    if segment == "." || segment == ".." {
        return Err(IdError::DotSegment);
    }
    if !segment.bytes().all(is_path_char) {
        return Err(IdError::BadPathSegmentChar);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    #[test]
    fn parts_are_borrowed_from_the_id() {
        let id: SpiffeId = "spiffe://example.org/ns/prod".parse().unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.trust_domain(), td("example.org"));
        assert_eq!(id.path(), "/ns/prod");
        assert!(!id.is_trust_domain_id());
        assert!(id.is_member_of(&td("example.org")));
        assert!(!id.is_member_of(&td("example.com")));
    }

    #[test]
    fn spire_conventions() {
        let td = td("example.org");
        assert_eq!(td.id().as_str(), "spiffe://example.org");
        assert!(td.id().is_trust_domain_id());
        assert_eq!(td.server_id().as_str(), "spiffe://example.org/spire/server");
        assert!(td.server_id().is_server_id());
        let agent = td.join_token_agent_id("abc-123").unwrap();
        assert_eq!(
            agent.as_str(),
            "spiffe://example.org/spire/agent/join_token/abc-123"
        );
        assert!(agent.is_agent_id());
        assert!(!agent.is_server_id());
        assert!(agent.is_reserved() && td.server_id().is_reserved());
        for id in ["spiffe://example.org/spire", "spiffe://example.org/spire/x"] {
            assert!(id.parse::<SpiffeId>().unwrap().is_reserved(), "{id}");
        }
        for id in [
            "spiffe://example.org/spirex",
            "spiffe://example.org/web/spire/server",
        ] {
            assert!(!id.parse::<SpiffeId>().unwrap().is_reserved(), "{id}");
        }
        assert_eq!(
            td.x509pop_agent_id("0a1b").unwrap().as_str(),
            "spiffe://example.org/spire/agent/x509pop/0a1b"
        );
        assert_eq!(
            td.join_token_agent_id("bad/token"),
            Err(IdError::BadPathSegmentChar)
        );
    }

    #[test]
    fn join_appends_a_validated_segment() {
        let id = td("example.org").id().join("user").unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/user");
        assert_eq!(id.join(".."), Err(IdError::DotSegment));
        assert_eq!(id.join("a b"), Err(IdError::BadPathSegmentChar));
    }

    #[test]
    fn serde_uses_the_string_form() {
        let id: SpiffeId = "spiffe://example.org/a".parse().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://example.org/a\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        let err = serde_json::from_str::<SpiffeId>("\"BAD\"").unwrap_err();
        assert!(err.to_string().contains("scheme is missing or invalid"));
    }
}
