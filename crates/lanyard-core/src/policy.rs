//! Policy as code: Rego rules, evaluated in-process with `regorus`, that every registration
//! entry must pass when it is written and every time an SVID is issued for it, and that
//! every exception must pass when it is created or extended.
//!
//! # The contract between Lanyard and a policy
//!
//! A policy is one or more Rego modules in package `lanyard`. Lanyard asks two questions:
//!
//! - `data.lanyard.violations`, with [`EntryInput`] as `input`: a set of objects
//!   `{"rule": "...", "message": "...", "fix": "..."}`, one per broken rule. An entry with no
//!   violations passes. An entry whose violations are all waived by active exceptions that
//!   cover it passes *under* those exceptions.
//! - `data.lanyard.exception_violations`, with [`ExceptionInput`] as `input`: the same shape,
//!   for an exception being created or extended (for example, to cap its lifetime). Exceptions
//!   cannot be waived.
//!
//! An undefined rule means no violations, so a policy may define either question or both.
//! Times are Unix seconds; TTLs are seconds, with the server's defaults already applied.
//!
//! Rules whose name starts with `test_` are the policy's own tests ([`Policy::run_tests`]):
//! each must evaluate to `true`.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::entry::RegistrationEntry;

/// The Rego package every Lanyard policy declares.
pub const PACKAGE: &str = "lanyard";

const VIOLATIONS_RULE: &str = "data.lanyard.violations";
const EXCEPTION_VIOLATIONS_RULE: &str = "data.lanyard.exception_violations";

/// The longest a policy source may be, a bound on what a config file can make us parse.
pub const MAX_POLICY_LEN: usize = 1024 * 1024;

/// Why a policy could not be loaded or evaluated.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A module does not parse or compile.
    #[error("policy {name} does not compile: {message}")]
    Compile {
        /// The module's name (usually its path).
        name: String,
        /// What regorus said.
        message: String,
    },
    /// A module declares another package than [`PACKAGE`].
    #[error("policy {name} declares package {package}; Lanyard policies are in package {PACKAGE}")]
    WrongPackage {
        /// The module's name.
        name: String,
        /// The package it declares.
        package: String,
    },
    /// A module is longer than [`MAX_POLICY_LEN`].
    #[error("policy {name} is {len} bytes, more than the {MAX_POLICY_LEN} allowed")]
    TooLong {
        /// The module's name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// Evaluation failed (a runtime error in the policy, or a time limit).
    #[error("evaluating {rule} failed: {message}")]
    Evaluation {
        /// The rule that was asked.
        rule: String,
        /// What regorus said.
        message: String,
    },
    /// A rule returned something other than a set of violation objects.
    #[error("{rule} must be a set of objects with string fields rule and message: {message}")]
    Shape {
        /// The rule that was asked.
        rule: String,
        /// What was wrong.
        message: String,
    },
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Violation {
    /// A short stable name, which exceptions list to waive it (`owner-required`).
    pub rule: String,
    /// What is wrong, for people.
    pub message: String,
    /// How to fix it, when the policy says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.rule, self.message)?;
        if let Some(fix) = &self.fix {
            write!(f, " (fix: {fix})")?;
        }
        Ok(())
    }
}

/// Formats violations as one line each, for error messages.
pub fn describe_violations(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What the policy sees of the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerInput {
    /// The caller's SPIFFE ID, when it presented one.
    #[serde(default)]
    pub id: Option<String>,
    /// Whether it came through a local admin socket.
    #[serde(default)]
    pub local: bool,
    /// The name of the named admin socket it came through (`[[admin_socket]]` in the
    /// server's config), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// What the policy sees of an entry (`input.entry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryView {
    /// The entry ID (empty before creation assigns one).
    pub id: String,
    /// The SPIFFE ID it grants.
    pub spiffe_id: String,
    /// Its parent.
    pub parent_id: String,
    /// Its selectors as `type:value`.
    pub selectors: Vec<String>,
    /// The X.509-SVID TTL in seconds, the server default applied.
    pub x509_svid_ttl: u64,
    /// The JWT-SVID TTL in seconds, the server default applied.
    pub jwt_svid_ttl: u64,
    /// Admin entry.
    pub admin: bool,
    /// Downstream entry.
    pub downstream: bool,
    /// Federated trust domains.
    pub federates_with: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// The hint.
    pub hint: String,
    /// SVIDs stored by the agent.
    pub store_svid: bool,
    /// The owner, if any.
    pub owner: Option<String>,
    /// The reason, if any.
    pub reason: Option<String>,
    /// The ticket, if any.
    pub ticket: Option<String>,
    /// When the entry expires (Unix seconds), if it does.
    pub expires_at: Option<u64>,
    /// What created it (a declared file's label, `grant`), if known.
    #[serde(default)]
    pub source: Option<String>,
}

impl EntryView {
    /// The view of `entry`, with `default_x509_ttl` and `default_jwt_ttl` for unset TTLs.
    pub fn new(
        entry: &RegistrationEntry,
        default_x509_ttl: Duration,
        default_jwt_ttl: Duration,
    ) -> Self {
        Self {
            id: entry.id.as_str().to_owned(),
            spiffe_id: entry.spiffe_id.to_string(),
            parent_id: entry.parent_id.to_string(),
            selectors: entry.selectors.iter().map(ToString::to_string).collect(),
            x509_svid_ttl: entry.x509_svid_ttl.unwrap_or(default_x509_ttl).as_secs(),
            jwt_svid_ttl: entry.jwt_svid_ttl.unwrap_or(default_jwt_ttl).as_secs(),
            admin: entry.admin,
            downstream: entry.downstream,
            federates_with: entry
                .federates_with
                .iter()
                .map(ToString::to_string)
                .collect(),
            dns_names: entry.dns_names.clone(),
            hint: entry.hint.clone(),
            store_svid: entry.store_svid,
            owner: entry.owner.clone(),
            reason: entry.reason.clone(),
            ticket: entry.ticket.clone(),
            expires_at: entry.expires_at.map(unix_seconds),
            source: entry.source.clone(),
        }
    }
}

/// Why the policy is being asked about an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// The entry is being created.
    Create,
    /// The entry is being updated.
    Update,
    /// An SVID is being issued for it.
    Issue,
    /// A dry run (`lanyard policy check`).
    Check,
}

/// `input` for `data.lanyard.violations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInput {
    /// Why the policy is asked.
    pub operation: Operation,
    /// Now, in Unix seconds.
    pub now: u64,
    /// Who is asking (absent at issuance).
    pub caller: Option<CallerInput>,
    /// The entry.
    pub entry: EntryView,
    /// The active exceptions that cover this entry.
    pub exceptions: Vec<ExceptionView>,
}

impl EntryInput {
    /// A minimal input used to check that a policy evaluates at all.
    fn probe(now: u64) -> Self {
        Self {
            operation: Operation::Check,
            now,
            caller: None,
            entry: EntryView {
                id: String::new(),
                spiffe_id: String::new(),
                parent_id: String::new(),
                selectors: Vec::new(),
                x509_svid_ttl: 0,
                jwt_svid_ttl: 0,
                admin: false,
                downstream: false,
                federates_with: Vec::new(),
                dns_names: Vec::new(),
                hint: String::new(),
                store_svid: false,
                owner: None,
                reason: None,
                ticket: None,
                expires_at: None,
                source: None,
            },
            exceptions: Vec::new(),
        }
    }
}

/// What the policy sees of an exception.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExceptionView {
    /// Its ID.
    pub id: String,
    /// Who owns it.
    pub owner: String,
    /// Why it exists.
    pub reason: String,
    /// The ticket that approved it, if any.
    pub ticket: Option<String>,
    /// The rules it waives.
    pub rules: Vec<String>,
    /// The entry IDs it covers.
    pub entry_ids: Vec<String>,
    /// The SPIFFE ID pattern it covers, if any.
    pub spiffe_id_pattern: Option<String>,
    /// When it lapses (Unix seconds).
    pub expires_at: u64,
    /// When it was created (Unix seconds).
    pub created_at: u64,
}

/// `input` for `data.lanyard.exception_violations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExceptionInput {
    /// `create` or `extend`.
    pub operation: String,
    /// Now, in Unix seconds.
    pub now: u64,
    /// Who is asking.
    pub caller: Option<CallerInput>,
    /// The exception as it would be after the operation.
    pub exception: ExceptionView,
}

/// The outcome of evaluating an entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Violations no active exception waives: the entry does not pass while any remain.
    pub violations: Vec<Violation>,
    /// Violations waived, each with the exception that waived it.
    pub waived: Vec<(Violation, String)>,
}

impl Decision {
    /// Whether the entry passes (possibly under exceptions).
    pub fn passes(&self) -> bool {
        self.violations.is_empty()
    }

    /// The IDs of the exceptions the entry passes under, sorted and deduplicated.
    pub fn exceptions_used(&self) -> Vec<String> {
        let ids: BTreeSet<&String> = self.waived.iter().map(|(_, id)| id).collect();
        ids.into_iter().cloned().collect()
    }
}

/// The result of one of a policy's own tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestOutcome {
    /// `data.<package>.test_…`.
    pub name: String,
    /// Whether it evaluated to `true`.
    pub passed: bool,
    /// Why it failed, when it did not evaluate to `true`.
    pub detail: Option<String>,
}

/// A compiled policy. Cheap to clone; each evaluation works on its own copy of the engine,
/// so one `Policy` serves many threads.
#[derive(Clone)]
pub struct Policy {
    engine: regorus::Engine,
    modules: Vec<Module>,
}

#[derive(Clone)]
struct Module {
    name: String,
    package: String,
    source: String,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field(
                "modules",
                &self.modules.iter().map(|m| &m.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Compiles `modules` (name, Rego source). Every module must be in package [`PACKAGE`]
    /// (or a subpackage, for helpers and tests), and together they must compile.
    pub fn compile<'a>(
        modules: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, PolicyError> {
        let mut engine = regorus::Engine::new();
        let mut loaded = Vec::new();
        for (name, source) in modules {
            if source.len() > MAX_POLICY_LEN {
                return Err(PolicyError::TooLong {
                    name: name.to_owned(),
                    len: source.len(),
                });
            }
            let package = engine
                .add_policy(name.to_owned(), source.to_owned())
                .map_err(|e| PolicyError::Compile {
                    name: name.to_owned(),
                    message: e.to_string(),
                })?;
            let package = package.strip_prefix("data.").unwrap_or(&package).to_owned();
            if package != PACKAGE && !package.starts_with(&format!("{PACKAGE}.")) {
                return Err(PolicyError::WrongPackage {
                    name: name.to_owned(),
                    package,
                });
            }
            loaded.push(Module {
                name: name.to_owned(),
                package,
                source: source.to_owned(),
            });
        }
        let policy = Self {
            engine,
            modules: loaded,
        };
        // Asking both questions once surfaces what only shows when rules are resolved
        // together (conflicting definitions, unknown functions, a non-set answer).
        let now = 0;
        policy
            .evaluate_entry(&EntryInput::probe(now))
            .map_err(|e| PolicyError::Compile {
                name: policy.module_names().join(", "),
                message: e.to_string(),
            })?;
        Ok(policy)
    }

    /// Bounds the time one evaluation may take: a policy that runs longer fails to evaluate
    /// (and so fails closed) instead of stalling issuance. The limit is enforced by the Rego
    /// engine, which reads the host's monotonic clock while it runs.
    pub fn with_time_limit(mut self, limit: std::time::Duration) -> Self {
        self.engine
            .set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
                limit,
                check_interval: std::num::NonZeroU32::MIN,
            });
        self
    }

    /// The module names, in load order.
    pub fn module_names(&self) -> Vec<&str> {
        self.modules.iter().map(|m| m.name.as_str()).collect()
    }

    /// Evaluates an entry and applies the exceptions in `input.exceptions`: a violation of
    /// rule R is waived when one of them lists R. The caller passes only exceptions that are
    /// active (not expired, not revoked) and cover the entry; see [`Exception::covers`].
    pub fn evaluate_entry(&self, input: &EntryInput) -> Result<Decision, PolicyError> {
        let violations = self.violations(VIOLATIONS_RULE, input)?;
        let mut decision = Decision::default();
        for violation in violations {
            let waiver = input
                .exceptions
                .iter()
                .find(|exception| exception.rules.contains(&violation.rule));
            match waiver {
                Some(exception) => decision.waived.push((violation, exception.id.clone())),
                None => decision.violations.push(violation),
            }
        }
        Ok(decision)
    }

    /// Evaluates an exception being created or extended. Exceptions are never waived.
    pub fn evaluate_exception(
        &self,
        input: &ExceptionInput,
    ) -> Result<Vec<Violation>, PolicyError> {
        self.violations(EXCEPTION_VIOLATIONS_RULE, input)
    }

    /// Runs every rule named `test_*` in the policy's packages.
    pub fn run_tests(&self) -> Result<Vec<TestOutcome>, PolicyError> {
        let mut engine = self.engine.clone();
        engine.set_input(regorus::Value::new_object());
        let tests: BTreeSet<String> = self
            .modules
            .iter()
            .flat_map(|module| {
                test_rule_names(&module.source)
                    .into_iter()
                    .map(move |rule| format!("data.{}.{rule}", module.package))
            })
            .collect();
        let mut outcomes = Vec::new();
        for name in tests {
            let outcome = match engine.eval_rule(name.clone()) {
                Ok(regorus::Value::Bool(true)) => TestOutcome {
                    name,
                    passed: true,
                    detail: None,
                },
                Ok(regorus::Value::Undefined) => TestOutcome {
                    name,
                    passed: false,
                    detail: Some("undefined (a condition in its body is false)".to_owned()),
                },
                Ok(value) => TestOutcome {
                    name,
                    passed: false,
                    detail: Some(format!(
                        "evaluated to {}",
                        value.to_json_str().unwrap_or_else(|_| "?".to_owned())
                    )),
                },
                Err(e) => TestOutcome {
                    name,
                    passed: false,
                    detail: Some(e.to_string()),
                },
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    fn violations(
        &self,
        rule: &str,
        input: &impl Serialize,
    ) -> Result<Vec<Violation>, PolicyError> {
        let evaluation = |message: String| PolicyError::Evaluation {
            rule: rule.to_owned(),
            message,
        };
        let shape = |message: String| PolicyError::Shape {
            rule: rule.to_owned(),
            message,
        };
        let input = serde_json::to_string(input).map_err(|e| evaluation(e.to_string()))?;
        let mut engine = self.engine.clone();
        engine.set_input(
            regorus::Value::from_json_str(&input).map_err(|e| evaluation(e.to_string()))?,
        );
        // A query, not `eval_rule`: a rule the policy does not define is undefined (no
        // violations), not an error.
        let results = engine
            .eval_query(rule.to_owned(), false)
            .map_err(|e| evaluation(e.to_string()))?;
        let Some(value) = results
            .result
            .first()
            .and_then(|result| result.expressions.first())
            .map(|expression| &expression.value)
        else {
            return Ok(Vec::new());
        };
        if *value == regorus::Value::Undefined {
            return Ok(Vec::new());
        }
        let json = value.to_json_str().map_err(|e| shape(e.to_string()))?;
        let items: Vec<serde_json::Value> = match serde_json::from_str(&json) {
            Ok(serde_json::Value::Array(items)) => items,
            Ok(other) => return Err(shape(format!("got {other}"))),
            Err(e) => return Err(shape(e.to_string())),
        };
        let mut violations = items
            .into_iter()
            .map(|item| {
                serde_json::from_value::<Violation>(item.clone())
                    .map_err(|e| shape(format!("{item}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        violations.sort();
        violations.dedup();
        Ok(violations)
    }
}

/// The names of the rules defined at the start of a line as `test_… if`, `test_… {`,
/// `test_… :=` or `test_… =`: OPA's convention for a module's tests.
fn test_rule_names(source: &str) -> BTreeSet<String> {
    source
        .lines()
        .filter_map(|line| {
            let name_len = line
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            let (name, rest) = line.split_at(name_len);
            let rest = rest.trim_start();
            let is_head = rest.starts_with("if")
                || rest.starts_with('{')
                || rest.starts_with(":=")
                || rest.starts_with('=');
            (name.starts_with("test_") && is_head).then(|| name.to_owned())
        })
        .collect()
}

/// An exception: a named, owned, expiring waiver of some policy rules for some entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exception {
    /// Its ID.
    pub id: String,
    /// Who owns it (answers for it, renews or revokes it).
    pub owner: String,
    /// Why it exists.
    pub reason: String,
    /// The ticket that approved it.
    pub ticket: Option<String>,
    /// The rules it waives.
    pub rules: BTreeSet<String>,
    /// Entry IDs it covers.
    pub entry_ids: BTreeSet<String>,
    /// A SPIFFE ID pattern it covers: an exact ID, or a prefix ending in `/*`
    /// (`spiffe://example.org/ci/*` covers every ID under `/ci/`).
    pub spiffe_id_pattern: Option<String>,
    /// When it lapses.
    pub expires_at: SystemTime,
    /// When it was created.
    pub created_at: SystemTime,
    /// Who created it.
    pub created_by: String,
    /// When it was revoked, if it was.
    pub revoked_at: Option<SystemTime>,
    /// Counts its changes: 1 when created, one more at every extend or revoke. The datastore
    /// keeps it; an update names the revision it read and fails if it has moved.
    #[serde(default)]
    pub revision: i64,
}

/// Where an exception stands at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExceptionStatus {
    /// In force.
    Active,
    /// Past its expiry, never revoked before it.
    Expired,
    /// Revoked (a revocation only counts once its time has come).
    Revoked,
}

impl ExceptionStatus {
    /// `active`, `expired` or `revoked`, as reports and the CLI show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }
}

impl Exception {
    /// Whether it is in force at `now`: not revoked and not yet expired.
    pub fn is_active(&self, now: SystemTime) -> bool {
        self.revoked_at.is_none_or(|revoked| revoked > now) && now < self.expires_at
    }

    /// Its status at `now`: active while [`Exception::is_active`]; after that revoked if its
    /// revocation has come, else expired.
    pub fn status(&self, now: SystemTime) -> ExceptionStatus {
        if self.is_active(now) {
            ExceptionStatus::Active
        } else if self.revoked_at.is_some_and(|revoked| revoked <= now) {
            ExceptionStatus::Revoked
        } else {
            ExceptionStatus::Expired
        }
    }

    /// Whether its scope includes the entry with `entry_id` and `spiffe_id`.
    pub fn covers(&self, entry_id: &str, spiffe_id: &str) -> bool {
        self.entry_ids.contains(entry_id)
            || self
                .spiffe_id_pattern
                .as_deref()
                .is_some_and(|pattern| spiffe_id_matches(pattern, spiffe_id))
    }

    /// What the policy sees of it.
    pub fn view(&self) -> ExceptionView {
        ExceptionView {
            id: self.id.clone(),
            owner: self.owner.clone(),
            reason: self.reason.clone(),
            ticket: self.ticket.clone(),
            rules: self.rules.iter().cloned().collect(),
            entry_ids: self.entry_ids.iter().cloned().collect(),
            spiffe_id_pattern: self.spiffe_id_pattern.clone(),
            expires_at: unix_seconds(self.expires_at),
            created_at: unix_seconds(self.created_at),
        }
    }
}

/// Whether `spiffe_id` matches `pattern`: equal, or `pattern` ends in `/*` and `spiffe_id`
/// lies strictly below the part before it.
pub fn spiffe_id_matches(pattern: &str, spiffe_id: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some(prefix) => spiffe_id
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.len() > 1 && rest.starts_with('/')),
        None => pattern == spiffe_id,
    }
}

/// The active exceptions among `exceptions` that cover the entry, as the policy sees them.
pub fn covering_exceptions<'a>(
    exceptions: impl IntoIterator<Item = &'a Exception>,
    entry_id: &str,
    spiffe_id: &str,
    now: SystemTime,
) -> Vec<ExceptionView> {
    exceptions
        .into_iter()
        .filter(|exception| exception.is_active(now) && exception.covers(entry_id, spiffe_id))
        .map(Exception::view)
        .collect()
}

/// Seconds since the Unix epoch, 0 before it.
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
