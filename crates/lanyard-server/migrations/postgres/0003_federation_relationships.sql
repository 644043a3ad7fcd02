-- Lanyard datastore schema for PostgreSQL, version 3: federation relationships (as
-- `migrations/sqlite/`).

CREATE TABLE federation_relationships (
    trust_domain            TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    bundle_endpoint_url     TEXT COLLATE "C" NOT NULL,
    bundle_endpoint_profile TEXT COLLATE "C" NOT NULL,
    endpoint_spiffe_id      TEXT COLLATE "C"
);
