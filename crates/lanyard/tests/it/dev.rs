//! `lanyard dev` as a child process: the printed tour works as printed, the workload
//! commands reach its agent, and Ctrl-C cleans up.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn lanyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(args)
        .output()
        .expect("lanyard runs")
}

/// A running `lanyard dev` and what its banner printed.
pub(crate) struct Dev {
    child: std::process::Child,
    socket: String,
    data_dir: String,
    export: Option<String>,
    admin: String,
    agent_id: String,
    dir: tempfile::TempDir,
}

impl Dev {
    /// Starts `lanyard dev` on a temporary Workload API socket and reads its banner.
    pub(crate) fn start() -> Self {
        let sockets = tempfile::tempdir().unwrap();
        let socket = sockets.path().join("workload.sock");
        let socket_str = socket.to_str().unwrap().to_owned();
        let mut child = Command::new(env!("CARGO_BIN_EXE_lanyard"))
            .args(["dev", "--socket", &socket_str])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut data_dir, mut export, mut admin, mut agent_id) = (None, None, None, None);
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.trim().strip_prefix("data") {
                data_dir = rest.split_whitespace().next().map(str::to_owned);
            }
            if let Some(rest) = line.trim().strip_prefix("agent ") {
                agent_id = Some(rest.trim().to_owned());
            }
            if line.contains("export SPIFFE_ENDPOINT_SOCKET=") {
                export = Some(line.trim().to_owned());
            }
            if let Some(rest) = line.trim().strip_prefix("export LANYARD_SERVER_SOCKET=") {
                admin = Some(rest.to_owned());
            }
            if line.contains("Press Ctrl-C") {
                break;
            }
        }
        let dev = Self {
            child,
            socket: socket_str,
            data_dir: data_dir.expect("the banner names the data directory"),
            export,
            admin: admin.expect("the banner names the admin socket"),
            agent_id: agent_id.expect("the banner names the agent"),
            dir: sockets,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lanyard(&["agent", "healthcheck", "--socket", &dev.socket])
            .status
            .success()
        {
            assert!(Instant::now() < deadline, "agent never became healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
        dev
    }

    /// Runs `lanyard args…` with the two exports the banner prints.
    pub(crate) fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_lanyard"))
            .args(args)
            .env("SPIFFE_ENDPOINT_SOCKET", format!("unix://{}", self.socket))
            .env("LANYARD_SERVER_SOCKET", &self.admin)
            .output()
            .unwrap()
    }

    /// The SPIFFE IDs `lanyard fetch x509` gets now.
    pub(crate) fn served_ids(&self) -> Vec<String> {
        let out = self.run(&["fetch", "x509", "--output", "json"]);
        if !out.status.success() {
            return Vec::new();
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["svids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|svid| svid["spiffe_id"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn dev_serves_the_current_user_and_cleans_up_on_ctrl_c() {
    let mut dev = Dev::start();
    let socket_str = dev.socket.clone();
    let data_dir = dev.data_dir.clone();
    let admin = dev.admin.clone();
    assert_eq!(
        dev.export.as_deref(),
        Some(format!("export SPIFFE_ENDPOINT_SOCKET=unix://{socket_str}").as_str())
    );

    // The user's identity, through SPIFFE_ENDPOINT_SOCKET as the banner says.
    let uri = format!("unix://{socket_str}");
    let fetch = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lanyard"))
            .args(args)
            .env("SPIFFE_ENDPOINT_SOCKET", &uri)
            .output()
            .unwrap()
    };
    let mut svid = fetch(&["fetch", "x509", "--output", "json"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !svid.status.success() {
        assert!(Instant::now() < deadline, "no SVID: {svid:?}");
        std::thread::sleep(Duration::from_millis(200));
        svid = fetch(&["fetch", "x509", "--output", "json"]);
    }
    let json: serde_json::Value = serde_json::from_slice(&svid.stdout).unwrap();
    let id = json["svids"][0]["spiffe_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("spiffe://example.org/user/"), "{id}");

    let out_dir = dev.dir.path().join("out");
    let written = fetch(&["fetch", "x509", "--write", out_dir.to_str().unwrap()]);
    assert!(written.status.success(), "{written:?}");
    use std::os::unix::fs::PermissionsExt as _;
    let key_mode = std::fs::metadata(out_dir.join("svid.0.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let chain = std::fs::read_to_string(out_dir.join("svid.0.pem")).unwrap();
    assert!(chain.contains("BEGIN CERTIFICATE"));

    let jwt = fetch(&["fetch", "jwt", "--audience", "tour"]);
    assert!(jwt.status.success(), "{jwt:?}");
    let token = String::from_utf8_lossy(&jwt.stdout)
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let valid = fetch(&["validate", "jwt", "--audience", "tour", "--svid", &token]);
    assert!(valid.status.success(), "{valid:?}");
    assert!(String::from_utf8_lossy(&valid.stdout).contains(&id));
    let invalid = fetch(&["validate", "jwt", "--audience", "other", "--svid", &token]);
    assert!(!invalid.status.success());

    // The printed admin socket reaches the dev server; the user's entry carries governance.
    let entries = Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(["entry", "show", "--output", "json"])
        .env("LANYARD_SERVER_SOCKET", &admin)
        .output()
        .unwrap();
    assert!(entries.status.success(), "{entries:?}");
    let text = String::from_utf8_lossy(&entries.stdout);
    assert!(text.contains("lanyard dev"), "{text}");

    // Dev runs on the shipped baseline, and the user's entry passes it.
    let policy = std::path::Path::new(&data_dir).join("policy.rego");
    let check = Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(["policy", "check", "--policy"])
        .arg(&policy)
        .env("LANYARD_SERVER_SOCKET", &admin)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("1 entry checked, 0 would fail"),
        "{check:?}"
    );
    let baseline = std::fs::read_to_string(&policy).unwrap();
    assert!(baseline.contains("owner-required"), "{baseline}");

    // The banner's governance commands work as printed.
    let exceptions = dev.run(&["exception", "list", "--all"]);
    assert!(exceptions.status.success(), "{exceptions:?}");
    let usage = dev.run(&["report", "usage", &id]);
    assert!(usage.status.success(), "{usage:?}");
    assert!(
        String::from_utf8_lossy(&usage.stdout).contains(&id),
        "{usage:?}"
    );

    // Ctrl-C stops both and removes the temporary data directory.
    let status = Command::new("kill")
        .args(["-INT", &dev.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = dev.child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "dev did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit:?}");
    assert!(
        !std::path::Path::new(&data_dir).exists(),
        "{data_dir} was not removed"
    );
}

/// The README's "Governance" walk-through, step by step, with a 20-second exception instead
/// of 2 minutes (long enough for the agent, syncing every 5 s, to serve it first).
#[test]
fn the_governance_walkthrough_works_with_dev() {
    let dev = Dev::start();
    let uid = text(&Command::new("id").arg("-u").output().unwrap().stdout)
        .trim()
        .to_owned();
    let expires = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 7 * 86400)
        .to_string();
    let selector = format!("unix:uid:{uid}");
    let create = [
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/batch",
        "--parent-id",
        &dev.agent_id,
        "--selector",
        &selector,
        "--owner",
        "tester",
        "--reason",
        "nightly batch",
        "--expires-at",
        &expires,
        "--x509-svid-ttl",
        "48h",
    ];

    // 1. Refused, naming the rule and the fix.
    let refused = dev.run(&create);
    assert!(!refused.status.success());
    let error = text(&refused.stderr);
    assert!(
        error.contains("[x509-ttl-max-24h]") && error.contains("fix: set --x509-svid-ttl"),
        "{error}"
    );

    // 2. An exception for that rule and that identity.
    let exception = dev.run(&[
        "exception",
        "create",
        "--owner",
        "tester",
        "--reason",
        "48h SVIDs until the job is split",
        "--rule",
        "x509-ttl-max-24h",
        "--spiffe-id",
        "spiffe://example.org/batch",
        "--duration",
        "20s",
        "--output",
        "json",
    ]);
    assert!(exception.status.success(), "{exception:?}");
    let exception: serde_json::Value = serde_json::from_slice(&exception.stdout).unwrap();
    let exception_id = exception["id"]
        .as_str()
        .expect("an exception ID")
        .to_owned();

    // 3. Accepted under it, and served.
    let accepted = dev.run(&create);
    assert!(accepted.status.success(), "{accepted:?}");
    assert!(
        text(&accepted.stdout).contains(&exception_id),
        "{accepted:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dev
        .served_ids()
        .contains(&"spiffe://example.org/batch".to_owned())
    {
        assert!(Instant::now() < deadline, "the batch SVID was never served");
        std::thread::sleep(Duration::from_millis(200));
    }

    // 4. The exception lapses by itself; the agent stops serving the SVID at a later sync.
    let deadline = Instant::now() + Duration::from_secs(40);
    while dev
        .served_ids()
        .contains(&"spiffe://example.org/batch".to_owned())
    {
        assert!(
            Instant::now() < deadline,
            "still served long after the exception lapsed"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(dev.served_ids().iter().any(|id| id.contains("/user/")));
    let exceptions = dev.run(&["report", "exceptions"]);
    let table = text(&exceptions.stdout);
    assert!(
        table.contains(&exception_id) && table.contains("expired"),
        "{table}"
    );

    // 5. Who used it last: issued and served to this agent.
    let usage = dev.run(&[
        "report",
        "usage",
        "spiffe://example.org/batch",
        "--output",
        "json",
    ]);
    assert!(usage.status.success(), "{usage:?}");
    let usage = text(&usage.stdout);
    assert!(usage.contains(&dev.agent_id), "{usage}");
    assert!(
        usage.contains(&exception_id),
        "the issuance names its exception: {usage}"
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `fetch x509 --write` into a directory where someone planted symlinks at the names it
/// writes: the links are replaced, their targets stay as they were, and the key is 0600.
#[test]
fn fetch_x509_write_replaces_planted_symlinks_and_leaves_their_targets_alone() {
    use std::os::unix::fs::PermissionsExt as _;

    let dev = Dev::start();
    let out_dir = dev.dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let victim = dev.dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    for name in ["svid.0.pem", "svid.0.key", "bundle.0.pem"] {
        std::os::unix::fs::symlink(&victim, out_dir.join(name)).unwrap();
    }

    let out_arg = out_dir.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut written = dev.run(&["fetch", "x509", "--write", out_arg]);
    while !written.status.success() {
        assert!(Instant::now() < deadline, "no SVID: {written:?}");
        std::thread::sleep(Duration::from_millis(200));
        written = dev.run(&["fetch", "x509", "--write", out_arg]);
    }

    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let victim_mode = std::fs::metadata(&victim).unwrap().permissions().mode();
    assert_eq!(victim_mode & 0o777, 0o644);
    for (name, mode, header) in [
        ("svid.0.pem", 0o644, "BEGIN CERTIFICATE"),
        ("svid.0.key", 0o600, "BEGIN PRIVATE KEY"),
        ("bundle.0.pem", 0o644, "BEGIN CERTIFICATE"),
    ] {
        let path = out_dir.join(name);
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        assert!(metadata.file_type().is_file(), "{name} is still a link");
        assert_eq!(metadata.permissions().mode() & 0o777, mode, "{name}");
        let contents = std::fs::read_to_string(&path).unwrap();
        assert!(contents.contains(header), "{name}: {contents}");
    }
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["bundle.0.pem", "svid.0.key", "svid.0.pem"]);
}
