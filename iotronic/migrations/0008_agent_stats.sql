-- What each agent has carried since it started (JSON written by the agent every few seconds,
-- read by /metrics): for a wstun-agent its tunnel traffic and VPN packet counters. NULL until
-- the agent first reports.
ALTER TABLE agents ADD COLUMN stats TEXT;
ALTER TABLE agents ADD COLUMN stats_at BIGINT;
