//! Revocation reaching a verifier we did not write: `lanyard helper` writes the trust domain's
//! CRLs beside the bundle (`crl_file_name`), Debian's nginx checks client certificates against
//! them (`ssl_crl`), and once a client's SVID is revoked by serial nginx refuses it, while the
//! replacement the agent minted at once is accepted.

use std::sync::Arc;
use std::time::Duration;

use lanyard_core::tls::{SpiffeServerVerifier, client_config};
use lanyard_core::{KeyPair, SpiffeId};
use lanyard_e2e::nginx::nginx_or_skip;
use lanyard_e2e::{
    ChildProcess, CliOutput, Cluster, RunAs, free_port, poll, toml_string, uid_selector,
};

use crate::helper::{certificates, get_over_mtls};

/// The uid the client runs as (nobody), to get an identity of its own.
const CLIENT_UID: u32 = 65534;

#[test]
fn nginx_refuses_a_revoked_client_certificate_with_the_crl_the_helper_writes() {
    let Some(nginx) =
        nginx_or_skip("nginx_refuses_a_revoked_client_certificate_with_the_crl_the_helper_writes")
    else {
        return;
    };
    let cluster = Cluster::start();
    let server_id = cluster.register_uid("/nginx", lanyard_e2e::current_uid(), &[]);
    cluster.register("/client", &[&uid_selector(CLIENT_UID)], &[]);
    let dir = cluster.dir();

    let port = free_port();
    let certs = dir.subdir("nginx-certs");
    let nginx_dir = dir.subdir("nginx");
    let conf = nginx_dir.join("nginx.conf");
    std::fs::write(
        &conf,
        lanyard_e2e::nginx::mtls_config(&nginx_dir, &certs, port, true),
    )
    .expect("writing nginx.conf");
    let helper_conf = dir.join("helper.toml");
    std::fs::write(
        &helper_conf,
        format!(
            "agent_address = {socket}\ncert_dir = {certs}\ncrl_file_name = \"crl.pem\"\n\
             cmd = {nginx}\ncmd_args = {args}\nrenew_signal = \"SIGHUP\"\n",
            socket = toml_string(cluster.agent.socket_path().to_str().expect("UTF-8")),
            certs = toml_string(certs.to_str().expect("UTF-8")),
            nginx = toml_string(nginx.to_str().expect("UTF-8")),
            args = toml_string(&format!("-c {}", conf.display())),
        ),
    )
    .expect("writing helper.toml");
    let mut helper = ChildProcess::new("lanyard helper", dir.join("helper.log"));
    let mut command = cluster.agent.workload_command(None);
    command.arg("helper").arg("--config").arg(&helper_conf);
    helper.start(command);
    let crl_file = certs.join("crl.pem");
    poll(
        "the helper to write the CRLs",
        Duration::from_secs(30),
        || {
            helper.assert_running();
            match std::fs::read_to_string(&crl_file) {
                Ok(text) if text.contains("BEGIN X509 CRL") => Ok(()),
                _ => Err(helper.log_tail(20)),
            }
        },
    );

    // The client's SVID, written by `helper --once` as nobody.
    use std::os::unix::fs::PermissionsExt as _;
    let client_certs = dir.subdir("client-certs");
    std::os::unix::fs::chown(&client_certs, Some(CLIENT_UID), Some(CLIENT_UID))
        .expect("chown the client's directory");
    let client_conf = dir.join("client-helper.toml");
    std::fs::write(
        &client_conf,
        format!(
            "agent_address = {socket}\ncert_dir = {certs}\n",
            socket = toml_string(cluster.agent.socket_path().to_str().expect("UTF-8")),
            certs = toml_string(client_certs.to_str().expect("UTF-8")),
        ),
    )
    .expect("writing the client's helper.toml");
    std::fs::set_permissions(&client_conf, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let fetch_client = || {
        let mut once = cluster.agent.workload_command(Some(RunAs::uid(CLIENT_UID)));
        once.arg("helper")
            .arg("--config")
            .arg(&client_conf)
            .arg("--once");
        let output = CliOutput::run(&mut once);
        assert!(output.success(), "helper --once: {output}");
        let chain = certificates(&client_certs.join("svid.pem"));
        let key = KeyPair::from_pkcs8_pem(
            &std::fs::read_to_string(client_certs.join("svid_key.pem")).expect("the client key"),
        )
        .expect("a PKCS#8 key");
        let serial = lanyard_core::x509::serial_decimal(&chain[0]).expect("a serial");
        let bundle = certificates(&client_certs.join("svid_bundle.pem"));
        let expected: SpiffeId = server_id.parse().expect("the server's SPIFFE ID");
        let verifier = SpiffeServerVerifier::new(expected, Arc::new(move || bundle.clone()));
        let mut config =
            client_config(Arc::new(verifier), Some((&chain, &key))).expect("a client config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        (serial, Arc::new(config))
    };
    let accepted = |config: &Arc<rustls::ClientConfig>| -> Result<bool, String> {
        get_over_mtls(port, config).map(|(_, body)| body.contains("client verified: SUCCESS"))
    };
    let (revoked_serial, revoked) = fetch_client();
    let ok = poll("nginx to serve mTLS", Duration::from_secs(30), || {
        accepted(&revoked).map_err(|e| format!("{e}\n{}", helper.log_tail(20)))
    });
    assert!(ok, "nginx accepts the client before the revocation");

    let made = cluster.server.cli([
        "revoke",
        "x509",
        "--serial",
        revoked_serial.as_str(),
        "--owner",
        "security",
        "--reason",
        "the client's key was copied",
        "--output",
        "json",
    ]);
    assert!(made.success(), "revoke: {made}");

    // The agent drops the revoked SVID and mints another; the client gets the new one.
    let (fresh_serial, fresh) = poll("a replacement SVID", Duration::from_secs(30), || {
        let (serial, config) = fetch_client();
        if serial == revoked_serial {
            Err("the revoked SVID is still served".to_owned())
        } else {
            Ok((serial, config))
        }
    });
    assert_ne!(fresh_serial, revoked_serial);

    // nginx, given the new CRLs by the helper, refuses the revoked certificate and takes the
    // new one.
    poll(
        "nginx to refuse the revoked certificate",
        Duration::from_secs(30),
        || match accepted(&revoked) {
            Ok(false) | Err(_) => Ok(()),
            Ok(true) => Err(format!("still accepted\n{}", helper.log_tail(20))),
        },
    );
    assert_eq!(accepted(&fresh), Ok(true), "the replacement is accepted");
    let errors = std::fs::read_to_string(nginx_dir.join("error.log")).unwrap_or_default();
    assert!(errors.contains("revoked"), "nginx says why: {errors}");
    let status = helper.terminate();
    assert!(status.success(), "the helper exits cleanly: {status}");
}

/// The `jti` of a compact JWT.
fn jti_of(token: &str) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a compact JWT");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url claims"),
    )
    .expect("JSON claims");
    claims["jti"].as_str().expect("a jti").to_owned()
}

/// A JWT-SVID revoked by its `jti` fails `ValidateJWTSVID` through go-spiffe and py-spiffe, as
/// workloads call it; another token of the same identity still validates.
#[test]
fn a_revoked_jwt_id_fails_validation_through_go_spiffe_and_py_spiffe() {
    let go = crate::go_spiffe::client();
    let python = crate::py_spiffe::py_spiffe_python();
    let cluster = Cluster::start();
    let id = cluster.register_uid("/e2e/jwt", lanyard_e2e::current_uid(), &[]);
    cluster.agent.wait_for_svids(None, &[&id]);
    let token = |audience: &str| {
        let mut fetch = cluster.agent.workload_command(None);
        fetch.args(["fetch", "jwt", "--audience", audience, "--output", "json"]);
        let fetched = CliOutput::run(&mut fetch).json();
        fetched["svids"][0]["svid"]
            .as_str()
            .unwrap_or_else(|| panic!("no token in {fetched}"))
            .to_owned()
    };
    let revoked = token("db");
    let kept = token("cache");
    let go_verdict = |token: &str, audience: &str| -> Option<serde_json::Value> {
        let client = go?;
        let mut command =
            crate::go_spiffe::go_command(&cluster, client, &["validate", audience, token]);
        let output = CliOutput::run(&mut command);
        assert!(output.success(), "go-spiffe validate: {output}");
        Some(output.json())
    };
    let py_verdict = |token: &str, audience: &str| -> Option<serde_json::Value> {
        let python = python?;
        let mut command = std::process::Command::new(python);
        command
            .arg(crate::py_spiffe::python_dir().join("fetch.py"))
            .args(["validate", audience, token])
            .env("SPIFFE_ENDPOINT_SOCKET", cluster.agent.endpoint())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("PYTHONPATH");
        let output = CliOutput::run(&mut command);
        assert!(output.success(), "py-spiffe validate: {output}");
        Some(output.json())
    };
    for verdict in [go_verdict(&revoked, "db"), py_verdict(&revoked, "db")]
        .into_iter()
        .flatten()
    {
        assert_eq!(verdict["valid"], true, "before the revocation: {verdict}");
        assert_eq!(verdict["spiffe_id"], id.as_str(), "{verdict}");
    }

    let jti = jti_of(&revoked);
    let made = cluster.server.cli([
        "revoke",
        "jwt",
        "--jti",
        jti.as_str(),
        "--owner",
        "security",
        "--reason",
        "the token was pasted into a ticket",
    ]);
    assert!(made.success(), "revoke: {made}");

    // The agent learns it at once (pushed); both libraries then see the refusal.
    let mut validate = cluster.agent.workload_command(None);
    validate.args(["validate", "jwt", "--audience", "db", "--svid", &revoked]);
    poll(
        "the agent to refuse the revoked token",
        Duration::from_secs(30),
        || {
            let output = CliOutput::run(&mut validate);
            if output.success() {
                Err(format!("still valid: {output}"))
            } else {
                Ok(())
            }
        },
    );
    for verdict in [go_verdict(&revoked, "db"), py_verdict(&revoked, "db")]
        .into_iter()
        .flatten()
    {
        assert_eq!(verdict["valid"], false, "after the revocation: {verdict}");
        assert!(
            verdict["error"]
                .as_str()
                .unwrap_or_default()
                .contains("revoked"),
            "{verdict}"
        );
    }
    for verdict in [go_verdict(&kept, "cache"), py_verdict(&kept, "cache")]
        .into_iter()
        .flatten()
    {
        assert_eq!(verdict["valid"], true, "another token: {verdict}");
    }
    // A new token for the revoked one's audience is another token, and validates.
    let fresh = token("db");
    assert_ne!(jti_of(&fresh), jti);
    if let Some(verdict) = go_verdict(&fresh, "db") {
        assert_eq!(verdict["valid"], true, "the new token: {verdict}");
    }
}

/// The DER of every `label` PEM block in `text`.
pub(crate) fn pem_blocks(text: &str, label: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    text.split(begin.as_str())
        .skip(1)
        .map(|block| {
            let body: String = block
                .split(end.as_str())
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .expect("PEM base64")
        })
        .collect()
}

/// `spire-agent` attached to the Lanyard server knows nothing of revocations and keeps
/// working; the serial of an SVID it serves, once revoked, is on the CRLs a Lanyard agent
/// delivers (here through `lanyard helper --once` with `crl_file_name`), so a CRL-checking
/// peer refuses it while it passes one that does not check.
#[test]
fn a_spire_agent_keeps_working_and_its_revoked_serial_is_refused_by_crl_checkers() {
    use lanyard_e2e::spire::{SpireAgent, spire_or_skip};

    if spire_or_skip(
        "a_spire_agent_keeps_working_and_its_revoked_serial_is_refused_by_crl_checkers",
    )
    .is_none()
    {
        return;
    }
    let cluster = Cluster::start();
    let server = &cluster.server;
    let token = server.generate_token();
    let spire_agent_id = lanyard_e2e::spiffe_id(&format!("/spire/agent/join_token/{token}"));
    let spire_workload = lanyard_e2e::spiffe_id("/e2e/spire-agent/revoked");
    let selector = uid_selector(lanyard_e2e::current_uid());
    server.create_entry(&spire_workload, &spire_agent_id, &[&selector], &[]);
    let mut spire_agent = SpireAgent::start(
        &cluster.dir().join("spire-agent"),
        &server.address(),
        &server.bundle_pem(),
        &token,
    );
    let served = spire_agent.wait_for_x509(&spire_workload);
    let serial = lanyard_core::x509::serial_decimal(&served.chain[0]).expect("a serial");

    // A reader of the CRLs on the Lanyard agent of the same trust domain.
    cluster.register_uid("/e2e/crl-reader", lanyard_e2e::current_uid(), &[]);
    let crl_dir = cluster.dir().subdir("crl-reader");
    let conf = cluster.dir().join("crl-helper.toml");
    std::fs::write(
        &conf,
        format!(
            "agent_address = {socket}\ncert_dir = {certs}\ncrl_file_name = \"crl.pem\"\n",
            socket = toml_string(cluster.agent.socket_path().to_str().expect("UTF-8")),
            certs = toml_string(crl_dir.to_str().expect("UTF-8")),
        ),
    )
    .expect("writing the helper's config");
    let authorities = server.bundle_der();
    let verdict = |crls: &[Vec<u8>]| {
        lanyard_core::x509::verify_svid_chain_with_crls(
            &served.chain,
            &lanyard_e2e::trust_domain(),
            &authorities,
            crls,
            std::time::SystemTime::now(),
        )
    };
    let read_crls = || {
        let mut once = cluster.agent.workload_command(None);
        once.arg("helper").arg("--config").arg(&conf).arg("--once");
        let output = CliOutput::run(&mut once);
        assert!(output.success(), "helper --once: {output}");
        pem_blocks(
            &std::fs::read_to_string(crl_dir.join("crl.pem")).expect("the CRL file"),
            "X509 CRL",
        )
    };
    let before = read_crls();
    assert!(!before.is_empty(), "the agent delivers CRLs");
    verdict(&before).expect("spire-agent's SVID passes before the revocation");

    let made = server.cli([
        "revoke",
        "x509",
        "--serial",
        serial.as_str(),
        "--owner",
        "security",
        "--reason",
        "copied off the node",
    ]);
    assert!(made.success(), "revoke: {made}");
    poll(
        "the CRLs to list spire-agent's serial",
        Duration::from_secs(30),
        || match verdict(&read_crls()) {
            Err(lanyard_core::x509::X509Error::Revoked) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    // spire-agent ignores revocations: it keeps serving what it holds, and keeps syncing.
    let still = spire_agent
        .fetch_x509()
        .expect("spire-agent still serves its workload");
    assert_eq!(still.spiffe_id, spire_workload);
    assert!(
        lanyard_core::x509::verify_svid_chain(
            &still.chain,
            &lanyard_e2e::trust_domain(),
            &authorities,
            std::time::SystemTime::now(),
        )
        .is_ok(),
        "a verifier that does not check CRLs still accepts it"
    );
    let later = lanyard_e2e::spiffe_id("/e2e/spire-agent/later");
    server.create_entry(&later, &spire_agent_id, &[&selector], &[]);
    poll(
        "spire-agent to sync a later entry",
        lanyard_e2e::spire::SPIRE_TIMEOUT,
        || {
            let all = spire_agent
                .fetch_x509_all()
                .map_err(|output| output.to_string())?;
            if all.iter().any(|svid| svid.spiffe_id == later) {
                Ok(())
            } else {
                Err(format!("{} SVIDs, none for {later}", all.len()))
            }
        },
    );
}
