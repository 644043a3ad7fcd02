-- Lanyard datastore schema, version 4: exceptions count their changes, so that an extend or a
-- revoke can be made conditional on the revision its caller read. Existing exceptions start at
-- revision 1.

ALTER TABLE policy_exceptions ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;
