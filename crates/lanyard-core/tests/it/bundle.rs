//! Trust bundle conformance: the SPIFFE bundle JWK Set (B-1 to B-12), the Workload API's
//! bundle forms, and sequence numbers.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use lanyard_core::bundle::{BundleError, JwtAuthority, TrustBundle, X509Authority};
use lanyard_core::id::TrustDomain;
use lanyard_core::keys::{KeyPair, KeyType};
use serde_json::{Value, json};

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// A self-signed SPIFFE CA certificate, made with rcgen directly.
fn ca_cert(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
    self_signed_ca(&rcgen::KeyPair::generate_for(alg).unwrap())
}

/// A CA with an RSA key (imported: ring cannot generate RSA keys).
fn rsa_ca() -> Vec<u8> {
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(rsa_pkcs8());
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256).unwrap();
    self_signed_ca(&key)
}

fn self_signed_ca(key: &rcgen::KeyPair) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org".try_into().unwrap(),
    )];
    params.self_signed(key).unwrap().der().to_vec()
}

fn ec_ca() -> Vec<u8> {
    ca_cert(&rcgen::PKCS_ECDSA_P256_SHA256)
}

fn rsa_pkcs8() -> &'static [u8] {
    static PKCS8: OnceLock<Vec<u8>> = OnceLock::new();
    PKCS8.get_or_init(|| {
        use rsa::pkcs8::EncodePrivateKey as _;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        key.to_pkcs8_der().unwrap().as_bytes().to_vec()
    })
}

fn jwt_authority(kid: &str, key_type: KeyType) -> JwtAuthority {
    let key = match key_type {
        KeyType::EcP256 | KeyType::EcP384 => KeyPair::generate(key_type).unwrap(),
        _ => KeyPair::from_pkcs8_der(rsa_pkcs8()).unwrap(),
    };
    JwtAuthority::from_key_pair(kid, &key, None).unwrap()
}

fn parse(json: &str) -> Result<TrustBundle, BundleError> {
    TrustBundle::from_jwks_json(td(), json.as_bytes())
}

fn full_bundle() -> TrustBundle {
    let mut bundle = TrustBundle::new(td());
    assert!(bundle.add_x509_authority(X509Authority::new(ec_ca()).unwrap()));
    assert!(
        bundle.add_x509_authority(
            X509Authority::new(ca_cert(&rcgen::PKCS_ECDSA_P384_SHA384)).unwrap()
        )
    );
    assert!(bundle.add_x509_authority(X509Authority::new(rsa_ca()).unwrap()));
    for (kid, key_type) in [
        ("ec256", KeyType::EcP256),
        ("ec384", KeyType::EcP384),
        ("rsa", KeyType::Rsa2048),
    ] {
        assert!(
            bundle
                .add_jwt_authority(jwt_authority(kid, key_type))
                .unwrap()
        );
    }
    bundle.set_refresh_hint(Some(Duration::from_secs(300)));
    bundle.set_sequence_number(42);
    bundle
}

#[test]
fn jwks_round_trip_gives_an_equal_bundle() {
    let bundle = full_bundle();
    let json = bundle.to_jwks_json();
    let parsed = parse(&json).unwrap();
    assert_eq!(parsed, bundle);
    assert_eq!(parsed.sequence_number(), 42);
    assert_eq!(parsed.refresh_hint(), Some(Duration::from_secs(300)));
    assert_eq!(parsed.to_jwks_json(), json);
}

#[test]
fn jwks_entries_have_the_spiffe_shape() {
    let bundle = full_bundle();
    let doc: Value = serde_json::from_str(&bundle.to_jwks_json()).unwrap();
    assert_eq!(doc["spiffe_sequence"], 42);
    assert_eq!(doc["spiffe_refresh_hint"], 300);
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 6);

    let x509: Vec<&Value> = keys.iter().filter(|k| k["use"] == "x509-svid").collect();
    assert_eq!(x509.len(), 3);
    for (entry, authority) in x509.iter().zip(bundle.x509_authorities()) {
        assert!(entry.get("kid").is_none(), "x509-svid entries carry no kid");
        let x5c = entry["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1);
        assert_eq!(
            STANDARD.decode(x5c[0].as_str().unwrap()).unwrap(),
            authority.der()
        );
    }
    assert_eq!(x509[0]["kty"], "EC");
    assert_eq!(x509[0]["crv"], "P-256");
    assert_eq!(x509[1]["kty"], "EC");
    assert_eq!(x509[1]["crv"], "P-384");
    assert_eq!(x509[2]["kty"], "RSA");
    assert_eq!(x509[2]["e"], "AQAB");

    let jwt: Vec<&Value> = keys.iter().filter(|k| k["use"] == "jwt-svid").collect();
    assert_eq!(jwt.len(), 3);
    for entry in &jwt {
        assert!(entry["kid"].as_str().is_some_and(|k| !k.is_empty()));
        assert!(entry.get("x5c").is_none());
        for param in ["x", "y", "n", "e"] {
            if let Some(v) = entry.get(param) {
                let v = v.as_str().unwrap();
                assert!(
                    !v.contains(['=', '+', '/']),
                    "{param} is not unpadded base64url"
                );
                URL_SAFE_NO_PAD.decode(v).unwrap();
            }
        }
    }
    let ec256 = jwt.iter().find(|k| k["kid"] == "ec256").unwrap();
    assert_eq!(ec256["kty"], "EC");
    assert_eq!(ec256["crv"], "P-256");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(ec256["x"].as_str().unwrap())
            .unwrap()
            .len(),
        32
    );
    let ec384 = jwt.iter().find(|k| k["kid"] == "ec384").unwrap();
    assert_eq!(ec384["crv"], "P-384");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(ec384["y"].as_str().unwrap())
            .unwrap()
            .len(),
        48
    );
    let rsa = jwt.iter().find(|k| k["kid"] == "rsa").unwrap();
    assert_eq!(rsa["kty"], "RSA");
    assert_eq!(rsa["e"], "AQAB");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(rsa["n"].as_str().unwrap())
            .unwrap()
            .len(),
        256
    );
}

#[test]
fn a_go_spiffe_shaped_bundle_decodes() {
    let ca = ec_ca();
    let ca_key = {
        let (_, cert) =
            <x509_parser::certificate::X509Certificate as x509_parser::prelude::FromDer<
                '_,
                x509_parser::error::X509Error,
            >>::from_der(&ca)
            .unwrap();
        cert.public_key().subject_public_key.data.to_vec()
    };
    let jwt_key = KeyPair::generate(KeyType::EcP256).unwrap();
    let coords = |point: &[u8]| {
        (
            URL_SAFE_NO_PAD.encode(&point[1..33]),
            URL_SAFE_NO_PAD.encode(&point[33..65]),
        )
    };
    let (ca_x, ca_y) = coords(&ca_key);
    let (jwt_x, jwt_y) = coords(jwt_key.public_key_raw());
    let ca_b64 = STANDARD.encode(&ca);
    // The member order and spacing go-spiffe's encoder (go-jose) produces.
    let json = format!(
        r#"{{
    "keys": [
        {{
            "use": "x509-svid",
            "kty": "EC",
            "crv": "P-256",
            "x": "{ca_x}",
            "y": "{ca_y}",
            "x5c": ["{ca_b64}"]
        }},
        {{
            "use": "jwt-svid",
            "kty": "EC",
            "kid": "C6vs25welZOx6WksNYfbMfiw9l96pMnD",
            "crv": "P-256",
            "x": "{jwt_x}",
            "y": "{jwt_y}"
        }}
    ],
    "spiffe_sequence": 12345,
    "spiffe_refresh_hint": 60
}}"#
    );
    let bundle = parse(&json).unwrap();
    assert_eq!(bundle.trust_domain(), &td());
    assert_eq!(bundle.sequence_number(), 12345);
    assert_eq!(bundle.refresh_hint(), Some(Duration::from_secs(60)));
    assert_eq!(bundle.x509_authorities().len(), 1);
    assert_eq!(bundle.x509_authorities()[0].der(), ca);
    assert!(!bundle.x509_authorities()[0].is_tainted());
    let authority = bundle
        .jwt_authority("C6vs25welZOx6WksNYfbMfiw9l96pMnD")
        .unwrap();
    assert_eq!(authority.public_key_der(), jwt_key.public_key_der());
    assert_eq!(authority.expires_at(), None);
}

#[test]
fn unknown_use_and_kty_are_ignored() {
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let point = key.public_key_raw();
    let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
    let y = URL_SAFE_NO_PAD.encode(&point[33..65]);
    let doc = json!({
        "keys": [
            {"use": "jwt-svid", "kty": "EC", "kid": "good", "crv": "P-256", "x": x, "y": y},
            // B-7: missing, unknown, or wrongly cased `use`.
            {"kty": "EC", "kid": "no-use", "crv": "P-256", "x": x, "y": y},
            {"use": "sig", "kty": "EC", "kid": "sig", "crv": "P-256", "x": x, "y": y},
            {"use": "JWT-SVID", "kty": "EC", "kid": "upper", "crv": "P-256", "x": x, "y": y},
            {"use": "wit-svid", "kty": "OKP", "kid": "wit", "crv": "Ed25519", "x": x},
            // B-6: unknown or missing `kty`, unknown curve; even if malformed otherwise.
            {"use": "jwt-svid", "kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"use": "jwt-svid", "kty": "PQC", "kid": "future"},
            {"use": "jwt-svid", "kid": "no-kty"},
            {"use": "x509-svid", "kty": "XYZ", "x5c": ["a", "b"]},
            {"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "secp256k1", "x": x, "y": y},
        ],
        // B-5: extra members are allowed.
        "spiffe_sequence": 1,
        "something_else": true,
    });
    let bundle = parse(&doc.to_string()).unwrap();
    let kids: Vec<&str> = bundle
        .jwt_authorities()
        .iter()
        .map(JwtAuthority::key_id)
        .collect();
    assert_eq!(kids, ["good"]);
    assert!(bundle.x509_authorities().is_empty());
}

#[test]
fn x509_svid_entries_need_exactly_one_certificate() {
    let a = STANDARD.encode(ec_ca());
    let b = STANDARD.encode(ec_ca());
    let entry = |x5c: Value| {
        // The count is checked before the key parameters, which are missing here.
        json!({"keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": x5c}]}).to_string()
    };
    let err = parse(&entry(json!([a, b]))).unwrap_err();
    assert!(
        matches!(err, BundleError::X5cCount { index: 0, count: 2 }),
        "{err:?}"
    );
    let err = parse(&entry(json!([]))).unwrap_err();
    assert!(
        matches!(err, BundleError::X5cCount { index: 0, count: 0 }),
        "{err:?}"
    );
    let no_x5c = json!({"keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-256"}]});
    let err = parse(&no_x5c.to_string()).unwrap_err();
    assert!(
        matches!(err, BundleError::X5cCount { count: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn x5c_certificate_must_match_the_jwk_key() {
    let ca = ec_ca();
    let other = KeyPair::generate(KeyType::EcP256).unwrap();
    let point = other.public_key_raw();
    let doc = json!({"keys": [{
        "use": "x509-svid", "kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        "x5c": [STANDARD.encode(&ca)],
    }]});
    let err = parse(&doc.to_string()).unwrap_err();
    assert!(
        matches!(err, BundleError::InvalidKey { index: 0, .. }),
        "{err:?}"
    );

    let doc = json!({"keys": [{
        "use": "x509-svid", "kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        "x5c": ["not base64!"],
    }]});
    let err = parse(&doc.to_string()).unwrap_err();
    assert!(
        matches!(err, BundleError::InvalidKey { index: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn malformed_documents_are_rejected() {
    let err = parse("not json").unwrap_err();
    assert!(matches!(err, BundleError::Json(_)), "{err:?}");
    let err = parse("[]").unwrap_err();
    assert!(matches!(err, BundleError::NotAnObject), "{err:?}");
    let err = parse(r#"{"spiffe_sequence": 1}"#).unwrap_err();
    assert!(matches!(err, BundleError::MissingKeys), "{err:?}");
    assert_eq!(err.to_string(), "bundle has no \"keys\" member");
    let err = parse(r#"{"keys": {}}"#).unwrap_err();
    assert!(
        matches!(err, BundleError::InvalidField { field: "keys", .. }),
        "{err:?}"
    );
    let err = parse(r#"{"keys": [42]}"#).unwrap_err();
    assert!(
        matches!(err, BundleError::InvalidKey { index: 0, .. }),
        "{err:?}"
    );
    // Duplicate members make a document ambiguous.
    let err = parse(r#"{"keys": [], "keys": []}"#).unwrap_err();
    assert!(matches!(err, BundleError::Json(_)), "{err:?}");
    assert!(err.to_string().contains("duplicate"), "{err}");

    for bad in [
        r#"{"keys": [], "spiffe_sequence": -1}"#,
        r#"{"keys": [], "spiffe_sequence": "1"}"#,
        r#"{"keys": [], "spiffe_sequence": 1.5}"#,
    ] {
        let err = parse(bad).unwrap_err();
        assert!(
            matches!(
                err,
                BundleError::InvalidField {
                    field: "spiffe_sequence",
                    ..
                }
            ),
            "{bad}: {err:?}"
        );
    }
    let err = parse(r#"{"keys": [], "spiffe_refresh_hint": -5}"#).unwrap_err();
    assert!(
        matches!(
            err,
            BundleError::InvalidField {
                field: "spiffe_refresh_hint",
                ..
            }
        ),
        "{err:?}"
    );
    // B-3: the sequence is at least 64 bits.
    let big = parse(r#"{"keys": [], "spiffe_sequence": 18446744073709551615}"#).unwrap();
    assert_eq!(big.sequence_number(), u64::MAX);
}

#[test]
fn jwt_svid_entries_need_a_key_id_and_valid_parameters() {
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let point = key.public_key_raw();
    let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
    let y = URL_SAFE_NO_PAD.encode(&point[33..65]);
    for entry in [
        json!({"use": "jwt-svid", "kty": "EC", "crv": "P-256", "x": x, "y": y}),
        json!({"use": "jwt-svid", "kty": "EC", "kid": "", "crv": "P-256", "x": x, "y": y}),
        json!({"use": "jwt-svid", "kty": "EC", "kid": "k", "crv": "P-256", "x": x}),
        json!({"use": "jwt-svid", "kty": "EC", "kid": "k", "crv": "P-384", "x": x, "y": y}),
        json!({"use": "jwt-svid", "kty": "RSA", "kid": "k", "n": "!!", "e": "AQAB"}),
    ] {
        let err = parse(&json!({"keys": [entry]}).to_string()).unwrap_err();
        assert!(
            matches!(err, BundleError::InvalidKey { index: 0, .. }),
            "{entry}: {err:?}"
        );
    }

    // The same kid twice: identical keys collapse, different keys conflict.
    let entry = json!({"use": "jwt-svid", "kty": "EC", "kid": "k", "crv": "P-256", "x": x, "y": y});
    let bundle = parse(&json!({"keys": [entry, entry]}).to_string()).unwrap();
    assert_eq!(bundle.jwt_authorities().len(), 1);
    let other = KeyPair::generate(KeyType::EcP256).unwrap();
    let other_point = other.public_key_raw();
    let conflicting = json!({
        "use": "jwt-svid", "kty": "EC", "kid": "k", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&other_point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&other_point[33..65]),
    });
    let err = parse(&json!({"keys": [entry, conflicting]}).to_string()).unwrap_err();
    assert!(
        matches!(&err, BundleError::KeyIdConflict(k) if k == "k"),
        "{err:?}"
    );
}

#[test]
fn empty_keys_means_an_empty_bundle() {
    let bundle = parse(r#"{"keys": []}"#).unwrap();
    assert!(bundle.is_empty());
    assert_eq!(bundle.sequence_number(), 0);
    assert_eq!(bundle.refresh_hint(), None);
    let doc: Value = serde_json::from_str(&bundle.to_jwks_json()).unwrap();
    assert_eq!(doc, json!({"keys": [], "spiffe_sequence": 0}));
}

#[test]
fn every_content_change_bumps_the_sequence_number() {
    let mut bundle = TrustBundle::new(td());
    let mut expected = 0;
    let mut check = |bundle: &TrustBundle, changed: bool, what: &str| {
        if changed {
            expected += 1;
        }
        assert_eq!(bundle.sequence_number(), expected, "{what}");
    };

    let ca = ec_ca();
    let changed = bundle.add_x509_authority(X509Authority::new(ca.clone()).unwrap());
    assert!(changed);
    check(&bundle, changed, "add x509");
    let changed = bundle.add_x509_authority(X509Authority::new(ca.clone()).unwrap());
    assert!(!changed);
    check(&bundle, changed, "add duplicate x509");

    let authority = jwt_authority("k1", KeyType::EcP256);
    let changed = bundle.add_jwt_authority(authority.clone()).unwrap();
    assert!(changed);
    check(&bundle, changed, "add jwt");
    let changed = bundle.add_jwt_authority(authority.clone()).unwrap();
    assert!(!changed);
    check(&bundle, changed, "add identical jwt");
    let err = bundle
        .add_jwt_authority(jwt_authority("k1", KeyType::EcP256))
        .unwrap_err();
    assert!(
        matches!(&err, BundleError::KeyIdConflict(k) if k == "k1"),
        "{err:?}"
    );
    check(&bundle, false, "conflicting jwt");
    let expiring = JwtAuthority::new(
        "k1",
        authority.public_key_der(),
        Some(now() + Duration::from_secs(60)),
    )
    .unwrap();
    let changed = bundle.add_jwt_authority(expiring).unwrap();
    assert!(changed);
    check(&bundle, changed, "same key, new expiry");

    let changed = bundle.taint_x509_authority(&ca);
    assert!(changed && bundle.x509_authorities()[0].is_tainted());
    check(&bundle, changed, "taint x509");
    let changed = bundle.taint_x509_authority(&ca);
    check(&bundle, changed, "taint x509 again");
    let changed = bundle.taint_jwt_authority("k1");
    assert!(changed && bundle.jwt_authority("k1").unwrap().is_tainted());
    check(&bundle, changed, "taint jwt");
    let changed = bundle.taint_jwt_authority("absent");
    check(&bundle, changed, "taint absent jwt");

    let changed = bundle.set_refresh_hint(Some(Duration::from_millis(60_500)));
    assert_eq!(bundle.refresh_hint(), Some(Duration::from_secs(60)));
    check(&bundle, changed, "set refresh hint");
    let changed = bundle.set_refresh_hint(Some(Duration::from_secs(60)));
    assert!(!changed);
    check(&bundle, changed, "same refresh hint");

    assert_eq!(bundle.remove_expired_jwt_authorities(now()), 0);
    check(&bundle, false, "nothing expired yet");
    assert_eq!(
        bundle.remove_expired_jwt_authorities(now() + Duration::from_secs(60)),
        1
    );
    check(&bundle, true, "expired jwt removed");
    assert!(bundle.jwt_authority("k1").is_none());

    let changed = bundle.remove_x509_authority(&ca);
    assert!(changed);
    check(&bundle, changed, "remove x509");
    let changed = bundle.remove_x509_authority(&ca);
    check(&bundle, changed, "remove absent x509");
    let changed = bundle.remove_jwt_authority("k1");
    check(&bundle, changed, "remove absent jwt");
    assert!(bundle.is_empty());
}

#[test]
fn authorities_without_expiry_survive_pruning() {
    let mut bundle = TrustBundle::new(td());
    bundle
        .add_jwt_authority(jwt_authority("forever", KeyType::EcP256))
        .unwrap();
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    bundle
        .add_jwt_authority(
            JwtAuthority::from_key_pair("later", &key, Some(now() + Duration::from_secs(10)))
                .unwrap(),
        )
        .unwrap();
    assert_eq!(bundle.remove_expired_jwt_authorities(now()), 0);
    assert_eq!(
        bundle.remove_expired_jwt_authorities(now() + Duration::from_secs(3600)),
        1
    );
    assert!(bundle.jwt_authority("forever").is_some());
}

#[test]
fn jwt_only_jwks_has_no_x509_entries() {
    let bundle = full_bundle();
    let doc: Value = serde_json::from_str(&bundle.jwt_only_jwks_json()).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), bundle.jwt_authorities().len());
    assert!(
        keys.iter()
            .all(|k| k["use"] == "jwt-svid" && k.get("x5c").is_none())
    );
    // It still parses as a bundle, with the same JWT authorities.
    let parsed = parse(&bundle.jwt_only_jwks_json()).unwrap();
    assert!(parsed.x509_authorities().is_empty());
    assert_eq!(parsed.jwt_authorities(), bundle.jwt_authorities());
}

#[test]
fn the_bundle_endpoint_document_carries_the_endpoint_s_refresh_hint_and_the_stored_sequence() {
    let bundle = full_bundle();
    let json = bundle.to_endpoint_jwks_json(Duration::from_millis(90_500));
    let doc: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["spiffe_refresh_hint"], 90, "whole seconds");
    assert_eq!(doc["spiffe_sequence"], 42, "the hint is not content");
    let parsed = parse(&json).unwrap();
    assert_eq!(parsed.x509_authorities(), bundle.x509_authorities());
    assert_eq!(parsed.jwt_authorities(), bundle.jwt_authorities());
    assert_eq!(parsed.sequence_number(), 42);
    // A bundle without a hint of its own gets the endpoint's too.
    let mut plain = TrustBundle::new(td());
    plain.add_x509_authority(X509Authority::new(ec_ca()).unwrap());
    let doc: Value =
        serde_json::from_str(&plain.to_endpoint_jwks_json(Duration::from_secs(300))).unwrap();
    assert_eq!(doc["spiffe_refresh_hint"], 300);
    assert_eq!(doc["spiffe_sequence"], plain.sequence_number());
}

#[test]
fn the_oidc_jwks_holds_the_jwt_authorities_as_signing_keys_with_their_algorithm() {
    let mut bundle = full_bundle();
    assert!(bundle.taint_jwt_authority("ec384"));
    let doc: Value = serde_json::from_str(&bundle.oidc_jwks_json()).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(
        doc.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["keys"],
        "nothing SPIFFE-specific"
    );
    let summary: Vec<(&str, &str, &str, &str)> = keys
        .iter()
        .map(|k| {
            (
                k["kid"].as_str().unwrap(),
                k["use"].as_str().unwrap(),
                k["kty"].as_str().unwrap(),
                k["alg"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("ec256", "sig", "EC", "ES256"),
            ("ec384", "sig", "EC", "ES384"),
            ("rsa", "sig", "RSA", "RS256"),
        ],
        "a tainted key stays until it is revoked"
    );
    for (jwk, authority) in keys.iter().zip(bundle.jwt_authorities()) {
        assert!(jwk.get("x5c").is_none());
        // The key parameters are the bundle's own.
        let mut bundle_jwk = authority.jwk();
        bundle_jwk["use"] = json!("sig");
        bundle_jwk["alg"] = jwk["alg"].clone();
        assert_eq!(*jwk, bundle_jwk);
    }
    // An independent JWK parser reads every key.
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&bundle.oidc_jwks_json()).unwrap();
    assert_eq!(jwks.keys.len(), 3);
    assert_eq!(TrustBundle::new(td()).oidc_jwks_json(), r#"{"keys":[]}"#);
}

#[test]
fn der_concatenation_and_pem_forms() {
    let bundle = full_bundle();
    let expected: Vec<u8> = bundle
        .x509_authorities()
        .iter()
        .flat_map(|a| a.der().to_vec())
        .collect();
    assert_eq!(bundle.x509_authorities_der_concat(), expected);

    let from_der = TrustBundle::from_x509_der_concat(td(), &expected).unwrap();
    assert_eq!(from_der.x509_authorities(), bundle.x509_authorities());
    assert_eq!(from_der.sequence_number(), 0);

    let pem = bundle.x509_authorities_pem();
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 3);
    let from_pem = TrustBundle::from_pem_certificates(td(), &pem).unwrap();
    assert_eq!(from_pem.x509_authorities(), bundle.x509_authorities());

    // Other PEM blocks are skipped; no certificate at all is an error.
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let mixed = format!("{}{pem}", key.secret_pkcs8_pem());
    let from_mixed = TrustBundle::from_pem_certificates(td(), &mixed).unwrap();
    assert_eq!(from_mixed.x509_authorities().len(), 3);
    let err = TrustBundle::from_pem_certificates(td(), &key.secret_pkcs8_pem()).unwrap_err();
    assert!(matches!(err, BundleError::NoCertificates), "{err:?}");
    let err = TrustBundle::from_x509_der_concat(td(), &[]).unwrap_err();
    assert!(matches!(err, BundleError::NoCertificates), "{err:?}");
    let mut truncated = expected.clone();
    truncated.truncate(expected.len() - 1);
    let err = TrustBundle::from_x509_der_concat(td(), &truncated).unwrap_err();
    assert!(matches!(err, BundleError::InvalidCertificate(_)), "{err:?}");
}

#[test]
fn authorities_validate_their_input() {
    let err = X509Authority::new(b"not a certificate".to_vec()).unwrap_err();
    assert!(matches!(err, BundleError::InvalidCertificate(_)), "{err:?}");
    let mut trailing = ec_ca();
    trailing.push(0);
    let err = X509Authority::new(trailing).unwrap_err();
    assert!(matches!(err, BundleError::InvalidCertificate(_)), "{err:?}");

    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let err = JwtAuthority::from_key_pair("", &key, None).unwrap_err();
    assert!(matches!(err, BundleError::EmptyKeyId), "{err:?}");
    let err = JwtAuthority::new("k", b"garbage", None).unwrap_err();
    assert!(matches!(err, BundleError::InvalidPublicKey(_)), "{err:?}");
}

#[test]
fn tainted_flags_and_expiries_are_not_in_the_jwks() {
    let mut bundle = full_bundle();
    let ca = bundle.x509_authorities()[0].der().to_vec();
    bundle.taint_x509_authority(&ca);
    bundle.taint_jwt_authority("ec256");
    let parsed = parse(&bundle.to_jwks_json()).unwrap();
    assert!(parsed.x509_authorities().iter().all(|a| !a.is_tainted()));
    assert!(parsed.jwt_authorities().iter().all(|a| !a.is_tainted()));
    assert_ne!(parsed, bundle);
    assert_eq!(parsed.sequence_number(), bundle.sequence_number());
}

#[test]
fn jsonwebtoken_reads_our_jwks() {
    // The independent JWT library understands the key sets we publish.
    let bundle = full_bundle();
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&bundle.to_jwks_json()).unwrap();
    for authority in bundle.jwt_authorities() {
        let jwk = jwks.find(authority.key_id()).unwrap();
        jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    }
}
