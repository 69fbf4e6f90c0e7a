-- The iotronic schema. Portable SQL: the same text runs on SQLite and PostgreSQL.
-- Ids are UUID text, times are Unix milliseconds (BIGINT), flags are BIGINT 0/1, JSON is TEXT.
-- Every allocation the original kept in process memory (public ports, VPN addresses, the
-- agent a board is on, the lease that owns a board) is a row guarded by a UNIQUE constraint,
-- so several conductors cannot hand out the same thing twice.

CREATE TABLE projects (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE users (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    is_admin BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

-- A user's role in a project: 'admin' (of that project), 'manager' or 'user'.
CREATE TABLE memberships (
    user_uuid TEXT NOT NULL REFERENCES users(uuid) ON DELETE CASCADE,
    project_uuid TEXT NOT NULL REFERENCES projects(uuid) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('admin', 'manager', 'user')),
    PRIMARY KEY (user_uuid, project_uuid)
);

-- Bearer tokens, stored as the SHA-256 of the token (the token itself is never stored).
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    user_uuid TEXT NOT NULL REFERENCES users(uuid) ON DELETE CASCADE,
    project_uuid TEXT NOT NULL REFERENCES projects(uuid) ON DELETE CASCADE,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Agents: wamp-agents and wstun-agents, by configured name.
CREATE TABLE agents (
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('wamp', 'wstun')),
    url TEXT NOT NULL,
    online BIGINT NOT NULL DEFAULT 0,
    ragent BIGINT NOT NULL DEFAULT 0,
    last_seen BIGINT NOT NULL,
    PRIMARY KEY (name, kind)
);

CREATE TABLE fleets (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    project_uuid TEXT NOT NULL REFERENCES projects(uuid) ON DELETE CASCADE,
    description TEXT NOT NULL DEFAULT '',
    extra TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (project_uuid, name)
);

CREATE TABLE boards (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    -- The one-time registration code; NULL once consumed by an authenticated enrollment.
    code TEXT UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('registered', 'offline', 'online')),
    type TEXT NOT NULL,
    agent TEXT,
    owner_uuid TEXT NOT NULL,
    project_uuid TEXT NOT NULL REFERENCES projects(uuid) ON DELETE CASCADE,
    fleet_uuid TEXT REFERENCES fleets(uuid) ON DELETE SET NULL,
    lr_version TEXT,
    connectivity TEXT NOT NULL DEFAULT '{}',
    mobile BIGINT NOT NULL DEFAULT 0,
    config TEXT NOT NULL DEFAULT '{}',
    extra TEXT NOT NULL DEFAULT '{}',
    latitude TEXT,
    longitude TEXT,
    altitude TEXT,
    session_id TEXT UNIQUE,
    last_seen BIGINT,
    -- WAMP-CRA salted derived key of the board secret (never the secret).
    secret_salt TEXT,
    secret_key TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX boards_project ON boards(project_uuid);

CREATE TABLE services (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    project_uuid TEXT NOT NULL REFERENCES projects(uuid) ON DELETE CASCADE,
    port BIGINT NOT NULL CHECK (port > 0 AND port < 65536),
    protocol TEXT NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (project_uuid, name)
);

-- A service exposed on a public port of the tunnel server. The port is unique: two
-- conductors racing for the same port get a constraint violation and draw again.
CREATE TABLE exposed_services (
    board_uuid TEXT NOT NULL REFERENCES boards(uuid) ON DELETE CASCADE,
    service_uuid TEXT NOT NULL REFERENCES services(uuid) ON DELETE CASCADE,
    public_port BIGINT NOT NULL UNIQUE,
    lease_uuid TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (board_uuid, service_uuid)
);

CREATE TABLE plugins (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    owner_uuid TEXT NOT NULL,
    project_uuid TEXT NOT NULL REFERENCES projects(uuid) ON DELETE CASCADE,
    public BIGINT NOT NULL DEFAULT 0,
    code TEXT NOT NULL DEFAULT '',
    callable BIGINT NOT NULL DEFAULT 0,
    parameters TEXT NOT NULL DEFAULT '{}',
    extra TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE leases (
    uuid TEXT PRIMARY KEY,
    project_uuid TEXT NOT NULL REFERENCES projects(uuid) ON DELETE CASCADE,
    owner_uuid TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'released', 'expired')),
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Boards of a lease. `active` is 1 while the lease holds the board; the partial unique index
-- makes a board bookable by at most one active lease, whoever races for it.
CREATE TABLE lease_boards (
    lease_uuid TEXT NOT NULL REFERENCES leases(uuid) ON DELETE CASCADE,
    board_uuid TEXT NOT NULL REFERENCES boards(uuid) ON DELETE CASCADE,
    active BIGINT NOT NULL DEFAULT 1,
    PRIMARY KEY (lease_uuid, board_uuid)
);
CREATE UNIQUE INDEX lease_boards_one_active ON lease_boards(board_uuid) WHERE active = 1;

CREATE TABLE vpns (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    project_uuid TEXT NOT NULL REFERENCES projects(uuid) ON DELETE CASCADE,
    type TEXT NOT NULL CHECK (type IN ('l2', 'l3')),
    cidr TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (project_uuid, name)
);

-- A board's membership of a VPN: its address is unique within the VPN.
CREATE TABLE vpn_members (
    vpn_uuid TEXT NOT NULL REFERENCES vpns(uuid) ON DELETE CASCADE,
    board_uuid TEXT NOT NULL REFERENCES boards(uuid) ON DELETE CASCADE,
    address TEXT NOT NULL,
    interface TEXT NOT NULL,
    lease_uuid TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (vpn_uuid, board_uuid),
    UNIQUE (vpn_uuid, address)
);

-- Requests to boards. status: PENDING (accepted, not yet sent), QUEUED (board offline, waits
-- for its login until expires_at), RUNNING (sent to the board), COMPLETED, FAILED, EXPIRED.
CREATE TABLE requests (
    uuid TEXT PRIMARY KEY,
    project_uuid TEXT NOT NULL,
    destination_uuid TEXT NOT NULL,
    main_request_uuid TEXT,
    pending_requests BIGINT NOT NULL DEFAULT 0,
    status TEXT NOT NULL CHECK (status IN ('PENDING', 'QUEUED', 'RUNNING', 'COMPLETED', 'FAILED', 'EXPIRED')),
    type BIGINT NOT NULL DEFAULT 0,
    action TEXT NOT NULL,
    args TEXT NOT NULL DEFAULT '[]',
    agent TEXT,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX requests_destination_status ON requests(destination_uuid, status);

CREATE TABLE results (
    request_uuid TEXT NOT NULL REFERENCES requests(uuid) ON DELETE CASCADE,
    board_uuid TEXT NOT NULL,
    result TEXT NOT NULL CHECK (result IN ('RUNNING', 'SUCCESS', 'ERROR', 'WARNING')),
    message TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (request_uuid, board_uuid)
);
