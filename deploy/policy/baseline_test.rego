# Tests for baseline.rego: `lanyard policy test deploy/policy/baseline.rego deploy/policy/baseline_test.rego`.
package lanyard.baseline_test

import rego.v1

import data.lanyard

now := 1800000000

good_entry := {
	"id": "e1",
	"spiffe_id": "spiffe://example.org/user/alice",
	"parent_id": "spiffe://example.org/spire/agent/join_token/t",
	"selectors": ["unix:uid:1000"],
	"x509_svid_ttl": 3600,
	"jwt_svid_ttl": 300,
	"admin": false,
	"downstream": false,
	"owner": "alice",
	"reason": "local development",
	"ticket": null,
	"expires_at": now + 86400,
}

rules(entry) := {v.rule | some v in lanyard.violations with input as {"now": now, "entry": entry}}

test_good_entry_passes if {
	rules(good_entry) == set()
}

test_owner_required if {
	rules(object.union(good_entry, {"owner": null})) == {"owner-required"}
	rules(object.union(good_entry, {"owner": "  "})) == {"owner-required"}
}

test_reason_required if {
	rules(object.union(good_entry, {"reason": null})) == {"reason-required"}
}

test_expiry_required_and_capped if {
	rules(object.union(good_entry, {"expires_at": null})) == {"expiry-required"}
	rules(object.union(good_entry, {"expires_at": now + (91 * 86400)})) == {"expiry-max-90d"}
	rules(object.union(good_entry, {"expires_at": now + (90 * 86400)})) == set()
}

test_reconciled_entries_need_no_expiry_but_still_an_owner if {
	kept := object.union(good_entry, {"expires_at": null, "source": "spire-controller-manager"})
	rules(kept) == set()
	rules(object.union(kept, {"owner": null})) == {"owner-required"}
	rules(object.union(kept, {"expires_at": now + (91 * 86400)})) == {"expiry-max-90d"}
	rules(object.union(good_entry, {"expires_at": null, "source": "hand"})) == {"expiry-required"}
}

test_ttl_caps if {
	rules(object.union(good_entry, {"x509_svid_ttl": 86401})) == {"x509-ttl-max-24h"}
	rules(object.union(good_entry, {"jwt_svid_ttl": 3601})) == {"jwt-ttl-max-1h"}
}

test_admin_and_downstream_need_exceptions if {
	rules(object.union(good_entry, {"admin": true})) == {"admin-needs-exception"}
	rules(object.union(good_entry, {"downstream": true})) == {"downstream-needs-exception"}
}

exception_rules(exception) := {v.rule |
	some v in lanyard.exception_violations with input as {"now": now, "exception": exception}
}

test_exception_capped_at_30_days if {
	exception := {"id": "x1", "rules": ["owner-required"], "ticket": null, "expires_at": now + (31 * 86400)}
	exception_rules(exception) == {"exception-max-30d"}
	exception_rules(object.union(exception, {"expires_at": now + 86400})) == set()
}

test_admin_exception_needs_ticket if {
	exception := {"id": "x2", "rules": ["admin-needs-exception"], "ticket": null, "expires_at": now + 86400}
	exception_rules(exception) == {"exception-ticket-required"}
	exception_rules(object.union(exception, {"ticket": "CHG-1"})) == set()
}

test_messages_count_whole_days_of_a_fractional_span if {
	some v in lanyard.violations with input as {"now": now, "entry": object.union(good_entry, {"expires_at": (now + (91 * 86400)) + 3600})}
	v.message == "entry for spiffe://example.org/user/alice expires in 91 days, more than 90"
	some x in lanyard.exception_violations with input as {"now": now, "exception": {"id": "x3", "rules": ["r"], "ticket": "T", "expires_at": (now + (31 * 86400)) + 7}}
	x.message == "exception x3 would run 31 days, more than 30"
}
