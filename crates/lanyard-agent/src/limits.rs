//! What one caller of the Workload API may take of the agent: open connections per uid
//! (counted from each connection's kernel credentials as it is accepted), calls per second
//! per uid (a token bucket, refilled continuously), and the log lines about offenders — one
//! per offender per interval, however often it offends, so that an attack cannot also flood
//! the log. Also the agent's own descriptor limit, raised at start as Go programs do.
//!
//! The decisions take `now` and do no I/O; the Workload API server only applies them.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The least time between two log lines about one offender.
pub const OFFENDER_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Offenders remembered before idle ones are forgotten.
const MAX_TRACKED: usize = 4096;

/// Decides when to log about an offender: at its first offence, then at most once per
/// interval, each line counting the offences since the last one.
#[derive(Debug)]
pub struct OffenderLog<K> {
    interval: Duration,
    offenders: HashMap<K, Offender>,
}

#[derive(Debug)]
struct Offender {
    logged_at: Instant,
    unlogged: u64,
}

impl<K: Hash + Eq + Copy> OffenderLog<K> {
    /// A log that speaks about each offender at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            offenders: HashMap::new(),
        }
    }

    /// Records an offence by `key` at `now`. Returns how many offences a line logged now
    /// should report (this one and those not yet reported), or `None` to stay quiet.
    pub fn offence(&mut self, key: K, now: Instant) -> Option<u64> {
        if self.offenders.len() >= MAX_TRACKED && !self.offenders.contains_key(&key) {
            let interval = self.interval;
            self.offenders
                .retain(|_, offender| now.saturating_duration_since(offender.logged_at) < interval);
        }
        match self.offenders.get_mut(&key) {
            Some(offender) if now.saturating_duration_since(offender.logged_at) < self.interval => {
                offender.unlogged = offender.unlogged.saturating_add(1);
                None
            }
            Some(offender) => {
                let count = offender.unlogged.saturating_add(1);
                offender.logged_at = now;
                offender.unlogged = 0;
                Some(count)
            }
            None => {
                self.offenders.insert(
                    key,
                    Offender {
                        logged_at: now,
                        unlogged: 0,
                    },
                );
                Some(1)
            }
        }
    }
}

/// Counts open connections per uid and refuses those beyond the limit.
#[derive(Debug)]
pub struct ConnectionLimiter {
    max_per_uid: usize,
    state: Mutex<ConnectionState>,
}

#[derive(Debug)]
struct ConnectionState {
    open: HashMap<u32, usize>,
    log: OffenderLog<u32>,
}

/// A connection refused because its uid already holds the most it may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionRefused {
    /// The caller's uid.
    pub uid: u32,
    /// The limit it reached.
    pub limit: usize,
    /// Refusals to log now (this one and those since the last line), if it is time to.
    pub to_log: Option<u64>,
}

impl ConnectionLimiter {
    /// A limiter letting each uid hold `max_per_uid` connections.
    pub fn new(max_per_uid: usize) -> Arc<Self> {
        Arc::new(Self {
            max_per_uid,
            state: Mutex::new(ConnectionState {
                open: HashMap::new(),
                log: OffenderLog::new(OFFENDER_LOG_INTERVAL),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, ConnectionState> {
        // The state is a set of counters, consistent after every statement.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits one more connection of `uid`, or refuses it. The connection counts until the
    /// returned slot is dropped.
    pub fn admit(
        self: &Arc<Self>,
        uid: u32,
        now: Instant,
    ) -> Result<ConnectionSlot, ConnectionRefused> {
        let mut guard = self.state();
        let state = &mut *guard;
        let open = state.open.entry(uid).or_insert(0);
        if *open >= self.max_per_uid {
            let to_log = state.log.offence(uid, now);
            return Err(ConnectionRefused {
                uid,
                limit: self.max_per_uid,
                to_log,
            });
        }
        *open += 1;
        Ok(ConnectionSlot {
            limiter: Arc::clone(self),
            uid,
        })
    }

    /// The connections `uid` holds open.
    pub fn open(&self, uid: u32) -> usize {
        self.state().open.get(&uid).copied().unwrap_or(0)
    }
}

/// One admitted connection; dropping it (when the connection closes) frees its place.
#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: Arc<ConnectionLimiter>,
    uid: u32,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut state = self.limiter.state();
        if let Some(open) = state.open.get_mut(&self.uid) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                state.open.remove(&self.uid);
            }
        }
    }
}

/// A token bucket per uid: `burst` calls at once, refilled at `per_second`.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: u32,
    burst: u32,
    state: Mutex<RateState>,
}

#[derive(Debug)]
struct RateState {
    buckets: HashMap<u32, Bucket>,
    log: OffenderLog<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A call refused because its uid is over its rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    /// The caller's uid.
    pub uid: u32,
    /// The sustained rate it exceeded.
    pub per_second: u32,
    /// Refusals to log now (this one and those since the last line), if it is time to.
    pub to_log: Option<u64>,
}

impl RateLimiter {
    /// A limiter allowing each uid `burst` calls at once and `per_second` sustained; a
    /// `per_second` of 0 allows everything.
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second,
            burst,
            state: Mutex::new(RateState {
                buckets: HashMap::new(),
                log: OffenderLog::new(OFFENDER_LOG_INTERVAL),
            }),
        }
    }

    /// Takes one call from `uid`'s bucket at `now`, or refuses it.
    pub fn check(&self, uid: u32, now: Instant) -> Result<(), RateLimited> {
        if self.per_second == 0 {
            return Ok(());
        }
        let burst = f64::from(self.burst);
        let per_second = f64::from(self.per_second);
        let refill = |bucket: &Bucket| {
            let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
            (bucket.tokens + elapsed * per_second).min(burst)
        };
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *guard;
        if state.buckets.len() >= MAX_TRACKED && !state.buckets.contains_key(&uid) {
            // A full bucket is the same as none.
            state.buckets.retain(|_, bucket| refill(bucket) < burst);
        }
        let bucket = state.buckets.entry(uid).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let tokens = refill(bucket);
        bucket.updated = now.max(bucket.updated);
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            return Ok(());
        }
        bucket.tokens = tokens;
        let to_log = state.log.offence(uid, now);
        Err(RateLimited {
            uid,
            per_second: self.per_second,
            to_log,
        })
    }
}

/// The soft limit on open files before and after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// The soft limit found at start (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now.
    pub after: Option<u64>,
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit, as every Go program does at
/// start: the common soft limit of 1024 is what a few hundred idle workload connections
/// would otherwise exhaust, and the hard limit is what the operator granted.
pub fn raise_open_files_limit() -> std::io::Result<OpenFilesLimit> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current == limit.maximum {
        return Ok(OpenFilesLimit {
            before,
            after: before,
        });
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised)?;
    Ok(OpenFilesLimit {
        before,
        after: getrlimit(Resource::Nofile).current,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn an_offender_is_logged_once_per_interval_with_a_count() {
        let mut log = OffenderLog::new(Duration::from_secs(60));
        let start = Instant::now();
        assert_eq!(log.offence(7, start), Some(1));
        for i in 1..=100 {
            assert_eq!(log.offence(7, start + Duration::from_millis(i * 10)), None);
        }
        // Another offender is logged at once.
        assert_eq!(log.offence(8, start + SECOND), Some(1));
        // The next line for 7 reports the hundred it kept quiet about, and this one.
        assert_eq!(log.offence(7, start + 60 * SECOND), Some(101));
        assert_eq!(log.offence(7, start + 61 * SECOND), None);
    }

    #[test]
    fn connections_beyond_the_cap_are_refused_until_one_closes() {
        let limiter = ConnectionLimiter::new(2);
        let now = Instant::now();
        let first = limiter.admit(1000, now).unwrap();
        let _second = limiter.admit(1000, now).unwrap();
        let refused = limiter.admit(1000, now).unwrap_err();
        assert_eq!(
            refused,
            ConnectionRefused {
                uid: 1000,
                limit: 2,
                to_log: Some(1)
            }
        );
        assert_eq!(limiter.admit(1000, now).unwrap_err().to_log, None);
        // Another uid has its own count.
        let _other = limiter.admit(1001, now).unwrap();
        assert_eq!(limiter.open(1000), 2);
        drop(first);
        assert_eq!(limiter.open(1000), 1);
        let _third = limiter.admit(1000, now).unwrap();
        assert!(limiter.admit(1000, now).is_err());
    }

    #[test]
    fn closed_connections_leave_nothing_behind() {
        let limiter = ConnectionLimiter::new(3);
        let now = Instant::now();
        let slots: Vec<_> = (0..3).map(|_| limiter.admit(5, now).unwrap()).collect();
        drop(slots);
        assert_eq!(limiter.open(5), 0);
        assert!(limiter.state().open.is_empty());
    }

    #[test]
    fn the_token_bucket_allows_a_burst_then_the_rate() {
        let limiter = RateLimiter::new(10, 5);
        let start = Instant::now();
        for _ in 0..5 {
            limiter.check(1, start).unwrap();
        }
        let refused = limiter.check(1, start).unwrap_err();
        assert_eq!((refused.uid, refused.per_second), (1, 10));
        assert_eq!(refused.to_log, Some(1));
        assert_eq!(limiter.check(1, start).unwrap_err().to_log, None);
        // Another uid is not affected.
        limiter.check(2, start).unwrap();
        // A tenth of a second refills one call.
        limiter
            .check(1, start + Duration::from_millis(100))
            .unwrap();
        assert!(
            limiter
                .check(1, start + Duration::from_millis(100))
                .is_err()
        );
        // An idle second refills no more than the burst.
        let later = start + 10 * SECOND;
        for _ in 0..5 {
            limiter.check(1, later).unwrap();
        }
        assert!(limiter.check(1, later).is_err());
    }

    #[test]
    fn a_zero_rate_means_no_limit() {
        let limiter = RateLimiter::new(0, 0);
        let now = Instant::now();
        for _ in 0..10_000 {
            limiter.check(1, now).unwrap();
        }
    }

    #[test]
    fn the_open_files_limit_ends_at_the_hard_limit() {
        let limit = raise_open_files_limit().unwrap();
        let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(limit.after, now.current);
        assert_eq!(now.current, now.maximum);
    }
}
