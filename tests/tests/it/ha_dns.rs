//! Several servers of one trust domain over one PostgreSQL, as agents find them in practice:
//! one DNS name for all of them, or a new server taking over a dead one's address.
//!
//! The name is `servers.lanyard.test`, known only to a private hosts file that the agent sees
//! as its `/etc/hosts` ([`PrivateHosts`]: its own mount namespace, which needs root): server A
//! listens on 127.0.0.2 and server B on 127.0.0.3, on one port. Lanyard's agent resolves the
//! name itself and tries each address in turn; SPIRE's agent dials `dns:///name:port` and
//! balances over what it resolves to. Either way, SIGKILL of A must leave the workloads with
//! valid SVIDs, renewed through B, and entries created through B must reach them. For
//! Lanyard's agent, A's address then goes on accepting TCP without ever answering, so that a
//! dead address that eats the others' time fails the test.
//!
//! The takeover needs no name: spire-agent attested through A, A dies, and B (which ran
//! beside A, so its authority is in spire-agent's bundle) starts on A's address; spire-agent
//! must renew its own SVID through B and serve B's SVIDs for B's entries.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use lanyard_e2e::spire::{SPIRE_TIMEOUT, SpireAgent, SpireAttestation, spire_or_skip};
use lanyard_e2e::{
    Agent, FetchedSvid, PrivateHosts, Server, TIMEOUT, TestDir, current_uid, free_port_on,
    pem_certificates, poll, spiffe_id, toml_string, uid_selector,
};

use crate::spire_agent::agent_serial;

/// The one name for both servers.
const SERVERS: &str = "servers.lanyard.test";

/// Where server A listens: the name's first address.
const HOST_A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// Where server B listens: the name's second address.
const HOST_B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));

/// The workload SVIDs' lifetime: short, so that they are renewed while the test watches.
const SHORT_TTL: [&str; 2] = ["--x509-svid-ttl", "20s"];

/// Longer than the workload SVIDs' lifetime, so that every SVID served at its end was renewed
/// after A died.
const AFTER_THE_DEATH: Duration = Duration::from_secs(25);

/// A fresh PostgreSQL database as the servers' `[datastore]` table.
fn shared_datastore() -> String {
    let url = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(crate::pg::fresh_database());
    format!(
        "kind = \"postgres\"\nconnection_string = {}\n",
        toml_string(&url)
    )
}

/// The private hosts file naming both servers, or `None` (after saying why) where this
/// machine does not allow one: not root, or no mount namespaces.
fn hosts_or_skip(dir: &TestDir, test: &str) -> Option<PrivateHosts> {
    let hosts = PrivateHosts::write(&dir.join("hosts"), &[(HOST_A, SERVERS), (HOST_B, SERVERS)]);
    match hosts.check() {
        Ok(()) => Some(hosts),
        Err(why) => {
            let _ = writeln!(std::io::stderr(), "lanyard-e2e: skipping {test}: {why}");
            None
        }
    }
}

/// Servers A (127.0.0.2) and B (127.0.0.3) on one port over one database, once A serves a
/// bundle holding both servers' authorities.
fn two_servers_behind_one_name(dir: &TestDir) -> (Server, Server, u16) {
    let datastore = shared_datastore();
    let port = free_port_on(&[HOST_A, HOST_B]);
    let start = |name: &str, host: IpAddr| {
        let mut server = Server::configure_on(
            &dir.join(name),
            &format!("instance = \"{name}\""),
            &datastore,
        );
        server.rebind(SocketAddr::new(host, port));
        server.start_again();
        server
    };
    let a = start("a", HOST_A);
    let b = start("b", HOST_B);
    wait_for_both_authorities(&a);
    (a, b, port)
}

fn wait_for_both_authorities(server: &Server) {
    poll(
        "the bundle to hold both servers' authorities",
        TIMEOUT,
        || {
            let count = server.bundle_der().len();
            if count == 2 {
                Ok(())
            } else {
                Err(format!("{count} authorities"))
            }
        },
    );
}

/// The authority among the trust domain's that `server` signs with: the one that verifies an
/// SVID it mints (`lanyard x509 mint`).
fn own_authority(server: &Server, dir: &Path) -> Vec<u8> {
    std::fs::create_dir_all(dir).unwrap();
    let minted = server.cli([
        "x509",
        "mint",
        "--spiffe-id",
        &spiffe_id("/e2e/ha-dns/probe"),
        "--write",
        dir.to_str().unwrap(),
    ]);
    assert!(minted.success(), "{minted}");
    let chain = pem_certificates(&std::fs::read_to_string(dir.join("svid.pem")).unwrap());
    let probe = FetchedSvid {
        spiffe_id: spiffe_id("/e2e/ha-dns/probe"),
        hint: String::new(),
        chain,
        bundle: Vec::new(),
    };
    server
        .bundle_der()
        .into_iter()
        .find(|authority| {
            probe
                .verify_with(std::slice::from_ref(authority), SystemTime::now())
                .is_ok()
        })
        .unwrap_or_else(|| panic!("no authority in the bundle verifies what the server mints"))
}

/// Whether `svid` was signed by `authority` and is valid now.
fn signed_by(svid: &FetchedSvid, authority: &[u8]) -> bool {
    svid.verify_with(&[authority.to_vec()], SystemTime::now())
        .is_ok()
}

/// The SPIFFE IDs of `svids`, sorted.
fn ids_of(svids: &[FetchedSvid]) -> Vec<&str> {
    let mut ids: Vec<&str> = svids.iter().map(|svid| svid.spiffe_id.as_str()).collect();
    ids.sort_unstable();
    ids
}

fn ids_of_expected<'a>(first: &'a str, later: &'a str) -> Vec<&'a str> {
    let mut ids = vec![first, later];
    ids.sort_unstable();
    ids
}

fn sorted(mut certificates: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    certificates.sort();
    certificates
}

#[test]
fn an_agent_given_one_name_for_two_servers_rides_out_the_death_of_one() {
    let dir = TestDir::new();
    let Some(hosts) = hosts_or_skip(
        &dir,
        "an_agent_given_one_name_for_two_servers_rides_out_the_death_of_one",
    ) else {
        return;
    };
    let (mut a, b, port) = two_servers_behind_one_name(&dir);
    let authority_a = own_authority(&a, &dir.join("mint-a"));
    let authority_b = own_authority(&b, &dir.join("mint-b"));
    assert_ne!(
        authority_a, authority_b,
        "each server signs with its own key"
    );

    let token = a.generate_token();
    let agent_id = spiffe_id(&format!("/spire/agent/join_token/{token}"));
    let me = uid_selector(current_uid());
    let first = spiffe_id("/e2e/ha-dns/first");
    a.create_entry(&first, &agent_id, &[&me], &SHORT_TTL);
    let mut agent = Agent::configure(&dir.join("agent"), &a, Some(&token), "");
    let by_address = format!("\"{}\"", a.address());
    let by_name = format!("\"{SERVERS}:{port}\"");
    agent.edit_config(|text| {
        assert!(text.contains(&by_address), "{text}");
        text.replace(&by_address, &by_name)
    });
    agent.start_again_with_hosts(&hosts);
    let svid = agent.wait_for_svids(None, &[&first]).remove(0);
    svid.verify();
    // The name's first address answered: the agent works with A, the server about to die.
    assert!(
        signed_by(&svid, &authority_a),
        "the first SVID is not A's: the agent did not reach the name's first address"
    );

    // A dies, and its address goes on taking TCP connections that nothing answers (a hung
    // host, the worst case for a name with several addresses: a connection attempt that
    // must time out before the next address is tried).
    a.kill();
    let _hung = std::net::TcpListener::bind(SocketAddr::new(HOST_A, port))
        .expect("taking over A's address with a listener that never accepts");
    let later = spiffe_id("/e2e/ha-dns/later");
    b.create_entry(&later, &agent_id, &[&me], &SHORT_TTL);
    for svid in agent.wait_for_svids(None, &[&first, &later]) {
        svid.verify();
    }
    let since = Instant::now();
    let mut fetches = 0;
    let mut last = Vec::new();
    while since.elapsed() < AFTER_THE_DEATH {
        let svids = agent
            .fetch_x509()
            .unwrap_or_else(|output| panic!("a fetch failed after A died: {output}"));
        assert_eq!(ids_of(&svids), ids_of_expected(&first, &later));
        for svid in &svids {
            svid.verify();
        }
        last = svids;
        fetches += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(fetches > 10, "only {fetches} fetches");
    // Past the lifetime of anything A signed: what the agent serves now, B signed.
    for svid in &last {
        assert!(
            signed_by(svid, &authority_b),
            "{} is not signed by B's authority\n{}",
            svid.spiffe_id,
            agent.log_tail()
        );
    }
    agent.process().assert_running();
    // One agent, attested once.
    assert_eq!(b.agent_ids(), [agent_id]);
}

/// Polls until `agent` serves exactly `expected` (in any order), each SVID signed by
/// `authority` and valid; returns them.
fn wait_for_spire_svids(
    agent: &mut SpireAgent,
    expected: &[&str],
    authority: &[u8],
    what: &str,
) -> Vec<FetchedSvid> {
    let mut expected_ids = expected.to_vec();
    expected_ids.sort_unstable();
    poll(what, SPIRE_TIMEOUT, || {
        agent.process().assert_running();
        let svids = agent
            .fetch_x509_all()
            .map_err(|output| output.to_string())?;
        if ids_of(&svids) != expected_ids {
            return Err(format!("served {:?}", ids_of(&svids)));
        }
        match svids.iter().find(|svid| !signed_by(svid, authority)) {
            Some(other) => Err(format!(
                "{} is not signed by that authority",
                other.spiffe_id
            )),
            None => Ok(svids),
        }
    })
}

/// Polls until the bundle `agent` serves is `authorities`.
fn wait_for_spire_bundle(agent: &mut SpireAgent, authorities: &[Vec<u8>]) {
    let authorities = sorted(authorities.to_vec());
    poll(
        "spire-agent to serve both servers' authorities",
        SPIRE_TIMEOUT,
        || {
            let svid = agent.fetch_x509().map_err(|output| output.to_string())?;
            let served = sorted(svid.bundle);
            if served == authorities {
                Ok(())
            } else {
                Err(format!("{} authorities served", served.len()))
            }
        },
    );
}

#[test]
fn spire_agent_given_one_name_for_two_servers_rides_out_the_death_of_one() {
    let test = "spire_agent_given_one_name_for_two_servers_rides_out_the_death_of_one";
    if spire_or_skip(test).is_none() {
        return;
    }
    let dir = TestDir::new();
    let Some(hosts) = hosts_or_skip(&dir, test) else {
        return;
    };
    let (mut a, b, port) = two_servers_behind_one_name(&dir);
    let authority_b = own_authority(&b, &dir.join("mint-b"));

    let token = a.generate_token();
    let agent_id = spiffe_id(&format!("/spire/agent/join_token/{token}"));
    let me = uid_selector(current_uid());
    let first = spiffe_id("/e2e/ha-dns/spire-first");
    a.create_entry(&first, &agent_id, &[&me], &SHORT_TTL);
    let mut agent = SpireAgent::start_in(
        &dir.join("spire-agent"),
        &format!("{SERVERS}:{port}"),
        &a.bundle_pem(),
        SpireAttestation::JoinToken(&token),
        Some(&hosts),
    );
    agent.wait_for_x509(&first).verify();
    // SPIRE's agent trusts only the bundle it holds: B's authority must be in it before A
    // dies, or B could not be authenticated.
    wait_for_spire_bundle(&mut agent, &a.bundle_der());

    a.kill();
    let later = spiffe_id("/e2e/ha-dns/spire-later");
    b.create_entry(&later, &agent_id, &[&me], &SHORT_TTL);
    // The entry written through B arrives, and the SVID from A's time is renewed through B.
    wait_for_spire_svids(
        &mut agent,
        &[&first, &later],
        &authority_b,
        "spire-agent to serve both entries, signed by B",
    );
    let since = Instant::now();
    let mut fetches = 0;
    while since.elapsed() < AFTER_THE_DEATH {
        let svids = agent
            .fetch_x509_all()
            .unwrap_or_else(|output| panic!("a fetch failed after A died: {output}"));
        assert_eq!(ids_of(&svids), ids_of_expected(&first, &later));
        for svid in &svids {
            svid.verify();
        }
        fetches += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(fetches > 10, "only {fetches} fetches");
    agent.process().assert_running();
    assert_eq!(b.agent_ids(), [agent_id]);
}

/// spire-agent's own SVID, as it keeps it in its data directory: `agent-data.json`, whose
/// `svid` is a list of PEM blocks, each base64-encoded (Go's JSON encoding of `[][]byte`).
fn spire_agent_svid(agent_dir: &Path, agent_id: &str) -> Result<FetchedSvid, String> {
    use base64::Engine as _;
    let path = agent_dir.join("data").join("agent-data.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let data: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut chain = Vec::new();
    for block in data["svid"]
        .as_array()
        .ok_or_else(|| format!("no svid list in {}", path.display()))?
    {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(block.as_str().unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        chain.extend(pem_certificates(&String::from_utf8_lossy(&pem)));
    }
    Ok(FetchedSvid {
        spiffe_id: agent_id.to_owned(),
        hint: String::new(),
        chain,
        bundle: Vec::new(),
    })
}

#[test]
fn spire_agent_keeps_working_when_a_server_of_the_trust_domain_takes_over_a_dead_ones_address() {
    let test = "spire_agent_keeps_working_when_a_server_of_the_trust_domain_takes_over_a_dead_ones_address";
    if spire_or_skip(test).is_none() {
        return;
    }
    let dir = TestDir::new();
    let datastore = shared_datastore();
    // Short agent SVIDs, so that spire-agent renews its own (RenewAgent) after the takeover.
    let extra = "agent_ttl = \"20s\"";
    let mut a = Server::start_on(
        &dir.join("a"),
        &format!("instance = \"a\"\n{extra}"),
        &datastore,
    );
    // B runs once beside A, so that its authority is in the trust domain's bundle.
    let mut b = Server::start_on(
        &dir.join("b"),
        &format!("instance = \"b\"\n{extra}"),
        &datastore,
    );
    wait_for_both_authorities(&a);
    let authority_b = own_authority(&b, &dir.join("mint-b"));

    let token = a.generate_token();
    let agent_id = spiffe_id(&format!("/spire/agent/join_token/{token}"));
    let me = uid_selector(current_uid());
    let first = spiffe_id("/e2e/ha-dns/takeover-first");
    a.create_entry(&first, &agent_id, &[&me], &SHORT_TTL);
    let agent_dir = dir.join("spire-agent");
    let mut agent = SpireAgent::start(&agent_dir, &a.address(), &a.bundle_pem(), &token);
    agent.wait_for_x509(&first).verify();
    wait_for_spire_bundle(&mut agent, &a.bundle_der());

    // B stops, A dies, and B comes back on A's address with its own data and keys.
    let address_a: SocketAddr = a.address().parse().unwrap();
    b.stop();
    a.kill();
    b.rebind(address_a);
    b.start_again();
    let serial_at_takeover = agent_serial(&b, &agent_id);

    // spire-agent renews its own SVID through B: a new serial, signed by B, on disk and in
    // B's record.
    poll(
        "spire-agent to renew its agent SVID through B",
        SPIRE_TIMEOUT,
        || {
            agent.process().assert_running();
            let serial = agent_serial(&b, &agent_id);
            if serial == serial_at_takeover {
                return Err(format!("the serial is still {serial}"));
            }
            let svid = spire_agent_svid(&agent_dir, &agent_id)?;
            if !signed_by(&svid, &authority_b) {
                return Err("the agent SVID on disk is not signed by B".into());
            }
            let on_disk = lanyard_core::x509::serial_decimal(svid.leaf()).unwrap();
            if on_disk == serial {
                Ok(())
            } else {
                Err(format!(
                    "B's record has {serial}, the agent holds {on_disk}"
                ))
            }
        },
    );

    // An entry written through B reaches the workload, and every SVID it gets is B's, valid
    // against the bundle B serves.
    let later = spiffe_id("/e2e/ha-dns/takeover-later");
    b.create_entry(&later, &agent_id, &[&me], &SHORT_TTL);
    let svids = wait_for_spire_svids(
        &mut agent,
        &[&first, &later],
        &authority_b,
        "spire-agent to serve both entries, signed by B",
    );
    let bundle = b.bundle_der();
    for svid in &svids {
        svid.verify_with(&bundle, SystemTime::now())
            .unwrap_or_else(|e| panic!("{} does not verify: {e}", svid.spiffe_id));
        assert_eq!(sorted(svid.bundle.clone()), sorted(bundle.clone()));
    }
    agent.process().assert_running();
    assert_eq!(b.agent_ids(), [agent_id]);
}
