-- Bounds: indexes for what the conductor's sweeps and the request list look up, and one plugin
-- name per project.
--
-- The sweep finds requests by status and age (stuck PENDING/RUNNING ones, expired QUEUED ones,
-- finished ones to purge), the request list pages a project's requests by creation, the lease
-- sweep finds active leases by expiry. IF NOT EXISTS: an operator may have added them by hand.
CREATE INDEX IF NOT EXISTS requests_status_updated ON requests(status, updated_at);
CREATE INDEX IF NOT EXISTS requests_project_created ON requests(project_uuid, created_at);
CREATE INDEX IF NOT EXISTS leases_status_expires ON leases(status, expires_at);

-- Plugin names were unique per project only by a check before the insert, so two concurrent
-- creates (or renames) could both pass it. Before the constraint, every plugin but the oldest of
-- a (project, name) is renamed "<name>-<uuid>" (uuids are unique), so the index can be built
-- on any database; the owners see the new names in the plugin list.
UPDATE plugins SET name = name || '-' || uuid
WHERE EXISTS (
    SELECT 1 FROM plugins older
    WHERE older.project_uuid = plugins.project_uuid AND older.name = plugins.name
      AND (older.created_at < plugins.created_at
           OR (older.created_at = plugins.created_at AND older.uuid < plugins.uuid))
);
CREATE UNIQUE INDEX IF NOT EXISTS plugins_project_name ON plugins(project_uuid, name);
