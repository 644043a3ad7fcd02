-- Lanyard datastore schema, version 5: revocations (`lanyard revoke`).

-- Records that stop SVIDs before they expire, numbered in the order they were made.
CREATE TABLE revocations (
    id         TEXT PRIMARY KEY NOT NULL,
    sequence   INTEGER NOT NULL UNIQUE,
    kind       TEXT NOT NULL,     -- x509-serial | spiffe-id | entry | agent | jwt-id
    value      TEXT NOT NULL,     -- the serial, SPIFFE ID, entry ID, agent ID or jti
    owner      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    ticket     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    expires_at INTEGER NOT NULL   -- every SVID it can cover has expired by then
);
CREATE INDEX revocations_expires_at ON revocations (expires_at);

-- The X.509 serials each revocation puts on the CRLs: named outright, found in the ledger,
-- or reported by the agents that dropped them. An empty `authority_id` lists the serial on
-- every authority's CRL.
CREATE TABLE revoked_serials (
    revocation_id TEXT NOT NULL REFERENCES revocations (id) ON DELETE CASCADE,
    serial        TEXT NOT NULL,
    authority_id  TEXT NOT NULL,
    revoked_at    INTEGER NOT NULL,
    PRIMARY KEY (revocation_id, serial)
) WITHOUT ROWID;

-- The highest revocation sequence each agent has applied, and when it said so.
CREATE TABLE revocation_acks (
    agent_id TEXT PRIMARY KEY NOT NULL,
    sequence INTEGER NOT NULL,
    acked_at INTEGER NOT NULL
) WITHOUT ROWID;
