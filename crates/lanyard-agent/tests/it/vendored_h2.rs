//! The Workload API must keep serving grpc-core clients (py-spiffe), whose `:authority` is the
//! percent-encoded socket path. Only the patched `h2` in `vendor/h2` accepts that; a lock
//! update that resolved `h2` from the registry would silently drop the patch. This test fails
//! first.

use std::path::PathBuf;

fn workspace_file(path: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

#[test]
fn the_lock_resolves_h2_to_the_patched_copy_only() {
    let lock = workspace_file("Cargo.lock");
    let packages: Vec<&str> = lock
        .split("[[package]]")
        .filter(|block| block.lines().any(|line| line.trim() == "name = \"h2\""))
        .collect();
    assert_eq!(
        packages.len(),
        1,
        "h2 appears more than once in Cargo.lock: {packages:#?}"
    );
    let h2 = packages[0];
    assert!(
        !h2.lines()
            .any(|line| line.trim_start().starts_with("source =")),
        "Cargo.lock takes h2 from a registry, not from vendor/h2; the authority patch is gone \
         (see vendor/README.md):\n{h2}"
    );
    let vendored = workspace_file("vendor/h2/Cargo.toml");
    let version = h2
        .lines()
        .find_map(|line| line.trim().strip_prefix("version = "))
        .unwrap_or_default();
    assert!(
        vendored.contains(&format!("version = {version}")),
        "Cargo.lock's h2 {version} is not the vendored copy's version"
    );
    let manifest = workspace_file("Cargo.toml");
    assert!(
        manifest.contains("h2 = { path = \"vendor/h2\" }"),
        "the [patch.crates-io] entry for h2 is gone"
    );
    assert!(
        workspace_file("vendor/h2/src/server.rs").contains("Lanyard patch"),
        "vendor/h2 no longer carries the authority patch"
    );
}
