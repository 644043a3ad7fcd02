//! Field numbers and wire types must equal spire-api-sdk's and SPIFFE's:
//! encode messages with one field set and compare the exact bytes, so a
//! renumbered field fails here rather than against a real SPIRE peer.

use lanyard_proto::spire::api::server::agent::v1::{AttestAgentResponse, attest_agent_response};
use lanyard_proto::spire::api::server::entry::v1::{EntryRevision, SyncAuthorizedEntriesResponse};
use lanyard_proto::spire::api::server::svid::v1::{BatchNewX509svidResponse, NewX509svidParams};
use lanyard_proto::spire::api::server::trustdomain::v1::{
    BatchDeleteFederationRelationshipResponse, batch_delete_federation_relationship_response,
};
use lanyard_proto::spire::api::types::{
    Bundle, Entry, EntryMask, FederationRelationship, FederationRelationshipMask, HttpsWebProfile,
    HttpsspiffeProfile, JwtKey, PermissionDeniedDetails, Selector, Spiffeid, Status,
    X509Certificate, federation_relationship::BundleEndpointProfile,
    permission_denied_details::Reason,
};
use lanyard_proto::workload::{JwtsvidRequest, X509svid, X509svidResponse};
use prost::{Message, Name};

fn spiffe_id(trust_domain: &str, path: &str) -> Option<Spiffeid> {
    Some(Spiffeid {
        trust_domain: trust_domain.to_owned(),
        path: path.to_owned(),
    })
}

/// Bytes of `SPIFFEID { trust_domain: "td", path: "/w" }`.
const SPIFFE_ID_TD_W: [u8; 8] = [0x0a, 2, b't', b'd', 0x12, 2, b'/', b'w'];

fn with_tag(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = vec![tag, u8::try_from(body.len()).expect("short test body")];
    bytes.extend_from_slice(body);
    bytes
}

#[test]
fn entry_fields_have_spire_numbers() {
    let selector_bytes = [
        0x0a, 4, b'u', b'n', b'i', b'x', 0x12, 5, b'u', b'i', b'd', b':', b'0',
    ];
    let cases: Vec<(&str, Entry, Vec<u8>)> = vec![
        (
            "id = 1",
            Entry {
                id: "e".into(),
                ..Entry::default()
            },
            vec![0x0a, 1, b'e'],
        ),
        (
            "spiffe_id = 2",
            Entry {
                spiffe_id: spiffe_id("td", "/w"),
                ..Entry::default()
            },
            with_tag(0x12, &SPIFFE_ID_TD_W),
        ),
        (
            "parent_id = 3",
            Entry {
                parent_id: spiffe_id("td", "/w"),
                ..Entry::default()
            },
            with_tag(0x1a, &SPIFFE_ID_TD_W),
        ),
        (
            "selectors = 4",
            Entry {
                selectors: vec![Selector {
                    r#type: "unix".into(),
                    value: "uid:0".into(),
                }],
                ..Entry::default()
            },
            with_tag(0x22, &selector_bytes),
        ),
        (
            "x509_svid_ttl = 5",
            Entry {
                x509_svid_ttl: 3600,
                ..Entry::default()
            },
            vec![0x28, 0x90, 0x1c],
        ),
        (
            "federates_with = 6",
            Entry {
                federates_with: vec!["b".into()],
                ..Entry::default()
            },
            vec![0x32, 1, b'b'],
        ),
        (
            "admin = 7",
            Entry {
                admin: true,
                ..Entry::default()
            },
            vec![0x38, 1],
        ),
        (
            "downstream = 8",
            Entry {
                downstream: true,
                ..Entry::default()
            },
            vec![0x40, 1],
        ),
        (
            "expires_at = 9",
            Entry {
                expires_at: 3,
                ..Entry::default()
            },
            vec![0x48, 3],
        ),
        (
            "dns_names = 10",
            Entry {
                dns_names: vec!["d".into()],
                ..Entry::default()
            },
            vec![0x52, 1, b'd'],
        ),
        (
            "revision_number = 11",
            Entry {
                revision_number: 7,
                ..Entry::default()
            },
            vec![0x58, 7],
        ),
        (
            "store_svid = 12",
            Entry {
                store_svid: true,
                ..Entry::default()
            },
            vec![0x60, 1],
        ),
        (
            "jwt_svid_ttl = 13",
            Entry {
                jwt_svid_ttl: 5,
                ..Entry::default()
            },
            vec![0x68, 5],
        ),
        (
            "hint = 14",
            Entry {
                hint: "h".into(),
                ..Entry::default()
            },
            vec![0x72, 1, b'h'],
        ),
        (
            "created_at = 15",
            Entry {
                created_at: 9,
                ..Entry::default()
            },
            vec![0x78, 9],
        ),
    ];
    for (field, entry, expected) in cases {
        assert_eq!(entry.encode_to_vec(), expected, "Entry.{field}");
    }
}

#[test]
fn entry_mask_fields_have_spire_numbers() {
    let mask = EntryMask {
        spiffe_id: true,
        revision_number: true,
        created_at: true,
        ..EntryMask::default()
    };
    assert_eq!(mask.encode_to_vec(), vec![0x10, 1, 0x58, 1, 0x78, 1]);
}

#[test]
fn unknown_fields_from_newer_peers_are_skipped() {
    // Entry with id "e" followed by field 16 (varint 5) and field 17
    // (length-delimited "x"), as a newer SPIRE might send.
    let bytes = [0x0a, 1, b'e', 0x80, 0x01, 5, 0x8a, 0x01, 1, b'x'];
    let entry = Entry::decode(bytes.as_slice()).expect("unknown fields are skipped");
    assert_eq!(entry.id, "e");
}

#[test]
fn bundle_fields_have_spire_numbers() {
    let bundle = Bundle {
        trust_domain: "td".into(),
        x509_authorities: vec![X509Certificate {
            asn1: vec![0xaa],
            tainted: true,
            hint: String::new(),
        }],
        jwt_authorities: vec![JwtKey {
            public_key: vec![0xbb],
            key_id: "k".into(),
            expires_at: 1,
            tainted: false,
            hint: String::new(),
        }],
        refresh_hint: 2,
        sequence_number: 3,
    };
    let expected = [
        // trust_domain = 1
        &[0x0a, 2, b't', b'd'][..],
        // x509_authorities = 2 { asn1 = 1, tainted = 2 }
        &[0x12, 5, 0x0a, 1, 0xaa, 0x10, 1],
        // jwt_authorities = 3 { public_key = 1, key_id = 2, expires_at = 3 }
        &[0x1a, 8, 0x0a, 1, 0xbb, 0x12, 1, b'k', 0x18, 1],
        // refresh_hint = 4, sequence_number = 5
        &[0x20, 2, 0x28, 3],
    ]
    .concat();
    assert_eq!(bundle.encode_to_vec(), expected);
}

#[test]
fn federation_relationship_fields_have_spire_numbers() {
    let spiffe = FederationRelationship {
        trust_domain: "td".into(),
        bundle_endpoint_url: "u".into(),
        bundle_endpoint_profile: Some(BundleEndpointProfile::HttpsSpiffe(HttpsspiffeProfile {
            endpoint_spiffe_id: "e".into(),
        })),
        trust_domain_bundle: Some(Bundle {
            trust_domain: "td".into(),
            ..Bundle::default()
        }),
    };
    let expected = [
        // trust_domain = 1, bundle_endpoint_url = 2
        &[0x0a, 2, b't', b'd', 0x12, 1, b'u'][..],
        // https_spiffe = 4 { endpoint_spiffe_id = 1 }
        &[0x22, 3, 0x0a, 1, b'e'],
        // trust_domain_bundle = 5 { trust_domain = 1 }
        &[0x2a, 4, 0x0a, 2, b't', b'd'],
    ]
    .concat();
    assert_eq!(spiffe.encode_to_vec(), expected);
    // https_web = 3, an empty message that is there all the same.
    let web = FederationRelationship {
        bundle_endpoint_profile: Some(BundleEndpointProfile::HttpsWeb(HttpsWebProfile {})),
        ..FederationRelationship::default()
    };
    assert_eq!(web.encode_to_vec(), [0x1a, 0]);
    let mask = FederationRelationshipMask {
        bundle_endpoint_url: true,
        bundle_endpoint_profile: true,
        trust_domain_bundle: true,
    };
    assert_eq!(mask.encode_to_vec(), [0x08, 1, 0x10, 1, 0x18, 1]);
    // A delete result: status = 1, trust_domain = 2.
    let deleted = BatchDeleteFederationRelationshipResponse {
        results: vec![batch_delete_federation_relationship_response::Result {
            status: Some(Status {
                code: 5,
                message: String::new(),
            }),
            trust_domain: "td".into(),
        }],
    };
    assert_eq!(
        deleted.encode_to_vec(),
        [0x0a, 8, 0x0a, 2, 0x08, 5, 0x12, 2, b't', b'd']
    );
    assert_eq!(
        FederationRelationship::full_name(),
        "spire.api.types.FederationRelationship"
    );
}

#[test]
fn attestation_result_carries_reattestable_as_field_two() {
    let response = AttestAgentResponse {
        step: Some(attest_agent_response::Step::Result(
            attest_agent_response::Result {
                svid: None,
                reattestable: true,
            },
        )),
    };
    assert_eq!(response.encode_to_vec(), vec![0x0a, 2, 0x10, 1]);

    let challenge = AttestAgentResponse {
        step: Some(attest_agent_response::Step::Challenge(vec![0xcc])),
    };
    assert_eq!(challenge.encode_to_vec(), vec![0x12, 1, 0xcc]);
}

#[test]
fn sync_authorized_entries_response_fields_have_spire_numbers() {
    let response = SyncAuthorizedEntriesResponse {
        entry_revisions: vec![EntryRevision {
            id: "e".into(),
            revision_number: 4,
            created_at: 6,
        }],
        entries: vec![Entry {
            id: "f".into(),
            ..Entry::default()
        }],
        more: true,
    };
    let expected = [
        // entry_revisions = 1 { id = 1, revision_number = 2, created_at = 3 }
        &[0x0a, 7, 0x0a, 1, b'e', 0x10, 4, 0x18, 6][..],
        // entries = 2 { id = 1 }
        &[0x12, 3, 0x0a, 1, b'f'],
        // more = 3
        &[0x18, 1],
    ]
    .concat();
    assert_eq!(response.encode_to_vec(), expected);
}

#[test]
fn batch_new_x509_svid_fields_have_spire_numbers() {
    let params = NewX509svidParams {
        entry_id: "e".into(),
        csr: vec![0xdd],
    };
    assert_eq!(params.encode_to_vec(), vec![0x0a, 1, b'e', 0x12, 1, 0xdd]);

    let response = BatchNewX509svidResponse {
        results: vec![
            lanyard_proto::spire::api::server::svid::v1::batch_new_x509svid_response::Result {
                status: Some(Status {
                    code: 5,
                    message: String::new(),
                }),
                svid: None,
            },
        ],
    };
    assert_eq!(response.encode_to_vec(), vec![0x0a, 4, 0x0a, 2, 0x08, 5]);
}

#[test]
fn permission_denied_details_round_trip_as_any() {
    assert_eq!(
        PermissionDeniedDetails::type_url(),
        "type.googleapis.com/spire.api.types.PermissionDeniedDetails"
    );
    let details = PermissionDeniedDetails {
        reason: Reason::AgentMustReattest.into(),
    };
    assert_eq!(details.encode_to_vec(), vec![0x08, 5]);
    assert_eq!(i32::from(Reason::AgentBanned), 4);
    assert_eq!(
        Reason::from_str_name("AGENT_NOT_ACTIVE"),
        Some(Reason::AgentNotActive)
    );

    let any = prost_types::Any::from_msg(&details).expect("encode as Any");
    let back: PermissionDeniedDetails = any.to_msg().expect("decode from Any");
    assert_eq!(back.reason(), Reason::AgentMustReattest);
}

#[test]
fn workload_api_fields_have_spiffe_numbers() {
    let svid = X509svid {
        spiffe_id: String::new(),
        x509_svid: Vec::new(),
        x509_svid_key: Vec::new(),
        bundle: vec![0xee],
        hint: "h".into(),
    };
    assert_eq!(svid.encode_to_vec(), vec![0x22, 1, 0xee, 0x2a, 1, b'h']);

    let response = X509svidResponse {
        svids: Vec::new(),
        crl: Vec::new(),
        federated_bundles: [("spiffe://b".to_owned(), vec![0xff])]
            .into_iter()
            .collect(),
    };
    let mut expected = vec![0x1a, 15, 0x0a, 10];
    expected.extend_from_slice(b"spiffe://b");
    expected.extend_from_slice(&[0x12, 1, 0xff]);
    assert_eq!(response.encode_to_vec(), expected);

    let request = JwtsvidRequest {
        audience: vec!["a".into()],
        spiffe_id: "s".into(),
    };
    assert_eq!(request.encode_to_vec(), vec![0x0a, 1, b'a', 0x12, 1, b's']);
}
