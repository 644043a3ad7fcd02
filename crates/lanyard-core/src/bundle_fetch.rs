//! What a server decides about a foreign trust domain's bundle fetched from its SPIFFE bundle
//! endpoint: whether the bundle is the relationship's trust domain's, whether it replaces the
//! stored one, and when to fetch again.
//!
//! The wire carries no trust domain name (B-9), so a bundle whose CA certificates carry the
//! SPIFFE ID of another trust domain is refused as that domain's. The sequence number only
//! moves forward (B-3): with several servers sharing one datastore, a server that fetched
//! before another must not write back the older bundle. The schedule is SPIRE's: a quarter of
//! the refresh hint (bounded here to [`MIN_REFRESH_HINT`], [`MAX_REFRESH_HINT`]), five
//! minutes for a bundle without a hint (B-12), one minute while no bundle is held; after a
//! failure the wait doubles from there up to four times that (the hint itself), and never
//! retries at once (F-14).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::bundle::TrustBundle;
use crate::id::TrustDomain;
use crate::x509;

/// The smallest refresh hint honoured: a peer asking for more is fetched this often (SPIRE's
/// minimum).
pub const MIN_REFRESH_HINT: Duration = Duration::from_secs(60);

/// The largest refresh hint honoured: a peer's bundle is fetched at least every quarter of it,
/// however long the hint it serves.
pub const MAX_REFRESH_HINT: Duration = Duration::from_secs(60 * 60);

/// Fetches per refresh hint: several, so that one failed fetch does not leave a whole hint
/// period without a refresh (SPIRE's).
pub const ATTEMPTS_PER_REFRESH_HINT: u32 = 4;

/// The interval for a held bundle that carries no refresh hint (B-12, SPIRE's).
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// The interval while no bundle of the trust domain is held (SPIRE's): short, so that a
/// relationship bootstrapped later starts being fetched soon.
pub const NO_BUNDLE_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// The longest wait after failures, however long the interval they back off from.
pub const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(10 * 60);

/// The largest bundle endpoint response read; a larger one is refused.
pub const MAX_BUNDLE_RESPONSE_LEN: usize = 1024 * 1024;

/// The bundle a fetcher holds for a trust domain, as far as scheduling is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldBundle {
    /// None yet.
    None,
    /// One with this refresh hint (`None` when it carries none).
    WithHint(Option<Duration>),
}

impl HeldBundle {
    /// What `bundle` (if any) means for the schedule.
    pub fn of(bundle: Option<&TrustBundle>) -> Self {
        match bundle {
            Option::None => Self::None,
            Some(bundle) => Self::WithHint(bundle.refresh_hint()),
        }
    }
}

/// The interval between successful fetches for `held`.
pub fn refresh_interval(held: HeldBundle) -> Duration {
    match held {
        HeldBundle::None => NO_BUNDLE_REFRESH_INTERVAL,
        // A hint of 0 is no hint to act on; SPIRE treats it as absent too.
        HeldBundle::WithHint(None | Some(Duration::ZERO)) => DEFAULT_REFRESH_INTERVAL,
        HeldBundle::WithHint(Some(hint)) => {
            hint.clamp(MIN_REFRESH_HINT, MAX_REFRESH_HINT) / ATTEMPTS_PER_REFRESH_HINT
        }
    }
}

/// How long to wait before the next fetch, holding `held`, after `consecutive_failures`
/// failed fetches in a row (0 after a success): the interval, doubled per failure beyond the
/// first, up to four intervals and at most [`MAX_FAILURE_BACKOFF`] (never below one interval).
pub fn next_fetch_in(held: HeldBundle, consecutive_failures: u32) -> Duration {
    let interval = refresh_interval(held);
    if consecutive_failures <= 1 {
        return interval;
    }
    let doublings = (consecutive_failures - 1).min(2);
    let backed_off = interval.saturating_mul(1 << doublings);
    backed_off.min(MAX_FAILURE_BACKOFF).max(interval)
}

/// A fetched bundle whose CA certificates carry another trust domain's SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the bundle is {found}'s, not {expected}'s: an X.509 authority carries the SPIFFE ID spiffe://{found}"
)]
pub struct WrongTrustDomain {
    /// The trust domain fetched for.
    pub expected: TrustDomain,
    /// The trust domain an authority names.
    pub found: TrustDomain,
}

/// Refuses a bundle fetched for `trust_domain` whose X.509 authorities name another trust
/// domain in their URI SAN. Authorities without a SPIFFE ID (allowed for CA certificates,
/// X-8) name none and pass.
pub fn check_trust_domain(
    trust_domain: &TrustDomain,
    bundle: &TrustBundle,
) -> Result<(), WrongTrustDomain> {
    for authority in bundle.x509_authorities() {
        if let Ok(id) = x509::spiffe_id_of(authority.der())
            && &id.trust_domain() != trust_domain
        {
            return Err(WrongTrustDomain {
                expected: trust_domain.clone(),
                found: id.trust_domain(),
            });
        }
    }
    Ok(())
}

/// How a fetched bundle compares with the one stored for its trust domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchedBundleChange {
    /// Store it: nothing is stored, its sequence number is higher, or at the same sequence
    /// number its content differs (a peer that does not number its bundles).
    Newer,
    /// The same sequence number, authorities and refresh hint: nothing to write.
    Unchanged,
    /// A lower sequence number than the stored bundle's: keep the stored one.
    Older {
        /// The stored bundle's sequence number.
        stored: u64,
    },
}

/// Compares `fetched` with `stored`, the trust domain's bundle as stored now. Taint flags and
/// JWT key expiries are not on the wire, so they take no part.
pub fn compare_fetched(stored: Option<&TrustBundle>, fetched: &TrustBundle) -> FetchedBundleChange {
    let Some(stored) = stored else {
        return FetchedBundleChange::Newer;
    };
    match fetched.sequence_number().cmp(&stored.sequence_number()) {
        std::cmp::Ordering::Greater => FetchedBundleChange::Newer,
        std::cmp::Ordering::Less => FetchedBundleChange::Older {
            stored: stored.sequence_number(),
        },
        std::cmp::Ordering::Equal if same_content(stored, fetched) => {
            FetchedBundleChange::Unchanged
        }
        std::cmp::Ordering::Equal => FetchedBundleChange::Newer,
    }
}

fn same_content(a: &TrustBundle, b: &TrustBundle) -> bool {
    let x509 = |bundle: &TrustBundle| -> BTreeSet<Vec<u8>> {
        bundle
            .x509_authorities()
            .iter()
            .map(|authority| authority.der().to_vec())
            .collect()
    };
    let jwt = |bundle: &TrustBundle| -> BTreeSet<(String, Vec<u8>)> {
        bundle
            .jwt_authorities()
            .iter()
            .map(|authority| {
                (
                    authority.key_id().to_owned(),
                    authority.public_key_der().to_vec(),
                )
            })
            .collect()
    };
    a.refresh_hint() == b.refresh_hint() && x509(a) == x509(b) && jwt(a) == jwt(b)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::bundle::{JwtAuthority, X509Authority};
    use crate::keys::{KeyPair, KeyType};
    use crate::x509::{CaSubject, create_self_signed_ca};

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).expect("valid trust domain")
    }

    fn ca_der(trust_domain: &str) -> Vec<u8> {
        let key = KeyPair::generate(KeyType::EcP256).expect("key");
        create_self_signed_ca(
            &td(trust_domain),
            &key,
            &CaSubject::default(),
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .expect("CA")
    }

    fn bundle_of(trust_domain: &str, cas: &[&[u8]], sequence: u64) -> TrustBundle {
        let mut bundle = TrustBundle::new(td(trust_domain));
        for der in cas {
            bundle.add_x509_authority(X509Authority::new(der.to_vec()).expect("authority"));
        }
        bundle.set_sequence_number(sequence);
        bundle
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn the_interval_is_a_quarter_of_the_bounded_hint() {
        let with = |secs| refresh_interval(HeldBundle::WithHint(Some(Duration::from_secs(secs))));
        assert_eq!(with(300), Duration::from_secs(75));
        assert_eq!(with(60), Duration::from_secs(15));
        // Below the minimum: as if the minimum; above the maximum: as if the maximum.
        assert_eq!(with(1), Duration::from_secs(15));
        assert_eq!(with(10 * 24 * 3600), Duration::from_secs(15 * 60));
        assert_eq!(with(0), DEFAULT_REFRESH_INTERVAL);
        assert_eq!(
            refresh_interval(HeldBundle::WithHint(None)),
            5 * MINUTE,
            "no hint: SPIRE's five minutes"
        );
        assert_eq!(refresh_interval(HeldBundle::None), MINUTE, "no bundle yet");
    }

    #[test]
    fn failures_back_off_up_to_the_hint_and_a_ceiling() {
        let hinted = HeldBundle::WithHint(Some(MINUTE));
        let waits: Vec<u64> = (0..6).map(|n| next_fetch_in(hinted, n).as_secs()).collect();
        assert_eq!(waits, [15, 15, 30, 60, 60, 60]);
        let unhinted = HeldBundle::WithHint(None);
        let waits: Vec<u64> = (0..5)
            .map(|n| next_fetch_in(unhinted, n).as_secs())
            .collect();
        assert_eq!(waits, [300, 300, 600, 600, 600], "capped at ten minutes");
        let waits: Vec<u64> = (0..5)
            .map(|n| next_fetch_in(HeldBundle::None, n).as_secs())
            .collect();
        assert_eq!(waits, [60, 60, 120, 240, 240]);
        assert_eq!(next_fetch_in(hinted, u32::MAX), MINUTE, "no overflow");
    }

    /// A virtual clock over a peer whose endpoint (hint 60 s) is down from t=100 s to t=400 s:
    /// the fetcher never fetches more often than every 15 s, keeps trying while it is down,
    /// and is back within one hint of the endpoint's return.
    #[test]
    fn an_endpoint_down_for_several_periods_is_fetched_again_soon_after_it_returns() {
        let held = HeldBundle::WithHint(Some(MINUTE));
        let down = Duration::from_secs(100)..Duration::from_secs(400);
        let mut now = Duration::ZERO;
        let mut failures = 0;
        let mut attempts = Vec::new();
        while now < Duration::from_secs(600) {
            let ok = !down.contains(&now);
            attempts.push((now.as_secs(), ok));
            failures = if ok { 0 } else { failures + 1 };
            now += next_fetch_in(held, failures);
        }
        let gaps: Vec<u64> = attempts.windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert!(
            gaps.iter().all(|gap| (15..=60).contains(gap)),
            "{attempts:?}"
        );
        let failed = attempts.iter().filter(|(_, ok)| !ok).count();
        assert!(failed >= 5, "kept trying while down: {attempts:?}");
        let first_success_after = attempts
            .iter()
            .find(|(at, ok)| *ok && *at >= 400)
            .expect("fetched again");
        assert!(first_success_after.0 <= 460, "{attempts:?}");
    }

    #[test]
    fn a_bundle_naming_another_trust_domain_is_refused() {
        let ours = ca_der("b.org");
        let theirs = ca_der("c.org");
        assert_eq!(
            check_trust_domain(&td("b.org"), &bundle_of("b.org", &[&ours], 1)),
            Ok(())
        );
        let error = check_trust_domain(&td("b.org"), &bundle_of("b.org", &[&ours, &theirs], 1))
            .expect_err("another trust domain's authority");
        assert_eq!(error.found, td("c.org"));
        assert!(error.to_string().contains("c.org"), "{error}");
        // No authorities, nothing named: an empty bundle revokes everything (B-2) and is the
        // trust domain's to serve.
        assert_eq!(
            check_trust_domain(&td("b.org"), &TrustBundle::new(td("b.org"))),
            Ok(())
        );
    }

    #[test]
    fn only_a_newer_or_different_bundle_replaces_the_stored_one() {
        let first = ca_der("b.org");
        let second = ca_der("b.org");
        let stored = bundle_of("b.org", &[&first], 5);
        assert_eq!(compare_fetched(None, &stored), FetchedBundleChange::Newer);
        assert_eq!(
            compare_fetched(Some(&stored), &bundle_of("b.org", &[&first], 5)),
            FetchedBundleChange::Unchanged
        );
        assert_eq!(
            compare_fetched(Some(&stored), &bundle_of("b.org", &[&first, &second], 6)),
            FetchedBundleChange::Newer
        );
        assert_eq!(
            compare_fetched(Some(&stored), &bundle_of("b.org", &[&first], 6)),
            FetchedBundleChange::Newer,
            "a new sequence number alone"
        );
        assert_eq!(
            compare_fetched(Some(&stored), &bundle_of("b.org", &[&first, &second], 4)),
            FetchedBundleChange::Older { stored: 5 },
            "never back to an older sequence, whatever it holds"
        );
        assert_eq!(
            compare_fetched(Some(&stored), &bundle_of("b.org", &[&second], 5)),
            FetchedBundleChange::Newer,
            "same sequence, other keys: a peer that does not number its bundles"
        );
        let mut hinted = bundle_of("b.org", &[&first], 5);
        hinted.set_refresh_hint(Some(MINUTE));
        hinted.set_sequence_number(5);
        assert_eq!(
            compare_fetched(Some(&stored), &hinted),
            FetchedBundleChange::Newer
        );
        // JWT keys count; taint flags (not on the wire) do not.
        let key = KeyPair::generate(KeyType::EcP256).expect("key");
        let mut with_jwt = stored.clone();
        with_jwt
            .add_jwt_authority(JwtAuthority::from_key_pair("kid-1", &key, None).expect("jwt"))
            .expect("added");
        with_jwt.set_sequence_number(5);
        assert_eq!(
            compare_fetched(Some(&stored), &with_jwt),
            FetchedBundleChange::Newer
        );
        let mut tainted = with_jwt.clone();
        tainted.taint_jwt_authority("kid-1");
        tainted.set_sequence_number(5);
        assert_eq!(
            compare_fetched(Some(&tainted), &with_jwt),
            FetchedBundleChange::Unchanged
        );
    }
}
