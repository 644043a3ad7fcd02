//! The usage ledger's writer: issuances are queued by the minting paths without waiting and
//! written to the datastore in batches by one task, so that recording an SVID never slows
//! signing it. The queue is bounded; when it is full (the datastore cannot keep up), records
//! are dropped and counted rather than holding up issuance.
//!
//! What is queued when the process is killed is lost: the ledger answers "who used this
//! identity", it is not the authorization record (that is the audit log).
//!
//! Repeated identical issuances are coalesced so that an agent asking again and again cannot
//! grow the ledger with its request count: issuances alike in everything but serial and
//! times (kind, entry, SPIFFE ID, agent, authority, exceptions) within [`COALESCE_WINDOW`] of
//! the first are written as at most two rows, the first at once and the newest when the
//! window closes, so the ledger still shows when the identity was first and last issued and
//! how long the last one is valid ("who holds SVIDs from this authority" stays right).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use lanyard_core::SpiffeId;
use tokio::sync::{mpsc, watch};

use crate::datastore::{Datastore, Issuance, IssuanceKind};
use crate::state::Clock;

/// How long identical issuances are coalesced after the first.
pub const COALESCE_WINDOW: Duration = Duration::from_secs(60);

/// Open windows at most; beyond, every window is closed (its newest issuance written).
const MAX_WINDOWS: usize = 65_536;

/// How often closed windows are looked for.
const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// Issuances waiting to be written, at most.
const QUEUE_CAPACITY: usize = 65_536;

/// Issuances written per transaction, at most.
const BATCH: usize = 1_000;

/// The sending side, held by the server state.
#[derive(Debug, Clone)]
pub struct Ledger {
    queue: mpsc::Sender<Issuance>,
    dropped: Arc<AtomicU64>,
}

impl Ledger {
    /// A ledger and the receiving end that [`run`] drains.
    pub fn new() -> (Self, mpsc::Receiver<Issuance>) {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let ledger = Self {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        (ledger, receiver)
    }

    /// Queues an issuance without waiting.
    pub fn record(&self, issuance: Issuance) {
        if self.queue.try_send(issuance).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    "the usage ledger is behind; issuances are not being recorded"
                );
            }
        }
    }

    /// How many issuances wait in the queue.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// How many issuances were dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// What makes two issuances the same for coalescing: all but the serial and the times.
type CoalesceKey = (
    IssuanceKind,
    String,
    SpiffeId,
    SpiffeId,
    String,
    Vec<String>,
);

fn coalesce_key(issuance: &Issuance) -> CoalesceKey {
    (
        issuance.kind,
        issuance.entry_id.clone(),
        issuance.spiffe_id.clone(),
        issuance.agent_id.clone(),
        issuance.authority_id.clone(),
        issuance.exception_ids.clone(),
    )
}

#[derive(Debug)]
struct Window {
    opened_at: SystemTime,
    newest: Option<Issuance>,
}

/// The coalescing windows: a pure function of the issuances offered and the time.
#[derive(Debug, Default)]
pub struct Coalescer {
    windows: HashMap<CoalesceKey, Window>,
    coalesced: u64,
}

impl Coalescer {
    /// An empty coalescer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `issuance` (at its `issued_at`); pushes to `out` what is to be written now.
    pub fn offer(&mut self, issuance: Issuance, out: &mut Vec<Issuance>) {
        let key = coalesce_key(&issuance);
        if let Some(window) = self.windows.get_mut(&key) {
            let age = issuance
                .issued_at
                .duration_since(window.opened_at)
                .unwrap_or(Duration::ZERO);
            if age < COALESCE_WINDOW {
                if window.newest.replace(issuance).is_some() {
                    self.coalesced = self.coalesced.saturating_add(1);
                }
                return;
            }
            if let Some(newest) = self.windows.remove(&key).and_then(|w| w.newest) {
                out.push(newest);
            }
        }
        if self.windows.len() >= MAX_WINDOWS {
            self.flush_all(out);
        }
        self.windows.insert(
            key,
            Window {
                opened_at: issuance.issued_at,
                newest: None,
            },
        );
        out.push(issuance);
    }

    /// Closes the windows opened a whole window before `now`, pushing their newest issuance.
    pub fn flush_expired(&mut self, now: SystemTime, out: &mut Vec<Issuance>) {
        self.windows.retain(|_, window| {
            let open = now
                .duration_since(window.opened_at)
                .is_ok_and(|age| age < COALESCE_WINDOW)
                || now < window.opened_at;
            if !open && let Some(newest) = window.newest.take() {
                out.push(newest);
            }
            open
        });
    }

    /// Closes every window.
    pub fn flush_all(&mut self, out: &mut Vec<Issuance>) {
        out.extend(self.windows.drain().filter_map(|(_, window)| window.newest));
    }

    /// How many open windows there are.
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// How many issuances were merged into a later one and never written.
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }
}

/// Writes queued issuances to `store` until `stopped`, then writes what is left; `clock`
/// closes coalescing windows.
pub async fn run(
    mut receiver: mpsc::Receiver<Issuance>,
    store: Arc<dyn Datastore>,
    clock: Clock,
    mut stopped: watch::Receiver<bool>,
) {
    let mut received = Vec::with_capacity(BATCH);
    let mut batch = Vec::with_capacity(BATCH);
    let mut coalescer = Coalescer::new();
    let mut flush = tokio::time::interval(FLUSH_INTERVAL);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = tokio::select! {
            n = receiver.recv_many(&mut received, BATCH) => n == 0,
            _ = flush.tick() => {
                coalescer.flush_expired(clock(), &mut batch);
                false
            }
            _ = stopped.wait_for(|s| *s) => true,
        };
        if stop {
            receiver.close();
            while let Ok(issuance) = receiver.try_recv() {
                received.push(issuance);
            }
        }
        for issuance in received.drain(..) {
            coalescer.offer(issuance, &mut batch);
        }
        if stop {
            coalescer.flush_all(&mut batch);
        }
        write(&*store, &mut batch).await;
        if stop {
            return;
        }
    }
}

async fn write(store: &dyn Datastore, batch: &mut Vec<Issuance>) {
    if batch.is_empty() {
        return;
    }
    // One retry after a pause rides out a busy database; after that the batch is dropped.
    for attempt in 0..2 {
        match store.record_issuances(batch).await {
            Ok(()) => break,
            Err(error) if attempt == 0 => {
                tracing::warn!(%error, "recording issuances failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => {
                tracing::error!(%error, count = batch.len(), "recording issuances failed; dropped");
            }
        }
    }
    batch.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuance(serial: &str, entry_id: &str, issued_at: SystemTime) -> Issuance {
        let id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let agent: SpiffeId = "spiffe://example.org/spire/agent/a".parse().unwrap();
        Issuance {
            kind: IssuanceKind::X509Svid,
            serial: serial.to_owned(),
            entry_id: entry_id.to_owned(),
            spiffe_id: id,
            agent_id: agent,
            authority_id: "ab".to_owned(),
            issued_at,
            not_after: issued_at + Duration::from_secs(3600),
            exception_ids: Vec::new(),
        }
    }

    fn serials(out: &[Issuance]) -> Vec<&str> {
        out.iter().map(|i| i.serial.as_str()).collect()
    }

    #[test]
    fn identical_issuances_in_a_window_are_written_as_the_first_and_the_newest() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut coalescer = Coalescer::new();
        let mut out = Vec::new();
        for i in 0..1000u64 {
            coalescer.offer(
                issuance(&i.to_string(), "e", t0 + Duration::from_millis(i)),
                &mut out,
            );
        }
        assert_eq!(serials(&out), ["0"], "the first at once");
        // Another entry is not the same issuance.
        coalescer.offer(issuance("other", "f", t0), &mut out);
        assert_eq!(serials(&out), ["0", "other"]);
        assert_eq!(coalescer.coalesced(), 998);

        out.clear();
        coalescer.flush_expired(t0 + COALESCE_WINDOW / 2, &mut out);
        assert!(out.is_empty(), "the window is still open");
        coalescer.flush_expired(t0 + COALESCE_WINDOW, &mut out);
        assert_eq!(serials(&out), ["999"], "the newest when the window closes");
        assert_eq!(coalescer.open_windows(), 0);

        // After the window, the next one is written at once again.
        out.clear();
        coalescer.offer(issuance("next", "e", t0 + 2 * COALESCE_WINDOW), &mut out);
        assert_eq!(serials(&out), ["next"]);
    }

    #[test]
    fn an_issuance_after_the_window_writes_the_held_one_first() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut coalescer = Coalescer::new();
        let mut out = Vec::new();
        coalescer.offer(issuance("a", "e", t0), &mut out);
        coalescer.offer(issuance("b", "e", t0 + Duration::from_secs(1)), &mut out);
        coalescer.offer(issuance("c", "e", t0 + COALESCE_WINDOW), &mut out);
        assert_eq!(serials(&out), ["a", "b", "c"]);
        out.clear();
        coalescer.flush_all(&mut out);
        assert!(out.is_empty(), "nothing held: {:?}", serials(&out));
    }
}
