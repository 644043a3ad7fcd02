//! [`PgStore`]: the datastore in PostgreSQL through sqlx, for several servers sharing one
//! database. Its schema is `crates/lanyard-server/migrations/postgres/` (the same tables as
//! SQLite's, in PostgreSQL's types), embedded at compile time and applied at connect under
//! sqlx's advisory lock, so servers starting together migrate once. Its queries and row codecs
//! are SQLite's (`sql_body.rs`), with `?` placeholders rewritten to `$n`.
//!
//! Every write transaction first locks the one row of `store_state` (`SELECT … FOR UPDATE`):
//! writes from every server are serialized, so two servers redeeming one join token at the
//! same moment see it once, two servers writing the CA journal never interleave, and change-log
//! revisions are committed in the order they are numbered, which is what lets every server
//! follow the change log by revision. Reads that span several statements run in one
//! `REPEATABLE READ` transaction, so they see one snapshot.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use lanyard_core::bundle::TrustBundle;
use lanyard_core::bundle_fetch::FetchedBundleChange;
use lanyard_core::federation::{BundleEndpointProfile, FederationRelationship, RelationshipMask};
use lanyard_core::policy::Exception;
use lanyard_core::revocation::{Revocation, RevocationAck, RevocationTarget, RevokedSerial};
use lanyard_core::{EntryId, RegistrationEntry, Selector, SelectorSet, SpiffeId, TrustDomain};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row, Transaction};

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

/// The schema migrations, embedded at compile time from `migrations/postgres/`.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// Connections in the pool when the configuration does not say.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type Db = Postgres;
type Conn = PgConnection;
type DbRow = PgRow;
type Store = PgStore;

/// The channel on which every change is announced, with its revision as the payload.
const CHANGES_CHANNEL: &str = "lanyard_changes";

/// Announces a change on [`CHANGES_CHANNEL`]; PostgreSQL delivers it to every listener when
/// the transaction commits, and never if it rolls back.
async fn announce_change(conn: &mut Conn, revision: i64) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANGES_CHANNEL)
        .bind(revision.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Listens on [`CHANGES_CHANNEL`] and raises `signal` for each announcement, and once more
/// whenever the listening connection was lost and re-established (announcements made
/// meanwhile are gone; the follower reads the change log anyway). Losing the connection and
/// getting it back are both logged, once each. Ends when the pool closes.
async fn listen_for_changes(pool: PgPool, signal: Arc<tokio::sync::Notify>) {
    let mut failing = false;
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(sqlx::Error::PoolClosed) => return,
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "cannot listen for other servers' changes; following the change log by polling until it can");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(CHANGES_CHANNEL).await {
            if !failing {
                tracing::warn!(%error, "cannot listen for other servers' changes; retrying");
                failing = true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if failing {
            // Not reset: the loop below only ends by losing this connection, which sets it.
            tracing::info!("listening for other servers' changes again");
        }
        // Anything announced before the listener was up is read now.
        signal.notify_one();
        loop {
            let lost = match listener.try_recv().await {
                Ok(Some(_)) => {
                    signal.notify_one();
                    continue;
                }
                Err(sqlx::Error::PoolClosed) => return,
                Ok(None) => "the database closed it".to_owned(),
                Err(error) => error.to_string(),
            };
            tracing::warn!(error = %lost, "lost the connection that listens for other servers' changes; reconnecting");
            failing = true;
            // What was announced meanwhile is gone: the follower reads the change log.
            signal.notify_one();
            tokio::time::sleep(Duration::from_secs(1)).await;
            break;
        }
    }
}

/// The shared queries with their `?` placeholders rewritten to PostgreSQL's `$1`, `$2`, …
/// (outside quoted text), each rewritten once and kept for the life of the process.
fn q(sql: &'static str) -> &'static str {
    static REWRITTEN: LazyLock<Mutex<HashMap<&'static str, &'static str>>> =
        LazyLock::new(Mutex::default);
    let mut rewritten = REWRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    rewritten
        .entry(sql)
        .or_insert_with(|| Box::leak(numbered_placeholders(sql).into_boxed_str()))
}

fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    let mut quoted = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            }
            _ => out.push(c),
        }
    }
    out
}

fn check_scheme(url: &str) -> Result<()> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(());
    }
    Err(DatastoreError::Backend(
        "invalid PostgreSQL connection string: it must start with postgres:// or postgresql://"
            .to_owned(),
    ))
}

/// The PostgreSQL datastore. Cheap to clone; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// A read-only replica for admin listings and counts, if one is configured.
    replica: Option<PgPool>,
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/database`, with
    /// libpq's query parameters such as `sslmode`) with at most
    /// `max_connections` connections, and brings its schema up to date. A database written
    /// by a newer Lanyard, with migrations this build does not know, is refused.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        check_scheme(url)?;
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            DatastoreError::Backend(format!("invalid PostgreSQL connection string: {e}"))
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| DatastoreError::Backend(format!("cannot connect to PostgreSQL: {e}")))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| DatastoreError::Backend(format!("schema migration failed: {e}")))?;
        Ok(Self {
            pool,
            replica: None,
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Sends admin listings and counts (`ListEntries`, `CountEntries`, `CountAgents`,
    /// `CountBundles`, `ListIssuances`) to the read-only replica at `url`, which may lag the
    /// primary. Everything the server decides with (authorization, sync, attestation, the
    /// change feed) and every write stays on the primary.
    pub async fn with_replica(mut self, url: &str, max_connections: u32) -> Result<Self> {
        check_scheme(url)?;
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            DatastoreError::Backend(format!("invalid PostgreSQL replica connection string: {e}"))
        })?;
        let replica = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| {
                DatastoreError::Backend(format!("cannot connect to the PostgreSQL replica: {e}"))
            })?;
        self.replica = Some(replica);
        Ok(self)
    }

    /// Where admin listings read: the replica if there is one.
    fn reader(&self) -> &PgPool {
        self.replica.as_ref().unwrap_or(&self.pool)
    }

    /// The newest schema version this build knows (the last migration's number).
    pub fn schema_version() -> i64 {
        MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
    }

    /// Closes every connection. Further calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A write transaction holding the datastore-wide write lock (the `store_state` row).
    async fn write(&self) -> Result<WriteTx<'_>> {
        let guard = self.write_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT revision FROM store_state WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
        Ok(WriteTx { tx, _guard: guard })
    }

    /// The connection pool, for moving the whole datastore (`transfer`).
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A signal raised by a task that listens for announced changes; the task ends with the
    /// signal or the pool.
    fn change_listener(&self) -> Option<ChangeSignal> {
        let notify = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(listen_for_changes(self.pool.clone(), Arc::clone(&notify)));
        Some(ChangeSignal::new(notify, task.abort_handle()))
    }

    /// A read transaction: its statements see one snapshot.
    async fn read_tx(&self) -> Result<Transaction<'static, Db>> {
        Ok(self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?)
    }
}

include!("sql_body.rs");

#[cfg(test)]
mod tests {
    use super::numbered_placeholders;

    #[test]
    fn placeholders_are_numbered_outside_quoted_text() {
        assert_eq!(
            numbered_placeholders("SELECT a FROM t WHERE b = ? AND c <> '[?]' AND d IN (?, ?)"),
            "SELECT a FROM t WHERE b = $1 AND c <> '[?]' AND d IN ($2, $3)"
        );
        assert_eq!(numbered_placeholders("SELECT 1"), "SELECT 1");
    }
}
