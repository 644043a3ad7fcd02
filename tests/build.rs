//! Starts the slow Go builds of the interoperability tests — SPIRE (minutes),
//! kube-apiserver with etcd (about twelve minutes on two cores), spire-controller-manager
//! (a minute) and the SDS client on Envoy's go-control-plane — in the background while
//! Cargo is still compiling, so that on a fresh machine they overlap with the Rust build
//! instead of with the tests. Each runs as `flock <lock> nice go build …` on the lock of the
//! harness's cached build (`src/toolchain.rs`, `cached_build`): it only fills Go's build
//! cache, and a test that needs the binaries waits on the lock and then links them in seconds.
//! Nothing starts when Go is missing, when the binaries are already cached, or when the tests
//! that need them are skipped (`LANYARD_E2E_SKIP_SPIRE`, `LANYARD_E2E_SKIP_KUBERNETES`,
//! `LANYARD_E2E_SKIP_GO`, or `LANYARD_E2E_NO_PREFETCH=1` for none). Output goes to
//! `<target>/interop/<name>.prefetch.log`.
#![allow(clippy::print_stdout)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The harness's cached-build names; `src/toolchain.rs` checks that they match its versions.
const SPIRE: &str = "spire-v1.13.3";
const KUBERNETES: &str = "kubernetes-v1.36.3";
const CONTROLLER_MANAGER: &str = "spire-controller-manager-v0.6.2";
const SDS: &str = "sds";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for file in [
        "spire/go.mod",
        "spire/go.sum",
        "kube/go.mod",
        "kube/go.sum",
        "controller-manager/go.mod",
        "controller-manager/go.sum",
        "sds/go.mod",
        "sds/go.sum",
    ] {
        println!("cargo::rerun-if-changed=interop/{file}");
    }
    for var in [
        "LANYARD_E2E_NO_PREFETCH",
        "LANYARD_E2E_SKIP_SPIRE",
        "LANYARD_E2E_SKIP_KUBERNETES",
        "LANYARD_E2E_SKIP_GO",
        "CARGO_TARGET_DIR",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!(
        "cargo::rustc-env=LANYARD_E2E_PREFETCHED={SPIRE},{KUBERNETES},{CONTROLLER_MANAGER},{SDS}"
    );

    let set = |var: &str| std::env::var_os(var).is_some_and(|value| value == "1");
    if set("LANYARD_E2E_NO_PREFETCH") || !runs("go", &["version"]) || !runs("flock", &["-V"]) {
        return;
    }
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target"));
    let target = if target.is_absolute() {
        target
    } else {
        manifest.join("..").join(target)
    };
    let interop = target.join("interop");
    if !set("LANYARD_E2E_SKIP_SPIRE") {
        prefetch(
            &interop,
            SPIRE,
            &manifest.join("interop/spire"),
            // As `go_build_with_cgo` builds them.
            &["-mod=readonly"],
            "1",
            &[
                "github.com/spiffe/spire/cmd/spire-server",
                "github.com/spiffe/spire/cmd/spire-agent",
            ],
        );
    }
    if !set("LANYARD_E2E_SKIP_KUBERNETES") {
        prefetch(
            &interop,
            KUBERNETES,
            &manifest.join("interop/kube"),
            // As `go_build_program` builds them.
            &["-mod=readonly", "-trimpath"],
            "0",
            &[
                "k8s.io/kubernetes/cmd/kube-apiserver",
                "go.etcd.io/etcd/server/v3",
            ],
        );
        prefetch(
            &interop,
            CONTROLLER_MANAGER,
            &manifest.join("interop/controller-manager"),
            // As `go_build_program` builds it.
            &["-mod=readonly", "-trimpath"],
            "0",
            &["github.com/spiffe/spire-controller-manager/cmd"],
        );
    }
    if !set("LANYARD_E2E_SKIP_GO") {
        prefetch(
            &interop,
            SDS,
            &manifest.join("interop/sds"),
            // As `go_build` builds it.
            &["-mod=readonly", "-trimpath"],
            "0",
            &["."],
        );
    }
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Compiles `packages` of the Go module at `module` into Go's build cache (whatever is linked
/// goes to /dev/null), in the background, holding the build's lock.
fn prefetch(
    interop: &Path,
    name: &str,
    module: &Path,
    flags: &[&str],
    cgo: &str,
    packages: &[&str],
) {
    if interop.join(format!("{name}.stamp")).exists() || std::fs::create_dir_all(interop).is_err() {
        return;
    }
    let Ok(log) = File::create(interop.join(format!("{name}.prefetch.log"))) else {
        return;
    };
    let Ok(log_too) = log.try_clone() else {
        return;
    };
    // Not waited for: Cargo goes on while it runs, and its output is in the log file, so no
    // pipe of Cargo's stays open.
    let _ = Command::new("flock")
        .arg(interop.join(format!("{name}.lock")))
        .args(["nice", "-n", "10", "go", "build"])
        // One main package would otherwise be linked into the module's directory.
        .args(["-o", "/dev/null"])
        .args(flags)
        .args(packages)
        .current_dir(module)
        .env("CGO_ENABLED", cgo)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_too)
        .spawn();
}
