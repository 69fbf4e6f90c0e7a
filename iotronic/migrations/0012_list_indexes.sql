-- List indexes: an administrator's list of every request pages them by creation, and a
-- project's boards are listed by creation; without these, each page read and sorted the whole
-- table (requests are kept 30 days). IF NOT EXISTS: an operator may have added them by hand.
CREATE INDEX IF NOT EXISTS requests_created ON requests(created_at, uuid);
CREATE INDEX IF NOT EXISTS boards_project_created ON boards(project_uuid, created_at, uuid);
