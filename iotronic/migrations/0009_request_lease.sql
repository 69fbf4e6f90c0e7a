-- The lease a request was made under (NULL: outside any lease): a queued request is delivered
-- only while that lease, or no lease of another project, holds its board.
ALTER TABLE requests ADD COLUMN lease_uuid TEXT;
