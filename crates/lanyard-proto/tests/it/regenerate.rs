//! Regenerates `src/gen/` from `proto/` with `protox` and `tonic-prost-build`
//! (no system `protoc`) and fails when the committed files differ.
//!
//! With `LANYARD_REGENERATE_PROTO=1` the test writes the fresh output into
//! `src/gen/` instead of comparing.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

const REGENERATE_VAR: &str = "LANYARD_REGENERATE_PROTO";
const REGENERATE_HINT: &str = "run `LANYARD_REGENERATE_PROTO=1 cargo test -p lanyard-proto --test it regenerate` and commit src/gen/";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn proto_root() -> PathBuf {
    crate_dir().join("../../proto")
}

fn committed_dir() -> PathBuf {
    crate_dir().join("src/gen")
}

/// Every `.proto` file under `dir`, sorted so generation order is stable.
fn proto_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = fs::read_dir(&current)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", current.display()));
        for entry in entries {
            let path = entry.expect("directory entry should be readable").path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .extension()
                .is_some_and(|extension| extension == "proto")
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Runs the code generator into `out_dir`. This is the one place the
/// generation settings live.
fn generate(out_dir: &Path) {
    let proto_root = proto_root()
        .canonicalize()
        .expect("proto/ should exist at the workspace root");
    let files = proto_files(&proto_root);
    assert!(
        !files.is_empty(),
        "no .proto files under {}",
        proto_root.display()
    );

    let file_descriptors = protox::compile(&files, [&proto_root])
        .unwrap_or_else(|error| panic!("protox failed to compile proto/: {error:?}"));

    // For gRPC server reflection; prost-build writes this only on its protoc path.
    fs::write(
        out_dir.join("descriptor.bin"),
        prost::Message::encode_to_vec(&file_descriptors),
    )
    .expect("write descriptor.bin");

    let mut config = tonic_prost_build::Config::new();
    // `prost::Name` impls give `Any` type URLs such as
    // `type.googleapis.com/spire.api.types.PermissionDeniedDetails`.
    config.enable_type_names();
    config.type_name_domain(["."], "type.googleapis.com");
    // Deterministic map order on the wire and in tests.
    config.btree_map(["."]);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .out_dir(out_dir)
        .compile_fds_with_config(file_descriptors, config)
        .expect("tonic-prost-build should generate code");
}

fn file_names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", dir.display()))
        .map(|entry| {
            entry
                .expect("directory entry should be readable")
                .file_name()
                .into_string()
                .expect("generated file names are UTF-8")
        })
        .collect()
}

#[test]
fn committed_generated_code_matches_proto_sources() {
    let fresh = tempfile::tempdir().expect("temporary directory");
    generate(fresh.path());
    let fresh_names = file_names(fresh.path());
    let committed = committed_dir();

    if std::env::var_os(REGENERATE_VAR).is_some_and(|value| value == "1") {
        fs::create_dir_all(&committed).expect("create src/gen");
        for stale in file_names(&committed).difference(&fresh_names) {
            fs::remove_file(committed.join(stale)).expect("remove stale generated file");
        }
        for name in &fresh_names {
            fs::copy(fresh.path().join(name), committed.join(name)).expect("write generated file");
        }
        return;
    }

    let committed_names = file_names(&committed);
    let mut problems = Vec::new();
    for missing in fresh_names.difference(&committed_names) {
        problems.push(format!("missing from src/gen: {missing}"));
    }
    for extra in committed_names.difference(&fresh_names) {
        problems.push(format!("not generated any more: src/gen/{extra}"));
    }
    for name in fresh_names.intersection(&committed_names) {
        let want = fs::read(fresh.path().join(name)).expect("read fresh file");
        let have = fs::read(committed.join(name)).expect("read committed file");
        if want != have {
            problems.push(format!("out of date: src/gen/{name}"));
        }
    }
    assert!(
        problems.is_empty(),
        "generated code is not in sync with proto/:\n  {}\n{REGENERATE_HINT}",
        problems.join("\n  ")
    );
}
