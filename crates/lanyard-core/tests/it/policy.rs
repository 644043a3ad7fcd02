//! Policy as code: the shipped baseline refuses what it should, with readable messages;
//! exceptions waive exactly the rules they list, for exactly their scope, until they lapse;
//! broken policies are refused at compile time; a policy's own Rego tests run.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::entry::{EntryId, RegistrationEntry};
use lanyard_core::policy::{
    EntryInput, EntryView, Exception, ExceptionInput, ExceptionStatus, Operation, Policy,
    PolicyError, covering_exceptions, spiffe_id_matches,
};
use lanyard_core::{Selector, SelectorSet, SpiffeId};

const DAY: Duration = Duration::from_secs(86_400);
const DEFAULT_X509_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);

fn deploy_policy(file: &str) -> (String, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/policy")
        .join(file);
    let source = std::fs::read_to_string(&path).unwrap();
    (path.display().to_string(), source)
}

fn baseline() -> Policy {
    let (name, source) = deploy_policy("baseline.rego");
    Policy::compile([(name.as_str(), source.as_str())]).unwrap()
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// An entry that satisfies the baseline.
fn good_entry() -> RegistrationEntry {
    let mut selectors = SelectorSet::default();
    selectors.insert(Selector::new("unix", "uid:1000").unwrap());
    let mut entry = RegistrationEntry::new(
        EntryId::new("entry-1").unwrap(),
        "spiffe://example.org/user/alice"
            .parse::<SpiffeId>()
            .unwrap(),
        "spiffe://example.org/spire/agent/join_token/t"
            .parse::<SpiffeId>()
            .unwrap(),
        selectors,
        now(),
    );
    entry.owner = Some("alice".to_owned());
    entry.reason = Some("local development".to_owned());
    entry.expires_at = Some(now() + 30 * DAY);
    entry
}

fn input(entry: &RegistrationEntry, exceptions: &[Exception], at: SystemTime) -> EntryInput {
    EntryInput {
        operation: Operation::Create,
        now: lanyard_core::policy::unix_seconds(at),
        caller: None,
        entry: EntryView::new(entry, DEFAULT_X509_TTL, DEFAULT_JWT_TTL),
        exceptions: covering_exceptions(
            exceptions,
            entry.id.as_str(),
            entry.spiffe_id.as_ref(),
            at,
        ),
    }
}

fn broken_rules(policy: &Policy, entry: &RegistrationEntry) -> BTreeSet<String> {
    policy
        .evaluate_entry(&input(entry, &[], now()))
        .unwrap()
        .violations
        .into_iter()
        .map(|v| v.rule)
        .collect()
}

fn rules(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

fn exception(id: &str, waives: &[&str], expires_in: Duration) -> Exception {
    Exception {
        id: id.to_owned(),
        owner: "platform-team".to_owned(),
        reason: "migration".to_owned(),
        ticket: Some("CHG-42".to_owned()),
        rules: rules(waives),
        entry_ids: BTreeSet::new(),
        spiffe_id_pattern: None,
        expires_at: now() + expires_in,
        created_at: now(),
        created_by: "local".to_owned(),
        revoked_at: None,
        revision: 1,
    }
}

#[test]
fn the_baseline_passes_a_complete_entry() {
    let decision = baseline()
        .evaluate_entry(&input(&good_entry(), &[], now()))
        .unwrap();
    assert!(decision.passes(), "{decision:?}");
    assert!(decision.waived.is_empty());
}

/// Breaks one thing about an entry.
type Breaker = Box<dyn Fn(&mut RegistrationEntry)>;

#[test]
fn each_baseline_rule_refuses_what_it_should_and_says_how_to_fix_it() {
    let policy = baseline();
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "owner-required",
            Box::new(|e| e.owner = None),
            "has no owner",
        ),
        (
            "owner-required",
            Box::new(|e| e.owner = Some(" ".to_owned())),
            "has no owner",
        ),
        (
            "reason-required",
            Box::new(|e| e.reason = None),
            "has no reason",
        ),
        (
            "expiry-required",
            Box::new(|e| e.expires_at = None),
            "never expires",
        ),
        (
            "expiry-max-90d",
            Box::new(|e| e.expires_at = Some(now() + 91 * DAY)),
            "expires in 91 days, more than 90",
        ),
        (
            "x509-ttl-max-24h",
            Box::new(|e| e.x509_svid_ttl = Some(DAY + Duration::from_secs(1))),
            "valid 86401s, more than 24h",
        ),
        (
            "jwt-ttl-max-1h",
            Box::new(|e| e.jwt_svid_ttl = Some(Duration::from_secs(7200))),
            "valid 7200s, more than 1h",
        ),
        (
            "admin-needs-exception",
            Box::new(|e| e.admin = true),
            "grants admin access",
        ),
        (
            "downstream-needs-exception",
            Box::new(|e| e.downstream = true),
            "downstream signing authority",
        ),
    ];
    for (rule, break_it, message) in cases {
        let mut entry = good_entry();
        break_it(&mut entry);
        let decision = policy.evaluate_entry(&input(&entry, &[], now())).unwrap();
        assert_eq!(decision.violations.len(), 1, "{rule}: {decision:?}");
        let violation = &decision.violations[0];
        assert_eq!(violation.rule, rule);
        assert!(
            violation.message.contains(message)
                && violation
                    .message
                    .contains("spiffe://example.org/user/alice"),
            "{rule}: {violation}"
        );
        assert!(
            violation.fix.as_deref().is_some_and(|fix| !fix.is_empty()),
            "{rule}: no fix"
        );
        assert!(
            violation.to_string().starts_with(&format!("[{rule}] ")),
            "{violation}"
        );
    }
    // The limits themselves are allowed.
    let mut entry = good_entry();
    entry.expires_at = Some(now() + 90 * DAY);
    entry.x509_svid_ttl = Some(DAY);
    entry.jwt_svid_ttl = Some(Duration::from_secs(3600));
    assert_eq!(broken_rules(&policy, &entry), BTreeSet::new());
    // Unset TTLs are judged by the server default they stand for.
    let mut entry = good_entry();
    entry.x509_svid_ttl = None;
    let view = EntryView::new(&entry, DAY * 2, DEFAULT_JWT_TTL);
    let decision = policy
        .evaluate_entry(&EntryInput {
            entry: view,
            ..input(&entry, &[], now())
        })
        .unwrap();
    assert_eq!(decision.violations[0].rule, "x509-ttl-max-24h");
}

#[test]
fn several_broken_rules_are_all_reported() {
    let mut entry = good_entry();
    entry.owner = None;
    entry.reason = None;
    entry.admin = true;
    assert_eq!(
        broken_rules(&baseline(), &entry),
        rules(&["owner-required", "reason-required", "admin-needs-exception"])
    );
}

#[test]
fn an_exception_waives_exactly_its_rules_for_exactly_its_scope_until_it_lapses() {
    let policy = baseline();
    let mut entry = good_entry();
    entry.admin = true;
    entry.owner = None;

    let mut waiver = exception("x-admin", &["admin-needs-exception"], 7 * DAY);
    waiver.entry_ids.insert(entry.id.as_str().to_owned());

    // In scope and active: the admin rule is waived, the owner rule still applies.
    let decision = policy
        .evaluate_entry(&input(&entry, &[waiver.clone()], now()))
        .unwrap();
    assert_eq!(
        decision
            .violations
            .iter()
            .map(|v| v.rule.as_str())
            .collect::<Vec<_>>(),
        ["owner-required"]
    );
    assert_eq!(decision.waived.len(), 1);
    assert_eq!(decision.waived[0].0.rule, "admin-needs-exception");
    assert_eq!(decision.exceptions_used(), ["x-admin"]);

    entry.owner = Some("ops".to_owned());
    let decision = policy
        .evaluate_entry(&input(&entry, &[waiver.clone()], now()))
        .unwrap();
    assert!(decision.passes(), "{decision:?}");
    assert_eq!(decision.exceptions_used(), ["x-admin"]);

    // Another entry with the same flaw is not in scope.
    let mut other = entry.clone();
    other.id = EntryId::new("entry-2").unwrap();
    let decision = policy
        .evaluate_entry(&input(&other, &[waiver.clone()], now()))
        .unwrap();
    assert_eq!(decision.violations[0].rule, "admin-needs-exception");

    // One second before expiry it still holds; at expiry it lapses on its own.
    let expiry = waiver.expires_at;
    let just_before = policy
        .evaluate_entry(&input(
            &entry,
            &[waiver.clone()],
            expiry - Duration::from_secs(1),
        ))
        .unwrap();
    assert!(just_before.passes());
    let at_expiry = policy
        .evaluate_entry(&input(&entry, &[waiver.clone()], expiry))
        .unwrap();
    assert_eq!(at_expiry.violations[0].rule, "admin-needs-exception");

    // Revoked: lapses at the revocation time.
    waiver.revoked_at = Some(now() + DAY);
    assert!(
        policy
            .evaluate_entry(&input(&entry, &[waiver.clone()], now()))
            .unwrap()
            .passes()
    );
    assert!(
        !policy
            .evaluate_entry(&input(&entry, &[waiver], now() + DAY))
            .unwrap()
            .passes()
    );
}

#[test]
fn exception_scope_by_spiffe_id_pattern() {
    let mut waiver = exception("x-ci", &["expiry-required"], DAY);
    waiver.spiffe_id_pattern = Some("spiffe://example.org/ci/*".to_owned());
    assert!(waiver.covers("any", "spiffe://example.org/ci/runner"));
    assert!(waiver.covers("any", "spiffe://example.org/ci/a/b"));
    assert!(!waiver.covers("any", "spiffe://example.org/ci"));
    assert!(!waiver.covers("any", "spiffe://example.org/cix/runner"));
    assert!(!waiver.covers("any", "spiffe://example.org/other"));
    assert!(spiffe_id_matches(
        "spiffe://example.org/exact",
        "spiffe://example.org/exact"
    ));
    assert!(!spiffe_id_matches(
        "spiffe://example.org/exact",
        "spiffe://example.org/exact/x"
    ));

    let mut entry = good_entry();
    entry.spiffe_id = "spiffe://example.org/ci/runner"
        .parse::<SpiffeId>()
        .unwrap();
    entry.expires_at = None;
    assert!(
        baseline()
            .evaluate_entry(&input(&entry, &[waiver], now()))
            .unwrap()
            .passes()
    );
}

#[test]
fn the_baseline_caps_exceptions() {
    let policy = baseline();
    let ask = |exception: &Exception| -> BTreeSet<String> {
        policy
            .evaluate_exception(&ExceptionInput {
                operation: "create".to_owned(),
                now: lanyard_core::policy::unix_seconds(now()),
                caller: None,
                exception: exception.view(),
            })
            .unwrap()
            .into_iter()
            .map(|v| v.rule)
            .collect()
    };
    assert_eq!(
        ask(&exception("ok", &["owner-required"], 30 * DAY)),
        BTreeSet::new()
    );
    assert_eq!(
        ask(&exception("long", &["owner-required"], 31 * DAY)),
        rules(&["exception-max-30d"])
    );
    let mut admin = exception("admin", &["admin-needs-exception"], DAY);
    assert_eq!(ask(&admin), BTreeSet::new());
    admin.ticket = None;
    assert_eq!(ask(&admin), rules(&["exception-ticket-required"]));
}

#[test]
fn the_baseline_passes_its_own_rego_tests() {
    let (name, source) = deploy_policy("baseline.rego");
    let (test_name, test_source) = deploy_policy("baseline_test.rego");
    let policy = Policy::compile([
        (name.as_str(), source.as_str()),
        (test_name.as_str(), test_source.as_str()),
    ])
    .unwrap();
    let outcomes = policy.run_tests().unwrap();
    assert!(outcomes.len() >= 8, "{outcomes:?}");
    for outcome in &outcomes {
        assert!(outcome.passed, "{outcome:?}");
        assert!(
            outcome.name.starts_with("data.lanyard.baseline_test.test_"),
            "{outcome:?}"
        );
    }
}

#[test]
fn a_failing_rego_test_is_reported_with_its_name() {
    let policy = Policy::compile([(
        "t.rego",
        "package lanyard\nimport rego.v1\nx := 1\ntest_passes if { x == 1 }\ntest_fails if { x == 2 }\n",
    )])
    .unwrap();
    let outcomes = policy.run_tests().unwrap();
    let summary: Vec<(&str, bool)> = outcomes
        .iter()
        .map(|o| (o.name.as_str(), o.passed))
        .collect();
    assert_eq!(
        summary,
        [
            ("data.lanyard.test_fails", false),
            ("data.lanyard.test_passes", true)
        ]
    );
    assert!(outcomes[0].detail.is_some());
}

#[test]
fn broken_policies_are_refused_with_a_clear_error() {
    // Syntax error.
    let error =
        Policy::compile([("bad.rego", "package lanyard\nviolations contains v if {")]).unwrap_err();
    assert!(
        matches!(error, PolicyError::Compile { ref name, .. } if name == "bad.rego"),
        "{error}"
    );
    // Wrong package.
    let error = Policy::compile([("other.rego", "package authz\nallow := true\n")]).unwrap_err();
    assert!(
        matches!(error, PolicyError::WrongPackage { ref package, .. } if package == "authz"),
        "{error}"
    );
    assert!(error.to_string().contains("package lanyard"), "{error}");
    // Violations that are not a set of objects.
    let error =
        Policy::compile([("shape.rego", "package lanyard\nviolations := 3\n")]).unwrap_err();
    assert!(error.to_string().contains("violations"), "{error}");
    // Missing fields.
    let error = Policy::compile([(
        "fields.rego",
        "package lanyard\nimport rego.v1\nviolations contains {\"rule\": \"r\"} if { true }\n",
    )])
    .unwrap_err();
    assert!(error.to_string().contains("message"), "{error}");
    // Too long.
    let huge = format!(
        "package lanyard\n# {}\n",
        "x".repeat(lanyard_core::policy::MAX_POLICY_LEN)
    );
    assert!(matches!(
        Policy::compile([("huge.rego", huge.as_str())]).unwrap_err(),
        PolicyError::TooLong { .. }
    ));
}

#[test]
fn a_policy_without_rules_allows_everything() {
    let policy = Policy::compile([("empty.rego", "package lanyard\n")]).unwrap();
    let mut entry = good_entry();
    entry.owner = None;
    entry.admin = true;
    assert!(
        policy
            .evaluate_entry(&input(&entry, &[], now()))
            .unwrap()
            .passes()
    );
}

#[test]
fn an_exceptions_status_is_active_then_expired_or_revoked() {
    let second = Duration::from_secs(1);
    let mut exception = exception("x", &["admin-needs-exception"], 100 * second);
    let start = exception.created_at;
    assert_eq!(exception.status(start), ExceptionStatus::Active);
    assert_eq!(
        exception.status(start + 100 * second),
        ExceptionStatus::Expired,
        "it lapses at its expiry"
    );
    // A revocation counts once its time has come, and wins over a later expiry.
    exception.revoked_at = Some(start + 50 * second);
    assert_eq!(
        exception.status(start + 49 * second),
        ExceptionStatus::Active
    );
    assert_eq!(
        exception.status(start + 50 * second),
        ExceptionStatus::Revoked
    );
    assert_eq!(
        exception.status(start + 200 * second),
        ExceptionStatus::Revoked
    );
    assert_eq!(ExceptionStatus::Revoked.as_str(), "revoked");
}
