//! `--output json` of the commands that gained it: the workload commands against `lanyard
//! dev`'s agent, and `x509 mint`/`jwt mint` against its server. Each document is checked
//! against what the same run shows otherwise.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::dev::Dev;

/// `lanyard dev` once the current user's SVID is served.
fn dev_serving() -> Dev {
    let dev = Dev::start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while dev.served_ids().is_empty() {
        assert!(Instant::now() < deadline, "no SVID served");
        std::thread::sleep(Duration::from_millis(200));
    }
    dev
}

/// Runs a command that must succeed and parses its stdout as one JSON document.
fn run_json(dev: &Dev, args: &[&str]) -> Value {
    let out = dev.run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
        panic!(
            "{args:?} printed no JSON ({err}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn now() -> i64 {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    i64::try_from(seconds).unwrap()
}

#[test]
fn fetch_bundle_json_lists_each_trust_domain() {
    let dev = dev_serving();
    let json = run_json(&dev, &["fetch", "bundle", "--output", "json"]);
    let bundles = json["bundles"].as_array().expect("bundles");
    assert_eq!(bundles.len(), 1, "{json}");
    assert_eq!(bundles[0]["trust_domain"], "spiffe://example.org", "{json}");
    let pem = bundles[0]["bundle_pem"].as_str().unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let text = String::from_utf8_lossy(&dev.run(&["fetch", "bundle"]).stdout).into_owned();
    assert!(
        text.contains(pem),
        "the same certificates as the text: {text}"
    );
}

#[test]
fn fetch_x509_write_json_names_the_files() {
    let dev = dev_serving();
    let dir = tempfile::tempdir().unwrap();
    let json = run_json(
        &dev,
        &[
            "fetch",
            "x509",
            "--write",
            dir.path().to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    let svids = json["svids"].as_array().expect("svids");
    assert!(!svids.is_empty(), "{json}");
    let first = &svids[0];
    assert!(
        first["spiffe_id"]
            .as_str()
            .unwrap()
            .starts_with("spiffe://example.org/user/"),
        "{json}"
    );
    for (member, file) in [
        ("x509_svid_path", "svid.0.pem"),
        ("private_key_path", "svid.0.key"),
        ("bundle_path", "bundle.0.pem"),
    ] {
        let path = first[member].as_str().unwrap();
        assert_eq!(path, dir.path().join(file).to_str().unwrap(), "{json}");
        assert!(std::path::Path::new(path).is_file(), "{path}");
    }
}

#[test]
fn validate_jwt_json_has_the_id_and_the_claims() {
    let dev = dev_serving();
    let fetched = run_json(
        &dev,
        &["fetch", "jwt", "--audience", "tour", "--output", "json"],
    );
    let token = fetched["svids"][0]["svid"].as_str().unwrap();
    let spiffe_id = fetched["svids"][0]["spiffe_id"].as_str().unwrap();
    let json = run_json(
        &dev,
        &[
            "validate",
            "jwt",
            "--audience",
            "tour",
            "--svid",
            token,
            "--output",
            "json",
        ],
    );
    assert_eq!(json["spiffe_id"], spiffe_id, "{json}");
    let claims = &json["claims"];
    assert_eq!(claims["sub"], spiffe_id, "{json}");
    assert!(
        claims["aud"].as_array().unwrap().contains(&"tour".into()),
        "{json}"
    );
    // Times stay whole numbers, as in the token.
    assert!(claims["exp"].as_i64().unwrap() > now(), "{json}");
    assert!(claims["iat"].is_i64(), "{json}");
}

#[test]
fn x509_mint_json_has_the_svid_key_and_bundle() {
    let dev = dev_serving();
    let json = run_json(
        &dev,
        &[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/tool",
            "--ttl",
            "10m",
            "--output",
            "json",
        ],
    );
    assert_eq!(
        json["id"],
        serde_json::json!({ "trust_domain": "example.org", "path": "/tool" }),
        "{json}"
    );
    let expires_at = json["expires_at"].as_i64().unwrap();
    assert!(
        expires_at > now() && expires_at <= now() + 600 + 5,
        "{json}"
    );
    for (member, label) in [
        ("x509_svid_pem", "CERTIFICATE"),
        ("private_key_pem", "PRIVATE KEY"),
        ("bundle_pem", "CERTIFICATE"),
    ] {
        let pem = json[member].as_str().unwrap();
        assert!(
            pem.starts_with(&format!("-----BEGIN {label}-----")),
            "{json}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let written = run_json(
        &dev,
        &[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/tool",
            "--write",
            dir.path().to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert!(written.get("private_key_pem").is_none(), "{written}");
    for (member, file) in [
        ("x509_svid_path", "svid.pem"),
        ("private_key_path", "key.pem"),
        ("bundle_path", "bundle.pem"),
    ] {
        assert_eq!(
            written[member],
            dir.path().join(file).to_str().unwrap(),
            "{written}"
        );
        assert!(dir.path().join(file).is_file());
    }
}

#[test]
fn jwt_mint_json_has_the_token_and_its_times() {
    let dev = dev_serving();
    let json = run_json(
        &dev,
        &[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/tool",
            "--audience",
            "api",
            "--output",
            "json",
        ],
    );
    assert_eq!(json["id"]["path"], "/tool", "{json}");
    assert_eq!(
        json["token"].as_str().unwrap().split('.').count(),
        3,
        "{json}"
    );
    let issued_at = json["issued_at"].as_i64().unwrap();
    assert!(json["expires_at"].as_i64().unwrap() > issued_at, "{json}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.jwt");
    let written = run_json(
        &dev,
        &[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/tool",
            "--audience",
            "api",
            "--write",
            path.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(written["path"], path.to_str().unwrap(), "{written}");
    assert!(
        written.get("token").is_none(),
        "the token stays in the file"
    );
    assert_eq!(
        std::fs::read_to_string(&path)
            .unwrap()
            .trim()
            .split('.')
            .count(),
        3
    );
}
