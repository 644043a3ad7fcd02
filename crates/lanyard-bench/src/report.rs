//! Figures with their baselines, and the JSON and markdown they are written as.

use serde::Serialize;

/// Where a baseline comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum BaselineKind {
    /// Measured on this machine in the same run.
    Measured,
    /// A figure someone else published for their own machine (SPIRE's benchmarks).
    Published,
}

/// What a figure is compared with.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Baseline {
    pub(crate) label: String,
    pub(crate) value: f64,
    pub(crate) unit: String,
    pub(crate) kind: BaselineKind,
    /// `value` of the figure divided by `value` of the baseline.
    pub(crate) ratio: f64,
}

/// One measured number.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figure {
    /// Stable dotted key, e.g. `batch.agents_10.size_100.svids_per_sec`.
    pub(crate) key: String,
    /// The benchmark that produced it.
    pub(crate) bench: String,
    pub(crate) label: String,
    pub(crate) value: f64,
    pub(crate) unit: String,
    pub(crate) baseline: Option<Baseline>,
    /// For a figure that is the median of several rounds: how far the rounds went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) spread: Option<Spread>,
}

/// The rounds whose median a figure is: their least, their greatest, how many, and each in
/// the order they ran.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Spread {
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) rounds: usize,
    pub(crate) values: Vec<f64>,
}

/// A line or bar chart, drawn from values the benchmarks recorded.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Chart {
    /// File name without extension.
    pub(crate) name: String,
    pub(crate) title: String,
    pub(crate) x_label: String,
    pub(crate) y_label: String,
    pub(crate) kind: ChartKind,
    /// Category labels along the x axis.
    pub(crate) categories: Vec<String>,
    pub(crate) series: Vec<Series>,
}

/// How a chart is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ChartKind {
    Line,
    Bar,
}

/// One named series of a chart, one value per category.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) values: Vec<f64>,
}

/// The machine a run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu_model: String,
    pub(crate) cores: usize,
    pub(crate) memory_gib: f64,
}

impl Machine {
    pub(crate) fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        Self {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: memory_kib / (1024.0 * 1024.0),
        }
    }
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) lanyard_version: String,
    pub(crate) mode: String,
    pub(crate) machine: Machine,
    pub(crate) benches: Vec<String>,
    pub(crate) figures: Vec<Figure>,
    pub(crate) charts: Vec<Chart>,
    /// Things a reader must know to read the figures (e.g. a comparison that was skipped).
    pub(crate) notes: Vec<String>,
}

impl Report {
    pub(crate) fn new(mode: &str, machine: Machine) -> Self {
        Self {
            lanyard_version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: mode.to_owned(),
            machine,
            benches: Vec::new(),
            figures: Vec::new(),
            charts: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// A figure builder for benchmark `bench`.
    pub(crate) fn bench<'a>(&'a mut self, bench: &str) -> BenchReport<'a> {
        if !self.benches.iter().any(|b| b == bench) {
            self.benches.push(bench.to_owned());
        }
        BenchReport {
            report: self,
            bench: bench.to_owned(),
        }
    }

    /// Appends another report's benchmarks, figures, charts and notes.
    pub(crate) fn merge(&mut self, other: Report) {
        for bench in other.benches {
            if !self.benches.contains(&bench) {
                self.benches.push(bench);
            }
        }
        self.figures.extend(other.figures);
        self.charts.extend(other.charts);
        self.notes.extend(other.notes);
    }

    /// The figure with this key.
    #[cfg(test)]
    pub(crate) fn get(&self, key: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.key == key)
    }

    /// The value of the figure with this key.
    #[cfg(test)]
    pub(crate) fn value(&self, key: &str) -> Option<f64> {
        self.get(key).map(|f| f.value)
    }

    pub(crate) fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }

    /// A markdown section per benchmark, one row per figure.
    pub(crate) fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "Lanyard {} — {} run on {} ({} cores, {:.0} GiB)\n\n",
            self.lanyard_version,
            self.mode,
            self.machine.cpu_model,
            self.machine.cores,
            self.machine.memory_gib
        ));
        for bench in &self.benches {
            out.push_str(&format!("### `{bench}`\n\n"));
            out.push_str("| Figure | Value | Baseline | Ratio |\n|---|---:|---|---:|\n");
            for figure in self.figures.iter().filter(|f| &f.bench == bench) {
                let (baseline, ratio) = match &figure.baseline {
                    Some(b) => (
                        format!(
                            "{}: {} {}{}",
                            b.label,
                            format_value(b.value),
                            b.unit,
                            if b.kind == BaselineKind::Published {
                                " (published)"
                            } else {
                                ""
                            }
                        ),
                        format!("{}×", format_value(b.ratio)),
                    ),
                    None => (String::new(), String::new()),
                };
                let spread = figure.spread.as_ref().map_or_else(String::new, |s| {
                    format!(
                        " ({}–{}, {} rounds)",
                        format_value(s.min),
                        format_value(s.max),
                        s.rounds
                    )
                });
                out.push_str(&format!(
                    "| {} | {} {}{} | {} | {} |\n",
                    figure.label,
                    format_value(figure.value),
                    figure.unit,
                    spread,
                    baseline,
                    ratio
                ));
            }
            out.push('\n');
        }
        for note in &self.notes {
            out.push_str(&format!("- {note}\n"));
        }
        out
    }
}

/// Records the figures of one benchmark.
#[derive(Debug)]
pub(crate) struct BenchReport<'a> {
    report: &'a mut Report,
    bench: String,
}

impl BenchReport<'_> {
    /// Records a figure without a baseline.
    pub(crate) fn figure(&mut self, key: &str, label: &str, value: f64, unit: &str) {
        self.push(key, label, value, unit, None);
    }

    /// Records a figure that is the median of several rounds, with their spread.
    pub(crate) fn median(
        &mut self,
        key: &str,
        label: &str,
        median: f64,
        unit: &str,
        spread: Spread,
    ) {
        self.push(key, label, median, unit, None);
        if let Some(figure) = self.report.figures.last_mut() {
            figure.spread = Some(spread);
        }
    }

    /// Records a figure compared with a baseline measured in this run.
    pub(crate) fn versus(
        &mut self,
        key: &str,
        label: &str,
        value: f64,
        unit: &str,
        baseline: (&str, f64, &str),
    ) {
        self.push(
            key,
            label,
            value,
            unit,
            Some((baseline, BaselineKind::Measured)),
        );
    }

    /// Records a figure compared with a published figure.
    pub(crate) fn versus_published(
        &mut self,
        key: &str,
        label: &str,
        value: f64,
        unit: &str,
        baseline: (&str, f64, &str),
    ) {
        self.push(
            key,
            label,
            value,
            unit,
            Some((baseline, BaselineKind::Published)),
        );
    }

    fn push(
        &mut self,
        key: &str,
        label: &str,
        value: f64,
        unit: &str,
        baseline: Option<((&str, f64, &str), BaselineKind)>,
    ) {
        let baseline = baseline.map(|((label, base, unit), kind)| Baseline {
            label: label.to_owned(),
            value: base,
            unit: unit.to_owned(),
            kind,
            ratio: crate::stats::ratio(value, base),
        });
        self.report.figures.push(Figure {
            key: format!("{}.{key}", self.bench),
            bench: self.bench.clone(),
            label: label.to_owned(),
            value,
            unit: unit.to_owned(),
            baseline,
            spread: None,
        });
    }

    /// Adds a chart.
    pub(crate) fn chart(&mut self, chart: Chart) {
        self.report.charts.push(chart);
    }
}

/// Three significant digits, without exponent for everyday magnitudes.
pub(crate) fn format_value(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude == 0.0 {
        "0".to_owned()
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else if magnitude >= 0.001 {
        format!("{value:.3}")
    } else {
        format!("{value:.2e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            cpu_model: "test cpu".into(),
            cores: 2,
            memory_gib: 1.0,
        }
    }

    #[test]
    fn json_has_figures_with_baselines_and_ratios() {
        let mut report = Report::new("quick", machine());
        let mut mint = report.bench("mint");
        mint.versus(
            "threads_1.svids_per_sec",
            "SVIDs/s, 1 thread",
            1000.0,
            "/s",
            ("ring sign+verify", 4000.0, "/s"),
        );
        mint.figure("threads_1.cost_us", "µs per SVID", 1000.0, "µs");
        report.bench("index").versus_published(
            "x.lookup_us",
            "lookup",
            42.0,
            "µs",
            ("SPIRE", 21.0, "µs"),
        );

        let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        assert_eq!(json["mode"], "quick");
        assert_eq!(json["machine"]["cores"], 2);
        assert_eq!(json["benches"], serde_json::json!(["mint", "index"]));
        let figures = json["figures"].as_array().unwrap();
        assert_eq!(figures.len(), 3);
        assert_eq!(figures[0]["key"], "mint.threads_1.svids_per_sec");
        assert_eq!(figures[0]["value"], 1000.0);
        assert_eq!(figures[0]["baseline"]["value"], 4000.0);
        assert_eq!(figures[0]["baseline"]["ratio"], 0.25);
        assert_eq!(figures[0]["baseline"]["kind"], "measured");
        assert!(figures[1]["baseline"].is_null());
        assert_eq!(figures[2]["baseline"]["kind"], "published");
        assert_eq!(figures[2]["baseline"]["ratio"], 2.0);
        assert_eq!(report.value("index.x.lookup_us"), Some(42.0));
    }

    #[test]
    fn markdown_has_a_row_per_figure() {
        let mut report = Report::new("full", machine());
        report.bench("jwt").versus(
            "per_sec",
            "JWT-SVIDs/s",
            500.0,
            "/s",
            ("raw ES256", 2000.0, "/s"),
        );
        let markdown = report.to_markdown();
        assert!(markdown.contains("### `jwt`"));
        assert!(markdown.contains("| JWT-SVIDs/s | 500 /s | raw ES256: 2000 /s | 0.250× |"));
    }

    #[test]
    fn a_median_carries_its_spread_to_json_and_markdown() {
        let mut report = Report::new("full", machine());
        report.bench("metrics_overhead").median(
            "batch.svids_per_sec",
            "SVIDs/s, on ÷ off",
            0.99,
            "×",
            Spread {
                min: 0.95,
                max: 1.02,
                rounds: 3,
                values: vec![0.95, 1.02, 0.99],
            },
        );
        report
            .bench("jwt")
            .figure("per_sec", "JWT-SVIDs/s", 1.0, "/s");
        let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        let figures = json["figures"].as_array().unwrap();
        assert_eq!(figures[0]["spread"]["min"], 0.95);
        assert_eq!(figures[0]["spread"]["max"], 1.02);
        assert_eq!(figures[0]["spread"]["rounds"], 3);
        assert_eq!(figures[0]["spread"]["values"][1], 1.02);
        assert!(figures[1].get("spread").is_none());
        assert!(
            report
                .to_markdown()
                .contains("| SVIDs/s, on ÷ off | 0.990 × (0.950–1.02, 3 rounds) |  |  |")
        );
    }

    #[test]
    fn values_keep_three_significant_digits() {
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(12345.6), "12346");
        assert_eq!(format_value(12.345), "12.3");
        assert_eq!(format_value(1.2345), "1.23");
        assert_eq!(format_value(0.012345), "0.012");
        assert_eq!(format_value(0.0000123), "1.23e-5");
    }
}
