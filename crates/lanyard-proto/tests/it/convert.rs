//! Protobuf ⇄ domain conversions: round trips, output masks, SPIRE's wire conventions (bare
//! trust domain names, 0 for "unset") and errors that name the offending field.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::agent::AttestedAgent;
use lanyard_core::bundle::{JwtAuthority, TrustBundle, X509Authority};
use lanyard_core::federation::{BundleEndpointProfile, FederationRelationship, RelationshipMask};
use lanyard_core::jwt::{JwtSigningKey, JwtSvidParams, mint_jwt_svid};
use lanyard_core::ledger::{EntryUsage, Issuance, IssuanceKind};
use lanyard_core::policy::Exception;
use lanyard_core::x509::{CaSubject, SvidParams, X509Ca, create_self_signed_ca};
use lanyard_core::{EntryId, KeyPair, KeyType, RegistrationEntry, Selector, SpiffeId, TrustDomain};
use lanyard_proto::convert::{
    ConvertError, EntryInput, agent_from_proto, agent_to_proto, bundle_from_proto, bundle_mask_all,
    bundle_to_proto, bundle_to_proto_masked, entry_from_proto, entry_id_from_proto, entry_mask_all,
    entry_metadata_to_proto, entry_to_proto, entry_update_from_proto, exception_from_proto,
    exception_to_proto, federation_relationship_from_proto, federation_relationship_to_proto,
    issuance_from_proto, issuance_to_proto, jwt_svid_to_proto, ok_status,
    relationship_mask_from_proto, selector_from_proto, selector_to_proto,
    spiffe_id_field_from_proto, spiffe_id_from_proto, spiffe_id_to_proto, status,
    status_from_tonic, stored_entry_from_proto, trust_domain_from_proto, usage_from_proto,
    usage_to_proto, x509_svid_from_proto, x509_svid_to_proto,
};
use lanyard_proto::spire::api::types;

fn at(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds)
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn proto_id(trust_domain: &str, path: &str) -> types::Spiffeid {
    types::Spiffeid {
        trust_domain: trust_domain.to_owned(),
        path: path.to_owned(),
    }
}

fn proto_selector(kind: &str, value: &str) -> types::Selector {
    types::Selector {
        r#type: kind.to_owned(),
        value: value.to_owned(),
    }
}

/// An entry with every SPIRE field set to a non-default value.
fn full_entry() -> RegistrationEntry {
    let mut entry = RegistrationEntry::new(
        EntryId::new("entry-1").unwrap(),
        id("spiffe://example.org/ns/prod/web"),
        id("spiffe://example.org/spire/agent/join_token/abc"),
        ["unix:uid:1000", "unix:gid:1000"]
            .into_iter()
            .map(|s| s.parse::<Selector>().unwrap())
            .collect(),
        at(1_700_000_000),
    );
    entry.x509_svid_ttl = Some(Duration::from_secs(3600));
    entry.jwt_svid_ttl = Some(Duration::from_secs(300));
    entry.federates_with = [td("partner.example"), td("other.example")].into();
    entry.admin = true;
    entry.downstream = true;
    entry.expires_at = Some(at(1_800_000_000));
    entry.dns_names = vec!["web.example.org".to_owned(), "*.web.example.org".to_owned()];
    entry.revision_number = 7;
    entry.store_svid = true;
    entry.hint = "web".to_owned();
    entry
}

fn no_new_id() -> EntryId {
    EntryId::new("server-assigned").unwrap()
}

#[test]
fn entry_round_trips_through_proto() {
    let entry = full_entry();
    let proto = entry_to_proto(&entry, None);
    let input = entry_from_proto(&proto).unwrap();
    assert_eq!(input.id, Some(entry.id.clone()));
    assert_eq!(input.created_at, Some(entry.created_at));
    assert_eq!(input.into_entry(no_new_id, at(1)), entry);

    let via_try_from = EntryInput::try_from(&proto).unwrap();
    assert_eq!(via_try_from.into_entry(no_new_id, at(1)), entry);
}

#[test]
fn governance_fields_are_not_part_of_the_spire_entry() {
    let mut entry = full_entry();
    entry.owner = Some("team-web".to_owned());
    entry.reason = Some("serves the shop".to_owned());
    entry.ticket = Some("CHG-1".to_owned());
    let back = entry_from_proto(&entry_to_proto(&entry, None))
        .unwrap()
        .into_entry(no_new_id, at(1));
    assert_eq!(back, full_entry());
}

#[test]
fn entry_to_proto_uses_spires_encoding() {
    let proto = entry_to_proto(&full_entry(), None);
    assert_eq!(proto.id, "entry-1");
    assert_eq!(
        proto.spiffe_id,
        Some(proto_id("example.org", "/ns/prod/web"))
    );
    assert_eq!(
        proto.parent_id,
        Some(proto_id("example.org", "/spire/agent/join_token/abc"))
    );
    assert_eq!(
        proto.selectors,
        [
            proto_selector("unix", "gid:1000"),
            proto_selector("unix", "uid:1000")
        ]
    );
    assert_eq!(proto.x509_svid_ttl, 3600);
    assert_eq!(proto.jwt_svid_ttl, 300);
    assert_eq!(proto.federates_with, ["other.example", "partner.example"]);
    assert!(proto.admin && proto.downstream && proto.store_svid);
    assert_eq!(proto.expires_at, 1_800_000_000);
    assert_eq!(proto.dns_names, ["web.example.org", "*.web.example.org"]);
    assert_eq!(proto.revision_number, 7);
    assert_eq!(proto.hint, "web");
    assert_eq!(proto.created_at, 1_700_000_000);
}

#[test]
fn unset_optional_fields_encode_as_zero() {
    let mut entry = full_entry();
    entry.x509_svid_ttl = None;
    entry.jwt_svid_ttl = None;
    entry.expires_at = None;
    let proto = entry_to_proto(&entry, None);
    assert_eq!(
        (proto.x509_svid_ttl, proto.jwt_svid_ttl, proto.expires_at),
        (0, 0, 0)
    );

    // A set value never encodes as the "unset" 0.
    entry.x509_svid_ttl = Some(Duration::from_millis(400));
    entry.expires_at = Some(UNIX_EPOCH);
    let proto = entry_to_proto(&entry, None);
    assert_eq!(proto.x509_svid_ttl, 1);
    assert_eq!(proto.expires_at, 1);
}

#[test]
fn no_mask_means_every_field() {
    let entry = full_entry();
    assert_eq!(
        entry_to_proto(&entry, None),
        entry_to_proto(&entry, Some(&entry_mask_all()))
    );
}

#[test]
fn a_partial_mask_leaves_other_fields_at_their_defaults() {
    let mask = types::EntryMask {
        spiffe_id: true,
        selectors: true,
        ..types::EntryMask::default()
    };
    let full = entry_to_proto(&full_entry(), None);
    let proto = entry_to_proto(&full_entry(), Some(&mask));
    assert_eq!(
        proto,
        types::Entry {
            id: full.id.clone(),
            spiffe_id: full.spiffe_id.clone(),
            selectors: full.selectors.clone(),
            ..types::Entry::default()
        }
    );
    assert_eq!(proto.parent_id, None);
    assert_eq!(proto.x509_svid_ttl, 0);
    assert!(proto.dns_names.is_empty());
}

#[test]
fn an_empty_mask_still_sets_the_id() {
    let proto = entry_to_proto(&full_entry(), Some(&types::EntryMask::default()));
    assert_eq!(
        proto,
        types::Entry {
            id: "entry-1".to_owned(),
            ..types::Entry::default()
        }
    );
}

#[test]
fn each_mask_field_controls_exactly_its_field() {
    type SetMask = fn(&mut types::EntryMask);
    type CopyField = fn(&mut types::Entry, &types::Entry);
    let cases: [(&str, SetMask, CopyField); 14] = [
        (
            "spiffe_id",
            |m| m.spiffe_id = true,
            |o, f| o.spiffe_id.clone_from(&f.spiffe_id),
        ),
        (
            "parent_id",
            |m| m.parent_id = true,
            |o, f| o.parent_id.clone_from(&f.parent_id),
        ),
        (
            "selectors",
            |m| m.selectors = true,
            |o, f| o.selectors.clone_from(&f.selectors),
        ),
        (
            "x509_svid_ttl",
            |m| m.x509_svid_ttl = true,
            |o, f| o.x509_svid_ttl = f.x509_svid_ttl,
        ),
        (
            "federates_with",
            |m| m.federates_with = true,
            |o, f| {
                o.federates_with.clone_from(&f.federates_with);
            },
        ),
        ("admin", |m| m.admin = true, |o, f| o.admin = f.admin),
        (
            "downstream",
            |m| m.downstream = true,
            |o, f| o.downstream = f.downstream,
        ),
        (
            "expires_at",
            |m| m.expires_at = true,
            |o, f| o.expires_at = f.expires_at,
        ),
        (
            "dns_names",
            |m| m.dns_names = true,
            |o, f| o.dns_names.clone_from(&f.dns_names),
        ),
        (
            "revision_number",
            |m| m.revision_number = true,
            |o, f| {
                o.revision_number = f.revision_number;
            },
        ),
        (
            "store_svid",
            |m| m.store_svid = true,
            |o, f| o.store_svid = f.store_svid,
        ),
        (
            "jwt_svid_ttl",
            |m| m.jwt_svid_ttl = true,
            |o, f| o.jwt_svid_ttl = f.jwt_svid_ttl,
        ),
        ("hint", |m| m.hint = true, |o, f| o.hint.clone_from(&f.hint)),
        (
            "created_at",
            |m| m.created_at = true,
            |o, f| o.created_at = f.created_at,
        ),
    ];
    let entry = full_entry();
    let full = entry_to_proto(&entry, None);
    for (name, set_mask, copy_field) in cases {
        let mut mask = types::EntryMask::default();
        set_mask(&mut mask);
        let mut expected = types::Entry {
            id: full.id.clone(),
            ..types::Entry::default()
        };
        copy_field(&mut expected, &full);
        assert_ne!(
            expected,
            types::Entry {
                id: full.id.clone(),
                ..types::Entry::default()
            },
            "{name}"
        );
        assert_eq!(entry_to_proto(&entry, Some(&mask)), expected, "{name}");
    }
}

#[test]
fn the_agent_sync_mask_leaves_out_parent_ttls_dns_and_expiry() {
    // The mask SPIRE's agent sends with SyncAuthorizedEntries.
    let mask = types::EntryMask {
        spiffe_id: true,
        selectors: true,
        federates_with: true,
        admin: true,
        downstream: true,
        revision_number: true,
        store_svid: true,
        hint: true,
        created_at: true,
        ..types::EntryMask::default()
    };
    let proto = entry_to_proto(&full_entry(), Some(&mask));
    assert_eq!(proto.id, "entry-1");
    assert!(proto.spiffe_id.is_some());
    assert_eq!(proto.selectors.len(), 2);
    assert_eq!(proto.federates_with, ["other.example", "partner.example"]);
    assert_eq!(proto.revision_number, 7);
    assert_eq!(proto.hint, "web");
    assert_eq!(proto.created_at, 1_700_000_000);
    assert_eq!(proto.parent_id, None);
    assert_eq!((proto.x509_svid_ttl, proto.jwt_svid_ttl), (0, 0));
    assert!(proto.dns_names.is_empty());
    assert_eq!(proto.expires_at, 0);
}

/// A minimal valid create request, as `spire-server entry create` sends it.
fn minimal_proto_entry() -> types::Entry {
    types::Entry {
        spiffe_id: Some(proto_id("example.org", "/web")),
        parent_id: Some(proto_id("example.org", "/spire/agent/join_token/abc")),
        selectors: vec![proto_selector("unix", "uid:1000")],
        ..types::Entry::default()
    }
}

#[test]
fn zero_values_mean_unset_and_the_caller_fills_id_and_creation_time() {
    let input = entry_from_proto(&minimal_proto_entry()).unwrap();
    assert_eq!(input.id, None);
    assert_eq!(input.created_at, None);
    assert_eq!(input.x509_svid_ttl, None);
    assert_eq!(input.jwt_svid_ttl, None);
    assert_eq!(input.expires_at, None);
    let entry = input.into_entry(no_new_id, at(1_234));
    assert_eq!(entry.id.as_str(), "server-assigned");
    assert_eq!(entry.created_at, at(1_234));
    assert_eq!(entry.owner, None);
}

#[test]
fn federates_with_accepts_bare_names_and_spiffe_ids() {
    let mut proto = minimal_proto_entry();
    proto.federates_with = vec![
        "spiffe://partner.example".to_owned(),
        "partner.example".to_owned(),
        "other.example".to_owned(),
    ];
    let input = entry_from_proto(&proto).unwrap();
    assert_eq!(
        input.federates_with,
        BTreeSet::from([td("other.example"), td("partner.example")])
    );
}

#[test]
fn malformed_entries_are_refused_with_the_field_named() {
    type Break = fn(&mut types::Entry);
    let cases: [(Break, &str); 16] = [
        (
            |e| e.spiffe_id = Some(proto_id("Example.org", "/web")),
            "invalid spiffe_id: trust domain characters are limited to",
        ),
        (
            |e| e.spiffe_id = Some(proto_id("example.org", "web")),
            "invalid spiffe_id: path must have a leading slash",
        ),
        (
            |e| e.spiffe_id = Some(proto_id("", "/web")),
            "invalid spiffe_id: trust domain is missing",
        ),
        (|e| e.spiffe_id = None, "missing spiffe_id"),
        (
            |e| e.parent_id = Some(proto_id("example.org", "/a//b")),
            "invalid parent_id: path cannot contain empty segments",
        ),
        (|e| e.parent_id = None, "missing parent_id"),
        (
            |e| e.x509_svid_ttl = -1,
            "x509_svid_ttl cannot be negative, got -1",
        ),
        (
            |e| e.jwt_svid_ttl = -300,
            "jwt_svid_ttl cannot be negative, got -300",
        ),
        (
            |e| e.expires_at = -1,
            "expires_at cannot be negative, got -1",
        ),
        (
            |e| e.created_at = -5,
            "created_at cannot be negative, got -5",
        ),
        (
            |e| e.selectors = vec![proto_selector("", "uid:1000")],
            "invalid selectors: selector type cannot be empty",
        ),
        (
            |e| e.selectors.push(proto_selector("unix", "")),
            "invalid selectors: selector value cannot be empty",
        ),
        (|e| e.selectors.clear(), "selectors cannot be empty"),
        (
            |e| e.federates_with = vec!["Bad.Example".to_owned()],
            "invalid federates_with \"Bad.Example\": trust domain characters are limited to",
        ),
        (
            |e| e.federates_with = vec![String::new()],
            "missing federates_with",
        ),
        (|e| e.id = "a/b".to_owned(), "invalid id: entry ID \"a/b\""),
    ];
    for (break_entry, expected) in cases {
        let mut proto = minimal_proto_entry();
        break_entry(&mut proto);
        let message = entry_from_proto(&proto).unwrap_err().to_string();
        assert!(
            message.starts_with(expected),
            "expected {expected:?}, got {message:?}"
        );
    }
}

#[test]
fn error_variants_carry_the_field() {
    let mut proto = minimal_proto_entry();
    proto.x509_svid_ttl = -1;
    assert!(matches!(
        entry_from_proto(&proto),
        Err(ConvertError::Negative {
            field: "x509_svid_ttl",
            value: -1
        })
    ));
    proto = minimal_proto_entry();
    proto.parent_id = Some(proto_id("example.org", "nope"));
    assert!(matches!(
        entry_from_proto(&proto),
        Err(ConvertError::InvalidSpiffeId {
            field: "parent_id",
            ..
        })
    ));
}

#[test]
fn an_update_replaces_only_the_masked_fields() {
    let current = full_entry();
    let update = types::Entry {
        id: "entry-1".to_owned(),
        hint: "new-hint".to_owned(),
        x509_svid_ttl: 60,
        // Not in the mask: neither read nor checked.
        spiffe_id: None,
        expires_at: -1,
        ..types::Entry::default()
    };
    let mask = types::EntryMask {
        hint: true,
        x509_svid_ttl: true,
        ..types::EntryMask::default()
    };
    let updated = entry_update_from_proto(&current, &update, Some(&mask)).unwrap();
    let mut expected = current.clone();
    expected.hint = "new-hint".to_owned();
    expected.x509_svid_ttl = Some(Duration::from_secs(60));
    assert_eq!(updated, expected);
}

#[test]
fn an_unmasked_update_replaces_every_client_field_but_keeps_server_fields() {
    let mut current = full_entry();
    current.owner = Some("team-web".to_owned());
    let mut update = minimal_proto_entry();
    update.id = "entry-1".to_owned();
    update.revision_number = 99;
    update.created_at = 5;
    let updated = entry_update_from_proto(&current, &update, None).unwrap();
    assert_eq!(updated.id, current.id);
    assert_eq!(updated.revision_number, 7);
    assert_eq!(updated.created_at, current.created_at);
    assert_eq!(updated.owner, current.owner);
    assert_eq!(updated.spiffe_id, id("spiffe://example.org/web"));
    assert_eq!(updated.x509_svid_ttl, None);
    assert!(updated.federates_with.is_empty());
    assert!(updated.dns_names.is_empty());
    assert!(!updated.admin && !updated.downstream && !updated.store_svid);
    assert_eq!(updated.expires_at, None);
    assert_eq!(updated.hint, "");

    update.selectors.clear();
    let err = entry_update_from_proto(&current, &update, None).unwrap_err();
    assert_eq!(err.to_string(), "selectors cannot be empty");
}

#[test]
fn spiffe_ids_convert_both_ways() {
    let web = id("spiffe://example.org/ns/prod/web");
    let proto = spiffe_id_to_proto(&web);
    assert_eq!(proto, proto_id("example.org", "/ns/prod/web"));
    assert_eq!(spiffe_id_from_proto(&proto).unwrap(), web);
    assert_eq!(SpiffeId::try_from(&proto).unwrap(), web);
    assert_eq!(types::Spiffeid::from(&web), proto);

    let root = td("example.org").id();
    assert_eq!(spiffe_id_to_proto(&root), proto_id("example.org", ""));
    assert_eq!(
        spiffe_id_from_proto(&proto_id("example.org", "")).unwrap(),
        root
    );
    // go-spiffe accepts the trust domain's SPIFFE ID form as well.
    assert_eq!(
        spiffe_id_from_proto(&proto_id("spiffe://example.org", "/ns/prod/web")).unwrap(),
        web
    );

    let err = spiffe_id_field_from_proto("by_parent_id", None).unwrap_err();
    assert_eq!(err.to_string(), "missing by_parent_id");
    let err = spiffe_id_field_from_proto("by_parent_id", Some(&proto_id("example.org", "/a/")))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid by_parent_id: path cannot have a trailing slash"
    );
}

#[test]
fn selectors_and_ids_convert_both_ways() {
    let selector: Selector = "k8s:pod-label:app:web".parse().unwrap();
    let proto = selector_to_proto(&selector);
    assert_eq!(proto, proto_selector("k8s", "pod-label:app:web"));
    assert_eq!(selector_from_proto(&proto).unwrap(), selector);
    assert_eq!(Selector::try_from(&proto).unwrap(), selector);
    assert_eq!(types::Selector::from(&selector), proto);
    let err = selector_from_proto(&proto_selector("a:b", "c")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid selector: selector type \"a:b\" cannot contain ':'"
    );

    assert_eq!(entry_id_from_proto("e-1").unwrap().as_str(), "e-1");
    assert_eq!(
        entry_id_from_proto("").unwrap_err().to_string(),
        "invalid id: entry ID cannot be empty"
    );

    assert_eq!(
        trust_domain_from_proto("trust_domain", "spiffe://example.org").unwrap(),
        td("example.org")
    );
}

struct Pki {
    bundle: TrustBundle,
    root_der: Vec<u8>,
    jwt_key: KeyPair,
}

/// A bundle with a tainted and an untainted CA, and a tainted JWT key with an expiry beside
/// one without, all generated now.
fn pki() -> Pki {
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let example = td("example.org");
    let root_key = KeyPair::generate(KeyType::EcP256).unwrap();
    let root_der =
        create_self_signed_ca(&example, &root_key, &CaSubject::default(), now, day).unwrap();
    let old_key = KeyPair::generate(KeyType::EcP384).unwrap();
    let old_der =
        create_self_signed_ca(&example, &old_key, &CaSubject::default(), now, day).unwrap();
    let jwt_key = KeyPair::generate(KeyType::EcP256).unwrap();
    let old_jwt_key = KeyPair::generate(KeyType::EcP256).unwrap();

    let mut bundle = TrustBundle::new(example);
    bundle.add_x509_authority(X509Authority::new(old_der).unwrap().with_tainted(true));
    bundle.add_x509_authority(X509Authority::new(root_der.clone()).unwrap());
    bundle
        .add_jwt_authority(
            JwtAuthority::from_key_pair("old-kid", &old_jwt_key, Some(at(1_900_000_000)))
                .unwrap()
                .with_tainted(true),
        )
        .unwrap();
    bundle
        .add_jwt_authority(JwtAuthority::from_key_pair("kid-1", &jwt_key, None).unwrap())
        .unwrap();
    bundle.set_refresh_hint(Some(Duration::from_secs(300)));
    bundle.set_sequence_number(42);
    Pki {
        bundle,
        root_der,
        jwt_key,
    }
}

#[test]
fn bundle_round_trips_through_proto() {
    let Pki {
        bundle, root_der, ..
    } = pki();
    let proto = bundle_to_proto(&bundle);
    assert_eq!(proto.trust_domain, "example.org");
    assert_eq!(proto.x509_authorities.len(), 2);
    assert!(proto.x509_authorities[0].tainted);
    assert!(!proto.x509_authorities[1].tainted);
    assert_eq!(proto.x509_authorities[1].asn1, root_der);
    assert_eq!(proto.jwt_authorities[0].key_id, "old-kid");
    assert_eq!(proto.jwt_authorities[0].expires_at, 1_900_000_000);
    assert!(proto.jwt_authorities[0].tainted);
    assert_eq!(proto.jwt_authorities[1].key_id, "kid-1");
    assert_eq!(proto.jwt_authorities[1].expires_at, 0);
    assert!(!proto.jwt_authorities[1].tainted);
    assert_eq!(proto.refresh_hint, 300);
    assert_eq!(proto.sequence_number, 42);

    let back = bundle_from_proto(&proto).unwrap();
    assert_eq!(back, bundle);
    assert_eq!(TrustBundle::try_from(&proto).unwrap(), bundle);
    assert_eq!(types::Bundle::from(&bundle), proto);
    assert_eq!(
        bundle_to_proto_masked(&bundle, Some(&bundle_mask_all())),
        proto
    );
}

#[test]
fn bundle_trust_domain_may_arrive_in_spiffe_form_but_leaves_bare() {
    let Pki { bundle, .. } = pki();
    let mut proto = bundle_to_proto(&bundle);
    proto.trust_domain = "spiffe://example.org".to_owned();
    let parsed = bundle_from_proto(&proto).unwrap();
    assert_eq!(parsed, bundle);
    assert_eq!(bundle_to_proto(&parsed).trust_domain, "example.org");
}

#[test]
fn an_empty_bundle_has_zero_hint_and_sequence() {
    let bundle = TrustBundle::new(td("partner.example"));
    let proto = bundle_to_proto(&bundle);
    assert_eq!(
        proto,
        types::Bundle {
            trust_domain: "partner.example".to_owned(),
            ..types::Bundle::default()
        }
    );
    let back = bundle_from_proto(&proto).unwrap();
    assert_eq!(back, bundle);
    assert_eq!(back.refresh_hint(), None);
}

#[test]
fn a_repeated_certificate_is_kept_once_and_tainted_if_any_copy_is() {
    let Pki { root_der, .. } = pki();
    let cert = |tainted| types::X509Certificate {
        asn1: root_der.clone(),
        tainted,
        hint: String::new(),
    };
    let proto = types::Bundle {
        trust_domain: "example.org".to_owned(),
        x509_authorities: vec![cert(false), cert(true)],
        ..types::Bundle::default()
    };
    let bundle = bundle_from_proto(&proto).unwrap();
    assert_eq!(bundle.x509_authorities().len(), 1);
    assert!(bundle.x509_authorities()[0].is_tainted());
}

#[test]
fn a_bundle_mask_leaves_other_fields_at_their_defaults() {
    let Pki { bundle, .. } = pki();
    let mask = types::BundleMask {
        x509_authorities: true,
        ..types::BundleMask::default()
    };
    let proto = bundle_to_proto_masked(&bundle, Some(&mask));
    assert_eq!(proto.trust_domain, "example.org");
    assert_eq!(proto.x509_authorities.len(), 2);
    assert!(proto.jwt_authorities.is_empty());
    assert_eq!((proto.refresh_hint, proto.sequence_number), (0, 0));

    let proto = bundle_to_proto_masked(&bundle, Some(&types::BundleMask::default()));
    assert_eq!(
        proto,
        types::Bundle {
            trust_domain: "example.org".to_owned(),
            ..types::Bundle::default()
        }
    );
}

#[test]
fn malformed_bundles_are_refused_with_the_field_named() {
    let Pki {
        bundle, jwt_key, ..
    } = pki();
    let valid = bundle_to_proto(&bundle);
    type Break = Box<dyn Fn(&mut types::Bundle)>;
    let public_key = jwt_key.public_key_der();
    let cases: Vec<(Break, &str)> = vec![
        (
            Box::new(|b| b.trust_domain = "Example.org".to_owned()),
            "invalid trust_domain \"Example.org\": trust domain characters",
        ),
        (Box::new(|b| b.trust_domain.clear()), "missing trust_domain"),
        (
            Box::new(|b| b.x509_authorities[1].asn1 = b"not a certificate".to_vec()),
            "invalid x509_authorities[1]: invalid X.509 certificate",
        ),
        (
            Box::new(|b| {
                let cert = b.x509_authorities[0].asn1.clone();
                b.x509_authorities[0].asn1.extend_from_slice(&cert);
            }),
            "invalid x509_authorities[0]: invalid X.509 certificate: trailing bytes",
        ),
        (
            Box::new(|b| b.jwt_authorities[1].key_id.clear()),
            "invalid jwt_authorities[1]: JWT authority key id must not be empty",
        ),
        (
            Box::new(|b| b.jwt_authorities[0].public_key = vec![1, 2, 3]),
            "invalid jwt_authorities[0]: invalid or unsupported public key",
        ),
        (
            Box::new(move |b| {
                b.jwt_authorities[0].key_id = "kid-1".to_owned();
                b.jwt_authorities[1].public_key.clone_from(&public_key);
            }),
            "invalid jwt_authorities[1]: JWT authority key id \"kid-1\" is already used",
        ),
        (
            Box::new(|b| b.jwt_authorities[0].expires_at = -1),
            "jwt_authorities.expires_at cannot be negative, got -1",
        ),
        (
            Box::new(|b| b.refresh_hint = -300),
            "refresh_hint cannot be negative, got -300",
        ),
    ];
    for (break_bundle, expected) in cases {
        let mut proto = valid.clone();
        break_bundle(&mut proto);
        let message = bundle_from_proto(&proto).unwrap_err().to_string();
        assert!(
            message.starts_with(expected),
            "expected {expected:?}, got {message:?}"
        );
    }
}

#[test]
fn x509_svids_carry_chain_id_expiry_and_hint() {
    let now = SystemTime::now();
    let example = td("example.org");
    let ca = X509Ca::self_signed(
        &example,
        KeyPair::generate(KeyType::EcP256).unwrap(),
        &CaSubject::default(),
        now,
        Duration::from_secs(86_400),
    )
    .unwrap();
    let leaf_key = KeyPair::generate(KeyType::EcP256).unwrap();
    let web = id("spiffe://example.org/web");
    let svid = ca
        .mint_svid(
            &SvidParams::new(
                web.clone(),
                leaf_key.public_key_der(),
                Duration::from_secs(3600),
            ),
            now,
        )
        .unwrap();

    let proto = x509_svid_to_proto(&svid, "web");
    assert_eq!(proto.cert_chain, svid.cert_chain());
    assert_eq!(proto.id, Some(proto_id("example.org", "/web")));
    let not_after = svid
        .not_after()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(proto.expires_at, i64::try_from(not_after).unwrap());
    assert_eq!(proto.hint, "web");

    assert_eq!(x509_svid_from_proto(&proto).unwrap(), svid);
    let err = x509_svid_from_proto(&types::X509svid::default()).unwrap_err();
    assert!(err.to_string().starts_with("invalid cert_chain: "), "{err}");
    let garbage = types::X509svid {
        cert_chain: vec![b"junk".to_vec()],
        ..types::X509svid::default()
    };
    let err = x509_svid_from_proto(&garbage).unwrap_err();
    assert!(err.to_string().starts_with("invalid cert_chain: "), "{err}");
}

#[test]
fn jwt_svids_carry_token_id_times_and_hint() {
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let web = id("spiffe://example.org/web");
    let audiences = ["db".to_owned()];
    let svid = mint_jwt_svid(
        &JwtSigningKey {
            key: &key,
            key_id: "kid-1",
            expires_at: None,
        },
        &JwtSvidParams {
            spiffe_id: &web,
            audiences: &audiences,
            ttl: Duration::from_secs(300),
            issuer: None,
        },
        at(1_700_000_000),
    )
    .unwrap();

    let proto = jwt_svid_to_proto(&svid, "web");
    assert_eq!(proto.token, svid.token);
    assert_eq!(proto.id, Some(proto_id("example.org", "/web")));
    assert_eq!(proto.issued_at, 1_700_000_000);
    assert_eq!(proto.expires_at, 1_700_000_300);
    assert_eq!(proto.hint, "web");
}

#[test]
fn batch_statuses_follow_spire() {
    assert_eq!(
        ok_status(),
        types::Status {
            code: 0,
            message: "OK".to_owned()
        }
    );
    assert_eq!(
        status(tonic::Code::NotFound, "entry not found"),
        types::Status {
            code: 5,
            message: "entry not found".to_owned()
        }
    );
    assert_eq!(
        status_from_tonic(&tonic::Status::already_exists(
            "similar entry already exists"
        )),
        types::Status {
            code: 6,
            message: "similar entry already exists".to_owned()
        }
    );
}

fn proto_relationship(trust_domain: &str, url: &str) -> types::FederationRelationship {
    use types::federation_relationship::BundleEndpointProfile as Profile;
    types::FederationRelationship {
        trust_domain: trust_domain.to_owned(),
        bundle_endpoint_url: url.to_owned(),
        bundle_endpoint_profile: Some(Profile::HttpsSpiffe(types::HttpsspiffeProfile {
            endpoint_spiffe_id: format!("spiffe://{trust_domain}/spire/server"),
        })),
        trust_domain_bundle: None,
    }
}

#[test]
fn federation_relationships_round_trip_through_proto() {
    let Pki { bundle, .. } = pki();
    let mut proto = proto_relationship("example.org", "https://example.org:8443/bundle");
    proto.trust_domain_bundle = Some(bundle_to_proto(&bundle));
    let parsed = federation_relationship_from_proto(&proto).unwrap();
    assert_eq!(parsed.trust_domain(), &td("example.org"));
    assert_eq!(
        parsed.bundle_endpoint_url().as_str(),
        "https://example.org:8443/bundle"
    );
    assert_eq!(
        parsed.profile(),
        &BundleEndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: id("spiffe://example.org/spire/server")
        }
    );
    assert_eq!(parsed.trust_domain_bundle(), Some(&bundle));
    assert_eq!(federation_relationship_to_proto(&parsed, None), proto);
    assert_eq!(types::FederationRelationship::from(&parsed), proto);
    assert_eq!(FederationRelationship::try_from(&proto).unwrap(), parsed);

    // A trust domain in `spiffe://` form is accepted and leaves bare.
    let mut spiffe_form = proto.clone();
    spiffe_form.trust_domain = "spiffe://example.org".to_owned();
    let parsed = federation_relationship_from_proto(&spiffe_form).unwrap();
    assert_eq!(
        federation_relationship_to_proto(&parsed, None).trust_domain,
        "example.org"
    );

    // Masks: the trust domain is always there.
    let empty = types::FederationRelationshipMask::default();
    assert_eq!(
        federation_relationship_to_proto(&parsed, Some(&empty)),
        types::FederationRelationship {
            trust_domain: "example.org".to_owned(),
            ..types::FederationRelationship::default()
        }
    );
    let profile_only = types::FederationRelationshipMask {
        bundle_endpoint_profile: true,
        ..types::FederationRelationshipMask::default()
    };
    let masked = federation_relationship_to_proto(&parsed, Some(&profile_only));
    assert!(masked.bundle_endpoint_profile.is_some());
    assert!(masked.bundle_endpoint_url.is_empty());
    assert!(masked.trust_domain_bundle.is_none());
    assert_eq!(relationship_mask_from_proto(None), RelationshipMask::ALL);
    assert_eq!(
        relationship_mask_from_proto(Some(&profile_only)),
        RelationshipMask {
            bundle_endpoint_url: false,
            bundle_endpoint_profile: true,
            trust_domain_bundle: false,
        }
    );
}

#[test]
fn malformed_federation_relationships_are_refused_with_spires_texts() {
    let good = proto_relationship("partner.example", "https://partner.example/bundle");
    let refused = |edit: &dyn Fn(&mut types::FederationRelationship)| {
        let mut proto = good.clone();
        edit(&mut proto);
        federation_relationship_from_proto(&proto)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        refused(&|r| r.trust_domain = "Partner.example".into()),
        "failed to parse trust domain: trust domain characters are limited to lowercase \
         letters, numbers, dots, dashes, and underscores"
    );
    assert_eq!(
        refused(&|r| r.trust_domain = String::new()),
        "failed to parse trust domain: trust domain is missing"
    );
    assert_eq!(
        refused(&|r| r.bundle_endpoint_url = "http://partner.example/bundle".into()),
        "bundle endpoint URL must use the https scheme"
    );
    assert_eq!(
        refused(&|r| r.bundle_endpoint_url = "https://me@partner.example/".into()),
        "bundle endpoint URL must not contain user info"
    );
    assert!(
        refused(&|r| r.bundle_endpoint_url = "https://partner example/".into())
            .starts_with("failed to parse bundle endpoint URL: ")
    );
    assert_eq!(
        refused(&|r| r.bundle_endpoint_profile = None),
        "missing bundle_endpoint_profile"
    );
    assert_eq!(
        refused(&|r| {
            r.bundle_endpoint_profile = Some(
                types::federation_relationship::BundleEndpointProfile::HttpsSpiffe(
                    types::HttpsspiffeProfile::default(),
                ),
            );
        }),
        "failed to parse endpoint SPIFFE ID: cannot be empty"
    );
    assert_eq!(
        refused(&|r| {
            r.trust_domain_bundle = Some(types::Bundle {
                trust_domain: "other.example".into(),
                ..types::Bundle::default()
            });
        }),
        "trust domain bundle (\"other.example\") must match the trust domain of the federation \
         relationship (\"partner.example\")"
    );
    assert!(
        refused(&|r| {
            r.trust_domain_bundle = Some(types::Bundle {
                trust_domain: "partner.example".into(),
                x509_authorities: vec![types::X509Certificate {
                    asn1: vec![1, 2, 3],
                    ..types::X509Certificate::default()
                }],
                ..types::Bundle::default()
            });
        })
        .starts_with("failed to parse bundle: invalid x509_authorities[0]: ")
    );
    // An endpoint in another trust domain is SPIRE's to allow, and Lanyard's.
    let mut elsewhere = good.clone();
    elsewhere.bundle_endpoint_profile = Some(
        types::federation_relationship::BundleEndpointProfile::HttpsSpiffe(
            types::HttpsspiffeProfile {
                endpoint_spiffe_id: "spiffe://bundles.example/endpoint".into(),
            },
        ),
    );
    assert!(federation_relationship_from_proto(&elsewhere).is_ok());
}

#[test]
fn a_stored_entry_carries_its_governance_metadata_through_proto() {
    let mut entry = full_entry();
    entry.owner = Some("team-web".to_owned());
    entry.reason = Some("serves the web".to_owned());
    entry.ticket = None;
    entry.source = Some("payments".to_owned());
    let proto = entry_to_proto(&entry, None);
    let metadata = entry_metadata_to_proto(&entry);
    assert_eq!(metadata.ticket, "", "an unset field is empty on the wire");
    assert_eq!(
        stored_entry_from_proto(&proto, Some(&metadata)).unwrap(),
        entry
    );

    let bare = stored_entry_from_proto(&proto, None).unwrap();
    assert_eq!((bare.owner, bare.source), (None, None));

    let no_id = types::Entry {
        id: String::new(),
        ..proto
    };
    let err = stored_entry_from_proto(&no_id, None).unwrap_err();
    assert!(
        matches!(err, ConvertError::Missing { field: "id" }),
        "{err}"
    );
}

#[test]
fn agents_round_trip_through_proto_and_a_ban_clears_the_serial() {
    let mut agent = AttestedAgent::new(
        id("spiffe://example.org/spire/agent/join_token/abc"),
        "join_token",
        "12345",
        at(1_700_000_000),
    );
    agent.can_reattest = true;
    agent.selectors = ["tpm:pub_hash:abc"]
        .into_iter()
        .map(|s| s.parse::<Selector>().unwrap())
        .collect();
    assert_eq!(
        agent_from_proto(&agent_to_proto(&agent, None)).unwrap(),
        agent
    );

    let mut banned = agent_to_proto(&agent, None);
    banned.banned = true;
    assert!(agent_from_proto(&banned).unwrap().is_banned());

    let nameless = types::Agent { id: None, ..banned };
    assert!(agent_from_proto(&nameless).is_err());
}

#[test]
fn exceptions_round_trip_through_proto() {
    let mut exception = Exception {
        id: "exc-1".to_owned(),
        owner: "team-ci".to_owned(),
        reason: "legacy runner".to_owned(),
        ticket: Some("SEC-1".to_owned()),
        rules: ["max_ttl".to_owned()].into(),
        entry_ids: ["entry-1".to_owned()].into(),
        spiffe_id_pattern: Some("spiffe://example.org/ci/*".to_owned()),
        expires_at: at(1_800_000_000),
        created_at: at(1_700_000_000),
        created_by: "local uid 0".to_owned(),
        revoked_at: Some(at(1_750_000_000)),
        revision: 3,
    };
    assert_eq!(
        exception_from_proto(&exception_to_proto(&exception)).unwrap(),
        exception
    );
    exception.ticket = None;
    exception.spiffe_id_pattern = None;
    exception.revoked_at = None;
    let proto = exception_to_proto(&exception);
    assert_eq!((proto.revoked_at, proto.ticket.as_str()), (0, ""));
    assert_eq!(exception_from_proto(&proto).unwrap(), exception);
}

#[test]
fn ledger_records_round_trip_through_proto() {
    let usage = EntryUsage {
        entry_id: "entry-1".to_owned(),
        agent_id: "spiffe://example.org/spire/agent/x".to_owned(),
        last_issued_at: Some(at(1_700_000_000)),
        last_served_at: None,
        issued: 4,
    };
    assert_eq!(usage_from_proto(&usage_to_proto(&usage)).unwrap(), usage);

    let issuance = Issuance {
        kind: IssuanceKind::JwtSvid,
        serial: "jti-1".to_owned(),
        entry_id: "entry-1".to_owned(),
        spiffe_id: id("spiffe://example.org/web"),
        agent_id: id("spiffe://example.org/spire/agent/x"),
        authority_id: "kid-1".to_owned(),
        issued_at: at(1_700_000_000),
        not_after: at(1_700_000_300),
        exception_ids: vec!["exc-1".to_owned()],
    };
    let mut proto = issuance_to_proto(&issuance);
    assert_eq!(issuance_from_proto(&proto).unwrap(), issuance);
    proto.kind = "paper-svid".to_owned();
    let err = issuance_from_proto(&proto).unwrap_err();
    assert_eq!(err.to_string(), "unknown kind \"paper-svid\"");
}
