-- Source-address allow-list of an exposure (issue 12): a JSON array of canonical CIDRs
-- (`["10.0.0.0/8","2001:db8::/32"]`). The wstun-agent closes connections to the public port
-- from any other source at accept. '[]': anyone may connect (as before).
ALTER TABLE exposed_services ADD COLUMN allow_from TEXT NOT NULL DEFAULT '[]';
