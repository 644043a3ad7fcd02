# Lanyard's baseline policy: what every registration entry must satisfy, unless an active
# exception that covers it waives the broken rule.
#
# Lanyard asks `violations` on every entry write and at every SVID issuance, and
# `exception_violations` when an exception is created or extended. Each violation names a
# rule (what an exception lists to waive it), says what is wrong and how to fix it.
# Times are Unix seconds; TTLs are seconds with the server defaults applied.
package lanyard

import rego.v1

day := 86400

# The longest an entry may live, from now.
max_entry_lifetime := 90 * day

# The longest TTLs an entry may ask for.
max_x509_svid_ttl := 24 * 3600

max_jwt_svid_ttl := 3600

# The longest an exception may run, from now, each time it is created or extended.
max_exception_lifetime := 30 * day

violations contains v if {
	not has_text(input.entry.owner)
	v := {
		"rule": "owner-required",
		"message": sprintf("entry for %s has no owner", [input.entry.spiffe_id]),
		"fix": "set --owner to the team or person who answers for this identity",
	}
}

violations contains v if {
	not has_text(input.entry.reason)
	v := {
		"rule": "reason-required",
		"message": sprintf("entry for %s has no reason", [input.entry.spiffe_id]),
		"fix": "set --reason to why this workload needs this identity",
	}
}

# Entries kept by a reconciler end with the object they were made for rather than at a date:
# spire-controller-manager deletes a pod's entry when the pod goes away. Their source is set by
# the named admin socket the reconciler writes through (`[[admin_socket]]` in server.toml), and
# the server refuses that source from every other caller, so no one else can claim it.
reconciled_sources := {"spire-controller-manager"}

violations contains v if {
	not is_number(input.entry.expires_at)
	not input.entry.source in reconciled_sources
	v := {
		"rule": "expiry-required",
		"message": sprintf("entry for %s never expires", [input.entry.spiffe_id]),
		"fix": "set --expires-at (at most 90 days from now); renew it while it is still needed",
	}
}

violations contains v if {
	is_number(input.entry.expires_at)
	input.entry.expires_at - input.now > max_entry_lifetime
	v := {
		"rule": "expiry-max-90d",
		"message": sprintf("entry for %s expires in %d days, more than 90", [
			input.entry.spiffe_id,
			floor((input.entry.expires_at - input.now) / day),
		]),
		"fix": "set --expires-at at most 90 days from now",
	}
}

violations contains v if {
	input.entry.x509_svid_ttl > max_x509_svid_ttl
	v := {
		"rule": "x509-ttl-max-24h",
		"message": sprintf("entry for %s asks for X.509-SVIDs valid %ds, more than 24h", [
			input.entry.spiffe_id,
			input.entry.x509_svid_ttl,
		]),
		"fix": "set --x509-svid-ttl to 24h or less",
	}
}

violations contains v if {
	input.entry.jwt_svid_ttl > max_jwt_svid_ttl
	v := {
		"rule": "jwt-ttl-max-1h",
		"message": sprintf("entry for %s asks for JWT-SVIDs valid %ds, more than 1h", [
			input.entry.spiffe_id,
			input.entry.jwt_svid_ttl,
		]),
		"fix": "set --jwt-svid-ttl to 1h or less",
	}
}

violations contains v if {
	input.entry.admin
	v := {
		"rule": "admin-needs-exception",
		"message": sprintf("entry for %s grants admin access to the server API", [input.entry.spiffe_id]),
		"fix": "create an exception waiving admin-needs-exception for this entry, with an owner and an expiry",
	}
}

violations contains v if {
	input.entry.downstream
	v := {
		"rule": "downstream-needs-exception",
		"message": sprintf("entry for %s makes a downstream signing authority", [input.entry.spiffe_id]),
		"fix": "create an exception waiving downstream-needs-exception for this entry, with an owner and an expiry",
	}
}

exception_violations contains v if {
	input.exception.expires_at - input.now > max_exception_lifetime
	v := {
		"rule": "exception-max-30d",
		"message": sprintf("exception %s would run %d days, more than 30", [
			input.exception.id,
			floor((input.exception.expires_at - input.now) / day),
		]),
		"fix": "ask for at most 30 days; extend it again later if it is still needed",
	}
}

exception_violations contains v if {
	not has_text(input.exception.ticket)
	input.exception.rules[_] in {"admin-needs-exception", "downstream-needs-exception"}
	v := {
		"rule": "exception-ticket-required",
		"message": sprintf("exception %s waives an admin or downstream rule without a ticket", [input.exception.id]),
		"fix": "set --ticket to the change or approval record",
	}
}

has_text(s) if {
	is_string(s)
	trim_space(s) != ""
}
