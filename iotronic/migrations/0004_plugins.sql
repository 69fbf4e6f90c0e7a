-- Plugins (issue 11): the kind of code, the hardware a plugin asks for, and the digest and size
-- of its code; and the injections, which plugins each board holds (the original's
-- InjectionPlugin, S4T-REFERENCE §2). Rows written before this migration are the original
-- format: pickled Python source.
ALTER TABLE plugins ADD COLUMN kind TEXT NOT NULL DEFAULT 'python';
ALTER TABLE plugins ADD COLUMN grants TEXT NOT NULL DEFAULT '{}';
ALTER TABLE plugins ADD COLUMN code_sha256 TEXT NOT NULL DEFAULT '';
ALTER TABLE plugins ADD COLUMN code_size BIGINT NOT NULL DEFAULT 0;

-- `status`: injected | updated (the board holds the code), pending (the PluginInject request
-- `request_uuid` has not answered yet), operative | stopped (after PluginStart / PluginStop).
-- `code_sha256` is the digest of the code the board was given, so a stale injection shows.
CREATE TABLE plugin_injections (
    board_uuid TEXT NOT NULL REFERENCES boards(uuid) ON DELETE CASCADE,
    plugin_uuid TEXT NOT NULL REFERENCES plugins(uuid) ON DELETE CASCADE,
    onboot BIGINT NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    grants TEXT NOT NULL DEFAULT '{}',
    code_sha256 TEXT NOT NULL DEFAULT '',
    request_uuid TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (board_uuid, plugin_uuid)
);
CREATE INDEX plugin_injections_plugin ON plugin_injections (plugin_uuid);
