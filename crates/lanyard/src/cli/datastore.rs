//! `lanyard datastore`: offline operations on a server's datastore — counting what it holds
//! (`check`) and moving it from SQLite to PostgreSQL (`migrate`). They open the datastore
//! directly, not through a server: stop the server whose SQLite file is read first.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use lanyard_server::config::{DatastoreKind, ServerConfig};
use lanyard_server::datastore::transfer::{
    Inventory, inventory_postgres, inventory_sqlite, migrate_sqlite_to_postgres,
};

use crate::cli::output::{OutputArgs, write_json};
use crate::cli::usage_error;

#[derive(Debug, Subcommand)]
pub(crate) enum DatastoreCommand {
    /// Show a datastore's schema version, change-log revision and rows per table.
    Check(CheckArgs),
    /// Copy a SQLite datastore into an empty PostgreSQL database, row for row, in one
    /// transaction, and compare the counts. Stop the server first.
    Migrate(MigrateArgs),
}

impl DatastoreCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Check(_) => "check",
            Self::Migrate(_) => "migrate",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Check(args) => check(args, out).await,
            Self::Migrate(args) => migrate(args, out).await,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The server config whose datastore to check.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["sqlite", "postgres"])]
    config: Option<PathBuf>,
    /// A SQLite datastore file.
    #[arg(long, value_name = "FILE", conflicts_with = "postgres")]
    sqlite: Option<PathBuf>,
    /// A PostgreSQL database URL (or set LANYARD_DATASTORE_URL, which keeps a password out of
    /// the process list).
    #[arg(
        long,
        value_name = "URL",
        env = "LANYARD_DATASTORE_URL",
        hide_env_values = true
    )]
    postgres: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// The SQLite datastore to copy (the server's `<data_dir>/datastore.sqlite3`).
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// The PostgreSQL database to copy into (or set LANYARD_DATASTORE_URL).
    #[arg(
        long,
        value_name = "URL",
        env = "LANYARD_DATASTORE_URL",
        hide_env_values = true
    )]
    to: String,
    /// Empty a target that already holds data first (in the same transaction).
    #[arg(long)]
    replace: bool,
    #[command(flatten)]
    output: OutputArgs,
}

async fn check(args: CheckArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let inventory = if let Some(path) = &args.config {
        let config = ServerConfig::load(path)?;
        match config.datastore.kind {
            DatastoreKind::Sqlite => inventory_sqlite(&config.datastore_path()).await?,
            DatastoreKind::Postgres => {
                let url = config
                    .datastore
                    .connection_string
                    .context("the config has no datastore.connection_string")?;
                inventory_postgres(url.expose()).await?
            }
            DatastoreKind::Memory => bail!("a memory datastore has nothing to check"),
        }
    } else if let Some(path) = &args.sqlite {
        inventory_sqlite(path).await?
    } else if let Some(url) = &args.postgres {
        inventory_postgres(url).await?
    } else {
        return Err(usage_error(
            "say which datastore: --config FILE, --sqlite FILE or --postgres URL",
        ));
    };
    write_inventory(&inventory, args.output, out)
}

async fn migrate(args: MigrateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let copied = migrate_sqlite_to_postgres(&args.from, &args.to, args.replace).await?;
    if !args.output.is_json() {
        writeln!(
            out,
            "Copied {} into PostgreSQL; the counts match.",
            args.from.display()
        )?;
    }
    write_inventory(&copied, args.output, out)
}

fn write_inventory(
    inventory: &Inventory,
    output: OutputArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if output.is_json() {
        let tables: serde_json::Map<String, serde_json::Value> = inventory
            .tables
            .iter()
            .map(|(table, rows)| ((*table).to_owned(), (*rows).into()))
            .collect();
        return write_json(
            out,
            &serde_json::json!({
                "schema_version": inventory.schema_version,
                "revision": inventory.revision,
                "tables": tables,
            }),
        );
    }
    write!(out, "{inventory}")?;
    Ok(())
}
