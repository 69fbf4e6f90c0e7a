#!/usr/bin/env bash
# Builds an opkg package of lightning-rod for the Arduino Yún (OpenWrt-Yun, ar71xx, MIPS 24Kc)
# and prints its path last. An .ipk is a gzipped tar of debian-binary, control.tar.gz and
# data.tar.gz, which every opkg (including OpenWrt 12.09's) installs.
#
#   bash cross/openwrt/build-ipk.sh [OUT_DIR]
#
# The binary comes from `cross/build.sh mips-unknown-linux-musl` (static), or $LR_BIN.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$root/target/openwrt}
bin=${LR_BIN:-$(bash "$root/cross/build.sh" mips-unknown-linux-musl | tail -n1)}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data=$work/data ctl=$work/control
# mktemp makes 0700 directories; the package's ./ must not carry that onto the board's /.
chmod 0755 "$work"
mkdir -p -m 0755 "$data"
install -D -m 0755 "$bin" "$data/usr/bin/lightning-rod"
# 0600: a registration code may be written into it (see cross/deb/build-deb.sh).
install -D -m 0600 "$here/config.toml" "$data/etc/lightning-rod/config.toml"
install -D -m 0755 "$here/lightning-rod.init" "$data/etc/init.d/lightning-rod"
install -D -m 0755 "$here/lightning-rod-respawn" "$data/usr/sbin/lightning-rod-respawn"
mkdir -p "$ctl"
cat > "$ctl/control" <<CONTROL
Package: lightning-rod
Version: $version
Architecture: ar71xx
Maintainer: Stack4Things in Rust <s4t@example.invalid>
Section: net
Description: Stack4Things board agent (static MIPS binary, sysfs GPIO)
CONTROL
echo /etc/lightning-rod/config.toml > "$ctl/conffiles"
cat > "$ctl/postinst" <<'POSTINST'
#!/bin/sh
[ -n "$IPKG_INSTROOT" ] && exit 0
echo "lightning-rod: enroll with 'lightning-rod enroll --url ws://CLOUD:8181/ --code CODE',"
echo "then /etc/init.d/lightning-rod enable && /etc/init.d/lightning-rod start"
exit 0
POSTINST
cat > "$ctl/prerm" <<'PRERM'
#!/bin/sh
[ -n "$IPKG_INSTROOT" ] && exit 0
/etc/init.d/lightning-rod stop 2>/dev/null
/etc/init.d/lightning-rod disable 2>/dev/null
exit 0
PRERM
chmod 0755 "$ctl/postinst" "$ctl/prerm"
echo 2.0 > "$work/debian-binary"
tar --owner=0 --group=0 -C "$ctl" -czf "$work/control.tar.gz" .
tar --owner=0 --group=0 -C "$data" -czf "$work/data.tar.gz" .
mkdir -p "$out"
ipk="$out/lightning-rod_${version}_ar71xx.ipk"
tar --owner=0 --group=0 -C "$work" -czf "$ipk" ./debian-binary ./control.tar.gz ./data.tar.gz
echo "$ipk"
