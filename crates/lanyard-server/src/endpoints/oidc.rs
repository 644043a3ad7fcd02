//! OIDC discovery (OpenID Connect Discovery 1.0, as SPIRE's oidc-discovery-provider serves it)
//! for the trust domain's JWT authorities, so that an OIDC relying party given only the
//! issuer verifies JWT-SVIDs.
//!
//! The issuer is `jwt_issuer`, which every JWT-SVID then carries as `iss`. Under the issuer's
//! path: `GET /.well-known/openid-configuration` answers SPIRE's document — `issuer`,
//! `jwks_uri` (the issuer + `/keys`), `authorization_endpoint` (empty: there is none),
//! `response_types_supported` `["id_token"]`, `subject_types_supported` `["public"]`,
//! `id_token_signing_alg_values_supported` `["RS256","ES256","ES384"]` — and `GET /keys` the
//! JWT authorities of the bundle as a plain JWK Set (`use` `sig`, `kid`, `alg`; see
//! [`lanyard_core::bundle::JwtAuthority::oidc_jwk`]). A tainted key is still served, as SPIRE's
//! provider does, for it still verifies; a revoked one has left the bundle and so `/keys`.
//! Both carry `Cache-Control: max-age=<cache_max_age>` (`no-store` when it is 0, SPIRE's
//! choice for `/keys`) and `Access-Control-Allow-Origin: *`. Other paths are 404.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ACCESS_CONTROL_ALLOW_ORIGIN, CACHE_CONTROL, HeaderValue};
use hyper::{Response, StatusCode};
use lanyard_core::TrustBundle;
use serde_json::json;

use super::{Responder, json, text};
use crate::ca::CaManager;

/// The discovery document's path below the issuer's.
pub const WELL_KNOWN_PATH: &str = "/.well-known/openid-configuration";

/// The JWK Set's path below the issuer's.
pub const KEYS_PATH: &str = "/keys";

/// The OIDC discovery endpoint's answers, from the CA manager's current bundle.
#[derive(Debug)]
pub struct OidcDiscovery {
    ca: Arc<CaManager>,
    discovery: Discovery,
}

impl OidcDiscovery {
    /// Discovery for `issuer` (a checked `jwt_issuer`), serving `ca`'s JWT authorities.
    pub fn new(ca: Arc<CaManager>, issuer: &str, cache_max_age: Duration) -> Self {
        Self {
            ca,
            discovery: Discovery::new(issuer, cache_max_age),
        }
    }
}

impl Responder for OidcDiscovery {
    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        self.discovery.respond(path, self.ca.bundle().as_deref())
    }
}

/// What discovery serves for one issuer, given a bundle.
#[derive(Debug, Clone)]
pub struct Discovery {
    document: Bytes,
    well_known_path: String,
    keys_path: String,
    cache_control: HeaderValue,
}

impl Discovery {
    /// Discovery for `issuer`, its answers cached for `cache_max_age`.
    pub fn new(issuer: &str, cache_max_age: Duration) -> Self {
        let base = issuer.trim_end_matches('/');
        // The issuer's path: what follows its scheme and authority.
        let path = base
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|slash| &rest[slash..]))
            .unwrap_or_default();
        let document = json!({
            "issuer": issuer,
            "jwks_uri": format!("{base}{KEYS_PATH}"),
            "authorization_endpoint": "",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "ES384"],
        });
        let cache_control = if cache_max_age.is_zero() {
            HeaderValue::from_static("no-cache, no-store, must-revalidate")
        } else {
            HeaderValue::from_str(&format!("max-age={}", cache_max_age.as_secs().max(1)))
                .unwrap_or_else(|_| HeaderValue::from_static("no-cache"))
        };
        Self {
            document: Bytes::from(document.to_string()),
            well_known_path: format!("{path}{WELL_KNOWN_PATH}"),
            keys_path: format!("{path}{KEYS_PATH}"),
            cache_control,
        }
    }

    /// The answer to `GET path`, given the bundle (`None` before the CA has published one).
    pub fn respond(&self, path: &str, bundle: Option<&TrustBundle>) -> Response<Full<Bytes>> {
        let mut response = if path == self.well_known_path {
            json(self.document.clone())
        } else if path == self.keys_path {
            match bundle {
                Some(bundle) => json(bundle.oidc_jwks_json()),
                None => return text(StatusCode::SERVICE_UNAVAILABLE, "no keys yet"),
            }
        } else {
            return text(StatusCode::NOT_FOUND, "not found");
        };
        let headers = response.headers_mut();
        headers.insert(CACHE_CONTROL, self.cache_control.clone());
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        response
    }
}

#[cfg(test)]
mod tests {
    use hyper::header::CONTENT_TYPE;
    use lanyard_core::TrustDomain;
    use lanyard_core::bundle::JwtAuthority;
    use lanyard_core::keys::{KeyPair, KeyType};
    use serde_json::Value;

    use super::*;
    use crate::endpoints::body_of;

    fn bundle() -> TrustBundle {
        let mut bundle = TrustBundle::new(TrustDomain::new("example.org").expect("valid"));
        for kid in ["a", "b"] {
            let key = KeyPair::generate(KeyType::EcP256).expect("key");
            bundle
                .add_jwt_authority(JwtAuthority::from_key_pair(kid, &key, None).expect("jwk"))
                .expect("added");
        }
        bundle
    }

    fn json_of(response: Response<Full<Bytes>>) -> Value {
        serde_json::from_slice(&body_of(response)).expect("JSON")
    }

    #[test]
    fn the_document_is_spire_s_for_the_configured_issuer() {
        let discovery = Discovery::new("https://oidc.example.org", Duration::from_secs(60));
        let response = discovery.respond(WELL_KNOWN_PATH, Some(&bundle()));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(response.headers()[CACHE_CONTROL], "max-age=60");
        assert_eq!(response.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(
            json_of(response),
            json!({
                "issuer": "https://oidc.example.org",
                "jwks_uri": "https://oidc.example.org/keys",
                "authorization_endpoint": "",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256", "ES384"],
            })
        );
        let response = discovery.respond("/keys", Some(&bundle()));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CACHE_CONTROL], "max-age=60");
        let keys = json_of(response);
        let kids: Vec<&str> = keys["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k["kid"].as_str().expect("kid"))
            .collect();
        assert_eq!(kids, ["a", "b"]);
        for path in [
            "/",
            "/keys/",
            "/.well-known/openid-configuration/x",
            "/jwks",
        ] {
            let response = discovery.respond(path, Some(&bundle()));
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        }
        assert_eq!(
            discovery.respond("/keys", None).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn an_issuer_with_a_path_is_served_under_it_and_zero_max_age_forbids_caching() {
        let discovery = Discovery::new("https://example.org:8444/tenant/", Duration::ZERO);
        let response = discovery.respond("/tenant/.well-known/openid-configuration", None);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[CACHE_CONTROL],
            "no-cache, no-store, must-revalidate"
        );
        let document = json_of(response);
        assert_eq!(document["issuer"], "https://example.org:8444/tenant/");
        assert_eq!(document["jwks_uri"], "https://example.org:8444/tenant/keys");
        assert_eq!(
            discovery.respond("/tenant/keys", Some(&bundle())).status(),
            StatusCode::OK
        );
        assert_eq!(
            discovery.respond(WELL_KNOWN_PATH, None).status(),
            StatusCode::NOT_FOUND
        );
    }
}
