//! The quick benchmark end to end, as the test suite runs it: `lanyard-bench --quick
//! --metrics-overhead` starts real servers (on SQLite, and on PostgreSQL for `restart`,
//! `writes` and `propagation`) and agents, runs every benchmark (`batch` and `fanin` again,
//! in rounds with metrics off and on), and writes the JSON report, the markdown table and the
//! charts. Checked: every benchmark reports, every figure is a finite number, and every
//! baseline carries its ratio. No timing is asserted.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

const BENCHMARKS: [&str; 11] = [
    "mint",
    "revoke",
    "batch",
    "jwt",
    "index",
    "sync",
    "fanin",
    "restart",
    "writes",
    "propagation",
    "metrics_overhead",
];

/// Figures the quick run must report beyond one per benchmark: the PostgreSQL side of the
/// comparisons whose baseline is SQLite or a single server.
const REQUIRED_FIGURES: [&str; 22] = [
    "revoke.all_acknowledged_p99_ms",
    "revoke.crl_1000.sign_ms",
    "revoke.crl_1000.bytes_per_serial",
    "revoke.nginx_refuses_p99_ms",
    "sync.removal_p99_ms",
    "sync.server_cpu_us_per_sync_vs_calls",
    "jwt.server_cpu_us_per_jwt_vs_call",
    "batch.agents_1.size_1.p50_ms_vs_call",
    "fanin.first_svid_agent_cpu_us",
    "fanin.first_svid_p99_vs_floor_ms",
    "fanin.first_svid_p99_vs_http2_floor_ms",
    "fanin.agent_rss_anon_mib",
    "restart.postgres.start_to_serving_ms",
    "writes.sqlite.per_sec",
    "writes.postgres.per_sec",
    "propagation.authorized_at_b_p50_ms",
    "propagation.svid_p50_ms",
    "propagation.svid_p99_ms",
    "metrics_overhead.rpc_layer_added_ns",
    "metrics_overhead.batch.svids_per_sec",
    "metrics_overhead.batch.agents_1.size_1.svids_per_sec",
    "metrics_overhead.fanin.first_svid_p50_ms",
];

#[test]
fn the_quick_run_reports_every_benchmark_with_baselines_and_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("out.json");
    let output = Command::new(env!("CARGO_BIN_EXE_lanyard-bench"))
        .arg("--quick")
        .arg("--metrics-overhead")
        // The helper of `revoke`'s nginx round.
        .arg("--lanyard-bin")
        .arg(lanyard_e2e::lanyard_binary())
        .arg("--json")
        .arg(&json_path)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "lanyard-bench --quick failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["mode"], "quick");
    let benches: BTreeSet<&str> = report["benches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|bench| bench.as_str().unwrap())
        .collect();
    for bench in BENCHMARKS {
        assert!(benches.contains(bench), "{bench} missing from {benches:?}");
    }

    let figures = report["figures"].as_array().unwrap();
    let keys: BTreeSet<&str> = figures
        .iter()
        .map(|figure| figure["key"].as_str().unwrap())
        .collect();
    for key in REQUIRED_FIGURES {
        assert!(keys.contains(key), "{key} missing from {keys:?}");
    }
    let mut with_baseline = BTreeSet::new();
    for figure in figures {
        let key = figure["key"].as_str().unwrap();
        let value = figure["value"].as_f64().unwrap_or(f64::NAN);
        assert!(value.is_finite() && value >= 0.0, "{key}: {figure}");
        if !figure["spread"].is_null() {
            let spread = &figure["spread"];
            let (min, max) = (
                spread["min"].as_f64().unwrap(),
                spread["max"].as_f64().unwrap(),
            );
            assert!(min <= value && value <= max, "{key}: {figure}");
            assert!(spread["rounds"].as_u64().unwrap() >= 1, "{key}: {figure}");
        }
        if !figure["baseline"].is_null() {
            let ratio = figure["baseline"]["ratio"].as_f64().unwrap_or(f64::NAN);
            assert!(ratio.is_finite() && ratio > 0.0, "{key}: {figure}");
            with_baseline.insert(figure["bench"].as_str().unwrap().to_owned());
        }
    }
    // Both rounds of the quick run (one each way) compared batch.
    let batch = figures
        .iter()
        .find(|figure| figure["key"] == "metrics_overhead.batch.svids_per_sec")
        .unwrap();
    assert_eq!(batch["spread"]["rounds"], 2, "{batch}");
    // Each benchmark relates at least one figure to a baseline measured in the same run
    // (or, for the index, to SPIRE's published figures).
    for bench in BENCHMARKS {
        assert!(
            with_baseline.contains(bench),
            "{bench} has no figure with a baseline"
        );
    }

    let table = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    for bench in BENCHMARKS {
        assert!(
            table.contains(&format!("`{bench}`")),
            "results.md lacks {bench}"
        );
    }
}

/// `scale` runs only when named; its quick version end to end against the `lanyard` binary
/// the end-to-end harness provides (built once, or `LANYARD_E2E_BINARY`): every figure is
/// there, finite, and each baseline carries its ratio.
#[test]
fn the_quick_scale_run_reports_its_figures() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("out.json");
    let output = Command::new(env!("CARGO_BIN_EXE_lanyard-bench"))
        .args(["--quick", "--only", "scale", "--lanyard-bin"])
        .arg(lanyard_e2e::lanyard_binary())
        .arg("--json")
        .arg(&json_path)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "lanyard-bench --quick --only scale failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["benches"], serde_json::json!(["scale"]));
    let figures = report["figures"].as_array().unwrap();
    let keys: BTreeSet<&str> = figures
        .iter()
        .map(|figure| figure["key"].as_str().unwrap())
        .collect();
    for key in [
        "scale.syncs_per_sec",
        "scale.server_cpu_us_per_sync",
        "scale.agents_per_core",
        "scale.sync_p99_ms",
        "scale.rss_per_agent_kb",
        "scale.rss_per_entry_b",
        "scale.restart_to_serving_ms",
    ] {
        assert!(keys.contains(key), "{key} missing from {keys:?}");
    }
    for figure in figures {
        let value = figure["value"].as_f64().unwrap_or(f64::NAN);
        assert!(value.is_finite() && value >= 0.0, "{figure}");
        if !figure["baseline"].is_null() {
            let ratio = figure["baseline"]["ratio"].as_f64().unwrap_or(f64::NAN);
            assert!(ratio.is_finite() && ratio > 0.0, "{figure}");
        }
    }
}
