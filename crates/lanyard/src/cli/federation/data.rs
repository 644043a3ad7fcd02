//! The relationships of `federation create` and `federation update`: from flags, or from a
//! `--data` file in the format of SPIRE's `spire-server federation create -data`:
//!
//! ```json
//! {"federationRelationships": [{
//!     "trustDomain": "partner.example",
//!     "bundleEndpointURL": "https://partner.example:8443",
//!     "bundleEndpointProfile": "https_spiffe",
//!     "endpointSPIFFEID": "spiffe://partner.example/spire/server",
//!     "trustDomainBundle": "-----BEGIN CERTIFICATE-----\n…",
//!     "trustDomainBundleFormat": "pem"
//! }]}
//! ```
//!
//! Member names match as Go's JSON decoder matches them, regardless of case, and in snake case
//! too (`bundle_endpoint_url`); any other member is an error, as is a member given twice.
//! `trustDomainBundle` is PEM text, or with format `spiffe` a SPIFFE bundle object; without a
//! format, a string is PEM and an object a SPIFFE bundle. As in SPIRE's CLI, the bundle of an
//! `https_spiffe` relationship is read as the endpoint SPIFFE ID's trust domain's (which the
//! server accepts only when it is the relationship's), any other as the relationship's.

use std::path::PathBuf;

use anyhow::{Context as _, anyhow, bail};
use lanyard_core::federation::{BundleEndpointProfile, FederationError, HTTPS_SPIFFE, HTTPS_WEB};
use lanyard_core::{FederationRelationship, SpiffeId, TrustBundle, TrustDomain};
use serde_json::Value;

use crate::cli::bundle::BundleFormat;

/// Where a relationship's bundle comes from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum BundleSource {
    /// A file (`--trust-domain-bundle-path`) in a format.
    File(PathBuf, BundleFormat),
    /// A member of a `--data` file, with its format if it named one.
    Inline(Value, Option<String>),
}

/// One relationship as given, before it is checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RelationshipConfig {
    pub(crate) trust_domain: String,
    pub(crate) bundle_endpoint_url: String,
    pub(crate) bundle_endpoint_profile: String,
    pub(crate) endpoint_spiffe_id: Option<String>,
    pub(crate) bundle: Option<BundleSource>,
}

impl RelationshipConfig {
    /// The relationship, checked by SPIRE's CLI's rules and then by the core's (the server
    /// checks it again, and alone knows its own trust domain).
    pub(crate) fn relationship(&self) -> anyhow::Result<FederationRelationship> {
        if self.trust_domain.is_empty() {
            bail!("trust domain is required");
        }
        if self.bundle_endpoint_url.is_empty() {
            bail!("bundle endpoint URL is required");
        }
        let trust_domain: TrustDomain = self
            .trust_domain
            .parse()
            .map_err(FederationError::TrustDomain)?;
        let url = self.bundle_endpoint_url.parse()?;
        let (profile, bundle_trust_domain) = match self.bundle_endpoint_profile.as_str() {
            HTTPS_WEB => (BundleEndpointProfile::HttpsWeb, trust_domain.clone()),
            HTTPS_SPIFFE => {
                let Some(id) = self
                    .endpoint_spiffe_id
                    .as_deref()
                    .filter(|id| !id.is_empty())
                else {
                    bail!(
                        "endpoint SPIFFE ID is required if 'https_spiffe' endpoint profile is set"
                    );
                };
                let endpoint_spiffe_id: SpiffeId = id
                    .parse()
                    .map_err(|e| anyhow!("cannot parse bundle endpoint SPIFFE ID: {e}"))?;
                let bundle_trust_domain = endpoint_spiffe_id.trust_domain();
                (
                    BundleEndpointProfile::HttpsSpiffe { endpoint_spiffe_id },
                    bundle_trust_domain,
                )
            }
            other => bail!("unknown bundle endpoint profile type: {other:?}"),
        };
        let relationship = FederationRelationship::new(trust_domain, url, profile);
        let Some(source) = &self.bundle else {
            return Ok(relationship);
        };
        let bundle = read_bundle(source, bundle_trust_domain)?;
        Ok(relationship.with_trust_domain_bundle(bundle)?)
    }
}

fn read_bundle(source: &BundleSource, trust_domain: TrustDomain) -> anyhow::Result<TrustBundle> {
    match source {
        BundleSource::File(path, format) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read bundle file {}", path.display()))?;
            parse_bundle(&bytes, *format, trust_domain)
                .with_context(|| format!("cannot parse bundle file {}", path.display()))
        }
        BundleSource::Inline(value, format) => {
            let format = match (format.as_deref(), value) {
                (Some("pem"), _) | (None, Value::String(_)) => BundleFormat::Pem,
                (Some("spiffe"), _) | (None, Value::Object(_)) => BundleFormat::Spiffe,
                (Some(other), _) => bail!("bundle format {other:?} is unsupported"),
                (None, _) => bail!("trustDomainBundle must be PEM text or a SPIFFE bundle"),
            };
            let bytes = match (format, value) {
                (BundleFormat::Pem, Value::String(pem)) => pem.as_bytes().to_vec(),
                (BundleFormat::Pem, _) => bail!("a PEM trustDomainBundle must be a string"),
                (BundleFormat::Spiffe, Value::Object(_)) => serde_json::to_vec(value)?,
                (BundleFormat::Spiffe, _) => {
                    bail!("a SPIFFE trustDomainBundle must be an object")
                }
            };
            parse_bundle(&bytes, format, trust_domain).context("cannot parse bundle raw message")
        }
    }
}

fn parse_bundle(
    bytes: &[u8],
    format: BundleFormat,
    trust_domain: TrustDomain,
) -> anyhow::Result<TrustBundle> {
    Ok(match format {
        BundleFormat::Pem => {
            let text = std::str::from_utf8(bytes).context("PEM input is not UTF-8 text")?;
            TrustBundle::from_pem_certificates(trust_domain, text)?
        }
        BundleFormat::Spiffe => TrustBundle::from_jwks_json(trust_domain, bytes)?,
    })
}

/// Parses a `--data` file into one relationship config per item, in file order.
pub(crate) fn parse_relationships(json: &[u8]) -> anyhow::Result<Vec<RelationshipConfig>> {
    let document = lanyard_core::bundle::parse_json_strict(json)
        .map_err(|err| anyhow!("failed to parse JSON: {err}"))?;
    let Value::Object(document) = document else {
        bail!("expected an object with a \"federationRelationships\" array");
    };
    let mut relationships = None;
    for (key, value) in document {
        match normalized(&key).as_str() {
            "federationrelationships" => relationships = Some(value),
            _ => bail!("unknown member {key:?} (expected \"federationRelationships\")"),
        }
    }
    let Some(Value::Array(relationships)) = relationships else {
        bail!("expected an object with a \"federationRelationships\" array");
    };
    if relationships.is_empty() {
        bail!("\"federationRelationships\" is empty");
    }
    relationships
        .iter()
        .enumerate()
        .map(|(index, item)| {
            parse_item(item).with_context(|| format!("could not parse item {index}"))
        })
        .collect()
}

/// A member name as Go's decoder compares it with the field names, plus snake case.
fn normalized(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

fn parse_item(value: &Value) -> anyhow::Result<RelationshipConfig> {
    let Value::Object(object) = value else {
        bail!("expected an object");
    };
    let mut config = RelationshipConfig::default();
    let mut seen = std::collections::BTreeSet::new();
    let mut bundle = None;
    let mut format = None;
    for (key, value) in object {
        let name = normalized(key);
        if !seen.insert(name.clone()) {
            bail!("member {key:?} is given twice");
        }
        if value.is_null() {
            continue;
        }
        let text = || {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("{key:?} must be a string"))
        };
        match name.as_str() {
            "trustdomain" => config.trust_domain = text()?,
            "bundleendpointurl" => config.bundle_endpoint_url = text()?,
            "bundleendpointprofile" => config.bundle_endpoint_profile = text()?,
            "endpointspiffeid" => config.endpoint_spiffe_id = Some(text()?),
            "trustdomainbundle" => bundle = Some(value.clone()),
            "trustdomainbundleformat" => format = Some(text()?),
            _ => bail!("unknown member {key:?}"),
        }
    }
    config.bundle = bundle.map(|value| BundleSource::Inline(value, format));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem(trust_domain: &str) -> String {
        let key = lanyard_core::KeyPair::generate(lanyard_core::KeyType::EcP256).expect("key");
        let der = lanyard_core::x509::create_self_signed_ca(
            &TrustDomain::new(trust_domain).expect("valid"),
            &key,
            &lanyard_core::x509::CaSubject::default(),
            std::time::SystemTime::now(),
            std::time::Duration::from_secs(3600),
        )
        .expect("CA");
        lanyard_core::keys::pem_encode("CERTIFICATE", &der)
    }

    #[test]
    fn spires_data_files_parse() {
        let pem = ca_pem("partner.example");
        let file = serde_json::json!({
            "federationRelationships": [
                {
                    "trustDomain": "partner.example",
                    "bundleEndpointURL": "https://partner.example:8443",
                    "bundleEndpointProfile": "https_spiffe",
                    "endpointSPIFFEID": "spiffe://partner.example/spire/server",
                    "trustDomainBundle": pem,
                    "trustDomainBundleFormat": "pem"
                },
                {
                    "trust_domain": "web.example",
                    "bundle_endpoint_url": "https://web.example/bundle",
                    "BundleEndpointProfile": "https_web"
                }
            ]
        });
        let configs = parse_relationships(file.to_string().as_bytes()).expect("parses");
        assert_eq!(configs.len(), 2);
        let spiffe = configs[0].relationship().expect("valid");
        assert_eq!(spiffe.trust_domain().name(), "partner.example");
        assert_eq!(
            spiffe
                .trust_domain_bundle()
                .map(|b| b.x509_authorities().len()),
            Some(1)
        );
        let web = configs[1].relationship().expect("valid");
        assert_eq!(web.profile(), &BundleEndpointProfile::HttpsWeb);
        assert_eq!(
            web.bundle_endpoint_url().as_str(),
            "https://web.example/bundle"
        );

        // A SPIFFE bundle object, its format inferred.
        let jwks: Value =
            serde_json::from_str(&spiffe.trust_domain_bundle().expect("bundle").to_jwks_json())
                .expect("json");
        let file = serde_json::json!({"federationRelationships": [{
            "trustDomain": "partner.example",
            "bundleEndpointURL": "https://partner.example",
            "bundleEndpointProfile": "https_web",
            "trustDomainBundle": jwks,
        }]});
        let configs = parse_relationships(file.to_string().as_bytes()).expect("parses");
        assert!(
            configs[0]
                .relationship()
                .expect("valid")
                .trust_domain_bundle()
                .is_some()
        );
    }

    #[test]
    fn bad_data_files_and_relationships_are_refused_with_spires_texts() {
        let refused = |json: &str| {
            format!(
                "{:#}",
                parse_relationships(json.as_bytes()).expect_err(json)
            )
        };
        assert!(refused("[]").contains("federationRelationships"));
        assert!(refused("{\"relationships\": []}").contains("unknown member"));
        assert!(refused("{\"federationRelationships\": []}").contains("is empty"));
        assert!(
            refused(
                "{\"federationRelationships\": [{\"trustDomain\": \"a\", \"trust_domain\": \"b\"}]}"
            )
            .contains("given twice")
        );
        assert!(
            refused("{\"federationRelationships\": [{\"color\": \"red\"}]}")
                .contains("could not parse item 0")
        );

        let invalid = |config: RelationshipConfig| {
            format!("{:#}", config.relationship().expect_err("invalid"))
        };
        let good = RelationshipConfig {
            trust_domain: "partner.example".into(),
            bundle_endpoint_url: "https://partner.example".into(),
            bundle_endpoint_profile: "https_web".into(),
            ..RelationshipConfig::default()
        };
        assert!(good.relationship().is_ok());
        assert_eq!(
            invalid(RelationshipConfig {
                trust_domain: String::new(),
                ..good.clone()
            }),
            "trust domain is required"
        );
        assert_eq!(
            invalid(RelationshipConfig {
                bundle_endpoint_url: String::new(),
                ..good.clone()
            }),
            "bundle endpoint URL is required"
        );
        assert_eq!(
            invalid(RelationshipConfig {
                bundle_endpoint_url: "http://partner.example".into(),
                ..good.clone()
            }),
            "bundle endpoint URL must use the https scheme"
        );
        assert_eq!(
            invalid(RelationshipConfig {
                bundle_endpoint_profile: "https".into(),
                ..good.clone()
            }),
            "unknown bundle endpoint profile type: \"https\""
        );
        assert_eq!(
            invalid(RelationshipConfig {
                bundle_endpoint_profile: "https_spiffe".into(),
                ..good.clone()
            }),
            "endpoint SPIFFE ID is required if 'https_spiffe' endpoint profile is set"
        );
        assert_eq!(
            invalid(RelationshipConfig {
                bundle_endpoint_profile: "https_spiffe".into(),
                endpoint_spiffe_id: Some("partner.example/server".into()),
                ..good.clone()
            }),
            "cannot parse bundle endpoint SPIFFE ID: scheme is missing or invalid"
        );
        // An https_spiffe bundle is read as the endpoint's trust domain's; another trust
        // domain's is refused, as SPIRE's server refuses it.
        assert!(
            invalid(RelationshipConfig {
                bundle_endpoint_profile: "https_spiffe".into(),
                endpoint_spiffe_id: Some("spiffe://bundles.example/server".into()),
                bundle: Some(BundleSource::Inline(
                    Value::String(ca_pem("bundles.example")),
                    None
                )),
                ..good.clone()
            })
            .contains("must match the trust domain of the federation relationship")
        );
        assert_eq!(
            invalid(RelationshipConfig {
                bundle: Some(BundleSource::Inline(Value::Bool(true), None)),
                ..good.clone()
            }),
            "trustDomainBundle must be PEM text or a SPIFFE bundle"
        );
        assert_eq!(
            invalid(RelationshipConfig {
                bundle: Some(BundleSource::Inline(
                    Value::String("x".into()),
                    Some("der".into())
                )),
                ..good
            }),
            "bundle format \"der\" is unsupported"
        );
    }
}
