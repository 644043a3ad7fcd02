//! The audit chain: every edit, removal, reordering or insertion of a line is detected and
//! located; a torn final line is recognised as such; a valid log resumes where it ended.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::audit::{Chain, GENESIS, events, hash_line, verify};
use serde_json::json;

fn at(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
}

/// A log of `n` lines.
fn log(n: u64) -> (String, Chain) {
    let mut chain = Chain::new();
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&chain.append(at(i), &json!({"action": "entry created", "n": i})));
    }
    (text, chain)
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_owned).collect()
}

fn join(lines: &[String]) -> String {
    lines.iter().map(|line| format!("{line}\n")).collect()
}

#[test]
fn a_written_log_verifies_to_the_writers_head() {
    let (text, chain) = log(5);
    let head = verify(&text).unwrap();
    assert_eq!(&head, chain.head());
    assert_eq!(head.lines, 5);
    assert_eq!(head.hash, hash_line(text.lines().last().unwrap()));
    assert_eq!(verify("").unwrap().hash, GENESIS);

    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["seq"], 0);
    assert_eq!(first["prev"], GENESIS);
    assert_eq!(first["time"], "2027-01-15T08:00:00Z");
    assert_eq!(first["event"]["action"], "entry created");
    let collected: Vec<u64> = events(&text).map(|(seq, _, _)| seq).collect();
    assert_eq!(collected, [0, 1, 2, 3, 4]);
}

#[test]
fn an_edited_line_is_detected_at_the_next_line() {
    let (text, _) = log(5);
    let mut edited = lines(&text);
    edited[2] = edited[2].replace("entry created", "entry deleted");
    let error = verify(&join(&edited)).unwrap_err();
    assert_eq!(error.line, 4, "{error}");
    assert!(error.to_string().contains("hash of line 3"), "{error}");
}

#[test]
fn an_edited_last_line_is_caught_by_the_head() {
    let (text, chain) = log(3);
    let mut edited = lines(&text);
    edited[2] = edited[2].replace("\"n\":2", "\"n\":9");
    let head = verify(&join(&edited)).unwrap();
    assert_eq!(head.lines, chain.head().lines);
    assert_ne!(
        &head,
        chain.head(),
        "the head kept elsewhere exposes the edit"
    );
}

#[test]
fn removed_reordered_and_inserted_lines_are_detected() {
    let (text, chain) = log(5);
    let original = lines(&text);

    let mut removed = original.clone();
    removed.remove(1);
    let error = verify(&join(&removed)).unwrap_err();
    assert_eq!(error.line, 2);
    assert!(error.reason.contains("removed"), "{error}");

    let mut swapped = original.clone();
    swapped.swap(1, 2);
    assert_eq!(verify(&join(&swapped)).unwrap_err().line, 2);

    let mut first_removed = original.clone();
    first_removed.remove(0);
    assert_eq!(verify(&join(&first_removed)).unwrap_err().line, 1);

    // A forged line with the right seq and prev still breaks the link after it.
    let mut inserted = original.clone();
    let forged = json!({"seq": 2, "time": "x", "prev": hash_line(&original[1]), "event": {}});
    inserted[2] = forged.to_string();
    assert_eq!(verify(&join(&inserted)).unwrap_err().line, 4);

    // Truncating the tail leaves a shorter valid chain, which only the head catches.
    let truncated = join(&original[..3]);
    assert_eq!(verify(&truncated).unwrap().lines, 3);
    assert_ne!(&verify(&truncated).unwrap(), chain.head());

    let garbage = format!("{text}not json\n");
    let error = verify(&garbage).unwrap_err();
    assert_eq!(error.line, 6);
    assert!(error.reason.contains("not an audit line"), "{error}");
}

#[test]
fn resume_continues_the_chain_and_reports_a_torn_tail() {
    let (text, chain) = log(3);
    let (mut resumed, torn) = Chain::resume(&text).unwrap();
    assert_eq!(torn, 0);
    assert_eq!(resumed.head(), chain.head());
    let next = resumed.append(at(10), &json!({"action": "agent banned"}));
    assert_eq!(verify(&format!("{text}{next}")).unwrap().lines, 4);

    let torn_text = format!("{text}{{\"seq\":3,\"ti");
    let (resumed, torn) = Chain::resume(&torn_text).unwrap();
    assert_eq!(torn, "{\"seq\":3,\"ti".len());
    assert_eq!(resumed.head(), chain.head());

    let mut broken = lines(&text);
    broken[0] = broken[0].replace("created", "changed");
    assert!(Chain::resume(&join(&broken)).is_err());
}
