//! The usage ledger's writer: issuances are queued by the minting paths without waiting and
//! written to the datastore in batches by one task, so that recording an SVID never slows
//! signing it. The queue is bounded; when it is full (the datastore cannot keep up), records
//! are dropped and counted rather than holding up issuance.
//!
//! What is queued when the process is killed is lost: the ledger answers "who used this
//! identity", it is not the authorization record (that is the audit log).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::datastore::{Datastore, Issuance};

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

    /// How many issuances were dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Writes queued issuances to `store` until `stopped`, then writes what is left.
pub async fn run(
    mut receiver: mpsc::Receiver<Issuance>,
    store: Arc<dyn Datastore>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let stop = tokio::select! {
            n = receiver.recv_many(&mut batch, BATCH) => n == 0,
            _ = stopped.wait_for(|s| *s) => true,
        };
        if stop {
            receiver.close();
            while let Ok(issuance) = receiver.try_recv() {
                batch.push(issuance);
            }
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
