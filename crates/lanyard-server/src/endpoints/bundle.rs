//! The SPIFFE bundle endpoint (SPIFFE Federation; SPIRE's `federation.bundle_endpoint`), from
//! which other trust domains fetch this one's bundle.
//!
//! `GET /` answers the bundle as SPIFFE bundle JSON (F-10): every X.509 authority (`x5c`) and
//! JWT authority (`kid`), `spiffe_sequence` from the stored bundle (it moves with every content
//! change), `spiffe_refresh_hint` from `refresh_hint`, with `Content-Type: application/json`.
//! Like SPIRE's, it serves the bundle at `/`, so the URL to give peers is
//! `https://<host>:<port>/`; beside it, `GET /crl` answers the certificate revocation lists of
//! the trust domain's authorities (PEM `X509 CRL` blocks, `application/x-pem-file`), for peers
//! that check revocations; any other path is 404. With the `https_spiffe` profile the TLS certificate is the
//! server's own X.509-SVID (`spiffe://<td>/spire/server`), which the server rotates in place,
//! so every handshake gets the current one; with `https_web` it is a chain from files
//! ([`super::cert_files`]).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use lanyard_core::TrustBundle;

use super::{Responder, json, text};
use crate::ca::CaManager;

/// Where the endpoint reads the CRLs in force (DER) from.
pub type CrlSource = Arc<dyn Fn() -> Vec<Vec<u8>> + Send + Sync>;

/// The bundle endpoint's answers, from the CA manager's current bundle.
pub struct BundleEndpoint {
    ca: Arc<CaManager>,
    refresh_hint: Duration,
    crls: Option<CrlSource>,
}

impl std::fmt::Debug for BundleEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleEndpoint")
            .field("refresh_hint", &self.refresh_hint)
            .finish_non_exhaustive()
    }
}

impl BundleEndpoint {
    /// Serves `ca`'s bundle with `refresh_hint`.
    pub fn new(ca: Arc<CaManager>, refresh_hint: Duration) -> Self {
        Self {
            ca,
            refresh_hint,
            crls: None,
        }
    }

    /// Also serves the CRLs `crls` gives at `/crl`.
    pub fn with_crls(mut self, crls: CrlSource) -> Self {
        self.crls = Some(crls);
        self
    }
}

impl Responder for BundleEndpoint {
    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        if path == "/crl"
            && let Some(crls) = &self.crls
        {
            return respond_crls(&crls());
        }
        respond(path, self.ca.bundle().as_deref(), self.refresh_hint)
    }
}

/// The answer to `GET /crl`: the CRLs as PEM, or 503 before any is signed.
pub fn respond_crls(crls: &[Vec<u8>]) -> Response<Full<Bytes>> {
    if crls.is_empty() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "no revocation lists yet");
    }
    let pem: String = crls
        .iter()
        .map(|der| lanyard_core::keys::pem_encode("X509 CRL", der))
        .collect();
    let mut response = Response::new(Full::new(Bytes::from(pem)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-pem-file"),
    );
    response
}

/// The answer to `GET path`, given the bundle (`None` before the CA has published one).
pub fn respond(
    path: &str,
    bundle: Option<&TrustBundle>,
    refresh_hint: Duration,
) -> Response<Full<Bytes>> {
    if path != "/" {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    match bundle {
        Some(bundle) => json(bundle.to_endpoint_jwks_json(refresh_hint)),
        None => text(StatusCode::SERVICE_UNAVAILABLE, "no bundle yet"),
    }
}

#[cfg(test)]
mod tests {
    use hyper::header::CONTENT_TYPE;
    use lanyard_core::TrustDomain;
    use lanyard_core::bundle::JwtAuthority;
    use lanyard_core::keys::{KeyPair, KeyType};

    use super::*;
    use crate::endpoints::body_of as body;

    #[test]
    fn crls_are_served_as_pem_once_signed() {
        let response = respond_crls(&[]);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let response = respond_crls(&[vec![0x30, 1], vec![0x30, 2]]);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/x-pem-file");
        let text = String::from_utf8(body(response)).unwrap();
        assert_eq!(text.matches("-----BEGIN X509 CRL-----").count(), 2);
    }

    #[test]
    fn root_serves_the_bundle_and_other_paths_are_not_found() {
        let trust_domain = TrustDomain::new("example.org").expect("valid");
        let mut bundle = TrustBundle::new(trust_domain.clone());
        let key = KeyPair::generate(KeyType::EcP256).expect("key");
        bundle
            .add_jwt_authority(JwtAuthority::from_key_pair("k1", &key, None).expect("jwk"))
            .expect("added");
        let response = respond("/", Some(&bundle), Duration::from_secs(300));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let served = TrustBundle::from_jwks_json(trust_domain, &body(response)).expect("parses");
        assert_eq!(served.jwt_authorities(), bundle.jwt_authorities());
        assert_eq!(served.sequence_number(), bundle.sequence_number());
        assert_eq!(served.refresh_hint(), Some(Duration::from_secs(300)));

        for path in ["/bundle", "//", "/.well-known/spiffe-bundle"] {
            let response = respond(path, Some(&bundle), Duration::from_secs(300));
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        }
        let response = respond("/", None, Duration::from_secs(300));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
