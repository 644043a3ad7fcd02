//! go-spiffe v2, the Go SPIFFE library, as workloads of a real agent, through the client
//! program in `tests/interop/go-spiffe` (built once per machine by
//! [`lanyard_e2e::toolchain::go_spiffe_client`]):
//!
//! - `fetch`: `workloadapi.FetchX509SVID`, `FetchX509Bundles`, `FetchJWTSVID`,
//!   `ValidateJWTSVID` and offline validation, checked against the server;
//! - `watch`: `workloadapi.WatchX509Context` sees every rotation of a short-lived SVID before
//!   the old one expires;
//! - `serve` and `dial`: `spiffetls` mTLS between two `X509Source`s, each authorizing the other
//!   by exact SPIFFE ID, handshaking across rotations, and refusing the wrong peer.
//!
//! Without Go the tests fail and say how to install it, unless `LANYARD_E2E_SKIP_GO=1`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::x509::verify_svid_chain;
use lanyard_e2e::toolchain::{SKIP_GO_VAR, go_spiffe_client};
use lanyard_e2e::{
    ChildProcess, Cluster, TIMEOUT, assert_client_jwt, assert_client_x509, current_uid,
    pem_certificates, poll, spiffe_id, trust_domain,
};
use serde_json::Value;

const AUDIENCE: &str = "e2e-go";

/// The agent renews at half of an SVID's validity, which starts 10 s before issuance (the
/// server backdates `NotBefore`): a 12 s SVID is renewed within a sync interval or two of its
/// issuance, so both watching and handshaking see several rotations.
const SHORT_TTL: &str = "12s";
const ROTATIONS: usize = 2;
const HANDSHAKES: usize = 24;
const INTERVAL: &str = "500ms";

#[test]
fn go_spiffe_fetches_svids_and_validates_a_jwt() {
    let Some(client) = client() else { return };
    let cluster = Cluster::start();
    let id = cluster.register_uid("/e2e/go", current_uid(), &[]);
    cluster.agent.wait_for_svids(None, &[&id]);

    let seen = run_to_completion(&cluster, client, "go-fetch", &["fetch", AUDIENCE]);
    let [seen] = seen.as_slice() else {
        panic!("expected one JSON object, got {seen:?}")
    };

    // X.509: our identity, a chain that verifies against the server's authorities, and
    // exactly those authorities as the trust domain's bundle.
    assert_client_x509(&cluster.server, seen, &id, "go-spiffe");

    // JWT: minted for us and the audience, valid through the agent, offline in Go and against
    // the server's own bundle, and refused by the agent for another audience.
    assert_client_jwt(&cluster.server, seen, &id, AUDIENCE, "go-spiffe");
    let refusal = seen["wrong_audience_error"].as_str().unwrap_or_default();
    assert!(
        refusal.contains("InvalidArgument"),
        "ValidateJWTSVID for another audience should fail with InvalidArgument: {seen}"
    );
}

#[test]
fn go_spiffe_watcher_gets_each_rotation_before_the_old_svid_expires() {
    let Some(client) = client() else { return };
    let cluster = Cluster::start();
    let id = cluster.register_uid(
        "/e2e/go-watch",
        current_uid(),
        &["--x509-svid-ttl", SHORT_TTL],
    );
    cluster.agent.wait_for_svids(None, &[&id]);
    let mut server_authorities = cluster.server.bundle_der();
    server_authorities.sort();

    let updates = run_to_completion(
        &cluster,
        client,
        "go-watch",
        &["watch", &ROTATIONS.to_string()],
    );

    // Every update is our identity, unexpired on arrival, chaining to the server's
    // authorities, with exactly those as the bundle.
    let mut svids: Vec<(String, SystemTime, SystemTime)> = Vec::new();
    for update in &updates {
        assert_eq!(update["spiffe_id"], id.as_str(), "{update}");
        let received = unix_ms(&update["received_unix_ms"]);
        let not_after = unix_ms(&update["not_after_unix_ms"]);
        assert!(
            received < not_after,
            "go-spiffe received an expired SVID: {update}"
        );
        let chain = pem_certificates(update["chain_pem"].as_str().unwrap_or_default());
        verify_svid_chain(&chain, &trust_domain(), &server_authorities, received)
            .unwrap_or_else(|e| panic!("an SVID go-spiffe watched does not verify: {e}"));
        let mut bundle = pem_certificates(update["bundle_pem"].as_str().unwrap_or_default());
        bundle.sort();
        assert_eq!(bundle, server_authorities, "the bundle with {update}");
        let serial = update["serial"].as_str().unwrap_or_default().to_owned();
        if svids.last().is_none_or(|(last, _, _)| *last != serial) {
            svids.push((serial, received, not_after));
        }
    }

    // Each new SVID (a new serial) arrived before its predecessor expired.
    assert_eq!(
        svids.len(),
        ROTATIONS + 1,
        "distinct SVIDs in {updates:#?}\n{}",
        cluster.logs()
    );
    let serials: BTreeSet<&str> = svids.iter().map(|(serial, _, _)| serial.as_str()).collect();
    assert_eq!(serials.len(), svids.len(), "a serial came back: {svids:?}");
    for pair in svids.windows(2) {
        let ((_, _, old_not_after), (serial, received, _)) = (&pair[0], &pair[1]);
        assert!(
            received < old_not_after,
            "SVID {serial} arrived after its predecessor expired"
        );
    }
}

#[test]
fn go_spiffe_mtls_keeps_handshaking_across_rotations_and_refuses_the_wrong_server() {
    let Some(client) = client() else { return };
    let cluster = Cluster::start();
    let uid = current_uid();
    // One uid, two identities: the hint tells each side which SVID its X509Source presents.
    let server_id = cluster.register_uid(
        "/go/server",
        uid,
        &["--hint", "server", "--x509-svid-ttl", SHORT_TTL],
    );
    let client_id = cluster.register_uid(
        "/go/client",
        uid,
        &["--hint", "client", "--x509-svid-ttl", SHORT_TTL],
    );
    cluster
        .agent
        .wait_for_svids(None, &[&server_id, &client_id]);

    let mut server = ChildProcess::new("go-spiffe server", cluster.dir().join("go-serve.log"));
    server.start(go_command(
        &cluster,
        client,
        &["serve", "server", &client_id],
    ));
    let address = poll("the go-spiffe server to listen", TIMEOUT, || {
        server.assert_running();
        json_lines(&server.log())
            .iter()
            .find_map(|line| line["listening"].as_str().map(str::to_owned))
            .ok_or_else(|| "no `listening` line yet".to_owned())
    });

    let exchanges = run_to_completion(
        &cluster,
        client,
        "go-dial",
        &[
            "dial",
            "client",
            &server_id,
            &address,
            &HANDSHAKES.to_string(),
            INTERVAL,
        ],
    );

    // Every exchange succeeded with the right peers on both sides, and both SVIDs rotated
    // during the run.
    assert_eq!(exchanges.len(), HANDSHAKES, "{exchanges:#?}");
    let mut server_serials = BTreeSet::new();
    let mut client_serials = BTreeSet::new();
    for exchange in &exchanges {
        assert_eq!(exchange["server_id"], server_id.as_str(), "{exchange}");
        assert_eq!(exchange["seen_client_id"], client_id.as_str(), "{exchange}");
        server_serials.insert(exchange["server_serial"].to_string());
        client_serials.insert(exchange["seen_client_serial"].to_string());
    }
    assert!(
        server_serials.len() >= 2,
        "the server's SVID never rotated during the run: {server_serials:?}\n{}",
        cluster.logs()
    );
    assert!(
        client_serials.len() >= 2,
        "the client's SVID never rotated during the run: {client_serials:?}\n{}",
        cluster.logs()
    );
    let accepted = json_lines(&server.log())
        .iter()
        .filter(|line| line["accepted"] == client_id.as_str())
        .count();
    assert_eq!(accepted, HANDSHAKES, "{}", server.log());

    // The dialer refuses a server that is not the one it expects.
    let other = spiffe_id("/go/other");
    let refused = run_to_failure(
        &cluster,
        client,
        "go-dial-wrong-server",
        &["dial", "client", &other, &address, "1", INTERVAL],
    );
    assert!(
        refused.contains(&format!("unexpected ID \"{server_id}\"")),
        "the dialer should refuse {server_id} when it expects {other}:\n{refused}"
    );

    // The listener refuses a client with another identity (here: the server's own).
    run_to_failure(
        &cluster,
        client,
        "go-dial-as-server",
        &["dial", "server", &server_id, &address, "1", INTERVAL],
    );
    poll("the server to log the refusal", TIMEOUT, || {
        let log = server.log();
        let refusals = json_lines(&log);
        refusals
            .iter()
            .find(|line| {
                line["refused"]
                    .as_str()
                    .is_some_and(|why| why.contains(&format!("unexpected ID \"{server_id}\"")))
            })
            .map(|_| ())
            .ok_or(log)
    });
    server.assert_running();
}

/// The go-spiffe client, built if needed; `None` when `LANYARD_E2E_SKIP_GO=1`.
pub(crate) fn client() -> Option<&'static Path> {
    if std::env::var_os(SKIP_GO_VAR).is_some_and(|value| value == "1") {
        skip_notice();
        return None;
    }
    Some(go_spiffe_client())
}

#[allow(clippy::print_stderr)]
fn skip_notice() {
    eprintln!("lanyard-e2e: {SKIP_GO_VAR}=1, skipping the go-spiffe test");
}

/// The client with `args`, as a workload of the cluster's agent.
pub(crate) fn go_command(cluster: &Cluster, client: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(client);
    command
        .args(args)
        .env("SPIFFE_ENDPOINT_SOCKET", cluster.agent.endpoint())
        .env_remove("GODEBUG");
    command
}

/// Runs the client to completion (bounded; its output goes to `<name>.log` in the cluster's
/// directory, shown on failure) and returns the JSON lines it printed; panics unless it
/// succeeded.
fn run_to_completion(cluster: &Cluster, client: &Path, name: &str, args: &[&str]) -> Vec<Value> {
    let mut process = ChildProcess::new(name, cluster.dir().join(format!("{name}.log")));
    process.start(go_command(cluster, client, args));
    let status = process.wait_for_exit(Duration::from_secs(150));
    assert!(
        status.success(),
        "go-spiffe {args:?} exited with {status}\n{}\n{}",
        process.log_tail(40),
        cluster.logs()
    );
    json_lines(&process.log())
}

/// Runs the client to completion (bounded), expecting it to fail; returns its log.
fn run_to_failure(cluster: &Cluster, client: &Path, name: &str, args: &[&str]) -> String {
    let mut process = ChildProcess::new(name, cluster.dir().join(format!("{name}.log")));
    process.start(go_command(cluster, client, args));
    let status = process.wait_for_exit(TIMEOUT);
    let log = process.log();
    assert!(
        !status.success(),
        "go-spiffe {args:?} should have failed:\n{log}"
    );
    log
}

/// The lines of `log` that are JSON objects: what the client printed on stdout.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn unix_ms(value: &Value) -> SystemTime {
    let ms = value
        .as_u64()
        .unwrap_or_else(|| panic!("not a Unix time in ms: {value}"));
    UNIX_EPOCH + Duration::from_millis(ms)
}
