-- Lanyard datastore schema for PostgreSQL, version 4: exceptions count their changes (as
-- `migrations/sqlite/`). Existing exceptions start at revision 1.

ALTER TABLE policy_exceptions ADD COLUMN revision BIGINT NOT NULL DEFAULT 1;
