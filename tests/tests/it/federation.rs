//! The bundle endpoint of a real server process (`[federation.bundle_endpoint]`):
//!
//! - fetched by go-spiffe's `federation.FetchBundle` (the client SPIRE servers federate with,
//!   through `tests/interop/go-spiffe`) with both profiles: `https_spiffe`, authenticating the
//!   server's SVID as `spiffe://example.org/spire/server` against the trust domain's bundle
//!   (and refusing another endpoint ID), and `https_web`;
//! - with `https_web`: served with a certificate chain from files that a test CA issued, the
//!   chain switched by replacing the files (no restart), a broken replacement logged and the
//!   old pair kept, and a key file others can read refused at start.
//!
//! - federated both ways with a real `spire-server` over `https_spiffe` (the Lanyard side from
//!   its configuration file, SPIRE's with `spire-server federation create`): workloads of
//!   each trust domain, served by the Lanyard agent and by `spire-agent`, get the other's
//!   X.509 authorities and JWT keys, complete mTLS with go-spiffe authorizing each other's
//!   SPIFFE IDs and validate each other's JWT-SVIDs; a CA prepared on either side reaches the
//!   other side's workloads without any refresh command (the time it took is printed); the
//!   peer's endpoint down for several refresh periods leaves the last bundle in place, logged
//!   once, and fetching resumes by itself when it is back.
//! - federated both ways with a real `spire-server` over `https_web`, both endpoints serving a
//!   test CA's `localhost` certificate from files and each side trusting that CA (Lanyard's
//!   `https_web_extra_ca_certificates_path`, SPIRE's `SSL_CERT_FILE`), no bundle handed over:
//!   each server stores exactly the other's X.509 authorities; an `https_web` endpoint whose
//!   certificate no trusted CA issued (SPIRE's server API, with its SVID) is refused, the
//!   reason logged, and nothing stored.
//!
//! Without Go the go-spiffe checks fail and say how to install it, unless
//! `LANYARD_E2E_SKIP_GO=1` (which skips only them).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lanyard_e2e::https::{TestCa, first_der, https_get, replace_file, write_key_pair};
use lanyard_e2e::spire::{SpireAgent, SpireAttestation, SpireServer, spire_or_skip};
use lanyard_e2e::toolchain::{SKIP_GO_VAR, go_spiffe_client};
use lanyard_e2e::{
    Agent, ChildProcess, CliOutput, Server, TIMEOUT, TestDir, block_on, current_uid, free_port,
    pem_certificates, poll, spiffe_id, toml_string, trust_domain, uid_selector, within,
};
use serde_json::Value;

/// go-spiffe's `federation.FetchBundle` of `url` with `profile`, `auth_file` (the trust
/// domain's bundle, or the Web PKI roots) and `endpoint_id`; `None` when Go tests are skipped.
fn go_spiffe_fetch(
    url: &str,
    profile: &str,
    auth_file: &Path,
    endpoint_id: &str,
) -> Option<CliOutput> {
    if std::env::var_os(SKIP_GO_VAR).is_some_and(|value| value == "1") {
        return None;
    }
    Some(CliOutput::run(
        std::process::Command::new(go_spiffe_client())
            .args(["federation", lanyard_e2e::TRUST_DOMAIN, url, profile])
            .arg(auth_file)
            .arg(endpoint_id),
    ))
}

/// Checks what go-spiffe fetched against the server's own bundle.
fn assert_go_spiffe_got(server: &Server, fetched: &CliOutput, refresh_hint_seconds: u64) {
    let seen: Value = fetched.json();
    let stored = server.spiffe_bundle();
    assert_eq!(seen["sequence"], stored.sequence_number(), "{fetched}");
    assert_eq!(
        seen["refresh_hint_seconds"], refresh_hint_seconds,
        "{fetched}"
    );
    let mut authorities = pem_certificates(seen["x509_authorities_pem"].as_str().unwrap());
    let mut expected = server.bundle_der();
    authorities.sort();
    expected.sort();
    assert_eq!(authorities, expected, "{fetched}");
    let mut kids: Vec<&str> = seen["jwt_key_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kid| kid.as_str().unwrap())
        .collect();
    kids.sort_unstable();
    let mut expected: Vec<&str> = stored
        .jwt_authorities()
        .iter()
        .map(|a| a.key_id())
        .collect();
    expected.sort_unstable();
    assert_eq!(kids, expected, "{fetched}");
}

#[test]
fn go_spiffe_fetches_the_bundle_from_an_https_spiffe_bundle_endpoint() {
    let dir = TestDir::new();
    let port = free_port();
    let server = Server::start_with(
        &dir.join("server"),
        &format!("[federation.bundle_endpoint]\naddress = \"127.0.0.1:{port}\"\n"),
    );
    // What a peer is given once, out of band: the trust domain's bundle.
    let known = dir.join("example.org.json");
    let bundle = server.cli(["bundle", "show", "--format", "spiffe"]);
    std::fs::write(&known, bundle.expect_success()).unwrap();
    let url = format!("https://127.0.0.1:{port}/");
    let server_id = spiffe_id("/spire/server");
    let Some(fetched) = go_spiffe_fetch(&url, "https_spiffe", &known, &server_id) else {
        return;
    };
    assert_go_spiffe_got(&server, &fetched, 300);
    // Another endpoint ID is refused: the client checks the SVID's ID, not just its chain.
    let refused = go_spiffe_fetch(&url, "https_spiffe", &known, &spiffe_id("/elsewhere"))
        .expect("not skipped");
    assert!(!refused.success(), "{refused}");
}

fn endpoint_toml(port: u16, cert: &Path, key: &Path) -> String {
    format!(
        "[federation.bundle_endpoint]\n\
         address = \"127.0.0.1:{port}\"\n\
         profile = \"https_web\"\n\
         refresh_hint = \"1m\"\n\
         certificate_path = {}\n\
         private_key_path = {}\n",
        toml_string(cert.to_str().unwrap()),
        toml_string(key.to_str().unwrap()),
    )
}

/// The leaf the endpoint presents now.
fn presented_leaf(addr: SocketAddr, ca: &TestCa) -> Result<Vec<u8>, String> {
    let answer = https_get(addr, ca.client_config(), "localhost", "/")?;
    answer
        .chain
        .first()
        .cloned()
        .ok_or_else(|| "no certificate presented".to_owned())
}

#[test]
fn https_web_bundle_endpoint_serves_the_configured_chain_and_follows_replaced_files() {
    let dir = TestDir::new();
    let ca = TestCa::new("bundle endpoint");
    let tls_dir = dir.subdir("tls");
    let (first_cert, first_key) = ca.issue("first");
    let (cert_path, key_path) = write_key_pair(&tls_dir, "endpoint", &first_cert, &first_key);
    let port = free_port();
    let mut server = Server::start_with(
        &dir.join("server"),
        &endpoint_toml(port, &cert_path, &key_path),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    // A Web PKI client: the test CA, the name `localhost`.
    let answer = https_get(addr, ca.client_config(), "localhost", "/").unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.content_type, "application/json");
    assert_eq!(answer.chain.first(), Some(&first_der(&first_cert)));
    let served = lanyard_core::TrustBundle::from_jwks_json(trust_domain(), &answer.body)
        .unwrap_or_else(|e| panic!("not a SPIFFE bundle ({e}): {answer:?}"));
    let stored = server.spiffe_bundle();
    assert_eq!(served.x509_authorities(), stored.x509_authorities());
    assert_eq!(served.sequence_number(), stored.sequence_number());
    assert_eq!(served.refresh_hint(), Some(Duration::from_secs(60)));
    let kids = |bundle: &lanyard_core::TrustBundle| -> Vec<String> {
        bundle
            .jwt_authorities()
            .iter()
            .map(|a| a.key_id().to_owned())
            .collect()
    };
    assert_eq!(kids(&served), kids(&stored));
    // So does go-spiffe, as a federated SPIRE server would with the https_web profile.
    let roots = tls_dir.join("roots.pem");
    std::fs::write(&roots, ca.pem()).unwrap();
    let url = format!("https://localhost:{port}/");
    if let Some(fetched) = go_spiffe_fetch(&url, "https_web", &roots, "-") {
        assert_go_spiffe_got(&server, &fetched, 60);
    }

    // A renewal replaces both files: the next handshakes present the new chain.
    let (second_cert, second_key) = ca.issue("second");
    write_key_pair(&tls_dir, "endpoint", &second_cert, &second_key);
    let second = first_der(&second_cert);
    poll(
        "the endpoint to present the replaced certificate",
        TIMEOUT,
        || {
            server.process().assert_running();
            let leaf = presented_leaf(addr, &ca)?;
            if leaf == second {
                Ok(())
            } else {
                Err("still the first certificate".to_owned())
            }
        },
    );

    // A broken replacement is logged, and the pair in use stays.
    replace_file(&cert_path, b"not a certificate\n", 0o644);
    poll("the server to log the refused certificate", TIMEOUT, || {
        let log = server.process().log();
        if log.contains("the changed certificate or key was refused") {
            Ok(())
        } else {
            Err(server.log_tail())
        }
    });
    assert_eq!(presented_leaf(addr, &ca).unwrap(), second);
    // So is a certificate that the key in place does not match.
    let (third_cert, _) = ca.issue("third");
    replace_file(&cert_path, third_cert.as_bytes(), 0o644);
    poll("the server to refuse the mismatched pair", TIMEOUT, || {
        let log = server.process().log();
        if log.contains("not the key of the first certificate") {
            Ok(())
        } else {
            Err(server.log_tail())
        }
    });
    assert_eq!(presented_leaf(addr, &ca).unwrap(), second);
    server.stop();
}

#[test]
fn https_web_bundle_endpoint_refuses_a_key_file_others_can_read() {
    let dir = TestDir::new();
    let ca = TestCa::new("bundle endpoint");
    let tls_dir = dir.subdir("tls");
    let (cert, key) = ca.issue("exposed");
    let (cert_path, key_path) = write_key_pair(&tls_dir, "endpoint", &cert, &key);
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let mut server = Server::configure(
        &dir.join("server"),
        &endpoint_toml(free_port(), &cert_path, &key_path),
    );
    server.launch();
    let status = server.process().wait_for_exit(TIMEOUT);
    assert!(!status.success());
    let log = server.process().log();
    assert!(
        log.contains("readable by others") && log.contains(key_path.to_str().unwrap()),
        "{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// Lanyard (a.org) and SPIRE (b.org) federated both ways

/// How long a bundle may take to cross from one trust domain to the other's workloads: a
/// quarter of the peers' one-minute hint, the agents' sync, and slack for a loaded machine.
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(90);

/// A TCP relay in front of an endpoint that the test can take down (connections refused)
/// and bring back on the same port.
struct Relay {
    port: u16,
    upstream: SocketAddr,
    up: Arc<AtomicBool>,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Self {
        let relay = Self {
            port: free_port(),
            upstream,
            up: Arc::new(AtomicBool::new(false)),
        };
        relay.bring_up();
        relay
    }

    fn bring_up(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("the relay's port");
        listener.set_nonblocking(true).unwrap();
        self.up.store(true, Ordering::SeqCst);
        let up = Arc::clone(&self.up);
        let upstream = self.upstream;
        std::thread::spawn(move || {
            while up.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Write);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            // The listener closes here: connections are refused until it is up again.
        });
    }

    fn take_down(&self) {
        self.up.store(false, Ordering::SeqCst);
        // Wait until the accept loop has let go of the port.
        poll("the relay to close", TIMEOUT, || {
            match TcpStream::connect(("127.0.0.1", self.port)) {
                Err(_) => Ok(()),
                Ok(_) => Err("still accepting".to_owned()),
            }
        });
    }
}

/// What a workload sees through the Workload API, per trust domain: X.509 authorities (DER,
/// sorted) from `FetchX509Bundles` and from the X.509 context of `FetchX509SVID`, and JWT key
/// IDs (sorted) from `FetchJWTBundles`.
#[derive(Debug, Default, PartialEq)]
struct Seen {
    x509_bundles: BTreeMap<String, Vec<Vec<u8>>>,
    svid_bundles: BTreeMap<String, Vec<Vec<u8>>>,
    jwt_keys: BTreeMap<String, Vec<String>>,
}

fn seen_by(endpoint: &str) -> Result<Seen, String> {
    block_on(async {
        let client = within(
            "connecting",
            spiffe::WorkloadApiClient::connect_to(endpoint),
        )
        .await
        .map_err(|e| e.to_string())?;
        let sorted = |authorities: &[spiffe::cert::Certificate]| {
            let mut der: Vec<Vec<u8>> = authorities.iter().map(|c| c.as_bytes().to_vec()).collect();
            der.sort();
            der
        };
        let mut seen = Seen::default();
        let bundles = within("FetchX509Bundles", client.fetch_x509_bundles())
            .await
            .map_err(|e| e.to_string())?;
        for (trust_domain, bundle) in bundles.iter() {
            seen.x509_bundles
                .insert(trust_domain.to_string(), sorted(bundle.authorities()));
        }
        let context = within("FetchX509SVID", client.fetch_x509_context())
            .await
            .map_err(|e| e.to_string())?;
        for (trust_domain, bundle) in context.bundle_set().iter() {
            seen.svid_bundles
                .insert(trust_domain.to_string(), sorted(bundle.authorities()));
        }
        let jwt = within("FetchJWTBundles", client.fetch_jwt_bundles())
            .await
            .map_err(|e| e.to_string())?;
        for (trust_domain, bundle) in jwt.iter() {
            let mut kids: Vec<String> = bundle
                .jwt_authorities()
                .map(|a| a.key_id().to_owned())
                .collect();
            kids.sort();
            seen.jwt_keys.insert(trust_domain.to_string(), kids);
        }
        Ok(seen)
    })
}

/// A JWT-SVID for `audience` from the workload endpoint.
fn jwt_svid(endpoint: &str, audience: &str) -> String {
    block_on(async {
        let client = within(
            "connecting",
            spiffe::WorkloadApiClient::connect_to(endpoint),
        )
        .await
        .expect("connects");
        within("FetchJWTSVID", client.fetch_jwt_svid([audience], None))
            .await
            .expect("a JWT-SVID")
            .token()
            .to_owned()
    })
}

/// `ValidateJWTSVID` of `token` for `audience` at the workload endpoint: the SPIFFE ID.
fn validate_jwt(endpoint: &str, audience: &str, token: &str) -> Result<String, String> {
    block_on(async {
        let client = within(
            "connecting",
            spiffe::WorkloadApiClient::connect_to(endpoint),
        )
        .await
        .map_err(|e| e.to_string())?;
        within(
            "ValidateJWTSVID",
            client.validate_jwt_token(audience, token),
        )
        .await
        .map(|svid| svid.spiffe_id().to_string())
        .map_err(|e| e.to_string())
    })
}

/// The X.509 authorities a server's CLI shows (SPIRE's or Lanyard's: the same command).
fn authorities_of(socket: &Path) -> Vec<Vec<u8>> {
    let shown = lanyard_e2e::spire::spire_server_cli(socket, &["bundle", "show"], &[]);
    let mut der = pem_certificates(shown.expect_success());
    der.sort();
    der
}

/// Polls until the workload at `endpoint` sees exactly `authorities` for `trust_domain` in both
/// X.509 bundle views, and returns how long it took.
fn wait_for_authorities(
    endpoint: &str,
    trust_domain: &str,
    authorities: &[Vec<u8>],
    what: &str,
) -> Duration {
    let started = Instant::now();
    poll(what, PROPAGATION_TIMEOUT, || {
        let seen = seen_by(endpoint)?;
        let wanted = Some(authorities.to_vec());
        if seen.x509_bundles.get(trust_domain).cloned() == wanted
            && seen.svid_bundles.get(trust_domain).cloned() == wanted
        {
            Ok(())
        } else {
            Err(format!(
                "{trust_domain}: {} authorities in FetchX509Bundles, {} in the X.509 context, {} wanted",
                seen.x509_bundles.get(trust_domain).map_or(0, Vec::len),
                seen.svid_bundles.get(trust_domain).map_or(0, Vec::len),
                authorities.len()
            ))
        }
    });
    started.elapsed()
}

/// go-spiffe `serve` at one endpoint, `dial` from the other: one mTLS exchange, each side
/// authorizing the other's SPIFFE ID; returns the dialer's line.
fn mtls(
    client: &Path,
    dir: &Path,
    name: &str,
    (server_endpoint, server_id): (&str, &str),
    (client_endpoint, client_id): (&str, &str),
) -> Value {
    let mut server = ChildProcess::new(
        format!("{name} serve"),
        dir.join(format!("{name}-serve.log")),
    );
    let mut command = std::process::Command::new(client);
    command
        .args(["serve", "", client_id])
        .env("SPIFFE_ENDPOINT_SOCKET", server_endpoint)
        .env_remove("GODEBUG");
    server.start(command);
    let address = poll("the go-spiffe server to listen", TIMEOUT, || {
        server.assert_running();
        server
            .log()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find_map(|line| line["listening"].as_str().map(str::to_owned))
            .ok_or_else(|| "no `listening` line yet".to_owned())
    });
    let dialed = CliOutput::run(
        std::process::Command::new(client)
            .args(["dial", "", server_id, &address, "1", "0s"])
            .env("SPIFFE_ENDPOINT_SOCKET", client_endpoint)
            .env_remove("GODEBUG"),
    );
    assert!(
        dialed.success(),
        "{name}: {dialed}\n{}",
        server.log_tail(20)
    );
    let line: Value = dialed.json();
    assert_eq!(line["server_id"], server_id, "{dialed}");
    assert_eq!(line["seen_client_id"], client_id, "{dialed}");
    server.kill();
    line
}

#[test]
fn lanyard_and_spire_federate_both_ways_over_https_spiffe() {
    let test = "lanyard_and_spire_federate_both_ways_over_https_spiffe";
    if spire_or_skip(test).is_none() {
        return;
    }
    let Some(go) = std::env::var_os(SKIP_GO_VAR)
        .is_none_or(|value| value != "1")
        .then(go_spiffe_client)
    else {
        return;
    };
    let dir = TestDir::new();
    let uid = current_uid();

    // b.org: spire-server with its bundle endpoint, serving a one-minute refresh hint.
    let spire_endpoint: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let spire = SpireServer::start_in_trust_domain(
        &dir.join("spire-server"),
        "b.org",
        &format!(
            "federation {{\n\
             \x20       bundle_endpoint {{\n\
             \x20           address = \"127.0.0.1\"\n\
             \x20           port = {}\n\
             \x20           refresh_hint = \"1m\"\n\
             \x20           profile \"https_spiffe\" {{}}\n\
             \x20       }}\n\
             \x20   }}",
            spire_endpoint.port()
        ),
    );
    // Bootstrap as operators do: each side's bundle handed to the other once.
    let b_bundle = dir.join("b.org.json");
    std::fs::write(
        &b_bundle,
        spire.cli_ok(&["bundle", "show"], &["-format", "spiffe"]),
    )
    .unwrap();
    let relay = Relay::start(spire_endpoint);

    // a.org: the Lanyard server, its bundle endpoint, and b.org from its configuration file.
    let lanyard_endpoint_port = free_port();
    let mut server = Server::start_in_trust_domain(
        &dir.join("lanyard-server"),
        "a.org",
        &format!(
            "[federation.bundle_endpoint]\n\
             address = \"127.0.0.1:{lanyard_endpoint_port}\"\n\
             refresh_hint = \"1m\"\n\
             [federation.trust_domains.\"b.org\"]\n\
             bundle_endpoint_url = \"https://127.0.0.1:{}\"\n\
             bundle_endpoint_profile = \"https_spiffe\"\n\
             endpoint_spiffe_id = \"spiffe://b.org/spire/server\"\n\
             trust_domain_bundle_path = {}\n\
             trust_domain_bundle_format = \"spiffe\"\n",
            relay.port,
            toml_string(b_bundle.to_str().unwrap()),
        ),
    );
    let a_bundle = dir.join("a.org.json");
    std::fs::write(
        &a_bundle,
        server
            .cli(["bundle", "show", "--format", "spiffe"])
            .expect_success(),
    )
    .unwrap();
    spire.cli_ok(
        &["federation", "create"],
        &[
            "-trustDomain",
            "a.org",
            "-bundleEndpointURL",
            &format!("https://127.0.0.1:{lanyard_endpoint_port}"),
            "-bundleEndpointProfile",
            "https_spiffe",
            "-endpointSpiffeID",
            "spiffe://a.org/spire/server",
            "-trustDomainBundlePath",
            a_bundle.to_str().unwrap(),
            "-trustDomainBundleFormat",
            "spiffe",
        ],
    );
    // The Lanyard server shows its configured relationship like any other.
    let shown = server.cli(["federation", "list"]);
    assert!(shown.expect_success().contains("b.org"), "{shown}");

    // A workload in each trust domain, federating with the other.
    let token = server.generate_token();
    let lanyard_agent = Agent::start(&dir.join("lanyard-agent"), &server, &token);
    let a_workload = "spiffe://a.org/workload";
    server.create_entry(
        a_workload,
        &format!("spiffe://a.org/spire/agent/join_token/{token}"),
        &[&uid_selector(uid)],
        &["--federates-with", "b.org"],
    );
    let spire_token = spire.generate_token();
    let spire_agent = SpireAgent::start_in_trust_domain(
        &dir.join("spire-agent"),
        "b.org",
        &spire.address(),
        &spire.bundle_pem(),
        SpireAttestation::JoinToken(&spire_token),
        None,
    );
    let b_workload = "spiffe://b.org/workload";
    spire.cli_ok(
        &["entry", "create"],
        &[
            "-spiffeID",
            b_workload,
            "-parentID",
            &format!("spiffe://b.org/spire/agent/join_token/{spire_token}"),
            "-selector",
            &uid_selector(uid),
            "-federatesWith",
            "spiffe://a.org",
        ],
    );
    let a_endpoint = lanyard_agent.endpoint();
    let b_endpoint = format!("unix://{}", spire_agent.socket_path().display());

    // Each side's workload holds the other's X.509 authorities and JWT keys.
    wait_for_authorities(
        &a_endpoint,
        "b.org",
        &authorities_of(spire.socket_path()),
        "a.org's workload to hold b.org's authorities",
    );
    wait_for_authorities(
        &b_endpoint,
        "a.org",
        &authorities_of(server.admin_socket()),
        "b.org's workload to hold a.org's authorities",
    );
    let a_seen = seen_by(&a_endpoint).unwrap();
    let b_seen = seen_by(&b_endpoint).unwrap();
    let b_keys: Vec<String> = {
        let mut kids: Vec<String> = spire.cli_json(&["bundle", "show"], &[])["jwt_authorities"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| k["key_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        kids.sort();
        kids
    };
    if !b_keys.is_empty() {
        assert_eq!(a_seen.jwt_keys.get("b.org"), Some(&b_keys), "{a_seen:?}");
    }
    assert!(
        a_seen.jwt_keys.get("b.org").is_some_and(|k| !k.is_empty()),
        "{a_seen:?}"
    );
    let mut a_keys: Vec<String> = server
        .spiffe_bundle()
        .jwt_authorities()
        .iter()
        .map(|a| a.key_id().to_owned())
        .collect();
    a_keys.sort();
    assert_eq!(b_seen.jwt_keys.get("a.org"), Some(&a_keys), "{b_seen:?}");

    // mTLS both ways, each side authorizing the other's SPIFFE ID.
    mtls(
        go,
        dir.path(),
        "a-serves-b",
        (&a_endpoint, a_workload),
        (&b_endpoint, b_workload),
    );
    mtls(
        go,
        dir.path(),
        "b-serves-a",
        (&b_endpoint, b_workload),
        (&a_endpoint, a_workload),
    );

    // Each agent validates the other trust domain's JWT-SVIDs.
    let a_token = jwt_svid(&a_endpoint, "b-service");
    assert_eq!(
        validate_jwt(&b_endpoint, "b-service", &a_token),
        Ok(a_workload.to_owned())
    );
    let b_token = jwt_svid(&b_endpoint, "a-service");
    assert_eq!(
        validate_jwt(&a_endpoint, "a-service", &b_token),
        Ok(b_workload.to_owned())
    );
    assert!(validate_jwt(&a_endpoint, "someone-else", &b_token).is_err());

    // A CA prepared on either side reaches the other side's workloads by itself.
    let prepare = |socket: &Path| {
        let prepared = lanyard_e2e::spire::spire_server_cli(
            socket,
            &["localauthority", "x509", "prepare"],
            &["-output", "json"],
        );
        prepared.json()["prepared_authority"]["authority_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no prepared authority: {prepared}"))
            .to_owned()
    };
    let b_prepared = prepare(spire.socket_path());
    let b_grown = authorities_of(spire.socket_path());
    assert_eq!(b_grown.len(), 2);
    let b_to_a = wait_for_authorities(
        &a_endpoint,
        "b.org",
        &b_grown,
        "b.org's prepared CA to reach a.org's workload",
    );
    let a_prepared = prepare(server.admin_socket());
    let a_grown = authorities_of(server.admin_socket());
    assert_eq!(a_grown.len(), 2);
    let a_to_b = wait_for_authorities(
        &b_endpoint,
        "a.org",
        &a_grown,
        "a.org's prepared CA to reach b.org's workload",
    );
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "federation: a CA prepared on SPIRE (b.org) was at the Lanyard agent's workload (a.org) after {:.1} s; \
             one prepared on Lanyard (a.org) was at spire-agent's workload (b.org) after {:.1} s",
            b_to_a.as_secs_f64(),
            a_to_b.as_secs_f64()
        );
    }
    // Activated, the new CAs sign new SVIDs that the other side already trusts.
    for (socket, id) in [
        (spire.socket_path(), &b_prepared),
        (server.admin_socket(), &a_prepared),
    ] {
        let activated = lanyard_e2e::spire::spire_server_cli(
            socket,
            &["localauthority", "x509", "activate"],
            &["-authorityID", id],
        );
        assert!(activated.success(), "{activated}");
    }

    // b.org's endpoint down for several refresh periods (15 s each): a.org keeps the bundle,
    // says why once, and fetches again by itself when the endpoint is back.
    relay.take_down();
    let down_since = Instant::now();
    while down_since.elapsed() < Duration::from_secs(50) {
        server.process().assert_running();
        std::thread::sleep(Duration::from_secs(5));
        let seen = seen_by(&a_endpoint).unwrap();
        assert_eq!(
            seen.x509_bundles.get("b.org"),
            Some(&b_grown),
            "the last bundle stays"
        );
    }
    let log = server.process().log();
    let refused = log.matches("reason=\"connection refused\"").count()
        + log.matches("\"reason\":\"connection refused\"").count();
    assert_eq!(refused, 1, "logged once while down:\n{}", server.log_tail());
    // SPIRE prepares once more while its endpoint is unreachable; after it is back, a.org's
    // workloads get it without anyone asking.
    let b_third = prepare(spire.socket_path());
    assert!(!b_third.is_empty());
    let b_latest = authorities_of(spire.socket_path());
    relay.bring_up();
    let resumed = wait_for_authorities(
        &a_endpoint,
        "b.org",
        &b_latest,
        "a.org to fetch again once b.org's endpoint is back",
    );
    assert!(
        server
            .process()
            .log()
            .contains("fetching the federated bundle works again"),
        "{}",
        server.log_tail()
    );
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "federation: fetching resumed {:.1} s after the endpoint came back",
            resumed.as_secs_f64()
        );
    }
    mtls(
        go,
        dir.path(),
        "after-rotation",
        (&a_endpoint, a_workload),
        (&b_endpoint, b_workload),
    );
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// Lanyard (a.org) and SPIRE (b.org) federated both ways over https_web

/// The X.509 authorities (DER, sorted) of the federated bundle of `trust_domain` stored by the
/// server at `socket` (SPIRE's or Lanyard's: the same command), or why there are none.
fn federated_authorities_of(socket: &Path, trust_domain: &str) -> Result<Vec<Vec<u8>>, String> {
    let listed = lanyard_e2e::spire::spire_server_cli(
        socket,
        &["bundle", "list"],
        &["-id", &format!("spiffe://{trust_domain}")],
    );
    if !listed.success() {
        return Err(listed.to_string());
    }
    let mut der = pem_certificates(&listed.stdout);
    der.sort();
    Ok(der)
}

/// Polls until the server at `socket` stores exactly `authorities` for `trust_domain`.
fn wait_for_federated(socket: &Path, trust_domain: &str, authorities: &[Vec<u8>], what: &str) {
    poll(what, PROPAGATION_TIMEOUT, || {
        let stored = federated_authorities_of(socket, trust_domain)?;
        if stored == authorities {
            Ok(())
        } else {
            Err(format!(
                "{} authorities stored for {trust_domain}, not the {} wanted",
                stored.len(),
                authorities.len()
            ))
        }
    });
}

#[test]
fn lanyard_and_spire_federate_both_ways_over_https_web() {
    let test = "lanyard_and_spire_federate_both_ways_over_https_web";
    if spire_or_skip(test).is_none() {
        return;
    }
    let dir = TestDir::new();
    // One test CA issues both endpoints' certificates (for `localhost`), and each side takes
    // it as a Web PKI root besides the system's.
    let ca = TestCa::new("federation");
    let tls_dir = dir.subdir("tls");
    let roots = tls_dir.join("roots.pem");
    std::fs::write(&roots, ca.pem()).unwrap();
    let (cert, key) = ca.issue("b.org bundle endpoint");
    let (spire_cert, spire_key) = write_key_pair(&tls_dir, "spire", &cert, &key);
    let (cert, key) = ca.issue("a.org bundle endpoint");
    let (lanyard_cert, lanyard_key) = write_key_pair(&tls_dir, "lanyard", &cert, &key);

    // b.org: spire-server, its bundle endpoint serving the files. SPIRE v1.13.3 refuses a
    // `serving_cert_file` without `file_sync_interval` (the documented default of 1h is never
    // applied). Its https_web client trusts Go's system roots, which SSL_CERT_FILE replaces.
    let spire_endpoint_port = free_port();
    let spire = SpireServer::start_in_trust_domain_with_env(
        &dir.join("spire-server"),
        "b.org",
        &format!(
            "federation {{\n\
             \x20       bundle_endpoint {{\n\
             \x20           address = \"127.0.0.1\"\n\
             \x20           port = {spire_endpoint_port}\n\
             \x20           refresh_hint = \"1m\"\n\
             \x20           profile \"https_web\" {{\n\
             \x20               serving_cert_file {{\n\
             \x20                   cert_file_path = {}\n\
             \x20                   key_file_path = {}\n\
             \x20                   file_sync_interval = \"1h\"\n\
             \x20               }}\n\
             \x20           }}\n\
             \x20       }}\n\
             \x20   }}",
            Value::from(spire_cert.to_str().unwrap()),
            Value::from(spire_key.to_str().unwrap()),
        ),
        &[("SSL_CERT_FILE", roots.as_os_str())],
    );
    // SPIRE's server API presents an X509-SVID of b.org's CA, which no Web PKI root issued:
    // an https_web endpoint there must be refused.
    let spire_api = spire.address();
    let (_, spire_api_port) = spire_api.rsplit_once(':').unwrap();

    // a.org: the Lanyard server, its bundle endpoint, b.org (and c.org, the refused one) from
    // its configuration file; no bundle is handed over beforehand.
    let lanyard_endpoint_port = free_port();
    let mut server = Server::start_in_trust_domain(
        &dir.join("lanyard-server"),
        "a.org",
        &format!(
            "[federation]\n\
             https_web_extra_ca_certificates_path = {}\n\
             {}\
             [federation.trust_domains.\"b.org\"]\n\
             bundle_endpoint_url = \"https://localhost:{spire_endpoint_port}\"\n\
             bundle_endpoint_profile = \"https_web\"\n\
             [federation.trust_domains.\"c.org\"]\n\
             bundle_endpoint_url = \"https://localhost:{spire_api_port}\"\n\
             bundle_endpoint_profile = \"https_web\"\n",
            toml_string(roots.to_str().unwrap()),
            endpoint_toml(lanyard_endpoint_port, &lanyard_cert, &lanyard_key),
        ),
    );
    spire.cli_ok(
        &["federation", "create"],
        &[
            "-trustDomain",
            "a.org",
            "-bundleEndpointURL",
            &format!("https://localhost:{lanyard_endpoint_port}"),
            "-bundleEndpointProfile",
            "https_web",
        ],
    );

    // Each server stores exactly the other's X.509 authorities.
    wait_for_federated(
        server.admin_socket(),
        "b.org",
        &authorities_of(spire.socket_path()),
        "the Lanyard server (a.org) to store b.org's bundle",
    );
    wait_for_federated(
        spire.socket_path(),
        "a.org",
        &authorities_of(server.admin_socket()),
        "spire-server (b.org) to store a.org's bundle",
    );

    // The endpoint whose certificate no trusted CA issued: refused, said why, nothing stored.
    let refused = poll(
        "the Lanyard server to refuse c.org's endpoint",
        PROPAGATION_TIMEOUT,
        || {
            server.process().assert_running();
            server
                .process()
                .log()
                .lines()
                .find(|line| {
                    line.contains("could not refresh the federated bundle")
                        && line.contains("c.org")
                })
                .map(str::to_owned)
                .ok_or_else(|| server.log_tail())
        },
    );
    assert!(refused.contains("TLS handshake"), "{refused}");
    assert!(
        refused.contains("no bundle of this trust domain is held yet"),
        "{refused}"
    );
    assert!(refused.contains("UnknownIssuer"), "{refused}");
    let stored = federated_authorities_of(server.admin_socket(), "c.org");
    assert!(stored.is_err(), "{stored:?}");
    server.stop();
}
