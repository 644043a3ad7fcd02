-- Lanyard datastore schema, version 6: CRLs shared between the servers of a trust domain.

-- The newest CRL signed by each X.509 authority, published by the server that holds its key,
-- so that every server sharing the datastore serves the lists of every authority in the
-- bundle (a verifier such as nginx wants one for each issuer it meets).
CREATE TABLE published_crls (
    authority_id TEXT PRIMARY KEY NOT NULL, -- the signer's subject key ID, hex
    der          BLOB NOT NULL,
    number       INTEGER NOT NULL,          -- its CRL number; only a higher one replaces it
    next_update  INTEGER NOT NULL
) WITHOUT ROWID;
