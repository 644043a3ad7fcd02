//! Revocations on the server: the certificate revocation lists (CRLs) it signs with each X.509
//! authority whose key it holds, and the newest revocation sequence, which agents compare with
//! the one they have applied.
//!
//! The lists are rebuilt from the datastore (every serial a live revocation names) when a
//! revocation is made or gains serials (here or, through the change feed, on another server
//! sharing the datastore), when the CA rotates, and at least every [`CRL_REFRESH`]. Each is
//! valid for [`CRL_VALIDITY`] from its `thisUpdate`, so a verifier that reads a list (nginx's
//! `ssl_crl`) always holds one that is current while its agent reaches a server.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::revocation::RevokedSerial;
use lanyard_core::x509::X509Ca;

use crate::ca::CaManager;
use crate::datastore::{Datastore, DatastoreError};

/// How long a CRL is valid after its `thisUpdate` (its `nextUpdate`).
pub const CRL_VALIDITY: Duration = Duration::from_secs(3600);

/// How often the CRLs are signed anew even when nothing changed, at least.
pub const CRL_REFRESH: Duration = Duration::from_secs(20 * 60);

/// One authority's signed list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCrl {
    /// The authority (subject key ID, hex) that signed it.
    pub authority_id: String,
    /// The DER CRL.
    pub der: Vec<u8>,
}

/// The CRLs in force.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Crls {
    /// The CRL number they carry.
    pub number: u64,
    /// When they were signed.
    pub this_update: Option<SystemTime>,
    /// One per X.509 authority whose key the server holds.
    pub lists: Vec<SignedCrl>,
    /// The serials they list.
    pub serials: usize,
}

/// Signs one CRL per authority in `cas`, each listing the serials of `serials` that it
/// issued (or whose issuer is unknown), numbered `number`, valid from `now` for
/// [`CRL_VALIDITY`]. Pure but for the signatures.
pub fn sign_crls(
    cas: &[Arc<X509Ca>],
    serials: &[RevokedSerial],
    number: u64,
    now: SystemTime,
) -> Result<Vec<SignedCrl>, lanyard_core::x509::X509Error> {
    let mut lists = Vec::with_capacity(cas.len());
    for ca in cas {
        let authority_id = ca.authority_id();
        let mut listed: Vec<RevokedSerial> = serials
            .iter()
            .filter(|s| s.listed_by(&authority_id))
            .cloned()
            .collect();
        listed.sort_by(|a, b| a.serial.cmp(&b.serial));
        listed.dedup_by(|a, b| a.serial == b.serial);
        let der = ca.sign_crl(&listed, number, now, now + CRL_VALIDITY)?;
        lists.push(SignedCrl { authority_id, der });
    }
    Ok(lists)
}

/// The server's revocation state.
#[derive(Debug, Default)]
pub struct RevocationState {
    crls: RwLock<Arc<Crls>>,
    /// The highest revocation sequence in the datastore at the last refresh.
    sequence: std::sync::atomic::AtomicI64,
    refresh_lock: tokio::sync::Mutex<()>,
}

impl RevocationState {
    /// No revocations known and no CRLs yet: [`RevocationState::refresh`] fills it.
    pub fn new() -> Self {
        Self::default()
    }

    /// The CRLs in force.
    pub fn crls(&self) -> Arc<Crls> {
        Arc::clone(&self.crls.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The highest revocation sequence at the last refresh (0 when there is none).
    pub fn sequence(&self) -> i64 {
        self.sequence.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the CRLs are due to be signed again at `now`.
    pub fn due(&self, now: SystemTime) -> bool {
        self.crls()
            .this_update
            .is_none_or(|signed| now.duration_since(signed).unwrap_or_default() >= CRL_REFRESH)
    }

    /// Reads the revocations from `store` and signs the CRLs anew with every X.509 authority
    /// of `ca` whose key the server holds. On failure the CRLs in force stay.
    pub async fn refresh(
        &self,
        store: &dyn Datastore,
        ca: &CaManager,
        now: SystemTime,
    ) -> Result<(), DatastoreError> {
        let _one_at_a_time = self.refresh_lock.lock().await;
        let sequence = store
            .list_revocations(self.sequence())
            .await?
            .last()
            .map_or(self.sequence(), |r| r.sequence);
        let serials = store.list_revoked_serials(None).await?;
        let (current, next) = ca.x509_slots();
        let cas: Vec<Arc<X509Ca>> = [current, next]
            .into_iter()
            .flatten()
            .map(|slot| Arc::clone(&slot.ca))
            .collect();
        let previous = self.crls();
        // Increasing for each issuer: the signing second, or one more than the last.
        let seconds = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let number = seconds.max(previous.number + 1);
        let lists = sign_crls(&cas, &serials, number, now)
            .map_err(|e| DatastoreError::Backend(format!("signing the CRLs failed: {e}")))?;
        *self.crls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Crls {
            number,
            this_update: Some(now),
            lists,
            serials: serials.len(),
        });
        self.sequence
            .fetch_max(sequence, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }
}
