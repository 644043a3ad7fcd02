//! [`SqlStore`]: the datastore in SQLite through sqlx, with the versioned migrations of
//! `crates/lanyard-server/migrations/sqlite/` embedded at compile time. Its queries and row
//! codecs are shared with the PostgreSQL store (`sql_body.rs`).
//!
//! Durability: WAL journal with `synchronous = FULL`, so a write acknowledged with `Ok` is on
//! disk and survives `kill -9` or power loss. Every change runs in one `BEGIN IMMEDIATE`
//! transaction (it takes the write lock up front, so two writers never deadlock on an upgrade),
//! and in-process writers queue on a mutex rather than in SQLite's busy handler. Reads that
//! span several statements run in one read transaction, so they see one snapshot.
//!
//! Entries and agents keep their selector sets (and entries their `federates_with`) twice: as a
//! canonical JSON column, which is what reads decode and what the duplicate-entry unique index
//! compares, and in child tables, which the set filters query. Both are written in the same
//! transaction.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lanyard_core::bundle::TrustBundle;
use lanyard_core::bundle_fetch::FetchedBundleChange;
use lanyard_core::federation::{BundleEndpointProfile, FederationRelationship, RelationshipMask};
use lanyard_core::policy::Exception;
use lanyard_core::revocation::{Revocation, RevocationAck, RevocationTarget, RevokedSerial};
use lanyard_core::{EntryId, RegistrationEntry, Selector, SelectorSet, SpiffeId, TrustDomain};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};

use super::convert::{
    BundleRecord, JwtAuthorityRecord, X509AuthorityRecord, checked_bundle, duration_seconds,
    from_unix_seconds, normalize_agent, normalize_entry, normalize_exception,
    normalize_published_crl, normalize_revocation, normalize_revoked_serials, seconds_duration,
    unix_seconds, whole_second, with_stored_bundle,
};
use super::governance::usage_record;
use super::{
    AgentFilter, AttestedAgent, BundleDeleteMode, Change, ChangeKind, ChangeSignal, ChangeSubject,
    Datastore, DatastoreError, EntryFilter, EntryUsage, Issuance, IssuanceFilter, IssuanceKind,
    JoinTokenRecord, MatchMode, Page, PageRequest, PublishedCrl, Result, SelectorFilter,
    banned_agent, bundle_in_use, exception_conflict, merge_bundles, missing_federated_bundle,
    not_found, revision_conflict,
};

/// The schema migrations, embedded at compile time from `migrations/sqlite/`.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

type Db = Sqlite;
type Conn = SqliteConnection;
type DbRow = SqliteRow;
type Store = SqlStore;

/// SQLite takes the shared queries' `?` placeholders as they are.
fn q(sql: &'static str) -> &'static str {
    sql
}

/// SQLite cannot tell other processes of a change: they poll the change log.
async fn announce_change(_conn: &mut Conn, _revision: i64) -> Result<()> {
    Ok(())
}

/// How long a connection waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections in the pool: a writer and a few concurrent readers (WAL lets readers run
/// alongside the writer).
const MAX_CONNECTIONS: u32 = 4;

impl From<sqlx::Error> for DatastoreError {
    fn from(error: sqlx::Error) -> Self {
        match error.as_database_error() {
            Some(db) if db.is_unique_violation() => Self::exists(db.message().to_owned()),
            _ => Self::Backend(error.to_string()),
        }
    }
}

/// The SQLite datastore. Cheap to clone; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: SqlitePool,
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

impl SqlStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    ///
    /// The parent directory is created (mode 0700 on Unix) if missing, and the file is
    /// created, or tightened, to mode 0600. A database written by a newer Lanyard, with
    /// migrations this build does not know, is refused.
    pub async fn open(path: &Path) -> Result<Self> {
        prepare_file(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .after_release(|conn, _| Box::pin(reusable(conn)))
            .connect_with(options)
            .await
            .map_err(|e| DatastoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        Self::migrate(pool).await
    }

    /// A private in-memory database (one connection; gone when the store is dropped).
    pub async fn open_in_memory() -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")?.foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        Self::migrate(pool).await
    }

    async fn migrate(pool: SqlitePool) -> Result<Self> {
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| DatastoreError::Backend(format!("schema migration failed: {e}")))?;
        Ok(Self {
            pool,
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The newest schema version this build knows (the last migration's number).
    pub fn schema_version() -> i64 {
        MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
    }

    /// Closes every connection, checkpointing the WAL. Further calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn write(&self) -> Result<WriteTx<'_>> {
        let guard = self.write_lock.lock().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(WriteTx { tx, _guard: guard })
    }

    /// The connection pool, for moving the whole datastore (`transfer`).
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Where admin listings read: the one database.
    fn reader(&self) -> &SqlitePool {
        &self.pool
    }

    /// SQLite announces nothing: followers poll.
    fn change_listener(&self) -> Option<ChangeSignal> {
        None
    }

    /// A read transaction: its statements see one snapshot.
    async fn read_tx(&self) -> Result<Transaction<'static, Db>> {
        Ok(self.pool.begin().await?)
    }
}

/// Whether a connection handed back to the pool can be used again. After an I/O error such as
/// a full disk, SQLite may roll the whole transaction back on its own; sqlx's rollback of it
/// then fails and the connection stays counted as inside a transaction, so that every later
/// `BEGIN` on it fails ("non-zero transaction depth"). Such a connection is closed, and the pool
/// opens a fresh one.
async fn reusable(conn: &mut SqliteConnection) -> std::result::Result<bool, sqlx::Error> {
    use sqlx::Connection as _;

    // The ping queues behind a pending rollback, so the depth read after it is settled.
    conn.ping().await?;
    if conn.is_in_transaction() {
        tracing::warn!("closing a datastore connection left inside a failed transaction");
        return Ok(false);
    }
    Ok(true)
}

#[cfg(unix)]
fn prepare_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};

    let io_error = |what: &str, e: std::io::Error| {
        DatastoreError::Backend(format!("cannot {what} {}: {e}", path.display()))
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| io_error("create the directory of", e))?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_error("create", e))?;
    let metadata = file.metadata().map_err(|e| io_error("inspect", e))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_error("restrict the permissions of", e))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn prepare_file(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| {
            DatastoreError::Backend(format!("cannot create {}: {e}", parent.display()))
        })?;
    }
    Ok(())
}

include!("sql_body.rs");
