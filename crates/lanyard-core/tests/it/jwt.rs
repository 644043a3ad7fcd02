//! JWT-SVID conformance: minting, the JWT-SVID standard's validation rules (J-1 to J-11), and a
//! cross-check against an independent verifier (jsonwebtoken on RustCrypto).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use lanyard_core::bundle::{JwtAuthority, TrustBundle};
use lanyard_core::id::{SpiffeId, TrustDomain};
use lanyard_core::jwt::{
    JWT_LEEWAY, JwtError, JwtSigningKey, JwtSvid, JwtSvidParams, MAX_TOKEN_LEN, ValidatedJwtSvid,
    mint_jwt_svid, validate_jwt_svid, validate_jwt_svid_with_bundle,
};
use lanyard_core::keys::{KeyPair, KeyType};
use serde_json::{Value, json};

const KID: &str = "key-1";
const AUDIENCE: &str = "spiffe://example.org/api";

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn workload() -> SpiffeId {
    "spiffe://example.org/ns/prod/sa/web".parse().unwrap()
}

fn audiences() -> Vec<String> {
    vec![AUDIENCE.to_owned()]
}

/// One RSA-2048 key per test run: ring cannot generate RSA keys, and generating them is slow.
fn rsa_key() -> KeyPair {
    static PKCS8: OnceLock<Vec<u8>> = OnceLock::new();
    let der = PKCS8.get_or_init(|| {
        use rsa::pkcs8::EncodePrivateKey as _;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        key.to_pkcs8_der().unwrap().as_bytes().to_vec()
    });
    KeyPair::from_pkcs8_der(der).unwrap()
}

struct Fixture {
    key: KeyPair,
    bundle: TrustBundle,
}

impl Fixture {
    fn new(key_type: KeyType) -> Self {
        let key = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => KeyPair::generate(key_type).unwrap(),
            _ => rsa_key(),
        };
        let mut bundle = TrustBundle::new(td());
        bundle
            .add_jwt_authority(JwtAuthority::from_key_pair(KID, &key, None).unwrap())
            .unwrap();
        Self { key, bundle }
    }

    fn mint_at(&self, now: SystemTime, ttl: Duration) -> JwtSvid {
        let signer = JwtSigningKey {
            key: &self.key,
            key_id: KID,
            expires_at: None,
        };
        let audiences = audiences();
        let params = JwtSvidParams {
            spiffe_id: &workload(),
            audiences: &audiences,
            ttl,
            issuer: None,
        };
        mint_jwt_svid(&signer, &params, now).unwrap()
    }

    fn mint(&self) -> String {
        self.mint_at(now(), Duration::from_secs(300)).token
    }

    fn validate(&self, token: &str) -> Result<ValidatedJwtSvid, JwtError> {
        validate_jwt_svid_with_bundle(token, AUDIENCE, &self.bundle, now())
    }

    /// Signs arbitrary header and claims with the fixture's key, for hand-crafted tokens.
    fn sign(&self, header: &Value, claims: &Value) -> String {
        sign_with(&self.key, header, claims)
    }

    fn header(&self) -> Value {
        json!({"alg": self.key.key_type().jws_alg(), "kid": KID, "typ": "JWT"})
    }
}

fn good_claims() -> Value {
    json!({
        "sub": workload().as_str(),
        "aud": [AUDIENCE],
        "exp": unix(now()) + 300,
        "iat": unix(now()),
    })
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn sign_with(key: &KeyPair, header: &Value, claims: &Value) -> String {
    let input = signing_input(header, claims);
    let signature = key.sign_jws(input.as_bytes()).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn decode_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

#[test]
fn minted_es256_and_es384_tokens_validate() {
    for key_type in [KeyType::EcP256, KeyType::EcP384] {
        let fixture = Fixture::new(key_type);
        let svid = fixture.mint_at(now(), Duration::from_secs(300));
        assert_eq!(svid.spiffe_id, workload());
        assert_eq!(svid.audiences, audiences());
        assert_eq!(svid.issued_at, now());
        assert_eq!(svid.expires_at, now() + Duration::from_secs(300));
        assert_eq!(svid.key_id, KID);

        let validated = fixture.validate(&svid.token).unwrap();
        assert_eq!(validated.spiffe_id, workload());
        assert_eq!(validated.audiences, audiences());
        assert_eq!(validated.expires_at, svid.expires_at);
        assert_eq!(validated.key_id, KID);
        assert_eq!(validated.claims["sub"], workload().as_str());
        assert_eq!(validated.claims["jti"], svid.jti.as_str());
        assert_eq!(validated.claims["iat"], unix(now()));
    }
}

#[test]
fn minted_header_is_exactly_alg_kid_typ() {
    for (key_type, alg) in [(KeyType::EcP256, "ES256"), (KeyType::EcP384, "ES384")] {
        let token = Fixture::new(key_type).mint();
        let header = decode_part(&token, 0);
        let keys: Vec<&str> = header
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["alg", "kid", "typ"]);
        assert_eq!(header, json!({"alg": alg, "kid": KID, "typ": "JWT"}));
    }
}

#[test]
fn minted_claims_follow_the_standard() {
    let fixture = Fixture::new(KeyType::EcP256);
    let a = fixture.mint_at(now(), Duration::from_secs(300));
    let b = fixture.mint_at(now(), Duration::from_secs(300));
    let claims = decode_part(&a.token, 1);
    let mut names: Vec<&str> = claims
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["aud", "exp", "iat", "jti", "sub"]);
    // `aud` is always an array, even with one audience.
    assert_eq!(claims["aud"], json!([AUDIENCE]));
    assert_eq!(claims["exp"], unix(now()) + 300);
    assert_eq!(a.jti.len(), 32);
    assert!(a.jti.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(a.jti, b.jti);
}

#[test]
fn issuer_is_included_when_given() {
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let audiences = audiences();
    let svid = mint_jwt_svid(
        &JwtSigningKey {
            key: &key,
            key_id: KID,
            expires_at: None,
        },
        &JwtSvidParams {
            spiffe_id: &workload(),
            audiences: &audiences,
            ttl: Duration::from_secs(60),
            issuer: Some("https://oidc.example.org"),
        },
        now(),
    )
    .unwrap();
    assert_eq!(
        decode_part(&svid.token, 1)["iss"],
        "https://oidc.example.org"
    );
}

#[test]
fn expiry_is_capped_at_the_signing_key_expiry() {
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let audiences = audiences();
    let params = JwtSvidParams {
        spiffe_id: &workload(),
        audiences: &audiences,
        ttl: Duration::from_secs(3600),
        issuer: None,
    };
    let key_expires_at = now() + Duration::from_secs(90);
    let signer = JwtSigningKey {
        key: &key,
        key_id: KID,
        expires_at: Some(key_expires_at),
    };
    let svid = mint_jwt_svid(&signer, &params, now()).unwrap();
    assert_eq!(svid.expires_at, key_expires_at);
    assert_eq!(decode_part(&svid.token, 1)["exp"], unix(key_expires_at));

    let err = mint_jwt_svid(&signer, &params, key_expires_at).unwrap_err();
    assert!(matches!(err, JwtError::SigningKeyExpired), "{err:?}");
}

#[test]
fn minting_rejects_bad_requests() {
    fn mint(audiences: &[String], ttl: Duration, key_id: &str) -> Result<JwtSvid, JwtError> {
        let key = KeyPair::generate(KeyType::EcP256).unwrap();
        let signer = JwtSigningKey {
            key: &key,
            key_id,
            expires_at: None,
        };
        let params = JwtSvidParams {
            spiffe_id: &workload(),
            audiences,
            ttl,
            issuer: None,
        };
        mint_jwt_svid(&signer, &params, now())
    }
    let minute = Duration::from_secs(60);

    let err = mint(&[], minute, KID).unwrap_err();
    assert!(matches!(err, JwtError::NoAudience), "{err:?}");
    assert_eq!(err.to_string(), "audience must be specified");
    let err = mint(&[String::new()], minute, KID).unwrap_err();
    assert!(matches!(err, JwtError::NoAudience), "{err:?}");
    let err = mint(&audiences(), Duration::ZERO, KID).unwrap_err();
    assert!(matches!(err, JwtError::ZeroTtl), "{err:?}");
    let err = mint(&audiences(), minute, "").unwrap_err();
    assert!(matches!(err, JwtError::EmptyKeyId), "{err:?}");
    mint(&audiences(), minute, KID).unwrap();
}

#[test]
fn debug_output_hides_the_token() {
    let svid = Fixture::new(KeyType::EcP256).mint_at(now(), Duration::from_secs(60));
    let debug = format!("{svid:?}");
    let signature = svid.token.rsplit('.').next().unwrap();
    assert!(!debug.contains(signature));
    assert!(debug.contains("redacted"));
}

#[test]
fn rs256_tokens_from_an_imported_rsa_key_validate() {
    let fixture = Fixture::new(KeyType::Rsa2048);
    let token = fixture.mint();
    assert_eq!(decode_part(&token, 0)["alg"], "RS256");
    let validated = fixture.validate(&token).unwrap();
    assert_eq!(validated.spiffe_id, workload());
}

#[test]
fn pss_and_larger_pkcs1_digests_validate() {
    use ring::signature::{
        RSA_PKCS1_SHA384, RSA_PKCS1_SHA512, RSA_PSS_SHA256, RSA_PSS_SHA384, RSA_PSS_SHA512,
        RsaEncoding, RsaKeyPair,
    };
    let fixture = Fixture::new(KeyType::Rsa2048);
    let ring_key = RsaKeyPair::from_pkcs8(fixture.key.secret_pkcs8_der()).unwrap();
    let rng = ring::rand::SystemRandom::new();
    let cases: [(&str, &'static dyn RsaEncoding); 5] = [
        ("RS384", &RSA_PKCS1_SHA384),
        ("RS512", &RSA_PKCS1_SHA512),
        ("PS256", &RSA_PSS_SHA256),
        ("PS384", &RSA_PSS_SHA384),
        ("PS512", &RSA_PSS_SHA512),
    ];
    for (alg, encoding) in cases {
        let header = json!({"alg": alg, "kid": KID, "typ": "JWT"});
        let input = signing_input(&header, &good_claims());
        let mut signature = vec![0; ring_key.public().modulus_len()];
        ring_key
            .sign(encoding, &rng, input.as_bytes(), &mut signature)
            .unwrap();
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&signature));
        fixture
            .validate(&token)
            .unwrap_or_else(|e| panic!("{alg}: {e}"));

        // The same signature under another RSA algorithm name does not verify.
        let other = if alg.starts_with("PS") {
            "RS256"
        } else {
            "PS256"
        };
        let header = json!({"alg": other, "kid": KID, "typ": "JWT"});
        let forged = format!(
            "{}.{}",
            signing_input(&header, &good_claims()),
            URL_SAFE_NO_PAD.encode(&signature)
        );
        let err = fixture.validate(&forged).unwrap_err();
        assert!(matches!(err, JwtError::BadSignature), "{alg}: {err:?}");
    }
}

#[test]
fn independent_verifier_accepts_our_tokens() {
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};

    // jsonwebtoken reads the real clock, so mint against it.
    let real_now = SystemTime::now();
    for key_type in [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048] {
        let fixture = Fixture::new(key_type);
        let svid = fixture.mint_at(real_now, Duration::from_secs(300));
        let jwks: JwkSet = serde_json::from_str(&fixture.bundle.to_jwks_json()).unwrap();
        let header = decode_header(&svid.token).unwrap();
        let jwk = jwks.find(header.kid.as_deref().unwrap()).unwrap();
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        let data = decode::<Value>(&svid.token, &key, &validation)
            .unwrap_or_else(|e| panic!("{key_type}: {e}"));
        assert_eq!(data.claims["sub"], workload().as_str());
    }
}

#[test]
fn we_accept_tokens_from_an_independent_signer() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

    for (key_type, alg) in [
        (KeyType::EcP256, Algorithm::ES256),
        (KeyType::EcP384, Algorithm::ES384),
        (KeyType::Rsa2048, Algorithm::RS256),
        (KeyType::Rsa2048, Algorithm::PS256),
    ] {
        let fixture = Fixture::new(key_type);
        let mut header = Header::new(alg);
        header.kid = Some(KID.to_owned());
        let encoding_key = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                EncodingKey::from_ec_der(fixture.key.secret_pkcs8_der())
            }
            _ => {
                use rsa::pkcs1::EncodeRsaPrivateKey as _;
                use rsa::pkcs8::DecodePrivateKey as _;
                let key =
                    rsa::RsaPrivateKey::from_pkcs8_der(fixture.key.secret_pkcs8_der()).unwrap();
                EncodingKey::from_rsa_der(key.to_pkcs1_der().unwrap().as_bytes())
            }
        };
        let token = encode(&header, &good_claims(), &encoding_key).unwrap();
        let validated = fixture
            .validate(&token)
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(validated.spiffe_id, workload());
    }
}

#[test]
fn single_string_audience_and_jose_type_are_accepted() {
    let fixture = Fixture::new(KeyType::EcP256);
    let mut claims = good_claims();
    claims["aud"] = json!(AUDIENCE);
    let header = json!({"alg": "ES256", "kid": KID, "typ": "JOSE"});
    let validated = fixture.validate(&fixture.sign(&header, &claims)).unwrap();
    assert_eq!(validated.audiences, audiences());
    // `typ` is optional (J-4).
    let header = json!({"alg": "ES256", "kid": KID});
    fixture.validate(&fixture.sign(&header, &claims)).unwrap();
}

#[test]
fn forbidden_algorithms_are_rejected_before_anything_else() {
    let fixture = Fixture::new(KeyType::EcP256);
    let input_for = |alg: &str| {
        // Header parameters that would fail later checks prove `alg` is looked at first.
        let header = json!({"alg": alg, "kid": "unknown", "jku": "https://evil"});
        signing_input(&header, &json!({}))
    };

    // alg none: an empty signature.
    let token = format!("{}.", input_for("none"));
    let err = fixture.validate(&token).unwrap_err();
    assert!(
        matches!(&err, JwtError::UnsupportedAlgorithm(a) if a == "none"),
        "{err:?}"
    );

    // HS256 keyed with the public key: the classic algorithm-confusion forgery.
    let input = input_for("HS256");
    let mac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, fixture.key.public_key_raw());
    let tag = ring::hmac::sign(&mac_key, input.as_bytes());
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
    let err = fixture.validate(&token).unwrap_err();
    assert!(
        matches!(&err, JwtError::UnsupportedAlgorithm(a) if a == "HS256"),
        "{err:?}"
    );

    for alg in ["EdDSA", "ES512", "RS1", "es256", "HS512"] {
        let token = format!("{}.AAAA", input_for(alg));
        let err = fixture.validate(&token).unwrap_err();
        assert!(
            matches!(&err, JwtError::UnsupportedAlgorithm(a) if a == alg),
            "{alg}: {err:?}"
        );
    }

    let header = json!({"kid": KID, "typ": "JWT"});
    let err = fixture
        .validate(&fixture.sign(&header, &good_claims()))
        .unwrap_err();
    assert!(matches!(err, JwtError::MissingAlgorithm), "{err:?}");
}

#[test]
fn header_rules() {
    let fixture = Fixture::new(KeyType::EcP256);
    let claims = good_claims();

    let header = json!({"alg": "ES256", "typ": "JWT"});
    let err = fixture
        .validate(&fixture.sign(&header, &claims))
        .unwrap_err();
    assert!(matches!(err, JwtError::MissingKeyId), "{err:?}");
    assert_eq!(err.to_string(), "token header missing key id");

    let header = json!({"alg": "ES256", "kid": "", "typ": "JWT"});
    let err = fixture
        .validate(&fixture.sign(&header, &claims))
        .unwrap_err();
    assert!(matches!(err, JwtError::MissingKeyId), "{err:?}");

    for extra in ["jku", "x5c", "crit", "cty", "private"] {
        let mut header = fixture.header();
        header[extra] = json!("x");
        let err = fixture
            .validate(&fixture.sign(&header, &claims))
            .unwrap_err();
        assert!(
            matches!(&err, JwtError::UnexpectedHeaderParameter(p) if p == extra),
            "{extra}: {err:?}"
        );
    }

    let header = json!({"alg": "ES256", "kid": KID, "typ": "at+jwt"});
    let err = fixture
        .validate(&fixture.sign(&header, &claims))
        .unwrap_err();
    assert!(matches!(err, JwtError::UnsupportedType(_)), "{err:?}");

    // A header naming `alg` twice is ambiguous and refused, whichever copy would win.
    let header_json = format!(r#"{{"alg":"none","alg":"ES256","kid":"{KID}","typ":"JWT"}}"#);
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header_json),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = fixture.key.sign_jws(input.as_bytes()).unwrap();
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature));
    let err = fixture.validate(&token).unwrap_err();
    assert!(matches!(err, JwtError::InvalidHeader), "{err:?}");
}

#[test]
fn unknown_key_id_is_rejected() {
    let fixture = Fixture::new(KeyType::EcP256);
    let header = json!({"alg": "ES256", "kid": "other-key", "typ": "JWT"});
    let err = fixture
        .validate(&fixture.sign(&header, &good_claims()))
        .unwrap_err();
    assert!(
        matches!(&err, JwtError::UnknownKeyId(k) if k == "other-key"),
        "{err:?}"
    );
}

#[test]
fn algorithm_must_match_the_authority_key() {
    let fixture = Fixture::new(KeyType::EcP256);
    for alg in ["ES384", "RS256", "PS256"] {
        let header = json!({"alg": alg, "kid": KID, "typ": "JWT"});
        let token = format!("{}.AAAA", signing_input(&header, &good_claims()));
        let err = fixture.validate(&token).unwrap_err();
        assert!(
            matches!(err, JwtError::AlgorithmKeyMismatch { key: "P-256", .. }),
            "{alg}: {err:?}"
        );
    }
}

#[test]
fn claim_rules() {
    let fixture = Fixture::new(KeyType::EcP256);
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut claims = good_claims();
        edit(&mut claims);
        fixture.validate(&fixture.sign(&fixture.header(), &claims))
    };
    let remove =
        |name: &'static str| move |c: &mut Value| _ = c.as_object_mut().unwrap().remove(name);

    let err = with(&remove("aud")).unwrap_err();
    assert!(matches!(err, JwtError::MissingClaim("aud")), "{err:?}");
    let err = with(&|c| c["aud"] = json!([])).unwrap_err();
    assert!(matches!(err, JwtError::EmptyAudience), "{err:?}");
    let err = with(&|c| c["aud"] = json!("")).unwrap_err();
    assert!(matches!(err, JwtError::EmptyAudience), "{err:?}");
    let err = with(&|c| c["aud"] = json!(["spiffe://example.org/other"])).unwrap_err();
    assert!(
        matches!(&err, JwtError::AudienceMismatch { expected, actual }
            if expected == AUDIENCE && actual == &["spiffe://example.org/other"]),
        "{err:?}"
    );
    let err = with(&|c| c["aud"] = json!(42)).unwrap_err();
    assert!(
        matches!(err, JwtError::InvalidClaim { claim: "aud", .. }),
        "{err:?}"
    );

    let err = with(&remove("exp")).unwrap_err();
    assert!(matches!(err, JwtError::MissingClaim("exp")), "{err:?}");
    let err = with(&|c| c["exp"] = json!("tomorrow")).unwrap_err();
    assert!(
        matches!(err, JwtError::InvalidClaim { claim: "exp", .. }),
        "{err:?}"
    );

    let err = with(&remove("sub")).unwrap_err();
    assert!(matches!(err, JwtError::MissingClaim("sub")), "{err:?}");
    let err = with(&|c| c["sub"] = json!("https://example.org/web")).unwrap_err();
    assert!(matches!(err, JwtError::InvalidSubject(_)), "{err:?}");
    let err = with(&|c| c["sub"] = json!("spiffe://EXAMPLE.org/web")).unwrap_err();
    assert!(matches!(err, JwtError::InvalidSubject(_)), "{err:?}");

    let future = unix(now()) + JWT_LEEWAY.as_secs() + 1;
    let err = with(&|c| c["nbf"] = json!(future)).unwrap_err();
    assert!(matches!(err, JwtError::NotYetValid), "{err:?}");
    let err = with(&|c| c["iat"] = json!(future)).unwrap_err();
    assert!(matches!(err, JwtError::IssuedInFuture), "{err:?}");
    // Within the leeway, and other claims are allowed (J-9).
    with(&|c| {
        c["nbf"] = json!(future - 1);
        c["iat"] = json!(future - 1);
        c["custom"] = json!({"any": "thing"});
    })
    .unwrap();
    // Fractional NumericDates are fine.
    with(&|c| c["exp"] = json!(unix(now()) as f64 + 10.5)).unwrap();
}

#[test]
fn expiry_allows_exactly_the_leeway() {
    let fixture = Fixture::new(KeyType::EcP256);
    let svid = fixture.mint_at(now(), Duration::from_secs(60));
    let validate_at =
        |at: SystemTime| validate_jwt_svid_with_bundle(&svid.token, AUDIENCE, &fixture.bundle, at);

    validate_at(svid.expires_at).unwrap();
    validate_at(svid.expires_at + JWT_LEEWAY).unwrap();
    let err = validate_at(svid.expires_at + JWT_LEEWAY + Duration::from_secs(1)).unwrap_err();
    assert!(matches!(err, JwtError::Expired), "{err:?}");
    assert_eq!(err.to_string(), "token has expired");
}

#[test]
fn tampering_breaks_the_signature() {
    let fixture = Fixture::new(KeyType::EcP256);
    let token = fixture.mint();
    let parts: Vec<&str> = token.split('.').collect();

    // A payload naming another workload under the original signature.
    let mut claims = decode_part(&token, 1);
    claims["sub"] = json!("spiffe://example.org/admin");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    );
    let err = fixture.validate(&tampered).unwrap_err();
    assert!(matches!(err, JwtError::BadSignature), "{err:?}");

    // One flipped bit in the signature.
    let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    signature[10] ^= 0x01;
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        URL_SAFE_NO_PAD.encode(&signature)
    );
    let err = fixture.validate(&tampered).unwrap_err();
    assert!(matches!(err, JwtError::BadSignature), "{err:?}");

    // A signature of the wrong length.
    let tampered = format!("{}.{}.{}", parts[0], parts[1], "AAAA");
    let err = fixture.validate(&tampered).unwrap_err();
    assert!(matches!(err, JwtError::BadSignature), "{err:?}");
}

#[test]
fn another_key_with_the_same_kid_does_not_verify() {
    let fixture = Fixture::new(KeyType::EcP256);
    let impostor = KeyPair::generate(KeyType::EcP256).unwrap();
    let token = sign_with(&impostor, &fixture.header(), &good_claims());
    let err = fixture.validate(&token).unwrap_err();
    assert!(matches!(err, JwtError::BadSignature), "{err:?}");
}

#[test]
fn the_subjects_trust_domain_bundle_is_used() {
    let fixture = Fixture::new(KeyType::EcP256);
    // The key is in example.org's bundle, but the subject claims another trust domain (J-11).
    let mut claims = good_claims();
    claims["sub"] = json!("spiffe://other.org/web");
    let token = fixture.sign(&fixture.header(), &claims);
    let err = fixture.validate(&token).unwrap_err();
    assert!(
        matches!(&err, JwtError::NoBundle(td) if td == "other.org"),
        "{err:?}"
    );

    // With a lookup over several bundles, other.org's own (different) key is the one used.
    let other = TrustDomain::new("other.org").unwrap();
    let other_key = KeyPair::generate(KeyType::EcP256).unwrap();
    let mut other_bundle = TrustBundle::new(other.clone());
    other_bundle
        .add_jwt_authority(JwtAuthority::from_key_pair(KID, &other_key, None).unwrap())
        .unwrap();
    let bundles: HashMap<TrustDomain, TrustBundle> = [
        (td(), fixture.bundle.clone()),
        (other.clone(), other_bundle),
    ]
    .into_iter()
    .collect();
    let lookup = |td: &TrustDomain| bundles.get(td);
    let err = validate_jwt_svid(&token, AUDIENCE, lookup, now()).unwrap_err();
    assert!(matches!(err, JwtError::BadSignature), "{err:?}");
    let genuine = sign_with(&other_key, &fixture.header(), &claims);
    let validated = validate_jwt_svid(&genuine, AUDIENCE, lookup, now()).unwrap();
    assert_eq!(validated.spiffe_id.trust_domain(), other);
}

#[test]
fn only_unpadded_three_part_compact_tokens_are_accepted() {
    let fixture = Fixture::new(KeyType::EcP256);
    let token = fixture.mint();

    for malformed in [
        format!("{token}.AAAA"),
        token.rsplit_once('.').unwrap().0.to_owned(),
        String::new(),
        "a.b.c.d.e".to_owned(),
    ] {
        let err = fixture.validate(&malformed).unwrap_err();
        assert!(matches!(err, JwtError::Malformed), "{malformed}: {err:?}");
    }

    // An ES256 signature is 64 bytes: 86 base64url characters, which padding makes 88.
    let padded = format!("{token}==");
    let err = fixture.validate(&padded).unwrap_err();
    assert!(matches!(err, JwtError::Base64("signature")), "{err:?}");

    // Standard-alphabet base64 is not base64url.
    let (header, rest) = token.split_once('.').unwrap();
    let header = URL_SAFE_NO_PAD.decode(header).unwrap();
    let std_header = base64::engine::general_purpose::STANDARD.encode(&header);
    let err = fixture
        .validate(&format!("{std_header}.{rest}"))
        .unwrap_err();
    assert!(matches!(err, JwtError::Base64("header")), "{err:?}");

    // JWS JSON serialization is never accepted (J-1).
    let json_serialization = json!({"payload": "e30", "signatures": []}).to_string();
    assert!(fixture.validate(&json_serialization).is_err());
}

#[test]
fn oversized_tokens_are_rejected_before_decoding() {
    let fixture = Fixture::new(KeyType::EcP256);
    let huge = "a".repeat(MAX_TOKEN_LEN + 1);
    let err = fixture.validate(&huge).unwrap_err();
    assert!(
        matches!(err, JwtError::TooLong { len } if len == MAX_TOKEN_LEN + 1),
        "{err:?}"
    );
}

#[test]
fn an_empty_validator_audience_is_refused() {
    let fixture = Fixture::new(KeyType::EcP256);
    let err =
        validate_jwt_svid_with_bundle(&fixture.mint(), "", &fixture.bundle, now()).unwrap_err();
    assert!(matches!(err, JwtError::NoAudience), "{err:?}");
}

#[test]
fn tokens_verify_after_a_jwks_round_trip() {
    // What an agent does: receive the bundle as JWKS, rebuild it, validate with it.
    for key_type in [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048] {
        let fixture = Fixture::new(key_type);
        let json = fixture.bundle.to_jwks_json();
        let bundle = TrustBundle::from_jwks_json(td(), json.as_bytes()).unwrap();
        validate_jwt_svid_with_bundle(&fixture.mint(), AUDIENCE, &bundle, now()).unwrap();
    }
}
