//! Getting a runtime thread's heap ready for a burst of workloads.
//!
//! glibc gives each thread an arena of its own and makes it writable only as it grows: one
//! `mprotect` per page of growth, on top of the page fault. A node that starts with its
//! workloads (a thousand first `FetchX509SVID` calls at once) grows the agent's heap by tens
//! of kilobytes per stream in one go, and the `mprotect`s came to about a tenth of the
//! agent's CPU in that burst. [`reserve_thread_heap`] grows the arena once, in blocks, and
//! frees it again: the pages go back to the system (the resident set is unchanged) while the
//! address range stays writable, so later growth up to there costs the page faults alone.
//! With any other allocator it is an allocation and a free.

use std::cell::Cell;

/// How far a runtime thread's arena is grown: what a thousand workloads' connections and
/// streams take (about 55 kB each, most of it the connections' HTTP/2 buffers, allocated
/// whole even where untouched), split between two worker threads, with some room. glibc's
/// per-thread heaps are at most 64 MiB.
pub const THREAD_HEAP_RESERVE: usize = 48 << 20;

/// The blocks it is grown in: below glibc's threshold for serving an allocation from its own
/// mapping (128 KiB), so that they come from the thread's arena.
const BLOCK: usize = 64 << 10;

thread_local! {
    /// Whether this thread has taken [`reserve_worker_heap`]'s reserve.
    static RESERVED: Cell<bool> = const { Cell::new(false) };
}

/// For a multi-thread runtime's `on_thread_park`, which only its workers call: reserves
/// [`THREAD_HEAP_RESERVE`] the first time each worker parks (when it first runs out of work,
/// right after the runtime starts), and does nothing on later parks. `on_thread_start` would
/// not tell the workers from the blocking pool's threads, which start on demand (for a file
/// to write, a workload path to hash), again after each idle spell, and race the workers to
/// start.
pub fn reserve_worker_heap() {
    if take_reserve(&RESERVED) {
        reserve_thread_heap(THREAD_HEAP_RESERVE);
    }
}

/// Whether `reserved` was not set yet; sets it.
fn take_reserve(reserved: &'static std::thread::LocalKey<Cell<bool>>) -> bool {
    !reserved.replace(true)
}

/// Grows the calling thread's heap by about `bytes` and frees it again (see the module's
/// documentation).
pub fn reserve_thread_heap(bytes: usize) {
    let blocks: Vec<Vec<u8>> = (0..bytes / BLOCK)
        .map(|_| Vec::with_capacity(BLOCK))
        .collect();
    // Kept from being optimized away: the allocations are the point.
    drop(std::hint::black_box(blocks));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident_anonymous() -> usize {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|line| line.strip_prefix("RssAnon:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<usize>().ok())
            .unwrap()
            * 1024
    }

    #[test]
    fn each_thread_takes_the_reserve_once() {
        thread_local! {
            static TAKEN: Cell<bool> = const { Cell::new(false) };
        }
        assert!(take_reserve(&TAKEN));
        assert!(!take_reserve(&TAKEN));
        assert!(!take_reserve(&TAKEN));
        let elsewhere = std::thread::spawn(|| (take_reserve(&TAKEN), take_reserve(&TAKEN)))
            .join()
            .unwrap();
        assert_eq!(elsewhere, (true, false));
    }

    /// The start, end and name of the mapping of this process that holds `address`.
    fn mapping_of(address: usize) -> (usize, usize, String) {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                let (start, end) = fields.next()?.split_once('-')?;
                let start = usize::from_str_radix(start, 16).ok()?;
                let end = usize::from_str_radix(end, 16).ok()?;
                let name = fields.nth(4).unwrap_or("").to_owned();
                (start <= address && address < end).then_some((start, end, name))
            })
            .unwrap()
    }

    /// On a thread of its own (as a runtime thread is, with an arena of its own), the
    /// reserve leaves the thread's heap writable that far without keeping it resident.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_reserve_stays_writable_but_not_resident() {
        let (before, after, mapping) = std::thread::spawn(move || {
            let before = resident_anonymous();
            reserve_thread_heap(THREAD_HEAP_RESERVE);
            let after = resident_anonymous();
            // Not a few bytes, which glibc may hand out from the main heap's caches.
            let probe: Vec<u8> = Vec::with_capacity(4096);
            let mapping = mapping_of(probe.as_ptr() as usize);
            (before, after, mapping)
        })
        .join()
        .unwrap();
        let (start, end, name) = mapping;
        assert!(
            name.is_empty() && end - start >= THREAD_HEAP_RESERVE,
            "the thread's heap is {start:#x}-{end:#x} {name:?}"
        );
        // Only the blocks' headers were written: a page each, and no more stays.
        assert!(
            after < before + THREAD_HEAP_RESERVE / 8,
            "resident before {before}, after {after}"
        );
    }
}
