//! x509pop attestation against a PKI generated at run time: the round trip for P-256 and RSA
//! agents, the JSON shapes SPIRE exchanges, and every refusal (foreign CA, expiry, wrong key,
//! tampered or replayed signatures, short nonces, malformed input).
// `allow-unwrap-in-tests` covers only `#[test]` functions, not this module's helpers.
#![allow(clippy::unwrap_used)]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use lanyard_core::x509::fingerprint_sha1_hex;
use lanyard_core::x509pop::{
    Challenge, MAX_INTERMEDIATES, MAX_MESSAGE_LEN, NONCE_LEN, Response, ServerAttestation,
    X509PopError, X509PopResult, answer_challenge, build_attestation_payload,
};
use lanyard_core::{KeyPair, KeyType, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use serde_json::Value;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_000_000)
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap()).unwrap()
}

/// A CA (root or intermediate) made with rcgen: a plain operator PKI, not a SPIFFE one.
struct Ca {
    der: Vec<u8>,
    issuer: Issuer<'static, rcgen::KeyPair>,
}

fn ca_params(
    common_name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = offset(not_before);
    params.not_after = offset(not_after);
    params
}

fn root_ca_valid(common_name: &str, not_before: SystemTime, not_after: SystemTime) -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = ca_params(common_name, not_before, not_after);
    let der = params.self_signed(&key).unwrap().der().to_vec();
    Ca {
        der,
        issuer: Issuer::new(params, key),
    }
}

fn root_ca(common_name: &str) -> Ca {
    root_ca_valid(common_name, now() - DAY, now() + 30 * DAY)
}

fn intermediate_ca(common_name: &str, parent: &Ca) -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = ca_params(common_name, now() - DAY, now() + 30 * DAY);
    let der = params
        .signed_by(&key, &parent.issuer)
        .unwrap()
        .der()
        .to_vec();
    Ca {
        der,
        issuer: Issuer::new(params, key),
    }
}

/// What goes into an agent's leaf certificate.
struct LeafSpec {
    common_name: Option<&'static str>,
    serial: Vec<u8>,
    key_usages: Vec<KeyUsagePurpose>,
    extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
    uris: Vec<&'static str>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Default for LeafSpec {
    fn default() -> Self {
        Self {
            common_name: Some("node-1"),
            serial: vec![0x0a, 0x1b, 0x2c],
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
            extended_key_usages: Vec::new(),
            uris: Vec::new(),
            not_before: now() - HOUR,
            not_after: now() + DAY,
        }
    }
}

fn leaf_cert(agent_key: &KeyPair, issuer: &Ca, spec: &LeafSpec) -> Vec<u8> {
    let public = rcgen::KeyPair::try_from(agent_key.secret_pkcs8_der()).unwrap();
    let mut params = CertificateParams::default();
    // rcgen's default subject has a common name of its own.
    params.distinguished_name = DistinguishedName::new();
    if let Some(common_name) = spec.common_name {
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
    }
    params.serial_number = Some(SerialNumber::from_slice(&spec.serial));
    params.key_usages = spec.key_usages.clone();
    params.extended_key_usages = spec.extended_key_usages.clone();
    params.subject_alt_names = spec
        .uris
        .iter()
        .map(|uri| SanType::URI((*uri).try_into().unwrap()))
        .collect();
    params.not_before = offset(spec.not_before);
    params.not_after = offset(spec.not_after);
    params
        .signed_by(&public, &issuer.issuer)
        .unwrap()
        .der()
        .to_vec()
}

fn p256() -> KeyPair {
    KeyPair::generate(KeyType::EcP256).unwrap()
}

/// One RSA-2048 key per test run: ring cannot generate RSA keys, and generating them is slow.
fn rsa_private_key() -> &'static rsa::RsaPrivateKey {
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap())
}

fn rsa_key() -> KeyPair {
    use rsa::pkcs8::EncodePrivateKey as _;
    let der = rsa_private_key().to_pkcs8_der().unwrap();
    KeyPair::from_pkcs8_der(der.as_bytes()).unwrap()
}

/// A root, an agent key and its leaf signed directly by the root.
struct Setup {
    root: Ca,
    key: KeyPair,
    leaf: Vec<u8>,
}

fn setup_with(key: KeyPair, spec: &LeafSpec) -> Setup {
    let root = root_ca("Agent Root CA");
    let leaf = leaf_cert(&key, &root, spec);
    Setup { root, key, leaf }
}

fn setup() -> Setup {
    setup_with(p256(), &LeafSpec::default())
}

impl Setup {
    fn begin(&self) -> Result<(ServerAttestation, Vec<u8>), X509PopError> {
        let payload = build_attestation_payload(std::slice::from_ref(&self.leaf));
        ServerAttestation::begin(&payload, std::slice::from_ref(&self.root.der), &td(), now())
    }

    fn attest(&self) -> Result<X509PopResult, X509PopError> {
        let (server, challenge) = self.begin()?;
        let response = answer_challenge(&self.key, &challenge)?;
        server.finish(&response)
    }
}

fn selector_values(result: &X509PopResult) -> Vec<String> {
    result
        .selectors()
        .iter()
        .map(|selector| {
            assert_eq!(selector.kind(), "x509pop");
            selector.value().to_owned()
        })
        .collect()
}

fn assert_denied(result: Result<X509PopResult, X509PopError>) -> X509PopError {
    let error = result.unwrap_err();
    assert!(
        error.is_verification_failure(),
        "{error:?} should be a verification failure"
    );
    error
}

/// A base64 string as Go writes `[]byte`: standard alphabet, padded, canonical.
fn decode_go_base64(value: &Value) -> Vec<u8> {
    let text = value.as_str().expect("byte strings are JSON strings");
    assert_eq!(text.len() % 4, 0, "{text} is padded");
    let bytes = STANDARD.decode(text).unwrap();
    assert_eq!(STANDARD.encode(&bytes), text);
    bytes
}

fn object_keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

#[test]
fn p256_round_trip_through_an_intermediate() {
    let root = root_ca("Agent Root CA");
    let intermediate = intermediate_ca("Agent Issuing CA", &root);
    let key = p256();
    let spec = LeafSpec {
        uris: vec![
            "x509pop://example.org/datacenter/us-east",
            "x509pop://example.org/rack/r1/slot%2F2",
            "x509pop://other.org/zone/ignored",
            "x509pop://example.org/novalue",
            "spiffe://example.org/not/a/selector",
        ],
        ..LeafSpec::default()
    };
    let leaf = leaf_cert(&key, &intermediate, &spec);
    let payload = build_attestation_payload(&[leaf.clone(), intermediate.der.clone()]);

    let (server, challenge) =
        ServerAttestation::begin(&payload, std::slice::from_ref(&root.der), &td(), now()).unwrap();
    let response = answer_challenge(&key, &challenge).unwrap();
    let result = server.finish(&response).unwrap();

    assert_eq!(
        result.agent_id().as_str(),
        format!(
            "spiffe://example.org/spire/agent/x509pop/{}",
            fingerprint_sha1_hex(&leaf)
        )
    );
    let fingerprint = fingerprint_sha1_hex(&leaf);
    assert_eq!(fingerprint.len(), 40);
    assert!(
        fingerprint
            .chars()
            .all(|c| matches!(c, '0'..='9' | 'a'..='f'))
    );
    assert_eq!(
        selector_values(&result),
        [
            "subject:cn:node-1".to_owned(),
            format!("ca:fingerprint:{}", fingerprint_sha1_hex(&intermediate.der)),
            format!("ca:fingerprint:{}", fingerprint_sha1_hex(&root.der)),
            "serialnumber:0a1b2c".to_owned(),
            "san:datacenter:us-east".to_owned(),
            "san:rack:r1/slot/2".to_owned(),
        ]
    );
    assert_eq!(result.leaf_not_after(), now() + DAY);
}

#[test]
fn selectors_without_common_name_and_with_a_high_bit_serial() {
    let setup = setup_with(
        p256(),
        &LeafSpec {
            common_name: None,
            serial: vec![0x80, 0x01],
            ..LeafSpec::default()
        },
    );
    let result = setup.attest().unwrap();
    assert_eq!(
        selector_values(&result),
        [
            format!("ca:fingerprint:{}", fingerprint_sha1_hex(&setup.root.der)),
            "serialnumber:8001".to_owned(),
        ]
    );
}

#[test]
fn messages_have_go_json_shapes() {
    let setup = setup();
    let payload = build_attestation_payload(std::slice::from_ref(&setup.leaf));
    let payload_json: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(object_keys(&payload_json), ["certificates"]);
    let certificates = payload_json["certificates"].as_array().unwrap();
    assert_eq!(certificates.len(), 1);
    assert_eq!(decode_go_base64(&certificates[0]), setup.leaf);

    let (server, challenge) = ServerAttestation::begin(
        &payload,
        std::slice::from_ref(&setup.root.der),
        &td(),
        now(),
    )
    .unwrap();
    let challenge_json: Value = serde_json::from_slice(&challenge).unwrap();
    assert_eq!(
        object_keys(&challenge_json),
        ["ecdsa_signature", "rsa_signature"]
    );
    assert!(challenge_json["rsa_signature"].is_null());
    assert_eq!(object_keys(&challenge_json["ecdsa_signature"]), ["nonce"]);
    let challenge_nonce = decode_go_base64(&challenge_json["ecdsa_signature"]["nonce"]);
    assert_eq!(challenge_nonce.len(), NONCE_LEN);

    let response = answer_challenge(&setup.key, &challenge).unwrap();
    let response_json: Value = serde_json::from_slice(&response).unwrap();
    assert_eq!(
        object_keys(&response_json),
        ["ecdsa_signature", "rsa_signature"]
    );
    assert!(response_json["rsa_signature"].is_null());
    let ecdsa = &response_json["ecdsa_signature"];
    assert_eq!(object_keys(ecdsa), ["nonce", "r", "s"]);
    let response_nonce = decode_go_base64(&ecdsa["nonce"]);
    assert_eq!(response_nonce.len(), NONCE_LEN);
    assert_ne!(response_nonce, challenge_nonce);
    for scalar in [&ecdsa["r"], &ecdsa["s"]] {
        let bytes = decode_go_base64(scalar);
        assert!(bytes.len() <= 32);
        assert_ne!(bytes.first(), Some(&0), "scalars carry no leading zero");
    }
    server.finish(&response).unwrap();
}

#[test]
fn an_answer_from_another_key_is_refused() {
    let setup = setup();
    let (server, challenge) = setup.begin().unwrap();
    let response = answer_challenge(&p256(), &challenge).unwrap();
    let error = assert_denied(server.finish(&response));
    assert!(
        matches!(error, X509PopError::SignatureInvalid("ECDSA")),
        "{error:?}"
    );
}

#[test]
fn a_leaf_from_another_ca_is_refused() {
    let setup = setup();
    let other_root = root_ca("Agent Root CA");
    let payload = build_attestation_payload(std::slice::from_ref(&setup.leaf));
    let error = ServerAttestation::begin(&payload, &[other_root.der], &td(), now()).unwrap_err();
    assert!(
        matches!(error, X509PopError::UntrustedCertificate),
        "{error:?}"
    );
    assert!(error.is_verification_failure());
}

#[test]
fn an_intermediate_not_chaining_to_the_anchor_is_refused() {
    let root = root_ca("Agent Root CA");
    let foreign_intermediate = intermediate_ca("Agent Issuing CA", &root_ca("Other Root"));
    let key = p256();
    let leaf = leaf_cert(&key, &foreign_intermediate, &LeafSpec::default());
    let payload = build_attestation_payload(&[leaf, foreign_intermediate.der]);
    let error = ServerAttestation::begin(&payload, &[root.der], &td(), now()).unwrap_err();
    assert!(
        matches!(error, X509PopError::UntrustedCertificate),
        "{error:?}"
    );
}

#[test]
fn expired_and_not_yet_valid_leaves_are_refused() {
    let expired = setup_with(
        p256(),
        &LeafSpec {
            not_before: now() - 2 * DAY,
            not_after: now() - DAY,
            ..LeafSpec::default()
        },
    );
    let error = expired.begin().unwrap_err();
    assert!(matches!(error, X509PopError::Expired), "{error:?}");
    assert!(error.is_verification_failure());

    let future = setup_with(
        p256(),
        &LeafSpec {
            not_before: now() + HOUR,
            not_after: now() + DAY,
            ..LeafSpec::default()
        },
    );
    let error = future.begin().unwrap_err();
    assert!(matches!(error, X509PopError::NotYetValid), "{error:?}");

    // The same certificate is accepted at a time inside its validity.
    let payload = build_attestation_payload(std::slice::from_ref(&future.leaf));
    ServerAttestation::begin(
        &payload,
        std::slice::from_ref(&future.root.der),
        &td(),
        now() + 2 * HOUR,
    )
    .unwrap();
}

#[test]
fn an_expired_trust_anchor_is_not_used() {
    // Go checks the root's validity too; webpki alone would not.
    let root = root_ca_valid("Agent Root CA", now() - 30 * DAY, now() - DAY);
    let key = p256();
    let leaf = leaf_cert(&key, &root, &LeafSpec::default());
    let payload = build_attestation_payload(&[leaf]);
    let error = ServerAttestation::begin(&payload, &[root.der], &td(), now()).unwrap_err();
    assert!(error.is_verification_failure(), "{error:?}");
}

#[test]
fn tampered_and_replayed_signatures_are_refused() {
    let setup = setup();
    let (server, challenge) = setup.begin().unwrap();
    let response = answer_challenge(&setup.key, &challenge).unwrap();
    let mut parsed: Response = serde_json::from_slice(&response).unwrap();
    let ecdsa = parsed.ecdsa_signature.as_mut().unwrap();
    let last = ecdsa.s.last_mut().unwrap();
    *last ^= 0x01;
    let tampered = serde_json::to_vec(&parsed).unwrap();
    let error = assert_denied(server.finish(&tampered));
    assert!(
        matches!(error, X509PopError::SignatureInvalid(_)),
        "{error:?}"
    );

    // A response to one challenge does not answer another: the digest covers the nonce.
    let (first, first_challenge) = setup.begin().unwrap();
    let (second, _) = setup.begin().unwrap();
    let response = answer_challenge(&setup.key, &first_challenge).unwrap();
    let error = assert_denied(second.finish(&response));
    assert!(
        matches!(error, X509PopError::SignatureInvalid(_)),
        "{error:?}"
    );
    first.finish(&response).unwrap();
}

#[test]
fn a_short_response_nonce_is_refused() {
    let setup = setup();
    let (server, challenge) = setup.begin().unwrap();
    let response = answer_challenge(&setup.key, &challenge).unwrap();
    let mut parsed: Response = serde_json::from_slice(&response).unwrap();
    parsed.ecdsa_signature.as_mut().unwrap().nonce.truncate(31);
    let short = serde_json::to_vec(&parsed).unwrap();
    let error = assert_denied(server.finish(&short));
    assert!(
        matches!(
            error,
            X509PopError::NonceLength {
                which: "response",
                len: 31
            }
        ),
        "{error:?}"
    );
}

#[test]
fn a_short_challenge_nonce_is_refused_by_the_agent() {
    let challenge = format!(
        r#"{{"rsa_signature":null,"ecdsa_signature":{{"nonce":"{}"}}}}"#,
        STANDARD.encode([1u8; 31])
    );
    let error = answer_challenge(&p256(), challenge.as_bytes()).unwrap_err();
    assert!(
        matches!(
            error,
            X509PopError::NonceLength {
                which: "challenge",
                len: 31
            }
        ),
        "{error:?}"
    );
}

#[test]
fn a_response_of_the_wrong_type_is_refused() {
    let setup = setup();
    let (server, _) = setup.begin().unwrap();
    let rsa_shaped = format!(
        r#"{{"rsa_signature":{{"nonce":"{}","signature":"AQID"}},"ecdsa_signature":null}}"#,
        STANDARD.encode([0u8; NONCE_LEN])
    );
    let error = assert_denied(server.finish(rsa_shaped.as_bytes()));
    assert!(
        matches!(error, X509PopError::WrongResponseType("ECDSA")),
        "{error:?}"
    );

    // An agent with an EC key cannot answer an RSA challenge.
    let rsa_challenge = format!(
        r#"{{"rsa_signature":{{"nonce":"{}"}},"ecdsa_signature":null}}"#,
        STANDARD.encode([0u8; NONCE_LEN])
    );
    let error = answer_challenge(&setup.key, rsa_challenge.as_bytes()).unwrap_err();
    assert!(
        matches!(error, X509PopError::WrongChallengeType("ECDSA")),
        "{error:?}"
    );
}

#[test]
fn a_minimal_r_with_its_leading_zero_stripped_verifies() {
    let setup = setup();
    let (server, challenge) = setup.begin().unwrap();
    // About one signature in 256 has an r below 2^248; 8192 tries miss with odds ~e^-32.
    let short_r = (0..8192)
        .map(|_| answer_challenge(&setup.key, &challenge).unwrap())
        .find(|response| {
            let parsed: Response = serde_json::from_slice(response).unwrap();
            parsed.ecdsa_signature.unwrap().r.len() < 32
        })
        .expect("a signature with a short r within the bounded attempts");
    let parsed: Response = serde_json::from_slice(&short_r).unwrap();
    let r = parsed.ecdsa_signature.unwrap().r;
    assert_ne!(
        r.first(),
        Some(&0),
        "r is minimal, as Go's big.Int.Bytes() writes it"
    );
    server.finish(&short_r).unwrap();
}

#[test]
fn zero_padded_scalars_verify_as_go_reads_them() {
    let setup = setup();
    let (server, challenge) = setup.begin().unwrap();
    let response = answer_challenge(&setup.key, &challenge).unwrap();
    let mut parsed: Response = serde_json::from_slice(&response).unwrap();
    let ecdsa = parsed.ecdsa_signature.as_mut().unwrap();
    ecdsa.r.insert(0, 0);
    ecdsa.s.splice(0..0, [0, 0]);
    server
        .finish(&serde_json::to_vec(&parsed).unwrap())
        .unwrap();
}

/// EMSA-PSS encoding with SHA-256 and a chosen salt length, then the raw RSA private-key
/// operation: how Go's `rsa.SignPSS` signs, including its default maximum salt length.
fn go_style_pss_signature(m_hash: &[u8], salt_len: usize) -> Vec<u8> {
    use rsa::traits::{PrivateKeyParts as _, PublicKeyParts as _};
    let key = rsa_private_key();
    let mod_bits = key.n().bits();
    let em_bits = mod_bits - 1;
    let em_len = em_bits.div_ceil(8);
    let mut salt = vec![0u8; salt_len];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt).unwrap();
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(&[0u8; 8]);
    context.update(m_hash);
    context.update(&salt);
    let h = context.finish();
    let mut db = vec![0u8; em_len - salt_len - 32 - 2];
    db.push(0x01);
    db.extend_from_slice(&salt);
    let mut mask = Vec::new();
    let mut counter = 0u32;
    while mask.len() < db.len() {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(h.as_ref());
        context.update(&counter.to_be_bytes());
        mask.extend_from_slice(context.finish().as_ref());
        counter += 1;
    }
    for (byte, mask) in db.iter_mut().zip(mask) {
        *byte ^= mask;
    }
    db[0] &= 0xff >> (8 * em_len - em_bits);
    let mut em = db;
    em.extend_from_slice(h.as_ref());
    em.push(0xbc);
    let signature = rsa::BigUint::from_bytes_be(&em)
        .modpow(key.d(), key.n())
        .to_bytes_be();
    let k = mod_bits.div_ceil(8);
    let mut out = vec![0u8; k - signature.len()];
    out.extend_from_slice(&signature);
    out
}

#[test]
fn rsa_round_trip_and_go_salt_lengths() {
    let setup = setup_with(rsa_key(), &LeafSpec::default());
    let (server, challenge) = setup.begin().unwrap();
    let challenge_json: Value = serde_json::from_slice(&challenge).unwrap();
    assert!(challenge_json["ecdsa_signature"].is_null());
    assert_eq!(object_keys(&challenge_json["rsa_signature"]), ["nonce"]);

    let response = answer_challenge(&setup.key, &challenge).unwrap();
    let response_json: Value = serde_json::from_slice(&response).unwrap();
    assert!(response_json["ecdsa_signature"].is_null());
    let rsa_answer = &response_json["rsa_signature"];
    assert_eq!(object_keys(rsa_answer), ["nonce", "signature"]);
    assert_eq!(decode_go_base64(&rsa_answer["nonce"]).len(), NONCE_LEN);
    assert_eq!(decode_go_base64(&rsa_answer["signature"]).len(), 256);
    let result = server.finish(&response).unwrap();
    assert_eq!(
        result.agent_id().as_str(),
        format!(
            "spiffe://example.org/spire/agent/x509pop/{}",
            fingerprint_sha1_hex(&setup.leaf)
        )
    );

    // Go signs with the maximum salt (256 - 32 - 2 = 222 bytes for RSA-2048) and verifies any.
    for salt_len in [222, 0, 20, 32, 64] {
        let (server, challenge) = setup.begin().unwrap();
        let challenge: Challenge = serde_json::from_slice(&challenge).unwrap();
        let challenge_nonce = challenge.rsa_signature.unwrap().nonce;
        let response_nonce = [0x5a; NONCE_LEN];
        let mut combined = challenge_nonce.clone();
        combined.extend_from_slice(&response_nonce);
        let m_hash = ring::digest::digest(&ring::digest::SHA256, &combined);
        let signature = go_style_pss_signature(m_hash.as_ref(), salt_len);
        let response = format!(
            r#"{{"rsa_signature":{{"nonce":"{}","signature":"{}"}},"ecdsa_signature":null}}"#,
            STANDARD.encode(response_nonce),
            STANDARD.encode(&signature)
        );
        server
            .finish(response.as_bytes())
            .unwrap_or_else(|error| panic!("salt length {salt_len}: {error}"));
    }

    // A tampered RSA signature and an answer to another challenge are refused.
    let (server, challenge) = setup.begin().unwrap();
    let response = answer_challenge(&setup.key, &challenge).unwrap();
    let mut parsed: Response = serde_json::from_slice(&response).unwrap();
    parsed.rsa_signature.as_mut().unwrap().signature[100] ^= 0x10;
    let error = assert_denied(server.finish(&serde_json::to_vec(&parsed).unwrap()));
    assert!(
        matches!(error, X509PopError::SignatureInvalid("RSA")),
        "{error:?}"
    );

    let (server, _) = setup.begin().unwrap();
    let error = assert_denied(server.finish(&response));
    assert!(
        matches!(error, X509PopError::SignatureInvalid("RSA")),
        "{error:?}"
    );
}

#[test]
fn a_leaf_without_digital_signature_is_refused() {
    for key_usages in [vec![KeyUsagePurpose::KeyEncipherment], Vec::new()] {
        let setup = setup_with(
            p256(),
            &LeafSpec {
                key_usages,
                ..LeafSpec::default()
            },
        );
        let error = setup.begin().unwrap_err();
        assert!(
            matches!(error, X509PopError::NotForDigitalSignature),
            "{error:?}"
        );
        // SPIRE answers Internal here, not PermissionDenied.
        assert!(!error.is_verification_failure());
    }
}

#[test]
fn any_extended_key_usage_is_accepted() {
    for extended_key_usages in [
        vec![ExtendedKeyUsagePurpose::ServerAuth],
        vec![ExtendedKeyUsagePurpose::CodeSigning],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    ] {
        let setup = setup_with(
            p256(),
            &LeafSpec {
                extended_key_usages,
                ..LeafSpec::default()
            },
        );
        setup.attest().unwrap();
    }
}

#[test]
fn p384_leaves_get_an_ecdsa_challenge_but_p384_agents_cannot_answer() {
    let setup = setup_with(
        KeyPair::generate(KeyType::EcP384).unwrap(),
        &LeafSpec::default(),
    );
    let (server, challenge) = setup.begin().unwrap();
    let challenge_json: Value = serde_json::from_slice(&challenge).unwrap();
    assert!(challenge_json["rsa_signature"].is_null());
    assert!(challenge_json["ecdsa_signature"]["nonce"].is_string());
    let error = answer_challenge(&setup.key, &challenge).unwrap_err();
    assert!(
        matches!(error, X509PopError::UnsupportedAgentKey(KeyType::EcP384)),
        "{error:?}"
    );
    // A P-256 answer to a P-384 leaf's challenge does not verify.
    let response = answer_challenge(&p256(), &challenge).unwrap();
    assert_denied(server.finish(&response));
}

#[test]
fn malformed_payloads_are_refused() {
    let setup = setup();
    let anchors = std::slice::from_ref(&setup.root.der);
    let begin = |payload: &[u8]| ServerAttestation::begin(payload, anchors, &td(), now());

    let error = begin(br#"{"certificates":[]}"#).unwrap_err();
    assert!(matches!(error, X509PopError::NoCertificates), "{error:?}");
    let error = begin(b"{}").unwrap_err();
    assert!(matches!(error, X509PopError::NoCertificates), "{error:?}");

    for bad in [
        &b"not json"[..],
        b"",
        br#"{"certificates":"AQ=="}"#,
        br#"{"certificates":["AQ"]}"#,
        br#"{"certificates":["A-_="]}"#,
        br#"{"certificates":["AQ=="]} trailing"#,
    ] {
        let error = begin(bad).unwrap_err();
        assert!(matches!(error, X509PopError::Json { .. }), "{error:?}");
        assert!(!error.is_verification_failure());
    }

    let error = begin(br#"{"certificates":["AQID"]}"#).unwrap_err();
    assert!(
        matches!(
            error,
            X509PopError::MalformedCertificate("leaf certificate")
        ),
        "{error:?}"
    );
    let garbage_intermediate = build_attestation_payload(&[setup.leaf.clone(), vec![0x30, 0x00]]);
    let error = begin(&garbage_intermediate).unwrap_err();
    assert!(
        matches!(
            error,
            X509PopError::MalformedCertificate("intermediate certificate")
        ),
        "{error:?}"
    );

    let too_many = build_attestation_payload(&vec![setup.leaf.clone(); MAX_INTERMEDIATES + 2]);
    let error = begin(&too_many).unwrap_err();
    assert!(
        matches!(error, X509PopError::TooManyIntermediates(5)),
        "{error:?}"
    );

    let mut huge = br#"{"certificates":[""#.to_vec();
    huge.resize(MAX_MESSAGE_LEN + 1, b'A');
    let error = begin(&huge).unwrap_err();
    assert!(matches!(error, X509PopError::TooLarge { .. }), "{error:?}");

    let error = ServerAttestation::begin(
        &build_attestation_payload(std::slice::from_ref(&setup.leaf)),
        &[],
        &td(),
        now(),
    )
    .unwrap_err();
    assert!(
        matches!(error, X509PopError::InvalidTrustAnchors),
        "{error:?}"
    );
}

#[test]
fn malformed_responses_are_refused() {
    let setup = setup();
    for bad in [
        &b"not json"[..],
        br#"{"ecdsa_signature":{"nonce":"%%%%"}}"#,
        br#"{"ecdsa_signature":{"r":5}}"#,
        br#"{"ecdsa_signature":"AQ=="}"#,
    ] {
        let (server, _) = setup.begin().unwrap();
        let error = server.finish(bad).unwrap_err();
        assert!(matches!(error, X509PopError::Json { .. }), "{error:?}");
    }
    // Go reads a missing variant as nil: the expected one is missing.
    let (server, _) = setup.begin().unwrap();
    let error = assert_denied(server.finish(b"{}"));
    assert!(
        matches!(error, X509PopError::WrongResponseType("ECDSA")),
        "{error:?}"
    );

    let (server, _) = setup.begin().unwrap();
    let huge = vec![b' '; MAX_MESSAGE_LEN + 1];
    let error = server.finish(&huge).unwrap_err();
    assert!(matches!(error, X509PopError::TooLarge { .. }), "{error:?}");
}
