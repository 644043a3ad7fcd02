-- Lanyard datastore schema, version 1.
--
-- Times are unix seconds (INTEGER), booleans 0/1. Migrations are applied in order by
-- `sqlx::migrate!()` when the server opens the database; never edit an applied migration,
-- add a new numbered file instead.

-- One row holding the global revision counter of the change log.
CREATE TABLE store_state (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
);
INSERT INTO store_state (id, revision) VALUES (1, 0);

-- Every change to an entry, agent or bundle, by global revision.
CREATE TABLE changes (
    revision     INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,   -- created | updated | deleted
    subject_type TEXT NOT NULL,   -- entry | agent | bundle
    subject      TEXT NOT NULL    -- entry ID, agent SPIFFE ID or trust domain name
);

-- Trust bundles, own and federated, with authorities in child tables in insertion order.
CREATE TABLE bundles (
    trust_domain    TEXT PRIMARY KEY NOT NULL,
    sequence_number INTEGER NOT NULL, -- u64 stored bit for bit
    refresh_hint    INTEGER           -- seconds; NULL = none
);

CREATE TABLE bundle_x509_authorities (
    trust_domain TEXT NOT NULL REFERENCES bundles (trust_domain) ON DELETE CASCADE,
    position     INTEGER NOT NULL,
    der          BLOB NOT NULL,
    tainted      INTEGER NOT NULL,
    PRIMARY KEY (trust_domain, position)
);

CREATE TABLE bundle_jwt_authorities (
    trust_domain TEXT NOT NULL REFERENCES bundles (trust_domain) ON DELETE CASCADE,
    position     INTEGER NOT NULL,
    key_id       TEXT NOT NULL,
    public_key   BLOB NOT NULL,   -- DER SubjectPublicKeyInfo
    expires_at   INTEGER,
    tainted      INTEGER NOT NULL,
    PRIMARY KEY (trust_domain, position)
);

-- Registration entries. `selectors` and `federates_with` are canonical JSON arrays (sorted,
-- no duplicates): reads decode them, and the unique index below rejects similar entries.
-- The child tables hold the same sets, one row per member, for the set filters.
CREATE TABLE registered_entries (
    entry_id        TEXT PRIMARY KEY NOT NULL,
    spiffe_id       TEXT NOT NULL,
    parent_id       TEXT NOT NULL,
    selectors       TEXT NOT NULL,
    federates_with  TEXT NOT NULL,
    x509_svid_ttl   INTEGER,          -- seconds; NULL = server default
    jwt_svid_ttl    INTEGER,          -- seconds; NULL = server default
    admin           INTEGER NOT NULL,
    downstream      INTEGER NOT NULL,
    expires_at      INTEGER,
    dns_names       TEXT NOT NULL,    -- JSON array, in order
    revision_number INTEGER NOT NULL,
    store_svid      INTEGER NOT NULL,
    hint            TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    owner           TEXT,
    reason          TEXT,
    ticket          TEXT
);
CREATE UNIQUE INDEX registered_entries_similar
    ON registered_entries (spiffe_id, parent_id, selectors);
CREATE INDEX registered_entries_parent_id ON registered_entries (parent_id);
CREATE INDEX registered_entries_hint ON registered_entries (hint);
CREATE INDEX registered_entries_expires_at ON registered_entries (expires_at);

CREATE TABLE entry_selectors (
    entry_id TEXT NOT NULL REFERENCES registered_entries (entry_id) ON DELETE CASCADE,
    type     TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (entry_id, type, value)
) WITHOUT ROWID;
CREATE INDEX entry_selectors_by_selector ON entry_selectors (type, value);

-- A bundle cannot be deleted while entries federate with it (the store also checks first,
-- to honour SPIRE's delete modes).
CREATE TABLE entry_federates_with (
    entry_id     TEXT NOT NULL REFERENCES registered_entries (entry_id) ON DELETE CASCADE,
    trust_domain TEXT NOT NULL REFERENCES bundles (trust_domain),
    PRIMARY KEY (entry_id, trust_domain)
) WITHOUT ROWID;
CREATE INDEX entry_federates_with_by_trust_domain ON entry_federates_with (trust_domain);

-- Attested agents (SPIRE's attested nodes). An empty serial_number means banned.
-- `selectors` is the canonical JSON of the node selectors, also in agent_selectors.
CREATE TABLE attested_agents (
    spiffe_id         TEXT PRIMARY KEY NOT NULL,
    attestation_type  TEXT NOT NULL,
    serial_number     TEXT NOT NULL,
    expires_at        INTEGER NOT NULL,
    new_serial_number TEXT NOT NULL,
    new_expires_at    INTEGER,
    can_reattest      INTEGER NOT NULL,
    selectors         TEXT NOT NULL,
    agent_version     TEXT NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);
CREATE INDEX attested_agents_expires_at ON attested_agents (expires_at);

CREATE TABLE agent_selectors (
    spiffe_id TEXT NOT NULL REFERENCES attested_agents (spiffe_id) ON DELETE CASCADE,
    type      TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (spiffe_id, type, value)
) WITHOUT ROWID;
CREATE INDEX agent_selectors_by_selector ON agent_selectors (type, value);

-- One-time join tokens.
CREATE TABLE join_tokens (
    token      TEXT PRIMARY KEY NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX join_tokens_expires_at ON join_tokens (expires_at);

-- Each server's CA journal: an opaque blob owned by the CA manager (no private keys).
CREATE TABLE ca_journals (
    server_key TEXT PRIMARY KEY NOT NULL,
    data       BLOB NOT NULL
);

-- Small server state by key.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
