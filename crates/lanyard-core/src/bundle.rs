//! Trust bundles: the X.509 CA certificates and JWT signing keys of one trust domain, and their
//! SPIFFE bundle encoding as a JWK Set (SPIFFE Trust Domain and Bundle, checks B-1 to B-12).
//!
//! A bundle does not name its trust domain on the wire (B-9), so [`TrustBundle`] always carries
//! the pair `<trust domain, authorities>`. Every content change bumps the sequence number (B-3),
//! so a stored bundle and the JWKS published from it stay in step.

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry;
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::id::TrustDomain;
use crate::keys::{KeyPair, pem_encode};

/// The JWK `use` of an X.509 authority (a CA certificate).
pub const USE_X509_SVID: &str = "x509-svid";

/// The JWK `use` of a JWT authority (a JWT-SVID signing key).
pub const USE_JWT_SVID: &str = "jwt-svid";

/// The refresh interval to assume when a bundle carries no `spiffe_refresh_hint` (B-12).
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(5 * 60);

/// Why a bundle, certificate or public key was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The bundle is not well-formed JSON, or an object in it repeats a member name.
    #[error("bundle is not valid JSON: {0}")]
    Json(serde_json::Error),
    /// The bundle's top level is not a JSON object.
    #[error("bundle is not a JSON object")]
    NotAnObject,
    /// The bundle has no `keys` member (B-1). An empty array is fine; a missing one is not.
    #[error("bundle has no \"keys\" member")]
    MissingKeys,
    /// A top-level bundle member has the wrong type or an out-of-range value.
    #[error("bundle member {field:?} is invalid: {reason}")]
    InvalidField {
        /// The member's name.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry of `keys` with a known `use` and `kty` is malformed.
    #[error("bundle key {index} is invalid: {reason}")]
    InvalidKey {
        /// Position of the entry in `keys`.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An `x509-svid` entry does not carry exactly one certificate in `x5c`.
    #[error("bundle key {index} must have exactly one x5c certificate, found {count}")]
    X5cCount {
        /// Position of the entry in `keys`.
        index: usize,
        /// How many certificates it carries.
        count: usize,
    },
    /// Bytes that should be one DER X.509 certificate are not.
    #[error("invalid X.509 certificate: {0}")]
    InvalidCertificate(String),
    /// Bytes that should be a DER SubjectPublicKeyInfo of a supported key type are not.
    #[error("invalid or unsupported public key: {0}")]
    InvalidPublicKey(String),
    /// A JWT authority has an empty key ID (J-10 requires one).
    #[error("JWT authority key id must not be empty")]
    EmptyKeyId,
    /// Two different JWT authorities claim the same key ID.
    #[error("JWT authority key id {0:?} is already used by a different key")]
    KeyIdConflict(String),
    /// PEM input is malformed.
    #[error("invalid PEM: {0}")]
    Pem(String),
    /// PEM or DER input holds no certificate.
    #[error("no certificates found")]
    NoCertificates,
}

/// An X.509 authority: a CA certificate that X.509-SVIDs of the trust domain chain to.
#[derive(Clone, PartialEq, Eq)]
pub struct X509Authority {
    der: Vec<u8>,
    tainted: bool,
    key: PublicKeyMaterial,
}

impl X509Authority {
    /// Wraps one DER certificate, checking that it parses and that its key type can be
    /// published in a JWK (EC P-256/P-384/P-521, RSA or Ed25519).
    pub fn new(der: Vec<u8>) -> Result<Self, BundleError> {
        let key = {
            let (rest, cert) = X509Certificate::from_der(&der)
                .map_err(|e| BundleError::InvalidCertificate(e.to_string()))?;
            if !rest.is_empty() {
                return Err(BundleError::InvalidCertificate(
                    "trailing bytes after the certificate".to_owned(),
                ));
            }
            PublicKeyMaterial::from_spki(cert.public_key())?
        };
        Ok(Self {
            der,
            tainted: false,
            key,
        })
    }

    /// The same authority with its taint flag set as given.
    pub fn with_tainted(mut self, tainted: bool) -> Self {
        self.tainted = tainted;
        self
    }

    /// The CA certificate, DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// Whether the authority is tainted: still trusted, but due to be revoked, so holders of
    /// SVIDs signed by it should rotate now.
    pub fn is_tainted(&self) -> bool {
        self.tainted
    }

    fn jwk(&self) -> Map<String, Value> {
        let mut jwk = Map::new();
        jwk.insert("use".to_owned(), USE_X509_SVID.into());
        self.key.write_jwk_params(&mut jwk);
        jwk.insert(
            "x5c".to_owned(),
            Value::Array(vec![general_purpose::STANDARD.encode(&self.der).into()]),
        );
        jwk
    }
}

impl fmt::Debug for X509Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Authority")
            .field("der_len", &self.der.len())
            .field("key", &self.key.kind())
            .field("tainted", &self.tainted)
            .finish()
    }
}

/// A JWT authority: a public key, named by its key ID, that verifies JWT-SVIDs.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    key_id: String,
    public_key_der: Vec<u8>,
    expires_at: Option<SystemTime>,
    tainted: bool,
    key: PublicKeyMaterial,
}

impl JwtAuthority {
    /// Builds an authority from a key ID and a DER SubjectPublicKeyInfo.
    ///
    /// The key is kept in canonical DER (the form [`Self::public_key_der`] returns), which is
    /// byte-identical to what ring, rcgen and OpenSSL produce for the supported key types.
    pub fn new(
        key_id: impl Into<String>,
        public_key_der: &[u8],
        expires_at: Option<SystemTime>,
    ) -> Result<Self, BundleError> {
        let key_id = key_id.into();
        if key_id.is_empty() {
            return Err(BundleError::EmptyKeyId);
        }
        let key = PublicKeyMaterial::from_spki_der(public_key_der)?;
        Ok(Self::from_material(key_id, key, expires_at))
    }

    /// Builds the authority that verifies tokens signed by `key`.
    pub fn from_key_pair(
        key_id: impl Into<String>,
        key: &KeyPair,
        expires_at: Option<SystemTime>,
    ) -> Result<Self, BundleError> {
        Self::new(key_id, &key.public_key_der(), expires_at)
    }

    fn from_material(
        key_id: String,
        key: PublicKeyMaterial,
        expires_at: Option<SystemTime>,
    ) -> Self {
        Self {
            key_id,
            public_key_der: key.to_spki_der(),
            expires_at,
            tainted: false,
            key,
        }
    }

    /// The same authority with its taint flag set as given.
    pub fn with_tainted(mut self, tainted: bool) -> Self {
        self.tainted = tainted;
        self
    }

    /// The key ID (`kid`) that tokens name in their header.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> &[u8] {
        &self.public_key_der
    }

    /// When the key stops being trusted, if known. A JWKS does not carry this.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// Whether the authority is tainted (still trusted, due to be revoked).
    pub fn is_tainted(&self) -> bool {
        self.tainted
    }

    /// The bundle JWK for this key: `use` `jwt-svid`, `kid`, and `kty` with `crv`/`x`/`y` or
    /// `n`/`e`. An OIDC discovery document can reuse it with `use` set to `sig`.
    pub fn jwk(&self) -> Value {
        let mut jwk = Map::new();
        jwk.insert("use".to_owned(), USE_JWT_SVID.into());
        jwk.insert("kid".to_owned(), self.key_id.clone().into());
        self.key.write_jwk_params(&mut jwk);
        Value::Object(jwk)
    }

    /// The JWK an OIDC discovery provider publishes for this key (its `jwks_uri`), as SPIRE's
    /// oidc-discovery-provider does with `set_key_use`: `use` `sig`, `kid`, the key
    /// parameters, and `alg` — `ES256` for P-256, `ES384` for P-384, `RS256` for RSA of at
    /// least 2048 bits — left out for any other key, whose algorithm a relying party could
    /// not check.
    pub fn oidc_jwk(&self) -> Value {
        let mut jwk = Map::new();
        jwk.insert("use".to_owned(), "sig".into());
        jwk.insert("kid".to_owned(), self.key_id.clone().into());
        self.key.write_jwk_params(&mut jwk);
        if let Some(alg) = self.key.jws_algorithm() {
            jwk.insert("alg".to_owned(), alg.into());
        }
        Value::Object(jwk)
    }

    pub(crate) fn key_material(&self) -> &PublicKeyMaterial {
        &self.key
    }
}

impl fmt::Debug for JwtAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuthority")
            .field("key_id", &self.key_id)
            .field("key", &self.key.kind())
            .field("expires_at", &self.expires_at)
            .field("tainted", &self.tainted)
            .finish()
    }
}

/// The trust bundle of one trust domain: its X.509 and JWT authorities, a sequence number that
/// changes with every content change, and an optional refresh hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    x509_authorities: Vec<X509Authority>,
    jwt_authorities: Vec<JwtAuthority>,
    sequence_number: u64,
    refresh_hint: Option<Duration>,
}

impl TrustBundle {
    /// An empty bundle (no authorities, sequence number 0, no refresh hint).
    ///
    /// An empty bundle trusts nothing: every SVID of its trust domain is invalid (B-2).
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence_number: 0,
            refresh_hint: None,
        }
    }

    /// The trust domain the bundle belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificates, in insertion order.
    pub fn x509_authorities(&self) -> &[X509Authority] {
        &self.x509_authorities
    }

    /// The JWT signing keys, in insertion order.
    pub fn jwt_authorities(&self) -> &[JwtAuthority] {
        &self.jwt_authorities
    }

    /// The sequence number, bumped by every content change (B-3).
    pub fn sequence_number(&self) -> u64 {
        self.sequence_number
    }

    /// How often consumers should refresh the bundle, in whole seconds (B-4). Use
    /// [`DEFAULT_REFRESH_HINT`] when this is `None`.
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    /// Whether the bundle has no authorities at all.
    pub fn is_empty(&self) -> bool {
        self.x509_authorities.is_empty() && self.jwt_authorities.is_empty()
    }

    /// The JWT authority with key ID `key_id`.
    pub fn jwt_authority(&self, key_id: &str) -> Option<&JwtAuthority> {
        self.jwt_authorities.iter().find(|a| a.key_id == key_id)
    }

    /// The X.509 authority whose certificate is exactly `der`.
    pub fn x509_authority(&self, der: &[u8]) -> Option<&X509Authority> {
        self.x509_authorities.iter().find(|a| a.der == der)
    }

    /// Sets the sequence number, e.g. when restoring a stored bundle. Unlike the content
    /// setters this does not bump anything.
    pub fn set_sequence_number(&mut self, sequence_number: u64) {
        self.sequence_number = sequence_number;
    }

    /// Sets the refresh hint, truncated to whole seconds as the JWKS carries it. Returns whether
    /// it changed; a change bumps the sequence number.
    pub fn set_refresh_hint(&mut self, refresh_hint: Option<Duration>) -> bool {
        let refresh_hint = refresh_hint.map(whole_seconds);
        if self.refresh_hint == refresh_hint {
            return false;
        }
        self.refresh_hint = refresh_hint;
        self.bump();
        true
    }

    /// Adds a CA certificate. Returns `false`, changing nothing, if the same certificate is
    /// already present (whatever its taint flag).
    pub fn add_x509_authority(&mut self, authority: X509Authority) -> bool {
        if self.x509_authority(&authority.der).is_some() {
            return false;
        }
        self.x509_authorities.push(authority);
        self.bump();
        true
    }

    /// Removes the CA certificate that is exactly `der`. Returns whether one was removed.
    pub fn remove_x509_authority(&mut self, der: &[u8]) -> bool {
        let before = self.x509_authorities.len();
        self.x509_authorities.retain(|a| a.der != der);
        self.changed_if(self.x509_authorities.len() != before)
    }

    /// Marks the CA certificate `der` tainted. Returns whether anything changed.
    pub fn taint_x509_authority(&mut self, der: &[u8]) -> bool {
        let changed = match self.x509_authorities.iter_mut().find(|a| a.der == der) {
            Some(a) if !a.tainted => {
                a.tainted = true;
                true
            }
            _ => false,
        };
        self.changed_if(changed)
    }

    /// Adds a JWT authority.
    ///
    /// Returns `Ok(false)` if an identical authority is present. An authority with the same
    /// key ID and key but a different expiry or taint flag replaces it (`Ok(true)`). The same
    /// key ID with a different key is an error: validators pick keys by ID, so an ID must
    /// never name two keys.
    pub fn add_jwt_authority(&mut self, authority: JwtAuthority) -> Result<bool, BundleError> {
        match self
            .jwt_authorities
            .iter_mut()
            .find(|a| a.key_id == authority.key_id)
        {
            Some(existing) if existing.key != authority.key => {
                Err(BundleError::KeyIdConflict(authority.key_id))
            }
            Some(existing) if *existing == authority => Ok(false),
            Some(existing) => {
                *existing = authority;
                self.bump();
                Ok(true)
            }
            None => {
                self.jwt_authorities.push(authority);
                self.bump();
                Ok(true)
            }
        }
    }

    /// Removes the JWT authority with key ID `key_id`. Returns whether one was removed.
    pub fn remove_jwt_authority(&mut self, key_id: &str) -> bool {
        let before = self.jwt_authorities.len();
        self.jwt_authorities.retain(|a| a.key_id != key_id);
        self.changed_if(self.jwt_authorities.len() != before)
    }

    /// Marks the JWT authority `key_id` tainted. Returns whether anything changed.
    pub fn taint_jwt_authority(&mut self, key_id: &str) -> bool {
        let changed = match self.jwt_authorities.iter_mut().find(|a| a.key_id == key_id) {
            Some(a) if !a.tainted => {
                a.tainted = true;
                true
            }
            _ => false,
        };
        self.changed_if(changed)
    }

    /// Removes the JWT authorities whose `expires_at` is at or before `now`, returning how
    /// many were removed. Authorities without an expiry stay.
    pub fn remove_expired_jwt_authorities(&mut self, now: SystemTime) -> usize {
        let before = self.jwt_authorities.len();
        self.jwt_authorities
            .retain(|a| a.expires_at.is_none_or(|expires_at| expires_at > now));
        let removed = before - self.jwt_authorities.len();
        self.changed_if(removed > 0);
        removed
    }

    /// The SPIFFE bundle as a JWK Set:
    /// `{"keys":[…],"spiffe_sequence":N,"spiffe_refresh_hint":S}`.
    ///
    /// X.509 authorities come first (`use` `x509-svid`, no `kid`, `x5c` with the one standard
    /// base64 certificate, plus the CA key's parameters), then JWT authorities (`use`
    /// `jwt-svid`, `kid`, key parameters in unpadded base64url). `spiffe_refresh_hint` is left
    /// out when there is none. Taint flags and JWT key expiries are not part of the format.
    pub fn to_jwks_json(&self) -> String {
        self.document(self.all_jwks()).to_string()
    }

    /// Every authority's bundle JWK: X.509 first, then JWT.
    fn all_jwks(&self) -> Vec<Value> {
        self.x509_authorities
            .iter()
            .map(|a| Value::Object(a.jwk()))
            .chain(self.jwt_authorities.iter().map(JwtAuthority::jwk))
            .collect()
    }

    /// The document a SPIFFE bundle endpoint serves: [`Self::to_jwks_json`] with
    /// `spiffe_refresh_hint` set to `refresh_hint` (whole seconds) and the stored sequence
    /// number. The hint is a setting of the endpoint, not content of the bundle, so it does
    /// not move the sequence number (SPIRE's bundle endpoint overrides it the same way).
    pub fn to_endpoint_jwks_json(&self, refresh_hint: Duration) -> String {
        let mut doc = self.document(self.all_jwks());
        if let Value::Object(doc) = &mut doc {
            doc.insert(
                "spiffe_refresh_hint".to_owned(),
                whole_seconds(refresh_hint).as_secs().into(),
            );
        }
        doc.to_string()
    }

    /// The JWT authorities as the plain JWK Set an OIDC discovery provider serves at its
    /// `jwks_uri`: `{"keys":[…]}` with [`JwtAuthority::oidc_jwk`] for each, tainted ones
    /// included (they still verify until revoked, which removes them from the bundle), and
    /// nothing SPIFFE-specific.
    pub fn oidc_jwks_json(&self) -> String {
        let keys = self
            .jwt_authorities
            .iter()
            .map(JwtAuthority::oidc_jwk)
            .collect();
        let mut doc = Map::new();
        doc.insert("keys".to_owned(), Value::Array(keys));
        Value::Object(doc).to_string()
    }

    /// Only the JWT authorities, as the `{"keys":[…]}` JWK Set that the Workload API's
    /// `FetchJWTBundles` returns per trust domain (W-15: never keys of another `use`). Like
    /// SPIRE's, it carries no sequence number or refresh hint.
    pub fn jwt_only_jwks_json(&self) -> String {
        let keys = self.jwt_authorities.iter().map(JwtAuthority::jwk).collect();
        let mut doc = Map::new();
        doc.insert("keys".to_owned(), Value::Array(keys));
        Value::Object(doc).to_string()
    }

    /// The CA certificates as concatenated DER, the form of the Workload API's X.509 bundle
    /// fields (W-9, W-10).
    pub fn x509_authorities_der_concat(&self) -> Vec<u8> {
        self.x509_authorities
            .iter()
            .flat_map(|a| a.der.iter().copied())
            .collect()
    }

    /// The CA certificates as consecutive PEM `CERTIFICATE` blocks.
    pub fn x509_authorities_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|a| pem_encode("CERTIFICATE", &a.der))
            .collect()
    }

    /// Parses a SPIFFE bundle (a JWK Set) for `trust_domain`.
    ///
    /// Follows the bundle spec and go-spiffe:
    /// - the input must be one JSON object, and no object in it may repeat a member name;
    /// - `keys` is required and may be `[]` (B-1);
    /// - entries with a missing or unknown `use` (B-7), or a `kty` other than `EC`, `RSA` or
    ///   `OKP` (B-6), or a curve not known here, are ignored; other parameters are ignored too
    ///   (B-5);
    /// - an `x509-svid` entry must have exactly one certificate in `x5c`, whose key must match
    ///   the JWK's own key parameters;
    /// - a `jwt-svid` entry must have a non-empty `kid` (J-10); an exact duplicate is dropped,
    ///   the same `kid` with another key is an error;
    /// - `spiffe_sequence` is an unsigned 64-bit integer (0 when absent) and
    ///   `spiffe_refresh_hint` a non-negative number of seconds.
    ///
    /// The JWK Set carries no taint flags or key expiries, so the result has none: for a bundle
    /// without them, `from_jwks_json(td, to_jwks_json())` gives back an equal bundle.
    ///
    /// Callers fetching bundles from the network should cap the input size before calling.
    pub fn from_jwks_json(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        let doc = parse_json_strict(json).map_err(BundleError::Json)?;
        let Value::Object(doc) = doc else {
            return Err(BundleError::NotAnObject);
        };
        let keys = match doc.get("keys") {
            None => return Err(BundleError::MissingKeys),
            Some(Value::Array(keys)) => keys,
            Some(_) => {
                return Err(BundleError::InvalidField {
                    field: "keys",
                    reason: "not an array",
                });
            }
        };
        let mut bundle = Self::new(trust_domain);
        for (index, key) in keys.iter().enumerate() {
            bundle.add_jwk(index, key)?;
        }
        bundle.sequence_number = match doc.get("spiffe_sequence") {
            None => 0,
            Some(v) => v.as_u64().ok_or(BundleError::InvalidField {
                field: "spiffe_sequence",
                reason: "not an unsigned 64-bit integer",
            })?,
        };
        bundle.refresh_hint = match doc.get("spiffe_refresh_hint") {
            None => None,
            Some(v) => Some(Duration::from_secs(v.as_u64().ok_or(
                BundleError::InvalidField {
                    field: "spiffe_refresh_hint",
                    reason: "not a non-negative integer number of seconds",
                },
            )?)),
        };
        Ok(bundle)
    }

    /// A bundle of the X.509 authorities in PEM text: every `CERTIFICATE` block, in order,
    /// other blocks skipped. At least one certificate is required.
    pub fn from_pem_certificates(
        trust_domain: TrustDomain,
        pem: &str,
    ) -> Result<Self, BundleError> {
        let mut bundle = Self::new(trust_domain);
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| BundleError::Pem(e.to_string()))?;
            bundle.add_x509_authority(X509Authority::new(cert.to_vec())?);
        }
        bundle.finish_certificates()
    }

    /// A bundle of the X.509 authorities in concatenated DER (the Workload API's form). At
    /// least one certificate is required.
    pub fn from_x509_der_concat(
        trust_domain: TrustDomain,
        der: &[u8],
    ) -> Result<Self, BundleError> {
        let mut bundle = Self::new(trust_domain);
        let mut rest = der;
        while !rest.is_empty() {
            let (after, _) = X509Certificate::from_der(rest)
                .map_err(|e| BundleError::InvalidCertificate(e.to_string()))?;
            let consumed = rest.len() - after.len();
            let cert = rest.get(..consumed).unwrap_or_default();
            bundle.add_x509_authority(X509Authority::new(cert.to_vec())?);
            rest = after;
        }
        bundle.finish_certificates()
    }

    fn finish_certificates(mut self) -> Result<Self, BundleError> {
        if self.x509_authorities.is_empty() {
            return Err(BundleError::NoCertificates);
        }
        // A freshly loaded bundle starts at sequence 0, however many certificates it holds.
        self.sequence_number = 0;
        Ok(self)
    }

    fn add_jwk(&mut self, index: usize, key: &Value) -> Result<(), BundleError> {
        let invalid = |reason: &str| BundleError::InvalidKey {
            index,
            reason: reason.to_owned(),
        };
        let Value::Object(jwk) = key else {
            return Err(invalid("not a JSON object"));
        };
        let use_ = jwk.get("use").and_then(Value::as_str);
        if use_ != Some(USE_X509_SVID) && use_ != Some(USE_JWT_SVID) {
            return Ok(()); // B-7
        }
        let material = match PublicKeyMaterial::from_jwk(jwk) {
            Ok(None) => return Ok(()), // B-6
            Ok(Some(material)) => Ok(material),
            Err(reason) => Err(invalid(&reason)),
        };
        if use_ == Some(USE_X509_SVID) {
            // The certificate count first, as go-spiffe reports it.
            let x5c = match jwk.get("x5c") {
                Some(Value::Array(x5c)) => x5c,
                None => return Err(BundleError::X5cCount { index, count: 0 }),
                Some(_) => return Err(invalid("x5c is not an array")),
            };
            let [cert] = x5c.as_slice() else {
                return Err(BundleError::X5cCount {
                    index,
                    count: x5c.len(),
                });
            };
            let material = material?;
            let der = cert
                .as_str()
                .and_then(|c| STANDARD_INDIFFERENT.decode(c).ok())
                .ok_or_else(|| invalid("x5c entry is not standard base64"))?;
            let authority = X509Authority::new(der).map_err(|e| invalid(&e.to_string()))?;
            if authority.key != material {
                return Err(invalid("x5c certificate key does not match the JWK key"));
            }
            self.add_x509_authority(authority);
        } else {
            let key_id = match jwk.get("kid") {
                Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
                Some(Value::String(_)) | None => return Err(invalid("missing key id")),
                Some(_) => return Err(invalid("kid is not a string")),
            };
            self.add_jwt_authority(JwtAuthority::from_material(key_id, material?, None))?;
        }
        Ok(())
    }

    fn document(&self, keys: Vec<Value>) -> Value {
        let mut doc = Map::new();
        doc.insert("keys".to_owned(), Value::Array(keys));
        doc.insert("spiffe_sequence".to_owned(), self.sequence_number.into());
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".to_owned(), hint.as_secs().into());
        }
        Value::Object(doc)
    }

    fn bump(&mut self) {
        self.sequence_number = self.sequence_number.saturating_add(1);
    }

    fn changed_if(&mut self, changed: bool) -> bool {
        if changed {
            self.bump();
        }
        changed
    }
}

fn whole_seconds(d: Duration) -> Duration {
    // go-spiffe reads the hint as an int64; keep within that range.
    Duration::from_secs(d.as_secs().min(i64::MAX.unsigned_abs()))
}

/// Parses JSON into a [`Value`], rejecting any object that repeats a member name.
///
/// `serde_json` silently keeps the last of duplicate members; for security-relevant documents
/// (bundles, bundle maps under B-10, JOSE headers) an ambiguous document must be refused.
/// Nesting depth is limited by `serde_json`'s recursion limit.
pub fn parse_json_strict(json: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<StrictValue>(json).map(|v| v.0)
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = StrictValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<StrictValue, E> {
        Ok(StrictValue(
            serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_none<E: de::Error>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut values = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            values.push(v);
        }
        Ok(StrictValue(Value::Array(values)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
        let mut object = Map::new();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format_args!("duplicate member {key:?}")));
            }
            let StrictValue(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(StrictValue(Value::Object(object)))
    }
}

/// Base64url as JWK parameters use it. RFC 7518 says unpadded; go-jose also accepts padding,
/// and so does this.
const URL_SAFE_INDIFFERENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Standard base64 as `x5c` uses it, padded or not.
const STANDARD_INDIFFERENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A NIST curve a JWK `EC` key can be on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EcCurve {
    P256,
    P384,
    P521,
}

impl EcCurve {
    fn jwk_name(self) -> &'static str {
        match self {
            Self::P256 => "P-256",
            Self::P384 => "P-384",
            Self::P521 => "P-521",
        }
    }

    fn from_jwk_name(name: &str) -> Option<Self> {
        match name {
            "P-256" => Some(Self::P256),
            "P-384" => Some(Self::P384),
            "P-521" => Some(Self::P521),
            _ => None,
        }
    }

    /// Bytes per coordinate.
    fn coordinate_len(self) -> usize {
        match self {
            Self::P256 => 32,
            Self::P384 => 48,
            Self::P521 => 66,
        }
    }

    /// DER of the curve's OBJECT IDENTIFIER, tag and length included.
    fn oid_der(self) -> &'static [u8] {
        match self {
            // 1.2.840.10045.3.1.7
            Self::P256 => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            // 1.3.132.0.34
            Self::P384 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
            // 1.3.132.0.35
            Self::P521 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23],
        }
    }
}

/// DER of id-ecPublicKey (1.2.840.10045.2.1).
const OID_EC_PUBLIC_KEY_DER: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// DER of rsaEncryption (1.2.840.113549.1.1.1) followed by its NULL parameters.
const OID_RSA_ENCRYPTION_AND_NULL_DER: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// DER of id-Ed25519 (1.3.101.112).
const OID_ED25519_DER: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
const ED25519_KEY_LEN: usize = 32;

/// A public key reduced to what both its SPKI and its JWK are built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PublicKeyMaterial {
    /// `point` is the uncompressed `0x04‖X‖Y`.
    Ec {
        curve: EcCurve,
        point: Vec<u8>,
    },
    /// Big-endian modulus and exponent without leading zero bytes.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ed25519 {
        x: Vec<u8>,
    },
}

impl PublicKeyMaterial {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Ec { curve, .. } => curve.jwk_name(),
            Self::Rsa { .. } => "RSA",
            Self::Ed25519 { .. } => "Ed25519",
        }
    }

    fn from_spki_der(der: &[u8]) -> Result<Self, BundleError> {
        let (rest, spki) = SubjectPublicKeyInfo::from_der(der)
            .map_err(|e| BundleError::InvalidPublicKey(e.to_string()))?;
        if !rest.is_empty() {
            return Err(BundleError::InvalidPublicKey(
                "trailing bytes after the key".to_owned(),
            ));
        }
        Self::from_spki(&spki)
    }

    fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, BundleError> {
        let invalid = |reason: &str| BundleError::InvalidPublicKey(reason.to_owned());
        let algorithm = &spki.algorithm.algorithm;
        let data: &[u8] = &spki.subject_public_key.data;
        if *algorithm == oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve_oid = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or_else(|| invalid("EC key without a named curve"))?;
            let curve = if curve_oid == oid_registry::OID_EC_P256 {
                EcCurve::P256
            } else if curve_oid == oid_registry::OID_NIST_EC_P384 {
                EcCurve::P384
            } else if curve_oid == oid_registry::OID_NIST_EC_P521 {
                EcCurve::P521
            } else {
                return Err(invalid("EC key on an unsupported curve"));
            };
            if data.len() != 1 + 2 * curve.coordinate_len() || data.first() != Some(&0x04) {
                return Err(invalid("EC key is not an uncompressed point of its curve"));
            }
            Ok(Self::Ec {
                curve,
                point: data.to_vec(),
            })
        } else if *algorithm == oid_registry::OID_PKCS1_RSAENCRYPTION {
            let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed() else {
                return Err(invalid("malformed RSA public key"));
            };
            Self::rsa(rsa.modulus, rsa.exponent).map_err(|reason| invalid(&reason))
        } else if *algorithm == oid_registry::OID_SIG_ED25519 {
            if data.len() != ED25519_KEY_LEN {
                return Err(invalid("Ed25519 key is not 32 bytes"));
            }
            Ok(Self::Ed25519 { x: data.to_vec() })
        } else {
            Err(invalid(
                "unsupported key algorithm; expected EC, RSA or Ed25519",
            ))
        }
    }

    fn rsa(n: &[u8], e: &[u8]) -> Result<Self, String> {
        let n = strip_leading_zeros(n);
        let e = strip_leading_zeros(e);
        if n.is_empty() || e.is_empty() {
            return Err("RSA modulus and exponent must be positive".to_owned());
        }
        Ok(Self::Rsa {
            n: n.to_vec(),
            e: e.to_vec(),
        })
    }

    /// Canonical DER SubjectPublicKeyInfo.
    pub(crate) fn to_spki_der(&self) -> Vec<u8> {
        let mut algorithm = Vec::new();
        let mut bits = vec![0x00]; // no unused bits
        match self {
            Self::Ec { curve, point } => {
                algorithm.extend_from_slice(OID_EC_PUBLIC_KEY_DER);
                algorithm.extend_from_slice(curve.oid_der());
                bits.extend_from_slice(point);
            }
            Self::Rsa { n, e } => {
                algorithm.extend_from_slice(OID_RSA_ENCRYPTION_AND_NULL_DER);
                let mut integers = Vec::new();
                der_unsigned_integer(n, &mut integers);
                der_unsigned_integer(e, &mut integers);
                der_tlv(0x30, &integers, &mut bits);
            }
            Self::Ed25519 { x } => {
                algorithm.extend_from_slice(OID_ED25519_DER);
                bits.extend_from_slice(x);
            }
        }
        let mut content = Vec::new();
        der_tlv(0x30, &algorithm, &mut content);
        der_tlv(0x03, &bits, &mut content);
        let mut spki = Vec::new();
        der_tlv(0x30, &content, &mut spki);
        spki
    }

    /// The JWS algorithm a relying party should expect of this key (SPIRE's choice): none
    /// for P-521, Ed25519 or RSA under 2048 bits.
    fn jws_algorithm(&self) -> Option<&'static str> {
        match self {
            Self::Ec {
                curve: EcCurve::P256,
                ..
            } => Some("ES256"),
            Self::Ec {
                curve: EcCurve::P384,
                ..
            } => Some("ES384"),
            Self::Rsa { n, .. } if n.len() >= 256 => Some("RS256"),
            _ => None,
        }
    }

    fn write_jwk_params(&self, jwk: &mut Map<String, Value>) {
        let b64 = |bytes: &[u8]| Value::String(general_purpose::URL_SAFE_NO_PAD.encode(bytes));
        match self {
            Self::Ec { curve, point } => {
                let coordinates = point.get(1..).unwrap_or_default();
                let (x, y) = coordinates.split_at(coordinates.len() / 2);
                jwk.insert("kty".to_owned(), "EC".into());
                jwk.insert("crv".to_owned(), curve.jwk_name().into());
                jwk.insert("x".to_owned(), b64(x));
                jwk.insert("y".to_owned(), b64(y));
            }
            Self::Rsa { n, e } => {
                jwk.insert("kty".to_owned(), "RSA".into());
                jwk.insert("n".to_owned(), b64(n));
                jwk.insert("e".to_owned(), b64(e));
            }
            Self::Ed25519 { x } => {
                jwk.insert("kty".to_owned(), "OKP".into());
                jwk.insert("crv".to_owned(), "Ed25519".into());
                jwk.insert("x".to_owned(), b64(x));
            }
        }
    }

    /// The key of a JWK: `Ok(None)` when its `kty` or curve is unknown here (such an entry is
    /// ignored), `Err` when a known key type is malformed.
    fn from_jwk(jwk: &Map<String, Value>) -> Result<Option<Self>, String> {
        let param = |name: &str| -> Result<Vec<u8>, String> {
            let value = jwk
                .get(name)
                .ok_or_else(|| format!("missing {name:?} parameter"))?;
            value
                .as_str()
                .and_then(|s| URL_SAFE_INDIFFERENT.decode(s).ok())
                .ok_or_else(|| format!("{name:?} parameter is not base64url"))
        };
        match jwk.get("kty").and_then(Value::as_str) {
            Some("EC") => {
                let Some(curve) = jwk
                    .get("crv")
                    .and_then(Value::as_str)
                    .and_then(EcCurve::from_jwk_name)
                else {
                    return Ok(None);
                };
                let (x, y) = (param("x")?, param("y")?);
                if x.len() != curve.coordinate_len() || y.len() != curve.coordinate_len() {
                    return Err(format!(
                        "{} coordinates must be {} bytes long",
                        curve.jwk_name(),
                        curve.coordinate_len()
                    ));
                }
                let mut point = Vec::with_capacity(1 + x.len() + y.len());
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Ok(Some(Self::Ec { curve, point }))
            }
            Some("RSA") => Self::rsa(&param("n")?, &param("e")?).map(Some),
            Some("OKP") => {
                if jwk.get("crv").and_then(Value::as_str) != Some("Ed25519") {
                    return Ok(None);
                }
                let x = param("x")?;
                if x.len() != ED25519_KEY_LEN {
                    return Err("Ed25519 key must be 32 bytes long".to_owned());
                }
                Ok(Some(Self::Ed25519 { x }))
            }
            _ => Ok(None),
        }
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    bytes.get(first..).unwrap_or_default()
}

/// Appends a DER INTEGER holding the unsigned big-endian `magnitude`.
fn der_unsigned_integer(magnitude: &[u8], out: &mut Vec<u8>) {
    let magnitude = strip_leading_zeros(magnitude);
    let mut content = Vec::with_capacity(magnitude.len() + 1);
    if magnitude.first().is_none_or(|&b| b & 0x80 != 0) {
        content.push(0x00);
    }
    content.extend_from_slice(magnitude);
    der_tlv(0x02, &content, out);
}

/// Appends a DER tag-length-value.
fn der_tlv(tag: u8, content: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    match u8::try_from(content.len()) {
        Ok(len) if len < 0x80 => out.push(len),
        _ => {
            let len = content.len().to_be_bytes();
            let len = strip_leading_zeros(&len);
            // At most size_of::<usize>() bytes, so the count always fits in the low 7 bits.
            out.push(0x80 | u8::try_from(len.len()).unwrap_or(0x7f));
            out.extend_from_slice(len);
        }
    }
    out.extend_from_slice(content);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyType;

    #[test]
    fn hand_built_spki_matches_ring_and_rcgen() {
        for key_type in [KeyType::EcP256, KeyType::EcP384] {
            let key = KeyPair::generate(key_type).unwrap();
            let der = key.public_key_der();
            let material = PublicKeyMaterial::from_spki_der(&der).unwrap();
            assert_eq!(material.to_spki_der(), der);
            let mut jwk = Map::new();
            material.write_jwk_params(&mut jwk);
            assert_eq!(PublicKeyMaterial::from_jwk(&jwk).unwrap(), Some(material));
        }
    }

    #[test]
    fn der_lengths_use_the_short_and_long_forms() {
        let mut out = Vec::new();
        der_tlv(0x04, &[0; 0x7f], &mut out);
        assert_eq!(out.get(..2), Some(&[0x04, 0x7f][..]));
        out.clear();
        der_tlv(0x04, &[0; 0x80], &mut out);
        assert_eq!(out.get(..3), Some(&[0x04, 0x81, 0x80][..]));
        out.clear();
        der_tlv(0x04, &[0; 0x1234], &mut out);
        assert_eq!(out.get(..4), Some(&[0x04, 0x82, 0x12, 0x34][..]));
    }

    #[test]
    fn der_integers_are_minimal_and_positive() {
        let mut out = Vec::new();
        der_unsigned_integer(&[0x00, 0x00, 0x01, 0x00, 0x01], &mut out);
        assert_eq!(out, [0x02, 0x03, 0x01, 0x00, 0x01]);
        out.clear();
        der_unsigned_integer(&[0x80], &mut out);
        assert_eq!(out, [0x02, 0x02, 0x00, 0x80]);
        out.clear();
        der_unsigned_integer(&[], &mut out);
        assert_eq!(out, [0x02, 0x01, 0x00]);
    }

    #[test]
    fn rsa_spki_round_trips_through_the_parser() {
        // A made-up 2048-bit modulus is enough: nothing here does RSA arithmetic.
        let mut n = vec![0xc5; 256];
        n[255] = 0x01;
        let material = PublicKeyMaterial::rsa(&n, &[0x01, 0x00, 0x01]).unwrap();
        let der = material.to_spki_der();
        assert_eq!(PublicKeyMaterial::from_spki_der(&der).unwrap(), material);
    }

    #[test]
    fn strict_json_rejects_duplicate_members_at_any_depth() {
        assert!(parse_json_strict(br#"{"a":1,"b":[{"c":2}]}"#).is_ok());
        let top = parse_json_strict(br#"{"keys":[],"keys":[]}"#).unwrap_err();
        assert!(
            top.to_string().contains("duplicate member \"keys\""),
            "{top}"
        );
        assert!(parse_json_strict(br#"{"keys":[{"use":"a","use":"b"}]}"#).is_err());
        assert!(parse_json_strict(br#"{"a":1} trailing"#).is_err());
    }

    #[test]
    fn unknown_curves_and_key_types_are_not_errors() {
        let jwk = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(
            PublicKeyMaterial::from_jwk(&jwk(serde_json::json!({"kty":"oct","k":"AAAA"}))).unwrap(),
            None
        );
        assert_eq!(
            PublicKeyMaterial::from_jwk(&jwk(
                serde_json::json!({"kty":"EC","crv":"secp256k1","x":"AA","y":"AA"})
            ))
            .unwrap(),
            None
        );
        assert!(
            PublicKeyMaterial::from_jwk(&jwk(
                serde_json::json!({"kty":"EC","crv":"P-256","x":"AA","y":"AA"})
            ))
            .is_err()
        );
    }
}
