-- Lanyard datastore schema, version 2: governance.

-- What created an entry: a declared entries file's label, or `grant`.
ALTER TABLE registered_entries ADD COLUMN source TEXT;
CREATE INDEX registered_entries_source ON registered_entries (source);

-- Exceptions to the policy. `rules` and `entry_ids` are JSON arrays of strings, sorted.
CREATE TABLE policy_exceptions (
    id                TEXT PRIMARY KEY NOT NULL,
    owner             TEXT NOT NULL,
    reason            TEXT NOT NULL,
    ticket            TEXT,
    rules             TEXT NOT NULL,
    entry_ids         TEXT NOT NULL,
    spiffe_id_pattern TEXT,
    expires_at        INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    created_by        TEXT NOT NULL,
    revoked_at        INTEGER
);

-- The usage ledger: every SVID issued, kept for the retention period.
-- `exception_ids` is a JSON array of strings.
CREATE TABLE issuances (
    kind          TEXT NOT NULL,   -- x509-svid | jwt-svid | agent-svid
    serial        TEXT NOT NULL,   -- decimal serial, or the JWT's jti
    entry_id      TEXT NOT NULL,   -- empty for agent SVIDs
    spiffe_id     TEXT NOT NULL,
    agent_id      TEXT NOT NULL,
    authority_id  TEXT NOT NULL,
    issued_at     INTEGER NOT NULL,
    not_after     INTEGER NOT NULL,
    exception_ids TEXT NOT NULL,
    PRIMARY KEY (kind, serial)
) WITHOUT ROWID;
CREATE INDEX issuances_entry ON issuances (entry_id, agent_id, issued_at);
CREATE INDEX issuances_spiffe_id ON issuances (spiffe_id);
CREATE INDEX issuances_authority ON issuances (authority_id, not_after);
CREATE INDEX issuances_issued_at ON issuances (issued_at);

-- When each agent last served each entry to a workload, as the agents report it.
CREATE TABLE entry_usage (
    entry_id       TEXT NOT NULL,
    agent_id       TEXT NOT NULL,
    last_served_at INTEGER NOT NULL,
    PRIMARY KEY (entry_id, agent_id)
) WITHOUT ROWID;
