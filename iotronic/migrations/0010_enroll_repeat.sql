-- Idempotent enrollment: a board whose registration reply was lost may repeat it within an
-- hour with the secret it proposed. Set when an authenticated enrollment consumes the code
-- (SHA-256 of the code, hex; when, Unix ms); cleared by revoke and rotate-secret.
ALTER TABLE boards ADD COLUMN enroll_code_hash TEXT;
ALTER TABLE boards ADD COLUMN enrolled_at BIGINT;
CREATE INDEX boards_enroll_code_hash ON boards(enroll_code_hash);
