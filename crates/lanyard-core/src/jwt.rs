//! JWT-SVIDs: minting with a ring key and validating against trust bundles, following the
//! JWT-SVID standard (checks J-1 to J-11) and go-spiffe's validator.
//!
//! JWS compact signing and verification are hand-written on ring (see `rust-deps.md` §7): no
//! JWT library in the field has a ring backend. Validation is deliberately narrow: compact
//! serialization only, an algorithm allow-list checked before anything else, a header of
//! exactly `alg`, `kid` and `typ`, and JSON that may not repeat member names.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::bundle::{EcCurve, PublicKeyMaterial, TrustBundle, parse_json_strict};
use crate::id::{IdError, SpiffeId, TrustDomain};
use crate::keys::{KeyError, KeyPair};

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
///
/// go-jose (and so go-spiffe) defaults to one minute; Lanyard is stricter because JWT-SVIDs
/// live only minutes (5 by default) and a minute would stretch that by a fifth.
pub const JWT_LEEWAY: Duration = Duration::from_secs(30);

/// The longest token accepted for validation, checked before any decoding.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// The `alg` values the JWT-SVID standard allows (J-2). ES512 is allowed by the standard but
/// ring cannot verify P-521 signatures, so the validator rejects it as unsupported.
pub const ALLOWED_ALGORITHMS: [&str; 9] = [
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
];

/// Why a JWT-SVID could not be minted or did not validate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// No audience was given (minting), an audience is an empty string, or the validator's own
    /// audience is empty. The message is SPIRE's.
    #[error("audience must be specified")]
    NoAudience,
    /// The key ID to put in the header is empty.
    #[error("key id must not be empty")]
    EmptyKeyId,
    /// The requested lifetime is zero.
    #[error("ttl must be positive")]
    ZeroTtl,
    /// The signing key expires at or before the minting time.
    #[error("signing key has expired")]
    SigningKeyExpired,
    /// The system random number generator failed.
    #[error("random number generation failed")]
    Random,
    /// Signing failed in the crypto library.
    #[error("signing failed: {0}")]
    Signing(KeyError),
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("token is {len} bytes long; the limit is {MAX_TOKEN_LEN}")]
    TooLong {
        /// Length of the rejected token.
        len: usize,
    },
    /// The token is not three dot-separated parts (J-1).
    #[error("token is not in JWS compact serialization")]
    Malformed,
    /// A part of the token is not unpadded base64url.
    #[error("token {0} is not unpadded base64url")]
    Base64(&'static str),
    /// The header is not a JSON object without repeated members.
    #[error("token header is not a valid JSON object")]
    InvalidHeader,
    /// The header has no `alg`.
    #[error("token header missing algorithm")]
    MissingAlgorithm,
    /// `alg` is not one the validator accepts: `none`, HS*, EdDSA, ES512 or unknown (J-2).
    #[error("unsupported token signature algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The header has a parameter other than `alg`, `kid` and `typ` (J-3).
    #[error("token header has unexpected parameter {0:?}")]
    UnexpectedHeaderParameter(String),
    /// `typ` is present and neither `JWT` nor `JOSE` (J-4).
    #[error("token header has unsupported type {0:?}")]
    UnsupportedType(String),
    /// The header has no `kid` (J-5, go-spiffe's message).
    #[error("token header missing key id")]
    MissingKeyId,
    /// The claims are not a JSON object without repeated members.
    #[error("token claims are not a valid JSON object")]
    InvalidClaims,
    /// A required claim (`sub`, `aud` or `exp`) is absent.
    #[error("token missing {0} claim")]
    MissingClaim(&'static str),
    /// A claim has the wrong JSON type or an out-of-range value.
    #[error("token has invalid {claim} claim: {reason}")]
    InvalidClaim {
        /// The claim's name.
        claim: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `sub` is not a valid SPIFFE ID (J-6).
    #[error("token subject is not a valid SPIFFE ID: {0}")]
    InvalidSubject(IdError),
    /// No bundle is known for the subject's trust domain (J-11).
    #[error("no bundle found for trust domain {0:?}")]
    NoBundle(String),
    /// The subject's bundle has no JWT authority with the token's `kid`.
    #[error("no JWT authority found for key id {0:?}")]
    UnknownKeyId(String),
    /// The token's `alg` cannot be produced by the authority's key type.
    #[error("token algorithm {alg} does not match the {key} key of its authority")]
    AlgorithmKeyMismatch {
        /// The token's `alg`.
        alg: &'static str,
        /// The authority's key type.
        key: &'static str,
    },
    /// The signature does not verify with the authority's key.
    #[error("token has an invalid signature")]
    BadSignature,
    /// `aud` is an empty array or an empty string (J-7).
    #[error("token has empty audience")]
    EmptyAudience,
    /// `aud` does not contain the validator's audience (J-7).
    #[error("expected audience {expected:?}, token has {actual:?}")]
    AudienceMismatch {
        /// The validator's audience.
        expected: String,
        /// The token's audiences.
        actual: Vec<String>,
    },
    /// `exp` is more than [`JWT_LEEWAY`] in the past (J-8).
    #[error("token has expired")]
    Expired,
    /// `nbf` is more than [`JWT_LEEWAY`] in the future.
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iat` is more than [`JWT_LEEWAY`] in the future.
    #[error("token was issued in the future")]
    IssuedInFuture,
}

/// The claims of a JWT-SVID as Lanyard mints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JwtSvidClaims {
    /// The workload's SPIFFE ID.
    pub sub: SpiffeId,
    /// The audiences, always serialized as a JSON array.
    pub aud: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issue time, Unix seconds.
    pub iat: u64,
    /// A unique token ID (128 random bits, hex), recorded by the usage ledger.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The issuer, e.g. an OIDC discovery URL, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// The key that signs JWT-SVIDs, with the ID bundles know it by.
#[derive(Debug, Clone, Copy)]
pub struct JwtSigningKey<'a> {
    /// The private key. Its type decides `alg` (ES256, ES384 or RS256).
    pub key: &'a KeyPair,
    /// The key ID put in every token's header and in the bundle's JWK.
    pub key_id: &'a str,
    /// When the key leaves the bundle; tokens never outlive it.
    pub expires_at: Option<SystemTime>,
}

/// What to mint: one JWT-SVID for one SPIFFE ID.
#[derive(Debug, Clone, Copy)]
pub struct JwtSvidParams<'a> {
    /// The subject.
    pub spiffe_id: &'a SpiffeId,
    /// At least one audience, none empty.
    pub audiences: &'a [String],
    /// Requested lifetime; capped at the signing key's expiry.
    pub ttl: Duration,
    /// Optional `iss` claim.
    pub issuer: Option<&'a str>,
}

/// A minted JWT-SVID. `Debug` hides the token, which is a bearer credential.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JwtSvid {
    /// The compact-serialized token.
    pub token: String,
    /// The subject.
    pub spiffe_id: SpiffeId,
    /// The audiences.
    pub audiences: Vec<String>,
    /// The `exp` claim as a time.
    pub expires_at: SystemTime,
    /// The `iat` claim as a time.
    pub issued_at: SystemTime,
    /// The `jti` claim.
    pub jti: String,
    /// The `kid` of the signing key.
    pub key_id: String,
}

impl JwtSvid {
    /// Assembles a JWT-SVID that was minted elsewhere, e.g. received from a server's
    /// `NewJWTSVID`. The caller is responsible for having validated `token` and for the other
    /// fields describing it.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        token: String,
        spiffe_id: SpiffeId,
        audiences: Vec<String>,
        expires_at: SystemTime,
        issued_at: SystemTime,
        jti: String,
        key_id: String,
    ) -> Self {
        Self {
            token,
            spiffe_id,
            audiences,
            expires_at,
            issued_at,
            jti,
            key_id,
        }
    }
}

impl fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSvid")
            .field("token", &"<redacted>")
            .field("spiffe_id", &self.spiffe_id)
            .field("audiences", &self.audiences)
            .field("expires_at", &self.expires_at)
            .field("issued_at", &self.issued_at)
            .field("jti", &self.jti)
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// A JWT-SVID that passed validation.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ValidatedJwtSvid {
    /// The subject.
    pub spiffe_id: SpiffeId,
    /// The audiences (`aud` as a list, even when the token has a single string).
    pub audiences: Vec<String>,
    /// The `exp` claim as a time.
    pub expires_at: SystemTime,
    /// The `kid` of the authority that verified the signature.
    pub key_id: String,
    /// Every claim of the token, for the Workload API's `ValidateJWTSVID` response.
    pub claims: Map<String, Value>,
}

/// The JOSE header Lanyard writes: exactly `alg`, `kid`, `typ` (J-3, J-4, J-5).
#[derive(Serialize)]
struct Header<'a> {
    alg: &'a str,
    kid: &'a str,
    typ: &'a str,
}

/// Mints a JWT-SVID signed with `signer`.
///
/// The header is `{"alg":…,"kid":…,"typ":"JWT"}`; the claims are `sub`, `aud` (an array),
/// `exp`, `iat`, a random `jti` and `iss` when given. Times are whole Unix seconds (rounded
/// down); `exp` is `now + ttl`, capped at the signing key's expiry.
pub fn mint_jwt_svid(
    signer: &JwtSigningKey<'_>,
    params: &JwtSvidParams<'_>,
    now: SystemTime,
) -> Result<JwtSvid, JwtError> {
    if params.audiences.is_empty() || params.audiences.iter().any(String::is_empty) {
        return Err(JwtError::NoAudience);
    }
    if signer.key_id.is_empty() {
        return Err(JwtError::EmptyKeyId);
    }
    if params.ttl.is_zero() {
        return Err(JwtError::ZeroTtl);
    }
    let mut expires_at = now.checked_add(params.ttl).unwrap_or(now);
    if let Some(key_expires_at) = signer.expires_at {
        if key_expires_at <= now {
            return Err(JwtError::SigningKeyExpired);
        }
        expires_at = expires_at.min(key_expires_at);
    }
    let iat = unix_seconds(now);
    let exp = unix_seconds(expires_at);

    let mut jti = [0u8; 16];
    SystemRandom::new()
        .fill(&mut jti)
        .map_err(|_| JwtError::Random)?;
    let jti: String = jti.iter().map(|b| format!("{b:02x}")).collect();

    let claims = JwtSvidClaims {
        sub: params.spiffe_id.clone(),
        aud: params.audiences.to_vec(),
        exp,
        iat,
        jti: Some(jti.clone()),
        iss: params.issuer.map(str::to_owned),
    };
    let header = Header {
        alg: signer.key.key_type().jws_alg(),
        kid: signer.key_id,
        typ: "JWT",
    };
    let token = sign_compact(signer.key, &header, &claims)?;
    Ok(JwtSvid {
        token,
        spiffe_id: claims.sub,
        audiences: claims.aud,
        expires_at: UNIX_EPOCH + Duration::from_secs(exp),
        issued_at: UNIX_EPOCH + Duration::from_secs(iat),
        jti,
        key_id: signer.key_id.to_owned(),
    })
}

fn sign_compact(
    key: &KeyPair,
    header: &Header<'_>,
    claims: &JwtSvidClaims,
) -> Result<String, JwtError> {
    // Serializing these plain structs cannot fail; the fallback keeps this panic-free anyway.
    let header = serde_json::to_vec(header).map_err(|_| JwtError::InvalidHeader)?;
    let claims = serde_json::to_vec(claims).map_err(|_| JwtError::InvalidClaims)?;
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(claims, &mut token);
    let signature = key.sign_jws(token.as_bytes()).map_err(JwtError::Signing)?;
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    Ok(token)
}

/// Validates a JWT-SVID against the bundle of its subject's trust domain.
///
/// Checks, in order: length, compact serialization (J-1), `alg` against the allow-list (J-2),
/// no header parameters but `alg`/`kid`/`typ` (J-3), `typ` (J-4), `kid` present (J-5), `sub`
/// a SPIFFE ID (J-6), the bundle of the subject's trust domain from `bundle_for` (J-11), the
/// authority named by `kid`, the signature, then `aud` containing `audience` (J-7), `exp`
/// (J-8), `nbf` and `iat`, each with [`JWT_LEEWAY`].
pub fn validate_jwt_svid<'b, F>(
    token: &str,
    audience: &str,
    bundle_for: F,
    now: SystemTime,
) -> Result<ValidatedJwtSvid, JwtError>
where
    F: Fn(&TrustDomain) -> Option<&'b TrustBundle>,
{
    if audience.is_empty() {
        return Err(JwtError::NoAudience);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLong { len: token.len() });
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    // Empty parts fall through: an empty header or payload is not a JSON object, and an empty
    // signature never verifies. Checking them here would report `alg: none` tokens (which have
    // an empty signature) as malformed instead of as a forbidden algorithm.

    let header = decode_object(header_b64, "header", JwtError::InvalidHeader)?;
    let algorithm = check_header_algorithm(&header)?;
    let key_id = check_header_rest(&header)?;

    let claims = decode_object(claims_b64, "payload", JwtError::InvalidClaims)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| JwtError::Base64("signature"))?;

    let spiffe_id = subject(&claims)?;
    let trust_domain = spiffe_id.trust_domain();
    let bundle = bundle_for(&trust_domain)
        .ok_or_else(|| JwtError::NoBundle(trust_domain.name().to_owned()))?;
    let authority = bundle
        .jwt_authority(key_id)
        .ok_or_else(|| JwtError::UnknownKeyId(key_id.to_owned()))?;
    let signing_input = token
        .get(..header_b64.len() + 1 + claims_b64.len())
        .ok_or(JwtError::Malformed)?;
    algorithm.verify(
        authority.key_material(),
        signing_input.as_bytes(),
        &signature,
    )?;

    let audiences = check_audience(&claims, audience)?;
    let now_since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let exp = numeric_date(&claims, "exp", Rounding::Down)?.ok_or(JwtError::MissingClaim("exp"))?;
    let expires_at = UNIX_EPOCH.checked_add(exp).ok_or(JwtError::InvalidClaim {
        claim: "exp",
        reason: "out of range",
    })?;
    if now_since_epoch > exp.saturating_add(JWT_LEEWAY) {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = numeric_date(&claims, "nbf", Rounding::Up)?
        && now_since_epoch.saturating_add(JWT_LEEWAY) < nbf
    {
        return Err(JwtError::NotYetValid);
    }
    if let Some(iat) = numeric_date(&claims, "iat", Rounding::Up)?
        && now_since_epoch.saturating_add(JWT_LEEWAY) < iat
    {
        return Err(JwtError::IssuedInFuture);
    }

    Ok(ValidatedJwtSvid {
        spiffe_id,
        audiences,
        expires_at,
        key_id: key_id.to_owned(),
        claims,
    })
}

/// [`validate_jwt_svid`] with a single bundle: tokens whose subject is in another trust
/// domain fail with [`JwtError::NoBundle`].
pub fn validate_jwt_svid_with_bundle(
    token: &str,
    audience: &str,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<ValidatedJwtSvid, JwtError> {
    validate_jwt_svid(
        token,
        audience,
        |trust_domain| (trust_domain == bundle.trust_domain()).then_some(bundle),
        now,
    )
}

fn decode_object(
    part: &str,
    name: &'static str,
    invalid: JwtError,
) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Base64(name))?;
    match parse_json_strict(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(invalid),
    }
}

/// J-2: the first thing looked at once the header is parsed.
fn check_header_algorithm(header: &Map<String, Value>) -> Result<Algorithm, JwtError> {
    match header.get("alg") {
        None => Err(JwtError::MissingAlgorithm),
        Some(Value::String(alg)) => {
            Algorithm::from_name(alg).ok_or_else(|| JwtError::UnsupportedAlgorithm(alg.clone()))
        }
        Some(other) => Err(JwtError::UnsupportedAlgorithm(other.to_string())),
    }
}

/// J-3, J-4, J-5. Returns the key ID.
fn check_header_rest(header: &Map<String, Value>) -> Result<&str, JwtError> {
    if let Some(name) = header
        .keys()
        .find(|name| !matches!(name.as_str(), "alg" | "kid" | "typ"))
    {
        return Err(JwtError::UnexpectedHeaderParameter(name.clone()));
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(typ)) if typ == "JWT" || typ == "JOSE" => {}
        Some(Value::String(typ)) => return Err(JwtError::UnsupportedType(typ.clone())),
        Some(other) => return Err(JwtError::UnsupportedType(other.to_string())),
    }
    match header.get("kid") {
        None => Err(JwtError::MissingKeyId),
        Some(Value::String(kid)) if kid.is_empty() => Err(JwtError::MissingKeyId),
        Some(Value::String(kid)) => Ok(kid),
        Some(_) => Err(JwtError::InvalidHeader),
    }
}

fn subject(claims: &Map<String, Value>) -> Result<SpiffeId, JwtError> {
    match claims.get("sub") {
        None => Err(JwtError::MissingClaim("sub")),
        Some(Value::String(sub)) => sub.parse().map_err(JwtError::InvalidSubject),
        Some(_) => Err(JwtError::InvalidClaim {
            claim: "sub",
            reason: "not a string",
        }),
    }
}

fn check_audience(claims: &Map<String, Value>, expected: &str) -> Result<Vec<String>, JwtError> {
    let not_strings = JwtError::InvalidClaim {
        claim: "aud",
        reason: "not a string or an array of strings",
    };
    let audiences = match claims.get("aud") {
        None => return Err(JwtError::MissingClaim("aud")),
        Some(Value::String(aud)) if aud.is_empty() => return Err(JwtError::EmptyAudience),
        Some(Value::String(aud)) => vec![aud.clone()],
        Some(Value::Array(auds)) if auds.is_empty() => return Err(JwtError::EmptyAudience),
        Some(Value::Array(auds)) => auds
            .iter()
            .map(|a| a.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or(not_strings)?,
        Some(_) => return Err(not_strings),
    };
    if !audiences.iter().any(|a| a == expected) {
        return Err(JwtError::AudienceMismatch {
            expected: expected.to_owned(),
            actual: audiences,
        });
    }
    Ok(audiences)
}

/// Which way to round a fractional NumericDate: down for `exp`, up for `nbf` and `iat`, so
/// that rounding never widens the validity window.
#[derive(Clone, Copy)]
enum Rounding {
    Down,
    Up,
}

/// A NumericDate claim (seconds since the epoch, possibly fractional) as a duration since the
/// epoch, or `None` when absent.
fn numeric_date(
    claims: &Map<String, Value>,
    claim: &'static str,
    rounding: Rounding,
) -> Result<Option<Duration>, JwtError> {
    let Some(value) = claims.get(claim) else {
        return Ok(None);
    };
    let invalid = JwtError::InvalidClaim {
        claim,
        reason: "not a non-negative number of seconds",
    };
    if let Some(seconds) = value.as_u64() {
        return Ok(Some(Duration::from_secs(seconds)));
    }
    let seconds = value.as_f64().filter(|s| *s >= 0.0).ok_or(invalid)?;
    let seconds = match rounding {
        Rounding::Down => seconds.floor(),
        Rounding::Up => seconds.ceil(),
    };
    // Saturates at Duration::MAX for absurdly large values, which is the safe reading of
    // "far in the future" for every claim checked here.
    Ok(Some(
        Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX),
    ))
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// The algorithms the validator can verify with ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Es256,
    Es384,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
}

impl Algorithm {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            "PS512" => Self::Ps512,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Ps256 => "PS256",
            Self::Ps384 => "PS384",
            Self::Ps512 => "PS512",
        }
    }

    fn verify(
        self,
        key: &PublicKeyMaterial,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), JwtError> {
        let result = match (self, key) {
            (
                Self::Es256,
                PublicKeyMaterial::Ec {
                    curve: EcCurve::P256,
                    point,
                },
            ) => UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, signature),
            (
                Self::Es384,
                PublicKeyMaterial::Ec {
                    curve: EcCurve::P384,
                    point,
                },
            ) => UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                .verify(message, signature),
            (
                Self::Rs256 | Self::Rs384 | Self::Rs512 | Self::Ps256 | Self::Ps384 | Self::Ps512,
                PublicKeyMaterial::Rsa { n, e },
            ) => {
                let params: &signature::RsaParameters = match self {
                    Self::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Self::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Self::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Self::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Self::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    _ => &signature::RSA_PSS_2048_8192_SHA512,
                };
                RsaPublicKeyComponents { n, e }.verify(params, message, signature)
            }
            (_, key) => {
                return Err(JwtError::AlgorithmKeyMismatch {
                    alg: self.name(),
                    key: key.kind(),
                });
            }
        };
        result.map_err(|_| JwtError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn every_allowed_algorithm_but_es512_is_supported() {
        for name in ALLOWED_ALGORITHMS {
            let supported = Algorithm::from_name(name);
            assert_eq!(supported.is_some(), name != "ES512", "{name}");
            if let Some(alg) = supported {
                assert_eq!(alg.name(), name);
            }
        }
        for name in ["none", "HS256", "EdDSA", "es256", ""] {
            assert_eq!(Algorithm::from_name(name), None, "{name}");
        }
    }

    #[test]
    fn numeric_dates_round_towards_the_narrower_window() {
        let c = claims(json!({"exp": 10.9, "nbf": 10.1, "big": 1e300, "neg": -1}));
        assert_eq!(
            numeric_date(&c, "exp", Rounding::Down).unwrap(),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            numeric_date(&c, "nbf", Rounding::Up).unwrap(),
            Some(Duration::from_secs(11))
        );
        assert_eq!(
            numeric_date(&c, "big", Rounding::Down).unwrap(),
            Some(Duration::MAX)
        );
        assert!(numeric_date(&c, "neg", Rounding::Down).is_err());
        assert_eq!(numeric_date(&c, "iat", Rounding::Up).unwrap(), None);
    }

    #[test]
    fn audience_may_be_a_string_or_an_array() {
        let single = claims(json!({"aud": "a"}));
        assert_eq!(check_audience(&single, "a").unwrap(), ["a"]);
        let many = claims(json!({"aud": ["a", "b"]}));
        assert_eq!(check_audience(&many, "b").unwrap(), ["a", "b"]);
        let mixed = claims(json!({"aud": ["a", 1]}));
        assert!(matches!(
            check_audience(&mixed, "a"),
            Err(JwtError::InvalidClaim { claim: "aud", .. })
        ));
    }

    #[test]
    fn the_header_is_written_in_a_fixed_order() {
        let header = Header {
            alg: "ES256",
            kid: "k1",
            typ: "JWT",
        };
        assert_eq!(
            serde_json::to_string(&header).unwrap(),
            r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#
        );
    }
}
