//! A real PostgreSQL for the tests: Debian's server binaries (installed with `apt-get` on
//! first use when they are missing and the tests run as root), one throwaway cluster per test
//! process (`initdb` in a temporary directory), started on a free loopback port as an
//! unprivileged user (`nobody` when the tests run as root: PostgreSQL refuses to run as root),
//! and killed with the test process (`setpriv --pdeathsig KILL`). Each test gets its own
//! database from [`fresh_database`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

struct Cluster {
    port: u16,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The URL of a new, empty database on this process's cluster.
pub(crate) async fn fresh_database() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let cluster = match CLUSTER.get_or_init(start) {
        Ok(cluster) => cluster,
        Err(error) => panic!("no PostgreSQL for the tests: {error}"),
    };
    let name = format!(
        "lanyard_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    // Listening is not yet accepting: the cluster may still be starting up.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = loop {
        match <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await {
            Ok(conn) => break conn,
            Err(error) if Instant::now() > deadline => {
                panic!("cannot connect to the test cluster: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("creates a test database");
    format!("postgres://postgres@127.0.0.1:{}/{name}", cluster.port)
}

/// The directory holding `initdb` and `postgres`, installing Debian's package if needed.
fn binaries() -> Result<PathBuf, String> {
    let find = || {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|version| version.path().join("bin"))
            .filter(|bin| bin.join("initdb").is_file() && bin.join("postgres").is_file())
            .collect();
        // The newest major version.
        found.sort_by_key(|bin| {
            bin.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        });
        found.pop()
    };
    if let Some(bin) = find() {
        return Ok(bin);
    }
    if !running_as_root() {
        return Err(
            "PostgreSQL's server binaries are not installed (/usr/lib/postgresql/*/bin) and \
             installing them needs root: run `apt-get install postgresql`"
                .to_owned(),
        );
    }
    for args in [
        &["update"][..],
        &["install", "-y", "--no-install-recommends", "postgresql"][..],
    ] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if !status.success() {
            return Err(format!("apt-get {} failed: {status}", args.join(" ")));
        }
    }
    find().ok_or_else(|| "apt-get installed postgresql but no initdb was found".to_owned())
}

fn running_as_root() -> bool {
    // The owner of /proc/self is this process's effective uid.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// `nobody`'s uid and gid, from /etc/passwd.
fn nobody() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"nobody"))
                .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))?
        })
        .ok_or_else(|| "no user nobody to run PostgreSQL as".to_owned())
}

/// A command that runs `program` as the cluster's user and dies with this process.
fn as_cluster_user(program: &Path, user: Option<(u32, u32)>) -> Command {
    let mut command = Command::new("setpriv");
    if let Some((uid, gid)) = user {
        command.args([
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".to_owned(),
        ]);
    }
    command.args(["--pdeathsig", "KILL"]).arg(program);
    command
}

fn start() -> Result<Cluster, String> {
    let bin = binaries()?;
    let user = if running_as_root() {
        Some(nobody()?)
    } else {
        None
    };
    // Clusters outlive nothing but their process: one directory per process ID, and those of
    // processes that are gone are removed first.
    let parent = std::env::temp_dir().join("lanyard-test-postgres");
    std::fs::create_dir_all(&parent).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&parent, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    for stale in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
        let name = stale.file_name();
        let alive = Path::new("/proc").join(&name).exists();
        if !alive {
            let _ = std::fs::remove_dir_all(stale.path());
        }
    }
    let dir = parent.join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    let sockets = dir.join("sockets");
    std::fs::create_dir_all(&sockets).map_err(|e| e.to_string())?;
    if let Some((uid, gid)) = user {
        for path in [&dir, &sockets] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
    }
    let output = as_cluster_user(&bin.join("initdb"), user)
        .args(["-D"])
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .output()
        .map_err(|e| format!("cannot run initdb: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let log = std::fs::File::create(dir.join("postgres.log")).map_err(|e| e.to_string())?;
    let mut command = as_cluster_user(&bin.join("postgres"), user);
    command
        .arg("-D")
        .arg(&data)
        .arg("-k")
        .arg(&sockets)
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", "max_connections=300"])
        // A throwaway cluster: durability is the store's own tests' business, not the server's.
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // The process is started from a thread that lives as long as it does, so that the parent
    // death signal fires when the test process ends, not when some worker thread does.
    let (started, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || match command.spawn() {
        Ok(mut child) => {
            let _ = started.send(Ok(()));
            let _ = child.wait();
        }
        Err(e) => {
            let _ = started.send(Err(format!("cannot start postgres: {e}")));
        }
    });
    ready.recv().map_err(|e| e.to_string())??;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
            return Err(format!("postgres did not listen within 30 s: {log}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Cluster { port })
}
