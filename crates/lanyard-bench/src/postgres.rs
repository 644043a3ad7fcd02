//! PostgreSQL for the benchmarks that need one: the test suite's throwaway cluster
//! (`crates/lanyard-server/tests/it/pg.rs`, shared by path so that the project starts
//! PostgreSQL one way), one fresh database per benchmark. The cluster runs with `fsync=off`
//! and `synchronous_commit=off`, as SQLite's file on tmpfs pays for no flush either.

#[path = "../../lanyard-server/tests/it/pg.rs"]
#[allow(clippy::unwrap_used, unreachable_pub)]
mod pg;

/// What the report says about the cluster the figures were measured on.
pub(crate) const CLUSTER_NOTE: &str = "PostgreSQL: a local cluster started by the benchmark \
     (Debian's server binaries, loopback TCP, fsync=off and synchronous_commit=off, as SQLite's \
     file on tmpfs pays for no flush either)";

/// The URL of a new, empty database, starting the cluster on first use (and installing
/// PostgreSQL's server package first when it is missing and this runs as root).
pub(crate) async fn fresh_database() -> anyhow::Result<String> {
    // The harness panics when there is no PostgreSQL; that is an error here.
    tokio::spawn(pg::fresh_database())
        .await
        .map_err(|error| anyhow::anyhow!("no PostgreSQL for the benchmarks: {error}"))
}
