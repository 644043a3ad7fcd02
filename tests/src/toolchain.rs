//! Programs the interoperability tests build from the package registries: SPIRE's server and
//! agent and Kubernetes' API server and etcd (Go module proxy), and the client programs under
//! `tests/interop` that use go-spiffe, go-oidc, java-spiffe and Envoy's go-control-plane.
//!
//! Each build lands in its own directory under `<target>/interop/` with a stamp naming what it
//! was built from (the inputs' contents and the toolchain version). A later run whose stamp
//! matches reuses it; anything else rebuilds it from scratch. An exclusive lock on
//! `<name>.lock` beside it keeps two test processes from building the same thing at once.
//! The toolchains keep their own caches between runs: Go's module and build caches, Maven's
//! local repository.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Once, OnceLock};

use crate::{CliOutput, workspace_root};

/// The SPIRE release the interoperability tests run against.
pub const SPIRE_VERSION: &str = "v1.13.3";

/// `<target>/interop`: where built interoperability programs live.
pub fn interop_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        workspace_root().join(target)
    };
    target.join("interop")
}

/// `tests/interop/<relative>`.
pub fn interop_source(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("interop")
        .join(relative)
}

/// Returns `<target>/interop/<name>`, built by `build` unless a previous build from the same
/// `key` is there. `build` gets the empty directory and panics on failure (the stamp is written
/// only after it returns, so a failed build is retried next time).
pub fn cached_build(name: &str, key: &str, build: impl FnOnce(&Path)) -> PathBuf {
    let parent = interop_dir();
    fs::create_dir_all(&parent).unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
    let lock_path = parent.join(format!("{name}.lock"));
    let lock = fs::File::create(&lock_path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", lock_path.display()));
    lock.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", lock_path.display()));

    let dir = parent.join(name);
    let stamp = parent.join(format!("{name}.stamp"));
    if dir.is_dir() && fs::read_to_string(&stamp).is_ok_and(|built| built == key) {
        return dir;
    }
    match fs::remove_file(&stamp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing {}: {e}", stamp.display()),
    }
    match fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing the stale {}: {e}", dir.display()),
    }
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    build(&dir);
    fs::write(&stamp, key).unwrap_or_else(|e| panic!("writing {}: {e}", stamp.display()));
    dir
}

/// The contents of `files` under `dir`, joined, for a [`cached_build`] key.
pub fn key_of_files(dir: &Path, files: &[&str]) -> String {
    let mut key = String::new();
    for file in files {
        let path = dir.join(file);
        let contents =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        key.push_str(&format!("== {file}\n{contents}\n"));
    }
    key
}

/// `go version`, or a panic that says how to get Go.
pub fn go_version() -> String {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            let output = CliOutput::run(Command::new("go").arg("version"));
            assert!(
                output.success(),
                "the interoperability tests need the Go toolchain (`go` on PATH) and the Go \
                 module proxy: {output}"
            );
            output.stdout.trim().to_owned()
        })
        .clone()
}

/// `go build -o <out>/ <packages>` in the module at `module`, with the module's go.sum
/// enforced. Modules come from the Go module proxy into Go's module cache.
pub fn go_build(module: &Path, packages: &[&str], out: &Path) {
    let mut target = out.as_os_str().to_owned();
    target.push("/");
    let output = CliOutput::run(
        Command::new("go")
            .current_dir(module)
            .args(["build", "-mod=readonly", "-trimpath", "-o"])
            .arg(target)
            .args(packages)
            .env("CGO_ENABLED", "0"),
    );
    assert!(
        output.success(),
        "building {packages:?} in {} failed: {output}",
        module.display()
    );
}

/// Starts building SPIRE and Kubernetes in background threads, once per process, so that a
/// first build on a fresh machine overlaps with the tests that run before the ones that need
/// them. Each build is started only when tests that need it are selected (see
/// [`tests_selected`]) and not skipped; nothing starts when Go is missing (those tests then
/// say so themselves).
pub fn prefetch_builds() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let has_go = Command::new("go")
            .arg("version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !has_go {
            return;
        }
        let skipped = |var: &str| std::env::var_os(var).is_some_and(|value| value == "1");
        if !skipped(crate::spire::SKIP_VAR)
            && tests_selected(std::env::args().skip(1), SPIRE_TEST_NAMES)
        {
            // A failure here is reported again, with its output, by the first SPIRE test.
            let _ = std::thread::Builder::new()
                .name("spire-prefetch".to_owned())
                .spawn(|| std::panic::catch_unwind(spire));
        }
        if !skipped(crate::kube::SKIP_VAR)
            && tests_selected(std::env::args().skip(1), KUBERNETES_TEST_NAMES)
        {
            // Likewise, reported again by the first Kubernetes test.
            let _ = std::thread::Builder::new()
                .name("kubernetes-prefetch".to_owned())
                .spawn(|| std::panic::catch_unwind(kubernetes));
            let _ = std::thread::Builder::new()
                .name("controller-manager-prefetch".to_owned())
                .spawn(|| std::panic::catch_unwind(controller_manager));
        }
    });
}

/// What the names of the tests that need SPIRE's binaries contain.
pub const SPIRE_TEST_NAMES: &[&str] = &["spire"];

/// What the names of the tests that need Kubernetes' binaries contain.
pub const KUBERNETES_TEST_NAMES: &[&str] = &["kube", "k8s"];

/// Whether libtest's arguments select any test whose name contains one of `names`: no name
/// filter, or a filter that such a test name could contain.
fn tests_selected(args: impl Iterator<Item = String>, names: &[&str]) -> bool {
    const TAKES_VALUE: [&str; 6] = [
        "--skip",
        "--test-threads",
        "--format",
        "--color",
        "--logfile",
        "-Z",
    ];
    let mut filters = Vec::new();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        if TAKES_VALUE.contains(&arg.as_str()) {
            args.next();
        } else if !arg.starts_with('-') {
            filters.push(arg);
        }
    }
    filters.is_empty()
        || filters.iter().any(|filter| {
            names
                .iter()
                .any(|name| filter.contains(name) || name.contains(filter.as_str()))
        })
}

/// SPIRE's own binaries, built from the Go module proxy.
#[derive(Debug)]
pub struct Spire {
    /// `spire-server`.
    pub server: PathBuf,
    /// `spire-agent`.
    pub agent: PathBuf,
}

/// `spire-server` and `spire-agent` at [`SPIRE_VERSION`], built once per machine from the
/// module in `tests/interop/spire` (whose go.mod pins them as tools) and reused while that
/// module and the Go version stay the same. The first build downloads SPIRE's dependencies and
/// compiles them, which takes minutes; later ones take seconds.
pub fn spire() -> &'static Spire {
    static SPIRE: OnceLock<Spire> = OnceLock::new();
    SPIRE.get_or_init(|| {
        let module = interop_source("spire");
        let key = format!(
            "{}\ncgo\n{}",
            go_version(),
            key_of_files(&module, &["go.mod", "go.sum"])
        );
        let dir = cached_build(&format!("spire-{SPIRE_VERSION}"), &key, |out| {
            go_build_with_cgo(
                &module,
                &[
                    "github.com/spiffe/spire/cmd/spire-server",
                    "github.com/spiffe/spire/cmd/spire-agent",
                ],
                out,
            );
        });
        Spire {
            server: dir.join("spire-server"),
            agent: dir.join("spire-agent"),
        }
    })
}

/// `go build -o <out>/ <packages>` in the module at `module`, like [`go_build`] but with cgo
/// on: SPIRE's SQLite datastore is the cgo `go-sqlite3` driver, and a server built without cgo
/// refuses to start with it. Needs a C compiler (`cc`, or `CC`).
pub fn go_build_with_cgo(module: &Path, packages: &[&str], out: &Path) {
    let mut target = out.as_os_str().to_owned();
    target.push("/");
    let output = CliOutput::run(
        Command::new("go")
            .current_dir(module)
            .args(["build", "-mod=readonly", "-o"])
            .arg(target)
            .args(packages)
            .env("CGO_ENABLED", "1"),
    );
    assert!(
        output.success(),
        "building {packages:?} in {} with cgo failed (it needs a C compiler, `cc` or $CC): \
         {output}",
        module.display()
    );
}

/// The Kubernetes release whose API server the Kubernetes tests run against.
pub const KUBERNETES_VERSION: &str = "v1.36.3";

/// The etcd release that stores that API server's objects.
pub const ETCD_VERSION: &str = "v3.6.8";

/// Where `kube-apiserver` reads its version from; the `-X` flags set it, or `/version` would
/// report `v0.0.0-master`.
const KUBERNETES_VERSION_PACKAGE: &str = "k8s.io/component-base/version";

/// Kubernetes' own binaries, built from the Go module proxy.
#[derive(Debug)]
pub struct Kubernetes {
    /// `kube-apiserver`.
    pub apiserver: PathBuf,
    /// `etcd`.
    pub etcd: PathBuf,
}

/// `kube-apiserver` at [`KUBERNETES_VERSION`] and `etcd` at [`ETCD_VERSION`], built once per
/// machine from the module in `tests/interop/kube` (whose go.mod pins them as tools, with
/// every staging module of `k8s.io/kubernetes` replaced by its published version) and reused
/// while that module, the build flags and the Go version stay the same. The first build
/// downloads about 100 MB of modules and compiles the API server, which takes about twelve
/// minutes on two cores; later ones take seconds.
pub fn kubernetes() -> &'static Kubernetes {
    static KUBERNETES: OnceLock<Kubernetes> = OnceLock::new();
    KUBERNETES.get_or_init(|| {
        let module = interop_source("kube");
        let (major, minor) = KUBERNETES_VERSION
            .trim_start_matches('v')
            .split_once('.')
            .and_then(|(major, rest)| Some((major, rest.split_once('.')?.0)))
            .expect("KUBERNETES_VERSION is vMAJOR.MINOR.PATCH");
        let apiserver_ldflags = format!(
            "-s -w -X {KUBERNETES_VERSION_PACKAGE}.gitVersion={KUBERNETES_VERSION} \
             -X {KUBERNETES_VERSION_PACKAGE}.gitMajor={major} \
             -X {KUBERNETES_VERSION_PACKAGE}.gitMinor={minor}"
        );
        let etcd_ldflags = "-s -w";
        let key = format!(
            "{}\nkube-apiserver {apiserver_ldflags}\netcd {etcd_ldflags}\n{}",
            go_version(),
            key_of_files(&module, &["go.mod", "go.sum"])
        );
        let name = format!("kubernetes-{KUBERNETES_VERSION}");
        let dir = cached_build(&name, &key, |out| {
            let started = std::time::Instant::now();
            let _ = writeln!(
                std::io::stderr(),
                "lanyard-e2e: building kube-apiserver {KUBERNETES_VERSION} and etcd \
                 {ETCD_VERSION} from the Go module proxy into {} (the first time on a machine \
                 takes about twelve minutes on two cores)",
                out.display()
            );
            go_build_program(
                &module,
                "k8s.io/kubernetes/cmd/kube-apiserver",
                &apiserver_ldflags,
                &out.join("kube-apiserver"),
            );
            go_build_program(
                &module,
                "go.etcd.io/etcd/server/v3",
                etcd_ldflags,
                &out.join("etcd"),
            );
            let _ = writeln!(
                std::io::stderr(),
                "lanyard-e2e: built kube-apiserver and etcd in {:.0?}",
                started.elapsed()
            );
        });
        Kubernetes {
            apiserver: dir.join("kube-apiserver"),
            etcd: dir.join("etcd"),
        }
    })
}

/// The spire-controller-manager release run against a Lanyard server.
pub const CONTROLLER_MANAGER_VERSION: &str = "v0.6.2";

/// The cached-build name of spire-controller-manager (also `tests/build.rs`'s).
pub const CONTROLLER_MANAGER_BUILD: &str = "spire-controller-manager-v0.6.2";

/// SPIRE's controller manager, built from the Go module proxy.
#[derive(Debug)]
pub struct ControllerManager {
    /// The `spire-controller-manager` program.
    pub binary: PathBuf,
    /// Its CustomResourceDefinitions (`ClusterSPIFFEID`, `ClusterStaticEntry`,
    /// `ClusterFederatedTrustDomain`, `ControllerManagerConfig`), copied from its module.
    pub crds: Vec<PathBuf>,
}

/// `spire-controller-manager` at [`CONTROLLER_MANAGER_VERSION`] and its CRDs, built once per
/// machine from the module in `tests/interop/controller-manager` (whose go.mod pins it as a
/// tool) and reused while that module and the Go version stay the same. The CRDs come from
/// the same module in Go's module cache (`config/crd/bases`). About a minute on two cores.
pub fn controller_manager() -> &'static ControllerManager {
    static CONTROLLER: OnceLock<ControllerManager> = OnceLock::new();
    CONTROLLER.get_or_init(|| {
        const PACKAGE: &str = "github.com/spiffe/spire-controller-manager";
        let module = interop_source("controller-manager");
        let key = format!(
            "{}\n{}",
            go_version(),
            key_of_files(&module, &["go.mod", "go.sum"])
        );
        let dir = cached_build(CONTROLLER_MANAGER_BUILD, &key, |out| {
            go_build_program(
                &module,
                &format!("{PACKAGE}/cmd"),
                "-s -w",
                &out.join("spire-controller-manager"),
            );
            let listed = CliOutput::run(Command::new("go").current_dir(&module).args([
                "list",
                "-mod=readonly",
                "-m",
                "-f",
                "{{.Dir}}",
                PACKAGE,
            ]));
            assert!(listed.success(), "locating {PACKAGE}: {listed}");
            let crds = Path::new(listed.stdout.trim()).join("config/crd/bases");
            let into = out.join("crds");
            fs::create_dir_all(&into)
                .unwrap_or_else(|e| panic!("creating {}: {e}", into.display()));
            let entries =
                fs::read_dir(&crds).unwrap_or_else(|e| panic!("reading {}: {e}", crds.display()));
            for entry in entries {
                let path = entry.expect("reading a CRD directory entry").path();
                if path.extension().is_some_and(|ext| ext == "yaml") {
                    copy_file(&path, &into.join(path.file_name().expect("a file name")));
                }
            }
        });
        let crd_dir = dir.join("crds");
        let mut crds: Vec<PathBuf> = fs::read_dir(&crd_dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", crd_dir.display()))
            .map(|entry| entry.expect("reading a CRD").path())
            .collect();
        crds.sort();
        assert!(
            crds.len() >= 3,
            "expected the controller manager's CRDs in {}",
            crd_dir.display()
        );
        ControllerManager {
            binary: dir.join("spire-controller-manager"),
            crds,
        }
    })
}

/// `go build -ldflags=<ldflags> -o <output> <package>` in the module at `module`, cgo off,
/// with the module's go.sum enforced: one program to a file of the caller's naming (etcd's
/// main package is `go.etcd.io/etcd/server/v3`, which `go build` would name `server`).
pub fn go_build_program(module: &Path, package: &str, ldflags: &str, output: &Path) {
    let output_result = CliOutput::run(
        Command::new("go")
            .current_dir(module)
            .args(["build", "-mod=readonly", "-trimpath"])
            .arg(format!("-ldflags={ldflags}"))
            .arg("-o")
            .arg(output)
            .arg(package)
            .env("CGO_ENABLED", "0"),
    );
    assert!(
        output_result.success(),
        "building {package} in {} failed: {output_result}",
        module.display()
    );
}

/// Set to `1` to skip the go-spiffe interoperability tests (CI never does).
pub const SKIP_GO_VAR: &str = "LANYARD_E2E_SKIP_GO";

/// Set to `1` to skip the java-spiffe interoperability tests (CI never does).
pub const SKIP_JAVA_VAR: &str = "LANYARD_E2E_SKIP_JAVA";

/// The go-spiffe client program (`tests/interop/go-spiffe`, see its `main.go`), built into
/// `<target>/interop/go-spiffe` once per machine and reused while its go.mod, go.sum, source
/// and the Go version stay the same. Panics, saying how to get Go, when `go` is missing.
pub fn go_spiffe_client() -> &'static Path {
    static CLIENT: OnceLock<PathBuf> = OnceLock::new();
    CLIENT.get_or_init(|| {
        require_tool(
            "go",
            &["version"],
            &format!(
                "the go-spiffe tests need the Go toolchain, 1.24 or newer (go.dev/dl, or \
                 your distribution's golang package), on PATH, and the Go module proxy; \
                 set {SKIP_GO_VAR}=1 to skip them"
            ),
        );
        let module = interop_source("go-spiffe");
        let key = format!(
            "{}\n{}",
            go_version(),
            key_of_files(&module, &["go.mod", "go.sum", "main.go"])
        );
        cached_build("go-spiffe", &key, |out| go_build(&module, &["."], out)).join("go-spiffe")
    })
}

/// The OIDC relying party (`tests/interop/oidc`, see its `main.go`: go-oidc v3 verifying one
/// token given only the issuer), built into `<target>/interop/oidc` once per machine and
/// reused while its go.mod, go.sum, source and the Go version stay the same. Panics, saying
/// how to get Go, when `go` is missing.
pub fn oidc_verifier() -> &'static Path {
    static VERIFIER: OnceLock<PathBuf> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        require_tool(
            "go",
            &["version"],
            &format!(
                "the go-oidc test needs the Go toolchain, 1.24 or newer (go.dev/dl, or your \
                 distribution's golang package), on PATH, and the Go module proxy; set \
                 {SKIP_GO_VAR}=1 to skip it"
            ),
        );
        let module = interop_source("oidc");
        let key = format!(
            "{}\n{}",
            go_version(),
            key_of_files(&module, &["go.mod", "go.sum", "main.go"])
        );
        cached_build("oidc", &key, |out| go_build(&module, &["."], out)).join("oidc")
    })
}

/// The cached-build name of the SDS client (also `tests/build.rs`'s).
pub const SDS_BUILD: &str = "sds";

/// The Envoy SDS v3 client (`tests/interop/sds`, see its `main.go`: go-control-plane's
/// SecretDiscoveryService client, driven by [`crate::sds`]), built into `<target>/interop/sds`
/// once per machine and reused while its go.mod, go.sum, source and the Go version stay the
/// same. `tests/build.rs` compiles its dependencies in the background. Panics, saying how to
/// get Go, when `go` is missing.
pub fn sds_client() -> &'static Path {
    static CLIENT: OnceLock<PathBuf> = OnceLock::new();
    CLIENT.get_or_init(|| {
        require_tool(
            "go",
            &["version"],
            &format!(
                "the SDS tests need the Go toolchain, 1.26 or newer (go.dev/dl, or your \
                 distribution's golang package), on PATH, and the Go module proxy; set \
                 {SKIP_GO_VAR}=1 to skip them"
            ),
        );
        let module = interop_source("sds");
        let key = format!(
            "{}\n{}",
            go_version(),
            key_of_files(&module, &["go.mod", "go.sum", "main.go"])
        );
        cached_build(SDS_BUILD, &key, |out| go_build(&module, &["."], out)).join("sds")
    })
}

/// The java-spiffe client program (`tests/interop/java-spiffe`), compiled by Maven.
#[derive(Debug)]
pub struct JavaClient {
    /// The class path: the compiled program and every runtime dependency.
    pub class_path: String,
    /// The class whose `main` runs.
    pub main_class: &'static str,
}

impl JavaClient {
    /// `java -cp <class path> <main class>`: add the arguments and run it.
    pub fn command(&self) -> Command {
        let mut command = Command::new("java");
        command
            .arg("-cp")
            .arg(&self.class_path)
            .arg(self.main_class)
            .env_remove("JAVA_TOOL_OPTIONS")
            .env_remove("CLASSPATH");
        command
    }
}

/// The java-spiffe client program, built with Maven into `<target>/interop/java-spiffe` once
/// per machine (dependencies from Maven Central into the local repository, `~/.m2`) and reused
/// while its pom.xml, its source and the `java` and `mvn` versions stay the same. Panics,
/// saying how to get them, when `java` or `mvn` is missing.
pub fn java_spiffe_client() -> &'static JavaClient {
    static CLIENT: OnceLock<JavaClient> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let hint = format!(
            "the java-spiffe tests need a JDK, 17 or newer, and Maven 3.8 or newer on PATH \
             (Debian/Ubuntu: `apt-get install openjdk-17-jdk-headless maven`) and Maven \
             Central; set {SKIP_JAVA_VAR}=1 to skip them"
        );
        // `java -version` prints on stderr; only Maven's first line names its version.
        let java = require_tool("java", &["-version"], &hint);
        let maven = require_tool("mvn", &["-B", "-v"], &hint);
        let project = interop_source("java-spiffe");
        let key = format!(
            "{}{}\n{}\n{}",
            java.stdout,
            java.stderr,
            maven.stdout.lines().next().unwrap_or_default(),
            key_of_files(&project, &["pom.xml", JAVA_SOURCE])
        );
        let dir = cached_build("java-spiffe", &key, |out| {
            copy_file(&project.join("pom.xml"), &out.join("pom.xml"));
            copy_file(&project.join(JAVA_SOURCE), &out.join(JAVA_SOURCE));
            let output = CliOutput::run(
                Command::new("mvn")
                    .current_dir(out)
                    .args([
                        "-B",
                        "-q",
                        "compile",
                        "dependency:copy-dependencies",
                        "-DincludeScope=runtime",
                    ])
                    .env_remove("MAVEN_OPTS"),
            );
            assert!(
                output.success(),
                "building {} with Maven failed: {output}\n{hint}",
                project.display()
            );
        });
        let target = dir.join("target");
        JavaClient {
            class_path: format!(
                "{}:{}",
                target.join("classes").display(),
                target.join("dependency").join("*").display()
            ),
            main_class: "lanyard.interop.JavaSpiffeClient",
        }
    })
}

/// The Java program, relative to `tests/interop/java-spiffe`.
const JAVA_SOURCE: &str = "src/main/java/lanyard/interop/JavaSpiffeClient.java";

/// Runs `program args` and returns what it printed; panics with `hint` if it cannot run or
/// fails.
fn require_tool(program: &str, args: &[&str], hint: &str) -> CliOutput {
    let mut command = Command::new(program);
    command.args(args);
    let output = match command.stdin(std::process::Stdio::null()).output() {
        Ok(output) => output,
        Err(e) => panic!("cannot run `{program}` ({e}): {hint}"),
    };
    let output = CliOutput {
        command: format!("{program} {}", args.join(" ")),
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(output.success(), "{output}\n{hint}");
    output
}

fn copy_file(from: &Path, to: &Path) {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
    }
    fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}

#[cfg(test)]
mod tests {
    use super::{KUBERNETES_TEST_NAMES, SPIRE_TEST_NAMES, tests_selected};

    fn selected(args: &[&str]) -> bool {
        tests_selected(args.iter().map(|arg| (*arg).to_owned()), SPIRE_TEST_NAMES)
    }

    fn kubernetes_selected(args: &[&str]) -> bool {
        tests_selected(
            args.iter().map(|arg| (*arg).to_owned()),
            KUBERNETES_TEST_NAMES,
        )
    }

    #[test]
    fn the_build_script_prefetches_under_the_harness_s_own_lock_names() {
        let prefetched: Vec<&str> = env!("LANYARD_E2E_PREFETCHED").split(',').collect();
        assert_eq!(
            prefetched,
            [
                format!("spire-{}", super::SPIRE_VERSION),
                format!("kubernetes-{}", super::KUBERNETES_VERSION),
                format!(
                    "spire-controller-manager-{}",
                    super::CONTROLLER_MANAGER_VERSION
                ),
                super::SDS_BUILD.to_owned(),
            ]
        );
        assert_eq!(
            super::CONTROLLER_MANAGER_BUILD,
            format!(
                "spire-controller-manager-{}",
                super::CONTROLLER_MANAGER_VERSION
            )
        );
    }

    #[test]
    fn filters_decide_whether_spire_is_prefetched() {
        assert!(selected(&[]));
        assert!(selected(&["--test-threads", "2"]));
        assert!(selected(&["spire"]));
        assert!(selected(&["spire_agent::spire_agent_attests"]));
        assert!(selected(&["py_spiffe", "spire_cli"]));
        assert!(!selected(&["py_spiffe"]));
        assert!(!selected(&["--skip", "spire", "rotation"]));
        assert!(!selected(&[
            "--exact",
            "mtls::the_mtls_example_keeps_handshaking_across_svid_rotations"
        ]));
    }

    #[test]
    fn filters_decide_whether_kubernetes_is_prefetched() {
        assert!(kubernetes_selected(&[]));
        assert!(kubernetes_selected(&["kube"]));
        assert!(kubernetes_selected(&["k8s_psat"]));
        assert!(kubernetes_selected(&["ku"]));
        assert!(!kubernetes_selected(&["spire_agent"]));
        assert!(!kubernetes_selected(&["--skip", "kube", "rotation"]));
    }
}
