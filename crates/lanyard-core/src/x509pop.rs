//! x509pop node attestation: an agent proves possession of the private key behind a
//! certificate issued by an operator's PKI, wire-compatible with SPIRE's `x509pop` plugins.
//!
//! The exchange has three JSON messages, written as Go's `encoding/json` writes them (byte
//! strings as standard base64 with padding, an unused variant as an explicit `null`):
//!
//! 1. the agent sends [`AttestationData`] (leaf first, then intermediates), built with
//!    [`build_attestation_payload`];
//! 2. the server verifies the chain against its configured CA bundle and answers with a
//!    [`Challenge`] holding a 32-byte nonce ([`ServerAttestation::begin`]);
//! 3. the agent adds its own 32-byte nonce and signs SHA-256(challenge nonce ‖ response nonce)
//!    ([`answer_challenge`]); the server checks the signature with the leaf's public key
//!    ([`ServerAttestation::finish`]) and derives the agent ID and selectors.
//!
//! Signatures follow SPIRE, which signs the 32-byte digest as a prehash:
//! - ECDSA `r` and `s` are minimal big-endian integers (Go's `big.Int.Bytes()`), not fixed-width.
//!   For P-256, ECDSA over the digest as prehash is the same computation as ECDSA-SHA256 over
//!   the concatenated nonces, which is what ring provides. For P-384 the server verifies with
//!   ring's P-384/SHA-256 verifier (a 256-bit digest is used unreduced, as Go does), but ring
//!   cannot *sign* that way, so a Lanyard agent answers with P-256 or RSA keys only.
//! - RSA signatures are RSA-PSS with SHA-256 and MGF1-SHA-256. Go signs with the maximum salt
//!   length and verifies with any, while ring only verifies a salt as long as the digest, so
//!   the server side checks the EMSA-PSS encoding itself with salt-length detection
//!   (RFC 8017 §9.1.2), using `num-bigint` (through x509-parser) for the public-key operation.
//!   The agent side signs with ring (salt length 32), which Go accepts.
//!
//! Like SPIRE's server plugin in its default `external_pki` mode, the leaf is an ordinary
//! certificate, not an SVID: any extended key usage is accepted, the keyUsage extension must be
//! present with digitalSignature, and the agent ID is
//! `spiffe://<td>/spire/agent/x509pop/<lowercase hex SHA-1 of the leaf DER>`.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{self, RsaKeyPair};
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use serde::{Deserialize, Serialize};
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::num_bigint::BigUint;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer as _;
use x509_parser::public_key::PublicKey;

use crate::id::{IdError, SpiffeId, TrustDomain};
use crate::keys::{KeyPair, KeyType};
use crate::selector::{Selector, SelectorError};
use crate::x509::{fingerprint_sha1_hex, validity_of};

/// The attestor name: `AttestAgent`'s `data.type`, the agent ID's path segment and the
/// selector type.
pub const ATTESTOR_NAME: &str = "x509pop";

/// The type of every selector this attestor produces.
pub const SELECTOR_TYPE: &str = "x509pop";

/// The length of both nonces, in bytes. SPIRE refuses any other length.
pub const NONCE_LEN: usize = 32;

/// The largest payload or challenge response accepted, in bytes. A leaf, four intermediates and
/// an 8192-bit RSA signature fit with room to spare.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// The most intermediate certificates accepted after the leaf (SPIRE's `max_intermediates`,
/// as recorded in the wire notes).
pub const MAX_INTERMEDIATES: usize = 4;

/// The smallest RSA leaf key accepted, in bits.
pub const MIN_RSA_BITS: u64 = 2048;

/// The largest RSA leaf key accepted, in bits (SPIRE's limit, and ring's).
pub const MAX_RSA_BITS: u64 = 8192;

/// Whether an agent attested with x509pop re-attests instead of renewing: always, as in SPIRE.
pub const CAN_REATTEST: bool = true;

/// The largest RSA public exponent accepted (Go's limit).
const MAX_RSA_EXPONENT: u64 = (1 << 31) - 1;

/// SHA-256 output length, the `hLen` of EMSA-PSS.
const DIGEST_LEN: usize = 32;

/// Errors from building, answering or verifying an x509pop attestation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum X509PopError {
    /// A message exceeds [`MAX_MESSAGE_LEN`].
    #[error("{what} is {len} bytes long; the limit is {MAX_MESSAGE_LEN}")]
    TooLarge {
        /// Which message.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A message is not the expected JSON, or a byte string in it is not standard base64.
    #[error("malformed {what}: {source}")]
    Json {
        /// Which message.
        what: &'static str,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The payload lists no certificate.
    #[error("no certificate to attest")]
    NoCertificates,
    /// The payload lists more than [`MAX_INTERMEDIATES`] intermediates.
    #[error("{0} intermediate certificates; the limit is {MAX_INTERMEDIATES}")]
    TooManyIntermediates(usize),
    /// A certificate (or a part of one) is not valid DER or cannot be interpreted.
    #[error("malformed {0}")]
    MalformedCertificate(&'static str),
    /// No trust anchor was configured, or one is not a usable CA certificate.
    #[error("invalid or missing trust anchors")]
    InvalidTrustAnchors,
    /// A certificate in the chain has expired at `now`.
    #[error("certificate has expired")]
    Expired,
    /// A certificate in the chain is not yet valid at `now`.
    #[error("certificate is not yet valid")]
    NotYetValid,
    /// The leaf does not chain to any of the trust anchors.
    #[error("certificate is not signed by a trusted authority")]
    UntrustedCertificate,
    /// Path validation failed for another reason.
    #[error("certificate verification failed: {0}")]
    ChainInvalid(String),
    /// The leaf has no keyUsage extension, or it lacks digitalSignature.
    #[error("certificate not intended for digital signature use")]
    NotForDigitalSignature,
    /// The leaf's key is not EC P-256, EC P-384 or RSA of 2048 to 8192 bits.
    #[error("unsupported leaf public key; expected EC P-256, EC P-384 or RSA of 2048 to 8192 bits")]
    UnsupportedKey,
    /// The agent's key cannot answer an x509pop challenge here (only P-256 and RSA can).
    #[error("{0} keys cannot answer an x509pop challenge; use an EC P-256 or RSA key")]
    UnsupportedAgentKey(KeyType),
    /// The challenge does not hold the variant the agent's key needs.
    #[error("expecting {0} challenge")]
    WrongChallengeType(&'static str),
    /// The response does not hold the variant the leaf's key needs.
    #[error("expecting {0} response")]
    WrongResponseType(&'static str),
    /// A nonce is not [`NONCE_LEN`] bytes long.
    #[error("invalid {which} nonce: {len} bytes, expected 32")]
    NonceLength {
        /// `challenge` or `response`.
        which: &'static str,
        /// The length received.
        len: usize,
    },
    /// The signature does not verify with the leaf's public key.
    #[error("{0} signature verify failed")]
    SignatureInvalid(&'static str),
    /// A selector derived from the leaf cannot be represented (too long, control characters).
    #[error("leaf certificate yields an invalid selector: {0}")]
    Selector(#[from] SelectorError),
    /// The agent ID cannot be formed.
    #[error("cannot form the agent ID: {0}")]
    AgentId(#[from] IdError),
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Random,
    /// Signing failed in the crypto library.
    #[error("signing failed")]
    Signing,
}

impl X509PopError {
    /// Whether SPIRE's server answers this failure with `PermissionDenied`: the chain did not
    /// verify, or the challenge response did not. A real agent exits on that code instead of
    /// retrying. SPIRE reports malformed input as `InvalidArgument`, and a trusted leaf it
    /// cannot challenge (no digitalSignature, unsupported key) as `Internal`.
    pub fn is_verification_failure(&self) -> bool {
        matches!(
            self,
            Self::TooManyIntermediates(_)
                | Self::Expired
                | Self::NotYetValid
                | Self::UntrustedCertificate
                | Self::ChainInvalid(_)
                | Self::WrongResponseType(_)
                | Self::NonceLength { .. }
                | Self::SignatureInvalid(_)
        )
    }
}

/// The attestation payload: the agent's certificate chain, leaf first, each certificate DER.
///
/// JSON: `{"certificates":["<base64 DER>", …]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationData {
    /// DER certificates, leaf first, then intermediates.
    #[serde(default, with = "base64_list")]
    pub certificates: Vec<Vec<u8>>,
}

/// The server's challenge. Exactly one variant is set, chosen by the leaf's key type; the other
/// is written as `null`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Challenge {
    /// Set when the leaf has an RSA key.
    pub rsa_signature: Option<RsaChallenge>,
    /// Set when the leaf has an EC key.
    pub ecdsa_signature: Option<EcdsaChallenge>,
}

/// The RSA variant of [`Challenge`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RsaChallenge {
    /// The server's nonce.
    #[serde(with = "base64_bytes")]
    pub nonce: Vec<u8>,
}

/// The ECDSA variant of [`Challenge`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EcdsaChallenge {
    /// The server's nonce.
    #[serde(with = "base64_bytes")]
    pub nonce: Vec<u8>,
}

/// The agent's response, with the variant matching the challenge set and the other `null`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Response {
    /// The RSA-PSS answer.
    pub rsa_signature: Option<RsaResponse>,
    /// The ECDSA answer.
    pub ecdsa_signature: Option<EcdsaResponse>,
}

/// The RSA variant of [`Response`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RsaResponse {
    /// The agent's nonce.
    #[serde(with = "base64_bytes")]
    pub nonce: Vec<u8>,
    /// RSA-PSS (SHA-256, MGF1-SHA-256) signature of SHA-256(challenge nonce ‖ this nonce).
    #[serde(with = "base64_bytes")]
    pub signature: Vec<u8>,
}

/// The ECDSA variant of [`Response`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EcdsaResponse {
    /// The agent's nonce.
    #[serde(with = "base64_bytes")]
    pub nonce: Vec<u8>,
    /// The signature's `r`, big-endian without leading zeros.
    #[serde(with = "base64_bytes")]
    pub r: Vec<u8>,
    /// The signature's `s`, big-endian without leading zeros.
    #[serde(with = "base64_bytes")]
    pub s: Vec<u8>,
}

/// Builds the agent's attestation payload from its certificate chain (leaf first, DER).
pub fn build_attestation_payload(chain_der: &[Vec<u8>]) -> Vec<u8> {
    to_json(&AttestationData {
        certificates: chain_der.to_vec(),
    })
}

/// Answers the server's challenge with `key`, the private key of the attested leaf.
///
/// Generates a fresh 32-byte nonce and signs SHA-256(challenge nonce ‖ response nonce): ECDSA
/// with minimal big-endian `r` and `s` for P-256 keys, RSA-PSS SHA-256 for RSA keys. P-384 keys
/// are refused with [`X509PopError::UnsupportedAgentKey`] (see the module documentation).
pub fn answer_challenge(key: &KeyPair, challenge_json: &[u8]) -> Result<Vec<u8>, X509PopError> {
    let challenge: Challenge = parse_json("challenge", challenge_json)?;
    let rng = SystemRandom::new();
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce).map_err(|_| X509PopError::Random)?;

    let response = match key.key_type() {
        KeyType::EcP256 => {
            let challenge_nonce = &challenge
                .ecdsa_signature
                .ok_or(X509PopError::WrongChallengeType("ECDSA"))?
                .nonce;
            let message = signed_message(challenge_nonce, &nonce)?;
            // ECDSA-SHA256 over the concatenation is ECDSA over SHA-256(concatenation) used as
            // a prehash, which is what SPIRE signs and verifies.
            let fixed = key.sign_jws(&message).map_err(|_| X509PopError::Signing)?;
            let (r, s) = fixed
                .split_at_checked(fixed.len() / 2)
                .ok_or(X509PopError::Signing)?;
            Response {
                rsa_signature: None,
                ecdsa_signature: Some(EcdsaResponse {
                    nonce: nonce.to_vec(),
                    r: strip_leading_zeros(r).to_vec(),
                    s: strip_leading_zeros(s).to_vec(),
                }),
            }
        }
        KeyType::Rsa2048 | KeyType::Rsa4096 => {
            let challenge_nonce = &challenge
                .rsa_signature
                .ok_or(X509PopError::WrongChallengeType("RSA"))?
                .nonce;
            let message = signed_message(challenge_nonce, &nonce)?;
            let rsa = RsaKeyPair::from_pkcs8(key.secret_pkcs8_der())
                .map_err(|_| X509PopError::Signing)?;
            let mut signature = vec![0u8; rsa.public().modulus_len()];
            rsa.sign(&signature::RSA_PSS_SHA256, &rng, &message, &mut signature)
                .map_err(|_| X509PopError::Signing)?;
            Response {
                rsa_signature: Some(RsaResponse {
                    nonce: nonce.to_vec(),
                    signature,
                }),
                ecdsa_signature: None,
            }
        }
        other => return Err(X509PopError::UnsupportedAgentKey(other)),
    };
    Ok(to_json(&response))
}

/// The leaf's public key, in the form its verifier needs.
#[derive(Debug, Clone)]
enum LeafKey {
    /// Uncompressed SEC1 point.
    EcP256(Vec<u8>),
    /// Uncompressed SEC1 point.
    EcP384(Vec<u8>),
    /// Modulus and exponent, big-endian without leading zeros.
    Rsa { modulus: Vec<u8>, exponent: Vec<u8> },
}

/// The server's half of one x509pop attestation, between sending the challenge and checking
/// the response.
///
/// [`begin`](Self::begin) verifies the certificate chain and builds the challenge;
/// [`finish`](Self::finish) consumes the state, so a challenge is answered at most once.
#[derive(Debug)]
pub struct ServerAttestation {
    nonce: [u8; NONCE_LEN],
    leaf_key: LeafKey,
    agent_id: SpiffeId,
    selectors: Vec<Selector>,
    leaf_not_after: SystemTime,
}

/// A successful x509pop attestation.
///
/// Only [`ServerAttestation::finish`] makes one, so holding one proves the agent owns the key
/// of a leaf that chains to the configured CA bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509PopResult {
    agent_id: SpiffeId,
    selectors: Vec<Selector>,
    leaf_not_after: SystemTime,
}

impl X509PopResult {
    /// `spiffe://<td>/spire/agent/x509pop/<lowercase hex SHA-1 of the leaf DER>`.
    pub fn agent_id(&self) -> &SpiffeId {
        &self.agent_id
    }

    /// The node selectors, all of type [`SELECTOR_TYPE`], in SPIRE's order: `subject:cn:`,
    /// `ca:fingerprint:` (issuer first, root last), `serialnumber:`, then `san:` sorted by key.
    pub fn selectors(&self) -> &[Selector] {
        &self.selectors
    }

    /// The leaf's `NotAfter`.
    pub fn leaf_not_after(&self) -> SystemTime {
        self.leaf_not_after
    }
}

impl ServerAttestation {
    /// Checks an agent's payload and builds the challenge to send back.
    ///
    /// `trust_anchors` are the DER CA certificates of the configured CA bundle; the leaf must
    /// chain to one of them at `now`, through intermediates from the payload (RFC 5280 path
    /// validation by rustls-webpki, any extended key usage, every certificate including the
    /// anchor valid at `now`, as Go checks). The leaf must have the digitalSignature key usage
    /// and an EC P-256, EC P-384 or RSA key. `trust_domain` names the server's trust domain,
    /// for the agent ID and the `san:` selectors.
    pub fn begin(
        payload: &[u8],
        trust_anchors: &[Vec<u8>],
        trust_domain: &TrustDomain,
        now: SystemTime,
    ) -> Result<(Self, Vec<u8>), X509PopError> {
        let data: AttestationData = parse_json("attestation payload", payload)?;
        let (leaf_der, intermediates) = data
            .certificates
            .split_first()
            .ok_or(X509PopError::NoCertificates)?;
        if intermediates.len() > MAX_INTERMEDIATES {
            return Err(X509PopError::TooManyIntermediates(intermediates.len()));
        }
        let leaf = parse_certificate(leaf_der, "leaf certificate")?;
        for intermediate in intermediates {
            parse_certificate(intermediate, "intermediate certificate")?;
        }

        let ca_chain = verify_chain(leaf_der, intermediates, trust_anchors, now)?;

        // Challenge generation, as SPIRE orders it: key usage first, then key type.
        let key_usage = leaf
            .key_usage()
            .map_err(|_| X509PopError::MalformedCertificate("leaf key usage"))?;
        if !key_usage.is_some_and(|ku| ku.value.digital_signature()) {
            return Err(X509PopError::NotForDigitalSignature);
        }
        let leaf_key = leaf_key(&leaf)?;

        let agent_id = trust_domain.x509pop_agent_id(&fingerprint_sha1_hex(leaf_der))?;
        let selectors = build_selectors(&leaf, &ca_chain, trust_domain)?;
        let (_, leaf_not_after) = validity_of(leaf_der)
            .map_err(|_| X509PopError::MalformedCertificate("leaf validity"))?;

        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| X509PopError::Random)?;
        let challenge = match leaf_key {
            LeafKey::Rsa { .. } => Challenge {
                rsa_signature: Some(RsaChallenge {
                    nonce: nonce.to_vec(),
                }),
                ecdsa_signature: None,
            },
            LeafKey::EcP256(_) | LeafKey::EcP384(_) => Challenge {
                rsa_signature: None,
                ecdsa_signature: Some(EcdsaChallenge {
                    nonce: nonce.to_vec(),
                }),
            },
        };
        let state = Self {
            nonce,
            leaf_key,
            agent_id,
            selectors,
            leaf_not_after,
        };
        Ok((state, to_json(&challenge)))
    }

    /// Checks the agent's response to the challenge built by [`begin`](Self::begin).
    ///
    /// The response nonce must be 32 bytes and the signature must verify, with the leaf's key,
    /// over SHA-256(challenge nonce ‖ response nonce). ECDSA `r` and `s` may be minimal or
    /// zero-padded big-endian; RSA-PSS signatures may use any salt length.
    pub fn finish(self, response_json: &[u8]) -> Result<X509PopResult, X509PopError> {
        let response: Response = parse_json("challenge response", response_json)?;
        match &self.leaf_key {
            LeafKey::EcP256(point) | LeafKey::EcP384(point) => {
                let answer = response
                    .ecdsa_signature
                    .ok_or(X509PopError::WrongResponseType("ECDSA"))?;
                let message = signed_message(&self.nonce, &answer.nonce)?;
                let verified = match &self.leaf_key {
                    LeafKey::EcP256(_) => verify_ecdsa_p256(point, &message, &answer.r, &answer.s),
                    _ => verify_ecdsa_p384(point, &message, &answer.r, &answer.s),
                };
                if !verified {
                    return Err(X509PopError::SignatureInvalid("ECDSA"));
                }
            }
            LeafKey::Rsa { modulus, exponent } => {
                let answer = response
                    .rsa_signature
                    .ok_or(X509PopError::WrongResponseType("RSA"))?;
                let message = signed_message(&self.nonce, &answer.nonce)?;
                let digest = ring::digest::digest(&ring::digest::SHA256, &message);
                if !verify_rsa_pss_sha256(modulus, exponent, digest.as_ref(), &answer.signature) {
                    return Err(X509PopError::SignatureInvalid("RSA"));
                }
            }
        }
        Ok(X509PopResult {
            agent_id: self.agent_id,
            selectors: self.selectors,
            leaf_not_after: self.leaf_not_after,
        })
    }
}

/// Challenge nonce ‖ response nonce, after checking both lengths. Its SHA-256 is what SPIRE
/// signs; ring's SHA-256 signers and verifiers hash it themselves.
fn signed_message(challenge_nonce: &[u8], response_nonce: &[u8]) -> Result<Vec<u8>, X509PopError> {
    if challenge_nonce.len() != NONCE_LEN {
        return Err(X509PopError::NonceLength {
            which: "challenge",
            len: challenge_nonce.len(),
        });
    }
    if response_nonce.len() != NONCE_LEN {
        return Err(X509PopError::NonceLength {
            which: "response",
            len: response_nonce.len(),
        });
    }
    let mut message = Vec::with_capacity(2 * NONCE_LEN);
    message.extend_from_slice(challenge_nonce);
    message.extend_from_slice(response_nonce);
    Ok(message)
}

/// Signature algorithms accepted on the certificate chain (not on the PoP signature).
static CHAIN_SIGNATURE_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// SPIRE verifies x509pop leaves with `ExtKeyUsageAny`: any EKU, or none, is fine. A malformed
/// EKU extension is still an error.
#[derive(Debug, Clone, Copy)]
struct AnyExtendedKeyUsage;

impl webpki::ExtendedKeyUsageValidator for AnyExtendedKeyUsage {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for purpose in iter {
            purpose?;
        }
        Ok(())
    }
}

/// Path-validates the leaf against the anchors valid at `now` and returns the DER of every CA
/// certificate on the path above the leaf: intermediates from the leaf's issuer up, then the
/// anchor.
fn verify_chain(
    leaf_der: &[u8],
    intermediates: &[Vec<u8>],
    trust_anchors: &[Vec<u8>],
    now: SystemTime,
) -> Result<Vec<Vec<u8>>, X509PopError> {
    if trust_anchors.is_empty() {
        return Err(X509PopError::InvalidTrustAnchors);
    }
    // webpki does not check the anchor's own validity period; Go does, so expired or
    // not-yet-valid anchors are left out here.
    let mut usable_anchor_ders = Vec::with_capacity(trust_anchors.len());
    for der in trust_anchors {
        let (not_before, not_after) =
            validity_of(der).map_err(|_| X509PopError::InvalidTrustAnchors)?;
        if not_before <= now && now <= not_after {
            usable_anchor_ders.push(CertificateDer::from(der.as_slice()));
        }
    }
    let anchors: Vec<TrustAnchor<'_>> = usable_anchor_ders
        .iter()
        .map(|der| webpki::anchor_from_trusted_cert(der))
        .collect::<Result<_, _>>()
        .map_err(|_| X509PopError::InvalidTrustAnchors)?;
    let intermediate_ders: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    let time = UnixTime::since_unix_epoch(
        now.duration_since(UNIX_EPOCH)
            .map_err(|_| X509PopError::ChainInvalid("time is before 1970".to_owned()))?,
    );

    let leaf_cert_der = CertificateDer::from(leaf_der);
    let end_entity = webpki::EndEntityCert::try_from(&leaf_cert_der).map_err(map_webpki_error)?;
    let path = end_entity
        .verify_for_usage(
            CHAIN_SIGNATURE_ALGORITHMS,
            &anchors,
            &intermediate_ders,
            time,
            AnyExtendedKeyUsage,
            None,
            None,
        )
        .map_err(map_webpki_error)?;

    let mut ca_chain: Vec<Vec<u8>> = path
        .intermediate_certificates()
        .map(|cert| cert.der().to_vec())
        .collect();
    let anchor_der = anchors
        .iter()
        .position(|anchor| std::ptr::eq(anchor, path.anchor()))
        .and_then(|index| usable_anchor_ders.get(index))
        .ok_or(X509PopError::InvalidTrustAnchors)?;
    ca_chain.push(anchor_der.to_vec());
    Ok(ca_chain)
}

fn map_webpki_error(error: webpki::Error) -> X509PopError {
    match error {
        webpki::Error::CertExpired { .. } => X509PopError::Expired,
        webpki::Error::CertNotValidYet { .. } => X509PopError::NotYetValid,
        // CAs often share a subject, so a foreign issuer is found by name and then fails the
        // signature check.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            X509PopError::UntrustedCertificate
        }
        other => X509PopError::ChainInvalid(other.to_string()),
    }
}

fn parse_certificate<'a>(
    der: &'a [u8],
    what: &'static str,
) -> Result<X509Certificate<'a>, X509PopError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        _ => Err(X509PopError::MalformedCertificate(what)),
    }
}

/// The leaf's public key, if it is one SPIRE can challenge and ring can verify.
fn leaf_key(leaf: &X509Certificate<'_>) -> Result<LeafKey, X509PopError> {
    let spki = leaf.public_key();
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or(X509PopError::UnsupportedKey)?;
        let point = spki.subject_public_key.data.to_vec();
        if curve == OID_EC_P256 {
            return Ok(LeafKey::EcP256(point));
        }
        if curve == OID_NIST_EC_P384 {
            return Ok(LeafKey::EcP384(point));
        }
        return Err(X509PopError::UnsupportedKey);
    }
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(X509PopError::UnsupportedKey);
        };
        let modulus = strip_leading_zeros(rsa.modulus);
        let exponent = strip_leading_zeros(rsa.exponent);
        let modulus_bits = BigUint::from_bytes_be(modulus).bits();
        let exponent_value = BigUint::from_bytes_be(exponent);
        let modulus_is_odd = modulus.last().is_some_and(|b| b & 1 == 1);
        let exponent_is_odd = exponent.last().is_some_and(|b| b & 1 == 1);
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&modulus_bits)
            || !modulus_is_odd
            || !exponent_is_odd
            || exponent_value < BigUint::from(3u32)
            || exponent_value > BigUint::from(MAX_RSA_EXPONENT)
        {
            return Err(X509PopError::UnsupportedKey);
        }
        return Ok(LeafKey::Rsa {
            modulus: modulus.to_vec(),
            exponent: exponent.to_vec(),
        });
    }
    Err(X509PopError::UnsupportedKey)
}

/// SPIRE's node selectors for a verified leaf: `subject:cn:<cn>` (when not empty),
/// `ca:fingerprint:<sha1>` for each CA certificate on the path (deduplicated),
/// `serialnumber:<hex>`, and `san:<key>:<value>` for each `x509pop://<td>/<key>/<value>` URI.
fn build_selectors(
    leaf: &X509Certificate<'_>,
    ca_chain: &[Vec<u8>],
    trust_domain: &TrustDomain,
) -> Result<Vec<Selector>, X509PopError> {
    let mut values = Vec::new();
    if let Some(common_name) = common_name(leaf)?
        && !common_name.is_empty()
    {
        values.push(format!("subject:cn:{common_name}"));
    }
    let mut fingerprints = Vec::with_capacity(ca_chain.len());
    for der in ca_chain {
        let fingerprint = fingerprint_sha1_hex(der);
        if !fingerprints.contains(&fingerprint) {
            values.push(format!("ca:fingerprint:{fingerprint}"));
            fingerprints.push(fingerprint);
        }
    }
    values.push(format!("serialnumber:{}", serial_hex(leaf.raw_serial())?));
    for (key, value) in san_selectors(leaf, trust_domain)? {
        values.push(format!("san:{key}:{value}"));
    }
    values
        .iter()
        .map(|value| Selector::new(SELECTOR_TYPE, value).map_err(X509PopError::from))
        .collect()
}

/// The subject common name as Go reads it: the last CN attribute, decoded from any of the
/// string types Go understands.
fn common_name(leaf: &X509Certificate<'_>) -> Result<Option<String>, X509PopError> {
    let Some(attribute) = leaf.subject().iter_common_name().last() else {
        return Ok(None);
    };
    if let Ok(text) = attribute.as_str() {
        return Ok(Some(text.to_owned()));
    }
    let value = attribute.attr_value();
    let malformed = X509PopError::MalformedCertificate("leaf subject common name");
    match value.tag() {
        Tag::BmpString => {
            let units: Vec<u16> = value
                .data
                .chunks(2)
                .map(|pair| match pair {
                    [high, low] => Ok(u16::from_be_bytes([*high, *low])),
                    _ => Err(()),
                })
                .collect::<Result<_, _>>()
                .map_err(|()| X509PopError::MalformedCertificate("leaf subject common name"))?;
            String::from_utf16(&units).map(Some).map_err(|_| malformed)
        }
        // Go decodes T61String as ISO 8859-1.
        Tag::TeletexString => Ok(Some(value.data.iter().map(|&b| char::from(b)).collect())),
        _ => Err(malformed),
    }
}

/// Lowercase hex of a positive serial number with an even number of digits, as SPIRE writes it
/// (Go's `%x` of the `big.Int`, left-padded to even length).
fn serial_hex(raw: &[u8]) -> Result<String, X509PopError> {
    if raw.first().is_none_or(|b| b & 0x80 != 0) {
        // Go's certificate parser rejects negative serial numbers.
        return Err(X509PopError::MalformedCertificate("leaf serial number"));
    }
    let magnitude = strip_leading_zeros(raw);
    if magnitude.is_empty() {
        return Ok("00".to_owned());
    }
    Ok(magnitude.iter().map(|b| format!("{b:02x}")).collect())
}

/// `san:` selector pairs from URI SANs of the form `x509pop://<td>/<key>/<value>`, read as
/// SPIRE reads them: the percent-decoded path, slashes trimmed from both ends, split at the
/// first remaining slash. A repeated key keeps its last value; pairs come out sorted by key
/// (SPIRE's order is a Go map's, which is unspecified).
fn san_selectors(
    leaf: &X509Certificate<'_>,
    trust_domain: &TrustDomain,
) -> Result<BTreeMap<String, String>, X509PopError> {
    let mut pairs = BTreeMap::new();
    let san = leaf
        .subject_alternative_name()
        .map_err(|_| X509PopError::MalformedCertificate("leaf subject alternative name"))?;
    let Some(san) = san else {
        return Ok(pairs);
    };
    for name in &san.value.general_names {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let Some((scheme, rest)) = uri.split_once("://") else {
            continue;
        };
        if !scheme.eq_ignore_ascii_case(ATTESTOR_NAME) {
            continue;
        }
        let Some(path) = rest
            .strip_prefix(trust_domain.name())
            .and_then(|rest| rest.strip_prefix('/'))
        else {
            continue;
        };
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let decoded =
            percent_decode(path).ok_or(X509PopError::MalformedCertificate("leaf URI SAN"))?;
        if let Some((key, value)) = decoded.trim_matches('/').split_once('/') {
            pairs.insert(key.to_owned(), value.to_owned());
        }
    }
    Ok(pairs)
}

/// Decodes `%XX` escapes; `None` for a malformed escape or a result that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        if byte == b'%' {
            let high = char::from(*bytes.get(index + 1)?).to_digit(16)?;
            let low = char::from(*bytes.get(index + 2)?).to_digit(16)?;
            out.push(u8::try_from(high * 16 + low).ok()?);
            index += 3;
        } else {
            out.push(byte);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    bytes.get(start..).unwrap_or_default()
}

/// Left-pads a big-endian integer to `width` bytes after dropping leading zeros, as Go's
/// `big.Int.SetBytes` reads it. `None` when it is zero or does not fit.
fn fixed_width_scalar(bytes: &[u8], width: usize) -> Option<Vec<u8>> {
    let magnitude = strip_leading_zeros(bytes);
    if magnitude.is_empty() || magnitude.len() > width {
        return None;
    }
    let mut out = vec![0u8; width - magnitude.len()];
    out.extend_from_slice(magnitude);
    Some(out)
}

fn verify_ecdsa_p256(point: &[u8], message: &[u8], r: &[u8], s: &[u8]) -> bool {
    const SCALAR_LEN: usize = 32;
    let (Some(r), Some(s)) = (
        fixed_width_scalar(r, SCALAR_LEN),
        fixed_width_scalar(s, SCALAR_LEN),
    ) else {
        return false;
    };
    let mut fixed = r;
    fixed.extend_from_slice(&s);
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(message, &fixed)
        .is_ok()
}

/// P-384 with a SHA-256 digest: the 256-bit digest is shorter than the curve order, so both Go
/// and ring use it unreduced. ring has this verifier only in the ASN.1 signature form.
fn verify_ecdsa_p384(point: &[u8], message: &[u8], r: &[u8], s: &[u8]) -> bool {
    const SCALAR_LEN: usize = 48;
    let (Some(r), Some(s)) = (
        fixed_width_scalar(r, SCALAR_LEN),
        fixed_width_scalar(s, SCALAR_LEN),
    ) else {
        return false;
    };
    let Some(der) = der_ecdsa_signature(&r, &s) else {
        return false;
    };
    signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA256_ASN1, point)
        .verify(message, &der)
        .is_ok()
}

/// `SEQUENCE { INTEGER r, INTEGER s }` for scalars short enough for one-byte lengths.
fn der_ecdsa_signature(r: &[u8], s: &[u8]) -> Option<Vec<u8>> {
    fn integer(out: &mut Vec<u8>, value: &[u8]) -> Option<()> {
        let magnitude = strip_leading_zeros(value);
        let pad = magnitude.first().is_none_or(|b| b & 0x80 != 0);
        out.push(0x02);
        out.push(u8::try_from(magnitude.len() + usize::from(pad)).ok()?);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(magnitude);
        Some(())
    }
    let mut body = Vec::with_capacity(2 * 51);
    integer(&mut body, r)?;
    integer(&mut body, s)?;
    if body.len() >= 0x80 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + 2);
    out.push(0x30);
    out.push(u8::try_from(body.len()).ok()?);
    out.extend_from_slice(&body);
    Some(out)
}

/// RSASSA-PSS-VERIFY (RFC 8017 §8.1.2) with SHA-256, MGF1-SHA-256 and the salt length read
/// from the encoding, as Go's `rsa.VerifyPSS` does with `PSSSaltLengthAuto`. `m_hash` is the
/// SHA-256 of the signed message. The key is public and so is the signature, so variable-time
/// arithmetic leaks nothing.
fn verify_rsa_pss_sha256(modulus: &[u8], exponent: &[u8], m_hash: &[u8], sig: &[u8]) -> bool {
    let n = BigUint::from_bytes_be(modulus);
    let e = BigUint::from_bytes_be(exponent);
    let Ok(modulus_bits) = usize::try_from(n.bits()) else {
        return false;
    };
    if modulus_bits < 2 || sig.len() != modulus_bits.div_ceil(8) {
        return false;
    }
    let s = BigUint::from_bytes_be(sig);
    if s >= n {
        return false;
    }
    let m = s.modpow(&e, &n).to_bytes_be();
    let em_bits = modulus_bits - 1;
    let em_len = em_bits.div_ceil(8);
    if m.len() > em_len {
        return false;
    }
    let mut em = vec![0u8; em_len - m.len()];
    em.extend_from_slice(&m);
    emsa_pss_verify_sha256(m_hash, &em, em_bits)
}

/// EMSA-PSS-VERIFY (RFC 8017 §9.1.2) with SHA-256 and any salt length.
fn emsa_pss_verify_sha256(m_hash: &[u8], em: &[u8], em_bits: usize) -> bool {
    let em_len = em.len();
    if m_hash.len() != DIGEST_LEN || em_len < DIGEST_LEN + 2 {
        return false;
    }
    let Some((&trailer, rest)) = em.split_last() else {
        return false;
    };
    if trailer != 0xbc {
        return false;
    }
    let Some((masked_db, h)) = rest.split_at_checked(em_len - DIGEST_LEN - 1) else {
        return false;
    };
    // The leftmost 8·emLen − emBits bits of the encoding must be zero.
    let unused_bits = 8 * em_len - em_bits;
    let Ok(unused_bits) = u32::try_from(unused_bits) else {
        return false;
    };
    let top_mask = 0xffu8.checked_shr(unused_bits).unwrap_or(0);
    if masked_db.first().is_none_or(|b| b & !top_mask != 0) {
        return false;
    }
    let mut db = mgf1_sha256(h, masked_db.len());
    for (out, masked) in db.iter_mut().zip(masked_db) {
        *out ^= masked;
    }
    if let Some(first) = db.first_mut() {
        *first &= top_mask;
    }
    // DB = PS (zeros) ‖ 0x01 ‖ salt.
    let Some(separator) = db.iter().position(|&b| b != 0) else {
        return false;
    };
    if db.get(separator) != Some(&0x01) {
        return false;
    }
    let salt = db.get(separator + 1..).unwrap_or_default();
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(&[0u8; 8]);
    context.update(m_hash);
    context.update(salt);
    context.finish().as_ref() == h
}

/// MGF1 with SHA-256 (RFC 8017 §B.2.1).
fn mgf1_sha256(seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + DIGEST_LEN);
    let mut counter: u32 = 0;
    while out.len() < len {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(seed);
        context.update(&counter.to_be_bytes());
        out.extend_from_slice(context.finish().as_ref());
        counter = counter.wrapping_add(1);
    }
    out.truncate(len);
    out
}

fn parse_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, X509PopError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(X509PopError::TooLarge {
            what,
            len: bytes.len(),
        });
    }
    serde_json::from_slice(bytes).map_err(|source| X509PopError::Json { what, source })
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value)
        .expect("x509pop messages hold only byte strings and options, which always serialize")
}

/// One byte string as Go's `encoding/json` writes `[]byte`: standard base64 with padding.
/// `null` reads as empty, as Go reads it into a nil slice.
mod base64_bytes {
    use super::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        match Option::<String>::deserialize(deserializer)? {
            None => Ok(Vec::new()),
            Some(text) => STANDARD.decode(text).map_err(D::Error::custom),
        }
    }
}

/// A list of byte strings (`[][]byte` in Go), each as in [`base64_bytes`].
mod base64_list {
    use super::STANDARD;
    use base64::Engine as _;
    use serde::ser::SerializeSeq as _;
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    pub(super) fn serialize<S: Serializer>(
        list: &[Vec<u8>],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(list.len()))?;
        for bytes in list {
            seq.serialize_element(&STANDARD.encode(bytes))?;
        }
        seq.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Vec<u8>>, D::Error> {
        let Some(list) = Option::<Vec<Option<String>>>::deserialize(deserializer)? else {
            return Ok(Vec::new());
        };
        list.into_iter()
            .map(|text| match text {
                None => Ok(Vec::new()),
                Some(text) => STANDARD.decode(text).map_err(D::Error::custom),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    #[test]
    fn go_style_json_literals_parse() {
        let nonce = [7u8; NONCE_LEN];
        let nonce_b64 = STANDARD.encode(nonce);
        // As Go's json.Marshal writes a Challenge for an EC leaf.
        let challenge =
            format!(r#"{{"rsa_signature":null,"ecdsa_signature":{{"nonce":"{nonce_b64}"}}}}"#);
        let parsed: Challenge = serde_json::from_str(&challenge).unwrap();
        assert_eq!(parsed.rsa_signature, None);
        assert_eq!(parsed.ecdsa_signature.unwrap().nonce, nonce);

        let response = format!(
            r#"{{"rsa_signature":{{"nonce":"{nonce_b64}","signature":"AQID"}},"ecdsa_signature":null}}"#
        );
        let parsed: Response = serde_json::from_str(&response).unwrap();
        let rsa = parsed.rsa_signature.unwrap();
        assert_eq!(rsa.nonce, nonce);
        assert_eq!(rsa.signature, [1, 2, 3]);
        assert_eq!(parsed.ecdsa_signature, None);

        let ecdsa =
            r#"{"rsa_signature":null,"ecdsa_signature":{"nonce":"AA==","r":"AQ==","s":"Ag=="}}"#;
        let parsed: Response = serde_json::from_str(ecdsa).unwrap();
        let ecdsa = parsed.ecdsa_signature.unwrap();
        assert_eq!((ecdsa.nonce, ecdsa.r, ecdsa.s), (vec![0], vec![1], vec![2]));

        let payload = r#"{"certificates":["MIIB","AAE="]}"#;
        let parsed: AttestationData = serde_json::from_str(payload).unwrap();
        assert_eq!(parsed.certificates, [vec![0x30, 0x82, 0x01], vec![0, 1]]);

        // Go leaves missing keys and nulls at their zero values and ignores unknown keys.
        let parsed: AttestationData = serde_json::from_str(r#"{"certificates":null}"#).unwrap();
        assert!(parsed.certificates.is_empty());
        let parsed: Challenge = serde_json::from_str(r#"{"extra":1}"#).unwrap();
        assert_eq!(parsed, Challenge::default());
    }

    #[test]
    fn serialization_matches_go() {
        let challenge = Challenge {
            rsa_signature: Some(RsaChallenge {
                nonce: vec![0xff; 3],
            }),
            ecdsa_signature: None,
        };
        assert_eq!(
            String::from_utf8(to_json(&challenge)).unwrap(),
            r#"{"rsa_signature":{"nonce":"////"},"ecdsa_signature":null}"#
        );
        let response = Response {
            rsa_signature: None,
            ecdsa_signature: Some(EcdsaResponse {
                nonce: vec![0],
                r: vec![1],
                s: vec![2, 3],
            }),
        };
        assert_eq!(
            String::from_utf8(to_json(&response)).unwrap(),
            r#"{"rsa_signature":null,"ecdsa_signature":{"nonce":"AA==","r":"AQ==","s":"AgM="}}"#
        );
        assert_eq!(
            String::from_utf8(build_attestation_payload(&[vec![1], vec![2, 2]])).unwrap(),
            r#"{"certificates":["AQ==","AgI="]}"#
        );
    }

    #[test]
    fn unpadded_or_url_safe_base64_is_refused() {
        for bad in [
            r#"{"certificates":["AQ"]}"#,
            r#"{"certificates":["-_-_"]}"#,
            r#"{"certificates":[1]}"#,
        ] {
            assert!(
                matches!(
                    parse_json::<AttestationData>("payload", bad.as_bytes()),
                    Err(X509PopError::Json { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn serial_numbers_are_even_length_lowercase_hex() {
        assert_eq!(serial_hex(&[0x0a, 0x1b]).unwrap(), "0a1b");
        assert_eq!(serial_hex(&[0x00, 0xff, 0x01]).unwrap(), "ff01");
        assert_eq!(serial_hex(&[0x00]).unwrap(), "00");
        assert!(serial_hex(&[0x80]).is_err());
        assert!(serial_hex(&[]).is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    #[test]
    fn scalars_are_read_like_big_int_set_bytes() {
        assert_eq!(fixed_width_scalar(&[0, 0, 1], 4), Some(vec![0, 0, 0, 1]));
        assert_eq!(fixed_width_scalar(&[1, 2, 3, 4], 4), Some(vec![1, 2, 3, 4]));
        assert_eq!(
            fixed_width_scalar(&[0, 1, 2, 3, 4], 4),
            Some(vec![1, 2, 3, 4])
        );
        assert_eq!(fixed_width_scalar(&[1, 2, 3, 4, 5], 4), None);
        assert_eq!(fixed_width_scalar(&[0, 0], 4), None);
        assert_eq!(fixed_width_scalar(&[], 4), None);
    }

    #[test]
    fn der_signature_encoding() {
        assert_eq!(
            der_ecdsa_signature(&[0x01], &[0x80]).unwrap(),
            [0x30, 0x07, 0x02, 0x01, 0x01, 0x02, 0x02, 0x00, 0x80]
        );
    }

    #[test]
    fn mgf1_matches_its_definition() {
        let seed = b"seed";
        let out = mgf1_sha256(seed, 40);
        let first = ring::digest::digest(&ring::digest::SHA256, b"seed\0\0\0\0");
        let second = ring::digest::digest(&ring::digest::SHA256, b"seed\0\0\0\x01");
        assert_eq!(&out[..32], first.as_ref());
        assert_eq!(&out[32..], &second.as_ref()[..8]);
    }
}
