//! The CA manager: the trust domain's X.509 CA and JWT signing keys, each in two slots (A and
//! B), rotated on schedule and recorded in a journal in the datastore.
//!
//! The successor authority is prepared at 1/2 of the active one's life and published in the
//! bundle at once, so that agents and federated peers learn it before it signs anything; it
//! becomes active at 5/6. An authority stays in the bundle until it expires, and nothing it
//! signed outlives it (SVID lifetimes are capped at the signer's expiry), so the bundle always
//! holds every authority that can still verify a live SVID. Private keys live in the
//! [`KeyManager`], never in the datastore; the journal holds certificates and key IDs only.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use lanyard_core::bundle::{JwtAuthority, X509Authority};
use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::rotation::{CaAction, ca_action};
use lanyard_core::x509::{self, CaSubject, X509Ca};
use lanyard_core::{TrustBundle, TrustDomain};
use serde::{Deserialize, Serialize};

use crate::datastore::{Datastore, DatastoreError};

mod authority;

use crate::keymanager::{KeyManager, KeyManagerError};
pub use authority::{AuthorityError, AuthorityInfo, AuthorityKind, AuthorityStates};

/// Errors from the CA manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A key could not be stored or loaded.
    #[error(transparent)]
    Keys(#[from] KeyManagerError),
    /// The datastore failed.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    /// Certificate creation failed.
    #[error("creating CA certificate: {0}")]
    X509(#[from] x509::X509Error),
    /// The bundle could not be updated.
    #[error("updating bundle: {0}")]
    Bundle(#[from] lanyard_core::bundle::BundleError),
    /// The journal in the datastore is unreadable.
    #[error("CA journal is corrupt: {0}")]
    Journal(String),
    /// An operation needs an authority in a state it is not in.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The datastore holds no CA journal, but signing keys from an earlier run exist: the
    /// datastore was lost or replaced, and starting would mint a new CA over them.
    #[error(
        "the datastore records no CA, but key files of an existing trust domain are present \
         ({}); starting would create a new CA and cut off every agent. Restore the datastore \
         from a backup, or start a new trust domain on purpose with --new-trust-domain (the \
         old key files are kept, renamed)",
        .0.join(", ")
    )]
    KeysWithoutJournal(Vec<String>),
    /// The key of the active authority that the journal records is missing or does not match
    /// its certificate.
    #[error(
        "the active {kind} authority's private key {location} is {problem}; the server will \
         not replace its CA silently. Restore the key file from a backup (or restore the \
         datastore that matches the keys)"
    )]
    ActiveKeyUnusable {
        /// "X.509" or "JWT".
        kind: &'static str,
        /// Where the key should be.
        location: String,
        /// "missing" or what is wrong with it.
        problem: String,
    },
}

/// What the CA manager needs from the server configuration.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Lifetime of each authority.
    pub ca_ttl: Duration,
    /// Key type of X.509 CA keys.
    pub x509_key_type: KeyType,
    /// Key type of JWT signing keys.
    pub jwt_key_type: KeyType,
    /// Subject of CA certificates.
    pub subject: CaSubject,
    /// Start a new trust domain even though key files of an earlier one exist without a
    /// journal to account for them (they are renamed, never overwritten).
    pub new_trust_domain: bool,
    /// This server's instance name: the key of its journal in the datastore. Servers sharing
    /// a datastore each keep their own journal and keys, and publish their authorities in the
    /// one bundle.
    pub instance: String,
}

/// One of the two slots an authority lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl Slot {
    fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    fn x509_key_id(self) -> &'static str {
        match self {
            Self::A => "x509-ca-a",
            Self::B => "x509-ca-b",
        }
    }

    fn jwt_key_id(self) -> &'static str {
        match self {
            Self::A => "jwt-a",
            Self::B => "jwt-b",
        }
    }
}

/// An X.509 authority in a slot.
#[derive(Debug)]
pub struct X509Slot {
    /// Which slot.
    pub slot: Slot,
    /// The CA with its key.
    pub ca: Arc<X509Ca>,
    /// Start of validity.
    pub not_before: SystemTime,
}

/// A JWT signing key in a slot.
#[derive(Debug)]
pub struct JwtKey {
    /// Which slot.
    pub slot: Slot,
    /// The `kid` published in the bundle and put in every token.
    pub key_id: String,
    /// The private key.
    pub key: KeyPair,
    /// When the key was created.
    pub not_before: SystemTime,
    /// When the key leaves the bundle; tokens never outlive it.
    pub not_after: SystemTime,
}

#[derive(Debug, Default)]
struct CaState {
    x509_current: Option<Arc<X509Slot>>,
    x509_next: Option<Arc<X509Slot>>,
    /// The authority the last activation replaced, kept (in memory only) until it expires so
    /// that the SVIDs it signed still have a CRL.
    x509_retired: Option<Arc<X509Slot>>,
    jwt_current: Option<Arc<JwtKey>>,
    jwt_next: Option<Arc<JwtKey>>,
    bundle: Option<Arc<TrustBundle>>,
}

/// The persisted journal: which certificate and key ID sit in which slot.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Journal {
    x509: Vec<X509Record>,
    jwt: Vec<JwtRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Active,
    Prepared,
}

#[derive(Debug, Serialize, Deserialize)]
struct X509Record {
    slot: Slot,
    status: Status,
    certificate: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct JwtRecord {
    slot: Slot,
    status: Status,
    key_id: String,
    not_before: u64,
    not_after: u64,
}

/// What changed in one rotation step, for logs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RotationReport {
    /// An X.509 authority was prepared.
    pub x509_prepared: bool,
    /// An X.509 authority was activated.
    pub x509_activated: bool,
    /// A JWT key was prepared.
    pub jwt_prepared: bool,
    /// A JWT key was activated.
    pub jwt_activated: bool,
}

impl RotationReport {
    /// Whether anything changed.
    pub fn changed(&self) -> bool {
        self.x509_prepared || self.x509_activated || self.jwt_prepared || self.jwt_activated
    }
}

/// The CA manager.
#[derive(Debug)]
pub struct CaManager {
    config: CaConfig,
    keys: Arc<dyn KeyManager>,
    store: Arc<dyn Datastore>,
    state: RwLock<CaState>,
    /// Key IDs whose stored key this manager knows: restored from the journal or generated in
    /// this run. Any other key found in a slot about to be filled is set aside, never
    /// overwritten.
    known_keys: std::sync::Mutex<std::collections::HashSet<&'static str>>,
    /// Serializes rotation and bundle edits so that read-modify-write cycles do not interleave.
    write_lock: tokio::sync::Mutex<()>,
}

impl CaManager {
    /// Restores the authorities recorded in the journal (dropping any whose key is gone or
    /// which have expired), then brings the slots up to date for `now`.
    pub async fn load(
        config: CaConfig,
        keys: Arc<dyn KeyManager>,
        store: Arc<dyn Datastore>,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let manager = Self {
            config,
            keys,
            store,
            state: RwLock::new(CaState::default()),
            known_keys: std::sync::Mutex::default(),
            write_lock: tokio::sync::Mutex::new(()),
        };
        let _guard = manager.write_lock.lock().await;
        manager.restore(now).await?;
        drop(_guard);
        manager.rotate(now).await?;
        Ok(manager)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.config.trust_domain
    }

    /// The active X.509 CA. Present once [`CaManager::load`] has returned.
    pub fn x509_ca(&self) -> Option<Arc<X509Ca>> {
        self.read().x509_current.as_ref().map(|s| Arc::clone(&s.ca))
    }

    /// The active and prepared X.509 authorities.
    pub fn x509_slots(&self) -> (Option<Arc<X509Slot>>, Option<Arc<X509Slot>>) {
        let state = self.read();
        (state.x509_current.clone(), state.x509_next.clone())
    }

    /// The X.509 authorities whose keys this server holds and that sign CRLs at `now`: the
    /// active one, the prepared one, and the one retired last while it has not expired and is
    /// still in the bundle (not revoked).
    pub fn crl_signers(&self, now: SystemTime) -> Vec<Arc<X509Ca>> {
        let state = self.read();
        let retired = state.x509_retired.as_ref().filter(|slot| {
            slot.ca.not_after() > now
                && state
                    .bundle
                    .as_ref()
                    .is_some_and(|bundle| bundle.x509_authority(slot.ca.cert_der()).is_some())
        });
        [
            state.x509_current.as_ref(),
            state.x509_next.as_ref(),
            retired,
        ]
        .into_iter()
        .flatten()
        .map(|slot| Arc::clone(&slot.ca))
        .collect()
    }

    /// The active JWT signing key. Present once [`CaManager::load`] has returned.
    pub fn jwt_key(&self) -> Option<Arc<JwtKey>> {
        self.read().jwt_current.clone()
    }

    /// The active and prepared JWT keys.
    pub fn jwt_slots(&self) -> (Option<Arc<JwtKey>>, Option<Arc<JwtKey>>) {
        let state = self.read();
        (state.jwt_current.clone(), state.jwt_next.clone())
    }

    /// The trust domain's bundle as last written by this manager.
    pub fn bundle(&self) -> Option<Arc<TrustBundle>> {
        self.read().bundle.clone()
    }

    /// One rotation step: prepare or activate authorities as the schedule says, persist the
    /// journal and publish new authorities in the bundle.
    pub async fn rotate(&self, now: SystemTime) -> Result<RotationReport, CaError> {
        let _guard = self.write_lock.lock().await;
        let mut report = RotationReport::default();

        let (x509_current, x509_next, jwt_current, jwt_next) = {
            let s = self.read();
            (
                s.x509_current.clone(),
                s.x509_next.is_some(),
                s.jwt_current.clone(),
                s.jwt_next.is_some(),
            )
        };

        // X.509.
        match &x509_current {
            None => {
                // A prepared authority left over from before a restart is used first.
                let mut s = self.write();
                if let Some(next) = s.x509_next.take() {
                    s.x509_current = Some(next);
                } else {
                    drop(s);
                    let prepared = self.prepare_x509(Slot::A, now)?;
                    s = self.write();
                    s.x509_current = Some(prepared);
                    report.x509_prepared = true;
                }
                report.x509_activated = true;
            }
            Some(current) => {
                match ca_action(current.not_before, current.ca.not_after(), x509_next, now) {
                    CaAction::Wait => {}
                    CaAction::PrepareNext => {
                        let prepared = self.prepare_x509(current.slot.other(), now)?;
                        self.write().x509_next = Some(prepared);
                        report.x509_prepared = true;
                    }
                    CaAction::ActivateNext => {
                        let mut s = self.write();
                        if let Some(next) = s.x509_next.take() {
                            s.x509_retired = s.x509_current.replace(next);
                            report.x509_activated = true;
                        }
                    }
                }
            }
        }

        // JWT.
        match &jwt_current {
            None => {
                let mut s = self.write();
                if let Some(next) = s.jwt_next.take() {
                    s.jwt_current = Some(next);
                } else {
                    drop(s);
                    let prepared = self.prepare_jwt(Slot::A, now)?;
                    s = self.write();
                    s.jwt_current = Some(prepared);
                    report.jwt_prepared = true;
                }
                report.jwt_activated = true;
            }
            Some(current) => {
                match ca_action(current.not_before, current.not_after, jwt_next, now) {
                    CaAction::Wait => {}
                    CaAction::PrepareNext => {
                        let prepared = self.prepare_jwt(current.slot.other(), now)?;
                        self.write().jwt_next = Some(prepared);
                        report.jwt_prepared = true;
                    }
                    CaAction::ActivateNext => {
                        let mut s = self.write();
                        if let Some(next) = s.jwt_next.take() {
                            s.jwt_current = Some(next);
                            report.jwt_activated = true;
                        }
                    }
                }
            }
        }

        if report.changed() {
            self.save_journal().await?;
        }
        self.publish_bundle(now).await?;
        Ok(report)
    }

    /// Applies `edit` to the stored bundle of this trust domain and keeps it; used by the
    /// bundle API so that its edits and rotation never overwrite each other.
    pub async fn edit_bundle<F>(&self, edit: F) -> Result<Arc<TrustBundle>, CaError>
    where
        F: FnOnce(&mut TrustBundle) -> Result<(), CaError> + Send,
    {
        let _guard = self.write_lock.lock().await;
        let mut bundle = self
            .store
            .get_bundle(&self.config.trust_domain)
            .await?
            .unwrap_or_else(|| TrustBundle::new(self.config.trust_domain.clone()));
        edit(&mut bundle)?;
        let saved = Arc::new(self.store.set_bundle(bundle).await?);
        self.write().bundle = Some(Arc::clone(&saved));
        Ok(saved)
    }

    /// Generates the key for a slot. A key already stored there that this manager does not
    /// know (not restored from the journal, not generated in this run) is renamed first, so
    /// that no key the server did not account for is ever overwritten.
    fn fresh_key(&self, id: &'static str, key_type: KeyType) -> Result<KeyPair, CaError> {
        let known = self.known().contains(id);
        if !known && let Some(aside) = self.keys.set_aside(id, "replaced")? {
            tracing::warn!(key = id, kept_as = %aside, "a key file the CA journal does not account for was in the way; kept it under a new name");
        }
        let key = self.keys.generate(id, key_type)?;
        self.known().insert(id);
        Ok(key)
    }

    fn known(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<&'static str>> {
        self.known_keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that the key of every authority in a slot is still stored and is the one in
    /// use; a key that vanished (or was replaced) while the server runs is written back from
    /// memory, and said loudly. Returns the keys that had to be restored.
    pub fn check_key_files(&self) -> Result<Vec<String>, CaError> {
        let (x509s, jwts) = {
            let s = self.read();
            let x509s: Vec<Arc<X509Slot>> = [&s.x509_current, &s.x509_next]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            let jwts: Vec<Arc<JwtKey>> = [&s.jwt_current, &s.jwt_next]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            (x509s, jwts)
        };
        let in_use = x509s
            .iter()
            .map(|slot| (slot.slot.x509_key_id(), slot.ca.key()))
            .chain(jwts.iter().map(|k| (k.slot.jwt_key_id(), &k.key)));
        let mut restored = Vec::new();
        for (id, key) in in_use {
            let stored = match self.keys.load(id) {
                Ok(stored) => stored,
                Err(error) => {
                    tracing::error!(key = id, %error, "a signing key in use is unreadable on disk");
                    None
                }
            };
            if stored.is_some_and(|stored| stored.public_key_der() == key.public_key_der()) {
                continue;
            }
            let location = self.keys.locate(id);
            tracing::error!(
                key = id,
                file = %location,
                "a signing key in use vanished or was replaced while the server runs; \
                 writing it back from memory (a restart without it would refuse to start)"
            );
            if let Some(aside) = self.keys.set_aside(id, "replaced")? {
                tracing::warn!(key = id, kept_as = %aside, "kept the file that was in the way under a new name");
            }
            self.keys.store(id, key)?;
            restored.push(location);
        }
        Ok(restored)
    }

    fn prepare_x509(&self, slot: Slot, now: SystemTime) -> Result<Arc<X509Slot>, CaError> {
        let key = self.fresh_key(slot.x509_key_id(), self.config.x509_key_type)?;
        let ca = X509Ca::self_signed(
            &self.config.trust_domain,
            key,
            &self.config.subject,
            now,
            self.config.ca_ttl,
        )?;
        let (not_before, _) = x509::validity_of(ca.cert_der())?;
        Ok(Arc::new(X509Slot {
            slot,
            ca: Arc::new(ca),
            not_before,
        }))
    }

    fn prepare_jwt(&self, slot: Slot, now: SystemTime) -> Result<Arc<JwtKey>, CaError> {
        let key = self.fresh_key(slot.jwt_key_id(), self.config.jwt_key_type)?;
        // Whole seconds, so that the journal round-trips exactly.
        let not_before = UNIX_EPOCH + Duration::from_secs(unix_secs(now));
        Ok(Arc::new(JwtKey {
            slot,
            key_id: random_key_id(),
            key,
            not_before,
            not_after: not_before + self.config.ca_ttl,
        }))
    }

    /// Reads the journal back. The active authority's key must be there and match: the server
    /// refuses to start rather than replace its CA. A prepared authority whose key is gone is
    /// dropped (it signed nothing yet). With no journal at all, key files of the slots mean
    /// the datastore was lost: refused unless a new trust domain was asked for.
    async fn restore(&self, now: SystemTime) -> Result<(), CaError> {
        let Some(bytes) = self.store.get_ca_journal(&self.config.instance).await? else {
            return self.check_no_orphan_keys();
        };
        let journal: Journal =
            serde_json::from_slice(&bytes).map_err(|e| CaError::Journal(e.to_string()))?;
        let mut state = CaState::default();
        for record in journal.x509 {
            let id = record.slot.x509_key_id();
            let der = base64::engine::general_purpose::STANDARD
                .decode(&record.certificate)
                .map_err(|e| CaError::Journal(e.to_string()))?;
            let (not_before, not_after) = x509::validity_of(&der)?;
            // The file holds this authority's key (or what replaced it): ours to reuse.
            self.known().insert(id);
            if not_after <= now {
                continue;
            }
            let unusable = |problem: String| {
                self.unusable_key("X.509", id, record.status, record.slot, problem)
            };
            let key = match self.keys.load(id) {
                Ok(Some(key)) => key,
                Ok(None) => {
                    unusable("missing".to_owned())?;
                    continue;
                }
                Err(error) => {
                    unusable(format!("unreadable: {error}"))?;
                    continue;
                }
            };
            let ca = match X509Ca::new(der, key, Vec::new()) {
                Ok(ca) => ca,
                Err(error) => {
                    unusable(format!("not the key of its certificate: {error}"))?;
                    continue;
                }
            };
            let slot = Arc::new(X509Slot {
                slot: record.slot,
                ca: Arc::new(ca),
                not_before,
            });
            match record.status {
                Status::Active => state.x509_current = Some(slot),
                Status::Prepared => state.x509_next = Some(slot),
            }
        }
        let bundle = self.store.get_bundle(&self.config.trust_domain).await?;
        for record in journal.jwt {
            let id = record.slot.jwt_key_id();
            self.known().insert(id);
            let not_after = UNIX_EPOCH + Duration::from_secs(record.not_after);
            if not_after <= now {
                continue;
            }
            let unusable =
                |problem: String| self.unusable_key("JWT", id, record.status, record.slot, problem);
            let key = match self.keys.load(id) {
                Ok(Some(key)) => key,
                Ok(None) => {
                    unusable("missing".to_owned())?;
                    continue;
                }
                Err(error) => {
                    unusable(format!("unreadable: {error}"))?;
                    continue;
                }
            };
            // The bundle holds the public key published under this `kid`.
            let published = bundle
                .as_ref()
                .and_then(|b| b.jwt_authority(&record.key_id))
                .map(|a| a.public_key_der().to_vec());
            if published.is_some_and(|p| p != key.public_key_der()) {
                unusable("not the key published in the bundle under its key ID".to_owned())?;
                continue;
            }
            let jwt = Arc::new(JwtKey {
                slot: record.slot,
                key_id: record.key_id,
                key,
                not_before: UNIX_EPOCH + Duration::from_secs(record.not_before),
                not_after,
            });
            match record.status {
                Status::Active => state.jwt_current = Some(jwt),
                Status::Prepared => state.jwt_next = Some(jwt),
            }
        }
        state.bundle = bundle.map(Arc::new);
        *self.write() = state;
        Ok(())
    }

    /// An authority's key cannot be used: fatal for the active one, a warning for a prepared
    /// one (which has signed nothing and is simply prepared again).
    fn unusable_key(
        &self,
        kind: &'static str,
        id: &str,
        status: Status,
        slot: Slot,
        problem: String,
    ) -> Result<(), CaError> {
        let location = self.keys.locate(id);
        match status {
            Status::Active => Err(CaError::ActiveKeyUnusable {
                kind,
                location,
                problem,
            }),
            Status::Prepared => {
                tracing::warn!(?slot, key = %location, "the prepared {kind} authority's key is {problem}; dropping that authority, the active one stays");
                Ok(())
            }
        }
    }

    /// With no journal, slot key files can only be left from a trust domain whose datastore
    /// is gone. Refused, or with `new_trust_domain` renamed out of the way.
    fn check_no_orphan_keys(&self) -> Result<(), CaError> {
        let slot_ids = [
            Slot::A.x509_key_id(),
            Slot::B.x509_key_id(),
            Slot::A.jwt_key_id(),
            Slot::B.jwt_key_id(),
        ];
        let orphans: Vec<String> = self
            .keys
            .list()?
            .into_iter()
            .filter(|id| slot_ids.contains(&id.as_str()))
            .collect();
        if orphans.is_empty() {
            return Ok(());
        }
        if !self.config.new_trust_domain {
            return Err(CaError::KeysWithoutJournal(
                orphans.iter().map(|id| self.keys.locate(id)).collect(),
            ));
        }
        for id in &orphans {
            if let Some(aside) = self.keys.set_aside(id, "previous-trust-domain")? {
                tracing::warn!(key = %id, kept_as = %aside, "starting a new trust domain as asked; the earlier key is kept under a new name");
            }
        }
        Ok(())
    }

    async fn save_journal(&self) -> Result<(), CaError> {
        let journal = {
            let s = self.read();
            let mut journal = Journal::default();
            for (slot, status) in [
                (&s.x509_current, Status::Active),
                (&s.x509_next, Status::Prepared),
            ] {
                if let Some(slot) = slot {
                    journal.x509.push(X509Record {
                        slot: slot.slot,
                        status,
                        certificate: base64::engine::general_purpose::STANDARD
                            .encode(slot.ca.cert_der()),
                    });
                }
            }
            for (key, status) in [
                (&s.jwt_current, Status::Active),
                (&s.jwt_next, Status::Prepared),
            ] {
                if let Some(key) = key {
                    journal.jwt.push(JwtRecord {
                        slot: key.slot,
                        status,
                        key_id: key.key_id.clone(),
                        not_before: unix_secs(key.not_before),
                        not_after: unix_secs(key.not_after),
                    });
                }
            }
            journal
        };
        let bytes = serde_json::to_vec(&journal).map_err(|e| CaError::Journal(e.to_string()))?;
        self.store
            .set_ca_journal(&self.config.instance, &bytes)
            .await?;
        Ok(())
    }

    /// Makes sure every slot's authority is in the bundle and expired ones are not, and takes
    /// the stored bundle (with the authorities of every server sharing the datastore) as the
    /// one this server serves. Its own authorities are added by an atomic merge
    /// ([`Datastore::append_bundle`]), so servers publishing at once never drop each other's;
    /// run on every rotation tick, it also puts back an authority that a racing removal of
    /// expired ones took out.
    async fn publish_bundle(&self, now: SystemTime) -> Result<(), CaError> {
        let (x509s, jwts) = {
            let s = self.read();
            let x509s: Vec<Vec<u8>> = [&s.x509_current, &s.x509_next]
                .into_iter()
                .flatten()
                .map(|slot| slot.ca.cert_der().to_vec())
                .collect();
            let jwts: Vec<JwtAuthority> = [&s.jwt_current, &s.jwt_next]
                .into_iter()
                .flatten()
                .map(|k| JwtAuthority::from_key_pair(&k.key_id, &k.key, Some(k.not_after)))
                .collect::<Result<_, _>>()?;
            (x509s, jwts)
        };
        let mut own = TrustBundle::new(self.config.trust_domain.clone());
        for der in x509s {
            own.add_x509_authority(X509Authority::new(der)?);
        }
        for authority in jwts {
            own.add_jwt_authority(authority)?;
        }
        // Most ticks change nothing: read first, and take the datastore's write lock only
        // when an own authority is missing.
        let stored = self.store.get_bundle(&self.config.trust_domain).await?;
        let mut bundle = match stored {
            Some(stored) if crate::datastore::merge_bundles(&stored, &own)?.is_none() => stored,
            _ => self.store.append_bundle(own).await?,
        };
        let expired: Vec<Vec<u8>> = bundle
            .x509_authorities()
            .iter()
            .filter(|a| x509::validity_of(a.der()).is_ok_and(|(_, not_after)| not_after <= now))
            .map(|a| a.der().to_vec())
            .collect();
        let before = bundle.clone();
        for der in &expired {
            bundle.remove_x509_authority(der);
        }
        bundle.remove_expired_jwt_authorities(now);
        if bundle != before {
            bundle = self.store.set_bundle(bundle).await?;
        }
        self.write().bundle = Some(Arc::new(bundle));
        Ok(())
    }

    /// Takes the stored bundle as the one this server serves: after another server sharing
    /// the datastore changed it (the change feed calls this).
    pub async fn refresh_bundle(&self) -> Result<(), CaError> {
        // Not while a rotation publishes: what it stores is newer than what was read here.
        let _guard = self.write_lock.lock().await;
        if let Some(bundle) = self.store.get_bundle(&self.config.trust_domain).await? {
            self.write().bundle = Some(Arc::new(bundle));
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, CaState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, CaState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A random 32-character alphanumeric key ID, as SPIRE makes them.
fn random_key_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 32];
    // Without an RNG the server cannot mint keys either; the key generation that precedes this
    // call would already have failed.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}

#[cfg(test)]
mod tests {
    use lanyard_core::SpiffeId;
    use lanyard_core::x509::SvidParams;

    use super::*;
    use crate::datastore::memory::MemoryStore;
    use crate::keymanager::MemoryKeyManager;

    const HOUR: Duration = Duration::from_secs(3600);

    fn config() -> CaConfig {
        CaConfig {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            ca_ttl: 24 * HOUR,
            x509_key_type: KeyType::EcP256,
            jwt_key_type: KeyType::EcP256,
            subject: CaSubject::default(),
            new_trust_domain: false,
            instance: "local".to_owned(),
        }
    }

    fn start() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[tokio::test]
    async fn first_start_creates_and_publishes_authorities() {
        let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::new());
        let store: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
        let ca = CaManager::load(config(), keys, Arc::clone(&store), start())
            .await
            .unwrap();
        let x509 = ca.x509_ca().unwrap();
        let jwt = ca.jwt_key().unwrap();
        let bundle = store
            .get_bundle(&config().trust_domain)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bundle.x509_authorities().len(), 1);
        assert_eq!(bundle.x509_authorities()[0].der(), x509.cert_der());
        assert!(bundle.jwt_authority(&jwt.key_id).is_some());
        assert_eq!(jwt.key_id.len(), 32);

        // An SVID it mints verifies against the published bundle.
        let leaf_key = KeyPair::generate(KeyType::EcP256).unwrap();
        let id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let svid = x509
            .mint_svid(
                &SvidParams::new(id.clone(), leaf_key.public_key_der(), HOUR),
                start(),
            )
            .unwrap();
        let roots: Vec<&[u8]> = bundle.x509_authorities().iter().map(|a| a.der()).collect();
        let verified =
            x509::verify_svid_chain(svid.cert_chain(), &config().trust_domain, &roots, start())
                .unwrap();
        assert_eq!(verified.spiffe_id(), &id);
    }

    #[tokio::test]
    async fn authorities_rotate_on_schedule_and_leave_the_bundle_when_expired() {
        let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::new());
        let store: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
        let t0 = start();
        let ca = CaManager::load(config(), keys, Arc::clone(&store), t0)
            .await
            .unwrap();
        let first = ca.x509_ca().unwrap();
        let first_jwt = ca.jwt_key().unwrap().key_id.clone();

        let report = ca.rotate(t0 + 11 * HOUR).await.unwrap();
        assert!(!report.changed());

        let report = ca
            .rotate(t0 + 12 * HOUR + Duration::from_secs(20))
            .await
            .unwrap();
        assert!(report.x509_prepared && report.jwt_prepared, "{report:?}");
        assert!(!report.x509_activated);
        // Still signing with the first authority, but the bundle already has both.
        assert_eq!(ca.x509_ca().unwrap().cert_der(), first.cert_der());
        let bundle = ca.bundle().unwrap();
        assert_eq!(bundle.x509_authorities().len(), 2);
        assert_eq!(bundle.jwt_authorities().len(), 2);

        let report = ca
            .rotate(t0 + 20 * HOUR + Duration::from_secs(20))
            .await
            .unwrap();
        assert!(report.x509_activated && report.jwt_activated, "{report:?}");
        let second = ca.x509_ca().unwrap();
        assert_ne!(second.cert_der(), first.cert_der());
        assert_ne!(ca.jwt_key().unwrap().key_id, first_jwt);
        // The old authority still verifies live SVIDs, so it stays published.
        assert_eq!(ca.bundle().unwrap().x509_authorities().len(), 2);

        // Once the first authority has expired it leaves the bundle.
        ca.rotate(t0 + 24 * HOUR + Duration::from_secs(1))
            .await
            .unwrap();
        let bundle = store
            .get_bundle(&config().trust_domain)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bundle.x509_authorities().len(), 1);
        assert_eq!(bundle.x509_authorities()[0].der(), second.cert_der());
        assert!(bundle.jwt_authority(&first_jwt).is_none());
    }

    #[tokio::test]
    async fn a_restart_restores_the_same_authorities() {
        let keys: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::new());
        let store: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
        let t0 = start();
        let ca = CaManager::load(config(), Arc::clone(&keys), Arc::clone(&store), t0)
            .await
            .unwrap();
        ca.rotate(t0 + 13 * HOUR).await.unwrap();
        let (current, next) = ca.x509_slots();
        let jwt = ca.jwt_key().unwrap().key_id.clone();
        let sequence = ca.bundle().unwrap().sequence_number();
        drop(ca);

        let again = CaManager::load(config(), keys, Arc::clone(&store), t0 + 14 * HOUR)
            .await
            .unwrap();
        let (current2, next2) = again.x509_slots();
        assert_eq!(
            current2.unwrap().ca.cert_der(),
            current.unwrap().ca.cert_der()
        );
        assert_eq!(next2.unwrap().ca.cert_der(), next.unwrap().ca.cert_der());
        assert_eq!(again.jwt_key().unwrap().key_id, jwt);
        assert_eq!(
            again.bundle().unwrap().sequence_number(),
            sequence,
            "an unchanged bundle is not rewritten"
        );
    }

    #[tokio::test]
    async fn a_lost_active_key_refuses_to_start_instead_of_minting_a_new_ca() {
        let store: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
        let keys = Arc::new(MemoryKeyManager::new());
        let t0 = start();
        let ca = CaManager::load(config(), keys.clone(), Arc::clone(&store), t0)
            .await
            .unwrap();
        let old = ca.x509_ca().unwrap().cert_der().to_vec();
        drop(ca);
        keys.delete("x509-ca-a").unwrap();
        let error = CaManager::load(config(), keys.clone(), Arc::clone(&store), t0 + HOUR)
            .await
            .unwrap_err();
        assert!(
            matches!(error, CaError::ActiveKeyUnusable { kind: "X.509", .. }),
            "{error}"
        );
        assert!(error.to_string().contains("x509-ca-a"), "{error}");
        assert!(error.to_string().contains("missing"), "{error}");
        // Nothing was replaced: the bundle still holds only the old authority.
        let bundle = store
            .get_bundle(&config().trust_domain)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bundle.x509_authorities().len(), 1);
        assert_eq!(bundle.x509_authorities()[0].der(), old);

        // The JWT key too, and a key that is not the certificate's.
        let keys = Arc::new(MemoryKeyManager::new());
        let store: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
        drop(
            CaManager::load(config(), keys.clone(), Arc::clone(&store), t0)
                .await
                .unwrap(),
        );
        keys.delete("jwt-a").unwrap();
        let error = CaManager::load(config(), keys.clone(), Arc::clone(&store), t0)
            .await
            .unwrap_err();
        assert!(
            matches!(error, CaError::ActiveKeyUnusable { kind: "JWT", .. }),
            "{error}"
        );
        keys.generate("jwt-a", KeyType::EcP256).unwrap();
        let error = CaManager::load(config(), keys.clone(), Arc::clone(&store), t0)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("not the key published"),
            "{error}"
        );
        keys.generate("x509-ca-a", KeyType::EcP256).unwrap();
        let error = CaManager::load(config(), keys, Arc::clone(&store), t0)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("not the key of its certificate"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_lost_prepared_key_drops_only_that_authority() {
        let store: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
        let keys = Arc::new(MemoryKeyManager::new());
        let t0 = start();
        let ca = CaManager::load(config(), keys.clone(), Arc::clone(&store), t0)
            .await
            .unwrap();
        ca.rotate(t0 + 13 * HOUR).await.unwrap();
        let (active, prepared) = ca.x509_slots();
        assert!(prepared.is_some());
        drop(ca);
        keys.delete("x509-ca-b").unwrap();
        let again = CaManager::load(config(), keys, Arc::clone(&store), t0 + 13 * HOUR)
            .await
            .unwrap();
        let (active2, _) = again.x509_slots();
        assert_eq!(
            active2.unwrap().ca.cert_der(),
            active.unwrap().ca.cert_der(),
            "the active authority keeps signing"
        );
    }

    #[tokio::test]
    async fn keys_without_a_journal_are_refused_and_kept_for_a_new_trust_domain() {
        let keys = Arc::new(MemoryKeyManager::new());
        let t0 = start();
        let first = CaManager::load(config(), keys.clone(), Arc::new(MemoryStore::new()), t0)
            .await
            .unwrap();
        let old_key = first.x509_ca().unwrap().key().public_key_der();
        drop(first);

        // The datastore is gone: a fresh one has no journal.
        let error = CaManager::load(
            config(),
            keys.clone(),
            Arc::new(MemoryStore::new()),
            t0 + HOUR,
        )
        .await
        .unwrap_err();
        assert!(matches!(error, CaError::KeysWithoutJournal(_)), "{error}");
        assert!(error.to_string().contains("x509-ca-a"), "{error}");
        assert!(error.to_string().contains("--new-trust-domain"), "{error}");
        assert_eq!(
            keys.load("x509-ca-a").unwrap().unwrap().public_key_der(),
            old_key,
            "the refused start touched no key"
        );

        // Asked for on purpose: a new CA, and the old key kept under another name.
        let mut new_config = config();
        new_config.new_trust_domain = true;
        let second = CaManager::load(new_config, keys.clone(), Arc::new(MemoryStore::new()), t0)
            .await
            .unwrap();
        assert_ne!(second.x509_ca().unwrap().key().public_key_der(), old_key);
        let kept = format!("{keys:?}");
        assert!(kept.contains("x509-ca-a.previous-trust-domain.1"), "{kept}");
        assert_eq!(
            keys.list().unwrap(),
            ["jwt-a", "x509-ca-a"],
            "set-aside keys are not slot keys"
        );
    }

    #[tokio::test]
    async fn a_key_the_journal_does_not_know_is_set_aside_not_overwritten() {
        let keys = Arc::new(MemoryKeyManager::new());
        let store: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
        let t0 = start();
        let ca = CaManager::load(config(), keys.clone(), Arc::clone(&store), t0)
            .await
            .unwrap();
        drop(ca);
        // A key appears in slot B that no journal entry accounts for.
        let planted = keys.generate("x509-ca-b", KeyType::EcP256).unwrap();
        let ca = CaManager::load(config(), keys.clone(), Arc::clone(&store), t0)
            .await
            .unwrap();
        ca.rotate(t0 + 13 * HOUR).await.unwrap();
        let (_, prepared) = ca.x509_slots();
        assert_ne!(
            prepared.unwrap().ca.key().public_key_der(),
            planted.public_key_der()
        );
        let kept = format!("{keys:?}");
        assert!(kept.contains("x509-ca-b.replaced.1"), "{kept}");
        // A slot this run filled itself is reused without ceremony.
        ca.rotate(t0 + 21 * HOUR).await.unwrap();
        let report = ca.rotate(t0 + 26 * HOUR).await.unwrap();
        assert!(report.x509_prepared, "{report:?}");
        assert_eq!(ca.x509_slots().1.unwrap().slot, Slot::A);
        let kept = format!("{keys:?}");
        assert!(!kept.contains("x509-ca-a.replaced"), "{kept}");
    }

    #[tokio::test]
    async fn a_key_that_vanishes_while_running_is_written_back() {
        let keys = Arc::new(MemoryKeyManager::new());
        let store: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
        let t0 = start();
        let ca = CaManager::load(config(), keys.clone(), Arc::clone(&store), t0)
            .await
            .unwrap();
        assert!(ca.check_key_files().unwrap().is_empty());
        keys.delete("x509-ca-a").unwrap();
        keys.delete("jwt-a").unwrap();
        let restored = ca.check_key_files().unwrap();
        assert_eq!(restored.len(), 2, "{restored:?}");
        assert_eq!(
            keys.load("x509-ca-a").unwrap().unwrap().public_key_der(),
            ca.x509_ca().unwrap().key().public_key_der()
        );
        drop(ca);
        // And so a restart finds it.
        CaManager::load(config(), keys, store, t0).await.unwrap();
    }
}
