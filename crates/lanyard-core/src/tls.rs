//! rustls client configuration for talking to a SPIFFE server: the server must present an
//! X.509-SVID for an expected SPIFFE ID that chains to the trust domain's current authorities.
//! No hostname checks (SPIFFE authenticates by ID, not by DNS name).
//!
//! rustls is itself sans-IO; this module only builds configuration and verifies certificates.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::id::{SpiffeId, TrustDomain};
use crate::keys::KeyPair;
use crate::x509;

/// Where the verifier gets the trust domain's current X.509 authorities (DER) from. Called on
/// every handshake, so a rotated bundle takes effect without rebuilding the configuration.
pub type AuthoritySource = Arc<dyn Fn() -> Vec<Vec<u8>> + Send + Sync>;

/// Where the verifier gets the trust domain's certificate revocation lists (DER) from, as the
/// Workload API's `crl` fields give them. Called on every handshake.
pub type CrlSource = Arc<dyn Fn() -> Vec<Vec<u8>> + Send + Sync>;

/// The crypto provider: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn unix_time_to_system(now: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

fn bad_certificate(why: impl fmt::Display) -> rustls::Error {
    rustls::Error::General(format!("server certificate refused: {why}"))
}

/// Verifies the server's X.509-SVID against the trust domain's authorities and requires an
/// exact SPIFFE ID.
pub struct SpiffeServerVerifier {
    trust_domain: TrustDomain,
    expected: SpiffeId,
    authorities: AuthoritySource,
    crls: Option<CrlSource>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl SpiffeServerVerifier {
    /// Expects `expected` (e.g. the trust domain's server ID), verified against
    /// `authorities`.
    pub fn new(expected: SpiffeId, authorities: AuthoritySource) -> Self {
        Self {
            trust_domain: expected.trust_domain(),
            expected,
            authorities,
            crls: None,
            provider: provider(),
        }
    }

    /// Also refuses a server certificate listed on its issuer's CRL among `crls`
    /// ([`x509::verify_svid_chain_with_crls`]).
    pub fn with_crls(mut self, crls: CrlSource) -> Self {
        self.crls = Some(crls);
        self
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let authorities = (self.authorities)();
        let mut chain: Vec<&[u8]> = vec![end_entity.as_ref()];
        chain.extend(intermediates.iter().map(|c| c.as_ref()));
        let crls = self
            .crls
            .as_ref()
            .map(|source| source())
            .unwrap_or_default();
        let verified = x509::verify_svid_chain_with_crls(
            &chain,
            &self.trust_domain,
            &authorities,
            &crls,
            unix_time_to_system(now),
        )
        .map_err(bad_certificate)?;
        if verified.spiffe_id() != &self.expected {
            return Err(bad_certificate(format!(
                "presented {}, expected {}",
                verified.spiffe_id(),
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
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

/// SPIRE's `insecure_bootstrap`: before the agent has any bundle it cannot verify the chain,
/// so it checks only that the server presents exactly one URI SAN equal to the expected ID.
/// Used for the first attestation only; everything after that is verified against the
/// bundle the server returned.
pub struct InsecureBootstrapVerifier {
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for InsecureBootstrapVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InsecureBootstrapVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl InsecureBootstrapVerifier {
    /// Expects `expected` without verifying the chain.
    pub fn new(expected: SpiffeId) -> Self {
        Self {
            expected,
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for InsecureBootstrapVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = x509::spiffe_id_of(end_entity).map_err(bad_certificate)?;
        if id != self.expected {
            return Err(bad_certificate(format!(
                "presented {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
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

/// A client configuration for gRPC (ALPN `h2`) that verifies the server with `verifier` and,
/// when `identity` is given, presents that certificate chain (leaf first) and key.
pub fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    identity: Option<(&[Vec<u8>], &KeyPair)>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some((chain, key)) => {
            let certs: Vec<CertificateDer<'static>> = chain
                .iter()
                .map(|der| CertificateDer::from(der.clone()))
                .collect();
            let key =
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.secret_pkcs8_der().to_vec()));
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
