//! The smoke run: each target replays `corpus/<target>/` and `regressions/<target>/`, then
//! runs a deterministic mutation loop (bit flips, byte edits, splices of corpus items) seeded
//! by the target's name, for `LANYARD_FUZZ_SMOKE_MS` milliseconds per target (default 2500).
//!
//! This is not coverage-guided; it keeps every target building and running in CI and catches
//! shallow regressions. The long runs use libFuzzer (`fuzz/README.md`). A failing input is
//! hex-dumped in the failure message and saved under the test's temporary directory, ready to
//! be copied into `regressions/<target>/`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Inputs larger than this are not produced by the mutator (libFuzzer's default is 4096; the
/// certificate chains and configs in the corpus are larger).
const MAX_INPUT_LEN: usize = 64 * 1024;

/// A single input that runs longer than this is reported as a hang.
const HANG_TIMEOUT: Duration = Duration::from_secs(60);

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn seeded(name: &str) -> Self {
        // FNV-1a of the name; never zero.
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            // The remainder is below `n`, so it fits.
            usize::try_from(self.next() % n as u64).unwrap_or(0)
        }
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

/// Bytes worth inserting: ASN.1, JSON, TOML and HTTP/2 boundary values.
const INTERESTING: &[&[u8]] = &[
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\x81\x80",
    b"\x82\xff\xff",
    b"\x84\xff\xff\xff\xff",
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"%",
    b"%2F",
    b"/",
    b"//",
    b"..",
    b":",
    b"@",
    b"[",
    b"]",
    b"{",
    b"}",
    b"\n",
    b"\r\n",
    b"=",
    b"'''",
    b"1e999",
    b"-1",
    b"18446744073709551616",
    b"9223372036854775807",
    b"2147483648",
    b"0.5",
    b"null",
    b"true",
    b"spiffe://",
    b"\xc3\xa9",
    b"\xe2\x80\x8b",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let n_mutations = 1 + rng.below(4);
    for _ in 0..n_mutations {
        match rng.below(9) {
            0 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] = rng.byte();
            }
            2 => {
                let at = rng.below(input.len() + 1);
                input.insert(at, rng.byte());
            }
            3 if !input.is_empty() => {
                let start = rng.below(input.len());
                let end = (start + 1 + rng.below(16)).min(input.len());
                input.drain(start..end);
            }
            4 if !input.is_empty() => {
                // Duplicate a range.
                let start = rng.below(input.len());
                let end = (start + 1 + rng.below(32)).min(input.len());
                let chunk = input[start..end].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, chunk);
            }
            5 => {
                let token = INTERESTING[rng.below(INTERESTING.len())];
                let at = rng.below(input.len() + 1);
                input.splice(at..at, token.iter().copied());
            }
            6 if !corpus.is_empty() => {
                // Splice: a chunk of another corpus item over or into this one.
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let start = rng.below(other.len());
                    let end = (start + 1 + rng.below(64)).min(other.len());
                    let at = rng.below(input.len() + 1);
                    let replace_end = (at + rng.below(end - start + 1)).min(input.len());
                    input.splice(at..replace_end, other[start..end].iter().copied());
                }
            }
            7 if input.len() > 1 => {
                input.truncate(rng.below(input.len()));
            }
            _ => {
                // Arithmetic on a byte: lengths and counters off by a little.
                if !input.is_empty() {
                    let at = rng.below(input.len());
                    let delta = [1u8, 2, 0xff, 0xfe][rng.below(4)];
                    input[at] = input[at].wrapping_add(delta);
                }
            }
        }
    }
    input.truncate(MAX_INPUT_LEN);
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

/// The files of a directory, sorted by name; none when it does not exist.
pub(crate) fn read_dir_inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, bytes)
        })
        .collect()
}

fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (row, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!(
            "{:06x}  {:<47}  {text}\n",
            row * 16,
            hex.join(" ")
        ));
    }
    out
}

/// Saves a failing input and returns the failure message.
fn report(target: &str, origin: &str, input: &[u8], what: &str) -> String {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-smoke")
        .join(target);
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    let path = dir.join(format!("crash-{hash:016x}"));
    let saved = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, input))
        .map_or_else(
            |e| format!("(not saved: {e})"),
            |()| path.display().to_string(),
        );
    format!(
        "target {target} {what} on {origin} ({} bytes), saved as {saved}\n\
         replay: copy it into fuzz/regressions/{target}/ and run `cargo test -p lanyard-fuzz`\n{}",
        input.len(),
        hex_dump(&input[..input.len().min(4096)])
    )
}

enum Progress {
    Alive,
    Failed(String),
    Done { n_inputs: u64 },
}

/// Runs one target over its corpus and regressions, then mutations until `budget` is spent,
/// on a worker thread watched for hangs.
fn run_target(name: &'static str, target: fn(&[u8]), budget: Duration) -> Result<u64, String> {
    let dir = fuzz_dir();
    let corpus = read_dir_inputs(&dir.join("corpus").join(name));
    let regressions = read_dir_inputs(&dir.join("regressions").join(name));
    if corpus.is_empty() {
        return Err(format!("fuzz/corpus/{name}/ is empty or missing"));
    }
    let current: Arc<Mutex<(String, Vec<u8>)>> = Arc::default();
    let (progress, progress_rx) = mpsc::channel();
    let worker_current = Arc::clone(&current);
    std::thread::Builder::new()
        .name(format!("fuzz-{name}"))
        .spawn(move || {
            let run_one = |origin: String, input: &[u8]| -> Result<(), String> {
                *worker_current.lock().expect("not poisoned") = (origin.clone(), input.to_vec());
                catch_unwind(AssertUnwindSafe(|| target(input)))
                    .map_err(|_| report(name, &origin, input, "panicked"))
            };
            let mut n_inputs = 0u64;
            for (path, input) in regressions.iter().chain(&corpus) {
                if let Err(message) = run_one(path.display().to_string(), input) {
                    let _ = progress.send(Progress::Failed(message));
                    return;
                }
                n_inputs += 1;
                let _ = progress.send(Progress::Alive);
            }
            let items: Vec<Vec<u8>> = corpus.iter().map(|(_, bytes)| bytes.clone()).collect();
            let mut rng = Rng::seeded(name);
            let started = Instant::now();
            let mut last_beat = Instant::now();
            let mut iteration = 0u64;
            while started.elapsed() < budget {
                let mut input = items[rng.below(items.len())].clone();
                mutate(&mut rng, &mut input, &items);
                if let Err(message) = run_one(format!("mutation {iteration}"), &input) {
                    let _ = progress.send(Progress::Failed(message));
                    return;
                }
                iteration += 1;
                n_inputs += 1;
                if last_beat.elapsed() > Duration::from_secs(1) {
                    last_beat = Instant::now();
                    let _ = progress.send(Progress::Alive);
                }
            }
            let _ = progress.send(Progress::Done { n_inputs });
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    loop {
        match progress_rx.recv_timeout(HANG_TIMEOUT) {
            Ok(Progress::Alive) => {}
            Ok(Progress::Failed(message)) => return Err(message),
            Ok(Progress::Done { n_inputs }) => return Ok(n_inputs),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let (origin, input) = current.lock().map(|c| c.clone()).unwrap_or_default();
                return Err(report(
                    name,
                    &origin,
                    &input,
                    &format!("ran longer than {HANG_TIMEOUT:?}"),
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(format!("target {name}: the worker thread died"));
            }
        }
    }
}

fn budget_per_target() -> Duration {
    let millis = std::env::var("LANYARD_FUZZ_SMOKE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2500);
    Duration::from_millis(millis)
}

#[test]
fn every_target_survives_its_corpus_regressions_and_mutations() {
    // Panics are caught and reported with their input; the default hook's message (with the
    // panic location) is kept, since it is what explains the finding.
    let budget = budget_per_target();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for &(name, target) in lanyard_fuzz::TARGETS {
        let target_started = Instant::now();
        match run_target(name, target, budget) {
            Ok(n_inputs) => summary.push(format!(
                "{name}: {n_inputs} inputs in {:.1} s",
                target_started.elapsed().as_secs_f64()
            )),
            Err(message) => failures.push(message),
        }
    }
    println!(
        "smoke run: {} targets in {:.1} s\n{}",
        lanyard_fuzz::TARGETS.len(),
        started.elapsed().as_secs_f64(),
        summary.join("\n")
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_mutator_is_deterministic() {
    let corpus = vec![b"spiffe://example.org/a".to_vec(), b"unix:uid:0".to_vec()];
    let run = || {
        let mut rng = Rng::seeded("spiffe_id");
        (0..100)
            .map(|_| {
                let mut input = corpus[rng.below(corpus.len())].clone();
                mutate(&mut rng, &mut input, &corpus);
                input
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}
