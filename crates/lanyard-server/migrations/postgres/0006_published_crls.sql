-- Lanyard datastore schema for PostgreSQL, version 6: shared CRLs (as `migrations/sqlite/`).

CREATE TABLE published_crls (
    authority_id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    der          BYTEA NOT NULL,
    number       BIGINT NOT NULL,
    next_update  BIGINT NOT NULL
);
