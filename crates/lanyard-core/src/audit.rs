//! The tamper-evident audit log format: JSON lines, each carrying the SHA-256 of the line
//! before it, so that editing or removing any line breaks every link after it.
//!
//! A line is one JSON object, written exactly once and never re-serialised:
//!
//! ```text
//! {"seq":0,"time":"2026-11-27T12:00:00Z","prev":"000…000","event":{"action":"entry created",…}}
//! {"seq":1,"time":"2026-11-27T12:00:05Z","prev":"<sha256 of line 0>","event":{…}}
//! ```
//!
//! `seq` counts from 0; `prev` is the lowercase hex SHA-256 of the previous line's bytes
//! (without its newline), 64 zeros for the first. [`verify`] walks a log and names the first
//! line that does not follow from the one before it. Removing lines at the *end* leaves a
//! valid shorter chain; to catch that, the writer keeps the [`Head`] (last seq and hash)
//! somewhere else, and [`verify`]'s result can be compared with it.
//!
//! This module formats and checks; writing files (append, fsync) is the server's job.

use std::fmt;
use std::time::SystemTime;

use ring::digest;
use serde::{Deserialize, Serialize};

/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The end of a chain: the last line's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// How many lines the chain has.
    pub lines: u64,
    /// The hash of the last line ([`GENESIS`] for an empty chain).
    pub hash: String,
}

impl fmt::Display for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} lines, head {}", self.lines, self.hash)
    }
}

/// Why a log does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ChainError {
    /// The 1-based line number of the first line that does not follow.
    pub line: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// One line as written.
#[derive(Serialize, Deserialize)]
struct Line<E> {
    seq: u64,
    time: String,
    prev: String,
    event: E,
}

/// The writer's side: the state needed to append the next line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    head: Head,
}

impl Default for Chain {
    fn default() -> Self {
        Self::new()
    }
}

impl Chain {
    /// An empty chain.
    pub fn new() -> Self {
        Self {
            head: Head {
                lines: 0,
                hash: GENESIS.to_owned(),
            },
        }
    }

    /// Continues the chain in `existing` (a log's contents). A final line without its
    /// newline was torn by a crash mid-write and was never acknowledged: its length is
    /// returned so that the writer can cut it off before appending.
    pub fn resume(existing: &str) -> Result<(Self, usize), ChainError> {
        let (complete, torn) = match existing.rfind('\n') {
            Some(end) => (&existing[..=end], existing.len() - end - 1),
            None => ("", existing.len()),
        };
        let head = verify(complete)?;
        Ok((Self { head }, torn))
    }

    /// The current head.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Formats the next line for `event` at `time`, newline included, and advances the
    /// chain. The caller must write the line before appending another.
    pub fn append(&mut self, time: SystemTime, event: &impl Serialize) -> String {
        let line = Line {
            seq: self.head.lines,
            time: rfc3339(time),
            prev: self.head.hash.clone(),
            event,
        };
        // Serialising plain data to a string does not fail.
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        self.head = Head {
            lines: self.head.lines + 1,
            hash: hash_line(&text),
        };
        text.push('\n');
        text
    }
}

/// Checks every link of `log` and returns its head. An empty log verifies.
pub fn verify(log: &str) -> Result<Head, ChainError> {
    let mut head = Chain::new().head;
    for (index, text) in log.split_terminator('\n').enumerate() {
        let number = index as u64 + 1;
        let error = |reason: String| ChainError {
            line: number,
            reason,
        };
        let line: Line<serde_json::Value> =
            serde_json::from_str(text).map_err(|e| error(format!("not an audit line: {e}")))?;
        if line.seq != head.lines {
            return Err(error(format!(
                "sequence number {} where {} was expected: lines were removed or reordered",
                line.seq, head.lines
            )));
        }
        if line.prev != head.hash {
            return Err(error(if number == 1 {
                "the first line does not start the chain".to_owned()
            } else {
                format!(
                    "it does not carry the hash of line {}: that line was edited, or lines were \
                     removed",
                    number - 1
                )
            }));
        }
        head = Head {
            lines: head.lines + 1,
            hash: hash_line(text),
        };
    }
    Ok(head)
}

/// The lowercase hex SHA-256 of one line (without its newline).
pub fn hash_line(line: &str) -> String {
    let digest = digest::digest(&digest::SHA256, line.as_bytes());
    digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The events of a log, in order, for reports (no verification).
pub fn events(log: &str) -> impl Iterator<Item = (u64, String, serde_json::Value)> + '_ {
    log.split_terminator('\n').filter_map(|text| {
        serde_json::from_str::<Line<serde_json::Value>>(text)
            .ok()
            .map(|line| (line.seq, line.time, line.event))
    })
}

fn rfc3339(time: SystemTime) -> String {
    let time: time::OffsetDateTime = time.into();
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
