//! py-spiffe, the Python SPIFFE library, as a workload of a real agent: `tests/python/fetch.py`
//! fetches an X.509-SVID, the X.509 bundles and a JWT-SVID, and validates the JWT through the
//! Workload API and offline; the test checks what it saw against the server.
//!
//! py-spiffe runs in a virtual environment that the test creates under the target directory on
//! first use (`python3 -m venv`, `pip install -r tests/python/requirements.txt`, from PyPI) and
//! reuses while the requirements are unchanged. Without python3 the test fails and says how to
//! install it, unless `LANYARD_E2E_SKIP_PYTHON=1`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use lanyard_e2e::{CliOutput, Cluster, assert_client_x509, current_uid, pem_certificates};

/// Set to `1` to skip the Python interoperability tests (CI never does).
const SKIP_VAR: &str = "LANYARD_E2E_SKIP_PYTHON";
const AUDIENCE: &str = "e2e-python";

#[test]
fn py_spiffe_fetches_svids_and_validates_a_jwt() {
    let Some(python) = py_spiffe_python() else {
        return;
    };
    let cluster = Cluster::start();
    let id = cluster.register_uid("/e2e/python", current_uid(), &[]);
    cluster.agent.wait_for_svids(None, &[&id]);

    let mut command = Command::new(python);
    command
        .arg(python_dir().join("fetch.py"))
        .arg(AUDIENCE)
        .env("SPIFFE_ENDPOINT_SOCKET", cluster.agent.endpoint())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("PYTHONPATH");
    let output = CliOutput::run(&mut command);
    assert!(
        output.success(),
        "py-spiffe failed against the agent{}: {output}\n{}",
        if output.stderr.contains("RST_STREAM") {
            " (an RST_STREAM with error code 1 is the agent's HTTP/2 layer refusing the request; \
             grpc-core sends the percent-encoded socket path as `:authority` over Unix sockets)"
        } else {
            ""
        },
        cluster.logs()
    );
    let seen = output.json();

    // X.509: our identity, a chain that verifies against the server's authorities, and
    // exactly those authorities as the trust domain's bundle.
    let chain = pem_certificates(seen["x509_chain_pem"].as_str().unwrap_or_default());
    assert_eq!(seen["x509_chain_length"], chain.len(), "{seen}");
    assert_client_x509(&cluster.server, &seen, &id, "py-spiffe");

    // JWT: minted for us and the audience, valid through the agent and offline, and refused
    // by the agent for another audience.
    assert_eq!(seen["jwt_spiffe_id"], id.as_str(), "{seen}");
    assert_eq!(
        seen["jwt_audience"],
        serde_json::json!([AUDIENCE]),
        "{seen}"
    );
    assert_eq!(seen["validated_spiffe_id"], id.as_str(), "{seen}");
    assert_eq!(seen["offline_validated_spiffe_id"], id.as_str(), "{seen}");
    assert_eq!(seen["wrong_audience_rejected"], true, "{seen}");
}

/// `tests/python`.
pub(crate) fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

static PYTHON: OnceLock<Option<PathBuf>> = OnceLock::new();

/// The virtual environment's interpreter, with py-spiffe importable; `None` when skipped.
/// Made once per test process; a panic here fails every caller with the same message.
pub(crate) fn py_spiffe_python() -> Option<&'static Path> {
    PYTHON
        .get_or_init(|| {
            if std::env::var_os(SKIP_VAR).is_some_and(|value| value == "1") {
                skip_notice();
                None
            } else {
                Some(prepare_venv())
            }
        })
        .as_deref()
}

#[allow(clippy::print_stderr)]
fn skip_notice() {
    eprintln!("lanyard-e2e: {SKIP_VAR}=1, skipping the py-spiffe test");
}

fn install_hint() -> String {
    format!(
        "the py-spiffe test needs Python 3 with venv and pip (Debian/Ubuntu: \
         `apt-get install python3 python3-venv python3-pip`) and access to PyPI; \
         set {SKIP_VAR}=1 to skip it"
    )
}

/// Creates `<target>/tmp/e2e-venv` with the requirements installed, or reuses it when it holds
/// exactly these requirements and py-spiffe imports. An exclusive lock on a file beside it
/// keeps two test processes from building it at once.
fn prepare_venv() -> PathBuf {
    let requirements_path = python_dir().join("requirements.txt");
    let requirements = fs::read_to_string(&requirements_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", requirements_path.display()));
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(parent).unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
    let venv = parent.join("e2e-venv");
    let python = venv.join("bin").join("python");
    let stamp = venv.join("lanyard-requirements.txt");

    let lock_path = parent.join("e2e-venv.lock");
    let lock = fs::File::create(&lock_path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", lock_path.display()));
    lock.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", lock_path.display()));

    if fs::read_to_string(&stamp).is_ok_and(|installed| installed == requirements)
        && python.is_file()
        && imports_py_spiffe(&python).success()
    {
        return python;
    }

    let version = Command::new("python3")
        .arg("--version")
        .stdin(Stdio::null())
        .output();
    match version {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "`python3 --version` failed ({}): {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            install_hint()
        ),
        Err(e) => panic!("cannot run python3 ({e}): {}", install_hint()),
    }
    match fs::remove_dir_all(&venv) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing the stale {}: {e}", venv.display()),
    }
    let created = CliOutput::run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    assert!(
        created.success(),
        "cannot create a virtual environment: {created}\n{}",
        install_hint()
    );
    let installed = CliOutput::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--requirement")
            .arg(&requirements_path)
            .env("PIP_NO_INPUT", "1"),
    );
    assert!(
        installed.success(),
        "pip could not install {}: {installed}\n{}",
        requirements_path.display(),
        install_hint()
    );
    let imported = imports_py_spiffe(&python);
    assert!(
        imported.success(),
        "py-spiffe does not import after installing it: {imported}"
    );
    fs::write(&stamp, &requirements).unwrap_or_else(|e| panic!("writing {}: {e}", stamp.display()));
    python
}

fn imports_py_spiffe(python: &Path) -> CliOutput {
    CliOutput::run(
        Command::new(python)
            .args(["-c", "import spiffe"])
            .env_remove("PYTHONPATH"),
    )
}
