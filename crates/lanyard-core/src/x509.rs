//! X.509-SVIDs: signing authorities, CSRs, leaf minting and chain verification, following the
//! SPIFFE X509-SVID standard (rules) and SPIRE's certificate templates.
//!
//! Certificates are built with rcgen, parsed with x509-parser and path-validated with
//! rustls-webpki. Nothing here reads a clock: every time-dependent function takes `now`.
//!
//! Shapes follow SPIRE so that its agents and go-spiffe accept what Lanyard issues:
//! - a CA certificate carries the URI SAN `spiffe://<td>` (no path), `cA=true`, a critical
//!   keyUsage with keyCertSign and cRLSign, and a subject key identifier;
//! - a leaf carries exactly one URI SAN (its SPIFFE ID), subject `C=US, O=SPIRE` with the first
//!   DNS name as common name, `cA=false`, a critical keyUsage with digitalSignature,
//!   keyEncipherment and keyAgreement, EKU serverAuth and clientAuth, SKI and AKI;
//! - every certificate gets a random positive 128-bit serial and is backdated by
//!   [`BACKDATE`] to absorb clock skew; no certificate outlives its issuer.
//!
//! Key identifiers are computed as SPIRE does: SHA-1 over the subjectPublicKey bits
//! (RFC 5280 §4.2.1.2, method 1).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom as _, SystemRandom};
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
};
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::id::{IdError, SpiffeId, TrustDomain};
use crate::keys::KeyPair;

/// How far `NotBefore` is set before `now`, as SPIRE does, so that peers whose clocks run a
/// little behind still accept a fresh certificate.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Length of generated serial numbers in bytes (128 bits, as SPIRE).
pub const SERIAL_LEN: usize = 16;

/// The longest serial number, in bytes, that [`serial_decimal`] converts. RFC 5280 allows 20;
/// the slack accepts sloppy issuers without letting a hostile one make the conversion slow.
pub const MAX_SERIAL_LEN: usize = 64;
/// The largest CSR accepted, in bytes (as SPIRE, a few KiB): an EC or RSA-4096 key's CSR with
/// a SPIFFE ID and a few DNS names is well under 2 KiB.
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// The smallest RSA modulus accepted in a CSR or a leaf public key, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Errors from building, parsing or verifying X.509 certificates and CSRs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum X509Error {
    /// The bytes are not valid DER for the named structure.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The named structure is larger than accepted.
    #[error("{what} is {len} bytes; at most {max} are accepted")]
    TooLarge {
        /// What it is.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Valid DER for the named structure is followed by extra bytes.
    #[error("trailing bytes after {0}")]
    TrailingData(&'static str),
    /// The CSR's signature does not verify with the public key it carries.
    #[error("certificate signing request signature is invalid")]
    CsrSignature,
    /// The public key is not EC P-256, EC P-384 or RSA of at least [`MIN_RSA_BITS`] bits.
    #[error("unsupported public key; expected EC P-256, EC P-384 or RSA of at least 2048 bits")]
    UnsupportedKey,
    /// The signature algorithm is not ECDSA with SHA-256/384 or RSA with SHA-256/384/512.
    #[error("unsupported signature algorithm")]
    UnsupportedSignatureAlgorithm,
    /// A URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(#[from] IdError),
    /// The certificate does not have exactly one URI SAN.
    #[error("certificate has {0} URI SANs; an SVID has exactly one")]
    UriSanCount(usize),
    /// A leaf's SPIFFE ID has no path.
    #[error("leaf SPIFFE ID {0} has no path")]
    LeafIdIsRoot(String),
    /// A CA certificate's SPIFFE ID has a path.
    #[error("CA SPIFFE ID {0} has a path")]
    CaIdHasPath(String),
    /// A SPIFFE ID is not in the expected trust domain.
    #[error("SPIFFE ID {id} is not in trust domain {trust_domain}")]
    TrustDomainMismatch {
        /// The ID found.
        id: String,
        /// The trust domain expected.
        trust_domain: String,
    },
    /// A certificate used as an authority is not a CA.
    #[error("certificate is not a CA")]
    NotCa,
    /// A certificate used as an authority lacks keyCertSign.
    #[error("CA certificate key usage lacks keyCertSign")]
    MissingKeyCertSign,
    /// A CA certificate presented as an SVID leaf.
    #[error("a CA certificate cannot be used as an SVID")]
    CaAsLeaf,
    /// A leaf's key usage breaks.
    #[error("leaf key usage is invalid: {0}")]
    LeafKeyUsage(&'static str),
    /// The leaf's extended key usage permits neither TLS client nor server authentication.
    #[error("extended key usage allows neither clientAuth nor serverAuth")]
    ExtendedKeyUsage,
    /// The private key does not match the certificate's public key.
    #[error("private key does not match the certificate")]
    KeyMismatch,
    /// The CA's intermediate chain does not link up to the CA certificate.
    #[error("CA chain is invalid: {0}")]
    InvalidCaChain(&'static str),
    /// The CA certificate has no SPIFFE ID, so it cannot vouch for a trust domain.
    #[error("CA certificate has no SPIFFE ID")]
    CaWithoutTrustDomain,
    /// The issuing CA has expired at `now`.
    #[error("issuing CA has expired")]
    IssuerExpired,
    /// A TTL of zero was requested.
    #[error("ttl must be positive")]
    InvalidTtl,
    /// A time cannot be represented in a certificate.
    #[error("time is out of the range a certificate can hold")]
    TimeOutOfRange,
    /// A DNS name cannot go in a certificate.
    #[error("invalid DNS name {0:?}")]
    InvalidDnsName(String),
    /// The subject holds something the encoder cannot write (more than one value per attribute,
    /// or a non-ASCII country code).
    #[error("unsupported subject: {0}")]
    UnsupportedSubject(&'static str),
    /// The issuer's subject cannot be reproduced byte for byte as the issuer of a new
    /// certificate (multi-valued RDNs or repeated attribute types), so chains would not link.
    #[error("issuer name cannot be reproduced in issued certificates")]
    UnsupportedIssuerName,
    /// The serial number is longer than [`MAX_SERIAL_LEN`] bytes.
    #[error("serial number is {0} bytes long; the limit is 64")]
    SerialTooLong(usize),
    /// The certificate encoder failed.
    #[error("certificate encoding failed: {0}")]
    Encoding(String),
    /// No certificate was given to verify.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// No trust authority was given, or one is not a usable certificate.
    #[error("invalid or missing trust authorities")]
    BadAuthority,
    /// A certificate in the chain has expired at `now`.
    #[error("certificate has expired")]
    Expired,
    /// A certificate in the chain is not yet valid at `now`.
    #[error("certificate is not yet valid")]
    NotYetValid,
    /// The chain does not lead to any of the trust authorities.
    #[error("certificate is not signed by a trusted authority")]
    UnknownAuthority,
    /// Path validation failed for another reason.
    #[error("certificate chain is invalid: {0}")]
    ChainInvalid(String),
    /// The certificate is listed on its issuer's certificate revocation list.
    #[error("certificate has been revoked")]
    Revoked,
    /// A certificate revocation list is malformed.
    #[error("certificate revocation list is invalid: {0}")]
    BadCrl(String),
}

/// The subject of a CA certificate. The default is SPIRE's: `C=US, O=SPIFFE`.
///
/// Each attribute holds at most one value; more are refused with
/// [`X509Error::UnsupportedSubject`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSubject {
    /// Country names (`C`), two-letter codes.
    pub country: Vec<String>,
    /// Organization names (`O`).
    pub organization: Vec<String>,
    /// Common name (`CN`).
    pub common_name: Option<String>,
}

impl Default for CaSubject {
    fn default() -> Self {
        Self {
            country: vec!["US".to_owned()],
            organization: vec!["SPIFFE".to_owned()],
            common_name: None,
        }
    }
}

/// The subject of a leaf SVID, without its common name (which is the first DNS name).
/// The default is SPIRE's: `C=US, O=SPIRE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidSubject {
    /// Country names (`C`), two-letter codes.
    pub country: Vec<String>,
    /// Organization names (`O`).
    pub organization: Vec<String>,
}

impl Default for SvidSubject {
    fn default() -> Self {
        Self {
            country: vec!["US".to_owned()],
            organization: vec!["SPIRE".to_owned()],
        }
    }
}

/// What to put in a leaf X.509-SVID. Build with [`SvidParams::new`], then set fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SvidParams {
    /// The SVID's SPIFFE ID: non-root, in the issuing CA's trust domain.
    pub spiffe_id: SpiffeId,
    /// The subject public key as DER SubjectPublicKeyInfo.
    pub public_key_der: Vec<u8>,
    /// DNS SANs; the first is also the subject common name.
    pub dns_names: Vec<String>,
    /// Requested lifetime; the result is capped at the CA's `NotAfter`.
    pub ttl: Duration,
    /// Subject country and organization.
    pub subject: SvidSubject,
}

impl SvidParams {
    /// Parameters with no DNS names and SPIRE's default subject.
    pub fn new(spiffe_id: SpiffeId, public_key_der: Vec<u8>, ttl: Duration) -> Self {
        Self {
            spiffe_id,
            public_key_der,
            dns_names: Vec::new(),
            ttl,
            subject: SvidSubject::default(),
        }
    }
}

/// A minted X.509-SVID: the certificate chain to present, leaf first.
#[derive(Clone, PartialEq, Eq)]
pub struct X509Svid {
    spiffe_id: SpiffeId,
    cert_chain: Vec<Vec<u8>>,
    not_after: SystemTime,
    serial: String,
}

impl X509Svid {
    /// Rebuilds the view of an SVID from its chain (leaf first), e.g. one loaded from storage.
    ///
    /// Only the leaf is parsed: it must carry exactly one URI SAN holding a SPIFFE ID. This does
    /// not verify the chain; use [`verify_svid_chain`] for that.
    pub fn from_chain(cert_chain: Vec<Vec<u8>>) -> Result<Self, X509Error> {
        let leaf_der = cert_chain.first().ok_or(X509Error::EmptyChain)?;
        let leaf = parse_certificate(leaf_der)?;
        let spiffe_id = single_spiffe_id(&leaf)?;
        let (_, not_after) = validity(&leaf)?;
        let serial = serial_to_decimal(leaf.raw_serial())?;
        Ok(Self {
            spiffe_id,
            cert_chain,
            not_after,
            serial,
        })
    }

    /// The SPIFFE ID in the leaf.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The DER certificates, leaf first, then the intermediates up to (not including) the root.
    pub fn cert_chain(&self) -> &[Vec<u8>] {
        &self.cert_chain
    }

    /// The leaf certificate's DER.
    pub fn leaf_der(&self) -> &[u8] {
        self.cert_chain.first().map_or(&[], Vec::as_slice)
    }

    /// The chain as concatenated DER, as the Workload API's `x509_svid` field carries it.
    pub fn chain_concatenated_der(&self) -> Vec<u8> {
        self.cert_chain.concat()
    }

    /// The leaf's `NotAfter`.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number as a decimal string, as SPIRE compares serials.
    pub fn serial(&self) -> &str {
        &self.serial
    }
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("n_certs", &self.cert_chain.len())
            .finish()
    }
}

/// An X.509 signing authority: a CA certificate, its private key and the intermediates above it.
pub struct X509Ca {
    cert: Vec<u8>,
    key: KeyPair,
    chain: Vec<Vec<u8>>,
    not_after: SystemTime,
    trust_domain: Option<TrustDomain>,
    subject_key_id: Option<Vec<u8>>,
    self_signed: bool,
}

impl X509Ca {
    /// Builds an authority from its certificate, private key and the intermediates above it
    /// (issuer first, excluding the self-signed root; empty for a self-signed or a root-issued
    /// CA).
    ///
    /// Checks that the certificate is a CA with keyCertSign, that its SPIFFE ID, if
    /// it has one, has no path, that `key` matches it, and that each certificate in
    /// `chain` signed the one before it.
    pub fn new(cert_der: Vec<u8>, key: KeyPair, chain: Vec<Vec<u8>>) -> Result<Self, X509Error> {
        let cert = parse_certificate(&cert_der)?;
        check_ca_cert(&cert)?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(X509Error::KeyMismatch);
        }
        let spiffe_id = optional_spiffe_id(&cert)?;
        if let Some(id) = &spiffe_id
            && !id.is_trust_domain_id()
        {
            return Err(X509Error::CaIdHasPath(id.to_string()));
        }
        check_reproducible_name(&cert)?;
        let self_signed = is_self_signed(&cert);
        if self_signed && !chain.is_empty() {
            return Err(X509Error::InvalidCaChain(
                "a self-signed CA has no chain above it",
            ));
        }
        let mut child = cert.clone();
        for parent_der in &chain {
            let parent = parse_certificate(parent_der)?;
            check_ca_cert(&parent)?;
            if is_self_signed(&parent) {
                return Err(X509Error::InvalidCaChain(
                    "the chain must not include the root",
                ));
            }
            if child.issuer().as_raw() != parent.subject().as_raw()
                || child.verify_signature(Some(parent.public_key())).is_err()
            {
                return Err(X509Error::InvalidCaChain(
                    "a certificate is not signed by the next one",
                ));
            }
            child = parent;
        }
        let (_, not_after) = validity(&cert)?;
        let subject_key_id = subject_key_id(&cert)?;
        Ok(Self {
            cert: cert_der,
            key,
            chain,
            not_after,
            trust_domain: spiffe_id.map(|id| id.trust_domain()),
            subject_key_id,
            self_signed,
        })
    }

    /// Creates a self-signed root CA (see [`create_self_signed_ca`]) and wraps it.
    pub fn self_signed(
        trust_domain: &TrustDomain,
        key: KeyPair,
        subject: &CaSubject,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Self, X509Error> {
        let cert = create_self_signed_ca(trust_domain, &key, subject, now, ttl)?;
        Self::new(cert, key, Vec::new())
    }

    /// The CA certificate's DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }

    /// The CA's private key.
    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    /// The intermediates above this CA, issuer first, root excluded.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// The CA certificate's `NotAfter`; nothing it signs outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The authority's ID as SPIRE shows it: the lowercase hex of the CA certificate's
    /// subject key identifier, or its SHA-1 fingerprint when it has none.
    pub fn authority_id(&self) -> String {
        match &self.subject_key_id {
            Some(id) => hex_lower(id),
            None => fingerprint_sha1_hex(&self.cert),
        }
    }

    /// The trust domain named by the CA's URI SAN, if it has one.
    pub fn trust_domain(&self) -> Option<&TrustDomain> {
        self.trust_domain.as_ref()
    }

    /// Whether the CA certificate is its own issuer (a root).
    pub fn is_self_signed(&self) -> bool {
        self.self_signed
    }

    /// The certificates a certificate signed by this CA presents above itself: this CA's
    /// certificate and its chain, or nothing when this CA is a root. Pass it as `chain` to
    /// [`X509Ca::new`] for a CA made with [`create_intermediate_ca`].
    pub fn issued_chain(&self) -> Vec<Vec<u8>> {
        if self.self_signed {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.chain.len() + 1);
        out.push(self.cert.clone());
        out.extend(self.chain.iter().cloned());
        out
    }

    /// Signs a certificate revocation list (RFC 5280 §5, version 2) listing `revoked`, with
    /// CRL number `number`, `thisUpdate` `this_update` and `nextUpdate` `next_update`. The
    /// issuer is this CA's subject byte for byte and the authority key identifier its subject
    /// key identifier, so that verifiers (webpki, OpenSSL) pair it with the certificates this
    /// CA issued.
    pub fn sign_crl(
        &self,
        revoked: &[crate::revocation::RevokedSerial],
        number: u64,
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<Vec<u8>, X509Error> {
        let offset = |t: SystemTime| -> Result<time::OffsetDateTime, X509Error> {
            Ok(CertTime::from_unix(unix_seconds_floor(t)?)?.offset)
        };
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for entry in revoked {
            let bytes = crate::revocation::serial_bytes(&entry.serial)
                .map_err(|e| X509Error::BadCrl(e.to_string()))?;
            revoked_certs.push(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&bytes),
                revocation_time: offset(entry.revoked_at)?,
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: offset(this_update)?,
            next_update: offset(next_update)?,
            crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: match &self.subject_key_id {
                Some(id) => rcgen::KeyIdMethod::PreSpecified(id.clone()),
                None => rcgen::KeyIdMethod::Sha256,
            },
        };
        let issuer = rcgen::Issuer::from_ca_cert_der(
            &CertificateDer::from(self.cert.as_slice()),
            self.key.rcgen(),
        )
        .map_err(|_| X509Error::UnsupportedIssuerName)?;
        let der = params
            .signed_by(&issuer)
            .map_err(encoding_error)?
            .der()
            .to_vec();
        Ok(der)
    }

    /// Mints a leaf X.509-SVID (rules ).
    ///
    /// The SPIFFE ID must have a path and be in this CA's trust domain. `NotBefore` is
    /// `now - BACKDATE`; `NotAfter` is `now + ttl`, capped at this CA's `NotAfter`.
    pub fn mint_svid(&self, params: &SvidParams, now: SystemTime) -> Result<X509Svid, X509Error> {
        let trust_domain = self
            .trust_domain
            .as_ref()
            .ok_or(X509Error::CaWithoutTrustDomain)?;
        let id = &params.spiffe_id;
        if id.is_trust_domain_id() {
            return Err(X509Error::LeafIdIsRoot(id.to_string()));
        }
        if !id.is_member_of(trust_domain) {
            return Err(X509Error::TrustDomainMismatch {
                id: id.to_string(),
                trust_domain: trust_domain.to_string(),
            });
        }
        let spki = parse_supported_spki(&params.public_key_der)?;
        let (not_before, not_after) = self.validity_for(now, params.ttl)?;

        let mut dn = rcgen::DistinguishedName::new();
        push_attribute(&mut dn, rcgen::DnType::CountryName, &params.subject.country)?;
        push_attribute(
            &mut dn,
            rcgen::DnType::OrganizationName,
            &params.subject.organization,
        )?;
        if let Some(first) = params.dns_names.first() {
            dn.push(rcgen::DnType::CommonName, first.as_str());
        }

        let mut sans = vec![uri_san(id.as_str())?];
        for name in &params.dns_names {
            sans.push(dns_san(name)?);
        }

        let serial = random_serial()?;
        let mut cert_params = rcgen::CertificateParams::default();
        cert_params.not_before = not_before.offset;
        cert_params.not_after = not_after.offset;
        cert_params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        cert_params.subject_alt_names = sans;
        cert_params.distinguished_name = dn;
        cert_params.is_ca = rcgen::IsCa::ExplicitNoCa;
        cert_params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
            rcgen::KeyUsagePurpose::KeyAgreement,
        ];
        cert_params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        cert_params.use_authority_key_identifier_extension = self.subject_key_id.is_some();
        cert_params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(key_identifier(&spki));

        let leaf = self.sign(&cert_params, &params.public_key_der)?;
        let mut cert_chain = Vec::with_capacity(self.chain.len() + 2);
        cert_chain.push(leaf);
        cert_chain.extend(self.issued_chain());
        Ok(X509Svid {
            spiffe_id: id.clone(),
            cert_chain,
            not_after: not_after.system,
            serial: be_bytes_to_decimal(&serial),
        })
    }

    /// Verifies `csr_der` (see [`parse_csr`]) and mints an SVID for its public key.
    ///
    /// The names requested in the CSR are ignored, as SPIRE ignores them: the SVID carries
    /// `spiffe_id` and `dns_names`, which the caller has authorized.
    pub fn mint_svid_from_csr(
        &self,
        csr_der: &[u8],
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<X509Svid, X509Error> {
        let csr = parse_csr(csr_der)?;
        let mut params = SvidParams::new(spiffe_id.clone(), csr.public_key_der, ttl);
        params.dns_names = dns_names.to_vec();
        self.mint_svid(&params, now)
    }

    /// `NotBefore`/`NotAfter` for a certificate issued at `now` for `ttl`, capped at ours.
    fn validity_for(
        &self,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<(CertTime, CertTime), X509Error> {
        if ttl.is_zero() {
            return Err(X509Error::InvalidTtl);
        }
        let now_secs = unix_seconds_floor(now)?;
        let not_before = now_secs
            .checked_sub(BACKDATE.as_secs().cast_signed())
            .ok_or(X509Error::TimeOutOfRange)?;
        let wanted = unix_seconds_floor(now.checked_add(ttl).ok_or(X509Error::TimeOutOfRange)?)?;
        let cap = unix_seconds_floor(self.not_after)?;
        if cap <= now_secs {
            return Err(X509Error::IssuerExpired);
        }
        Ok((
            CertTime::from_unix(not_before)?,
            CertTime::from_unix(wanted.min(cap))?,
        ))
    }

    /// Signs `params` for `public_key_der` with this CA, checking that the result names this
    /// CA's subject byte for byte as its issuer.
    fn sign(
        &self,
        params: &rcgen::CertificateParams,
        public_key_der: &[u8],
    ) -> Result<Vec<u8>, X509Error> {
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(public_key_der)
            .map_err(|_| X509Error::UnsupportedKey)?;
        let issuer = rcgen::Issuer::from_ca_cert_der(
            &CertificateDer::from(self.cert.as_slice()),
            self.key.rcgen(),
        )
        .map_err(|_| X509Error::UnsupportedIssuerName)?;
        let der = params
            .signed_by(&public_key, &issuer)
            .map_err(encoding_error)?
            .der()
            .to_vec();
        let ca = parse_certificate(&self.cert)?;
        let issued = parse_certificate(&der)?;
        if issued.issuer().as_raw() != ca.subject().as_raw() {
            return Err(X509Error::UnsupportedIssuerName);
        }
        Ok(der)
    }
}

impl fmt::Debug for X509Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .field("self_signed", &self.self_signed)
            .field("n_chain", &self.chain.len())
            .field("key", &self.key)
            .finish()
    }
}

/// Creates a self-signed root CA certificate for `trust_domain`, returned as DER.
///
/// URI SAN `spiffe://<td>`, basicConstraints `cA=true` (critical), keyUsage keyCertSign and
/// cRLSign (critical), SKI, a random 128-bit serial, `NotBefore = now - BACKDATE`,
/// `NotAfter = now + ttl`.
pub fn create_self_signed_ca(
    trust_domain: &TrustDomain,
    key: &KeyPair,
    subject: &CaSubject,
    now: SystemTime,
    ttl: Duration,
) -> Result<Vec<u8>, X509Error> {
    if ttl.is_zero() {
        return Err(X509Error::InvalidTtl);
    }
    let now_secs = unix_seconds_floor(now)?;
    let not_before = CertTime::from_unix(
        now_secs
            .checked_sub(BACKDATE.as_secs().cast_signed())
            .ok_or(X509Error::TimeOutOfRange)?,
    )?;
    let not_after = CertTime::from_unix(unix_seconds_floor(
        now.checked_add(ttl).ok_or(X509Error::TimeOutOfRange)?,
    )?)?;
    let public_key_der = key.public_key_der();
    let spki = parse_supported_spki(&public_key_der)?;
    let params = ca_params(trust_domain, subject, not_before, not_after, &spki)?;
    let cert = params.self_signed(key.rcgen()).map_err(encoding_error)?;
    Ok(cert.der().to_vec())
}

/// Creates an intermediate CA certificate for `trust_domain` and the public key
/// `public_key_der` (DER SubjectPublicKeyInfo), signed by `parent`, returned as DER.
///
/// The same profile as [`create_self_signed_ca`], plus an authority key identifier, with
/// `NotAfter` capped at the parent's. A parent that has a trust domain must be in the same one.
/// Wrap the result with `X509Ca::new(der, key, parent.issued_chain())`.
pub fn create_intermediate_ca(
    trust_domain: &TrustDomain,
    public_key_der: &[u8],
    subject: &CaSubject,
    parent: &X509Ca,
    now: SystemTime,
    ttl: Duration,
) -> Result<Vec<u8>, X509Error> {
    if let Some(parent_td) = parent.trust_domain()
        && parent_td != trust_domain
    {
        return Err(X509Error::TrustDomainMismatch {
            id: trust_domain.id().to_string(),
            trust_domain: parent_td.to_string(),
        });
    }
    let spki = parse_supported_spki(public_key_der)?;
    let (not_before, not_after) = parent.validity_for(now, ttl)?;
    let mut params = ca_params(trust_domain, subject, not_before, not_after, &spki)?;
    params.use_authority_key_identifier_extension = parent.subject_key_id.is_some();
    parent.sign(&params, public_key_der)
}

/// Certificate parameters shared by root and intermediate CAs.
fn ca_params(
    trust_domain: &TrustDomain,
    subject: &CaSubject,
    not_before: CertTime,
    not_after: CertTime,
    spki: &SubjectPublicKeyInfo<'_>,
) -> Result<rcgen::CertificateParams, X509Error> {
    let mut dn = rcgen::DistinguishedName::new();
    push_attribute(&mut dn, rcgen::DnType::CountryName, &subject.country)?;
    push_attribute(
        &mut dn,
        rcgen::DnType::OrganizationName,
        &subject.organization,
    )?;
    if let Some(cn) = &subject.common_name {
        dn.push(rcgen::DnType::CommonName, cn.as_str());
    }
    let mut params = rcgen::CertificateParams::default();
    params.not_before = not_before.offset;
    params.not_after = not_after.offset;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()?));
    params.subject_alt_names = vec![uri_san(trust_domain.id().as_str())?];
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(key_identifier(spki));
    Ok(params)
}

/// A PKCS#10 CSR whose signature has been checked against the public key it carries.
///
/// Only [`parse_csr`] makes one, so holding one proves the requester owns the private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    public_key_der: Vec<u8>,
    uri_sans: Vec<String>,
    dns_names: Vec<String>,
}

impl VerifiedCsr {
    /// The requester's public key as DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> &[u8] {
        &self.public_key_der
    }

    /// The URI SANs requested, as written (not validated as SPIFFE IDs).
    pub fn uri_sans(&self) -> &[String] {
        &self.uri_sans
    }

    /// The DNS SANs requested.
    pub fn dns_names(&self) -> &[String] {
        &self.dns_names
    }
}

/// Parses a DER PKCS#10 CSR and verifies its signature.
///
/// Accepts EC P-256 and P-384 keys (ECDSA with SHA-256/384) and RSA keys of at least
/// [`MIN_RSA_BITS`] bits (PKCS#1 v1.5 with SHA-256/384/512, or PSS). Garbage, trailing bytes,
/// other key types and bad signatures are errors.
pub fn parse_csr(der: &[u8]) -> Result<VerifiedCsr, X509Error> {
    const WHAT: &str = "certificate signing request";
    if der.len() > MAX_CSR_LEN {
        return Err(X509Error::TooLarge {
            what: WHAT,
            len: der.len(),
            max: MAX_CSR_LEN,
        });
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|_| X509Error::Malformed(WHAT))?;
    if !rest.is_empty() {
        return Err(X509Error::TrailingData(WHAT));
    }
    let info = &csr.certification_request_info;
    check_supported_spki(&info.subject_pki)?;
    let algorithm = &csr.signature_algorithm.algorithm;
    let supported = [
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_PKCS1_RSASSAPSS,
    ];
    if !supported.contains(algorithm) {
        return Err(X509Error::UnsupportedSignatureAlgorithm);
    }
    csr.verify_signature()
        .map_err(|_| X509Error::CsrSignature)?;

    let mut uri_sans = Vec::new();
    let mut dns_names = Vec::new();
    if let Some(extensions) = csr.requested_extensions() {
        for extension in extensions {
            match extension {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(uri) => uri_sans.push((*uri).to_owned()),
                            GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                            _ => {}
                        }
                    }
                }
                ParsedExtension::ParseError { .. } => return Err(X509Error::Malformed(WHAT)),
                _ => {}
            }
        }
    }
    Ok(VerifiedCsr {
        public_key_der: info.subject_pki.raw.to_vec(),
        uri_sans,
        dns_names,
    })
}

/// Builds a DER PKCS#10 CSR signed by `key`, with subject `C=US, O=SPIRE` and, when given,
/// `spiffe_id` as its only URI SAN. This is what SPIRE agents send (agent CSRs carry no SAN).
pub fn build_csr(key: &KeyPair, spiffe_id: Option<&SpiffeId>) -> Result<Vec<u8>, X509Error> {
    let subject = SvidSubject::default();
    let mut dn = rcgen::DistinguishedName::new();
    push_attribute(&mut dn, rcgen::DnType::CountryName, &subject.country)?;
    push_attribute(
        &mut dn,
        rcgen::DnType::OrganizationName,
        &subject.organization,
    )?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = dn;
    if let Some(id) = spiffe_id {
        params.subject_alt_names = vec![uri_san(id.as_str())?];
    }
    let csr = params
        .serialize_request(key.rcgen())
        .map_err(encoding_error)?;
    Ok(csr.der().to_vec())
}

/// The result of [`verify_svid_chain`]: facts about a leaf that passed validation.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    spiffe_id: SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

impl VerifiedSvid {
    /// The leaf's SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The leaf's `NotBefore`.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The leaf's `NotAfter`.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number as a decimal string.
    pub fn serial(&self) -> &str {
        &self.serial
    }
}

impl fmt::Debug for VerifiedSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// Signature algorithms accepted in SVID chains: ECDSA P-256/P-384 and RSA (PKCS#1 v1.5, PSS).
static SVID_SIGNATURE_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
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

const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
const EKU_ANY: &[u8] = &[0x55, 0x1d, 0x25, 0x00];

/// The EKU policy for SVIDs: no EKU extension, or one that allows clientAuth, serverAuth or
/// anyExtendedKeyUsage.
///
/// An SVID authenticates both ends of mutual TLS and SPIFFE requires both purposes in every
/// SVID, so one verifier serves both roles. go-spiffe ignores EKU entirely
/// (`ExtKeyUsageAny`); this is only slightly stricter, refusing certificates whose EKU is
/// limited to unrelated purposes such as code signing.
#[derive(Debug, Clone, Copy)]
struct SvidEkuPolicy;

impl webpki::ExtendedKeyUsageValidator for SvidEkuPolicy {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let accepted = [
            webpki::KeyPurposeId::new(EKU_CLIENT_AUTH),
            webpki::KeyPurposeId::new(EKU_SERVER_AUTH),
            webpki::KeyPurposeId::new(EKU_ANY),
        ];
        let mut present = Vec::new();
        for purpose in iter {
            let purpose = purpose?;
            if accepted.contains(&purpose) {
                return Ok(());
            }
            present.push(purpose.to_decoded_oid());
        }
        if present.is_empty() {
            return Ok(());
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(
            webpki::RequiredEkuNotFoundContext {
                required: webpki::KeyUsage::client_auth(),
                present,
            },
        ))
    }
}

/// Verifies an X.509-SVID chain (leaf first, then intermediates) against the X.509
/// authorities (DER root certificates) of the SVID's own trust domain, `trust_domain`.
///
/// This is RFC 5280 path validation (rustls-webpki) at `now`, followed by the SPIFFE leaf
/// checks: the leaf is not a CA, its key usage has digitalSignature and neither
/// keyCertSign nor cRLSign, it has exactly one URI SAN, which is a SPIFFE ID with a path in
/// `trust_domain`. Like go-spiffe, every intermediate on the validated path must have
/// keyCertSign. EKU: see the private `SvidEkuPolicy` — absent, or allowing clientAuth or
/// serverAuth.
pub fn verify_svid_chain<C, A>(
    chain: &[C],
    trust_domain: &TrustDomain,
    authorities: &[A],
    now: SystemTime,
) -> Result<VerifiedSvid, X509Error>
where
    C: AsRef<[u8]>,
    A: AsRef<[u8]>,
{
    verify_svid_chain_with_crls::<C, A, &[u8]>(chain, trust_domain, authorities, &[], now)
}

/// [`verify_svid_chain`], and then refuses the chain when a certificate on it is listed on a
/// CRL (DER) of its issuer among `crls` ([`X509Error::Revoked`]).
///
/// A CRL counts only for the issuer whose key signed it; a certificate whose issuer has no
/// CRL here is not refused for that, and a CRL past its `nextUpdate` still refuses what it
/// lists: a verifier cut off from fresh lists keeps the revocations it knows rather than
/// refusing every peer. A malformed CRL is an error ([`X509Error::BadCrl`]), since the
/// caller's source of revocations is broken.
pub fn verify_svid_chain_with_crls<C, A, R>(
    chain: &[C],
    trust_domain: &TrustDomain,
    authorities: &[A],
    crls: &[R],
    now: SystemTime,
) -> Result<VerifiedSvid, X509Error>
where
    C: AsRef<[u8]>,
    A: AsRef<[u8]>,
    R: AsRef<[u8]>,
{
    let leaf_der = chain.first().ok_or(X509Error::EmptyChain)?.as_ref();
    if authorities.is_empty() {
        return Err(X509Error::BadAuthority);
    }
    let authority_ders: Vec<CertificateDer<'_>> = authorities
        .iter()
        .map(|a| CertificateDer::from(a.as_ref()))
        .collect();
    let anchors = authority_ders
        .iter()
        .map(|der| webpki::anchor_from_trusted_cert(der).map_err(|_| X509Error::BadAuthority))
        .collect::<Result<Vec<_>, _>>()?;
    let intermediates: Vec<CertificateDer<'_>> = chain
        .iter()
        .skip(1)
        .map(|c| CertificateDer::from(c.as_ref()))
        .collect();
    let time = UnixTime::since_unix_epoch(
        now.duration_since(UNIX_EPOCH)
            .map_err(|_| X509Error::TimeOutOfRange)?,
    );

    let leaf_cert_der = CertificateDer::from(leaf_der);
    let end_entity = webpki::EndEntityCert::try_from(&leaf_cert_der).map_err(map_webpki_error)?;
    let path = end_entity
        .verify_for_usage(
            SVID_SIGNATURE_ALGORITHMS,
            &anchors,
            &intermediates,
            time,
            SvidEkuPolicy,
            None,
            None,
        )
        .map_err(map_webpki_error)?;
    let intermediate_ders: Vec<Vec<u8>> = path
        .intermediate_certificates()
        .map(|intermediate| intermediate.der().to_vec())
        .collect();
    let mut on_path = vec![parse_certificate(leaf_der)?];
    for der in &intermediate_ders {
        let cert = parse_certificate(der)?;
        check_ca_cert(&cert)?;
        on_path.push(cert);
    }
    if !crls.is_empty() {
        check_crls(&on_path, authorities, crls)?;
    }

    let leaf = parse_certificate(leaf_der)?;
    let spiffe_id = check_leaf(&leaf, trust_domain)?;
    let (not_before, not_after) = validity(&leaf)?;
    Ok(VerifiedSvid {
        spiffe_id,
        not_before,
        not_after,
        serial: serial_to_decimal(leaf.raw_serial())?,
    })
}

/// Refuses the validated path `on_path` (leaf first) when a certificate on it is listed on a CRL
/// signed by its issuer: the next certificate on the path or, for the last, the authority that
/// signed it. CRLs are paired with issuers by name and signature, not by name alone, since CAs
/// commonly share a subject (every SPIRE and Lanyard CA of a trust domain is `C=US, O=SPIFFE`).
fn check_crls<A, R>(
    on_path: &[X509Certificate<'_>],
    authorities: &[A],
    crls: &[R],
) -> Result<(), X509Error>
where
    A: AsRef<[u8]>,
    R: AsRef<[u8]>,
{
    let parsed = crls
        .iter()
        .map(|der| {
            let (rest, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref())
                    .map_err(|e| X509Error::BadCrl(e.to_string()))?;
            if !rest.is_empty() {
                return Err(X509Error::BadCrl("trailing bytes".into()));
            }
            Ok(crl)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let anchors = authorities
        .iter()
        .filter_map(|der| parse_certificate(der.as_ref()).ok())
        .collect::<Vec<_>>();
    for (i, cert) in on_path.iter().enumerate() {
        let issuer = match on_path.get(i + 1) {
            Some(next) => Some(next),
            None => anchors.iter().find(|anchor| {
                anchor.subject().as_raw() == cert.issuer().as_raw()
                    && cert.verify_signature(Some(anchor.public_key())).is_ok()
            }),
        };
        let Some(issuer) = issuer else { continue };
        let listed = parsed.iter().any(|crl| {
            crl.issuer().as_raw() == issuer.subject().as_raw()
                && crl.verify_signature(issuer.public_key()).is_ok()
                && crl
                    .iter_revoked_certificates()
                    .any(|revoked| same_serial(revoked.raw_serial(), cert.raw_serial()))
        });
        if listed {
            return Err(X509Error::Revoked);
        }
    }
    Ok(())
}

/// Two DER INTEGER contents denote the same serial (leading zero octets aside).
fn same_serial(a: &[u8], b: &[u8]) -> bool {
    let trim = |s: &[u8]| -> Vec<u8> {
        let start = s.iter().position(|&b| b != 0).unwrap_or(s.len());
        s[start..].to_vec()
    };
    trim(a) == trim(b)
}

fn map_webpki_error(error: webpki::Error) -> X509Error {
    match error {
        webpki::Error::CertExpired { .. } => X509Error::Expired,
        webpki::Error::CertNotValidYet { .. } => X509Error::NotYetValid,
        // CAs commonly share a subject (SPIRE's are all `C=US, O=SPIFFE`), so a foreign
        // issuer is usually found by name and then fails the signature check.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            X509Error::UnknownAuthority
        }
        webpki::Error::CaUsedAsEndEntity => X509Error::CaAsLeaf,
        webpki::Error::RequiredEkuNotFoundContext(_) => X509Error::ExtendedKeyUsage,
        other => X509Error::ChainInvalid(other.to_string()),
    }
}

/// The SPIFFE leaf checks of on a parsed certificate.
fn check_leaf(
    leaf: &X509Certificate<'_>,
    trust_domain: &TrustDomain,
) -> Result<SpiffeId, X509Error> {
    let constraints = leaf
        .basic_constraints()
        .map_err(|_| X509Error::Malformed("basic constraints"))?;
    if constraints.is_some_and(|bc| bc.value.ca) {
        return Err(X509Error::CaAsLeaf);
    }
    let key_usage = leaf
        .key_usage()
        .map_err(|_| X509Error::Malformed("key usage"))?
        .ok_or(X509Error::LeafKeyUsage("keyUsage extension is missing"))?;
    if key_usage.value.key_cert_sign() || key_usage.value.crl_sign() {
        return Err(X509Error::LeafKeyUsage("keyCertSign or cRLSign is set"));
    }
    if !key_usage.value.digital_signature() {
        return Err(X509Error::LeafKeyUsage("digitalSignature is not set"));
    }
    let spiffe_id = single_spiffe_id(leaf)?;
    if spiffe_id.is_trust_domain_id() {
        return Err(X509Error::LeafIdIsRoot(spiffe_id.to_string()));
    }
    if !spiffe_id.is_member_of(trust_domain) {
        return Err(X509Error::TrustDomainMismatch {
            id: spiffe_id.to_string(),
            trust_domain: trust_domain.to_string(),
        });
    }
    Ok(spiffe_id)
}

/// The SPIFFE ID of a certificate: its one URI SAN, parsed strictly. Works for CA
/// certificates too, whose ID has no path.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, X509Error> {
    single_spiffe_id(&parse_certificate(der)?)
}

/// A certificate's SPIFFE ID, serial number in decimal ([`serial_decimal`]) and `NotAfter`,
/// from one parse: what a server needs of a verified client SVID.
pub fn svid_identity(der: &[u8]) -> Result<(SpiffeId, String, SystemTime), X509Error> {
    let cert = parse_certificate(der)?;
    let id = single_spiffe_id(&cert)?;
    let serial = serial_to_decimal(cert.raw_serial())?;
    let (_, not_after) = validity(&cert)?;
    Ok((id, serial, not_after))
}

/// The certificate's `NotBefore` and `NotAfter`.
pub fn validity_of(der: &[u8]) -> Result<(SystemTime, SystemTime), X509Error> {
    validity(&parse_certificate(der)?)
}

/// Whether the certificate has basicConstraints `cA=true`.
pub fn is_ca(der: &[u8]) -> Result<bool, X509Error> {
    let cert = parse_certificate(der)?;
    let constraints = cert
        .basic_constraints()
        .map_err(|_| X509Error::Malformed("basic constraints"))?;
    Ok(constraints.is_some_and(|bc| bc.value.ca))
}

/// The certificate's serial number as a decimal string, as Go's `big.Int.String()` prints it
/// (SPIRE compares agent serials this way). A negative serial gets a leading `-`.
pub fn serial_decimal(der: &[u8]) -> Result<String, X509Error> {
    serial_to_decimal(parse_certificate(der)?.raw_serial())
}

/// The ID of the CA certificate `der` as an authority, as [`X509Ca::authority_id`] gives it:
/// its subject key identifier in lowercase hex, or its SHA-1 fingerprint when it has none.
pub fn authority_id_of(der: &[u8]) -> Result<String, X509Error> {
    Ok(subject_key_id_hex(der)?.unwrap_or_else(|| fingerprint_sha1_hex(der)))
}

/// Lowercase hex SHA-1 of the certificate's DER: SPIRE's x509pop fingerprint (the last
/// segment of an x509pop agent ID).
pub fn fingerprint_sha1_hex(der: &[u8]) -> String {
    hex_lower(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref())
}

/// The certificate's subject key identifier as lowercase hex (SPIRE's authority ID), or
/// `None` when it has no SKI extension.
pub fn subject_key_id_hex(der: &[u8]) -> Result<Option<String>, X509Error> {
    Ok(subject_key_id(&parse_certificate(der)?)?.map(|id| hex_lower(&id)))
}

/// The lowercase hex of a certificate's authority key identifier (its issuer's subject key
/// ID), if it has one.
pub fn authority_key_id_hex(der: &[u8]) -> Result<Option<String>, X509Error> {
    let cert = parse_certificate(der)?;
    let extension = cert
        .get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
        .map_err(|_| X509Error::Malformed("authority key identifier"))?;
    match extension.map(|ext| ext.parsed_extension()) {
        Some(ParsedExtension::AuthorityKeyIdentifier(aki)) => {
            Ok(aki.key_identifier.as_ref().map(|id| hex_lower(id.0)))
        }
        None => Ok(None),
        Some(_) => Err(X509Error::Malformed("authority key identifier")),
    }
}

/// Converts a big-endian unsigned integer to decimal, without a bignum library.
///
/// Repeated multiply-and-add in base 10^9 limbs: quadratic, fine for serial-sized input.
pub(crate) fn be_bytes_to_decimal(bytes: &[u8]) -> String {
    const LIMB: u64 = 1_000_000_000;
    // Little-endian base-10^9 limbs.
    let mut limbs: Vec<u32> = Vec::with_capacity(bytes.len() / 3 + 1);
    for &byte in bytes {
        let mut carry = u64::from(byte);
        for limb in &mut limbs {
            let value = u64::from(*limb) * 256 + carry;
            // `value % LIMB < 10^9 < 2^32` and `value / LIMB < 2^32`, so both fit.
            *limb = u32::try_from(value % LIMB).unwrap_or(0);
            carry = value / LIMB;
        }
        while carry > 0 {
            limbs.push(u32::try_from(carry % LIMB).unwrap_or(0));
            carry /= LIMB;
        }
    }
    let mut out = String::with_capacity(limbs.len() * 9 + 1);
    let mut iter = limbs.iter().rev();
    match iter.next() {
        None => out.push('0'),
        Some(top) => out.push_str(&top.to_string()),
    }
    for limb in iter {
        out.push_str(&format!("{limb:09}"));
    }
    out
}

/// Decimal form of the content octets of a DER INTEGER (two's complement, big-endian).
fn serial_to_decimal(raw: &[u8]) -> Result<String, X509Error> {
    if raw.len() > MAX_SERIAL_LEN {
        return Err(X509Error::SerialTooLong(raw.len()));
    }
    let negative = raw.first().is_some_and(|b| b & 0x80 != 0);
    if !negative {
        return Ok(be_bytes_to_decimal(raw));
    }
    // Magnitude of a negative two's complement value: invert and add one.
    let mut magnitude: Vec<u8> = raw.iter().map(|b| !b).collect();
    for byte in magnitude.iter_mut().rev() {
        let (sum, overflow) = byte.overflowing_add(1);
        *byte = sum;
        if !overflow {
            break;
        }
    }
    Ok(format!("-{}", be_bytes_to_decimal(&magnitude)))
}

fn hex_lower(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// A random positive serial of [`SERIAL_LEN`] bytes. rcgen encodes it as an unsigned INTEGER
/// (a leading zero byte is added when the top bit is set).
fn random_serial() -> Result<[u8; SERIAL_LEN], X509Error> {
    let rng = SystemRandom::new();
    let mut serial = [0u8; SERIAL_LEN];
    loop {
        rng.fill(&mut serial)
            .map_err(|_| X509Error::Encoding("random number generator failed".to_owned()))?;
        // Zero is not a valid serial; the chance is 2^-128, but be correct.
        if serial.iter().any(|&b| b != 0) {
            return Ok(serial);
        }
    }
}

/// SHA-1 of the subjectPublicKey bits, as SPIRE and Go compute key identifiers.
fn key_identifier(spki: &SubjectPublicKeyInfo<'_>) -> Vec<u8> {
    ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        spki.subject_public_key.data.as_ref(),
    )
    .as_ref()
    .to_vec()
}

/// Issued by itself and signed by its own key. Names alone are not enough: SPIRE gives every
/// CA, root or intermediate, the same subject.
fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw() && cert.verify_signature(None).is_ok()
}

fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>, X509Error> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|_| X509Error::Malformed("certificate"))?;
    if !rest.is_empty() {
        return Err(X509Error::TrailingData("certificate"));
    }
    Ok(cert)
}

/// Parses a DER SubjectPublicKeyInfo and checks it is a supported key type.
fn parse_supported_spki(der: &[u8]) -> Result<SubjectPublicKeyInfo<'_>, X509Error> {
    let (rest, spki) =
        SubjectPublicKeyInfo::from_der(der).map_err(|_| X509Error::Malformed("public key"))?;
    if !rest.is_empty() {
        return Err(X509Error::TrailingData("public key"));
    }
    check_supported_spki(&spki)?;
    Ok(spki)
}

/// EC P-256, EC P-384, or RSA with a modulus of at least [`MIN_RSA_BITS`].
fn check_supported_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<(), X509Error> {
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or(X509Error::UnsupportedKey)?;
        if curve == OID_EC_P256 || curve == OID_NIST_EC_P384 {
            return Ok(());
        }
        return Err(X509Error::UnsupportedKey);
    }
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(X509Error::UnsupportedKey);
        };
        let modulus = rsa.modulus;
        let significant = modulus
            .iter()
            .position(|&b| b != 0)
            .map_or(0, |start| modulus.len() - start);
        if significant * 8 >= MIN_RSA_BITS {
            return Ok(());
        }
    }
    Err(X509Error::UnsupportedKey)
}

/// Requires `cA=true` and a keyUsage with keyCertSign (go-spiffe requires both on every
/// signing certificate).
fn check_ca_cert(cert: &X509Certificate<'_>) -> Result<(), X509Error> {
    let constraints = cert
        .basic_constraints()
        .map_err(|_| X509Error::Malformed("basic constraints"))?;
    if !constraints.is_some_and(|bc| bc.value.ca) {
        return Err(X509Error::NotCa);
    }
    let key_usage = cert
        .key_usage()
        .map_err(|_| X509Error::Malformed("key usage"))?;
    if !key_usage.is_some_and(|ku| ku.value.key_cert_sign()) {
        return Err(X509Error::MissingKeyCertSign);
    }
    Ok(())
}

/// Refuses subjects that rcgen cannot re-encode identically as an issuer name: rcgen keeps
/// one value per attribute type and one attribute per RDN.
fn check_reproducible_name(cert: &X509Certificate<'_>) -> Result<(), X509Error> {
    let mut seen = Vec::new();
    for rdn in cert.subject().iter() {
        let mut attributes = rdn.iter();
        let (Some(attribute), None) = (attributes.next(), attributes.next()) else {
            return Err(X509Error::UnsupportedIssuerName);
        };
        let oid = attribute.attr_type();
        if seen.contains(&oid) {
            return Err(X509Error::UnsupportedIssuerName);
        }
        seen.push(oid);
    }
    Ok(())
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, X509Error> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| X509Error::Malformed("subject alternative name"))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Exactly one URI SAN, parsed as a SPIFFE ID.
fn single_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, X509Error> {
    match uri_sans(cert)?.as_slice() {
        [uri] => Ok(uri.parse()?),
        other => Err(X509Error::UriSanCount(other.len())),
    }
}

/// No URI SAN gives `None`; one must be a SPIFFE ID; more are an error.
fn optional_spiffe_id(cert: &X509Certificate<'_>) -> Result<Option<SpiffeId>, X509Error> {
    match uri_sans(cert)?.as_slice() {
        [] => Ok(None),
        [uri] => Ok(Some(uri.parse()?)),
        other => Err(X509Error::UriSanCount(other.len())),
    }
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Result<Option<Vec<u8>>, X509Error> {
    let extension = cert
        .get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
        .map_err(|_| X509Error::Malformed("subject key identifier"))?;
    match extension.map(|ext| ext.parsed_extension()) {
        None => Ok(None),
        Some(ParsedExtension::SubjectKeyIdentifier(id)) => Ok(Some(id.0.to_vec())),
        Some(_) => Err(X509Error::Malformed("subject key identifier")),
    }
}

fn validity(cert: &X509Certificate<'_>) -> Result<(SystemTime, SystemTime), X509Error> {
    let validity = cert.validity();
    Ok((
        system_time_from_unix(validity.not_before.timestamp())?,
        system_time_from_unix(validity.not_after.timestamp())?,
    ))
}

/// Adds `values` (at most one) under `ty`. Countries are PrintableString, as Go writes them.
fn push_attribute(
    dn: &mut rcgen::DistinguishedName,
    ty: rcgen::DnType,
    values: &[String],
) -> Result<(), X509Error> {
    match values {
        [] => Ok(()),
        [value] => {
            if ty == rcgen::DnType::CountryName {
                let printable = rcgen::string::PrintableString::try_from(value.as_str())
                    .map_err(|_| X509Error::UnsupportedSubject("country is not printable"))?;
                dn.push(ty, rcgen::DnValue::PrintableString(printable));
            } else {
                dn.push(ty, value.as_str());
            }
            Ok(())
        }
        _ => Err(X509Error::UnsupportedSubject(
            "at most one value per attribute",
        )),
    }
}

fn uri_san(uri: &str) -> Result<rcgen::SanType, X509Error> {
    rcgen::string::Ia5String::try_from(uri)
        .map(rcgen::SanType::URI)
        .map_err(|e| X509Error::Encoding(e.to_string()))
}

fn dns_san(name: &str) -> Result<rcgen::SanType, X509Error> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(X509Error::InvalidDnsName(name.to_owned()));
    }
    rcgen::string::Ia5String::try_from(name)
        .map(rcgen::SanType::DnsName)
        .map_err(|_| X509Error::InvalidDnsName(name.to_owned()))
}

fn encoding_error(error: rcgen::Error) -> X509Error {
    X509Error::Encoding(error.to_string())
}

/// A certificate time: whole seconds, both as rcgen wants it and as callers see it.
#[derive(Debug, Clone, Copy)]
struct CertTime {
    offset: time::OffsetDateTime,
    system: SystemTime,
}

impl CertTime {
    fn from_unix(secs: i64) -> Result<Self, X509Error> {
        let offset = time::OffsetDateTime::from_unix_timestamp(secs)
            .map_err(|_| X509Error::TimeOutOfRange)?;
        // Certificates hold four-digit years.
        if !(0..=9999).contains(&offset.year()) {
            return Err(X509Error::TimeOutOfRange);
        }
        Ok(Self {
            offset,
            system: system_time_from_unix(secs)?,
        })
    }
}

/// Whole seconds since the Unix epoch, rounded down (toward the past).
fn unix_seconds_floor(t: SystemTime) -> Result<i64, X509Error> {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).map_err(|_| X509Error::TimeOutOfRange),
        Err(before) => {
            let before = before.duration();
            let secs = before.as_secs() + u64::from(before.subsec_nanos() > 0);
            i64::try_from(secs)
                .map(|s| -s)
                .map_err(|_| X509Error::TimeOutOfRange)
        }
    }
}

fn system_time_from_unix(secs: i64) -> Result<SystemTime, X509Error> {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    }
    .ok_or(X509Error::TimeOutOfRange)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_conversion_of_fixed_inputs() {
        assert_eq!(be_bytes_to_decimal(&[]), "0");
        assert_eq!(be_bytes_to_decimal(&[0]), "0");
        assert_eq!(be_bytes_to_decimal(&[0, 0, 7]), "7");
        assert_eq!(be_bytes_to_decimal(&[0x01, 0x00]), "256");
        assert_eq!(be_bytes_to_decimal(&[0xff; 8]), u64::MAX.to_string());
        assert_eq!(be_bytes_to_decimal(&[0x3b, 0x9a, 0xca, 0x00]), "1000000000");
        assert_eq!(be_bytes_to_decimal(&[0x3b, 0x9a, 0xc9, 0xff]), "999999999");
        assert_eq!(be_bytes_to_decimal(&[0xff; 16]), u128::MAX.to_string());
        // 2^128 needs 17 bytes; check against a known value.
        let mut two_128 = vec![1u8];
        two_128.extend([0u8; 16]);
        assert_eq!(
            be_bytes_to_decimal(&two_128),
            "340282366920938463463374607431768211456"
        );
    }

    #[test]
    fn decimal_conversion_matches_u128() {
        let values = [
            0u128,
            1,
            255,
            1 << 64,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
            u128::MAX - 1,
            10u128.pow(38),
        ];
        for value in values {
            assert_eq!(be_bytes_to_decimal(&value.to_be_bytes()), value.to_string());
        }
    }

    #[test]
    fn serial_handles_sign() {
        assert_eq!(serial_to_decimal(&[0x00, 0x80]).unwrap(), "128");
        assert_eq!(serial_to_decimal(&[0xff]).unwrap(), "-1");
        assert_eq!(serial_to_decimal(&[0x80]).unwrap(), "-128");
        assert_eq!(serial_to_decimal(&[0xff, 0x00]).unwrap(), "-256");
        assert!(matches!(
            serial_to_decimal(&[1; MAX_SERIAL_LEN + 1]),
            Err(X509Error::SerialTooLong(65))
        ));
    }

    #[test]
    fn unix_seconds_round_toward_the_past() {
        let t = UNIX_EPOCH + Duration::from_millis(1_500);
        assert_eq!(unix_seconds_floor(t).unwrap(), 1);
        let t = UNIX_EPOCH - Duration::from_millis(1_500);
        assert_eq!(unix_seconds_floor(t).unwrap(), -2);
        assert_eq!(
            system_time_from_unix(-2).unwrap(),
            UNIX_EPOCH - Duration::from_secs(2)
        );
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex_lower(&[0x00, 0x0a, 0xff]), "000aff");
    }

    #[test]
    fn random_serials_are_nonzero_and_differ() {
        let a = random_serial().unwrap();
        let b = random_serial().unwrap();
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != 0));
    }
}
