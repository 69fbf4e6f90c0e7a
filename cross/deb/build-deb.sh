#!/usr/bin/env bash
# Builds the lightning-rod .deb for Raspberry Pi OS / Debian and prints its path last.
#
#   bash cross/deb/build-deb.sh armhf [OUT_DIR]   # armv7-unknown-linux-gnueabihf (Pi 2/3/4, 32-bit)
#   bash cross/deb/build-deb.sh arm64 [OUT_DIR]   # aarch64-unknown-linux-gnu (Pi 3/4/5, 64-bit)
#
# Contents: /usr/bin/lightning-rod, /etc/lightning-rod/config.toml (conffile, 0600),
# /lib/systemd/system/lightning-rod.service (systemd/lightning-rod.service with the binary in
# /usr/bin), and maintainer scripts that create /var/lib/lightning-rod (0700).
# The binary comes from cross/build.sh, or $LR_BIN when set.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
arch=${1:-}
out=${2:-$root/target/deb}
case $arch in
  armhf) target=armv7-unknown-linux-gnueabihf ;;
  arm64) target=aarch64-unknown-linux-gnu ;;
  *) echo "usage: $0 armhf|arm64 [OUT_DIR]" >&2; exit 2 ;;
esac
bin=${LR_BIN:-$(bash "$root/cross/build.sh" "$target" | tail -n1)}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)
pkg=$(mktemp -d)
trap 'rm -rf "$pkg"' EXIT
# mktemp makes 0700 directories; the package's ./ must not carry that onto the board's /.
chmod 0755 "$pkg"
install -D -m 0755 "$bin" "$pkg/usr/bin/lightning-rod"
# 0600: the config may be given a registration code (`code` under [cloud]), which any local user
# could otherwise read and enroll with before the board does.
install -D -m 0600 "$here/config.toml" "$pkg/etc/lightning-rod/config.toml"
install -d "$pkg/lib/systemd/system"
sed 's|/usr/local/bin/lightning-rod|/usr/bin/lightning-rod|' "$root/systemd/lightning-rod.service" \
  > "$pkg/lib/systemd/system/lightning-rod.service"
install -d "$pkg/usr/share/doc/lightning-rod"
printf 'lightning-rod (Stack4Things in Rust)\nLicense: Apache-2.0\n' > "$pkg/usr/share/doc/lightning-rod/copyright"
install -d -m 0755 "$pkg/DEBIAN"
for s in postinst prerm postrm; do install -m 0755 "$here/$s" "$pkg/DEBIAN/$s"; done
echo /etc/lightning-rod/config.toml > "$pkg/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
# glibc 2.34 or later: Raspberry Pi OS bookworm and newer (older images: the musl builds).
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: lightning-rod
Version: $version
Architecture: $arch
Maintainer: Stack4Things in Rust <s4t@example.invalid>
Installed-Size: $size
Depends: libc6 (>= 2.34)
Section: net
Priority: optional
Homepage: https://example.invalid/s4t-rs
Description: Stack4Things board agent
 Connects this board to a Stack4Things (IoTronic) cloud: GPIO and I2C through
 the Linux character devices, services exposed through reverse WebSocket
 tunnels, and virtual networks between boards.
CONTROL
mkdir -p "$out"
deb="$out/lightning-rod_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >&2
echo "$deb"
