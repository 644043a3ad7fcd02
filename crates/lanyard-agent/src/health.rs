//! `health_address`: the agent's `/live` and `/ready` over plain HTTP, for probes that speak
//! HTTP (a Kubernetes DaemonSet's `httpGet`), beside `grpc.health.v1` on the Workload API
//! socket.
//!
//! - `/live`: 200 while the agent can still serve: its manager runs and its own SVID has not
//!   expired. An agent whose SVID expired, or that was banned, cannot recover on its own.
//! - `/ready`: 200 when it is live and its last successful sync with the server is recent:
//!   within three sync intervals, and never less than [`MIN_FRESHNESS`]. Otherwise 503 with
//!   the reason. A server outage makes agents unready (workloads keep what they hold) but
//!   not dead.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::{Page, plain};
use crate::manager::AgentHealth;

/// The shortest a sync stays fresh, however short the sync interval.
pub const MIN_FRESHNESS: Duration = Duration::from_secs(15);

/// What the health checks read: the manager's health, and whether it stopped.
pub trait HealthSource: Send + Sync + 'static {
    /// The manager's latest [`AgentHealth`].
    fn health(&self) -> AgentHealth;
    /// Why the manager stopped, if it did.
    fn failure(&self) -> Option<String>;
}

/// Why the agent is not live at `now`, or `None`.
pub fn not_live(health: &AgentHealth, failure: Option<&str>, now: SystemTime) -> Option<String> {
    if let Some(failure) = failure {
        return Some(format!("the agent stopped: {failure}"));
    }
    if health.svid_expires_at <= now {
        return Some("the agent's SVID expired".to_owned());
    }
    None
}

/// Why the agent is not ready at `now`, or `None`.
pub fn not_ready(
    health: &AgentHealth,
    failure: Option<&str>,
    now: SystemTime,
    sync_interval: Duration,
) -> Option<String> {
    if let Some(dead) = not_live(health, failure, now) {
        return Some(dead);
    }
    // While the server pushes changes the agent polls less often; a quiet stretch then is no
    // sign of trouble.
    let freshness = sync_interval
        .max(health.poll_interval)
        .saturating_mul(3)
        .max(MIN_FRESHNESS);
    match health.last_sync {
        None => Some("no sync with the server has succeeded yet".to_owned()),
        Some(at) => {
            let age = now.duration_since(at).unwrap_or_default();
            (age > freshness).then(|| {
                format!(
                    "the last successful sync was {}s ago (more than {}s)",
                    age.as_secs(),
                    freshness.as_secs()
                )
            })
        }
    }
}

/// Serves `/live` and `/ready` on `listener` until `stopped` (see [`crate::http`]).
pub async fn serve(
    listener: TcpListener,
    source: Arc<dyn HealthSource>,
    sync_interval: Duration,
    stopped: watch::Receiver<bool>,
) {
    let page = HealthPage {
        source,
        sync_interval,
    };
    crate::http::serve(listener, Arc::new(page), stopped).await;
}

/// `/live` and `/ready` from a [`HealthSource`].
struct HealthPage {
    source: Arc<dyn HealthSource>,
    sync_interval: Duration,
}

impl Page for HealthPage {
    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let now = SystemTime::now();
        let health = self.source.health();
        let failure = self.source.failure();
        let verdict = match path {
            "/live" => not_live(&health, failure.as_deref(), now).map_or(Ok("live"), Err),
            "/ready" => not_ready(&health, failure.as_deref(), now, self.sync_interval)
                .map_or(Ok("ready"), Err),
            _ => return plain(StatusCode::NOT_FOUND, "not found\n".to_owned()),
        };
        match verdict {
            Ok(word) => plain(StatusCode::OK, format!("{word}\n")),
            Err(reason) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not {}: {reason}\n", path.trim_start_matches('/')),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(1_000_000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    fn health(last_sync: Option<u64>, expires: u64) -> AgentHealth {
        AgentHealth {
            last_sync: last_sync.map(at),
            svid_expires_at: at(expires),
            poll_interval: Duration::ZERO,
        }
    }

    #[test]
    fn live_until_the_svid_expires_or_the_manager_stops() {
        assert_eq!(not_live(&health(None, 100), None, at(50)), None);
        assert!(not_live(&health(None, 100), None, at(100)).is_some_and(|r| r.contains("expired")));
        assert!(
            not_live(&health(Some(40), 100), Some("banned"), at(50))
                .is_some_and(|r| r.contains("banned"))
        );
    }

    #[test]
    fn ready_while_the_last_sync_is_fresh() {
        let interval = Duration::from_secs(5);
        assert!(
            not_ready(&health(None, 1000), None, at(1), interval)
                .is_some_and(|r| r.contains("no sync"))
        );
        assert_eq!(
            not_ready(&health(Some(10), 1000), None, at(25), interval),
            None
        );
        assert!(
            not_ready(&health(Some(10), 1000), None, at(26), interval)
                .is_some_and(|r| r.contains("16s ago"))
        );
        // A short interval still allows MIN_FRESHNESS.
        let short = Duration::from_millis(100);
        assert_eq!(
            not_ready(&health(Some(10), 1000), None, at(24), short),
            None
        );
        assert!(not_ready(&health(Some(10), 1000), None, at(26), short).is_some());
        // Not live is not ready.
        assert!(not_ready(&health(Some(10), 11), None, at(12), interval).is_some());
        // While changes are pushed, polls are further apart and readiness allows for it.
        let pushed = AgentHealth {
            poll_interval: Duration::from_secs(300),
            ..health(Some(10), 10_000)
        };
        assert_eq!(not_ready(&pushed, None, at(900), interval), None);
        assert!(not_ready(&pushed, None, at(911), interval).is_some());
    }
}
