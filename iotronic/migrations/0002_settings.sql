-- Cloud-wide settings shared by every process, e.g. the tunnel token key (generated once by
-- whichever process needs it first; the primary key settles races).
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
