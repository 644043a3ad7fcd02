//! The core stays sans-IO: no async runtime, RPC stack or database may enter its dependency
//! tree. This test asks cargo itself, so a new transitive dependency is caught too.

use std::process::Command;

#[test]
fn core_depends_on_no_runtime_transport_or_store() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "lanyard-core",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    assert!(
        tree.lines().any(|l| l.starts_with("ring ")),
        "cargo tree output looks wrong:\n{tree}"
    );
    let forbidden = [
        "tokio",
        "tonic",
        "sqlx",
        "hyper",
        "mio",
        "rusqlite",
        "aws-lc-rs",
        "openssl",
    ];
    for line in tree.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        assert!(
            !forbidden.contains(&name),
            "lanyard-core must stay sans-IO but depends on {line}"
        );
    }
}
