-- Tunnel tokens live for days and are not stored by the cloud. When an operator revokes or
-- rotates a board's credentials, the tokens the board held until then must stop working too
-- (they sit in the same state directory as the secret): the tunnel server refuses a board's
-- tokens issued before this time (Unix milliseconds; NULL: never revoked or rotated).
ALTER TABLE boards ADD COLUMN tokens_after BIGINT;
