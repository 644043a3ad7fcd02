//! go-spiffe's SPIFFE ID test vectors, its byte sweep, and properties of the parser.

use lanyard_core::id::{IdError, MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN};
use lanyard_core::{SpiffeId, TrustDomain};
use proptest::prelude::*;

const EMPTY: &str = "cannot be empty";
const SCHEME: &str = "scheme is missing or invalid";
const MISSING_TD: &str = "trust domain is missing";
const TD_CHAR: &str = "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores";
const PATH_CHAR: &str =
    "path segment characters are limited to letters, numbers, dots, dashes, and underscores";
const EMPTY_SEGMENT: &str = "path cannot contain empty segments";
const DOT_SEGMENT: &str = "path cannot contain dot segments";
const TRAILING: &str = "path cannot have a trailing slash";

#[test]
fn valid_ids_parse_into_their_parts() {
    let cases = [
        ("spiffe://trustdomain", "trustdomain", ""),
        ("spiffe://trustdomain/path", "trustdomain", "/path"),
        ("spiffe://trustdomain/.path", "trustdomain", "/.path"),
        ("spiffe://trustdomain/..path", "trustdomain", "/..path"),
        ("spiffe://trustdomain/...", "trustdomain", "/..."),
        ("spiffe://1.2.3.4/path", "1.2.3.4", "/path"),
        (
            "spiffe://trust-domain.example_1/Path-A_b.9",
            "trust-domain.example_1",
            "/Path-A_b.9",
        ),
    ];
    for (input, td, path) in cases {
        let id: SpiffeId = input.parse().unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(id.trust_domain_name(), td, "{input}");
        assert_eq!(id.path(), path, "{input}");
        assert_eq!(id.to_string(), input, "display round-trips");
    }
}

#[test]
fn invalid_ids_give_go_spiffes_errors() {
    let cases: &[(&str, &str)] = &[
        ("", EMPTY),
        ("s", SCHEME),
        ("spiffe:/", SCHEME),
        ("Spiffe://", SCHEME),
        ("spiffe:/trustdomain/path", SCHEME),
        ("SPIFFE://trustdomain/path", SCHEME),
        ("http://trustdomain/path", SCHEME),
        ("spiffe://", MISSING_TD),
        ("spiffe:///", MISSING_TD),
        ("spiffe:///path", MISSING_TD),
        ("spiffe://trustdomain/", TRAILING),
        ("spiffe://trustdomain/path/", TRAILING),
        ("spiffe://trustdomain//", EMPTY_SEGMENT),
        ("spiffe://trustdomain//path", EMPTY_SEGMENT),
        ("spiffe://trustdomain/.", DOT_SEGMENT),
        ("spiffe://trustdomain/./path", DOT_SEGMENT),
        ("spiffe://trustdomain/path/./other", DOT_SEGMENT),
        ("spiffe://trustdomain/path/..", DOT_SEGMENT),
        ("spiffe://trustdomain/..", DOT_SEGMENT),
        ("spiffe://trustdomain/../path", DOT_SEGMENT),
        ("spiffe://trustdomain/path/../other", DOT_SEGMENT),
        ("spiffe://%F0%9F%A4%AF/path", TD_CHAR),
        ("spiffe://%62%61%64/path", TD_CHAR),
        ("spiffe://trust$domain", TD_CHAR),
        ("spiffe://TrustDomain/Path", TD_CHAR),
        ("spiffe://trustdomain:8080/path", TD_CHAR),
        ("spiffe://user@trustdomain/path", TD_CHAR),
        ("spiffe://[::1]/path", TD_CHAR),
        ("spiffe://trustdomain?query", TD_CHAR),
        ("spiffe://trustdomain/%F0%9F%A4%AF", PATH_CHAR),
        ("spiffe://trustdomain/%62%61%64", PATH_CHAR),
        ("spiffe://trustdomain/path$", PATH_CHAR),
        ("spiffe://trustdomain/path?query", PATH_CHAR),
        ("spiffe://trustdomain/path#frag", PATH_CHAR),
        ("spiffe://trustdomain/pa th", PATH_CHAR),
        ("spiffe://trustdomain/p~th", PATH_CHAR),
        ("spiffe://trustdomain/päth", PATH_CHAR),
    ];
    for (input, want) in cases {
        let err = input
            .parse::<SpiffeId>()
            .expect_err(&format!("{input:?} should be rejected"));
        assert_eq!(err.to_string(), *want, "{input:?}");
    }
}

#[test]
fn every_byte_outside_the_charsets_is_rejected() {
    for b in 0u8..=255 {
        let c = b as char;
        let td_ok = c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
        let path_ok = c.is_ascii_alphanumeric() || "._-".contains(c);

        // Trust domain position. '/' ends the trust domain, so it starts a path instead.
        if c != '/' {
            let mut input = b"spiffe://trustdomain".to_vec();
            input.push(b);
            input.extend_from_slice(b"/path");
            let input = String::from_utf8_lossy(&input).into_owned();
            let got = input.parse::<SpiffeId>();
            if td_ok {
                assert!(got.is_ok(), "byte {b:#04x} in trust domain: {got:?}");
            } else {
                assert_eq!(
                    got.map_err(|e| e.to_string()),
                    Err(TD_CHAR.to_owned()),
                    "byte {b:#04x} in trust domain"
                );
            }
        }

        // Path position. '/' makes a trailing slash; '.' alone is fine after "path".
        if c != '/' {
            let mut input = b"spiffe://trustdomain/path".to_vec();
            input.push(b);
            let input = String::from_utf8_lossy(&input).into_owned();
            let got = input.parse::<SpiffeId>();
            if path_ok {
                assert!(got.is_ok(), "byte {b:#04x} in path: {got:?}");
            } else {
                assert_eq!(
                    got.map_err(|e| e.to_string()),
                    Err(PATH_CHAR.to_owned()),
                    "byte {b:#04x} in path"
                );
            }
        }
    }
}

#[test]
fn segments_and_paths_are_validated_like_go_spiffe() {
    let td = TrustDomain::new("trustdomain").unwrap();
    assert_eq!(
        SpiffeId::from_segments(&td, &[""]),
        Err(IdError::EmptySegment)
    );
    assert_eq!(
        SpiffeId::from_segments(&td, &["/"]),
        Err(IdError::BadPathSegmentChar)
    );
    assert_eq!(
        SpiffeId::from_segments(&td, &["/foo"]),
        Err(IdError::BadPathSegmentChar)
    );
    assert_eq!(
        SpiffeId::from_segments(&td, &["$"]),
        Err(IdError::BadPathSegmentChar)
    );
    assert_eq!(
        SpiffeId::from_segments(&td, &["a", "b"]).unwrap().as_str(),
        "spiffe://trustdomain/a/b"
    );
    assert_eq!(
        SpiffeId::from_path(&td, "foo"),
        Err(IdError::NoLeadingSlash)
    );
    assert_eq!(SpiffeId::from_path(&td, "/"), Err(IdError::TrailingSlash));
    assert_eq!(
        SpiffeId::from_path(&td, "/a/b").unwrap().as_str(),
        "spiffe://trustdomain/a/b"
    );
    assert_eq!(
        SpiffeId::from_path(&td, "").unwrap().as_str(),
        "spiffe://trustdomain"
    );
}

#[test]
fn trust_domains_parse_from_names_and_ids() {
    let want = TrustDomain::new("trustdomain").unwrap();
    for input in [
        "trustdomain",
        "spiffe://trustdomain",
        "spiffe://trustdomain/path",
    ] {
        assert_eq!(input.parse::<TrustDomain>().unwrap(), want, "{input}");
    }
    assert_eq!(
        "".parse::<TrustDomain>().map_err(|e| e.to_string()),
        Err(MISSING_TD.to_owned())
    );
    assert_eq!(
        "BAD".parse::<TrustDomain>().map_err(|e| e.to_string()),
        Err(TD_CHAR.to_owned())
    );
    assert_eq!(want.to_string(), "trustdomain");
}

#[test]
fn length_limits() {
    let td255 = "a".repeat(MAX_TRUST_DOMAIN_LEN);
    assert!(TrustDomain::new(&td255).is_ok());
    assert!(format!("spiffe://{td255}/p").parse::<SpiffeId>().is_ok());
    let td256 = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
    assert_eq!(
        TrustDomain::new(&td256),
        Err(IdError::TrustDomainTooLong { len: 256 })
    );
    assert!(matches!(
        format!("spiffe://{td256}/p").parse::<SpiffeId>(),
        Err(IdError::TrustDomainTooLong { .. })
    ));

    let prefix = "spiffe://example.org/";
    let exact = format!("{prefix}{}", "p".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
    assert_eq!(exact.len(), MAX_SPIFFE_ID_LEN);
    assert!(exact.parse::<SpiffeId>().is_ok());
    let over = format!("{exact}p");
    assert_eq!(
        over.parse::<SpiffeId>(),
        Err(IdError::TooLong {
            len: MAX_SPIFFE_ID_LEN + 1
        })
    );
    let td = TrustDomain::new("example.org").unwrap();
    let long_segment = "p".repeat(MAX_SPIFFE_ID_LEN);
    assert!(matches!(
        SpiffeId::from_segments(&td, &[&long_segment]),
        Err(IdError::TooLong { .. })
    ));
}

proptest! {
    #[test]
    fn parsing_arbitrary_strings_never_panics(s in ".*") {
        let _ = s.parse::<SpiffeId>();
        let _ = s.parse::<TrustDomain>();
    }

    #[test]
    fn parsing_arbitrary_spiffe_prefixed_strings_never_panics(s in "spiffe://[a-z0-9./%:@_-]{0,40}") {
        let _ = s.parse::<SpiffeId>();
    }

    #[test]
    fn display_then_parse_is_identity(
        td in "[a-z0-9._-]{1,40}",
        segments in proptest::collection::vec("[a-zA-Z0-9._-]{1,12}", 0..6),
    ) {
        let td = TrustDomain::new(&td).unwrap();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        // Dot segments are invalid by construction; skip those inputs.
        prop_assume!(segments.iter().all(|s| *s != "." && *s != ".."));
        let id = SpiffeId::from_segments(&td, &segments).unwrap();
        let reparsed: SpiffeId = id.to_string().parse().unwrap();
        prop_assert_eq!(&reparsed, &id);
        prop_assert_eq!(reparsed.trust_domain(), td);
    }
}
