//! `index`: the server's authorization index alone, at several scales: build time, lookup
//! time per agent, the time to apply one change, and memory per entry.

use std::time::{Duration, Instant, SystemTime};

use lanyard_core::agent::AttestedAgent;
use lanyard_core::{EntryId, RegistrationEntry, Selector, SelectorSet, SpiffeId};
use lanyard_server::authz::AuthorizationIndex;

use crate::cpu::rss_bytes;
use crate::harness::trust_domain;
use crate::report::{Chart, ChartKind, Report, Series};

/// SPIRE's published figures for its entry cache at 50k agents and 600 entries.
const SPIRE_BUILD_MS: f64 = 37.0;
const SPIRE_LOOKUP_US: f64 = 21.0;

/// How entries relate to agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `per_agent` entries parented directly to each agent.
    Direct { per_agent: usize },
    /// Node alias entries (parent = the server) matched by agents' node selectors, and
    /// workload entries under the aliases: every agent gets the entries of its alias.
    Aliased { aliases: usize, per_alias: usize },
}

/// One scale to measure.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) name: &'static str,
    pub(crate) agents: usize,
    pub(crate) layout: Layout,
    /// Compare with SPIRE's published figures (only for SPIRE's own shape).
    pub(crate) spire_reference: bool,
}

impl Shape {
    pub(crate) fn entries(&self) -> usize {
        match self.layout {
            Layout::Direct { per_agent } => self.agents * per_agent,
            Layout::Aliased { aliases, per_alias } => aliases + aliases * per_alias,
        }
    }
}

/// The figures other benchmarks compare with: lookup µs at the first shape (`sync`), and
/// resident bytes per entry at the largest shape with entries parented to agents (`scale`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    pub(crate) lookup_us: f64,
    pub(crate) bytes_per_entry: Option<(usize, f64)>,
}

fn id(path: &str) -> SpiffeId {
    SpiffeId::from_path(&trust_domain(), path).expect("benchmark paths are valid")
}

fn selector(kind: &str, value: &str) -> Selector {
    Selector::new(kind, value).expect("benchmark selectors are valid")
}

fn agent_id(i: usize) -> SpiffeId {
    id(&format!("/spire/agent/join_token/{i:08}"))
}

fn entry(
    eid: String,
    spiffe: SpiffeId,
    parent: SpiffeId,
    selectors: SelectorSet,
) -> RegistrationEntry {
    let mut entry = RegistrationEntry::new(
        EntryId::new(&eid).expect("benchmark entry IDs are valid"),
        spiffe,
        parent,
        selectors,
        SystemTime::UNIX_EPOCH,
    );
    entry.x509_svid_ttl = Some(Duration::from_secs(3600));
    entry
}

/// The entries of `shape`, generated lazily.
fn entries(shape: Shape) -> Box<dyn Iterator<Item = RegistrationEntry>> {
    match shape.layout {
        Layout::Direct { per_agent } => Box::new((0..shape.agents).flat_map(move |a| {
            let parent = agent_id(a);
            (0..per_agent).map(move |k| {
                entry(
                    format!("e-{a:08}-{k:03}"),
                    id(&format!("/ns/a{a}/sa/w{k}")),
                    parent.clone(),
                    [selector("unix", &format!("uid:{}", 1000 + k))]
                        .into_iter()
                        .collect(),
                )
            })
        })),
        Layout::Aliased { aliases, per_alias } => {
            let server = trust_domain().server_id();
            let alias_entries = (0..aliases).map(move |g| {
                entry(
                    format!("alias-{g:05}"),
                    id(&format!("/node-group/{g}")),
                    server.clone(),
                    [selector("bench", &format!("group:{g}"))]
                        .into_iter()
                        .collect(),
                )
            });
            let workloads = (0..aliases).flat_map(move |g| {
                (0..per_alias).map(move |k| {
                    entry(
                        format!("w-{g:05}-{k:03}"),
                        id(&format!("/group/{g}/workload/{k}")),
                        id(&format!("/node-group/{g}")),
                        [selector("k8s", &format!("sa:w{k}"))].into_iter().collect(),
                    )
                })
            });
            Box::new(alias_entries.chain(workloads))
        }
    }
}

fn agents(shape: Shape) -> impl Iterator<Item = AttestedAgent> {
    let groups = match shape.layout {
        Layout::Aliased { aliases, .. } => aliases.max(1),
        Layout::Direct { .. } => 1,
    };
    (0..shape.agents).map(move |a| {
        let selectors: SelectorSet = [
            selector("bench", &format!("group:{}", a % groups)),
            selector("bench", &format!("agent:{a}")),
        ]
        .into_iter()
        .collect();
        let mut agent = AttestedAgent::new(agent_id(a), "bench", "1", SystemTime::UNIX_EPOCH);
        agent.selectors = selectors;
        agent
    })
}

/// Measures one shape; records its figures and returns (lookup µs, resident bytes per entry).
fn measure(report: &mut Report, shape: Shape, lookups: usize, changes: usize) -> (f64, f64) {
    let server_id = trust_domain().server_id();
    let n_entries = shape.entries();
    let now = SystemTime::now();

    // Memory first, on a heap that has not held an index yet: build from lazy iterators so
    // that only the index itself grows the resident set.
    let rss_before = rss_bytes(std::process::id());
    let index = AuthorizationIndex::build(server_id.clone(), entries(shape), agents(shape));
    let rss_after = rss_bytes(std::process::id());
    let bytes_per_entry = rss_after.saturating_sub(rss_before) as f64 / n_entries.max(1) as f64;
    drop(index);

    let all_entries: Vec<RegistrationEntry> = entries(shape).collect();
    let all_agents: Vec<AttestedAgent> = agents(shape).collect();
    let started = Instant::now();
    let mut index = AuthorizationIndex::build(server_id, all_entries.clone(), all_agents.clone());
    let build = started.elapsed();

    let step = (shape.agents / lookups.max(1)).max(1);
    let sample: Vec<&SpiffeId> = all_agents
        .iter()
        .step_by(step)
        .take(lookups)
        .map(|agent| &agent.spiffe_id)
        .collect();
    let mut found = 0usize;
    let started = Instant::now();
    for agent in &sample {
        found += index.authorized_entries(agent, now).len();
    }
    let lookup = started.elapsed();
    let lookup_us = lookup.as_secs_f64() * 1e6 / sample.len().max(1) as f64;
    let per_agent = found as f64 / sample.len().max(1) as f64;

    // A change as the entry service applies it: replace an entry with a new revision.
    let started = Instant::now();
    for (i, entry) in all_entries.iter().cycle().take(changes).enumerate() {
        let mut changed = entry.clone();
        changed.revision_number = i64::try_from(i).unwrap_or(i64::MAX);
        index.upsert_entry(changed);
    }
    let change_us = started.elapsed().as_secs_f64() * 1e6 / changes.max(1) as f64;

    let build_ms = build.as_secs_f64() * 1e3;
    let mut bench = report.bench("index");
    let key = shape.name;
    let label = format!("{} entries / {} agents", n_entries, shape.agents);
    if shape.spire_reference {
        bench.versus_published(
            &format!("{key}.build_ms"),
            &format!("build, {label}"),
            build_ms,
            "ms",
            ("SPIRE entry cache, its benchmark", SPIRE_BUILD_MS, "ms"),
        );
        bench.versus_published(
            &format!("{key}.lookup_us"),
            &format!("authorized entries of one agent, {label} ({per_agent:.0} found)"),
            lookup_us,
            "µs",
            (
                "SPIRE GetAuthorizedEntries, its benchmark",
                SPIRE_LOOKUP_US,
                "µs",
            ),
        );
    } else {
        bench.figure(
            &format!("{key}.build_ms"),
            &format!("build, {label}"),
            build_ms,
            "ms",
        );
        bench.figure(
            &format!("{key}.lookup_us"),
            &format!("authorized entries of one agent, {label} ({per_agent:.0} found)"),
            lookup_us,
            "µs",
        );
    }
    bench.versus(
        &format!("{key}.build_us_per_entry"),
        &format!("build per entry, {label}"),
        build.as_secs_f64() * 1e6 / n_entries.max(1) as f64,
        "µs",
        ("apply one change", change_us, "µs"),
    );
    bench.figure(
        &format!("{key}.change_us"),
        &format!("apply one entry change, {label}"),
        change_us,
        "µs",
    );
    bench.figure(
        &format!("{key}.bytes_per_entry"),
        &format!("resident bytes per entry, {label}"),
        bytes_per_entry,
        "B",
    );
    (lookup_us, bytes_per_entry)
}

pub(crate) fn run(
    report: &mut Report,
    shapes: &[Shape],
    lookups: usize,
    changes: usize,
) -> Outcome {
    let mut lookups_us = Vec::new();
    let mut bytes_per_entry: Option<(usize, f64)> = None;
    for &shape in shapes {
        let (lookup, bytes) = measure(report, shape, lookups, changes);
        lookups_us.push(lookup);
        let direct = matches!(shape.layout, Layout::Direct { .. });
        if direct && bytes_per_entry.is_none_or(|(n, _)| n < shape.entries()) {
            bytes_per_entry = Some((shape.entries(), bytes));
        }
    }
    report.bench("index").chart(Chart {
        name: "index".into(),
        title: "Authorization index: lookup per agent".into(),
        x_label: "shape".into(),
        y_label: "µs per lookup".into(),
        kind: ChartKind::Bar,
        categories: shapes.iter().map(|s| s.name.to_owned()).collect(),
        series: vec![Series {
            name: "lookup µs".into(),
            values: lookups_us.clone(),
        }],
    });
    Outcome {
        lookup_us: lookups_us.first().copied().unwrap_or(0.0),
        bytes_per_entry,
    }
}
