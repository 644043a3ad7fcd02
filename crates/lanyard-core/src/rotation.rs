//! Rotation math as pure functions: when an SVID should be renewed, when a CA authority's
//! successor is prepared and activated, and retry backoff.
//!
//! Randomness enters as an explicit [`Jitter`] so that schedules are reproducible in tests.

use std::time::{Duration, SystemTime};

/// Relative jitter applied to the renewal point, as a fraction of half the lifetime.
pub const RENEWAL_JITTER: f64 = 0.10;

/// The longest span over which a successor CA is prepared ahead of expiry (SPIRE's cap).
pub const MAX_PREPARE_AHEAD: Duration = Duration::from_secs(30 * 24 * 3600);

/// The longest span over which a successor CA is activated ahead of expiry (SPIRE's cap).
pub const MAX_ACTIVATE_AHEAD: Duration = Duration::from_secs(7 * 24 * 3600);

/// A jitter value in `[-1.0, 1.0]`, scaled by [`RENEWAL_JITTER`] where it is applied.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Jitter(f64);

impl Jitter {
    /// No jitter: renew exactly at half-life.
    pub const NONE: Jitter = Jitter(0.0);

    /// A jitter from a fraction, clamped to `[-1.0, 1.0]`; NaN counts as zero.
    pub fn new(fraction: f64) -> Self {
        if fraction.is_nan() {
            return Self::NONE;
        }
        Self(fraction.clamp(-1.0, 1.0))
    }

    /// A jitter spread evenly over `[-1.0, 1.0]` from random bits.
    pub fn from_random(bits: u64) -> Self {
        // The top 53 bits give every representable step of an f64 in [0, 1).
        let unit = (bits >> 11) as f64 / (1u64 << 53) as f64;
        Self::new(unit * 2.0 - 1.0)
    }

    /// A fresh random jitter from the system RNG.
    pub fn random() -> Self {
        let mut bytes = [0u8; 8];
        // An unavailable RNG leaves the jitter at zero, which only makes renewal less spread.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
        Self::from_random(u64::from_le_bytes(bytes))
    }

    /// The fraction in `[-1.0, 1.0]`.
    pub fn fraction(self) -> f64 {
        self.0
    }
}

/// When a credential valid over `[not_before, not_after]` should be renewed: at half its
/// lifetime, moved by up to ±10% of that half by `jitter` (positive renews later).
///
/// A credential whose `not_after` is not after `not_before` is due at `not_before`.
pub fn renewal_time(not_before: SystemTime, not_after: SystemTime, jitter: Jitter) -> SystemTime {
    let Ok(lifetime) = not_after.duration_since(not_before) else {
        return not_before;
    };
    let half = lifetime / 2;
    let shift = half.mul_f64(RENEWAL_JITTER * jitter.fraction().abs());
    let base = not_before + half;
    if jitter.fraction() >= 0.0 {
        base + shift
    } else {
        base - shift
    }
}

/// Whether a credential is due for renewal at `now` (see [`renewal_time`]). An expired
/// credential is always due.
pub fn should_renew(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    jitter: Jitter,
) -> bool {
    now >= not_after || now >= renewal_time(not_before, not_after, jitter)
}

/// The two transition points of a CA authority slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaSchedule {
    /// From here on the next authority should exist (prepared and published in the bundle).
    pub prepare_at: SystemTime,
    /// From here on the next authority should sign (activated).
    pub activate_at: SystemTime,
}

/// The schedule for the authority that is active over `[not_before, not_after]`: prepare the
/// successor at 1/2 of its life and activate it at 5/6, but never more than 30 days
/// (prepare) or 7 days (activate) ahead of expiry.
pub fn ca_schedule(not_before: SystemTime, not_after: SystemTime) -> CaSchedule {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let prepare_ahead = (lifetime / 2).min(MAX_PREPARE_AHEAD);
    let activate_ahead = (lifetime / 6).min(MAX_ACTIVATE_AHEAD);
    CaSchedule {
        prepare_at: not_after - prepare_ahead,
        activate_at: not_after - activate_ahead,
    }
}

/// What the CA rotator should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaAction {
    /// Nothing to do yet.
    Wait,
    /// Generate the next authority and publish it in the bundle.
    PrepareNext,
    /// Swap the prepared authority in as the signer.
    ActivateNext,
}

/// Decides the rotator's step for the active authority `[not_before, not_after]`, given
/// whether a successor is already prepared.
pub fn ca_action(
    not_before: SystemTime,
    not_after: SystemTime,
    next_prepared: bool,
    now: SystemTime,
) -> CaAction {
    let schedule = ca_schedule(not_before, not_after);
    if now < schedule.prepare_at {
        CaAction::Wait
    } else if !next_prepared {
        CaAction::PrepareNext
    } else if now >= schedule.activate_at {
        CaAction::ActivateNext
    } else {
        CaAction::Wait
    }
}

/// The longest SVID TTL a CA of `ca_ttl` can fully honour: `min(ca_ttl / 6, 7 days)`. Longer
/// TTLs are cut short by the CA's own expiry.
pub fn max_svid_ttl_for_ca_ttl(ca_ttl: Duration) -> Duration {
    (ca_ttl / 6).min(MAX_ACTIVATE_AHEAD)
}

/// Exponential backoff: `base · 2^attempt`, capped at `max`, then scaled down by up to 10%
/// with `jitter` so that many clients do not retry in step.
pub fn backoff(attempt: u32, base: Duration, max: Duration, jitter: Jitter) -> Duration {
    let factor = 2u32.saturating_pow(attempt.min(31));
    let delay = base.saturating_mul(factor).min(max);
    delay.mul_f64(1.0 - RENEWAL_JITTER * jitter.fraction().abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renewal_is_at_half_life_within_ten_percent() {
        let nb = t(1_000);
        let na = t(1_000 + 3600);
        assert_eq!(renewal_time(nb, na, Jitter::NONE), t(1_000 + 1800));
        assert_eq!(renewal_time(nb, na, Jitter::new(1.0)), t(1_000 + 1980));
        assert_eq!(renewal_time(nb, na, Jitter::new(-1.0)), t(1_000 + 1620));
        assert_eq!(renewal_time(nb, na, Jitter::new(7.0)), t(1_000 + 1980));
        assert!(!should_renew(nb, na, t(1_000 + 1799), Jitter::NONE));
        assert!(should_renew(nb, na, t(1_000 + 1800), Jitter::NONE));
        assert!(should_renew(nb, na, t(9_999), Jitter::new(1.0)));
    }

    #[test]
    fn random_jitter_stays_in_range() {
        for bits in [0, 1, u64::MAX, u64::MAX / 2, 0xdead_beef_cafe_f00d] {
            let j = Jitter::from_random(bits).fraction();
            assert!((-1.0..=1.0).contains(&j), "{j}");
        }
        assert_eq!(Jitter::from_random(0).fraction(), -1.0);
        assert_eq!(Jitter::new(f64::NAN), Jitter::NONE);
    }

    #[test]
    fn inverted_validity_is_due_immediately() {
        assert_eq!(renewal_time(t(10), t(5), Jitter::NONE), t(10));
        assert!(should_renew(t(10), t(5), t(10), Jitter::NONE));
    }

    #[test]
    fn a_24h_ca_prepares_at_12h_and_activates_at_20h() {
        let s = ca_schedule(t(0), t(24 * 3600));
        assert_eq!(s.prepare_at, t(12 * 3600));
        assert_eq!(s.activate_at, t(20 * 3600));
        assert_eq!(
            ca_action(t(0), t(86_400), false, t(11 * 3600)),
            CaAction::Wait
        );
        assert_eq!(
            ca_action(t(0), t(86_400), false, t(12 * 3600)),
            CaAction::PrepareNext
        );
        assert_eq!(
            ca_action(t(0), t(86_400), true, t(13 * 3600)),
            CaAction::Wait
        );
        assert_eq!(
            ca_action(t(0), t(86_400), true, t(20 * 3600)),
            CaAction::ActivateNext
        );
        // Past the activation point with nothing prepared: prepare first.
        assert_eq!(
            ca_action(t(0), t(86_400), false, t(21 * 3600)),
            CaAction::PrepareNext
        );
    }

    #[test]
    fn long_lived_cas_are_capped() {
        let year = 365 * 24 * 3600;
        let s = ca_schedule(t(0), t(year));
        assert_eq!(s.prepare_at, t(year) - MAX_PREPARE_AHEAD);
        assert_eq!(s.activate_at, t(year) - MAX_ACTIVATE_AHEAD);
        assert_eq!(max_svid_ttl_for_ca_ttl(24 * HOUR), 4 * HOUR);
        assert_eq!(
            max_svid_ttl_for_ca_ttl(Duration::from_secs(year)),
            MAX_ACTIVATE_AHEAD
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert_eq!(backoff(0, base, max, Jitter::NONE), base);
        assert_eq!(backoff(3, base, max, Jitter::NONE), Duration::from_secs(8));
        assert_eq!(backoff(30, base, max, Jitter::NONE), max);
        assert_eq!(backoff(u32::MAX, base, max, Jitter::NONE), max);
        assert_eq!(
            backoff(3, base, max, Jitter::new(-1.0)),
            Duration::from_millis(7200)
        );
    }
}
