//! `lanyard federation create|list|show|update|delete|refresh` against a real server (`lanyard
//! server run`): flags and SPIRE's `--data` files, SPIRE's layout and JSON, the refusals as one
//! error line, the bundle that comes with a relationship listed by `lanyard bundle list`, and a
//! listing long enough to take two pages.

use std::process::Output;
use std::time::{Duration, SystemTime};

use lanyard_core::x509::{CaSubject, create_self_signed_ca};
use lanyard_core::{KeyPair, KeyType, TrustDomain};
use serde_json::{Value, json};

use crate::real_server::start_server;
use crate::{assert_one_error_line, lanyard, stderr_of, stdout_of};

/// `lanyard federation <args> --socket <socket>`.
fn federation(socket: &str, args: &[&str]) -> Output {
    let args = [&["federation"][..], args, &["--socket", socket]].concat();
    lanyard(&args)
}

fn succeeded(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {:?} {}",
        output.status,
        stderr_of(output)
    );
    stdout_of(output)
}

fn json_of(output: &Output, what: &str) -> Value {
    serde_json::from_str(&succeeded(output, what)).unwrap()
}

fn ca_pem(trust_domain: &str) -> String {
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let der = create_self_signed_ca(
        &TrustDomain::new(trust_domain).unwrap(),
        &key,
        &CaSubject::default(),
        SystemTime::now(),
        Duration::from_secs(3600),
    )
    .unwrap();
    lanyard_core::keys::pem_encode("CERTIFICATE", &der)
}

#[test]
fn federation_relationships_are_managed_from_the_cli() {
    let server = start_server();
    let socket = server.socket.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundle_path = dir.path().join("partner.pem");
    std::fs::write(&bundle_path, ca_pem("partner.example")).unwrap();

    // create from flags: https_spiffe with a PEM bundle, https_web without one.
    let created = federation(
        socket,
        &[
            "create",
            "--trust-domain",
            "partner.example",
            "--bundle-endpoint-url",
            "https://partner.example:8443",
            "--bundle-endpoint-profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            "spiffe://partner.example/spire/server",
            "--trust-domain-bundle-path",
            bundle_path.to_str().unwrap(),
        ],
    );
    let text = succeeded(&created, "create https_spiffe");
    assert_eq!(
        text,
        "Trust domain              : partner.example\n\
         Bundle endpoint URL       : https://partner.example:8443\n\
         Bundle endpoint profile   : https_spiffe\n\
         Endpoint SPIFFE ID        : spiffe://partner.example/spire/server\n\
         Trust domain bundle       : 1 X.509 authority, 0 JWT authorities, sequence number 0\n\n"
    );
    let created = federation(
        socket,
        &[
            "create",
            "--trust-domain",
            "web.example",
            "--bundle-endpoint-url",
            "https://web.example/bundle",
            "--bundle-endpoint-profile",
            "https_web",
            "--output",
            "json",
        ],
    );
    let created = json_of(&created, "create https_web");
    assert_eq!(created["results"][0]["status"]["code"], 0, "{created}");
    assert_eq!(
        created["results"][0]["federation_relationship"],
        json!({
            "trust_domain": "web.example",
            "bundle_endpoint_url": "https://web.example/bundle",
            "https_web": {},
        })
    );

    // list and show.
    let listed = succeeded(&federation(socket, &["list"]), "list");
    assert!(
        listed.starts_with(
            "Found 2 federation relationships\n\nTrust domain              : partner.example\n"
        ),
        "{listed}"
    );
    assert!(
        listed.contains("Bundle endpoint profile   : https_web\n"),
        "{listed}"
    );
    let listed = json_of(
        &federation(socket, &["list", "--output", "json"]),
        "list json",
    );
    let relationships = listed["federation_relationships"].as_array().unwrap();
    assert_eq!(relationships.len(), 2);
    assert_eq!(
        relationships[0]["https_spiffe"]["endpoint_spiffe_id"],
        "spiffe://partner.example/spire/server"
    );
    assert_eq!(
        relationships[0]["trust_domain_bundle"]["x509_authorities"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let shown = succeeded(
        &federation(socket, &["show", "--trust-domain", "spiffe://web.example"]),
        "show",
    );
    assert!(
        shown.starts_with("Found a federation relationship with trust domain web.example:\n\n"),
        "{shown}"
    );

    // The bundle that came with the relationship is the trust domain's federated bundle.
    let bundles = lanyard(&["bundle", "list", "--socket", socket, "--output", "json"]);
    let bundles = json_of(&bundles, "bundle list");
    let names: Vec<&str> = bundles["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["trust_domain"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["partner.example"]);

    // update from a SPIRE data file: web.example becomes https_spiffe.
    let data = dir.path().join("relationships.json");
    std::fs::write(
        &data,
        json!({"federationRelationships": [{
            "trustDomain": "web.example",
            "bundleEndpointURL": "https://web.example:8443/bundle",
            "bundleEndpointProfile": "https_spiffe",
            "endpointSPIFFEID": "spiffe://web.example/spire/server",
        }]})
        .to_string(),
    )
    .unwrap();
    let updated = federation(socket, &["update", "--data", data.to_str().unwrap()]);
    let text = succeeded(&updated, "update --data");
    assert!(
        text.contains("Endpoint SPIFFE ID        : spiffe://web.example/spire/server\n"),
        "{text}"
    );
    let shown = json_of(
        &federation(
            socket,
            &["show", "--trust-domain", "web.example", "--output", "json"],
        ),
        "show json",
    );
    assert_eq!(
        shown["bundle_endpoint_url"],
        "https://web.example:8443/bundle"
    );

    // Refusals are one error line: before sending, and from the server.
    let args = [
        "create",
        "--trust-domain",
        "other.example",
        "--bundle-endpoint-url",
        "http://other.example",
        "--bundle-endpoint-profile",
        "https_web",
    ];
    let line = assert_one_error_line(&federation(socket, &args), &args, "https scheme");
    assert_eq!(
        line,
        "error: federation create: invalid federation relationship: bundle endpoint URL must use the https scheme"
    );
    let args = [
        "create",
        "--trust-domain",
        "web.example",
        "--bundle-endpoint-url",
        "https://web.example",
        "--bundle-endpoint-profile",
        "https_web",
    ];
    let duplicate = federation(socket, &args);
    let line = assert_one_error_line(&duplicate, &args, "AlreadyExists");
    assert_eq!(
        line,
        "error: federation create: 1 of 1 federation relationship failed: failed to create \
         federation relationship: a federation relationship with trust domain \"web.example\" \
         already exists (AlreadyExists)"
    );
    assert!(
        stdout_of(&duplicate).starts_with(
            "Failed to create the following federation relationship (code: AlreadyExists"
        ),
        "{}",
        stdout_of(&duplicate)
    );
    let args = [
        "create",
        "--trust-domain",
        "example.org",
        "--bundle-endpoint-url",
        "https://example.org",
        "--bundle-endpoint-profile",
        "https_web",
    ];
    assert_one_error_line(
        &federation(socket, &args),
        &args,
        "unable to create federation relationship for server trust domain (InvalidArgument)",
    );
    let args = [
        "update",
        "--trust-domain",
        "unknown.example",
        "--bundle-endpoint-url",
        "https://unknown.example",
        "--bundle-endpoint-profile",
        "https_web",
    ];
    assert_one_error_line(
        &federation(socket, &args),
        &args,
        "unable to fetch federation relationship: record not found (NotFound)",
    );
    let args = ["show", "--trust-domain", "unknown.example"];
    let line = assert_one_error_line(&federation(socket, &args), &args, "NotFound");
    assert_eq!(
        line,
        "error: federation show: cannot show the federation relationship with unknown.example: \
         federation relationship does not exist (NotFound)"
    );

    // refresh: a known trust domain, then an unknown one.
    let refreshed = succeeded(
        &federation(socket, &["refresh", "--id", "partner.example"]),
        "refresh",
    );
    assert_eq!(refreshed, "Bundle refreshed\n");
    let args = ["refresh", "--trust-domain", "unknown.example"];
    let line = assert_one_error_line(&federation(socket, &args), &args, "unknown.example");
    assert_eq!(
        line,
        "error: federation refresh: there is no federation relationship with trust domain \
         unknown.example"
    );

    // delete: the relationship goes, its bundle stays.
    let deleted = succeeded(
        &federation(socket, &["delete", "--trust-domain", "partner.example"]),
        "delete",
    );
    assert_eq!(deleted, "federation relationship deleted.\n");
    let args = ["delete", "--trust-domain", "partner.example"];
    let line = assert_one_error_line(&federation(socket, &args), &args, "NotFound");
    assert_eq!(
        line,
        "error: federation delete: cannot delete the federation relationship with \
         partner.example (code: NotFound, msg: \"federation relationship not found\")"
    );
    let listed = succeeded(&federation(socket, &["list"]), "list after delete");
    assert!(
        listed.starts_with("Found 1 federation relationship\n"),
        "{listed}"
    );
    let bundles = json_of(
        &lanyard(&["bundle", "list", "--socket", socket, "--output", "json"]),
        "bundle list after delete",
    );
    assert_eq!(bundles["bundles"][0]["trust_domain"], "partner.example");
}

#[test]
fn a_long_listing_is_read_page_by_page() {
    let server = start_server();
    let socket = server.socket.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // 501 relationships: one batch of the most a call takes, and one more.
    let relationship = |n: usize| {
        json!({
            "trustDomain": format!("td-{n:04}.example"),
            "bundleEndpointURL": format!("https://td-{n:04}.example/bundle"),
            "bundleEndpointProfile": "https_web",
        })
    };
    for (name, range) in [("first.json", 0..500), ("second.json", 500..501)] {
        let path = dir.path().join(name);
        let items: Vec<Value> = range.map(relationship).collect();
        std::fs::write(
            &path,
            json!({ "federationRelationships": items }).to_string(),
        )
        .unwrap();
        let created = federation(
            socket,
            &[
                "create",
                "--data",
                path.to_str().unwrap(),
                "--output",
                "json",
            ],
        );
        succeeded(&created, name);
    }
    let listed = json_of(&federation(socket, &["list", "--output", "json"]), "list");
    let names: Vec<&str> = listed["federation_relationships"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["trust_domain"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 501);
    assert_eq!(names[0], "td-0000.example");
    assert_eq!(names[500], "td-0500.example");
}
