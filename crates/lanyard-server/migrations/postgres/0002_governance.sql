-- Lanyard datastore schema for PostgreSQL, version 2: governance (as `migrations/sqlite/`).

ALTER TABLE registered_entries ADD COLUMN source TEXT COLLATE "C";
CREATE INDEX registered_entries_source ON registered_entries (source);

CREATE TABLE policy_exceptions (
    id                TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    owner             TEXT COLLATE "C" NOT NULL,
    reason            TEXT COLLATE "C" NOT NULL,
    ticket            TEXT COLLATE "C",
    rules             TEXT COLLATE "C" NOT NULL,
    entry_ids         TEXT COLLATE "C" NOT NULL,
    spiffe_id_pattern TEXT COLLATE "C",
    expires_at        BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    created_by        TEXT COLLATE "C" NOT NULL,
    revoked_at        BIGINT
);

CREATE TABLE issuances (
    kind          TEXT COLLATE "C" NOT NULL,
    serial        TEXT COLLATE "C" NOT NULL,
    entry_id      TEXT COLLATE "C" NOT NULL,
    spiffe_id     TEXT COLLATE "C" NOT NULL,
    agent_id      TEXT COLLATE "C" NOT NULL,
    authority_id  TEXT COLLATE "C" NOT NULL,
    issued_at     BIGINT NOT NULL,
    not_after     BIGINT NOT NULL,
    exception_ids TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (kind, serial)
);
CREATE INDEX issuances_entry ON issuances (entry_id, agent_id, issued_at);
CREATE INDEX issuances_spiffe_id ON issuances (spiffe_id);
CREATE INDEX issuances_authority ON issuances (authority_id, not_after);
CREATE INDEX issuances_issued_at ON issuances (issued_at);

CREATE TABLE entry_usage (
    entry_id       TEXT COLLATE "C" NOT NULL,
    agent_id       TEXT COLLATE "C" NOT NULL,
    last_served_at BIGINT NOT NULL,
    PRIMARY KEY (entry_id, agent_id)
);
