-- Whether the cloud host itself takes the VPN's first host address (on the L2 bridge, or on
-- every L3 TUN) so that cloud-side services can join the segment.
ALTER TABLE vpns ADD COLUMN cloud_address BIGINT NOT NULL DEFAULT 0;
