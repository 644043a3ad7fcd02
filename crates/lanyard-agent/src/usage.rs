//! When each entry's SVID was last served to a workload through the Workload API, and which
//! of those times the server has not heard about yet.
//!
//! The Workload API records a serve on every response it sends (cheap: one short lock and a
//! map update per SVID); the manager reports the unreported times to the server after each
//! sync and acknowledges them only once the server has accepted them, so a failed report is
//! simply retried at the next sync.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use lanyard_core::EntryId;

/// One entry's last serve, in Unix seconds (the resolution the server stores).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The entry whose SVID was served.
    pub entry_id: EntryId,
    /// When it was last served, in Unix seconds.
    pub last_served_at: i64,
}

#[derive(Debug, Default, Clone, Copy)]
struct EntryTimes {
    /// The last serve, in Unix seconds.
    served_at: i64,
    /// The last serve the server has accepted; 0 if none.
    reported_at: i64,
}

/// Remembers, per entry, when it was last served and what was last reported. Shared between
/// the Workload API (which records) and the manager (which reports).
#[derive(Debug, Default)]
pub struct UsageTracker {
    entries: Mutex<HashMap<EntryId, EntryTimes>>,
    /// Set when the server cannot take reports (a SPIRE server): recording stops too.
    stopped: AtomicBool,
}

impl UsageTracker {
    /// A tracker with nothing served yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that the SVIDs of `entry_ids` were served at `at`.
    pub fn record<'a>(&self, entry_ids: impl IntoIterator<Item = &'a EntryId>, at: SystemTime) {
        if self.stopped.load(Ordering::Relaxed) {
            return;
        }
        let at = unix_seconds(at);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for entry_id in entry_ids {
            match entries.get_mut(entry_id) {
                Some(times) => times.served_at = times.served_at.max(at),
                None => {
                    entries.insert(
                        entry_id.clone(),
                        EntryTimes {
                            served_at: at,
                            reported_at: 0,
                        },
                    );
                }
            }
        }
    }

    /// The entries served since their last accepted report, ordered by entry ID.
    pub fn unreported(&self) -> Vec<Served> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut unreported: Vec<Served> = entries
            .iter()
            .filter(|(_, times)| times.served_at > times.reported_at)
            .map(|(entry_id, times)| Served {
                entry_id: entry_id.clone(),
                last_served_at: times.served_at,
            })
            .collect();
        unreported.sort_by(|a, b| a.entry_id.cmp(&b.entry_id));
        unreported
    }

    /// Marks `reported` as accepted by the server. A serve recorded after they were taken
    /// from [`UsageTracker::unreported`] stays unreported.
    pub fn acknowledge(&self, reported: &[Served]) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for served in reported {
            if let Some(times) = entries.get_mut(&served.entry_id) {
                times.reported_at = times.reported_at.max(served.last_served_at);
            }
        }
    }

    /// Forgets entries for which `keep` is false (entries the agent no longer holds).
    pub fn retain(&self, mut keep: impl FnMut(&EntryId) -> bool) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|entry_id, _| keep(entry_id));
    }

    /// Stops recording and forgets everything: the server takes no reports.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Whether [`UsageTracker::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }
}

fn unix_seconds(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn id(name: &str) -> EntryId {
        EntryId::new(name).unwrap()
    }

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn served(name: &str, seconds: i64) -> Served {
        Served {
            entry_id: id(name),
            last_served_at: seconds,
        }
    }

    #[test]
    fn the_latest_serve_of_each_entry_is_reported() {
        let tracker = UsageTracker::new();
        assert!(tracker.unreported().is_empty());
        tracker.record([&id("b"), &id("a")], at(100));
        tracker.record([&id("a")], at(150));
        // A serve recorded late with an older time does not move the last serve back.
        tracker.record([&id("a")], at(120));
        assert_eq!(tracker.unreported(), [served("a", 150), served("b", 100)]);
    }

    #[test]
    fn an_accepted_report_is_not_repeated() {
        let tracker = UsageTracker::new();
        tracker.record([&id("a"), &id("b")], at(100));
        let report = tracker.unreported();
        tracker.acknowledge(&report);
        assert!(tracker.unreported().is_empty());

        // Served again within the same second: nothing new for the server.
        tracker.record([&id("a")], at(100));
        assert!(tracker.unreported().is_empty());

        // Served again later: only that entry is reported.
        tracker.record([&id("b")], at(200));
        assert_eq!(tracker.unreported(), [served("b", 200)]);
    }

    #[test]
    fn a_failed_report_is_retried_with_what_was_served_since() {
        let tracker = UsageTracker::new();
        tracker.record([&id("a")], at(100));
        let first = tracker.unreported();
        // The report fails: nothing is acknowledged, and the next attempt carries it again.
        assert_eq!(tracker.unreported(), first);
        tracker.record([&id("a")], at(130));
        tracker.record([&id("c")], at(140));
        assert_eq!(tracker.unreported(), [served("a", 130), served("c", 140)]);
    }

    #[test]
    fn a_serve_during_a_report_stays_unreported() {
        let tracker = UsageTracker::new();
        tracker.record([&id("a")], at(100));
        let in_flight = tracker.unreported();
        tracker.record([&id("a")], at(160));
        tracker.acknowledge(&in_flight);
        assert_eq!(tracker.unreported(), [served("a", 160)]);
        tracker.acknowledge(&tracker.unreported());
        assert!(tracker.unreported().is_empty());
    }

    #[test]
    fn entries_no_longer_held_are_forgotten() {
        let tracker = UsageTracker::new();
        tracker.record([&id("a"), &id("b")], at(100));
        tracker.retain(|entry_id| entry_id.as_str() == "b");
        assert_eq!(tracker.unreported(), [served("b", 100)]);
    }

    #[test]
    fn a_stopped_tracker_records_nothing() {
        let tracker = UsageTracker::new();
        tracker.record([&id("a")], at(100));
        tracker.stop();
        assert!(tracker.is_stopped());
        assert!(tracker.unreported().is_empty());
        tracker.record([&id("a")], at(200));
        assert!(tracker.unreported().is_empty());
    }
}
