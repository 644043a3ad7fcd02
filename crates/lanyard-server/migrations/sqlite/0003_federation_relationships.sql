-- Lanyard datastore schema, version 3: federation relationships.

-- Foreign trust domains whose bundles are fetched from a SPIFFE bundle endpoint (SPIRE's
-- TrustDomain API). A relationship's bundle is its trust domain's row in `bundles`, which
-- outlives the relationship, as in SPIRE.
CREATE TABLE federation_relationships (
    trust_domain            TEXT PRIMARY KEY NOT NULL,
    bundle_endpoint_url     TEXT NOT NULL,
    bundle_endpoint_profile TEXT NOT NULL,  -- https_web | https_spiffe
    endpoint_spiffe_id      TEXT            -- https_spiffe only
);
