//! CPU time and memory from `/proc`: per thread-name prefix inside this process (the
//! in-process server runs on its own named threads) or for a whole child process.

use std::path::Path;
use std::time::Duration;

/// Thread-name prefix of the in-process server's runtime.
pub(crate) const SERVER_THREADS: &str = "lanyard-srv";
/// Thread-name prefix of SQLite's worker threads (sqlx), which serve the server only.
pub(crate) const SQLITE_THREADS: &str = "sqlx-sqlite";

/// Whose CPU time to measure.
#[derive(Debug, Clone)]
pub(crate) enum CpuMeter {
    /// The threads of this process whose names start with one of these prefixes.
    Threads(Vec<&'static str>),
    /// Another process, every thread.
    Process(u32),
}

impl CpuMeter {
    /// The in-process server's threads.
    pub(crate) fn in_process_server() -> Self {
        Self::Threads(vec![SERVER_THREADS, SQLITE_THREADS])
    }

    /// CPU time consumed so far.
    pub(crate) fn cpu_time(&self) -> Duration {
        match self {
            Self::Threads(prefixes) => threads_cpu_time(Path::new("/proc/self/task"), prefixes),
            Self::Process(pid) => threads_cpu_time(Path::new(&format!("/proc/{pid}/task")), &[""]),
        }
    }
}

fn threads_cpu_time(tasks: &Path, prefixes: &[&str]) -> Duration {
    let Ok(dir) = std::fs::read_dir(tasks) else {
        return Duration::ZERO;
    };
    let mut total = Duration::ZERO;
    for task in dir.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        total += task_cpu_time(&path);
    }
    total
}

/// A task's CPU time: nanoseconds from `schedstat`, else clock ticks from `stat`.
fn task_cpu_time(task: &Path) -> Duration {
    if let Some(ns) = std::fs::read_to_string(task.join("schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
    {
        return Duration::from_nanos(ns);
    }
    let stat = std::fs::read_to_string(task.join("stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Resident set size of a process in bytes (0 if unknown).
pub(crate) fn rss_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// The anonymous part of a process's resident set (its heap and stacks, not the pages of its
/// executable and libraries) in bytes (0 if unknown).
pub(crate) fn rss_anon_bytes(pid: u32) -> u64 {
    status_bytes(pid, "RssAnon:")
}

/// A `kB` figure of `/proc/<pid>/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        // Burn a little CPU so the counter has moved.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(CpuMeter::Process(pid).cpu_time() > Duration::ZERO);
        assert!(rss_bytes(pid) > 0);
        let anon = rss_anon_bytes(pid);
        assert!(anon > 0 && anon < rss_bytes(pid), "{anon}");
        assert_eq!(
            CpuMeter::Threads(vec!["no-such-thread-name"]).cpu_time(),
            Duration::ZERO
        );
    }
}
