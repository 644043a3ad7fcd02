//! X.509-SVID conformance: the SPIFFE rules checked on certificates minted at run
//! time and read back with x509-parser, CSR handling, and chain verification.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::revocation::RevokedSerial;
use lanyard_core::x509::{
    BACKDATE, CaSubject, SvidParams, SvidSubject, X509Ca, X509Error, X509Svid, build_csr,
    create_intermediate_ca, create_self_signed_ca, fingerprint_sha1_hex, is_ca, parse_csr,
    serial_decimal, spiffe_id_of, subject_key_id_hex, svid_identity, validity_of,
    verify_svid_chain, verify_svid_chain_with_crls,
};
use lanyard_core::{KeyPair, KeyType, SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS,
    OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
    OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
};
use x509_parser::prelude::FromDer as _;
use x509_parser::revocation_list::CertificateRevocationList;

const CA_TTL: Duration = Duration::from_secs(24 * 3600);
const SVID_TTL: Duration = Duration::from_secs(3600);

/// A fixed instant with a fractional second, to check that times are floored.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_750_000_000_500)
}

fn unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap())
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn key() -> KeyPair {
    KeyPair::generate(KeyType::EcP256).unwrap()
}

fn root_ca(trust_domain: &str) -> X509Ca {
    X509Ca::self_signed(
        &td(trust_domain),
        key(),
        &CaSubject::default(),
        now(),
        CA_TTL,
    )
    .unwrap()
}

fn leaf_params(spiffe_id: &str) -> (KeyPair, SvidParams) {
    let leaf_key = key();
    let params = SvidParams::new(id(spiffe_id), leaf_key.public_key_der(), SVID_TTL);
    (leaf_key, params)
}

fn mint(ca: &X509Ca, spiffe_id: &str) -> X509Svid {
    let (_, params) = leaf_params(spiffe_id);
    ca.mint_svid(&params, now()).unwrap()
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn critical(cert: &X509Certificate<'_>, oid: &x509_parser::der_parser::Oid<'_>) -> bool {
    cert.get_extension_unique(oid).unwrap().unwrap().critical
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn dns_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn subject_attrs(cert: &X509Certificate<'_>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for rdn in cert.subject().iter() {
        for attr in rdn.iter() {
            out.push((
                attr.attr_type().to_id_string(),
                attr.as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

const OID_C: &str = "2.5.4.6";
const OID_O: &str = "2.5.4.10";
const OID_CN: &str = "2.5.4.3";

fn ski(cert: &X509Certificate<'_>) -> Vec<u8> {
    match cert
        .get_extension_unique(&OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
        .unwrap()
        .unwrap()
        .parsed_extension()
    {
        ParsedExtension::SubjectKeyIdentifier(k) => k.0.to_vec(),
        other => panic!("not an SKI: {other:?}"),
    }
}

fn aki(cert: &X509Certificate<'_>) -> Vec<u8> {
    match cert
        .get_extension_unique(&OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
        .unwrap()
        .unwrap()
        .parsed_extension()
    {
        ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().unwrap().0.to_vec(),
        other => panic!("not an AKI: {other:?}"),
    }
}

/// The rcgen view of an X509Ca, to sign deliberately broken certificates.
fn rcgen_signer(ca: &X509Ca) -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::try_from(ca.key().secret_pkcs8_der()).unwrap();
    (key, ca.cert_der().to_vec())
}

/// Signs `params` for a fresh key with `ca`, bypassing Lanyard's minting rules.
fn sign_raw(ca: &X509Ca, params: &rcgen::CertificateParams) -> Vec<u8> {
    let (ca_key, ca_der) = rcgen_signer(ca);
    let issuer = rcgen::Issuer::from_ca_cert_der(&CertificateDer::from(ca_der), &ca_key).unwrap();
    let subject_key = rcgen::KeyPair::generate().unwrap();
    params
        .signed_by(&subject_key, &issuer)
        .unwrap()
        .der()
        .to_vec()
}

/// Leaf parameters that pass every SPIFFE rule, for tests to break one at a time.
fn raw_leaf_params(uris: &[&str]) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    let secs = now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    params.not_before =
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap() - 10).unwrap();
    params.not_after =
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap() + 3600).unwrap();
    params.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

// ---------------------------------------------------------------------------------------------
// CA profile

#[test]
fn self_signed_ca_follows_the_ca_rules() {
    let trust_domain = td("example.org");
    let ca_key = key();
    let der = create_self_signed_ca(&trust_domain, &ca_key, &CaSubject::default(), now(), CA_TTL)
        .unwrap();
    let cert = parse(&der);

    // cA=true, critical.
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical);
    assert!(bc.value.ca);
    // keyUsage critical with keyCertSign (and cRLSign), no leaf bits.
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.key_cert_sign());
    assert!(ku.value.crl_sign());
    assert!(!ku.value.digital_signature());
    // the SPIFFE ID is the trust domain's, no path; one URI SAN.
    assert_eq!(uri_sans(&cert), vec!["spiffe://example.org".to_owned()]);
    assert_eq!(spiffe_id_of(&der).unwrap(), trust_domain.id());
    // Self-signed, with an SKI and the default subject C=US, O=SPIFFE.
    cert.verify_signature(None).unwrap();
    assert_eq!(cert.subject().as_raw(), cert.issuer().as_raw());
    assert_eq!(ski(&cert).len(), 20);
    assert_eq!(
        subject_attrs(&cert),
        vec![
            (OID_C.to_owned(), "US".to_owned()),
            (OID_O.to_owned(), "SPIFFE".to_owned())
        ]
    );
    // The key in the certificate is the CA key.
    assert_eq!(cert.public_key().raw, ca_key.public_key_der().as_slice());
    // Validity: backdated 10 s, NotAfter = now + ttl (whole seconds).
    assert_eq!(cert.validity().not_before.timestamp(), 1_750_000_000 - 10);
    assert_eq!(
        cert.validity().not_after.timestamp(),
        1_750_000_000 + 86_400
    );
    assert_eq!(
        validity_of(&der).unwrap(),
        (unix(1_750_000_000 - 10), unix(1_750_000_000 + 86_400))
    );
    assert!(is_ca(&der).unwrap());
    // Serial: positive, at least 64 bits of entropy worth of bytes.
    let serial = cert.raw_serial();
    assert!(
        serial.first().unwrap() & 0x80 == 0,
        "serial must be positive"
    );
    assert!(serial.len() >= 8);
}

#[test]
fn ca_subject_is_configurable() {
    let subject = CaSubject {
        country: vec!["FR".to_owned()],
        organization: vec!["Acme".to_owned()],
        common_name: Some("Acme Root".to_owned()),
    };
    let der = create_self_signed_ca(&td("acme.test"), &key(), &subject, now(), CA_TTL).unwrap();
    assert_eq!(
        subject_attrs(&parse(&der)),
        vec![
            (OID_C.to_owned(), "FR".to_owned()),
            (OID_O.to_owned(), "Acme".to_owned()),
            (OID_CN.to_owned(), "Acme Root".to_owned()),
        ]
    );
    let too_many = CaSubject {
        organization: vec!["A".to_owned(), "B".to_owned()],
        ..CaSubject::default()
    };
    assert!(matches!(
        create_self_signed_ca(&td("acme.test"), &key(), &too_many, now(), CA_TTL),
        Err(X509Error::UnsupportedSubject(_))
    ));
}

#[test]
fn p384_ca_signs_leaves() {
    let ca = X509Ca::self_signed(
        &td("example.org"),
        KeyPair::generate(KeyType::EcP384).unwrap(),
        &CaSubject::default(),
        now(),
        CA_TTL,
    )
    .unwrap();
    let svid = mint(&ca, "spiffe://example.org/p384");
    verify_svid_chain(
        svid.cert_chain(),
        &td("example.org"),
        &[ca.cert_der()],
        now(),
    )
    .unwrap();
}

#[test]
fn x509_ca_new_checks_the_certificate_and_key() {
    let ca = root_ca("example.org");
    // Wrong key.
    assert!(matches!(
        X509Ca::new(ca.cert_der().to_vec(), key(), Vec::new()),
        Err(X509Error::KeyMismatch)
    ));
    // A leaf is not a CA.
    let (leaf_key, params) = leaf_params("spiffe://example.org/w");
    let svid = ca.mint_svid(&params, now()).unwrap();
    assert!(matches!(
        X509Ca::new(svid.leaf_der().to_vec(), leaf_key, Vec::new()),
        Err(X509Error::NotCa)
    ));
    // A self-signed CA has no chain above it.
    let again = KeyPair::from_pkcs8_der(ca.key().secret_pkcs8_der()).unwrap();
    assert!(matches!(
        X509Ca::new(ca.cert_der().to_vec(), again, vec![ca.cert_der().to_vec()]),
        Err(X509Error::InvalidCaChain(_))
    ));
    // Garbage.
    assert!(matches!(
        X509Ca::new(b"junk".to_vec(), key(), Vec::new()),
        Err(X509Error::Malformed(_))
    ));
    // The accepted CA reports its facts.
    assert!(ca.is_self_signed());
    assert_eq!(ca.trust_domain(), Some(&td("example.org")));
    assert_eq!(ca.not_after(), unix(1_750_000_000 + 86_400));
    assert!(ca.chain().is_empty());
    assert!(ca.issued_chain().is_empty());
}

#[test]
fn x509_ca_new_refuses_a_ca_id_with_a_path() {
    // X-8, built directly with rcgen.
    let ca_key = key();
    let rc_key = rcgen::KeyPair::try_from(ca_key.secret_pkcs8_der()).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/ca".try_into().unwrap(),
    )];
    let der = params.self_signed(&rc_key).unwrap().der().to_vec();
    assert!(matches!(
        X509Ca::new(der, ca_key, Vec::new()),
        Err(X509Error::CaIdHasPath(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Leaf profile

#[test]
fn x1_leaf_has_exactly_one_uri_san_and_the_dns_sans() {
    let ca = root_ca("example.org");
    let (_, mut params) = leaf_params("spiffe://example.org/web");
    params.dns_names = vec!["web.example.org".to_owned(), "web".to_owned()];
    let svid = ca.mint_svid(&params, now()).unwrap();
    let cert = parse(svid.leaf_der());
    assert_eq!(uri_sans(&cert), vec!["spiffe://example.org/web".to_owned()]);
    assert_eq!(
        dns_sans(&cert),
        vec!["web.example.org".to_owned(), "web".to_owned()]
    );
    assert_eq!(svid.spiffe_id(), &id("spiffe://example.org/web"));
    assert_eq!(
        spiffe_id_of(svid.leaf_der()).unwrap(),
        id("spiffe://example.org/web")
    );
}

#[test]
fn x2_leaf_ids_must_have_a_path_and_be_in_the_ca_trust_domain() {
    let ca = root_ca("example.org");
    let (_, params) = leaf_params("spiffe://example.org");
    assert!(matches!(
        ca.mint_svid(&params, now()),
        Err(X509Error::LeafIdIsRoot(_))
    ));
    let (_, params) = leaf_params("spiffe://other.org/web");
    assert!(matches!(
        ca.mint_svid(&params, now()),
        Err(X509Error::TrustDomainMismatch { .. })
    ));
}

#[test]
fn x3_subject_is_spire_default_with_first_dns_name_as_cn() {
    let ca = root_ca("example.org");
    let (_, mut params) = leaf_params("spiffe://example.org/web");
    params.dns_names = vec!["a.example.org".to_owned(), "b.example.org".to_owned()];
    let svid = ca.mint_svid(&params, now()).unwrap();
    let cert = parse(svid.leaf_der());
    assert_eq!(
        subject_attrs(&cert),
        vec![
            (OID_C.to_owned(), "US".to_owned()),
            (OID_O.to_owned(), "SPIRE".to_owned()),
            (OID_CN.to_owned(), "a.example.org".to_owned()),
        ]
    );
    // A non-empty subject: the SAN extension need not be critical.
    assert!(!critical(&cert, &OID_X509_EXT_SUBJECT_ALT_NAME));

    // No DNS names: no CN.
    let svid = mint(&ca, "spiffe://example.org/plain");
    assert_eq!(
        subject_attrs(&parse(svid.leaf_der())),
        vec![
            (OID_C.to_owned(), "US".to_owned()),
            (OID_O.to_owned(), "SPIRE".to_owned()),
        ]
    );

    // An empty subject makes the SAN extension critical (RFC 5280 §4.1.2.6).
    let (_, mut params) = leaf_params("spiffe://example.org/anon");
    params.subject = SvidSubject {
        country: Vec::new(),
        organization: Vec::new(),
    };
    let svid = ca.mint_svid(&params, now()).unwrap();
    let cert = parse(svid.leaf_der());
    assert!(subject_attrs(&cert).is_empty());
    assert!(critical(&cert, &OID_X509_EXT_SUBJECT_ALT_NAME));
}

#[test]
fn x4_leaf_is_not_a_ca_and_says_so_critically() {
    let ca = root_ca("example.org");
    let svid = mint(&ca, "spiffe://example.org/web");
    let cert = parse(svid.leaf_der());
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical);
    assert!(!bc.value.ca);
    assert!(critical(&cert, &OID_X509_EXT_BASIC_CONSTRAINTS));
    assert!(!is_ca(svid.leaf_der()).unwrap());
}

#[test]
fn x5_x6_leaf_key_usage_is_critical_and_signing_only() {
    let ca = root_ca("example.org");
    let svid = mint(&ca, "spiffe://example.org/web");
    let cert = parse(svid.leaf_der());
    assert!(critical(&cert, &OID_X509_EXT_KEY_USAGE));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature());
    assert!(ku.key_encipherment());
    assert!(ku.key_agreement());
    assert!(!ku.key_cert_sign());
    assert!(!ku.crl_sign());
    assert!(!ku.non_repudiation());
    assert!(!ku.data_encipherment());
}

#[test]
fn x9_leaf_has_server_and_client_auth() {
    let ca = root_ca("example.org");
    let svid = mint(&ca, "spiffe://example.org/web");
    let cert = parse(svid.leaf_der());
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth);
    assert!(eku.value.client_auth);
    assert!(!eku.value.any);
    assert!(eku.value.other.is_empty());
    assert!(!critical(&cert, &OID_X509_EXT_EXTENDED_KEY_USAGE));
}

#[test]
fn leaf_has_ski_and_aki_matching_the_ca() {
    let ca = root_ca("example.org");
    let svid = mint(&ca, "spiffe://example.org/web");
    let leaf = parse(svid.leaf_der());
    let ca_cert = parse(ca.cert_der());
    assert_eq!(aki(&leaf), ski(&ca_cert));
    assert_eq!(ski(&leaf).len(), 20);
    assert_ne!(ski(&leaf), ski(&ca_cert));
    // SPIRE's key identifier: SHA-1 of the subjectPublicKey bits.
    let expected = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        &leaf.public_key().subject_public_key.data,
    );
    assert_eq!(ski(&leaf), expected.as_ref());
    let hex = subject_key_id_hex(svid.leaf_der()).unwrap().unwrap();
    assert_eq!(hex.len(), 40);
    assert!(
        hex.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
}

#[test]
fn leaf_serials_are_positive_128_bit_and_random() {
    let ca = root_ca("example.org");
    let a = mint(&ca, "spiffe://example.org/web");
    let b = mint(&ca, "spiffe://example.org/web");
    let (ca_a, ca_b) = (parse(a.leaf_der()), parse(b.leaf_der()));
    assert_ne!(ca_a.raw_serial(), ca_b.raw_serial());
    assert_ne!(a.serial(), b.serial());
    for (svid, cert) in [(&a, &ca_a), (&b, &ca_b)] {
        let raw = cert.raw_serial();
        // 16 random bytes, with a leading zero when the top bit is set.
        let magnitude = match raw {
            [0, rest @ ..] if rest.first().is_some_and(|b| b & 0x80 != 0) => rest,
            _ => raw,
        };
        assert!(raw.first().unwrap() & 0x80 == 0, "serial must be positive");
        assert!(magnitude.len() <= 16);
        let mut padded = [0u8; 16];
        padded[16 - magnitude.len()..].copy_from_slice(magnitude);
        let value = u128::from_be_bytes(padded);
        assert_ne!(value, 0);
        assert_eq!(svid.serial(), value.to_string());
        assert_eq!(serial_decimal(svid.leaf_der()).unwrap(), value.to_string());
        let (id, serial, not_after) = svid_identity(svid.leaf_der()).unwrap();
        assert_eq!(id, spiffe_id_of(svid.leaf_der()).unwrap());
        assert_eq!(serial, value.to_string());
        assert_eq!(not_after, validity_of(svid.leaf_der()).unwrap().1);
    }
}

#[test]
fn leaf_validity_is_backdated_and_capped_at_the_ca() {
    let ca = root_ca("example.org");
    let svid = mint(&ca, "spiffe://example.org/web");
    let cert = parse(svid.leaf_der());
    let now_secs = 1_750_000_000;
    assert_eq!(
        cert.validity().not_before.timestamp(),
        now_secs - i64::try_from(BACKDATE.as_secs()).unwrap()
    );
    assert_eq!(cert.validity().not_after.timestamp(), now_secs + 3600);
    assert_eq!(svid.not_after(), unix(now_secs + 3600));

    // A TTL beyond the CA's life is cut to the CA's NotAfter.
    let (_, mut params) = leaf_params("spiffe://example.org/long");
    params.ttl = Duration::from_secs(7 * 24 * 3600);
    let svid = ca.mint_svid(&params, now()).unwrap();
    assert_eq!(svid.not_after(), ca.not_after());
    assert_eq!(
        validity_of(svid.leaf_der()).unwrap().1,
        validity_of(ca.cert_der()).unwrap().1
    );

    // Near the end of the CA's life the cap bites too.
    let late = ca.not_after() - Duration::from_secs(60);
    let (_, params) = leaf_params("spiffe://example.org/late");
    let svid = ca.mint_svid(&params, late).unwrap();
    assert_eq!(svid.not_after(), ca.not_after());

    // An expired CA mints nothing; a zero TTL is refused.
    let (_, params) = leaf_params("spiffe://example.org/after");
    assert!(matches!(
        ca.mint_svid(&params, ca.not_after() + Duration::from_secs(1)),
        Err(X509Error::IssuerExpired)
    ));
    let (_, mut params) = leaf_params("spiffe://example.org/zero");
    params.ttl = Duration::ZERO;
    assert!(matches!(
        ca.mint_svid(&params, now()),
        Err(X509Error::InvalidTtl)
    ));
}

#[test]
fn self_signed_ca_chain_is_just_the_leaf() {
    let ca = root_ca("example.org");
    let svid = mint(&ca, "spiffe://example.org/web");
    assert_eq!(svid.cert_chain().len(), 1);
    assert_eq!(svid.chain_concatenated_der(), svid.leaf_der());
    let again = X509Svid::from_chain(svid.cert_chain().to_vec()).unwrap();
    assert_eq!(again, svid);
}

#[test]
fn leaf_public_key_must_be_supported() {
    let ca = root_ca("example.org");
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let params = SvidParams::new(
        id("spiffe://example.org/ed"),
        rcgen::PublicKeyData::subject_public_key_info(&ed),
        SVID_TTL,
    );
    assert!(matches!(
        ca.mint_svid(&params, now()),
        Err(X509Error::UnsupportedKey)
    ));
    let params = SvidParams::new(id("spiffe://example.org/junk"), b"junk".to_vec(), SVID_TTL);
    assert!(matches!(
        ca.mint_svid(&params, now()),
        Err(X509Error::Malformed(_))
    ));
}

#[test]
fn bad_dns_names_are_refused() {
    let ca = root_ca("example.org");
    for bad in ["", "has space.example", "ünicode.example"] {
        let (_, mut params) = leaf_params("spiffe://example.org/web");
        params.dns_names = vec![bad.to_owned()];
        assert!(
            matches!(
                ca.mint_svid(&params, now()),
                Err(X509Error::InvalidDnsName(_))
            ),
            "{bad:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Intermediate CAs

#[test]
fn intermediate_ca_is_capped_and_its_leaves_carry_it() {
    let root = root_ca("example.org");
    let int_key = key();
    let der = create_intermediate_ca(
        &td("example.org"),
        &int_key.public_key_der(),
        &CaSubject::default(),
        &root,
        now(),
        Duration::from_secs(365 * 24 * 3600),
    )
    .unwrap();
    let cert = parse(&der);
    assert!(cert.basic_constraints().unwrap().unwrap().value.ca);
    assert!(critical(&cert, &OID_X509_EXT_KEY_USAGE));
    assert!(cert.key_usage().unwrap().unwrap().value.key_cert_sign());
    assert_eq!(uri_sans(&cert), vec!["spiffe://example.org".to_owned()]);
    assert_eq!(aki(&cert), ski(&parse(root.cert_der())));
    assert_eq!(
        cert.issuer().as_raw(),
        parse(root.cert_der()).subject().as_raw()
    );
    // NotAfter capped at the root's.
    assert_eq!(validity_of(&der).unwrap().1, root.not_after());

    let intermediate = X509Ca::new(der.clone(), int_key, root.issued_chain()).unwrap();
    assert!(!intermediate.is_self_signed());
    assert_eq!(intermediate.issued_chain(), vec![der.clone()]);

    let svid = mint(&intermediate, "spiffe://example.org/web");
    assert_eq!(svid.cert_chain().len(), 2);
    assert_eq!(svid.cert_chain()[1], der);

    // A second level carries both intermediates, never the root.
    let int2_key = key();
    let der2 = create_intermediate_ca(
        &td("example.org"),
        &int2_key.public_key_der(),
        &CaSubject::default(),
        &intermediate,
        now(),
        CA_TTL,
    )
    .unwrap();
    let int2 = X509Ca::new(der2.clone(), int2_key, intermediate.issued_chain()).unwrap();
    let svid2 = mint(&int2, "spiffe://example.org/deep");
    assert_eq!(svid2.cert_chain(), &[svid2.leaf_der().to_vec(), der2, der]);
    let verified = verify_svid_chain(
        svid2.cert_chain(),
        &td("example.org"),
        &[root.cert_der()],
        now(),
    )
    .unwrap();
    assert_eq!(verified.spiffe_id(), &id("spiffe://example.org/deep"));
}

#[test]
fn intermediate_ca_chain_must_link() {
    let root = root_ca("example.org");
    let other_root = root_ca("example.org");
    let int_key = key();
    let der = create_intermediate_ca(
        &td("example.org"),
        &int_key.public_key_der(),
        &CaSubject::default(),
        &root,
        now(),
        CA_TTL,
    )
    .unwrap();
    let intermediate = X509Ca::new(der, int_key, Vec::new()).unwrap();
    let int2_key = key();
    let der2 = create_intermediate_ca(
        &td("example.org"),
        &int2_key.public_key_der(),
        &CaSubject::default(),
        &intermediate,
        now(),
        CA_TTL,
    )
    .unwrap();
    // The chain names a CA that did not sign it.
    let wrong = create_intermediate_ca(
        &td("example.org"),
        &key().public_key_der(),
        &CaSubject::default(),
        &other_root,
        now(),
        CA_TTL,
    )
    .unwrap();
    assert!(matches!(
        X509Ca::new(der2, int2_key, vec![wrong]),
        Err(X509Error::InvalidCaChain(_))
    ));
}

#[test]
fn intermediate_ca_must_stay_in_the_parent_trust_domain() {
    let root = root_ca("example.org");
    assert!(matches!(
        create_intermediate_ca(
            &td("other.org"),
            &key().public_key_der(),
            &CaSubject::default(),
            &root,
            now(),
            CA_TTL,
        ),
        Err(X509Error::TrustDomainMismatch { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// CSRs

#[test]
fn csr_round_trip_with_and_without_a_spiffe_id() {
    for key_type in [KeyType::EcP256, KeyType::EcP384] {
        let csr_key = KeyPair::generate(key_type).unwrap();
        let spiffe_id = id("spiffe://example.org/workload");
        let der = build_csr(&csr_key, Some(&spiffe_id)).unwrap();
        let csr = parse_csr(&der).unwrap();
        assert_eq!(csr.public_key_der(), csr_key.public_key_der().as_slice());
        assert_eq!(
            csr.uri_sans(),
            &["spiffe://example.org/workload".to_owned()]
        );
        assert!(csr.dns_names().is_empty());

        // Agent CSRs carry no SAN.
        let der = build_csr(&csr_key, None).unwrap();
        let csr = parse_csr(&der).unwrap();
        assert!(csr.uri_sans().is_empty());

        // Subject C=US, O=SPIRE.
        let (_, parsed) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        let attrs: Vec<_> = parsed
            .certification_request_info
            .subject
            .iter()
            .flat_map(|rdn| rdn.iter())
            .map(|a| (a.attr_type().to_id_string(), a.as_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            attrs,
            vec![
                (OID_C.to_owned(), "US".to_owned()),
                (OID_O.to_owned(), "SPIRE".to_owned())
            ]
        );
    }
}

#[test]
fn csr_with_a_flipped_signature_byte_is_refused() {
    let der = build_csr(&key(), Some(&id("spiffe://example.org/w"))).unwrap();
    let mut bad = der.clone();
    // The last byte belongs to the signature's `s` integer.
    *bad.last_mut().unwrap() ^= 0x01;
    assert!(matches!(parse_csr(&bad), Err(X509Error::CsrSignature)));
    parse_csr(&der).unwrap();
}

#[test]
fn csr_garbage_and_trailing_bytes_are_refused() {
    assert!(matches!(parse_csr(b""), Err(X509Error::Malformed(_))));
    assert!(matches!(
        parse_csr(b"not a csr at all"),
        Err(X509Error::Malformed(_))
    ));
    let mut der = build_csr(&key(), None).unwrap();
    der.push(0);
    assert!(matches!(parse_csr(&der), Err(X509Error::TrailingData(_))));
    // A truncated CSR.
    let der = build_csr(&key(), None).unwrap();
    assert!(matches!(
        parse_csr(&der[..der.len() - 5]),
        Err(X509Error::Malformed(_))
    ));
}

#[test]
fn csr_with_an_unsupported_key_is_refused() {
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let der = params.serialize_request(&ed).unwrap().der().to_vec();
    assert!(matches!(parse_csr(&der), Err(X509Error::UnsupportedKey)));
}

#[test]
fn svid_from_csr_uses_the_csr_key_and_ignores_its_names() {
    let ca = root_ca("example.org");
    let workload_key = key();
    let csr = build_csr(&workload_key, Some(&id("spiffe://example.org/requested"))).unwrap();
    let svid = ca
        .mint_svid_from_csr(
            &csr,
            &id("spiffe://example.org/granted"),
            &["granted.example.org".to_owned()],
            SVID_TTL,
            now(),
        )
        .unwrap();
    let cert = parse(svid.leaf_der());
    assert_eq!(
        uri_sans(&cert),
        vec!["spiffe://example.org/granted".to_owned()]
    );
    assert_eq!(dns_sans(&cert), vec!["granted.example.org".to_owned()]);
    assert_eq!(
        cert.public_key().raw,
        workload_key.public_key_der().as_slice()
    );
    // A tampered CSR mints nothing.
    let mut bad = csr.clone();
    *bad.last_mut().unwrap() ^= 0x01;
    assert!(matches!(
        ca.mint_svid_from_csr(&bad, &id("spiffe://example.org/x"), &[], SVID_TTL, now()),
        Err(X509Error::CsrSignature)
    ));
}

// ---------------------------------------------------------------------------------------------
// Verification

#[test]
fn verification_accepts_a_good_leaf() {
    let ca = root_ca("example.org");
    let svid = mint(&ca, "spiffe://example.org/web");
    let verified = verify_svid_chain(
        svid.cert_chain(),
        &td("example.org"),
        &[ca.cert_der()],
        now(),
    )
    .unwrap();
    assert_eq!(verified.spiffe_id(), &id("spiffe://example.org/web"));
    assert_eq!(verified.not_after(), svid.not_after());
    assert_eq!(verified.not_before(), unix(1_750_000_000 - 10));
    assert_eq!(verified.serial(), svid.serial());
    // Slices of slices work as well as the owned chain, and extra roots do no harm.
    let other = root_ca("example.org");
    let chain: Vec<&[u8]> = vec![svid.leaf_der()];
    verify_svid_chain(
        &chain,
        &td("example.org"),
        &[other.cert_der(), ca.cert_der()],
        now(),
    )
    .unwrap();
}

#[test]
fn verification_rejects_a_wrong_root() {
    let ca = root_ca("example.org");
    let other = root_ca("example.org");
    let svid = mint(&ca, "spiffe://example.org/web");
    assert!(matches!(
        verify_svid_chain(
            svid.cert_chain(),
            &td("example.org"),
            &[other.cert_der()],
            now()
        ),
        Err(X509Error::UnknownAuthority)
    ));
    let no_roots: [&[u8]; 0] = [];
    assert!(matches!(
        verify_svid_chain(svid.cert_chain(), &td("example.org"), &no_roots, now()),
        Err(X509Error::BadAuthority)
    ));
    assert!(matches!(
        verify_svid_chain(
            svid.cert_chain(),
            &td("example.org"),
            &[b"junk".as_slice()],
            now()
        ),
        Err(X509Error::BadAuthority)
    ));
}

#[test]
fn verification_rejects_expired_and_not_yet_valid() {
    let ca = root_ca("example.org");
    let svid = mint(&ca, "spiffe://example.org/web");
    let authorities = [ca.cert_der()];
    let after = svid.not_after() + Duration::from_secs(1);
    assert!(matches!(
        verify_svid_chain(svid.cert_chain(), &td("example.org"), &authorities, after),
        Err(X509Error::Expired)
    ));
    let before = now() - Duration::from_secs(60);
    assert!(matches!(
        verify_svid_chain(svid.cert_chain(), &td("example.org"), &authorities, before),
        Err(X509Error::NotYetValid)
    ));
    // Inside the backdate window it is valid.
    let just_before = now() - Duration::from_secs(5);
    verify_svid_chain(
        svid.cert_chain(),
        &td("example.org"),
        &authorities,
        just_before,
    )
    .unwrap();
}

#[test]
fn x10_a_ca_certificate_is_not_an_svid() {
    let ca = root_ca("example.org");
    assert!(matches!(
        verify_svid_chain(
            &[ca.cert_der()],
            &td("example.org"),
            &[ca.cert_der()],
            now()
        ),
        Err(X509Error::CaAsLeaf)
    ));
    // An intermediate presented as a leaf, with the root trusted.
    let int_key = key();
    let der = create_intermediate_ca(
        &td("example.org"),
        &int_key.public_key_der(),
        &CaSubject::default(),
        &ca,
        now(),
        CA_TTL,
    )
    .unwrap();
    assert!(matches!(
        verify_svid_chain(&[der], &td("example.org"), &[ca.cert_der()], now()),
        Err(X509Error::CaAsLeaf)
    ));
}

#[test]
fn x11_leaf_with_two_uri_sans_is_refused() {
    let ca = root_ca("example.org");
    let der = sign_raw(
        &ca,
        &raw_leaf_params(&["spiffe://example.org/a", "spiffe://example.org/b"]),
    );
    assert!(matches!(
        verify_svid_chain(&[&der], &td("example.org"), &[ca.cert_der()], now()),
        Err(X509Error::UriSanCount(2))
    ));
    assert!(matches!(spiffe_id_of(&der), Err(X509Error::UriSanCount(2))));
    // The control: the same template with one URI SAN passes.
    let good = sign_raw(&ca, &raw_leaf_params(&["spiffe://example.org/a"]));
    verify_svid_chain(&[&good], &td("example.org"), &[ca.cert_der()], now()).unwrap();
}

#[test]
fn x11_leaf_checks_refuse_each_broken_rule() {
    let ca = root_ca("example.org");
    let trust_domain = td("example.org");
    let verify = |der: &[u8]| verify_svid_chain(&[der], &trust_domain, &[ca.cert_der()], now());

    // No URI SAN.
    let der = sign_raw(&ca, &raw_leaf_params(&[]));
    assert!(matches!(verify(&der), Err(X509Error::UriSanCount(0))));
    // A URI SAN that is not a SPIFFE ID (scheme https).
    let der = sign_raw(&ca, &raw_leaf_params(&["https://example.org/a"]));
    assert!(matches!(verify(&der), Err(X509Error::InvalidSpiffeId(_))));
    // A root ID.
    let der = sign_raw(&ca, &raw_leaf_params(&["spiffe://example.org"]));
    assert!(matches!(verify(&der), Err(X509Error::LeafIdIsRoot(_))));
    // keyCertSign on a leaf.
    let mut params = raw_leaf_params(&["spiffe://example.org/a"]);
    params.key_usages.push(rcgen::KeyUsagePurpose::KeyCertSign);
    let der = sign_raw(&ca, &params);
    assert!(matches!(verify(&der), Err(X509Error::LeafKeyUsage(_))));
    // cRLSign on a leaf.
    let mut params = raw_leaf_params(&["spiffe://example.org/a"]);
    params.key_usages.push(rcgen::KeyUsagePurpose::CrlSign);
    let der = sign_raw(&ca, &params);
    assert!(matches!(verify(&der), Err(X509Error::LeafKeyUsage(_))));
    // No digitalSignature.
    let mut params = raw_leaf_params(&["spiffe://example.org/a"]);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyEncipherment];
    let der = sign_raw(&ca, &params);
    assert!(matches!(verify(&der), Err(X509Error::LeafKeyUsage(_))));
    // No keyUsage at all.
    let mut params = raw_leaf_params(&["spiffe://example.org/a"]);
    params.key_usages.clear();
    let der = sign_raw(&ca, &params);
    assert!(matches!(verify(&der), Err(X509Error::LeafKeyUsage(_))));
    // An EKU for something else entirely.
    let mut params = raw_leaf_params(&["spiffe://example.org/a"]);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
    let der = sign_raw(&ca, &params);
    assert!(matches!(verify(&der), Err(X509Error::ExtendedKeyUsage)));
    // No EKU is fine, as for go-spiffe.
    let mut params = raw_leaf_params(&["spiffe://example.org/a"]);
    params.extended_key_usages.clear();
    verify(&sign_raw(&ca, &params)).unwrap();
}

#[test]
fn verification_checks_the_trust_domain() {
    let ca = root_ca("example.org");
    let svid = mint(&ca, "spiffe://example.org/web");
    assert!(matches!(
        verify_svid_chain(svid.cert_chain(), &td("other.org"), &[ca.cert_der()], now()),
        Err(X509Error::TrustDomainMismatch { .. })
    ));
    // A CA whose URI SAN names example.org signing an ID in other.org, built with rcgen.
    let der = sign_raw(&ca, &raw_leaf_params(&["spiffe://other.org/web"]));
    assert!(matches!(
        verify_svid_chain(&[&der], &td("example.org"), &[ca.cert_der()], now()),
        Err(X509Error::TrustDomainMismatch { .. })
    ));
}

#[test]
fn intermediate_chain_verifies_with_only_the_root_trusted() {
    let root = root_ca("example.org");
    let int_key = key();
    let der = create_intermediate_ca(
        &td("example.org"),
        &int_key.public_key_der(),
        &CaSubject::default(),
        &root,
        now(),
        CA_TTL,
    )
    .unwrap();
    let intermediate = X509Ca::new(der, int_key, root.issued_chain()).unwrap();
    let svid = mint(&intermediate, "spiffe://example.org/web");
    let verified = verify_svid_chain(
        svid.cert_chain(),
        &td("example.org"),
        &[root.cert_der()],
        now(),
    )
    .unwrap();
    assert_eq!(verified.spiffe_id(), &id("spiffe://example.org/web"));
    // Without the intermediate in chain[1..] the leaf does not reach the root.
    assert!(matches!(
        verify_svid_chain(
            &[svid.leaf_der()],
            &td("example.org"),
            &[root.cert_der()],
            now()
        ),
        Err(X509Error::UnknownAuthority)
    ));
}

#[test]
fn intermediates_without_key_cert_sign_are_refused() {
    // go-spiffe requires keyCertSign on every signing certificate; build such a CA with rcgen.
    let root = root_ca("example.org");
    let (root_key, root_der) = rcgen_signer(&root);
    let root_issuer =
        rcgen::Issuer::from_ca_cert_der(&CertificateDer::from(root_der), &root_key).unwrap();
    let int_key = key();
    let int_rc_key = rcgen::KeyPair::try_from(int_key.secret_pkcs8_der()).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org".try_into().unwrap(),
    )];
    let int_der = params
        .signed_by(&int_rc_key, &root_issuer)
        .unwrap()
        .der()
        .to_vec();
    assert!(matches!(
        X509Ca::new(int_der.clone(), int_key, Vec::new()),
        Err(X509Error::MissingKeyCertSign)
    ));

    let int_issuer =
        rcgen::Issuer::from_ca_cert_der(&CertificateDer::from(int_der.clone()), &int_rc_key)
            .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = raw_leaf_params(&["spiffe://example.org/web"])
        .signed_by(&leaf_key, &int_issuer)
        .unwrap()
        .der()
        .to_vec();
    assert!(matches!(
        verify_svid_chain(
            &[leaf, int_der],
            &td("example.org"),
            &[root.cert_der()],
            now()
        ),
        Err(X509Error::MissingKeyCertSign)
    ));
}

#[test]
fn empty_chain_is_refused() {
    let ca = root_ca("example.org");
    let empty: [&[u8]; 0] = [];
    assert!(matches!(
        verify_svid_chain(&empty, &td("example.org"), &[ca.cert_der()], now()),
        Err(X509Error::EmptyChain)
    ));
}

// ---------------------------------------------------------------------------------------------
// Helpers

#[test]
fn fingerprint_is_lowercase_sha1_hex_of_the_der() {
    let ca = root_ca("example.org");
    let fingerprint = fingerprint_sha1_hex(ca.cert_der());
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, ca.cert_der());
    let expected: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(fingerprint, expected);
    assert_eq!(fingerprint.len(), 40);
    // It makes a valid x509pop agent ID.
    let agent = td("example.org").x509pop_agent_id(&fingerprint).unwrap();
    assert!(agent.as_str().ends_with(&fingerprint));
}

#[test]
fn inspection_helpers_refuse_garbage() {
    assert!(matches!(
        spiffe_id_of(b"junk"),
        Err(X509Error::Malformed(_))
    ));
    assert!(matches!(validity_of(b""), Err(X509Error::Malformed(_))));
    assert!(matches!(is_ca(b"\x30\x00"), Err(X509Error::Malformed(_))));
    assert!(matches!(
        serial_decimal(b"junk"),
        Err(X509Error::Malformed(_))
    ));
    assert!(matches!(
        svid_identity(b"junk"),
        Err(X509Error::Malformed(_))
    ));
    let ca = root_ca("example.org");
    let mut trailing = ca.cert_der().to_vec();
    trailing.push(0);
    assert!(matches!(
        spiffe_id_of(&trailing),
        Err(X509Error::TrailingData(_))
    ));
    assert!(matches!(
        X509Svid::from_chain(Vec::new()),
        Err(X509Error::EmptyChain)
    ));
}

#[test]
fn errors_are_lowercase() {
    let errors = [
        X509Error::CsrSignature,
        X509Error::UnknownAuthority,
        X509Error::CaAsLeaf,
        X509Error::Expired,
        X509Error::UriSanCount(2),
    ];
    for error in errors {
        let text = error.to_string();
        assert!(text.chars().next().unwrap().is_lowercase(), "{text}");
        assert!(!text.ends_with('.'), "{text}");
    }
}

#[test]
fn rsa_csrs_are_accepted_and_minted() {
    use rsa::pkcs8::EncodePrivateKey as _;
    let rsa_key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let key = KeyPair::from_pkcs8_der(rsa_key.to_pkcs8_der().unwrap().as_bytes()).unwrap();
    assert_eq!(key.key_type(), KeyType::Rsa2048);
    let id: SpiffeId = "spiffe://example.org/rsa-workload".parse().unwrap();
    let csr = lanyard_core::x509::build_csr(&key, Some(&id)).unwrap();
    let verified = lanyard_core::x509::parse_csr(&csr).unwrap();
    assert_eq!(verified.public_key_der(), key.public_key_der());
    assert_eq!(verified.uri_sans(), [id.to_string()]);

    let ca = lanyard_core::x509::X509Ca::self_signed(
        &td("example.org"),
        KeyPair::generate(KeyType::EcP256).unwrap(),
        &lanyard_core::x509::CaSubject::default(),
        now(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let svid = ca
        .mint_svid_from_csr(&csr, &id, &[], Duration::from_secs(600), now())
        .unwrap();
    let verified = lanyard_core::x509::verify_svid_chain(
        svid.cert_chain(),
        &td("example.org"),
        &[ca.cert_der()],
        now(),
    )
    .unwrap();
    assert_eq!(verified.spiffe_id(), &id);

    // A tampered RSA CSR is refused.
    let mut bad = csr.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    assert!(lanyard_core::x509::parse_csr(&bad).is_err());
}

fn revoked(serial: &str) -> RevokedSerial {
    RevokedSerial {
        serial: serial.to_owned(),
        authority_id: String::new(),
        revoked_at: now(),
    }
}

#[test]
fn a_crl_is_a_v2_list_signed_by_its_ca_with_number_times_and_key_id() {
    let ca = root_ca("example.org");
    let svid = mint(&ca, "spiffe://example.org/web");
    let next = now() + Duration::from_secs(600);
    let der = ca
        .sign_crl(&[revoked(svid.serial())], 42, now(), next)
        .unwrap();
    let (rest, crl) = CertificateRevocationList::from_der(&der).unwrap();
    assert!(rest.is_empty());
    let ca_cert = parse(ca.cert_der());
    assert_eq!(crl.issuer().as_raw(), ca_cert.subject().as_raw());
    crl.verify_signature(ca_cert.public_key()).unwrap();
    assert_eq!(crl.version(), Some(x509_parser::x509::X509Version::V2));
    assert_eq!(crl.crl_number().map(ToString::to_string), Some("42".into()));
    assert_eq!(crl.last_update().timestamp(), 1_750_000_000);
    assert_eq!(
        crl.next_update().map(|t| t.timestamp()),
        Some(1_750_000_600)
    );
    let serials: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| r.serial().to_string())
        .collect();
    assert_eq!(serials, vec![svid.serial().to_owned()]);
    let aki = crl
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.clone(),
            _ => None,
        })
        .expect("an authority key identifier");
    assert_eq!(aki.0, ski(&ca_cert).as_slice());

    // An empty list is still a valid CRL, and a next update before this one is refused.
    let empty = ca.sign_crl(&[], 43, now(), next).unwrap();
    let (_, crl) = CertificateRevocationList::from_der(&empty).unwrap();
    assert_eq!(crl.iter_revoked_certificates().count(), 0);
    assert!(ca.sign_crl(&[], 44, next, now()).is_err());
    assert!(ca.sign_crl(&[revoked("0x12")], 45, now(), next).is_err());
}

#[test]
fn a_chain_on_its_issuers_crl_is_refused_and_others_pass() {
    let ca = root_ca("example.org");
    let bad = mint(&ca, "spiffe://example.org/web");
    let good = mint(&ca, "spiffe://example.org/web");
    let next = now() + Duration::from_secs(600);
    let crl = ca
        .sign_crl(&[revoked(bad.serial())], 1, now(), next)
        .unwrap();
    let verify = |svid: &X509Svid, crls: &[&[u8]]| {
        verify_svid_chain_with_crls(
            svid.cert_chain(),
            &td("example.org"),
            &[ca.cert_der()],
            crls,
            now(),
        )
    };
    assert!(matches!(verify(&bad, &[&crl]), Err(X509Error::Revoked)));
    verify(&good, &[&crl]).unwrap();
    verify(&bad, &[]).unwrap();

    // Another CA of the trust domain, with the same subject, signs a CRL listing the serial:
    // it is not the issuer's, so it neither refuses the certificate nor breaks verification.
    let other = root_ca("example.org");
    assert_eq!(
        parse(other.cert_der()).subject().as_raw(),
        parse(ca.cert_der()).subject().as_raw()
    );
    let foreign = other
        .sign_crl(&[revoked(good.serial())], 1, now(), next)
        .unwrap();
    verify(&good, &[&foreign, &crl]).unwrap();
    assert!(matches!(
        verify(&bad, &[&foreign, &crl]),
        Err(X509Error::Revoked)
    ));

    // A CRL past its next update still refuses what it lists.
    let stale = ca
        .sign_crl(
            &[revoked(bad.serial())],
            2,
            now() - Duration::from_secs(7200),
            now() - Duration::from_secs(3600),
        )
        .unwrap();
    assert!(matches!(verify(&bad, &[&stale]), Err(X509Error::Revoked)));

    // A malformed list is an error, not a pass.
    let mut broken = crl.clone();
    broken.truncate(broken.len() - 3);
    assert!(matches!(
        verify(&good, &[&broken]),
        Err(X509Error::BadCrl(_))
    ));
}

#[test]
fn an_intermediates_crl_refuses_the_leaves_it_issued() {
    let root = root_ca("example.org");
    let int_key = key();
    let der = create_intermediate_ca(
        &td("example.org"),
        &int_key.public_key_der(),
        &CaSubject::default(),
        &root,
        now(),
        CA_TTL,
    )
    .unwrap();
    let intermediate = X509Ca::new(der, int_key, root.issued_chain()).unwrap();
    let svid = mint(&intermediate, "spiffe://example.org/web");
    let next = now() + Duration::from_secs(600);
    let by_intermediate = intermediate
        .sign_crl(&[revoked(svid.serial())], 1, now(), next)
        .unwrap();
    let by_root = root
        .sign_crl(&[revoked(svid.serial())], 1, now(), next)
        .unwrap();
    let verify = |crls: &[&[u8]]| {
        verify_svid_chain_with_crls(
            svid.cert_chain(),
            &td("example.org"),
            &[root.cert_der()],
            crls,
            now(),
        )
    };
    assert!(matches!(
        verify(&[&by_intermediate]),
        Err(X509Error::Revoked)
    ));
    // The root did not issue the leaf: its list does not reach it.
    verify(&[&by_root]).unwrap();
}

#[test]
fn the_server_verifier_refuses_a_certificate_on_its_crl() {
    use std::sync::Arc;

    use lanyard_core::tls::SpiffeServerVerifier;
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::{ServerName, UnixTime};

    let ca = root_ca("example.org");
    let revoked_svid = mint(&ca, "spiffe://example.org/server");
    let good_svid = mint(&ca, "spiffe://example.org/server");
    let crl = ca
        .sign_crl(
            &[revoked(revoked_svid.serial())],
            1,
            now(),
            now() + Duration::from_secs(600),
        )
        .unwrap();
    let authorities = vec![ca.cert_der().to_vec()];
    let verifier = |with_crl: bool| {
        let authorities = authorities.clone();
        let verifier = SpiffeServerVerifier::new(
            id("spiffe://example.org/server"),
            Arc::new(move || authorities.clone()),
        );
        if with_crl {
            let crl = crl.clone();
            verifier.with_crls(Arc::new(move || vec![crl.clone()]))
        } else {
            verifier
        }
    };
    let at = UnixTime::since_unix_epoch(now().duration_since(UNIX_EPOCH).unwrap());
    let name = ServerName::try_from("server").unwrap();
    let check = |verifier: &SpiffeServerVerifier, svid: &X509Svid| {
        verifier.verify_server_cert(&CertificateDer::from(svid.leaf_der()), &[], &name, &[], at)
    };
    let error = check(&verifier(true), &revoked_svid).unwrap_err();
    assert!(error.to_string().contains("revoked"), "{error}");
    check(&verifier(true), &good_svid).unwrap();
    check(&verifier(false), &revoked_svid).unwrap();
}
