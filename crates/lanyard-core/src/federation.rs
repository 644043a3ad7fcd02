//! Federation relationships: which foreign trust domain's bundle is fetched from which SPIFFE
//! bundle endpoint, and how that endpoint proves who it is (SPIRE's TrustDomain API).
//!
//! The rules are SPIRE v1.13's. The endpoint URL is `https`, names a host and carries no user
//! info. An `https_spiffe` endpoint names the SPIFFE ID its X509-SVID must carry; SPIRE lets that
//! ID be in any trust domain (an endpoint may be served by another trust domain's server, whose
//! bundle must then be known), and so does Lanyard. A bundle given with a relationship must be
//! the relationship's trust domain's, and no server federates with its own trust domain.

use std::fmt;
use std::str::FromStr;

use crate::bundle::TrustBundle;
use crate::id::{IdError, SpiffeId, TrustDomain};

/// The longest bundle endpoint URL accepted, in bytes.
pub const MAX_BUNDLE_ENDPOINT_URL_LEN: usize = 2048;

/// The name of the Web PKI profile, as SPIRE's CLI and configuration spell it.
pub const HTTPS_WEB: &str = "https_web";
/// The name of the SPIFFE authentication profile, as SPIRE's CLI and configuration spell it.
pub const HTTPS_SPIFFE: &str = "https_spiffe";

/// Why a federation relationship, or a part of it, is invalid. The messages are SPIRE's, and
/// each names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FederationError {
    /// The trust domain is not a valid trust domain name.
    #[error("failed to parse trust domain: {0}")]
    TrustDomain(IdError),
    /// The bundle endpoint URL does not parse.
    #[error("failed to parse bundle endpoint URL: {0}")]
    UrlSyntax(String),
    /// The bundle endpoint URL is longer than [`MAX_BUNDLE_ENDPOINT_URL_LEN`].
    #[error(
        "failed to parse bundle endpoint URL: it is {len} bytes long; the limit is {MAX_BUNDLE_ENDPOINT_URL_LEN}"
    )]
    UrlTooLong {
        /// Length of the rejected URL, in bytes.
        len: usize,
    },
    /// The bundle endpoint URL's scheme is not `https`.
    #[error("bundle endpoint URL must use the https scheme")]
    UrlNotHttps,
    /// The bundle endpoint URL names no host.
    #[error("bundle endpoint URL must specify the host")]
    UrlWithoutHost,
    /// The bundle endpoint URL carries a user name or password.
    #[error("bundle endpoint URL must not contain user info")]
    UrlWithUserInfo,
    /// The endpoint SPIFFE ID of an `https_spiffe` profile is not a valid SPIFFE ID.
    #[error("failed to parse endpoint SPIFFE ID: {0}")]
    EndpointSpiffeId(IdError),
    /// A profile name other than [`HTTPS_WEB`] and [`HTTPS_SPIFFE`].
    #[error("unknown bundle endpoint profile type: {0:?}")]
    UnknownProfile(String),
    /// The bundle given with the relationship is another trust domain's.
    #[error(
        "trust domain bundle ({bundle:?}) must match the trust domain of the federation relationship ({relationship:?})"
    )]
    BundleTrustDomainMismatch {
        /// The bundle's trust domain.
        bundle: String,
        /// The relationship's trust domain.
        relationship: String,
    },
    /// The relationship is with the server's own trust domain.
    #[error("unable to create federation relationship for server trust domain")]
    OwnTrustDomain,
    /// An update names another trust domain than the relationship it updates.
    #[error(
        "an update of the relationship with {stored:?} cannot change its trust domain to {update:?}"
    )]
    TrustDomainChanged {
        /// The stored relationship's trust domain.
        stored: String,
        /// The trust domain the update names.
        update: String,
    },
}

/// The URL of a SPIFFE bundle endpoint: `https`, with a host and without user info. It keeps
/// the text it was parsed from, which is what is stored and shown, as SPIRE shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BundleEndpointUrl {
    text: String,
    url: url::Url,
}

impl BundleEndpointUrl {
    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The URL parsed, for the client that fetches from it.
    pub fn url(&self) -> &url::Url {
        &self.url
    }
}

impl FromStr for BundleEndpointUrl {
    type Err = FederationError;

    /// Checks in SPIRE's order: a URL that does not parse, then the scheme, the host and the
    /// user info. Whitespace and control characters are refused as Go's parser refuses them,
    /// and so is `https:` without `//` (Go takes it for an opaque URL without a host, where
    /// the WHATWG parser would supply one).
    fn from_str(text: &str) -> Result<Self, FederationError> {
        if text.len() > MAX_BUNDLE_ENDPOINT_URL_LEN {
            return Err(FederationError::UrlTooLong { len: text.len() });
        }
        if let Some(bad) = text
            .chars()
            .find(|c| c.is_control() || c.is_whitespace() || *c == '\\')
        {
            return Err(FederationError::UrlSyntax(format!(
                "invalid character {bad:?} in URL"
            )));
        }
        let Some((scheme, rest)) = text.split_once(':') else {
            return Err(FederationError::UrlNotHttps);
        };
        if !scheme.eq_ignore_ascii_case("https") {
            return Err(FederationError::UrlNotHttps);
        }
        let Some(after_slashes) = rest.strip_prefix("//") else {
            return Err(FederationError::UrlWithoutHost);
        };
        let authority = after_slashes
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default();
        if authority.contains('@') {
            return Err(FederationError::UrlWithUserInfo);
        }
        if authority.is_empty() {
            // The WHATWG parser would take the path's first segment for the host.
            return Err(FederationError::UrlWithoutHost);
        }
        let url = url::Url::parse(text).map_err(|e| match e {
            url::ParseError::EmptyHost => FederationError::UrlWithoutHost,
            other => FederationError::UrlSyntax(other.to_string()),
        })?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(FederationError::UrlWithoutHost);
        }
        Ok(Self {
            text: text.to_owned(),
            url,
        })
    }
}

impl fmt::Display for BundleEndpointUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// How a bundle endpoint authenticates itself to the server that fetches from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BundleEndpointProfile {
    /// A certificate that chains to the Web PKI roots (`https_web`).
    HttpsWeb,
    /// An X509-SVID with this SPIFFE ID, verified against the bundle of that ID's trust domain
    /// as the server knows it (`https_spiffe`).
    HttpsSpiffe {
        /// The SPIFFE ID the endpoint's X509-SVID must carry.
        endpoint_spiffe_id: SpiffeId,
    },
}

impl BundleEndpointProfile {
    /// The profile from its name ([`HTTPS_WEB`] or [`HTTPS_SPIFFE`]) and, for `https_spiffe`,
    /// the endpoint's SPIFFE ID (ignored for `https_web`).
    pub fn from_name(
        name: &str,
        endpoint_spiffe_id: Option<&str>,
    ) -> Result<Self, FederationError> {
        match name {
            HTTPS_WEB => Ok(Self::HttpsWeb),
            HTTPS_SPIFFE => Ok(Self::HttpsSpiffe {
                endpoint_spiffe_id: endpoint_spiffe_id
                    .unwrap_or_default()
                    .parse()
                    .map_err(FederationError::EndpointSpiffeId)?,
            }),
            other => Err(FederationError::UnknownProfile(other.to_owned())),
        }
    }

    /// The profile's name, [`HTTPS_WEB`] or [`HTTPS_SPIFFE`].
    pub fn name(&self) -> &'static str {
        match self {
            Self::HttpsWeb => HTTPS_WEB,
            Self::HttpsSpiffe { .. } => HTTPS_SPIFFE,
        }
    }

    /// The endpoint's SPIFFE ID, for `https_spiffe`.
    pub fn endpoint_spiffe_id(&self) -> Option<&SpiffeId> {
        match self {
            Self::HttpsWeb => None,
            Self::HttpsSpiffe { endpoint_spiffe_id } => Some(endpoint_spiffe_id),
        }
    }
}

/// A relationship with a foreign trust domain: where its bundle is fetched from, how that
/// endpoint authenticates, and the trust domain's bundle (given to bootstrap the relationship,
/// or the latest one known when read back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationRelationship {
    trust_domain: TrustDomain,
    bundle_endpoint_url: BundleEndpointUrl,
    profile: BundleEndpointProfile,
    trust_domain_bundle: Option<TrustBundle>,
}

impl FederationRelationship {
    /// A relationship without a bundle.
    pub fn new(
        trust_domain: TrustDomain,
        bundle_endpoint_url: BundleEndpointUrl,
        profile: BundleEndpointProfile,
    ) -> Self {
        Self {
            trust_domain,
            bundle_endpoint_url,
            profile,
            trust_domain_bundle: None,
        }
    }

    /// The relationship carrying `bundle`, which must be its trust domain's.
    pub fn with_trust_domain_bundle(
        mut self,
        bundle: TrustBundle,
    ) -> Result<Self, FederationError> {
        if bundle.trust_domain() != &self.trust_domain {
            return Err(FederationError::BundleTrustDomainMismatch {
                bundle: bundle.trust_domain().name().to_owned(),
                relationship: self.trust_domain.name().to_owned(),
            });
        }
        self.trust_domain_bundle = Some(bundle);
        Ok(self)
    }

    /// The relationship without its bundle.
    pub fn without_trust_domain_bundle(mut self) -> Self {
        self.trust_domain_bundle = None;
        self
    }

    /// The foreign trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Where its bundle is fetched from.
    pub fn bundle_endpoint_url(&self) -> &BundleEndpointUrl {
        &self.bundle_endpoint_url
    }

    /// How the endpoint authenticates.
    pub fn profile(&self) -> &BundleEndpointProfile {
        &self.profile
    }

    /// The trust domain's bundle, if one was given or is known.
    pub fn trust_domain_bundle(&self) -> Option<&TrustBundle> {
        self.trust_domain_bundle.as_ref()
    }

    /// Refuses a relationship with `own`, the server's trust domain: a server's own bundle is
    /// its CA's, never fetched.
    pub fn check_foreign(&self, own: &TrustDomain) -> Result<(), FederationError> {
        if &self.trust_domain == own {
            return Err(FederationError::OwnTrustDomain);
        }
        Ok(())
    }

    /// This relationship with the fields of `update` that `mask` selects. A bundle replaces
    /// this one's only when `update` carries one: an update never removes a bundle.
    pub fn updated(
        &self,
        update: &FederationRelationship,
        mask: &RelationshipMask,
    ) -> Result<Self, FederationError> {
        if update.trust_domain != self.trust_domain {
            return Err(FederationError::TrustDomainChanged {
                stored: self.trust_domain.name().to_owned(),
                update: update.trust_domain.name().to_owned(),
            });
        }
        let mut updated = self.clone();
        if mask.bundle_endpoint_url {
            updated
                .bundle_endpoint_url
                .clone_from(&update.bundle_endpoint_url);
        }
        if mask.bundle_endpoint_profile {
            updated.profile.clone_from(&update.profile);
        }
        if mask.trust_domain_bundle && update.trust_domain_bundle.is_some() {
            updated
                .trust_domain_bundle
                .clone_from(&update.trust_domain_bundle);
        }
        Ok(updated)
    }
}

/// Which fields of a relationship an update writes, or a reader wants (SPIRE's
/// `FederationRelationshipMask`). The trust domain is always there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelationshipMask {
    /// The bundle endpoint URL.
    pub bundle_endpoint_url: bool,
    /// The profile, with its endpoint SPIFFE ID.
    pub bundle_endpoint_profile: bool,
    /// The trust domain's bundle.
    pub trust_domain_bundle: bool,
}

impl RelationshipMask {
    /// Every field: what an absent mask means.
    pub const ALL: Self = Self {
        bundle_endpoint_url: true,
        bundle_endpoint_profile: true,
        trust_domain_bundle: true,
    };
}

impl Default for RelationshipMask {
    fn default() -> Self {
        Self::ALL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).expect("valid trust domain")
    }

    fn url(text: &str) -> BundleEndpointUrl {
        text.parse().expect("valid URL")
    }

    #[test]
    fn bundle_endpoint_urls_follow_spires_rules() {
        let accepted = [
            "https://partner.example/bundle",
            "https://partner.example",
            "HTTPS://partner.example:8443/bundle?x=1#f",
            "https://192.0.2.10:8443",
            "https://[2001:db8::1]:8443/",
        ];
        for text in accepted {
            let parsed = url(text);
            assert_eq!(parsed.as_str(), text, "kept as given");
            assert_eq!(parsed.url().scheme(), "https");
        }
        assert_eq!(
            url("https://partner.example").url().port_or_known_default(),
            Some(443)
        );

        let refused = [
            (
                "http://partner.example/bundle",
                FederationError::UrlNotHttps,
            ),
            ("partner.example/bundle", FederationError::UrlNotHttps),
            ("", FederationError::UrlNotHttps),
            ("ftp://partner.example", FederationError::UrlNotHttps),
            ("https:partner.example", FederationError::UrlWithoutHost),
            ("https://", FederationError::UrlWithoutHost),
            ("https:///bundle", FederationError::UrlWithoutHost),
            ("https://:8443/bundle", FederationError::UrlWithoutHost),
            (
                "https://user@partner.example",
                FederationError::UrlWithUserInfo,
            ),
            (
                "https://user:pw@partner.example/",
                FederationError::UrlWithUserInfo,
            ),
            (
                "https://@partner.example/",
                FederationError::UrlWithUserInfo,
            ),
        ];
        for (text, error) in refused {
            assert_eq!(
                text.parse::<BundleEndpointUrl>().expect_err(text),
                error,
                "{text}"
            );
        }
        for text in [
            "https://partner.example/a b",
            "https://partner.example/\n",
            "https://partner .example",
            "https://partner.example:99999/",
            "https://partner.example\\bundle",
            "https://[::1/",
        ] {
            let error = text.parse::<BundleEndpointUrl>().expect_err(text);
            assert!(
                matches!(error, FederationError::UrlSyntax(_)),
                "{text}: {error:?}"
            );
            assert!(
                error
                    .to_string()
                    .starts_with("failed to parse bundle endpoint URL: "),
                "{error}"
            );
        }
        let long = format!(
            "https://partner.example/{}",
            "a".repeat(MAX_BUNDLE_ENDPOINT_URL_LEN)
        );
        assert!(matches!(
            long.parse::<BundleEndpointUrl>(),
            Err(FederationError::UrlTooLong { .. })
        ));
    }

    #[test]
    fn the_texts_are_spires() {
        assert_eq!(
            FederationError::UrlNotHttps.to_string(),
            "bundle endpoint URL must use the https scheme"
        );
        assert_eq!(
            FederationError::TrustDomain(IdError::BadTrustDomainChar).to_string(),
            "failed to parse trust domain: trust domain characters are limited to lowercase \
             letters, numbers, dots, dashes, and underscores"
        );
        assert_eq!(
            FederationError::OwnTrustDomain.to_string(),
            "unable to create federation relationship for server trust domain"
        );
    }

    #[test]
    fn profiles_by_name() {
        assert_eq!(
            BundleEndpointProfile::from_name("https_web", Some("ignored")),
            Ok(BundleEndpointProfile::HttpsWeb)
        );
        let spiffe = BundleEndpointProfile::from_name(
            "https_spiffe",
            Some("spiffe://partner.example/spire/server"),
        )
        .expect("valid");
        assert_eq!(spiffe.name(), HTTPS_SPIFFE);
        assert_eq!(
            spiffe.endpoint_spiffe_id().map(SpiffeId::as_str),
            Some("spiffe://partner.example/spire/server")
        );
        assert!(matches!(
            BundleEndpointProfile::from_name("https_spiffe", None),
            Err(FederationError::EndpointSpiffeId(_))
        ));
        assert!(matches!(
            BundleEndpointProfile::from_name("https_spiffe", Some("partner.example/x")),
            Err(FederationError::EndpointSpiffeId(IdError::WrongScheme))
        ));
        assert_eq!(
            BundleEndpointProfile::from_name("https", None),
            Err(FederationError::UnknownProfile("https".to_owned()))
        );
    }

    #[test]
    fn the_bundle_must_be_the_relationships_and_the_trust_domain_foreign() {
        let relationship = FederationRelationship::new(
            td("partner.example"),
            url("https://partner.example/bundle"),
            BundleEndpointProfile::HttpsWeb,
        );
        let error = relationship
            .clone()
            .with_trust_domain_bundle(TrustBundle::new(td("other.example")))
            .expect_err("another trust domain's bundle");
        assert_eq!(
            error.to_string(),
            "trust domain bundle (\"other.example\") must match the trust domain of the \
             federation relationship (\"partner.example\")"
        );
        let with_bundle = relationship
            .clone()
            .with_trust_domain_bundle(TrustBundle::new(td("partner.example")))
            .expect("its own bundle");
        assert!(with_bundle.trust_domain_bundle().is_some());
        assert_eq!(with_bundle.without_trust_domain_bundle(), relationship);

        assert_eq!(relationship.check_foreign(&td("example.org")), Ok(()));
        assert_eq!(
            relationship.check_foreign(&td("partner.example")),
            Err(FederationError::OwnTrustDomain)
        );
        // The endpoint may be served from another trust domain, as in SPIRE.
        let elsewhere = FederationRelationship::new(
            td("partner.example"),
            url("https://bundles.example/partner"),
            BundleEndpointProfile::from_name(
                HTTPS_SPIFFE,
                Some("spiffe://bundles.example/endpoint"),
            )
            .expect("valid"),
        );
        assert_eq!(elsewhere.check_foreign(&td("example.org")), Ok(()));
    }

    #[test]
    fn an_update_writes_the_masked_fields_and_never_removes_the_bundle() {
        let bundle = TrustBundle::new(td("partner.example"));
        let stored = FederationRelationship::new(
            td("partner.example"),
            url("https://partner.example/old"),
            BundleEndpointProfile::HttpsWeb,
        )
        .with_trust_domain_bundle(bundle.clone())
        .expect("its bundle");
        let spiffe = BundleEndpointProfile::from_name(
            HTTPS_SPIFFE,
            Some("spiffe://partner.example/endpoint"),
        )
        .expect("valid");
        let update = FederationRelationship::new(
            td("partner.example"),
            url("https://partner.example/new"),
            spiffe.clone(),
        );

        let all = stored
            .updated(&update, &RelationshipMask::ALL)
            .expect("same trust domain");
        assert_eq!(
            all.bundle_endpoint_url().as_str(),
            "https://partner.example/new"
        );
        assert_eq!(all.profile(), &spiffe);
        assert_eq!(
            all.trust_domain_bundle(),
            Some(&bundle),
            "no bundle given, none removed"
        );

        let url_only = RelationshipMask {
            bundle_endpoint_url: true,
            bundle_endpoint_profile: false,
            trust_domain_bundle: false,
        };
        let updated = stored
            .updated(&update, &url_only)
            .expect("same trust domain");
        assert_eq!(updated.profile(), &BundleEndpointProfile::HttpsWeb);
        assert_eq!(
            updated.bundle_endpoint_url().as_str(),
            "https://partner.example/new"
        );

        let none = RelationshipMask {
            bundle_endpoint_url: false,
            bundle_endpoint_profile: false,
            trust_domain_bundle: false,
        };
        assert_eq!(stored.updated(&update, &none), Ok(stored.clone()));

        let other = FederationRelationship::new(
            td("other.example"),
            url("https://other.example/"),
            BundleEndpointProfile::HttpsWeb,
        );
        assert!(matches!(
            stored.updated(&other, &RelationshipMask::ALL),
            Err(FederationError::TrustDomainChanged { .. })
        ));
    }
}
