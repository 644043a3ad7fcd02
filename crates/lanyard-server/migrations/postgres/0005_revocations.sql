-- Lanyard datastore schema for PostgreSQL, version 5: revocations (as `migrations/sqlite/`).

CREATE TABLE revocations (
    id         TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    sequence   BIGINT NOT NULL UNIQUE,
    kind       TEXT COLLATE "C" NOT NULL,
    value      TEXT COLLATE "C" NOT NULL,
    owner      TEXT COLLATE "C" NOT NULL,
    reason     TEXT COLLATE "C" NOT NULL,
    ticket     TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT COLLATE "C" NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX revocations_expires_at ON revocations (expires_at);

CREATE TABLE revoked_serials (
    revocation_id TEXT COLLATE "C" NOT NULL REFERENCES revocations (id) ON DELETE CASCADE,
    serial        TEXT COLLATE "C" NOT NULL,
    authority_id  TEXT COLLATE "C" NOT NULL,
    revoked_at    BIGINT NOT NULL,
    PRIMARY KEY (revocation_id, serial)
);

CREATE TABLE revocation_acks (
    agent_id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    sequence BIGINT NOT NULL,
    acked_at BIGINT NOT NULL
);
