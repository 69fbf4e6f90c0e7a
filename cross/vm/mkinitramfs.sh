#!/usr/bin/env bash
# Packs the emulated board's initramfs: busybox, i2c-stub.ko (from build-kernel.sh's
# directory), a lightning-rod built for aarch64 (cross/build.sh aarch64-unknown-linux-gnu, the
# binary of the arm64 .deb, with the glibc libraries it needs from Debian's arm64 cross libc;
# or a static -musl build) and cross/vm/init.
#
#   bash cross/vm/mkinitramfs.sh KERNEL_DIR LIGHTNING_ROD OUT.cpio.gz
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 KERNEL_DIR LIGHTNING_ROD OUT.cpio.gz" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
kdir=$1; lr=$2; out=$3
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,lib/modules,etc,var/lib}
install -m 0755 "$kdir/busybox" "$root/bin/busybox"
install -m 0755 "$lr" "$root/bin/lightning-rod"
install -m 0644 "$kdir/i2c-stub.ko" "$root/lib/modules/i2c-stub.ko"
install -m 0755 "$here/init" "$root/init"
# A dynamically linked binary gets its interpreter and libraries (one level is enough for a
# Rust binary: libc, libm, libgcc_s and the loader, which need nothing else).
sysroot=${S4T_VM_SYSROOT:-/usr/aarch64-linux-gnu}
interp=$( { readelf -l "$lr" 2>/dev/null || true; } | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
if [ -n "$interp" ]; then
  mkdir -p "$root/lib"
  cp -L "$sysroot/lib/$(basename "$interp")" "$root/lib/"
  [ "$(dirname "$interp")" = /lib ] || { mkdir -p "$root$(dirname "$interp")"; ln -sf "/lib/$(basename "$interp")" "$root$interp"; }
  for lib in $(readelf -d "$lr" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    cp -L "$sysroot/lib/$lib" "$root/lib/"
  done
fi
(cd "$root" && find . | cpio --quiet -o -H newc -R 0:0 | gzip -1) > "$out"
