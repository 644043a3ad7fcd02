-- Lanyard datastore schema for PostgreSQL, version 1: the same tables as the SQLite schema
-- of the same version (`migrations/sqlite/`), in PostgreSQL's types.
--
-- Times are unix seconds (BIGINT), booleans 0/1 (BIGINT), as in SQLite, so that both stores
-- share their queries. Text compares byte-wise (COLLATE "C") whatever the database's locale,
-- so paging orders IDs the same way on every backend. Never edit an applied migration; add a
-- new numbered file instead.

-- One row holding the global revision counter of the change log. Every write transaction
-- locks this row first, so writes from all servers are serialized and revisions are
-- committed in order.
CREATE TABLE store_state (
    id       BIGINT PRIMARY KEY CHECK (id = 1),
    revision BIGINT NOT NULL
);
INSERT INTO store_state (id, revision) VALUES (1, 0);

-- Every change to an entry, agent, bundle or exception, by global revision.
CREATE TABLE changes (
    revision     BIGINT PRIMARY KEY,
    kind         TEXT COLLATE "C" NOT NULL,
    subject_type TEXT COLLATE "C" NOT NULL,
    subject      TEXT COLLATE "C" NOT NULL
);

CREATE TABLE bundles (
    trust_domain    TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    sequence_number BIGINT NOT NULL,
    refresh_hint    BIGINT
);

CREATE TABLE bundle_x509_authorities (
    trust_domain TEXT COLLATE "C" NOT NULL REFERENCES bundles (trust_domain) ON DELETE CASCADE,
    position     BIGINT NOT NULL,
    der          BYTEA NOT NULL,
    tainted      BIGINT NOT NULL,
    PRIMARY KEY (trust_domain, position)
);

CREATE TABLE bundle_jwt_authorities (
    trust_domain TEXT COLLATE "C" NOT NULL REFERENCES bundles (trust_domain) ON DELETE CASCADE,
    position     BIGINT NOT NULL,
    key_id       TEXT COLLATE "C" NOT NULL,
    public_key   BYTEA NOT NULL,
    expires_at   BIGINT,
    tainted      BIGINT NOT NULL,
    PRIMARY KEY (trust_domain, position)
);

CREATE TABLE registered_entries (
    entry_id        TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    spiffe_id       TEXT COLLATE "C" NOT NULL,
    parent_id       TEXT COLLATE "C" NOT NULL,
    selectors       TEXT COLLATE "C" NOT NULL,
    federates_with  TEXT COLLATE "C" NOT NULL,
    x509_svid_ttl   BIGINT,
    jwt_svid_ttl    BIGINT,
    admin           BIGINT NOT NULL,
    downstream      BIGINT NOT NULL,
    expires_at      BIGINT,
    dns_names       TEXT COLLATE "C" NOT NULL,
    revision_number BIGINT NOT NULL,
    store_svid      BIGINT NOT NULL,
    hint            TEXT COLLATE "C" NOT NULL,
    created_at      BIGINT NOT NULL,
    owner           TEXT COLLATE "C",
    reason          TEXT COLLATE "C",
    ticket          TEXT COLLATE "C"
);
-- IDs and the selectors' canonical JSON can be longer than a btree row holds: the unique
-- index compares their hashes (the store looks for a similar entry by the text itself before
-- it inserts).
CREATE UNIQUE INDEX registered_entries_similar
    ON registered_entries (md5(spiffe_id), md5(parent_id), md5(selectors));
CREATE INDEX registered_entries_parent_id ON registered_entries (parent_id);
CREATE INDEX registered_entries_hint ON registered_entries (hint);
CREATE INDEX registered_entries_expires_at ON registered_entries (expires_at);

CREATE TABLE entry_selectors (
    entry_id TEXT COLLATE "C" NOT NULL REFERENCES registered_entries (entry_id) ON DELETE CASCADE,
    type     TEXT COLLATE "C" NOT NULL,
    value    TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (entry_id, type, value)
);
CREATE INDEX entry_selectors_by_selector ON entry_selectors (type, value);

CREATE TABLE entry_federates_with (
    entry_id     TEXT COLLATE "C" NOT NULL REFERENCES registered_entries (entry_id) ON DELETE CASCADE,
    trust_domain TEXT COLLATE "C" NOT NULL REFERENCES bundles (trust_domain),
    PRIMARY KEY (entry_id, trust_domain)
);
CREATE INDEX entry_federates_with_by_trust_domain ON entry_federates_with (trust_domain);

CREATE TABLE attested_agents (
    spiffe_id         TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    attestation_type  TEXT COLLATE "C" NOT NULL,
    serial_number     TEXT COLLATE "C" NOT NULL,
    expires_at        BIGINT NOT NULL,
    new_serial_number TEXT COLLATE "C" NOT NULL,
    new_expires_at    BIGINT,
    can_reattest      BIGINT NOT NULL,
    selectors         TEXT COLLATE "C" NOT NULL,
    agent_version     TEXT COLLATE "C" NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);
CREATE INDEX attested_agents_expires_at ON attested_agents (expires_at);

CREATE TABLE agent_selectors (
    spiffe_id TEXT COLLATE "C" NOT NULL REFERENCES attested_agents (spiffe_id) ON DELETE CASCADE,
    type      TEXT COLLATE "C" NOT NULL,
    value     TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (spiffe_id, type, value)
);
CREATE INDEX agent_selectors_by_selector ON agent_selectors (type, value);

CREATE TABLE join_tokens (
    token      TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX join_tokens_expires_at ON join_tokens (expires_at);

CREATE TABLE ca_journals (
    server_key TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    data       BYTEA NOT NULL
);

CREATE TABLE meta (
    key   TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    value BYTEA NOT NULL
);
