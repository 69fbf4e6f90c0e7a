-- Security (issue 12): board revocation, one-time codes that expire, the audit log.

-- Set when an operator revokes the board's credentials (`POST /v1/boards/{b}/revoke`) or
-- rotates them (`…/rotate-secret`); cleared when the board enrolls again with a fresh code.
-- While set, the agents close the board's WAMP sessions and tunnel channels.
ALTER TABLE boards ADD COLUMN revoked_at BIGINT;
-- When the registration code stops working (NULL: created_at + the default code lifetime).
ALTER TABLE boards ADD COLUMN code_expires_at BIGINT;

-- The audit log: append-only (no code path updates or deletes a row; a trigger refuses it
-- where the backend allows one, see db/audit.rs). `project_uuid` scopes entries for managers.
CREATE TABLE audit (
    id TEXT PRIMARY KEY,
    at BIGINT NOT NULL,
    user_uuid TEXT NOT NULL DEFAULT '',
    user_name TEXT NOT NULL DEFAULT '',
    project_uuid TEXT NOT NULL DEFAULT '',
    action TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    status BIGINT NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_at ON audit(at);
CREATE INDEX audit_project_at ON audit(project_uuid, at);
