//! Rate limits on the server API, as SPIRE has them (`pkg/server/api/limits`): `AttestAgent`
//! per source address, and signing (each CSR of `BatchNewX509SVID`, each `NewJWTSVID`) per
//! source address and per agent. A call over a limit fails with `ResourceExhausted` at once;
//! SPIRE makes it wait instead, and Lanyard's agent retries with backoff.
//!
//! Each limit is a token bucket per key, refilled at the configured rate and holding one
//! second's worth (at least one call). A bucket that has refilled is the same as no bucket,
//! so buckets are dropped when the map reaches [`MAX_KEYS`], and a spray of source addresses
//! costs bounded memory. Refusals are logged once per key per [`LOG_INTERVAL`] with their
//! count, never once per call. Calls without a TCP source (the admin socket) are not limited.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use lanyard_core::SpiffeId;
use tokio::time::Instant;

use crate::config::LimitsConfig;

/// Keys each limit tracks at most; reaching it drops refilled buckets, then arbitrary ones.
pub const MAX_KEYS: usize = 65_536;
/// The longest a call over its rate waits for its turn before it is refused. SPIRE's server
/// makes calls over its limits wait rather than fail (its agent treats a refused attestation
/// as fatal); waiting is bounded so that the calls queued per key stay few (rate × this).
pub const MAX_WAIT: Duration = Duration::from_secs(3);
/// How often a key's refusals are logged, at most.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// A rate in calls per second and the burst it allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    per_second: f64,
    burst: f64,
}

impl Rate {
    /// `per_second` calls a second with a burst of one second's worth; `None` for 0 (off).
    pub fn per_second(per_second: f64) -> Option<Self> {
        (per_second.is_finite() && per_second > 0.0).then(|| Self {
            per_second,
            burst: per_second.ceil().max(1.0),
        })
    }

    /// The largest cost one call may have.
    pub fn burst(&self) -> f64 {
        self.burst
    }
}

/// The outcome of [`KeyedLimiter::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Within the limit; the tokens are taken.
    Allowed,
    /// Over the limit, but its turn comes within the allowed wait; the tokens are taken
    /// ahead and the call proceeds after this long.
    Wait(Duration),
    /// Over the limit. `log` is `Some(n)` when a line is due for this key, `n` calls having
    /// been refused since the last one.
    Refused {
        /// Whether to log now, and the count to report.
        log: Option<u64>,
        /// The call costs more than the burst, so it can never pass.
        over_burst: bool,
    },
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    refused: u64,
    last_logged: Option<Instant>,
}

/// Token buckets keyed by `K`, bounded in number.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Eq + Hash + Clone> KeyedLimiter<K> {
    /// A limiter at `rate`, tracking at most `max_keys` keys.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `cost` tokens from `key`'s bucket at `now`, if it has them.
    pub fn check(&self, key: &K, cost: u32, now: Instant) -> Decision {
        self.check_or_wait(key, cost, now, Duration::ZERO)
    }

    /// Like [`KeyedLimiter::check`], but a call whose tokens will be there within
    /// `max_wait` takes them ahead (the bucket goes into debt) and is told how long to wait.
    pub fn check_or_wait(&self, key: &K, cost: u32, now: Instant, max_wait: Duration) -> Decision {
        let cost = f64::from(cost);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(key) {
            self.make_room(&mut buckets, now);
        }
        let bucket = buckets.entry(key.clone()).or_insert_with(|| Bucket {
            tokens: self.rate.burst,
            updated: now,
            refused: 0,
            last_logged: None,
        });
        self.refill(bucket, now);
        if cost <= bucket.tokens {
            bucket.tokens -= cost;
            return Decision::Allowed;
        }
        if cost <= self.rate.burst {
            let wait = (cost - bucket.tokens) / self.rate.per_second;
            if wait.is_finite() && wait <= max_wait.as_secs_f64() {
                bucket.tokens -= cost;
                return Decision::Wait(Duration::from_secs_f64(wait));
            }
        }
        bucket.refused = bucket.refused.saturating_add(1);
        let due = bucket
            .last_logged
            .is_none_or(|last| now.saturating_duration_since(last) >= LOG_INTERVAL);
        let log = due.then(|| {
            bucket.last_logged = Some(now);
            std::mem::take(&mut bucket.refused)
        });
        Decision::Refused {
            log,
            over_burst: cost > self.rate.burst,
        }
    }

    /// How many keys are tracked.
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate.per_second).min(self.rate.burst);
        bucket.updated = now;
    }

    /// Before a new key goes in at the limit: drop every bucket that has refilled (it is
    /// equivalent to none), and if that frees less than half, arbitrary ones down to half,
    /// so the cost of a sweep is spread over as many insertions as it frees.
    fn make_room(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        if buckets.len() < self.max_keys {
            return;
        }
        let rate = self.rate;
        buckets.retain(|_, bucket| {
            let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
            bucket.tokens + elapsed * rate.per_second < rate.burst
        });
        let target = self.max_keys / 2;
        if buckets.len() > target {
            let excess: Vec<K> = buckets
                .keys()
                .take(buckets.len() - target)
                .cloned()
                .collect();
            for key in excess {
                buckets.remove(&key);
            }
        }
    }
}

/// The server API's rate limits, from `[limits]`; a limit set to 0 is absent.
#[derive(Debug)]
pub struct RateLimits {
    attestations_per_ip: Option<KeyedLimiter<IpAddr>>,
    signings_per_ip: Option<KeyedLimiter<IpAddr>>,
    signings_per_agent: Option<KeyedLimiter<SpiffeId>>,
}

impl RateLimits {
    /// The limits `config` sets.
    pub fn new(config: &LimitsConfig) -> Self {
        Self {
            attestations_per_ip: Rate::per_second(config.attestations_per_ip_per_second)
                .map(|rate| KeyedLimiter::new(rate, MAX_KEYS)),
            signings_per_ip: Rate::per_second(config.signings_per_ip_per_second)
                .map(|rate| KeyedLimiter::new(rate, MAX_KEYS)),
            signings_per_agent: Rate::per_second(config.signings_per_agent_per_second)
                .map(|rate| KeyedLimiter::new(rate, MAX_KEYS)),
        }
    }

    /// No limits.
    pub fn unlimited() -> Self {
        Self {
            attestations_per_ip: None,
            signings_per_ip: None,
            signings_per_agent: None,
        }
    }

    /// One `AttestAgent` call from `source` (absent over the admin socket).
    pub async fn attestation(&self, source: Option<IpAddr>) -> Result<(), RateLimited> {
        let (Some(limiter), Some(ip)) = (&self.attestations_per_ip, source) else {
            return Ok(());
        };
        enforce(limiter, &ip, 1, "attestation", "source address").await
    }

    /// `count` signings from `source` before the caller is authenticated.
    pub async fn signing_from(
        &self,
        source: Option<IpAddr>,
        count: usize,
    ) -> Result<(), RateLimited> {
        let (Some(limiter), Some(ip)) = (&self.signings_per_ip, source) else {
            return Ok(());
        };
        enforce(limiter, &ip, cost(count), "signing", "source address").await
    }

    /// `count` signings for the authenticated agent `agent`.
    pub async fn signing_for(&self, agent: &SpiffeId, count: usize) -> Result<(), RateLimited> {
        let Some(limiter) = &self.signings_per_agent else {
            return Ok(());
        };
        enforce(limiter, agent, cost(count), "signing", "agent").await
    }
}

/// A call refused by rate limiting; the message says which limit (the API answers it with
/// `ResourceExhausted`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RateLimited(pub String);

fn cost(count: usize) -> u32 {
    u32::try_from(count.max(1)).unwrap_or(u32::MAX)
}

async fn enforce<K: Eq + Hash + Clone + std::fmt::Display>(
    limiter: &KeyedLimiter<K>,
    key: &K,
    cost: u32,
    what: &str,
    keyed_by: &str,
) -> Result<(), RateLimited> {
    match limiter.check_or_wait(key, cost, Instant::now(), MAX_WAIT) {
        Decision::Allowed => Ok(()),
        Decision::Wait(wait) => {
            tokio::time::sleep(wait).await;
            Ok(())
        }
        Decision::Refused { log, over_burst } => {
            if let Some(refused) = log {
                tracing::warn!(
                    limit = what,
                    keyed_by,
                    key = %key,
                    refused,
                    per_second = limiter.rate.per_second,
                    "calls refused by rate limiting (counted since the last line for this key)"
                );
            }
            let burst = limiter.rate.burst();
            Err(RateLimited(if over_burst {
                format!(
                    "rejecting request due to {what} rate limiting: rate ({cost}) exceeds burst size ({burst})"
                )
            } else {
                format!(
                    "rejecting request due to {what} rate limiting: at most {} per second per {keyed_by}",
                    limiter.rate.per_second
                )
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_call_over_the_rate_waits_its_turn_within_the_bound() {
        let limiter = KeyedLimiter::new(Rate::per_second(1.0).unwrap(), 10);
        let t0 = Instant::now();
        let wait = Duration::from_secs(3);
        assert_eq!(limiter.check_or_wait(&"a", 1, t0, wait), Decision::Allowed);
        for n in 1..=3 {
            assert_eq!(
                limiter.check_or_wait(&"a", 1, t0, wait),
                Decision::Wait(Duration::from_secs(n))
            );
        }
        assert!(matches!(
            limiter.check_or_wait(&"a", 1, t0, wait),
            Decision::Refused { .. }
        ));
        // A slow rate never waits as long as its next token.
        let slow = KeyedLimiter::new(Rate::per_second(0.01).unwrap(), 10);
        assert_eq!(slow.check_or_wait(&"a", 1, t0, wait), Decision::Allowed);
        assert!(matches!(
            slow.check_or_wait(&"a", 1, t0, wait),
            Decision::Refused { .. }
        ));
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let limiter = KeyedLimiter::new(Rate::per_second(2.0).unwrap(), 10);
        let t0 = Instant::now();
        assert_eq!(limiter.check(&"a", 1, t0), Decision::Allowed);
        assert_eq!(limiter.check(&"a", 1, t0), Decision::Allowed);
        assert!(matches!(
            limiter.check(&"a", 1, t0),
            Decision::Refused {
                over_burst: false,
                ..
            }
        ));
        // Another key has its own bucket.
        assert_eq!(limiter.check(&"b", 2, t0), Decision::Allowed);
        // Half a second gives one token back.
        assert_eq!(limiter.check(&"a", 1, t0 + SECOND / 2), Decision::Allowed);
        assert!(matches!(
            limiter.check(&"a", 1, t0 + SECOND / 2),
            Decision::Refused { .. }
        ));
        // A cost above the burst never passes.
        assert!(matches!(
            limiter.check(&"c", 3, t0 + 10 * SECOND),
            Decision::Refused {
                over_burst: true,
                ..
            }
        ));
    }

    #[test]
    fn rates_below_one_allow_one_call_and_zero_is_off() {
        let rate = Rate::per_second(0.1).unwrap();
        assert_eq!(rate.burst(), 1.0);
        let limiter = KeyedLimiter::new(rate, 10);
        let t0 = Instant::now();
        assert_eq!(limiter.check(&1, 1, t0), Decision::Allowed);
        assert!(matches!(
            limiter.check(&1, 1, t0 + 9 * SECOND),
            Decision::Refused { .. }
        ));
        assert_eq!(limiter.check(&1, 1, t0 + 10 * SECOND), Decision::Allowed);
        assert_eq!(Rate::per_second(0.0), None);
        assert_eq!(Rate::per_second(f64::NAN), None);
        assert_eq!(Rate::per_second(500.0).unwrap().burst(), 500.0);
    }

    #[test]
    fn refusals_are_reported_once_per_interval_with_their_count() {
        let limiter = KeyedLimiter::new(Rate::per_second(0.001).unwrap(), 10);
        let t0 = Instant::now();
        assert_eq!(limiter.check(&"x", 1, t0), Decision::Allowed);
        let logs: Vec<Option<u64>> = (0..50)
            .map(
                |i| match limiter.check(&"x", 1, t0 + Duration::from_millis(i)) {
                    Decision::Refused { log, .. } => log,
                    Decision::Allowed | Decision::Wait(_) => panic!("allowed"),
                },
            )
            .collect();
        assert_eq!(logs[0], Some(1), "the first refusal is logged");
        assert!(logs[1..].iter().all(Option::is_none), "{logs:?}");
        match limiter.check(&"x", 1, t0 + LOG_INTERVAL) {
            Decision::Refused { log, .. } => assert_eq!(log, Some(50)),
            Decision::Allowed | Decision::Wait(_) => panic!("allowed"),
        }
    }

    #[test]
    fn a_spray_of_keys_keeps_the_map_bounded() {
        let limiter = KeyedLimiter::new(Rate::per_second(0.001).unwrap(), 100);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let _ = limiter.check(&i, 1, t0);
            assert!(limiter.len() <= 100, "{} keys after {i}", limiter.len());
        }
        // Refilled buckets go first: with a fast rate, a second later everything has.
        let fast = KeyedLimiter::new(Rate::per_second(1000.0).unwrap(), 100);
        for i in 0..100u32 {
            let _ = fast.check(&i, 1, t0);
        }
        let _ = fast.check(&1000, 1, t0 + SECOND);
        assert_eq!(fast.len(), 1);
    }

    #[tokio::test]
    async fn calls_without_a_source_address_are_not_limited_by_address() {
        let config = LimitsConfig {
            attestations_per_ip_per_second: 0.001,
            ..LimitsConfig::default()
        };
        let limits = RateLimits::new(&config);
        for _ in 0..10 {
            limits.attestation(None).await.unwrap();
        }
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        limits.attestation(Some(ip)).await.unwrap();
        let error = limits.attestation(Some(ip)).await.unwrap_err();
        assert!(error.0.contains("rate limiting"), "{error:?}");
    }
}
