//! Moving a datastore from SQLite to PostgreSQL, and counting what a datastore holds
//! (`lanyard datastore migrate` and `lanyard datastore check`).
//!
//! Both schemas have the same tables and columns, so the move copies every row of every table
//! as it is: entries keep their IDs, revisions and times, agents their serials, the change log
//! its revisions, the CA journal and the audit checkpoint their bytes. The source is read in
//! one transaction (one snapshot), the target is written in one transaction that holds the
//! datastore's write lock, and the row counts of both are compared before it commits: the
//! target gets all of it or none of it.

use std::fmt;
use std::path::Path;

use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::{Column as _, Connection as _, Row as _, ValueRef as _};

use super::{DatastoreError, PgStore, Result, SqlStore};

/// Every table, parents before children. `store_state` (the revision counter) is copied as an
/// update of its one row.
pub const TABLES: &[&str] = &[
    "store_state",
    "changes",
    "bundles",
    "bundle_x509_authorities",
    "bundle_jwt_authorities",
    "registered_entries",
    "entry_selectors",
    "entry_federates_with",
    "attested_agents",
    "agent_selectors",
    "join_tokens",
    "ca_journals",
    "meta",
    "policy_exceptions",
    "issuances",
    "entry_usage",
    "federation_relationships",
    "revocations",
    "revoked_serials",
    "revocation_acks",
    "published_crls",
];

/// Rows per `INSERT` while copying.
const BATCH_ROWS: usize = 500;

/// What a datastore holds: its schema version, its change-log revision and each table's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// The newest migration applied.
    pub schema_version: i64,
    /// The change log's revision counter.
    pub revision: i64,
    /// Rows per table, in [`TABLES`] order (without `store_state`).
    pub tables: Vec<(&'static str, u64)>,
}

impl Inventory {
    /// Whether the datastore holds nothing but its schema.
    pub fn is_empty(&self) -> bool {
        self.revision == 0 && self.tables.iter().all(|(_, rows)| *rows == 0)
    }
}

impl fmt::Display for Inventory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "schema version  {}", self.schema_version)?;
        writeln!(f, "revision        {}", self.revision)?;
        for (table, rows) in &self.tables {
            writeln!(f, "{table:<24}{rows}")?;
        }
        Ok(())
    }
}

/// One value of a row, as both schemas store it.
#[derive(Debug, Clone)]
enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

/// The inventory of the SQLite datastore at `path`, which must exist (it is brought up to
/// this build's schema first, as the server would).
pub async fn inventory_sqlite(path: &Path) -> Result<Inventory> {
    let store = open_existing_sqlite(path).await?;
    let mut conn = store.pool().acquire().await?;
    let mut tables = Vec::new();
    for table in &TABLES[1..] {
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&mut *conn)
                .await?;
        tables.push((*table, rows.unsigned_abs()));
    }
    let revision = sqlx::query_scalar("SELECT revision FROM store_state WHERE id = 1")
        .fetch_one(&mut *conn)
        .await?;
    Ok(Inventory {
        schema_version: SqlStore::schema_version(),
        revision,
        tables,
    })
}

/// The inventory of the PostgreSQL datastore at `url` (its schema is brought up to date
/// first, as the server would).
pub async fn inventory_postgres(url: &str) -> Result<Inventory> {
    let store = PgStore::connect(url, 2).await?;
    let mut conn = store.pool().acquire().await?;
    inventory_pg_conn(&mut conn).await
}

async fn inventory_pg_conn(conn: &mut sqlx::PgConnection) -> Result<Inventory> {
    let mut tables = Vec::new();
    for table in &TABLES[1..] {
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&mut *conn)
                .await?;
        tables.push((*table, rows.unsigned_abs()));
    }
    let revision = sqlx::query_scalar("SELECT revision FROM store_state WHERE id = 1")
        .fetch_one(&mut *conn)
        .await?;
    Ok(Inventory {
        schema_version: PgStore::schema_version(),
        revision,
        tables,
    })
}

async fn open_existing_sqlite(path: &Path) -> Result<SqlStore> {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_file() && metadata.len() > 0 => SqlStore::open(path).await,
        Ok(_) => Err(DatastoreError::Backend(format!(
            "{} is not a SQLite datastore (empty, or not a file)",
            path.display()
        ))),
        Err(e) => Err(DatastoreError::Backend(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Copies the SQLite datastore at `from` into the PostgreSQL datastore at `to`, and returns
/// what the target holds afterwards (equal to the source's inventory). A target that holds
/// anything is refused unless `replace`, which empties it first, in the same transaction.
pub async fn migrate_sqlite_to_postgres(from: &Path, to: &str, replace: bool) -> Result<Inventory> {
    let source = open_existing_sqlite(from).await?;
    let target = PgStore::connect(to, 2).await?;
    let mut reader = source.pool().acquire().await?;
    let mut read = reader.begin().await?;
    let mut writer = target.pool().acquire().await?;
    let mut write = writer.begin().await?;
    // The datastore-wide write lock: no server writes while the copy runs.
    sqlx::query("SELECT revision FROM store_state WHERE id = 1 FOR UPDATE")
        .fetch_one(&mut *write)
        .await?;

    let before = inventory_pg_conn(&mut write).await?;
    if !before.is_empty() {
        if !replace {
            return Err(DatastoreError::FailedPrecondition(format!(
                "the target datastore is not empty (revision {}, {} rows); migrate into an \
                 empty database, or replace what it holds with --replace",
                before.revision,
                before.tables.iter().map(|(_, rows)| rows).sum::<u64>()
            )));
        }
        let all = TABLES[1..].join(", ");
        sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE {all}")))
            .execute(&mut *write)
            .await?;
    }

    let mut expected = Vec::new();
    for table in &TABLES[1..] {
        let targets = target_columns(&mut write, table).await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT * FROM {table}")))
            .fetch_all(&mut *read)
            .await?;
        let rows = rows
            .iter()
            .map(|row| read_sqlite_row(row, &targets))
            .collect::<Result<Vec<_>>>()?;
        for batch in rows.chunks(BATCH_ROWS) {
            insert_rows(&mut write, table, &targets, batch).await?;
        }
        expected.push((*table, rows.len() as u64));
    }
    let revision: i64 = sqlx::query_scalar("SELECT revision FROM store_state WHERE id = 1")
        .fetch_one(&mut *read)
        .await?;
    sqlx::query("UPDATE store_state SET revision = $1 WHERE id = 1")
        .bind(revision)
        .execute(&mut *write)
        .await?;

    let after = inventory_pg_conn(&mut write).await?;
    if after.tables != expected || after.revision != revision {
        return Err(DatastoreError::Backend(format!(
            "the copy does not match its source (expected revision {revision} and {expected:?}, \
             found {after:?}); nothing was written"
        )));
    }
    write.commit().await?;
    read.rollback().await?;
    Ok(after)
}

/// The target table's columns and whether each is `bigint`, `text` or `bytea`.
async fn target_columns(
    conn: &mut sqlx::PgConnection,
    table: &str,
) -> Result<Vec<(String, String)>> {
    let rows: Vec<PgRow> = sqlx::query(
        "SELECT column_name::text AS name, data_type::text AS type FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("name")?, row.try_get("type")?)))
        .collect()
}

fn read_sqlite_row(row: &SqliteRow, targets: &[(String, String)]) -> Result<Vec<Value>> {
    let mut values = Vec::with_capacity(targets.len());
    for (name, kind) in targets {
        if !row.columns().iter().any(|c| c.name() == name) {
            return Err(DatastoreError::Backend(format!(
                "the SQLite datastore has no column {name}; is it from another Lanyard version?"
            )));
        }
        let raw = row.try_get_raw(name.as_str())?;
        let value = if raw.is_null() {
            Value::Null
        } else {
            match kind.as_str() {
                "bigint" => Value::Int(row.try_get(name.as_str())?),
                "text" => Value::Text(row.try_get(name.as_str())?),
                "bytea" => Value::Bytes(row.try_get(name.as_str())?),
                other => {
                    return Err(DatastoreError::Backend(format!(
                        "column {name} has an unexpected PostgreSQL type {other}"
                    )));
                }
            }
        };
        values.push(value);
    }
    Ok(values)
}

async fn insert_rows(
    conn: &mut sqlx::PgConnection,
    table: &str,
    columns: &[(String, String)],
    rows: &[Vec<Value>],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = columns.iter().map(|(name, _)| name.as_str()).collect();
    let mut builder: sqlx::QueryBuilder<sqlx::Postgres> =
        sqlx::QueryBuilder::new(format!("INSERT INTO {table} ({}) ", names.join(", ")));
    builder.push_values(rows, |mut b, row| {
        for (value, (_, kind)) in row.iter().zip(columns) {
            match (value, kind.as_str()) {
                (Value::Int(v), _) => b.push_bind(*v),
                (Value::Text(v), _) => b.push_bind(v.clone()),
                (Value::Bytes(v), _) => b.push_bind(v.clone()),
                (Value::Null, "bigint") => b.push_bind(None::<i64>),
                (Value::Null, "bytea") => b.push_bind(None::<Vec<u8>>),
                (Value::Null, _) => b.push_bind(None::<String>),
            };
        }
    });
    builder.build().execute(&mut *conn).await?;
    Ok(())
}
