//! Conversions between SPIRE's `spire.api.types` messages and Lanyard's domain types, so that
//! protobuf stops at the edge of the server and the agent.
//!
//! Parsing (`*_from_proto`, and the `TryFrom` impls) checks structure only and never panics on
//! peer input; every [`ConvertError`] names the protobuf field at fault. Whether a parsed value
//! is *allowed* (trust domain membership, TTL caps, reserved IDs) is decided afterwards by the
//! domain types' own checks, such as [`RegistrationEntry::validate`].
//!
//! Encoding (`*_to_proto`, and the `From` impls) fills fields the way SPIRE v1.13 does: trust
//! domains as bare names (`example.org`), times as whole Unix seconds with 0 for "unset", and
//! an entry `id` that is present whatever the output mask says.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::agent::AttestedAgent;
use lanyard_core::bundle::{BundleError, JwtAuthority, TrustBundle, X509Authority};
use lanyard_core::entry::{EntryError, EntryId, RegistrationEntry, SimilarityKey};
use lanyard_core::federation::{
    BundleEndpointProfile, FederationError, FederationRelationship, RelationshipMask,
};
use lanyard_core::id::{IdError, SpiffeId, TrustDomain};
use lanyard_core::jwt::JwtSvid;
use lanyard_core::ledger::{EntryUsage, Issuance, IssuanceKind};
use lanyard_core::policy::Exception;
use lanyard_core::revocation::{Revocation, RevocationTarget, RevokedSerial};
use lanyard_core::selector::{Selector, SelectorError, SelectorSet};
use lanyard_core::x509::{X509Error, X509Svid};

use crate::lanyard::api::v1 as lanyard_v1;
use crate::spire::api::server::agent::v1::{count_agents_request, list_agents_request};
use crate::spire::api::server::entry::v1::{count_entries_request, list_entries_request};
use crate::spire::api::types;

/// Why a protobuf message could not be converted into a domain type.
///
/// Every message starts with or contains the protobuf field name, so it can be returned to a
/// CLI user as is (typically as an `InvalidArgument` status).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// A required message field is absent.
    #[error("missing {field}")]
    Missing {
        /// The protobuf field, e.g. `spiffe_id`.
        field: &'static str,
    },
    /// A list that must have at least one element is empty.
    #[error("{field} cannot be empty")]
    Empty {
        /// The protobuf field, e.g. `selectors`.
        field: &'static str,
    },
    /// A `SPIFFEID` message does not hold a valid SPIFFE ID.
    #[error("invalid {field}: {reason}")]
    InvalidSpiffeId {
        /// The protobuf field, e.g. `spiffe_id` or `parent_id`.
        field: &'static str,
        /// What is wrong with it.
        reason: IdError,
    },
    /// A trust domain string is neither a valid bare name nor a valid `spiffe://` ID.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidTrustDomain {
        /// The protobuf field, e.g. `federates_with` or `trust_domain`.
        field: &'static str,
        /// The rejected string.
        value: String,
        /// What is wrong with it.
        reason: IdError,
    },
    /// A selector has an empty or malformed type or value.
    #[error("invalid {field}: {reason}")]
    InvalidSelector {
        /// The protobuf field, e.g. `selectors`.
        field: &'static str,
        /// What is wrong with it.
        reason: SelectorError,
    },
    /// An entry ID does not follow SPIRE's charset or length limit.
    #[error("invalid {field}: {reason}")]
    InvalidEntryId {
        /// The protobuf field, e.g. `id`.
        field: &'static str,
        /// What is wrong with it.
        reason: EntryError,
    },
    /// A duration or a Unix time is negative.
    #[error("{field} cannot be negative, got {value}")]
    Negative {
        /// The protobuf field, e.g. `x509_svid_ttl` or `expires_at`.
        field: &'static str,
        /// The rejected value.
        value: i64,
    },
    /// A Unix time is too far in the future for this platform's clock type.
    #[error("{field} is out of range, got {value}")]
    OutOfRange {
        /// The protobuf field.
        field: &'static str,
        /// The rejected value.
        value: i64,
    },
    /// An element of a bundle's authority list is not a usable certificate or key.
    #[error("invalid {field}[{index}]: {reason}")]
    InvalidAuthority {
        /// `x509_authorities` or `jwt_authorities`.
        field: &'static str,
        /// Position of the element in the list.
        index: usize,
        /// What is wrong with it.
        reason: BundleError,
    },
    /// An X509-SVID's certificate chain is empty or its leaf is not an SVID.
    #[error("invalid {field}: {reason}")]
    InvalidX509Svid {
        /// The protobuf field, `cert_chain`.
        field: &'static str,
        /// What is wrong with it.
        reason: X509Error,
    },
    /// A federation relationship breaks one of SPIRE's rules (each names its field).
    #[error("{0}")]
    InvalidFederationRelationship(FederationError),
    /// The `trust_domain_bundle` of a federation relationship is not a valid bundle.
    #[error("failed to parse bundle: {0}")]
    InvalidTrustDomainBundle(Box<ConvertError>),
    /// A revocation's target or governance fields are invalid.
    #[error("{0}")]
    InvalidRevocation(lanyard_core::revocation::RevocationError),
    /// A string field holds a value outside the set it is drawn from.
    #[error("unknown {field} {value:?}")]
    UnknownValue {
        /// The protobuf field, e.g. `kind`.
        field: &'static str,
        /// The rejected value.
        value: String,
    },
}

// ---------------------------------------------------------------------------------------------
// SPIFFE IDs, trust domains, selectors, entry IDs

impl TryFrom<&types::Spiffeid> for SpiffeId {
    type Error = ConvertError;

    fn try_from(id: &types::Spiffeid) -> Result<Self, ConvertError> {
        spiffe_id_from_proto(id)
    }
}

impl From<&SpiffeId> for types::Spiffeid {
    fn from(id: &SpiffeId) -> Self {
        spiffe_id_to_proto(id)
    }
}

impl TryFrom<&types::Selector> for Selector {
    type Error = ConvertError;

    fn try_from(selector: &types::Selector) -> Result<Self, ConvertError> {
        selector_from_proto(selector)
    }
}

impl From<&Selector> for types::Selector {
    fn from(selector: &Selector) -> Self {
        selector_to_proto(selector)
    }
}

/// Parses a `SPIFFEID` message. Errors name the field `spiffe_id`; use
/// [`spiffe_id_field_from_proto`] for a field with another name.
///
/// `trust_domain` is a bare name; like SPIRE (go-spiffe's `TrustDomainFromString`), a
/// `spiffe://` form is accepted too. `path` must be empty or start with `/`.
pub fn spiffe_id_from_proto(id: &types::Spiffeid) -> Result<SpiffeId, ConvertError> {
    parse_spiffe_id("spiffe_id", id)
}

/// Parses the optional `SPIFFEID` message field `field` (e.g. `parent_id`, `by_spiffe_id`),
/// which must be present.
pub fn spiffe_id_field_from_proto(
    field: &'static str,
    id: Option<&types::Spiffeid>,
) -> Result<SpiffeId, ConvertError> {
    parse_spiffe_id(field, id.ok_or(ConvertError::Missing { field })?)
}

/// Encodes a SPIFFE ID as a `SPIFFEID` message: the bare trust domain name and the path.
pub fn spiffe_id_to_proto(id: &SpiffeId) -> types::Spiffeid {
    types::Spiffeid {
        trust_domain: id.trust_domain_name().to_owned(),
        path: id.path().to_owned(),
    }
}

fn parse_spiffe_id(field: &'static str, id: &types::Spiffeid) -> Result<SpiffeId, ConvertError> {
    let invalid = |reason| ConvertError::InvalidSpiffeId { field, reason };
    let trust_domain: TrustDomain = id.trust_domain.parse().map_err(invalid)?;
    SpiffeId::from_path(&trust_domain, &id.path).map_err(invalid)
}

/// Parses the trust domain string in field `field` (e.g. `federates_with`, `trust_domain`):
/// a bare name such as `example.org` or, as the SPIRE CLI often sends, `spiffe://example.org`.
pub fn trust_domain_from_proto(
    field: &'static str,
    value: &str,
) -> Result<TrustDomain, ConvertError> {
    if value.is_empty() {
        return Err(ConvertError::Missing { field });
    }
    value
        .parse()
        .map_err(|reason| ConvertError::InvalidTrustDomain {
            field,
            value: value.to_owned(),
            reason,
        })
}

/// Parses a `Selector` message. Errors name the field `selector`.
pub fn selector_from_proto(selector: &types::Selector) -> Result<Selector, ConvertError> {
    parse_selector("selector", selector)
}

/// Parses a list of `Selector` messages in field `field` (e.g. `selectors`), removing
/// duplicates. An empty list gives an empty set; callers that need one check for it.
pub fn selectors_from_proto(
    field: &'static str,
    selectors: &[types::Selector],
) -> Result<SelectorSet, ConvertError> {
    selectors.iter().map(|s| parse_selector(field, s)).collect()
}

/// Encodes a selector as a `Selector` message.
pub fn selector_to_proto(selector: &Selector) -> types::Selector {
    types::Selector {
        r#type: selector.kind().to_owned(),
        value: selector.value().to_owned(),
    }
}

fn parse_selector(
    field: &'static str,
    selector: &types::Selector,
) -> Result<Selector, ConvertError> {
    Selector::new(&selector.r#type, &selector.value)
        .map_err(|reason| ConvertError::InvalidSelector { field, reason })
}

/// Parses an entry ID (`GetEntryRequest.id`, `BatchDeleteEntryRequest.ids`, `Entry.id`).
/// Errors name the field `id`.
pub fn entry_id_from_proto(id: &str) -> Result<EntryId, ConvertError> {
    EntryId::new(id).map_err(|reason| ConvertError::InvalidEntryId {
        field: "id",
        reason,
    })
}

// ---------------------------------------------------------------------------------------------
// Entries

/// A registration entry as a client sent it in an `Entry` message: every SPIRE field parsed
/// into domain types, with the parts the server may assign left optional.
///
/// Lanyard's governance fields (`owner`, `reason`, `ticket`) are not part of SPIRE's `Entry`
/// and travel separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInput {
    /// The entry ID the client chose; `None` when `id` was empty.
    pub id: Option<EntryId>,
    /// The identity issued to matching workloads.
    pub spiffe_id: SpiffeId,
    /// The agent (or node alias, or parent entry) under which workloads must run.
    pub parent_id: SpiffeId,
    /// The selectors, without duplicates; never empty.
    pub selectors: SelectorSet,
    /// X.509-SVID lifetime; `None` when `x509_svid_ttl` was 0 (server default).
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime; `None` when `jwt_svid_ttl` was 0 (server default).
    pub jwt_svid_ttl: Option<Duration>,
    /// Federated trust domains, without duplicates.
    pub federates_with: BTreeSet<TrustDomain>,
    /// SVIDs for this entry may call the admin API.
    pub admin: bool,
    /// SVIDs for this entry belong to a downstream server.
    pub downstream: bool,
    /// Entry expiry; `None` when `expires_at` was 0 (never).
    pub expires_at: Option<SystemTime>,
    /// DNS SANs, as sent; checked by [`RegistrationEntry::validate`].
    pub dns_names: Vec<String>,
    /// The revision number as sent.
    pub revision_number: i64,
    /// The SVID goes to an agent-side store.
    pub store_svid: bool,
    /// Free text returned with the SVID on the Workload API.
    pub hint: String,
    /// Creation time; `None` when `created_at` was 0.
    pub created_at: Option<SystemTime>,
}

impl EntryInput {
    /// The entry's [`SimilarityKey`]: what a server compares to refuse a duplicate.
    pub fn similarity_key(&self) -> SimilarityKey {
        SimilarityKey::new(
            self.spiffe_id.clone(),
            self.parent_id.clone(),
            self.selectors.clone(),
        )
    }

    /// The registration entry, taking the client's ID or else `new_id()`, and the client's
    /// creation time or else `now`.
    ///
    /// To ignore a client-supplied field (SPIRE assigns `created_at` itself on create), set it
    /// to `None` before calling. Governance fields start empty.
    pub fn into_entry(
        self,
        new_id: impl FnOnce() -> EntryId,
        now: SystemTime,
    ) -> RegistrationEntry {
        let mut entry = RegistrationEntry::new(
            self.id.unwrap_or_else(new_id),
            self.spiffe_id,
            self.parent_id,
            self.selectors,
            self.created_at.unwrap_or(now),
        );
        entry.x509_svid_ttl = self.x509_svid_ttl;
        entry.jwt_svid_ttl = self.jwt_svid_ttl;
        entry.federates_with = self.federates_with;
        entry.admin = self.admin;
        entry.downstream = self.downstream;
        entry.expires_at = self.expires_at;
        entry.dns_names = self.dns_names;
        entry.revision_number = self.revision_number;
        entry.store_svid = self.store_svid;
        entry.hint = self.hint;
        entry
    }
}

impl TryFrom<&types::Entry> for EntryInput {
    type Error = ConvertError;

    fn try_from(entry: &types::Entry) -> Result<Self, ConvertError> {
        entry_from_proto(entry)
    }
}

/// Parses an `Entry` message as a client sends it to create an entry.
///
/// `spiffe_id`, `parent_id` and at least one selector are required. Zero TTLs, `expires_at`
/// and `created_at` mean "unset"; negative ones are errors. `federates_with` accepts bare
/// names and `spiffe://` forms.
pub fn entry_from_proto(entry: &types::Entry) -> Result<EntryInput, ConvertError> {
    Ok(EntryInput {
        id: optional_entry_id(&entry.id)?,
        spiffe_id: spiffe_id_field_from_proto("spiffe_id", entry.spiffe_id.as_ref())?,
        parent_id: spiffe_id_field_from_proto("parent_id", entry.parent_id.as_ref())?,
        selectors: entry_selectors(&entry.selectors)?,
        x509_svid_ttl: ttl_from_proto("x509_svid_ttl", entry.x509_svid_ttl)?,
        jwt_svid_ttl: ttl_from_proto("jwt_svid_ttl", entry.jwt_svid_ttl)?,
        federates_with: federates_with_from_proto(&entry.federates_with)?,
        admin: entry.admin,
        downstream: entry.downstream,
        expires_at: time_from_proto("expires_at", entry.expires_at)?,
        dns_names: entry.dns_names.clone(),
        revision_number: entry.revision_number,
        store_svid: entry.store_svid,
        hint: entry.hint.clone(),
        created_at: time_from_proto("created_at", entry.created_at)?,
    })
}

/// Applies an `Entry` message from `BatchUpdateEntry` to the stored entry `current`.
///
/// Only the fields set in `input_mask` are read from `update` and replaced; `None` means every
/// field (the SPIRE CLI sends no mask), so `spiffe_id`, `parent_id` and selectors are then
/// required. `id`, `revision_number` and `created_at` are the server's and never change here:
/// the caller looks `current` up by `update.id` and bumps the revision. Governance fields are
/// kept.
pub fn entry_update_from_proto(
    current: &RegistrationEntry,
    update: &types::Entry,
    input_mask: Option<&types::EntryMask>,
) -> Result<RegistrationEntry, ConvertError> {
    let mask = input_mask.copied().unwrap_or_else(entry_mask_all);
    let mut entry = current.clone();
    if mask.spiffe_id {
        entry.spiffe_id = spiffe_id_field_from_proto("spiffe_id", update.spiffe_id.as_ref())?;
    }
    if mask.parent_id {
        entry.parent_id = spiffe_id_field_from_proto("parent_id", update.parent_id.as_ref())?;
    }
    if mask.selectors {
        entry.selectors = entry_selectors(&update.selectors)?;
    }
    if mask.x509_svid_ttl {
        entry.x509_svid_ttl = ttl_from_proto("x509_svid_ttl", update.x509_svid_ttl)?;
    }
    if mask.jwt_svid_ttl {
        entry.jwt_svid_ttl = ttl_from_proto("jwt_svid_ttl", update.jwt_svid_ttl)?;
    }
    if mask.federates_with {
        entry.federates_with = federates_with_from_proto(&update.federates_with)?;
    }
    if mask.admin {
        entry.admin = update.admin;
    }
    if mask.downstream {
        entry.downstream = update.downstream;
    }
    if mask.expires_at {
        entry.expires_at = time_from_proto("expires_at", update.expires_at)?;
    }
    if mask.dns_names {
        entry.dns_names.clone_from(&update.dns_names);
    }
    if mask.store_svid {
        entry.store_svid = update.store_svid;
    }
    if mask.hint {
        entry.hint.clone_from(&update.hint);
    }
    Ok(entry)
}

/// Encodes a registration entry, filling only the fields set in `mask` (`None` means all).
///
/// `id` is always set, as SPIRE always returns it. Fields left out by the mask keep their
/// protobuf defaults. `federates_with` holds bare trust domain names. Governance fields are
/// not part of SPIRE's `Entry` and are not encoded.
pub fn entry_to_proto(entry: &RegistrationEntry, mask: Option<&types::EntryMask>) -> types::Entry {
    let mask = mask.copied().unwrap_or_else(entry_mask_all);
    let mut out = types::Entry {
        id: entry.id.as_str().to_owned(),
        ..types::Entry::default()
    };
    if mask.spiffe_id {
        out.spiffe_id = Some(spiffe_id_to_proto(&entry.spiffe_id));
    }
    if mask.parent_id {
        out.parent_id = Some(spiffe_id_to_proto(&entry.parent_id));
    }
    if mask.selectors {
        out.selectors = entry.selectors.iter().map(selector_to_proto).collect();
    }
    if mask.x509_svid_ttl {
        out.x509_svid_ttl = ttl_to_proto(entry.x509_svid_ttl);
    }
    if mask.federates_with {
        out.federates_with = entry
            .federates_with
            .iter()
            .map(|td| td.name().to_owned())
            .collect();
    }
    if mask.admin {
        out.admin = entry.admin;
    }
    if mask.downstream {
        out.downstream = entry.downstream;
    }
    if mask.expires_at {
        out.expires_at = expiry_to_proto(entry.expires_at);
    }
    if mask.dns_names {
        out.dns_names.clone_from(&entry.dns_names);
    }
    if mask.revision_number {
        out.revision_number = entry.revision_number;
    }
    if mask.store_svid {
        out.store_svid = entry.store_svid;
    }
    if mask.jwt_svid_ttl {
        out.jwt_svid_ttl = ttl_to_proto(entry.jwt_svid_ttl);
    }
    if mask.hint {
        out.hint.clone_from(&entry.hint);
    }
    if mask.created_at {
        out.created_at = unix_seconds(entry.created_at);
    }
    out
}

/// An `EntryMask` with every field set: the meaning of an absent mask.
pub fn entry_mask_all() -> types::EntryMask {
    types::EntryMask {
        spiffe_id: true,
        parent_id: true,
        selectors: true,
        x509_svid_ttl: true,
        federates_with: true,
        admin: true,
        downstream: true,
        expires_at: true,
        dns_names: true,
        revision_number: true,
        store_svid: true,
        jwt_svid_ttl: true,
        hint: true,
        created_at: true,
    }
}

fn optional_entry_id(id: &str) -> Result<Option<EntryId>, ConvertError> {
    if id.is_empty() {
        return Ok(None);
    }
    entry_id_from_proto(id).map(Some)
}

fn entry_selectors(selectors: &[types::Selector]) -> Result<SelectorSet, ConvertError> {
    // SPIRE's server refuses, and its agent drops, an entry without selectors.
    if selectors.is_empty() {
        return Err(ConvertError::Empty { field: "selectors" });
    }
    selectors_from_proto("selectors", selectors)
}

fn federates_with_from_proto(
    federates_with: &[String],
) -> Result<BTreeSet<TrustDomain>, ConvertError> {
    federates_with
        .iter()
        .map(|td| trust_domain_from_proto("federates_with", td))
        .collect()
}

/// A stored entry as a server returns it, with its Lanyard governance metadata if it has any:
/// the registration entry, ID included, and `owner`, `reason`, `ticket` and `source` set
/// from the non-empty metadata fields.
pub fn stored_entry_from_proto(
    entry: &types::Entry,
    metadata: Option<&lanyard_v1::EntryMetadata>,
) -> Result<RegistrationEntry, ConvertError> {
    let input = entry_from_proto(entry)?;
    let id = input
        .id
        .clone()
        .ok_or(ConvertError::Missing { field: "id" })?;
    let mut stored = input.into_entry(|| id, UNIX_EPOCH);
    if let Some(metadata) = metadata {
        let text = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        stored.owner = text(&metadata.owner);
        stored.reason = text(&metadata.reason);
        stored.ticket = text(&metadata.ticket);
        stored.source = text(&metadata.source);
    }
    Ok(stored)
}

/// The governance metadata of `entry`, as `EntryMetadataService` stores it (empty strings for
/// unset fields).
pub fn entry_metadata_to_proto(entry: &RegistrationEntry) -> lanyard_v1::EntryMetadata {
    lanyard_v1::EntryMetadata {
        entry_id: entry.id.as_str().to_owned(),
        owner: entry.owner.clone().unwrap_or_default(),
        reason: entry.reason.clone().unwrap_or_default(),
        ticket: entry.ticket.clone().unwrap_or_default(),
        source: entry.source.clone().unwrap_or_default(),
    }
}

/// `CountEntries`' filter has the same criteria as `ListEntries`', in its own message type.
impl From<count_entries_request::Filter> for list_entries_request::Filter {
    fn from(filter: count_entries_request::Filter) -> Self {
        Self {
            by_spiffe_id: filter.by_spiffe_id,
            by_parent_id: filter.by_parent_id,
            by_selectors: filter.by_selectors,
            by_federates_with: filter.by_federates_with,
            by_hint: filter.by_hint,
            by_downstream: filter.by_downstream,
        }
    }
}

impl From<list_entries_request::Filter> for count_entries_request::Filter {
    fn from(filter: list_entries_request::Filter) -> Self {
        Self {
            by_spiffe_id: filter.by_spiffe_id,
            by_parent_id: filter.by_parent_id,
            by_selectors: filter.by_selectors,
            by_federates_with: filter.by_federates_with,
            by_hint: filter.by_hint,
            by_downstream: filter.by_downstream,
        }
    }
}

/// `CountAgents`' filter has the same criteria as `ListAgents`', in its own message type.
impl From<list_agents_request::Filter> for count_agents_request::Filter {
    fn from(filter: list_agents_request::Filter) -> Self {
        Self {
            by_attestation_type: filter.by_attestation_type,
            by_selector_match: filter.by_selector_match,
            by_banned: filter.by_banned,
            by_can_reattest: filter.by_can_reattest,
            by_expires_before: filter.by_expires_before,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bundles

impl TryFrom<&types::Bundle> for TrustBundle {
    type Error = ConvertError;

    fn try_from(bundle: &types::Bundle) -> Result<Self, ConvertError> {
        bundle_from_proto(bundle)
    }
}

impl From<&TrustBundle> for types::Bundle {
    fn from(bundle: &TrustBundle) -> Self {
        bundle_to_proto(bundle)
    }
}

/// Parses a `Bundle` message.
///
/// `trust_domain` may be a bare name or a `spiffe://` form. Each X.509 authority must be
/// exactly one DER certificate; each JWT authority a non-empty `key_id` and a DER
/// SubjectPublicKeyInfo, with `expires_at` 0 meaning no expiry. Repeated certificates are kept
/// once (tainted if any copy is). `refresh_hint` 0 means none. The result carries the message's
/// `sequence_number` unchanged.
pub fn bundle_from_proto(bundle: &types::Bundle) -> Result<TrustBundle, ConvertError> {
    let trust_domain = trust_domain_from_proto("trust_domain", &bundle.trust_domain)?;
    let mut out = TrustBundle::new(trust_domain);
    for (index, authority) in bundle.x509_authorities.iter().enumerate() {
        let parsed = X509Authority::new(authority.asn1.clone()).map_err(|reason| {
            ConvertError::InvalidAuthority {
                field: "x509_authorities",
                index,
                reason,
            }
        })?;
        if !out.add_x509_authority(parsed.with_tainted(authority.tainted)) && authority.tainted {
            out.taint_x509_authority(&authority.asn1);
        }
    }
    for (index, authority) in bundle.jwt_authorities.iter().enumerate() {
        let invalid = |reason| ConvertError::InvalidAuthority {
            field: "jwt_authorities",
            index,
            reason,
        };
        let expires_at = time_from_proto("jwt_authorities.expires_at", authority.expires_at)?;
        let parsed = JwtAuthority::new(authority.key_id.clone(), &authority.public_key, expires_at)
            .map_err(invalid)?;
        out.add_jwt_authority(parsed.with_tainted(authority.tainted))
            .map_err(invalid)?;
    }
    let refresh_hint = match bundle.refresh_hint {
        0 => None,
        seconds => Some(Duration::from_secs(u64::try_from(seconds).map_err(
            |_| ConvertError::Negative {
                field: "refresh_hint",
                value: seconds,
            },
        )?)),
    };
    out.set_refresh_hint(refresh_hint);
    // Last, because every change above bumps the sequence number.
    out.set_sequence_number(bundle.sequence_number);
    Ok(out)
}

/// Encodes a trust bundle with every field. `trust_domain` is the bare name, which is what
/// SPIRE's agent expects.
pub fn bundle_to_proto(bundle: &TrustBundle) -> types::Bundle {
    bundle_to_proto_masked(bundle, None)
}

/// Encodes a trust bundle, filling only the fields set in `mask` (`None` means all).
/// `trust_domain` is always set, as the bare name.
pub fn bundle_to_proto_masked(
    bundle: &TrustBundle,
    mask: Option<&types::BundleMask>,
) -> types::Bundle {
    let mask = mask.copied().unwrap_or_else(bundle_mask_all);
    let mut out = types::Bundle {
        trust_domain: bundle.trust_domain().name().to_owned(),
        ..types::Bundle::default()
    };
    if mask.x509_authorities {
        out.x509_authorities = bundle
            .x509_authorities()
            .iter()
            .map(|authority| types::X509Certificate {
                asn1: authority.der().to_vec(),
                tainted: authority.is_tainted(),
                hint: String::new(),
            })
            .collect();
    }
    if mask.jwt_authorities {
        out.jwt_authorities = bundle
            .jwt_authorities()
            .iter()
            .map(|authority| types::JwtKey {
                public_key: authority.public_key_der().to_vec(),
                key_id: authority.key_id().to_owned(),
                expires_at: expiry_to_proto(authority.expires_at()),
                tainted: authority.is_tainted(),
                hint: String::new(),
            })
            .collect();
    }
    if mask.refresh_hint {
        out.refresh_hint = bundle
            .refresh_hint()
            .map_or(0, |hint| i64::try_from(hint.as_secs()).unwrap_or(i64::MAX));
    }
    if mask.sequence_number {
        out.sequence_number = bundle.sequence_number();
    }
    out
}

/// A `BundleMask` with every field set: the meaning of an absent mask.
pub fn bundle_mask_all() -> types::BundleMask {
    types::BundleMask {
        x509_authorities: true,
        jwt_authorities: true,
        refresh_hint: true,
        sequence_number: true,
    }
}

// ---------------------------------------------------------------------------------------------
// Federation relationships

/// Parses a `FederationRelationship` message, every field of it, with SPIRE's checks and
/// texts: the trust domain (bare or `spiffe://`), the bundle endpoint URL
/// ([`lanyard_core::BundleEndpointUrl`]), the profile (required) and, if present, the trust
/// domain bundle, which must be the relationship's trust domain's. SPIRE checks a whole
/// relationship even in an update whose input mask leaves fields out, and so does this.
pub fn federation_relationship_from_proto(
    relationship: &types::FederationRelationship,
) -> Result<FederationRelationship, ConvertError> {
    use types::federation_relationship::BundleEndpointProfile as Profile;

    let invalid = ConvertError::InvalidFederationRelationship;
    let trust_domain: TrustDomain = relationship
        .trust_domain
        .parse()
        .map_err(|e| invalid(FederationError::TrustDomain(e)))?;
    let url = relationship.bundle_endpoint_url.parse().map_err(invalid)?;
    let profile = match &relationship.bundle_endpoint_profile {
        Some(Profile::HttpsWeb(_)) => BundleEndpointProfile::HttpsWeb,
        Some(Profile::HttpsSpiffe(spiffe)) => BundleEndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: spiffe
                .endpoint_spiffe_id
                .parse()
                .map_err(|e| invalid(FederationError::EndpointSpiffeId(e)))?,
        },
        None => {
            return Err(ConvertError::Missing {
                field: "bundle_endpoint_profile",
            });
        }
    };
    let parsed = FederationRelationship::new(trust_domain, url, profile);
    match &relationship.trust_domain_bundle {
        None => Ok(parsed),
        Some(bundle) => {
            let bundle = bundle_from_proto(bundle)
                .map_err(|e| ConvertError::InvalidTrustDomainBundle(Box::new(e)))?;
            parsed.with_trust_domain_bundle(bundle).map_err(invalid)
        }
    }
}

/// Encodes a federation relationship, filling only the fields set in `mask` (`None` means
/// all). `trust_domain` is always set, as the bare name; the bundle is there when the mask
/// asks for it and the relationship has one.
pub fn federation_relationship_to_proto(
    relationship: &FederationRelationship,
    mask: Option<&types::FederationRelationshipMask>,
) -> types::FederationRelationship {
    use types::federation_relationship::BundleEndpointProfile as Profile;

    let mask = relationship_mask_from_proto(mask);
    let mut out = types::FederationRelationship {
        trust_domain: relationship.trust_domain().name().to_owned(),
        ..types::FederationRelationship::default()
    };
    if mask.bundle_endpoint_url {
        out.bundle_endpoint_url = relationship.bundle_endpoint_url().as_str().to_owned();
    }
    if mask.bundle_endpoint_profile {
        out.bundle_endpoint_profile = Some(match relationship.profile() {
            BundleEndpointProfile::HttpsWeb => Profile::HttpsWeb(types::HttpsWebProfile {}),
            BundleEndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
                Profile::HttpsSpiffe(types::HttpsspiffeProfile {
                    endpoint_spiffe_id: endpoint_spiffe_id.as_str().to_owned(),
                })
            }
        });
    }
    if mask.trust_domain_bundle {
        out.trust_domain_bundle = relationship.trust_domain_bundle().map(bundle_to_proto);
    }
    out
}

/// A `FederationRelationshipMask` as the core's mask; `None` is every field.
pub fn relationship_mask_from_proto(
    mask: Option<&types::FederationRelationshipMask>,
) -> RelationshipMask {
    mask.map_or(RelationshipMask::ALL, |mask| RelationshipMask {
        bundle_endpoint_url: mask.bundle_endpoint_url,
        bundle_endpoint_profile: mask.bundle_endpoint_profile,
        trust_domain_bundle: mask.trust_domain_bundle,
    })
}

impl TryFrom<&types::FederationRelationship> for FederationRelationship {
    type Error = ConvertError;

    fn try_from(relationship: &types::FederationRelationship) -> Result<Self, ConvertError> {
        federation_relationship_from_proto(relationship)
    }
}

impl From<&FederationRelationship> for types::FederationRelationship {
    fn from(relationship: &FederationRelationship) -> Self {
        federation_relationship_to_proto(relationship, None)
    }
}

// ---------------------------------------------------------------------------------------------
// Agents

/// An agent record in SPIRE's wire form, with only the fields `mask` asks for (all if none).
pub fn agent_to_proto(agent: &AttestedAgent, mask: Option<&types::AgentMask>) -> types::Agent {
    let all = types::AgentMask {
        attestation_type: true,
        x509svid_serial_number: true,
        x509svid_expires_at: true,
        selectors: true,
        banned: true,
        can_reattest: true,
    };
    let mask = mask.unwrap_or(&all);
    types::Agent {
        id: Some(spiffe_id_to_proto(&agent.spiffe_id)),
        attestation_type: if mask.attestation_type {
            agent.attestation_type.clone()
        } else {
            String::new()
        },
        x509svid_serial_number: if mask.x509svid_serial_number {
            agent.serial.clone()
        } else {
            String::new()
        },
        x509svid_expires_at: if mask.x509svid_expires_at {
            unix_seconds(agent.not_after)
        } else {
            0
        },
        selectors: if mask.selectors {
            agent.selectors.iter().map(selector_to_proto).collect()
        } else {
            Vec::new()
        },
        banned: mask.banned && agent.is_banned(),
        can_reattest: mask.can_reattest && agent.can_reattest,
    }
}

/// An agent record as a server returns it. SPIRE's `Agent` message carries no renewal state,
/// version or record times, so those stay at their defaults; a banned agent has no serial.
pub fn agent_from_proto(agent: &types::Agent) -> Result<AttestedAgent, ConvertError> {
    let serial = if agent.banned {
        String::new()
    } else {
        agent.x509svid_serial_number.clone()
    };
    let mut record = AttestedAgent::new(
        spiffe_id_field_from_proto("id", agent.id.as_ref())?,
        agent.attestation_type.clone(),
        serial,
        time_from_proto("x509svid_expires_at", agent.x509svid_expires_at)?.unwrap_or(UNIX_EPOCH),
    );
    record.can_reattest = agent.can_reattest;
    record.selectors = selectors_from_proto("selectors", &agent.selectors)?;
    Ok(record)
}

// ---------------------------------------------------------------------------------------------
// Governance records: exceptions and the usage ledger

/// The API form of an exception.
pub fn exception_to_proto(exception: &Exception) -> lanyard_v1::PolicyException {
    lanyard_v1::PolicyException {
        id: exception.id.clone(),
        owner: exception.owner.clone(),
        reason: exception.reason.clone(),
        ticket: exception.ticket.clone().unwrap_or_default(),
        rules: exception.rules.iter().cloned().collect(),
        entry_ids: exception.entry_ids.iter().cloned().collect(),
        spiffe_id_pattern: exception.spiffe_id_pattern.clone().unwrap_or_default(),
        expires_at: unix_seconds(exception.expires_at),
        created_at: unix_seconds(exception.created_at),
        created_by: exception.created_by.clone(),
        revoked_at: exception.revoked_at.map_or(0, unix_seconds),
        revision: exception.revision,
    }
}

/// An exception as a server returns it: empty strings are unset fields, 0 is "never revoked".
pub fn exception_from_proto(
    exception: &lanyard_v1::PolicyException,
) -> Result<Exception, ConvertError> {
    let text = |value: &str| (!value.is_empty()).then(|| value.to_owned());
    Ok(Exception {
        id: exception.id.clone(),
        owner: exception.owner.clone(),
        reason: exception.reason.clone(),
        ticket: text(&exception.ticket),
        rules: exception.rules.iter().cloned().collect(),
        entry_ids: exception.entry_ids.iter().cloned().collect(),
        spiffe_id_pattern: text(&exception.spiffe_id_pattern),
        expires_at: time_from_proto("expires_at", exception.expires_at)?.unwrap_or(UNIX_EPOCH),
        created_at: time_from_proto("created_at", exception.created_at)?.unwrap_or(UNIX_EPOCH),
        created_by: exception.created_by.clone(),
        revoked_at: time_from_proto("revoked_at", exception.revoked_at)?,
        revision: exception.revision,
    })
}

/// The API form of a revocation.
pub fn revocation_to_proto(revocation: &Revocation) -> lanyard_v1::Revocation {
    lanyard_v1::Revocation {
        id: revocation.id.clone(),
        kind: revocation.target.kind().to_owned(),
        value: revocation.target.value(),
        owner: revocation.owner.clone(),
        reason: revocation.reason.clone(),
        ticket: revocation.ticket.clone(),
        created_at: unix_seconds(revocation.created_at),
        created_by: revocation.created_by.clone(),
        expires_at: unix_seconds(revocation.expires_at),
        sequence: revocation.sequence,
    }
}

/// A revocation as a server returns it.
pub fn revocation_from_proto(
    revocation: &lanyard_v1::Revocation,
) -> Result<Revocation, ConvertError> {
    Ok(Revocation {
        id: revocation.id.clone(),
        target: RevocationTarget::parse(&revocation.kind, &revocation.value)
            .map_err(ConvertError::InvalidRevocation)?,
        owner: revocation.owner.clone(),
        reason: revocation.reason.clone(),
        ticket: revocation.ticket.clone(),
        created_at: time_from_proto("created_at", revocation.created_at)?.unwrap_or(UNIX_EPOCH),
        created_by: revocation.created_by.clone(),
        expires_at: time_from_proto("expires_at", revocation.expires_at)?.unwrap_or(UNIX_EPOCH),
        sequence: revocation.sequence,
    })
}

/// The API form of a revoked serial.
pub fn revoked_serial_to_proto(serial: &RevokedSerial) -> lanyard_v1::RevokedSerial {
    lanyard_v1::RevokedSerial {
        serial: serial.serial.clone(),
        authority_id: serial.authority_id.clone(),
        revoked_at: unix_seconds(serial.revoked_at),
    }
}

/// A revoked serial as a server returns it.
pub fn revoked_serial_from_proto(
    serial: &lanyard_v1::RevokedSerial,
) -> Result<RevokedSerial, ConvertError> {
    Ok(RevokedSerial {
        serial: lanyard_core::revocation::normalize_serial(&serial.serial)
            .map_err(ConvertError::InvalidRevocation)?,
        authority_id: serial.authority_id.clone(),
        revoked_at: time_from_proto("revoked_at", serial.revoked_at)?.unwrap_or(UNIX_EPOCH),
    })
}

/// The API form of a usage record.
pub fn usage_to_proto(usage: &EntryUsage) -> lanyard_v1::EntryUsage {
    lanyard_v1::EntryUsage {
        entry_id: usage.entry_id.clone(),
        agent_id: usage.agent_id.clone(),
        last_issued_at: usage.last_issued_at.map_or(0, unix_seconds),
        last_served_at: usage.last_served_at.map_or(0, unix_seconds),
        issued: usage.issued,
    }
}

/// A usage record as a server returns it; 0 is "never".
pub fn usage_from_proto(usage: &lanyard_v1::EntryUsage) -> Result<EntryUsage, ConvertError> {
    Ok(EntryUsage {
        entry_id: usage.entry_id.clone(),
        agent_id: usage.agent_id.clone(),
        last_issued_at: time_from_proto("last_issued_at", usage.last_issued_at)?,
        last_served_at: time_from_proto("last_served_at", usage.last_served_at)?,
        issued: usage.issued,
    })
}

/// The API form of a ledger record.
pub fn issuance_to_proto(issuance: &Issuance) -> lanyard_v1::Issuance {
    lanyard_v1::Issuance {
        kind: issuance.kind.as_str().to_owned(),
        serial: issuance.serial.clone(),
        entry_id: issuance.entry_id.clone(),
        spiffe_id: issuance.spiffe_id.to_string(),
        agent_id: issuance.agent_id.to_string(),
        authority_id: issuance.authority_id.clone(),
        issued_at: unix_seconds(issuance.issued_at),
        not_after: unix_seconds(issuance.not_after),
        exception_ids: issuance.exception_ids.clone(),
    }
}

/// A ledger record as a server returns it.
pub fn issuance_from_proto(issuance: &lanyard_v1::Issuance) -> Result<Issuance, ConvertError> {
    let id = |field: &'static str, text: &str| {
        text.parse::<SpiffeId>()
            .map_err(|reason| ConvertError::InvalidSpiffeId { field, reason })
    };
    Ok(Issuance {
        kind: IssuanceKind::parse(&issuance.kind).ok_or_else(|| ConvertError::UnknownValue {
            field: "kind",
            value: issuance.kind.clone(),
        })?,
        serial: issuance.serial.clone(),
        entry_id: issuance.entry_id.clone(),
        spiffe_id: id("spiffe_id", &issuance.spiffe_id)?,
        agent_id: id("agent_id", &issuance.agent_id)?,
        authority_id: issuance.authority_id.clone(),
        issued_at: time_from_proto("issued_at", issuance.issued_at)?.unwrap_or(UNIX_EPOCH),
        not_after: time_from_proto("not_after", issuance.not_after)?.unwrap_or(UNIX_EPOCH),
        exception_ids: issuance.exception_ids.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// SVIDs

/// Encodes an X509-SVID: `cert_chain` as DER certificates leaf first, `id` from the leaf,
/// `expires_at` as the leaf's `NotAfter` in Unix seconds, and the entry's `hint`.
pub fn x509_svid_to_proto(svid: &X509Svid, hint: &str) -> types::X509svid {
    types::X509svid {
        cert_chain: svid.cert_chain().to_vec(),
        id: Some(spiffe_id_to_proto(svid.spiffe_id())),
        expires_at: unix_seconds(svid.not_after()),
        hint: hint.to_owned(),
    }
}

/// Parses an `X509SVID` message from its certificate chain, as SPIRE's agent does: `id` and
/// `expires_at` are ignored in favour of the leaf certificate. The chain is not verified.
pub fn x509_svid_from_proto(svid: &types::X509svid) -> Result<X509Svid, ConvertError> {
    X509Svid::from_chain(svid.cert_chain.clone()).map_err(|reason| ConvertError::InvalidX509Svid {
        field: "cert_chain",
        reason,
    })
}

/// Encodes a JWT-SVID: the token, its subject, `exp` and `iat` in Unix seconds, and the
/// entry's `hint`.
pub fn jwt_svid_to_proto(svid: &JwtSvid, hint: &str) -> types::Jwtsvid {
    types::Jwtsvid {
        token: svid.token.clone(),
        id: Some(spiffe_id_to_proto(&svid.spiffe_id)),
        expires_at: unix_seconds(svid.expires_at),
        issued_at: unix_seconds(svid.issued_at),
        hint: hint.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Batch statuses

/// The status of a successful batch item, as SPIRE writes it: code 0, message `OK`.
pub fn ok_status() -> types::Status {
    status(tonic::Code::Ok, "OK")
}

/// The status of one batch item with gRPC code `code`.
pub fn status(code: tonic::Code, message: impl Into<String>) -> types::Status {
    types::Status {
        code: code.into(),
        message: message.into(),
    }
}

/// A batch item status carrying the code and message of a gRPC error.
pub fn status_from_tonic(status: &tonic::Status) -> types::Status {
    types::Status {
        code: status.code().into(),
        message: status.message().to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Times and durations

/// `seconds` of a TTL field: 0 is "server default", negative an error.
fn ttl_from_proto(field: &'static str, seconds: i32) -> Result<Option<Duration>, ConvertError> {
    match seconds {
        0 => Ok(None),
        seconds => u64::try_from(seconds)
            .map(|seconds| Some(Duration::from_secs(seconds)))
            .map_err(|_| ConvertError::Negative {
                field,
                value: seconds.into(),
            }),
    }
}

/// A TTL in whole seconds, saturating. A set TTL never encodes as 0, which means "default".
fn ttl_to_proto(ttl: Option<Duration>) -> i32 {
    ttl.map_or(0, |ttl| {
        i32::try_from(ttl.as_secs()).unwrap_or(i32::MAX).max(1)
    })
}

/// A Unix-seconds field: 0 is "unset", negative an error.
fn time_from_proto(field: &'static str, seconds: i64) -> Result<Option<SystemTime>, ConvertError> {
    match seconds {
        0 => Ok(None),
        seconds => {
            let since_epoch = u64::try_from(seconds).map_err(|_| ConvertError::Negative {
                field,
                value: seconds,
            })?;
            UNIX_EPOCH
                .checked_add(Duration::from_secs(since_epoch))
                .map(Some)
                .ok_or(ConvertError::OutOfRange {
                    field,
                    value: seconds,
                })
        }
    }
}

/// `time` in whole Unix seconds, rounded down; 0 for times before the epoch.
fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since_epoch| {
        i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
    })
}

/// An optional expiry. 0 on the wire means "never", so an expiry at or before the epoch is
/// written as 1: still long past, rather than silently eternal.
fn expiry_to_proto(expires_at: Option<SystemTime>) -> i64 {
    expires_at.map_or(0, |at| unix_seconds(at).max(1))
}
