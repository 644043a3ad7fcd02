//! A real PostgreSQL for the tests: Debian's server binaries (installed with `apt-get` on
//! first use when they are missing and the tests run as root), one throwaway cluster per test
//! process (`initdb` in a temporary directory), started on a free loopback port as an
//! unprivileged user (`nobody` when the tests run as root: PostgreSQL refuses to run as root),
//! and killed with the test process (`setpriv --pdeathsig KILL`). Each test gets its own
//! database from [`fresh_database`]; a test that stops and restarts PostgreSQL takes a
//! [`Dedicated`] cluster of its own.
// Three test crates include this file; each uses part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A cluster: its binaries, files, port and user, and the process serving it.
pub(crate) struct Dedicated {
    port: u16,
    bin: PathBuf,
    dir: PathBuf,
    user: Option<(u32, u32)>,
    /// Whether commits are flushed before they are acknowledged, as in production; off for
    /// the shared cluster, which is never crashed.
    durable: bool,
    pid: std::sync::Mutex<Option<u32>>,
}

static SHARED: OnceLock<Result<Dedicated, String>> = OnceLock::new();
static NEXT_DATABASE: AtomicU32 = AtomicU32::new(0);
static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// The URL of a new, empty database on this process's shared cluster.
pub(crate) async fn fresh_database() -> String {
    let cluster = match SHARED.get_or_init(|| Dedicated::start_with(false)) {
        Ok(cluster) => cluster,
        Err(error) => panic!("no PostgreSQL for the tests: {error}"),
    };
    cluster.fresh_database().await
}

impl Dedicated {
    /// A new cluster of its own, started, durable as in production (a crash loses no
    /// acknowledged commit).
    pub(crate) fn start() -> Result<Self, String> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Result<Self, String> {
        let bin = binaries()?;
        let user = if running_as_root() {
            Some(nobody()?)
        } else {
            None
        };
        // Clusters outlive nothing but their process: one directory per process ID (and
        // cluster), and those of processes that are gone are removed first.
        let parent = std::env::temp_dir().join("lanyard-test-postgres");
        std::fs::create_dir_all(&parent).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&parent, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        for stale in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let name = stale.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().unwrap_or_default().to_owned();
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(stale.path());
            }
        }
        let dir = parent.join(format!(
            "{}-{}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
        ));
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
        let cluster = Self {
            port,
            bin,
            dir,
            user,
            durable,
            pid: std::sync::Mutex::new(None),
        };
        cluster.serve()?;
        Ok(cluster)
    }

    /// Starts `postgres` on the cluster's port and waits until it listens.
    fn serve(&self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .map_err(|e| format!("{}: {e}", self.dir.join("postgres.log").display()))?;
        let mut command = as_cluster_user(&self.bin.join("postgres"), self.user);
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-k")
            .arg(self.dir.join("sockets"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=300"]);
        if !self.durable {
            // A throwaway cluster that is never crashed: flushing buys nothing.
            command.args(["-c", "fsync=off", "-c", "synchronous_commit=off"]);
        }
        command
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        // The process is started from a thread that lives as long as it does, so that the
        // parent death signal fires when the test process ends, not when some worker thread
        // does.
        let (started, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || match command.spawn() {
            Ok(mut child) => {
                let _ = started.send(Ok(child.id()));
                let _ = child.wait();
            }
            Err(e) => {
                let _ = started.send(Err(format!("cannot start postgres: {e}")));
            }
        });
        let pid = ready.recv().map_err(|e| e.to_string())??;
        *self.pid.lock().unwrap() = Some(pid);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
                return Err(format!("postgres did not listen within 30 s: {log}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kills the server at once, as a crash would (`SIGKILL`), and waits until its port is
    /// closed.
    pub(crate) fn kill(&self) {
        if let Some(pid) = self.pid.lock().unwrap().take() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "postgres did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Children of the killed postmaster end on their own; give them a moment to release
        // the shared memory before the next start.
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Starts the killed server again on the same port and data (crash recovery included).
    pub(crate) fn start_again(&self) {
        self.serve().expect("postgres starts again");
    }

    /// The URL of a new, empty database on this cluster.
    pub(crate) async fn fresh_database(&self) -> String {
        let name = format!(
            "lanyard_{}_{}",
            std::process::id(),
            NEXT_DATABASE.fetch_add(1, Ordering::Relaxed)
        );
        let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
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
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.lock().unwrap().take() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
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
            // Another installation (nginx for the end-to-end tests) may hold dpkg's lock.
            .args(["-o", "DPkg::Lock::Timeout=600"])
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
