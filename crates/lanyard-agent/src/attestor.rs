//! Workload attestation: turning the kernel's credentials for a Workload API caller into the
//! selectors that registration entries match against.
//!
//! The caller never says who it is. The Unix socket gives the agent the peer's PID, UID and
//! GID (`SO_PEERCRED`), and the [`UnixAttestor`] reads the rest from `/proc` and the account
//! databases, the way SPIRE's `unix` workload attestor does: `unix:uid`, `unix:user`,
//! `unix:gid`, `unix:group`, `unix:supplementary_gid`, `unix:supplementary_group`, and with
//! `discover_workload_path` also `unix:path` and `unix:sha256`.
//!
//! A PID is only a name for a process while that process lives; once it exits the kernel may
//! hand the same PID to another one. The agent therefore pins the caller when it accepts the
//! connection: it opens a pidfd for it ([`ProcessHandle`]), and once the attestor has read
//! `/proc/<pid>` it checks that the pinned process has not exited, so what it read was that
//! process's. On kernels without pidfds (before 5.3) it pins the process by its start time
//! (`/proc/<pid>/stat` field 22) instead: the time read at accept and the one read after
//! collecting must agree. Either way the process's effective UID and GID must still be the
//! ones the kernel reported for the connection.
//!
//! [`CombinedAttestor`] is what the agent runs: the Unix attestor always, and each attestor
//! configured under `[workload_attestor]` ([`k8s::K8sAttestor`]), the caller's selectors being
//! the union of theirs. A new workload attestor implements [`WorkloadAttestor`], pins the PID
//! the same way around whatever it looks up, and joins `CombinedAttestor::new` with its
//! config table.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read as _};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use lanyard_core::{Selector, SelectorSet};

use crate::config::{UnixAttestorConfig, WorkloadAttestorConfig};

pub mod k8s;

use self::k8s::{K8sAttestError, K8sAttestor, K8sSetupError};

/// The selector type the Unix attestor produces.
pub const UNIX_SELECTOR_TYPE: &str = "unix";

/// Executables whose digests are remembered; the cache is emptied when it grows past this.
const DIGEST_CACHE_CAPACITY: usize = 256;

/// The kernel's credentials for the process at the other end of a Workload API connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCredentials {
    /// The peer's process ID, when the platform reports it.
    pub pid: Option<i32>,
    /// The peer's effective user ID when it connected.
    pub uid: u32,
    /// The peer's effective group ID when it connected.
    pub gid: u32,
    /// The peer process's start time (clock ticks after boot, `/proc/<pid>/stat` field 22)
    /// read when the connection was accepted. With it the attestor can tell the original
    /// caller from a later process that was given the same PID.
    pub start_time: Option<u64>,
    /// The peer process itself, opened when the connection was accepted: while it has not
    /// exited, its PID names no other process.
    pub process: Option<ProcessHandle>,
}

impl PeerCredentials {
    /// The credentials of a Unix socket peer, without a start time.
    pub fn from_ucred(cred: &tokio::net::unix::UCred) -> Self {
        Self {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
            start_time: None,
            process: None,
        }
    }

    /// Pins the peer process now, when the connection has just been accepted: by a pidfd, or
    /// where the kernel has none, by its start time. Fails when the PID is unknown or the
    /// process is already gone.
    pub fn pinned(mut self) -> Result<Self, AttestError> {
        let pid = self.pid.ok_or(AttestError::NoPid)?;
        match ProcessHandle::open(pid)? {
            Some(process) => {
                self.process = Some(process);
                Ok(self)
            }
            None => self.with_current_start_time(),
        }
    }

    /// Reads the peer's start time from `/proc` now, when the connection has just been
    /// accepted. Fails when the PID is unknown or the process is already gone.
    pub fn with_current_start_time(mut self) -> Result<Self, AttestError> {
        let pid = self.pid.ok_or(AttestError::NoPid)?;
        self.start_time = Some(process_start_time(pid)?);
        Ok(self)
    }
}

/// A process pinned by a pidfd. The kernel does not give its PID to another process while
/// the descriptor is open and the process has not been reaped, and the descriptor reports
/// when the process exits; clones share one descriptor.
#[derive(Debug, Clone)]
pub struct ProcessHandle(Arc<OwnedFd>);

impl ProcessHandle {
    /// Opens process `pid`; `None` when this kernel cannot (no pidfds before Linux 5.3, or a
    /// PID that names a thread rather than a process), so that the caller pins the process
    /// another way.
    pub fn open(pid: i32) -> Result<Option<Self>, AttestError> {
        let Some(id) = rustix::process::Pid::from_raw(pid) else {
            return Err(AttestError::ProcessGone { pid });
        };
        match rustix::process::pidfd_open(id, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => Ok(Some(Self(Arc::new(fd)))),
            Err(rustix::io::Errno::SRCH) => Err(AttestError::ProcessGone { pid }),
            Err(error) => {
                tracing::debug!(pid, %error, "no pidfd for the caller; pinning it by start time");
                Ok(None)
            }
        }
    }

    /// Whether the process has exited (it may not have been reaped yet).
    pub fn has_exited(&self) -> io::Result<bool> {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        loop {
            let mut fds = [PollFd::new(&*self.0, PollFlags::IN)];
            match rustix::event::poll(&mut fds, Some(&now)) {
                // A pidfd is readable once its process has exited.
                Ok(ready) => return Ok(ready > 0),
                Err(rustix::io::Errno::INTR) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
}

impl PartialEq for ProcessHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ProcessHandle {}

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The kernel did not report the caller's PID.
    #[error("the caller's process ID is unknown")]
    NoPid,
    /// The caller's process has exited.
    #[error("process {pid} has exited")]
    ProcessGone {
        /// The caller's PID.
        pid: i32,
    },
    /// The process now holding the caller's PID started after the connection was made, or
    /// during attestation: it is not the caller.
    #[error("process {pid} is not the original caller (its PID was reused)")]
    PidReused {
        /// The caller's PID.
        pid: i32,
    },
    /// The process's effective UID or GID is no longer the one it connected with.
    #[error("process {pid} now runs as {what} {actual}, but connected as {expected}")]
    CredentialsChanged {
        /// The caller's PID.
        pid: i32,
        /// `uid` or `gid`.
        what: &'static str,
        /// What the kernel reported for the connection.
        expected: u32,
        /// What `/proc` says now.
        actual: u32,
    },
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A `/proc` file did not have the expected format.
    #[error("{path} is malformed: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The executable is larger than `workload_size_limit`.
    #[error("workload {path} exceeds size limit ({size} > {limit})")]
    TooLarge {
        /// The executable's path.
        path: String,
        /// Its size in bytes.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The attestation task failed to run to completion.
    #[error("attestation task failed: {0}")]
    Task(String),
    /// The k8s attestor found the caller in a pod but could not attest it.
    #[error("kubernetes: {0}")]
    Kubernetes(#[from] K8sAttestError),
}

impl AttestError {
    /// Whether the error means the caller cannot be tied to a live process, as opposed to a
    /// failure to collect its selectors.
    pub fn is_caller_unverified(&self) -> bool {
        matches!(
            self,
            Self::NoPid
                | Self::ProcessGone { .. }
                | Self::PidReused { .. }
                | Self::CredentialsChanged { .. }
        )
    }
}

/// Finds the selectors of a Workload API caller. Implementations: [`UnixAttestor`],
/// [`K8sAttestor`], and [`CombinedAttestor`], which runs the configured ones.
#[tonic::async_trait]
pub trait WorkloadAttestor: Send + Sync + 'static {
    /// The selectors of the process behind `peer`.
    async fn attest(&self, peer: &PeerCredentials) -> Result<SelectorSet, AttestError>;
}

/// The agent's workload attestors: Unix always, k8s when `[workload_attestor.k8s]` is set.
/// A caller's selectors are the union of theirs; if one fails, attestation fails.
#[derive(Debug, Clone)]
pub struct CombinedAttestor {
    unix: UnixAttestor,
    k8s: Option<K8sAttestor>,
}

impl CombinedAttestor {
    /// The attestors `config` asks for, on this host's `/proc`. Fails when the k8s attestor's
    /// CA or token cannot be read.
    pub fn new(config: &WorkloadAttestorConfig) -> Result<Self, K8sSetupError> {
        let k8s = config.k8s.as_ref().map(K8sAttestor::new).transpose()?;
        Ok(Self::with_parts(UnixAttestor::new(&config.unix), k8s))
    }

    /// These attestors.
    pub fn with_parts(unix: UnixAttestor, k8s: Option<K8sAttestor>) -> Self {
        Self { unix, k8s }
    }
}

#[tonic::async_trait]
impl WorkloadAttestor for CombinedAttestor {
    async fn attest(&self, peer: &PeerCredentials) -> Result<SelectorSet, AttestError> {
        // Unix first: it is quick and refuses a reused PID before the kubelet is asked.
        let mut selectors = self.unix.attest(peer).await?;
        if let Some(k8s) = &self.k8s {
            for selector in k8s.attest(peer).await? {
                selectors.insert(selector);
            }
        }
        Ok(selectors)
    }
}

/// SPIRE's `unix` workload attestor, reading Linux's `/proc`.
#[derive(Debug, Clone)]
pub struct UnixAttestor {
    inner: Arc<UnixAttestorInner>,
}

#[derive(Debug)]
struct UnixAttestorInner {
    discover_workload_path: bool,
    workload_size_limit: u64,
    proc_root: PathBuf,
    passwd: AccountDatabase,
    groups: AccountDatabase,
    digests: Mutex<HashMap<FileIdentity, String>>,
}

/// `/etc/passwd` or `/etc/group` as names by numeric ID, read again only when the file
/// changes ([`FileIdentity`]), which is looked at no more than every
/// [`ACCOUNT_RECHECK_INTERVAL`]: a burst of callers costs neither reads nor `stat`s.
#[derive(Debug)]
struct AccountDatabase {
    path: PathBuf,
    cached: Mutex<Option<CachedAccounts>>,
}

/// How long account names are used before the file is looked at again.
const ACCOUNT_RECHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug)]
struct CachedAccounts {
    identity: Option<FileIdentity>,
    checked_at: std::time::Instant,
    names: Arc<AccountNames>,
}

/// Account names by numeric ID.
type AccountNames = HashMap<u32, String>;

impl AccountDatabase {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            cached: Mutex::new(None),
        }
    }

    /// The names by ID as the file is now; none when it cannot be read (names are optional
    /// selectors).
    fn names(&self) -> Arc<AccountNames> {
        self.names_at(std::time::Instant::now())
    }

    fn names_at(&self, now: std::time::Instant) -> Arc<AccountNames> {
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = cached.as_ref()
            && now.saturating_duration_since(cached.checked_at) < ACCOUNT_RECHECK_INTERVAL
        {
            return Arc::clone(&cached.names);
        }
        let identity = match std::fs::metadata(&self.path) {
            Ok(metadata) => Some(FileIdentity::of(&metadata)),
            Err(error) => {
                tracing::debug!(path = %self.path.display(), %error, "account database unreadable");
                None
            }
        };
        let names = match cached.as_ref() {
            Some(previous) if previous.identity == identity => Arc::clone(&previous.names),
            _ if identity.is_none() => Arc::default(),
            _ => Arc::new(account_names(&read_optional(&self.path))),
        };
        *cached = Some(CachedAccounts {
            identity,
            checked_at: now,
            names: Arc::clone(&names),
        });
        names
    }
}

/// What identifies a file's content without reading it. The change time (`ctime`) cannot
/// be set by users, unlike `mtime`, so a rewritten binary never keeps its cached digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    fn of(metadata: &std::fs::Metadata) -> Self {
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.size(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

impl UnixAttestor {
    /// An attestor with the agent's `[workload_attestor.unix]` settings.
    pub fn new(config: &UnixAttestorConfig) -> Self {
        Self::with_paths(
            config,
            PathBuf::from("/proc"),
            PathBuf::from("/etc/passwd"),
            PathBuf::from("/etc/group"),
        )
    }

    /// An attestor reading process information under `proc_root` and account names from
    /// the given `passwd` and `group` files.
    pub fn with_paths(
        config: &UnixAttestorConfig,
        proc_root: PathBuf,
        passwd_path: PathBuf,
        group_path: PathBuf,
    ) -> Self {
        Self {
            inner: Arc::new(UnixAttestorInner {
                discover_workload_path: config.discover_workload_path,
                workload_size_limit: config.workload_size_limit,
                proc_root,
                passwd: AccountDatabase::new(passwd_path),
                groups: AccountDatabase::new(group_path),
                digests: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Attests `peer` on the calling thread (it reads files and may hash an executable).
    pub fn attest_blocking(&self, peer: &PeerCredentials) -> Result<SelectorSet, AttestError> {
        self.inner.attest(peer)
    }
}

#[tonic::async_trait]
impl WorkloadAttestor for UnixAttestor {
    async fn attest(&self, peer: &PeerCredentials) -> Result<SelectorSet, AttestError> {
        if !self.inner.discover_workload_path {
            // Reads of `/proc` never wait on a disk, and the account databases are read only
            // when they change: on the runtime's thread this is a few system calls, where a
            // blocking-pool hand-off would cost a thread (and, in a burst of callers, hundreds
            // of them).
            return self.inner.attest(peer);
        }
        // Hashing the executable reads a file of any size.
        let inner = Arc::clone(&self.inner);
        let peer = peer.clone();
        tokio::task::spawn_blocking(move || inner.attest(&peer))
            .await
            .map_err(|e| AttestError::Task(e.to_string()))?
    }
}

impl UnixAttestorInner {
    fn attest(&self, peer: &PeerCredentials) -> Result<SelectorSet, AttestError> {
        let pid = peer.pid.ok_or(AttestError::NoPid)?;
        let process_dir = self.proc_root.join(pid.to_string());
        let pin = CallerPin::of(peer, &process_dir, pid)?;

        let status_path = process_dir.join("status");
        // A process's status is a page or two; a stack buffer takes it whole unless its
        // supplementary groups run into the hundreds.
        let mut buffer = [0u8; 4096];
        let status = read_proc_bytes(&status_path, pid, &mut buffer)?;
        let status = ProcessStatus::parse(&status).map_err(|reason| AttestError::Malformed {
            path: status_path.clone(),
            reason,
        })?;
        for (what, expected, actual) in [
            ("uid", peer.uid, status.effective_uid),
            ("gid", peer.gid, status.effective_gid),
        ] {
            if expected != actual {
                return Err(AttestError::CredentialsChanged {
                    pid,
                    what,
                    expected,
                    actual,
                });
            }
        }

        let mut selectors = UnixSelectors::default();
        let users = self.passwd.names();
        let groups = self.groups.names();
        selectors.add("uid", peer.uid);
        if let Some(user) = users.get(&peer.uid) {
            selectors.add("user", user);
        }
        selectors.add("gid", peer.gid);
        if let Some(group) = groups.get(&peer.gid) {
            selectors.add("group", group);
        }
        for gid in &status.supplementary_gids {
            selectors.add("supplementary_gid", gid);
            if let Some(group) = groups.get(gid) {
                selectors.add("supplementary_group", group);
            }
        }

        if self.discover_workload_path {
            let exe_link = process_dir.join("exe");
            let path = std::fs::read_link(&exe_link)
                .map_err(|source| proc_error(pid, &exe_link, source))?;
            let path = path.to_string_lossy().into_owned();
            selectors.add("path", &path);
            // Hash through the /proc link rather than the path: it is the file the process
            // runs even when the path names something else in another mount namespace.
            let digest = self.sha256_of(&exe_link, &path, pid)?;
            selectors.add("sha256", &digest);
        }

        pin.check(&process_dir, pid)?;
        Ok(selectors.set)
    }

    fn sha256_of(
        &self,
        exe_link: &Path,
        display_path: &str,
        pid: i32,
    ) -> Result<String, AttestError> {
        let mut file = File::open(exe_link).map_err(|source| proc_error(pid, exe_link, source))?;
        let io_error = |source| AttestError::Io {
            path: exe_link.to_owned(),
            source,
        };
        let before = FileIdentity::of(&file.metadata().map_err(io_error)?);
        let limit = self.workload_size_limit;
        if limit > 0 && before.size > limit {
            return Err(AttestError::TooLarge {
                path: display_path.to_owned(),
                size: before.size,
                limit,
            });
        }
        if let Some(digest) = self
            .digests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&before)
        {
            return Ok(digest.clone());
        }

        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buffer = vec![0u8; 64 * 1024];
        let mut hashed: u64 = 0;
        loop {
            let n = file.read(&mut buffer).map_err(io_error)?;
            let Some(chunk) = buffer.get(..n) else {
                break;
            };
            if chunk.is_empty() {
                break;
            }
            hashed = hashed.saturating_add(n as u64);
            if limit > 0 && hashed > limit {
                return Err(AttestError::TooLarge {
                    path: display_path.to_owned(),
                    size: hashed,
                    limit,
                });
            }
            context.update(chunk);
        }
        let digest = hex(context.finish().as_ref());

        // Remember the digest only if the file did not change while it was read.
        if FileIdentity::of(&file.metadata().map_err(io_error)?) == before {
            let mut digests = self.digests.lock().unwrap_or_else(PoisonError::into_inner);
            if digests.len() >= DIGEST_CACHE_CAPACITY {
                digests.clear();
            }
            digests.insert(before, digest.clone());
        }
        Ok(digest)
    }
}

/// How an attestation knows that what it read under `/proc/<pid>` was the caller's.
pub(crate) enum CallerPin<'a> {
    /// The pidfd opened at accept: the process must not have exited by the end.
    Process(&'a ProcessHandle),
    /// A start time: the process read after collecting must have this one. Start times only
    /// grow, so it has the same one only if it is the same process, whatever ran under the
    /// PID in between.
    StartTime(u64),
}

impl<'a> CallerPin<'a> {
    /// The caller's pin: its pidfd, or the start time read at accept, or without either (a
    /// caller that did not go through the accept loop) the start time now.
    pub(crate) fn of(
        peer: &'a PeerCredentials,
        process_dir: &Path,
        pid: i32,
    ) -> Result<Self, AttestError> {
        Ok(match (&peer.process, peer.start_time) {
            (Some(process), _) => Self::Process(process),
            (None, Some(at_accept)) => Self::StartTime(at_accept),
            (None, None) => Self::StartTime(start_time_in(process_dir, pid)?),
        })
    }

    /// The caller's pin, checked now: its pidfd, or its start time read now, which must be
    /// the one read at accept if there is one. For attestors that wait on something slow
    /// before the final check, so a PID already taken over costs no lookup.
    pub(crate) fn checked_now(
        peer: &'a PeerCredentials,
        process_dir: &Path,
        pid: i32,
    ) -> Result<Self, AttestError> {
        if let Some(process) = &peer.process {
            return Ok(Self::Process(process));
        }
        let started = start_time_in(process_dir, pid)?;
        if peer
            .start_time
            .is_some_and(|at_accept| at_accept != started)
        {
            return Err(AttestError::PidReused { pid });
        }
        Ok(Self::StartTime(started))
    }

    /// Fails unless the pinned process is still the one under `process_dir`.
    pub(crate) fn check(&self, process_dir: &Path, pid: i32) -> Result<(), AttestError> {
        match self {
            Self::Process(process) => match process.has_exited() {
                Ok(false) => Ok(()),
                Ok(true) => Err(AttestError::ProcessGone { pid }),
                Err(source) => Err(AttestError::Io {
                    path: process_dir.to_owned(),
                    source,
                }),
            },
            Self::StartTime(started) => {
                if start_time_in(process_dir, pid)? == *started {
                    Ok(())
                } else {
                    Err(AttestError::PidReused { pid })
                }
            }
        }
    }
}

/// The start time of process `pid` in clock ticks after boot (`/proc/<pid>/stat` field 22).
pub fn process_start_time(pid: i32) -> Result<u64, AttestError> {
    start_time_in(&Path::new("/proc").join(pid.to_string()), pid)
}

fn start_time_in(process_dir: &Path, pid: i32) -> Result<u64, AttestError> {
    let path = process_dir.join("stat");
    let stat = read_proc_file(&path, pid)?;
    parse_start_time(&stat).map_err(|reason| AttestError::Malformed { path, reason })
}

/// Field 22 of `/proc/<pid>/stat`. Field 2 is the command name in parentheses and may itself
/// contain spaces and parentheses, so fields are counted from the last `)`.
fn parse_start_time(stat: &str) -> Result<u64, &'static str> {
    let (_, after_name) = stat
        .rsplit_once(')')
        .ok_or("no closing parenthesis after the command name")?;
    // Field 3 (state) is the first after the name, so field 22 is the 20th.
    after_name
        .split_ascii_whitespace()
        .nth(19)
        .ok_or("too few fields")?
        .parse()
        .map_err(|_| "start time is not a number")
}

/// The parts of `/proc/<pid>/status` the attestor uses.
#[derive(Debug, PartialEq, Eq)]
struct ProcessStatus {
    effective_uid: u32,
    effective_gid: u32,
    supplementary_gids: Vec<u32>,
}

impl ProcessStatus {
    fn parse(status: &[u8]) -> Result<Self, &'static str> {
        let mut effective_uid = None;
        let mut effective_gid = None;
        let mut supplementary_gids = None;
        // Every line is read and the last of each kind wins: the kernel's own come after the
        // process's name, which old kernels printed unescaped, newlines included. Each line is
        // matched by its prefix, without searching it for a colon; the name may be any bytes,
        // and nothing here depends on it.
        for line in status.split(|&byte| byte == b'\n') {
            if let Some(value) = line.strip_prefix(b"Uid:") {
                // Real, effective, saved and filesystem IDs; SPIRE uses the effective one.
                effective_uid = Some(second_id(value).ok_or("bad Uid line")?);
            } else if let Some(value) = line.strip_prefix(b"Gid:") {
                effective_gid = Some(second_id(value).ok_or("bad Gid line")?);
            } else if let Some(value) = line.strip_prefix(b"Groups:") {
                supplementary_gids = Some(
                    ids(value)
                        .map(parse_id)
                        .collect::<Option<_>>()
                        .ok_or("bad Groups line")?,
                );
            }
        }
        let supplementary_gids = supplementary_gids.unwrap_or_default();
        Ok(Self {
            effective_uid: effective_uid.ok_or("no Uid line")?,
            effective_gid: effective_gid.ok_or("no Gid line")?,
            supplementary_gids,
        })
    }
}

/// The whitespace-separated numbers of a status line's value.
fn ids(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(u8::is_ascii_whitespace)
        .filter(|id| !id.is_empty())
}

fn parse_id(id: &[u8]) -> Option<u32> {
    std::str::from_utf8(id).ok()?.parse().ok()
}

fn second_id(value: &[u8]) -> Option<u32> {
    parse_id(ids(value).nth(1)?)
}

/// The names of an `/etc/passwd` or `/etc/group` file by numeric ID (its third field, in
/// both), the first line for an ID winning, as `getpwuid` and `getgrgid` do.
fn account_names(database: &str) -> AccountNames {
    let mut names = HashMap::new();
    for line in database.lines().filter(|line| !line.starts_with('#')) {
        let mut fields = line.split(':');
        let (Some(name), Some(id)) = (fields.next(), fields.nth(1)) else {
            continue;
        };
        if let Ok(id) = id.parse::<u32>()
            && !name.is_empty()
        {
            names.entry(id).or_insert_with(|| name.to_owned());
        }
    }
    names
}

/// The `unix` selectors of one attestation, each written in one reused buffer.
#[derive(Default)]
struct UnixSelectors {
    set: SelectorSet,
    value: String,
}

impl UnixSelectors {
    fn add(&mut self, kind: &str, value: impl std::fmt::Display) {
        use std::fmt::Write as _;
        self.value.clear();
        let _ = write!(self.value, "{kind}:{value}");
        // A value no selector can hold (over-long, control characters) matches no entry
        // either; leaving it out never grants more than including it would.
        match Selector::new(UNIX_SELECTOR_TYPE, &self.value) {
            Ok(selector) => {
                self.set.insert(selector);
            }
            Err(error) => tracing::warn!(%error, kind, "skipping unrepresentable unix selector"),
        }
    }
}

/// A `/proc` file's text. Read in plain `read`s, without the size query and seek that
/// `std::fs::read_to_string` makes first (procfs files report no size): an attestation reads
/// one or two of these per call.
fn read_proc_file(path: &Path, pid: i32) -> Result<String, AttestError> {
    let mut buffer = [0u8; 4096];
    let text = read_proc_bytes(path, pid, &mut buffer)?;
    // A process names itself: its command name may be any bytes, and none of what is
    // parsed here depends on them.
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// A `/proc` file's bytes, read in plain `read`s into `buffer`, or into a vector when they
/// do not fit.
fn read_proc_bytes<'a>(
    path: &Path,
    pid: i32,
    buffer: &'a mut [u8],
) -> Result<Cow<'a, [u8]>, AttestError> {
    let read = |buffer: &'a mut [u8]| -> io::Result<Cow<'a, [u8]>> {
        let mut file = File::open(path)?;
        let mut filled = 0;
        while let Some(room) = buffer.get_mut(filled..).filter(|room| !room.is_empty()) {
            match file.read(room) {
                Ok(0) => return Ok(Cow::Borrowed(buffer.get(..filled).unwrap_or_default())),
                Ok(n) => filled += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        let mut text = buffer.to_vec();
        let mut chunk = [0u8; 4096];
        loop {
            match file.read(&mut chunk) {
                Ok(0) => return Ok(Cow::Owned(text)),
                Ok(n) => text.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    };
    read(buffer).map_err(|source| proc_error(pid, path, source))
}

fn proc_error(pid: i32, path: &Path, source: io::Error) -> AttestError {
    match source.kind() {
        // ESRCH surfaces when the process dies between opening its directory and reading.
        io::ErrorKind::NotFound => AttestError::ProcessGone { pid },
        _ if source.raw_os_error() == Some(3) => AttestError::ProcessGone { pid },
        _ => AttestError::Io {
            path: path.to_owned(),
            source,
        },
    }
}

/// An account database, or nothing when it cannot be read: names are optional selectors.
fn read_optional(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| {
        tracing::debug!(path = %path.display(), %error, "account database unreadable");
        String::new()
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_counts_fields_after_the_last_parenthesis() {
        let stat = "1234 (we ird) (name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000000 100 18446744073709551615";
        assert_eq!(parse_start_time(stat), Ok(987_654));
        assert!(parse_start_time("1234 no-paren S 1").is_err());
        assert!(parse_start_time("1 (x) S 1 2").is_err());
    }

    #[test]
    fn a_command_name_that_is_not_utf8_does_not_stop_attestation() {
        let dir = tempfile::tempdir().unwrap();
        let mut stat = b"77 (caf\xe9)) S 1 77 77 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 ".to_vec();
        stat.extend_from_slice(b"4242 1000000 100 18446744073709551615\n");
        std::fs::write(dir.path().join("stat"), stat).unwrap();
        assert_eq!(start_time_in(dir.path(), 77).unwrap(), 4242);
        // A file past one read's worth comes whole.
        let long = "x".repeat(10_000);
        std::fs::write(dir.path().join("long"), &long).unwrap();
        assert_eq!(read_proc_file(&dir.path().join("long"), 77).unwrap(), long);
        assert!(matches!(
            read_proc_file(&dir.path().join("gone"), 77),
            Err(AttestError::ProcessGone { pid: 77 })
        ));
    }

    #[test]
    fn status_gives_effective_ids_and_groups() {
        let status = "Name:\tx\nUid:\t1000\t1001\t1000\t1001\nGid:\t50\t51\t50\t51\n\
                      Groups:\t4 24 27 \nVmRSS:\t1 kB\n";
        assert_eq!(
            ProcessStatus::parse(status.as_bytes()),
            Ok(ProcessStatus {
                effective_uid: 1001,
                effective_gid: 51,
                supplementary_gids: vec![4, 24, 27],
            })
        );
        let no_groups = "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n";
        assert_eq!(
            ProcessStatus::parse(no_groups.as_bytes()).map(|s| s.supplementary_gids),
            Ok(vec![])
        );
        // A name with newlines (old kernels print it unescaped) comes first and loses.
        let forged = "Name:\tx\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t0\n\
                      Umask:\t0022\nUid:\t1000\t1001\t1000\t1001\nGid:\t50\t51\t50\t51\n\
                      Groups:\t4\n";
        assert_eq!(
            ProcessStatus::parse(forged.as_bytes()),
            Ok(ProcessStatus {
                effective_uid: 1001,
                effective_gid: 51,
                supplementary_gids: vec![4],
            })
        );
        assert!(ProcessStatus::parse(b"Gid:\t0\t0\t0\t0\n").is_err());
        assert!(ProcessStatus::parse(b"Uid:\tx\ty\nGid:\t0\t0\n").is_err());
    }

    #[test]
    fn account_names_come_from_the_numeric_id_field() {
        let passwd = "# comment\nroot:x:0:0:root:/root:/bin/bash\n\
                      nginx:x:101:101::/nonexistent:/usr/sbin/nologin\nbad:x:notanumber:1\n\
                      toor:x:0:0::/root:/bin/sh\n:x:7:7::/:/bin/sh\n";
        let users = account_names(passwd);
        assert_eq!(
            users.get(&0).map(String::as_str),
            Some("root"),
            "first wins"
        );
        assert_eq!(users.get(&101).map(String::as_str), Some("nginx"));
        assert_eq!(users.get(&5), None);
        assert_eq!(users.get(&7), None, "no name");
        assert_eq!(users.len(), 2);
        let group = "root:x:0:\nadm:x:4:syslog,alice\n";
        assert_eq!(
            account_names(group).get(&4).map(String::as_str),
            Some("adm")
        );
        assert!(account_names("").is_empty());
    }

    #[test]
    fn account_databases_are_read_again_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let database = AccountDatabase::new(path.clone());
        let start = std::time::Instant::now();
        let later = |seconds: u64| start + std::time::Duration::from_secs(seconds);
        let name = |at: std::time::Instant| database.names_at(at).get(&1000).cloned();
        assert!(database.names_at(start).is_empty(), "missing: no names");
        std::fs::write(&path, "alice:x:1000:1000::/home/alice:/bin/sh\n").unwrap();
        // Within the recheck interval the file is not looked at.
        assert_eq!(name(start), None);
        assert_eq!(name(later(1)).as_deref(), Some("alice"));
        let first = database.names_at(later(2));
        assert!(
            Arc::ptr_eq(&first, &database.names_at(later(3))),
            "unchanged: not read again"
        );
        // Replaced (a new inode, as `useradd` and editors write it): read again.
        let replacement = dir.path().join("passwd.new");
        std::fs::write(&replacement, "bob:x:1000:1000::/home/bob:/bin/sh\n").unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        assert_eq!(name(later(4)).as_deref(), Some("bob"));
        // Rewritten in place with the same length: its change time moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "eve:x:1000:1000::/home/bob:/bin/sh\n").unwrap();
        assert_eq!(name(later(5)).as_deref(), Some("eve"));
        // Gone: no names.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(name(later(6)), None);
    }

    #[test]
    fn fake_proc_tree_is_attested_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        let process = proc_root.join("42");
        std::fs::create_dir_all(&process).unwrap();
        let stat = |start: u64| {
            format!("42 (app) S 1 42 42 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0\n")
        };
        std::fs::write(process.join("stat"), stat(777)).unwrap();
        std::fs::write(
            process.join("status"),
            "Uid:\t7\t1000\t1000\t1000\nGid:\t7\t1000\t1000\t1000\nGroups:\t4 1000 99\n",
        )
        .unwrap();
        let passwd = dir.path().join("passwd");
        std::fs::write(&passwd, "alice:x:1000:1000::/home/alice:/bin/sh\n").unwrap();
        let group = dir.path().join("group");
        std::fs::write(&group, "adm:x:4:alice\nalice:x:1000:\n").unwrap();
        let attestor =
            UnixAttestor::with_paths(&UnixAttestorConfig::default(), proc_root, passwd, group);
        let peer = PeerCredentials {
            pid: Some(42),
            uid: 1000,
            gid: 1000,
            start_time: Some(777),
            process: None,
        };

        let selectors: Vec<String> = attestor
            .attest_blocking(&peer)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            selectors,
            [
                "unix:gid:1000",
                "unix:group:alice",
                "unix:supplementary_gid:1000",
                "unix:supplementary_gid:4",
                "unix:supplementary_gid:99",
                "unix:supplementary_group:adm",
                "unix:supplementary_group:alice",
                "unix:uid:1000",
                "unix:user:alice",
            ]
        );

        // A status past the stack buffer (a process in hundreds of groups) is read whole:
        // the kernel's last lines win, so a cut-off read would name the wrong groups.
        let many: Vec<String> = (10_000..11_000).map(|gid| gid.to_string()).collect();
        std::fs::write(
            process.join("status"),
            format!(
                "Uid:\t7\t1000\t1000\t1000\nGid:\t7\t1000\t1000\t1000\nGroups:\t{}\n\
                 Groups:\t{} 4\n",
                many.join(" "),
                many.join(" "),
            ),
        )
        .unwrap();
        let selectors = attestor.attest_blocking(&peer).unwrap();
        let supplementary: Vec<String> = selectors
            .iter()
            .map(ToString::to_string)
            .filter(|s| s.starts_with("unix:supplementary_gid:"))
            .collect();
        assert_eq!(supplementary.len(), 1001, "{supplementary:?}");
        assert!(supplementary.contains(&"unix:supplementary_gid:4".to_owned()));
        assert!(supplementary.contains(&"unix:supplementary_gid:10999".to_owned()));

        let reused = PeerCredentials {
            start_time: Some(776),
            ..peer.clone()
        };
        assert!(matches!(
            attestor.attest_blocking(&reused),
            Err(AttestError::PidReused { pid: 42 })
        ));
        let other_uid = PeerCredentials {
            uid: 7,
            ..peer.clone()
        };
        assert!(matches!(
            attestor.attest_blocking(&other_uid),
            Err(AttestError::CredentialsChanged { what: "uid", .. })
        ));
        let gone = PeerCredentials {
            pid: Some(43),
            ..peer.clone()
        };
        assert!(matches!(
            attestor.attest_blocking(&gone),
            Err(AttestError::ProcessGone { pid: 43 })
        ));
        assert!(matches!(
            attestor.attest_blocking(&PeerCredentials { pid: None, ..peer }),
            Err(AttestError::NoPid)
        ));
    }
}
