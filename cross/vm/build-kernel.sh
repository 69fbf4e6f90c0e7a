#!/usr/bin/env bash
# Builds (once) the kernel of the emulated board: Debian's linux-source-6.1, tinyconfig plus
# cross/vm/kernel.config, for arm64. Also fetches an arm64 busybox for the initramfs.
#
#   bash cross/vm/build-kernel.sh            # prints the directory holding Image.gz, i2c-stub.ko, busybox
#   bash cross/vm/build-kernel.sh --cached   # the same, but exits 3 instead of building
#
# The result is cached under $S4T_VM_CACHE (default /var/cache/s4t/vm) in a directory named
# after the hash of kernel.config and the recipe number, and rebuilt only when that directory is
# missing: about 5 minutes on 2 cores the first time, nothing afterwards. Never commit it.
# Run as root on Debian 12 (installs build packages with apt when they are missing).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${S4T_VM_CACHE:-/var/cache/s4t/vm}
# Bump when the steps below change what they produce; kernel.config changes are picked up.
recipe=1
key=$( (echo "recipe $recipe"; cat "$here/kernel.config") | sha256sum | cut -c1-12)
out="$cache/arm64-$key"
log() { echo "build-kernel: $*" >&2; }

if [ -f "$out/.complete" ]; then
  echo "$out"
  exit 0
fi
if [ "${1:-}" = --cached ]; then
  log "not built yet: run bash cross/vm/build-kernel.sh"
  exit 3
fi

need=()
for p in linux-source-6.1 flex bison bc libelf-dev libssl-dev gcc-aarch64-linux-gnu make cpio xz-utils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q >&2
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}" >&2
fi

# One build at a time per key: a second run (another checkout's CI) waits, then finds it done.
mkdir -p "$cache"
exec 9>"$cache/.lock-$key"
flock 9
if [ -f "$out/.complete" ]; then
  echo "$out"
  exit 0
fi
work="$cache/build-$key"
rm -rf "$work" && mkdir -p "$work"
t0=$(date +%s)
log "extracting linux-source-6.1 into $work"
tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
src="$work/linux-source-6.1"
mk() { make -C "$src" O="$work/out" ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- "$@"; }
mk tinyconfig >/dev/null
opts=()
while IFS= read -r line; do
  line=${line%%#*}; line=${line//[[:space:]]/}
  [ -n "$line" ] || continue
  name=${line%%=*}; val=${line#*=}
  case $val in
    y) "$src/scripts/config" --file "$work/out/.config" --enable "$name" ;;
    m) "$src/scripts/config" --file "$work/out/.config" --module "$name" ;;
    *) log "bad line in kernel.config: $line"; exit 1 ;;
  esac
  opts+=("CONFIG_$name=$val")
done < "$here/kernel.config"
mk olddefconfig >/dev/null
missing=0
for o in "${opts[@]}"; do
  grep -qx "$o" "$work/out/.config" || { log "option not set after olddefconfig: $o"; missing=1; }
done
[ $missing = 0 ] || exit 1
log "building Image.gz and modules (-j$(nproc))"
mk -j"$(nproc)" Image.gz modules >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; exit 1; }

stage="$cache/.stage-$key"
rm -rf "$stage" && mkdir -p "$stage"
cp "$work/out/arch/arm64/boot/Image.gz" "$stage/"
cp "$work/out/drivers/i2c/i2c-stub.ko" "$stage/"
cp "$work/out/.config" "$stage/kernel.config"
make -s -C "$src" O="$work/out" kernelrelease >"$stage/kernel.release"

# busybox for arm64 from Debian's archive, through a private apt state (the host's apt
# configuration and architectures stay untouched).
apt_dir="$work/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
ao=(-o APT::Architecture=arm64 -o APT::Architectures=arm64 -o Dir::State::Lists="$apt_dir/lists"
    -o Dir::Cache::Archives="$apt_dir/archives" -o Dir::Cache="$apt_dir" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt-get "${ao[@]}" update -q >&2
(cd "$apt_dir" && apt-get "${ao[@]}" download busybox-static >&2)
dpkg-deb -x "$apt_dir"/busybox-static_*_arm64.deb "$apt_dir/bb"
cp "$apt_dir/bb/bin/busybox" "$stage/busybox"

rm -rf "$out" && mv "$stage" "$out"
touch "$out/.complete"
rm -rf "$work"
log "done in $(( $(date +%s) - t0 ))s: $out"
echo "$out"
