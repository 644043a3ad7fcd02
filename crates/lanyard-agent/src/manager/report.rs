//! Reporting usage to the server: after each successful sync, the entries served to
//! workloads since their last accepted report go to `UsageService.ReportUsage` on the agent's
//! mTLS channel. A server without the service (SPIRE) is asked once; a failure is logged and
//! the same times go again at the next sync. Nothing here can fail a sync.

use std::future::Future;
use std::sync::Arc;

use tonic::Code;

use super::client::{self, ClientError, ServerClient};
use crate::usage::{Served, UsageTracker};

/// The most entries in one `ReportUsage` call.
const MAX_ENTRIES_PER_REPORT: usize = 500;

/// How one round of reporting ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Nothing was served since the last report.
    NothingToReport,
    /// The server accepted this many entries.
    Reported(usize),
    /// The server has no `UsageService`.
    Unsupported,
    /// A call failed; what it carried is reported again next time.
    Failed(ClientError),
}

/// Sends the tracker's unreported serves through `send`, in calls of at most
/// [`MAX_ENTRIES_PER_REPORT`] entries, acknowledging each call the server accepts.
pub(super) async fn report_with<F, Fut>(tracker: &UsageTracker, mut send: F) -> Outcome
where
    F: FnMut(Vec<Served>) -> Fut,
    Fut: Future<Output = Result<(), ClientError>>,
{
    let unreported = tracker.unreported();
    if unreported.is_empty() {
        return Outcome::NothingToReport;
    }
    let mut n_reported = 0;
    for chunk in unreported.chunks(MAX_ENTRIES_PER_REPORT) {
        match send(chunk.to_vec()).await {
            Ok(()) => {
                tracker.acknowledge(chunk);
                n_reported += chunk.len();
            }
            Err(error) if error.code() == Some(Code::Unimplemented) => {
                return Outcome::Unsupported;
            }
            Err(error) => return Outcome::Failed(error),
        }
    }
    Outcome::Reported(n_reported)
}

/// The manager's side of usage reporting.
pub(super) struct UsageReporter {
    tracker: Arc<UsageTracker>,
    /// The last round failed (a failure streak is logged once, as a warning).
    failing: bool,
}

impl UsageReporter {
    pub(super) fn new(tracker: Arc<UsageTracker>) -> Self {
        Self {
            tracker,
            failing: false,
        }
    }

    /// Forgets entries the agent no longer holds, then reports what was served.
    pub(super) async fn after_sync(
        &mut self,
        client: &ServerClient,
        holds: impl FnMut(&lanyard_core::EntryId) -> bool,
    ) {
        if self.tracker.is_stopped() {
            return;
        }
        self.tracker.retain(holds);
        let outcome = report_with(&self.tracker, |served| async move {
            let channel = client.channel()?;
            client::with_deadline(client::REPORT_USAGE, client::report_usage(channel, &served))
                .await
        })
        .await;
        match outcome {
            Outcome::NothingToReport => {}
            Outcome::Reported(n_entries) => {
                if self.failing {
                    tracing::info!("usage reports to the server resumed");
                }
                self.failing = false;
                tracing::debug!(n_entries, "usage reported to the server");
            }
            Outcome::Unsupported => {
                tracing::info!(
                    "the server does not take usage reports (no lanyard.api.v1.UsageService); \
                     not reporting usage"
                );
                self.tracker.stop();
            }
            Outcome::Failed(error) => {
                if self.failing {
                    tracing::debug!(%error, "reporting usage to the server failed");
                } else {
                    tracing::warn!(
                        %error,
                        "reporting usage to the server failed; retrying after the next sync"
                    );
                }
                self.failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, UNIX_EPOCH};

    use lanyard_core::EntryId;
    use tonic::Status;

    use super::*;

    fn tracker_with(names: &[&str]) -> UsageTracker {
        let tracker = UsageTracker::new();
        let ids: Vec<EntryId> = names.iter().map(|n| EntryId::new(n).unwrap()).collect();
        tracker.record(&ids, UNIX_EPOCH + Duration::from_secs(1000));
        tracker
    }

    fn failure(code: Code) -> ClientError {
        ClientError::Rpc {
            rpc: client::REPORT_USAGE,
            status: Status::new(code, "no"),
        }
    }

    #[tokio::test]
    async fn accepted_reports_are_sent_once() {
        let tracker = tracker_with(&["a", "b"]);
        let sent = Mutex::new(Vec::new());
        let outcome = report_with(&tracker, |served| {
            sent.lock().unwrap().push(served);
            async { Ok(()) }
        })
        .await;
        assert!(matches!(outcome, Outcome::Reported(2)), "{outcome:?}");
        let sent = sent.into_inner().unwrap();
        assert_eq!(sent.len(), 1);
        let names: Vec<&str> = sent[0].iter().map(|s| s.entry_id.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(sent[0].iter().all(|s| s.last_served_at == 1000));

        let outcome = report_with(&tracker, |_| async { panic!("nothing is due") }).await;
        assert!(matches!(outcome, Outcome::NothingToReport), "{outcome:?}");
    }

    #[tokio::test]
    async fn failed_reports_are_retried() {
        let tracker = tracker_with(&["a"]);
        let outcome = report_with(&tracker, |_| async { Err(failure(Code::Unavailable)) }).await;
        assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
        let retried = Mutex::new(Vec::new());
        let outcome = report_with(&tracker, |served| {
            retried.lock().unwrap().extend(served);
            async { Ok(()) }
        })
        .await;
        assert!(matches!(outcome, Outcome::Reported(1)), "{outcome:?}");
        assert_eq!(retried.into_inner().unwrap()[0].entry_id.as_str(), "a");
    }

    #[tokio::test]
    async fn large_reports_are_split_and_a_failed_call_keeps_only_its_part() {
        let names: Vec<String> = (0..MAX_ENTRIES_PER_REPORT + 10)
            .map(|i| format!("e{i:04}"))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let tracker = tracker_with(&refs);
        let mut calls = 0;
        let outcome = report_with(&tracker, |served| {
            calls += 1;
            let first_call = calls == 1;
            assert!(served.len() <= MAX_ENTRIES_PER_REPORT);
            async move {
                if first_call {
                    Ok(())
                } else {
                    Err(failure(Code::Unavailable))
                }
            }
        })
        .await;
        assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
        assert_eq!(tracker.unreported().len(), 10);
    }

    #[tokio::test]
    async fn a_server_without_the_service_is_recognised() {
        let tracker = tracker_with(&["a"]);
        let outcome = report_with(&tracker, |_| async { Err(failure(Code::Unimplemented)) }).await;
        assert!(matches!(outcome, Outcome::Unsupported), "{outcome:?}");
    }
}
