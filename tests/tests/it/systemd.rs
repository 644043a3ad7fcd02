//! The systemd units under `deploy/systemd/`: `systemd-analyze verify` accepts them without a
//! warning (an unknown or misspelt key is only a warning to systemd, so warnings fail here),
//! and `systemd-analyze security` rates each one's exposure "OK" or better. Runs where
//! systemd-analyze exists (it is part of systemd); elsewhere it says so and passes.

use std::io::Write as _;
use std::process::Command;

use lanyard_e2e::{CliOutput, TestDir, lanyard_binary, workspace_root};

/// The exposure level above which `systemd-analyze security` stops calling a unit "OK".
const MAX_EXPOSURE: f64 = 3.0;

#[test]
fn systemd_units_verify_cleanly_and_are_hardened() {
    let probe = Command::new("systemd-analyze").arg("--version").output();
    if !probe.is_ok_and(|output| output.status.success()) {
        let _ = writeln!(
            std::io::stderr(),
            "skipping systemd_units_verify_cleanly_and_are_hardened: no systemd-analyze"
        );
        return;
    }
    let dir = TestDir::new();
    for unit in ["lanyard-server.service", "lanyard-agent.service"] {
        let shipped = std::fs::read_to_string(workspace_root().join("deploy/systemd").join(unit))
            .unwrap_or_else(|e| panic!("reading deploy/systemd/{unit}: {e}"));
        assert!(
            shipped.contains("ExecStart=/usr/bin/lanyard "),
            "{unit} runs /usr/bin/lanyard"
        );
        // verify checks that ExecStart's program exists: the one just built stands in.
        let path = dir.join(unit);
        std::fs::write(
            &path,
            shipped.replace(
                "/usr/bin/lanyard ",
                &format!("{} ", lanyard_binary().display()),
            ),
        )
        .expect("writing the unit");

        let verify = CliOutput::run(Command::new("systemd-analyze").arg("verify").arg(&path));
        assert!(verify.success(), "{unit}: {verify}");
        assert!(
            verify.stderr.trim().is_empty() && verify.stdout.trim().is_empty(),
            "{unit}: systemd-analyze verify warns: {verify}"
        );

        let security = CliOutput::run(
            Command::new("systemd-analyze")
                .args(["security", "--offline=true", "--no-pager"])
                .arg(&path),
        );
        assert!(security.success(), "{unit}: {security}");
        let text = format!("{}{}", security.stdout, security.stderr);
        let exposure: f64 = text
            .lines()
            .find_map(|line| line.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(':').nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|level| level.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no exposure level in\n{text}"));
        assert!(
            exposure <= MAX_EXPOSURE,
            "{unit}: exposure {exposure} above {MAX_EXPOSURE}\n{text}"
        );
    }
}
