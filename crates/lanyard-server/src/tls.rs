//! TLS for the server API: the server presents its own X.509-SVID
//! (`spiffe://<td>/spire/server`, rotated at half-life without restarting the listener) and
//! verifies any client certificate as an X.509-SVID of its trust domain. TLS 1.3 only, ring
//! only, ALPN `h2` (SPIRE's gRPC clients insist on it).

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::rotation::{Jitter, should_renew};
use lanyard_core::x509::{self, SvidParams, X509Svid};
use lanyard_core::{SpiffeId, TrustDomain};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::ca::CaManager;

/// The crypto provider used everywhere: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Errors while building TLS state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The CA has no active authority yet.
    #[error("no active X.509 authority")]
    NoAuthority,
    /// Minting the server SVID failed.
    #[error("minting the server SVID: {0}")]
    Mint(#[from] x509::X509Error),
    /// Key generation failed.
    #[error("generating the server SVID key: {0}")]
    Key(#[from] lanyard_core::keys::KeyError),
    /// rustls refused the key or configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server's own SVID, swapped in place when it is rotated.
pub struct ServerSvid {
    trust_domain: TrustDomain,
    ttl: Duration,
    current: RwLock<(Arc<CertifiedKey>, X509Svid, SystemTime)>,
}

impl fmt::Debug for ServerSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSvid")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ServerSvid {
    /// Mints the first server SVID from the CA's active authority.
    pub fn new(ca: &CaManager, ttl: Duration, now: SystemTime) -> Result<Self, TlsError> {
        let trust_domain = ca.trust_domain().clone();
        let minted = mint(ca, &trust_domain, ttl, now)?;
        Ok(Self {
            trust_domain,
            ttl,
            current: RwLock::new(minted),
        })
    }

    /// The SVID currently presented.
    pub fn svid(&self) -> X509Svid {
        self.read().1.clone()
    }

    /// Re-mints the SVID when it is past half its life, or when the CA's active authority is
    /// no longer the one that signed it. Returns whether it changed.
    pub fn rotate_if_needed(&self, ca: &CaManager, now: SystemTime) -> Result<bool, TlsError> {
        let (due, issued_by_current) = {
            let current = self.read();
            let svid = &current.1;
            let not_before = current.2;
            let due = should_renew(not_before, svid.not_after(), now, Jitter::NONE);
            // Verifying against the active authority alone tells whether it signed this SVID.
            let issued_by_current = ca.x509_ca().is_some_and(|active| {
                x509::verify_svid_chain(
                    svid.cert_chain(),
                    &self.trust_domain,
                    &[active.cert_der()],
                    now,
                )
                .is_ok()
            });
            (due, issued_by_current)
        };
        if !due && issued_by_current {
            return Ok(false);
        }
        let minted = mint(ca, &self.trust_domain, self.ttl, now)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = minted;
        tracing::info!("rotated the server SVID");
        Ok(true)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, (Arc<CertifiedKey>, X509Svid, SystemTime)> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl ResolvesServerCert for ServerSvid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.read().0))
    }
}

fn mint(
    ca: &CaManager,
    trust_domain: &TrustDomain,
    ttl: Duration,
    now: SystemTime,
) -> Result<(Arc<CertifiedKey>, X509Svid, SystemTime), TlsError> {
    let authority = ca.x509_ca().ok_or(TlsError::NoAuthority)?;
    let key = KeyPair::generate(KeyType::EcP256)?;
    let params = SvidParams::new(trust_domain.server_id(), key.public_key_der(), ttl);
    let svid = authority.mint_svid(&params, now)?;
    let certs: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.secret_pkcs8_der().to_vec()));
    let signing_key = provider().key_provider.load_private_key(private)?;
    let (not_before, _) = x509::validity_of(svid.leaf_der())?;
    Ok((
        Arc::new(CertifiedKey::new(certs, signing_key)),
        svid,
        not_before,
    ))
}

/// Accepts a client certificate only if it is a valid X.509-SVID of this trust domain at the
/// time of the handshake. A client without a certificate is let through as anonymous; each
/// RPC then decides whether that is enough.
pub struct SvidClientVerifier {
    ca: Arc<CaManager>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for SvidClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidClientVerifier").finish_non_exhaustive()
    }
}

impl SvidClientVerifier {
    /// Verifies against the bundle `ca` publishes.
    pub fn new(ca: Arc<CaManager>) -> Self {
        Self {
            ca,
            provider: provider(),
        }
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let reject = |why: String| {
            tracing::debug!(%why, "client certificate refused");
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )
        };
        let id: SpiffeId = x509::spiffe_id_of(end_entity).map_err(|e| reject(e.to_string()))?;
        let trust_domain = self.ca.trust_domain();
        if !id.is_member_of(trust_domain) {
            return Err(reject(format!(
                "{id} is not in trust domain {trust_domain}"
            )));
        }
        let bundle = self.ca.bundle().ok_or_else(|| reject("no bundle".into()))?;
        let authorities: Vec<&[u8]> = bundle.x509_authorities().iter().map(|a| a.der()).collect();
        let mut chain: Vec<&[u8]> = vec![end_entity.as_ref()];
        chain.extend(intermediates.iter().map(|c| c.as_ref()));
        let now = UNIX_EPOCH + Duration::from_secs(now.as_secs());
        x509::verify_svid_chain(&chain, trust_domain, &authorities, now)
            .map_err(|e| reject(e.to_string()))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls server configuration for the TCP endpoint.
pub fn server_config(
    svid: Arc<ServerSvid>,
    ca: Arc<CaManager>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SvidClientVerifier::new(ca)))
        .with_cert_resolver(svid);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
