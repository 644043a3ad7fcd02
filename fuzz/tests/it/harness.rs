//! `fuzz/harness` (the libFuzzer binaries, outside the workspace and so never built by
//! `cargo test`) has exactly one binary per target, calling the function of the same name.

use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn the_harness_has_one_binary_per_target() {
    let harness = Path::new(env!("CARGO_MANIFEST_DIR")).join("harness");
    let targets: BTreeSet<&str> = lanyard_fuzz::TARGETS
        .iter()
        .map(|(name, _)| *name)
        .collect();

    let manifest = std::fs::read_to_string(harness.join("Cargo.toml")).expect("harness manifest");
    let bins: BTreeSet<&str> = manifest
        .lines()
        .filter_map(|line| line.strip_prefix("name = \""))
        .filter_map(|rest| rest.strip_suffix('"'))
        .filter(|name| *name != "lanyard-fuzz-harness")
        .collect();
    assert_eq!(bins, targets, "[[bin]] entries of fuzz/harness/Cargo.toml");

    for name in &targets {
        let path = harness.join("fuzz_targets").join(format!("{name}.rs"));
        let source =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            source.contains(&format!("lanyard_fuzz::{name}(data)")),
            "{} must call lanyard_fuzz::{name}",
            path.display()
        );
    }
    let n_files = std::fs::read_dir(harness.join("fuzz_targets"))
        .expect("fuzz_targets")
        .count();
    assert_eq!(n_files, targets.len(), "files in fuzz/harness/fuzz_targets");
}
