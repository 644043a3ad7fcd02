
#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Machine;

    fn machine() -> Machine {
        Machine {
            cpu_model: "test".into(),
            cores: 2,
            memory_gib: 1.0,
        }
    }

    #[test]
    fn each_figure_with_metrics_on_is_compared_with_the_same_figure_off() {
        let mut off = Report::new("quick", machine());
        off.bench("batch")
            .value("agents_1.size_1.svids_per_sec", "SVIDs/s", 100.0, "/s");
        off.bench("fanin")
            .value("first_svid_p50_ms", "first SVID p50", 10.0, "ms");
        let mut on = Report::new("quick", machine());
        on.bench(&format!("batch.{TARGET}"))
            .value("agents_1.size_1.svids_per_sec", "SVIDs/s", 98.0, "/s");
        on.bench(&format!("fanin.{TARGET}"))
            .value("first_svid_p50_ms", "first SVID p50", 10.5, "ms");
        on.bench(&format!("fanin.{TARGET}"))
            .value("only_on", "not measured off", 1.0, "ms");
        compare(&mut off, &on, 7);
        let batch = off
            .get("metrics_overhead.batch.agents_1.size_1.svids_per_sec")
            .expect("the batch figure");
        assert_eq!(batch.value, 98.0);
        let baseline = batch.baseline.as_ref().expect("a baseline");
        assert_eq!(baseline.value, 100.0);
        assert!((baseline.ratio - 0.98).abs() < 1e-9);
        assert!(off.get("metrics_overhead.fanin.first_svid_p50_ms").is_some());
        assert!(off.get("metrics_overhead.fanin.only_on").is_none());
        assert!(off.notes.iter().any(|n| n.contains("7 scrapes")));
    }
}
