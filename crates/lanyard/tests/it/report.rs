//! `lanyard report …` against a real server whose datastore is seeded beforehand with
//! entries (with and without owners and expiries), exceptions, issuances from known
//! authorities at known times, and agents' reports of serving.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::policy::Exception;
use lanyard_core::{EntryId, RegistrationEntry, SpiffeId};
use lanyard_server::datastore::{Datastore as _, Issuance, IssuanceKind, SqlStore};
use serde_json::Value;

use crate::real_server::{RunningServer, start_server_with};

const DAY: u64 = 86_400;
const HOUR: u64 = 3_600;

fn lanyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(args)
        .env_remove("LANYARD_SERVER_SOCKET")
        .output()
        .expect("lanyard runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The seeded server and the instant (whole seconds) the seed's times are relative to.
struct Seeded {
    server: RunningServer,
    now: u64,
}

impl Seeded {
    fn ago(&self, seconds: u64) -> i64 {
        i64::try_from(self.now - seconds).unwrap()
    }

    fn ahead(&self, seconds: u64) -> i64 {
        i64::try_from(self.now + seconds).unwrap()
    }

    /// Runs `report <args> --output json` and returns the document.
    fn report_json(&self, args: &[&str]) -> Value {
        let socket = self.server.socket.to_str().unwrap();
        let mut full = vec!["report"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--socket", socket, "--output", "json"]);
        let out = lanyard(&full);
        assert!(
            out.status.success(),
            "{full:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{full:?}: {e}: {}", text(&out.stdout)))
    }
}

fn agent(name: &str) -> SpiffeId {
    format!("spiffe://example.org/spire/agent/join_token/{name}")
        .parse()
        .unwrap()
}

/// An entry to seed: ID, SPIFFE ID path, owner, source, created, expires.
type EntrySeed = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    SystemTime,
    Option<SystemTime>,
);

/// Seeds `<dir>/data/datastore.sqlite3`, then starts a server on it.
fn seeded_server() -> Seeded {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data").join("datastore.sqlite3");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(seed(&path, now));
    drop(runtime);
    // Keep the old issuances the seed relies on (the default retention is 30 days).
    let server = start_server_with(dir, "ledger_retention = \"365d\"\n");
    Seeded { server, now }
}

async fn seed(path: &std::path::Path, now: u64) {
    let store = SqlStore::open(path).await.unwrap();
    let at = |seconds: u64| UNIX_EPOCH + Duration::from_secs(seconds);
    let ago = |seconds: u64| at(now - seconds);
    let ahead = |seconds: u64| at(now + seconds);

    let entries: [EntrySeed; 7] = [
        (
            "active",
            "/svc/active",
            Some("team-a"),
            None,
            ago(90 * DAY),
            None,
        ),
        (
            "served-only",
            "/svc/served-only",
            Some("team-s"),
            None,
            ago(90 * DAY),
            None,
        ),
        (
            "old-use",
            "/svc/old-use",
            Some("team-o"),
            None,
            ago(90 * DAY),
            None,
        ),
        (
            "never",
            "/svc/never",
            None,
            Some("infra-repo"),
            ago(90 * DAY),
            None,
        ),
        (
            "fresh",
            "/svc/fresh",
            None,
            None,
            ago(DAY),
            Some(ahead(3 * DAY)),
        ),
        (
            "later",
            "/svc/later",
            Some("team-l"),
            None,
            ago(90 * DAY),
            Some(ahead(30 * DAY)),
        ),
        (
            "ci-build",
            "/ci/build",
            Some("team-ci"),
            None,
            ago(10 * DAY),
            None,
        ),
    ];
    for (index, (id, spiffe_path, owner, source, created_at, expires_at)) in
        entries.into_iter().enumerate()
    {
        let mut entry = RegistrationEntry::new(
            EntryId::new(id).unwrap(),
            format!("spiffe://example.org{spiffe_path}")
                .parse()
                .unwrap(),
            agent("a1"),
            [format!("unix:uid:{}", 1000 + index).parse().unwrap()]
                .into_iter()
                .collect(),
            created_at,
        );
        entry.owner = owner.map(str::to_owned);
        entry.source = source.map(str::to_owned);
        entry.expires_at = expires_at;
        store.create_entry(entry).await.unwrap();
    }

    let exception = |id: &str,
                     pattern: Option<&str>,
                     entry_ids: &[&str],
                     expires_at: SystemTime,
                     revoked_at: Option<SystemTime>| Exception {
        id: id.to_owned(),
        owner: format!("owner-of-{id}"),
        reason: "testing".to_owned(),
        ticket: None,
        rules: BTreeSet::from(["owner_required".to_owned()]),
        entry_ids: entry_ids.iter().map(|e| (*e).to_owned()).collect(),
        spiffe_id_pattern: pattern.map(str::to_owned),
        expires_at,
        created_at: ago(20 * DAY),
        created_by: "admin".to_owned(),
        revoked_at,
        revision: 1,
    };
    for exception in [
        exception(
            "exc-active",
            Some("spiffe://example.org/ci/*"),
            &["never"],
            ahead(2 * DAY),
            None,
        ),
        exception(
            "exc-revoked",
            None,
            &["active"],
            ahead(5 * DAY),
            Some(ago(HOUR)),
        ),
        exception(
            "exc-expired",
            Some("spiffe://example.org/svc/*"),
            &[],
            ago(DAY),
            None,
        ),
    ] {
        store.create_exception(exception).await.unwrap();
    }

    let issuance = |kind: IssuanceKind,
                    serial: &str,
                    entry_id: &str,
                    spiffe_path: &str,
                    agent_name: &str,
                    authority_id: &str,
                    issued_at: SystemTime,
                    not_after: SystemTime| Issuance {
        kind,
        serial: serial.to_owned(),
        entry_id: entry_id.to_owned(),
        spiffe_id: format!("spiffe://example.org{spiffe_path}")
            .parse()
            .unwrap(),
        agent_id: agent(agent_name),
        authority_id: authority_id.to_owned(),
        issued_at,
        not_after,
        exception_ids: if serial == "1001" {
            vec!["exc-active".to_owned()]
        } else {
            Vec::new()
        },
    };
    use IssuanceKind::{AgentSvid, JwtSvid, X509Svid};
    let agent1_path = "/spire/agent/join_token/a1";
    store
        .record_issuances(&[
            issuance(
                X509Svid,
                "1001",
                "active",
                "/svc/active",
                "a1",
                "aa11",
                ago(2 * DAY),
                ahead(HOUR),
            ),
            issuance(
                JwtSvid,
                "jti-1",
                "active",
                "/svc/active",
                "a1",
                "jwt-key-1",
                ago(3 * DAY),
                ago(3 * DAY - 300),
            ),
            issuance(
                X509Svid,
                "1002",
                "old-use",
                "/svc/old-use",
                "a1",
                "cc33",
                ago(60 * DAY),
                ago(59 * DAY),
            ),
            issuance(
                X509Svid,
                "1003",
                "later",
                "/svc/later",
                "a2",
                "aa11",
                ago(HOUR),
                ahead(HOUR),
            ),
            issuance(
                X509Svid,
                "1004",
                "ci-build",
                "/ci/build",
                "a2",
                "bb22",
                ago(HOUR),
                ahead(2 * HOUR),
            ),
            issuance(
                X509Svid,
                "1005",
                "ci-build",
                "/ci/build",
                "a3",
                "bb22",
                ago(10 * DAY),
                ago(9 * DAY),
            ),
            issuance(
                AgentSvid,
                "2001",
                "",
                agent1_path,
                "a1",
                "aa11",
                ago(HOUR),
                ahead(DAY),
            ),
        ])
        .await
        .unwrap();

    store
        .record_served(&agent("a2"), &[("active".to_owned(), ago(DAY))])
        .await
        .unwrap();
    store
        .record_served(
            &agent("a1"),
            &[
                ("served-only".to_owned(), ago(3 * DAY)),
                ("old-use".to_owned(), ago(45 * DAY)),
            ],
        )
        .await
        .unwrap();
    store.close().await;
}

/// The values of `field` in the objects of `list`, as strings.
fn field_values(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|item| item[field].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The object in `list` whose `field` is `value`.
fn find<'a>(list: &'a Value, field: &str, value: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|item| item[field] == value)
        .unwrap_or_else(|| panic!("no {field} = {value} in {list}"))
}

#[test]
fn governance_reports_over_a_seeded_server() {
    let seeded = seeded_server();
    let socket = seeded.server.socket.to_str().unwrap().to_owned();

    // stale: unused (neither issued nor served) for 30 days, or never used and older.
    let stale = seeded.report_json(&["stale", "--unused-for", "30d"]);
    let mut ids = field_values(&stale["entries"], "entry_id");
    ids.sort();
    assert_eq!(ids, ["never", "old-use"], "{stale}");
    let old_use = find(&stale["entries"], "entry_id", "old-use");
    assert_eq!(old_use["last_used_at"], seeded.ago(45 * DAY), "{stale}");
    assert_eq!(old_use["owner"], "team-o");
    assert_eq!(old_use["spiffe_id"], "spiffe://example.org/svc/old-use");
    let never = find(&stale["entries"], "entry_id", "never");
    assert_eq!(never["last_used_at"], 0);
    assert_eq!(never["created_at"], seeded.ago(90 * DAY));
    // A shorter window catches the entry served only 3 days ago, but not what was used
    // within the last day.
    let stale = seeded.report_json(&["stale", "--unused-for", "2d"]);
    let ids: BTreeSet<String> = field_values(&stale["entries"], "entry_id")
        .into_iter()
        .collect();
    assert!(ids.contains("served-only"), "{stale}");
    for recent in ["active", "later", "ci-build", "fresh"] {
        assert!(!ids.contains(recent), "{recent} is not stale: {stale}");
    }

    // The human table: a header row, one line per stale entry.
    let out = lanyard(&[
        "report",
        "stale",
        "--unused-for",
        "30d",
        "--socket",
        &socket,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let header: Vec<&str> = lines[0]
        .split("  ")
        .filter(|c| !c.is_empty())
        .map(str::trim)
        .collect();
    assert_eq!(
        header,
        ["ENTRY ID", "SPIFFE ID", "OWNER", "LAST USED", "CREATED"],
        "{table}"
    );
    let never_line = lines
        .iter()
        .find(|l| l.starts_with("never "))
        .expect("a row for never");
    assert!(
        never_line.contains("spiffe://example.org/svc/never"),
        "{table}"
    );
    assert!(never_line.contains(" never "), "{table}");
    let old_line = lines
        .iter()
        .find(|l| l.starts_with("old-use "))
        .expect("a row for old-use");
    assert!(old_line.contains("team-o"), "{table}");
    // Columns line up under the header.
    let column = lines[0].find("OWNER").unwrap();
    assert_eq!(old_line.find("team-o"), Some(column), "{table}");

    // expiring: entries and active exceptions expiring within the window, soonest first.
    let expiring = seeded.report_json(&["expiring", "--within", "7d"]);
    let items = &expiring["expiring"];
    assert_eq!(
        field_values(items, "id"),
        ["exc-active", "fresh"],
        "{expiring}"
    );
    assert_eq!(field_values(items, "kind"), ["exception", "entry"]);
    let fresh = find(items, "id", "fresh");
    assert_eq!(fresh["expires_at"], seeded.ahead(3 * DAY));
    assert_eq!(fresh["spiffe_id"], "spiffe://example.org/svc/fresh");
    let in_seconds = fresh["expires_in"].as_i64().unwrap();
    assert!(
        in_seconds <= i64::try_from(3 * DAY).unwrap()
            && in_seconds > i64::try_from(3 * DAY - 600).unwrap(),
        "{expiring}"
    );
    assert_eq!(
        find(items, "id", "exc-active")["owner"],
        "owner-of-exc-active"
    );
    // A longer window reaches the entry expiring in 30 days.
    let expiring = seeded.report_json(&["expiring", "--within", "31d"]);
    assert!(field_values(&expiring["expiring"], "id").contains(&"later".to_owned()));

    // exceptions: all of them, with their status and the current entries they cover.
    let exceptions = seeded.report_json(&["exceptions"]);
    let list = &exceptions["exceptions"];
    let status: BTreeMap<String, (String, u64)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_owned(),
                (
                    e["status"].as_str().unwrap().to_owned(),
                    e["covered_entries"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(
        status,
        BTreeMap::from([
            ("exc-active".to_owned(), ("active".to_owned(), 2)),
            ("exc-expired".to_owned(), ("expired".to_owned(), 6)),
            ("exc-revoked".to_owned(), ("revoked".to_owned(), 1)),
        ]),
        "{exceptions}"
    );
    assert_eq!(find(list, "id", "exc-active")["rules"][0], "owner_required");

    // ownerless: entries without an owner, with where they came from.
    let ownerless = seeded.report_json(&["ownerless"]);
    let mut ids = field_values(&ownerless["entries"], "entry_id");
    ids.sort();
    assert_eq!(ids, ["fresh", "never"], "{ownerless}");
    let never = find(&ownerless["entries"], "entry_id", "never");
    assert_eq!(never["source"], "infra-repo");
    assert_eq!(
        never["parent_id"],
        "spiffe://example.org/spire/agent/join_token/a1"
    );

    // usage: one entry, per agent, with its latest issuances (newest first).
    let usage = seeded.report_json(&["usage", "active"]);
    let entries = usage["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{usage}");
    let active = &entries[0];
    assert_eq!(active["entry_id"], "active");
    assert_eq!(active["last_issued_at"], seeded.ago(2 * DAY), "{usage}");
    assert_eq!(active["last_served_at"], seeded.ago(DAY), "{usage}");
    let agents = &active["agents"];
    let a1 = find(
        agents,
        "agent_id",
        "spiffe://example.org/spire/agent/join_token/a1",
    );
    assert_eq!(a1["issued"], 2);
    assert_eq!(a1["last_served_at"], 0);
    let a2 = find(
        agents,
        "agent_id",
        "spiffe://example.org/spire/agent/join_token/a2",
    );
    assert_eq!(a2["last_served_at"], seeded.ago(DAY));
    assert_eq!(a2["issued"], 0);
    assert_eq!(
        field_values(&active["issuances"], "serial"),
        ["1001", "jti-1"]
    );
    assert_eq!(
        field_values(&active["issuances"], "kind"),
        ["x509-svid", "jwt-svid"]
    );
    assert_eq!(active["issuances"][0]["exception_ids"][0], "exc-active");
    assert_eq!(active["issuances"][0]["not_after"], seeded.ahead(HOUR));
    // By SPIFFE ID, the same entry.
    let by_id = seeded.report_json(&["usage", "spiffe://example.org/svc/active"]);
    assert_eq!(field_values(&by_id["entries"], "entry_id"), ["active"]);
    // An unknown entry is one error line.
    let out = lanyard(&["report", "usage", "no-such-entry", "--socket", &socket]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: report usage:"), "{stderr}");
    assert!(stderr.contains("no-such-entry"), "{stderr}");
    let out = lanyard(&[
        "report",
        "usage",
        "spiffe://example.org/nobody",
        "--socket",
        &socket,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));

    // holders: per authority, only unexpired SVIDs count (agent SVIDs included).
    let holders = seeded.report_json(&["holders"]);
    let authorities = &holders["authorities"];
    let mut ids = field_values(authorities, "authority_id");
    ids.sort();
    assert_eq!(ids, ["aa11", "bb22"], "{holders}");
    let aa11 = find(authorities, "authority_id", "aa11");
    assert_eq!(
        (aa11["agents"].as_u64(), aa11["svids"].as_u64()),
        (Some(2), Some(3)),
        "{holders}"
    );
    assert_eq!(aa11["latest_not_after"], seeded.ahead(DAY));
    let bb22 = find(authorities, "authority_id", "bb22");
    assert_eq!(
        (bb22["agents"].as_u64(), bb22["svids"].as_u64()),
        (Some(1), Some(1)),
        "{holders}"
    );

    // One authority: the agents holding its SVIDs; a key ID pasted as openssl prints it works.
    for spelled in ["aa11", "AA:11"] {
        let holders = seeded.report_json(&["holders", "--authority", spelled]);
        assert_eq!(holders["authority_id"], "aa11");
        let agents = &holders["agents"];
        let mut ids = field_values(agents, "agent_id");
        ids.sort();
        assert_eq!(
            ids,
            [
                "spiffe://example.org/spire/agent/join_token/a1",
                "spiffe://example.org/spire/agent/join_token/a2"
            ],
            "{holders}"
        );
        let a1 = find(
            agents,
            "agent_id",
            "spiffe://example.org/spire/agent/join_token/a1",
        );
        assert_eq!(a1["svids"], 2);
        assert_eq!(a1["latest_not_after"], seeded.ahead(DAY));
    }
    // The agent whose bb22 SVID has expired holds nothing of it any more.
    let holders = seeded.report_json(&["holders", "--authority", "bb22"]);
    assert_eq!(
        field_values(&holders["agents"], "agent_id"),
        ["spiffe://example.org/spire/agent/join_token/a2"],
        "{holders}"
    );
    // An authority with only expired SVIDs has no holders.
    let holders = seeded.report_json(&["holders", "--authority", "cc33"]);
    assert_eq!(
        holders["agents"].as_array().map(Vec::len),
        Some(0),
        "{holders}"
    );
}
