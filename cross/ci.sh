#!/usr/bin/env bash
# The cross-build stage of .ci/run: board binaries built, run and packaged for real.
#
#   bash cross/ci.sh
#
# 1. the emulated board's kernel (cross/vm/build-kernel.sh; cached under /var/cache/s4t/vm,
#    built only when missing);
# 2. lightning-rod for armv7, aarch64, ARMv6 and MIPS with the size-optimised `board` profile;
#    each binary runs under qemu-user and must stay within its size budget (armv7 and ARMv6
#    <= 4,000,000 bytes, MIPS <= 5,000,000);
# 3. the armhf and arm64 .deb and the OpenWrt .ipk, checked with dpkg-deb / tar;
# 4. tests/tests/boards_emulated.rs: the armv7, ARMv6 and MIPS agents under qemu-user enroll
#    into the x86 cloud and answer GPIO calls; the emulated aarch64 board drives gpio-sim and
#    i2c-stub.
#
# The kernel and the build-std compiles run under `nice` (CPU is shared) and everything is cached in $CARGO_TARGET_DIR
# and /var/cache/s4t: warm, the stage rebuilds only the workspace crates per target. Timings
# of each step are printed. Run as root (apt, network namespaces).
set -euo pipefail
# Under pipefail a writer killed by SIGPIPE fails the pipeline: `tar -t … | grep -q` failed
# with 141 when grep matched before tar had listed everything. Filters here read their whole
# input (`grep … >/dev/null`, not `grep -q`).
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
nice=(nice -n "${S4T_CROSS_NICE:-15}")
log() { echo "cross/ci.sh: $*" >&2; }
step() {
  local name=$1; shift
  local t0; t0=$(date +%s)
  log "step $name"
  "$@"
  log "step $name took $(( $(date +%s) - t0 ))s"
}

# target | qemu-user command line | size budget in bytes (0 = none; 4 MB and 5 MB are read as
# 4,000,000 and 5,000,000 bytes, the stricter reading) | std rebuilt (build-std, niced like the
# kernel) or not
TARGETS=(
  "armv7-unknown-linux-gnueabihf|qemu-arm-static -L /usr/arm-linux-gnueabihf|4000000|yes"
  "aarch64-unknown-linux-gnu|qemu-aarch64-static -L /usr/aarch64-linux-gnu|0|no"
  # The Raspberry Pi Zero/1 (ARMv6): static, on the Pi Zero's own CPU. Same budget as armv7.
  "arm-unknown-linux-musleabihf|qemu-arm-static -cpu arm1176|4000000|yes"
  # The Arduino Yún (AR9331, MIPS 24Kc).
  "mips-unknown-linux-musl|qemu-mips-static -cpu 24Kc|5000000|yes"
)

tools() {
  local need=() p
  for p in qemu-user-static qemu-system-arm cpio file; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q >&2
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}" >&2
  fi
}

declare -A BIN
build_and_run() {
  local spec=$1 target qemu budget std bin size out cfg
  IFS='|' read -r target qemu budget std <<<"$spec"
  if [ "$std" = yes ]; then
    bin=$("${nice[@]}" bash cross/build.sh "$target" | tail -n1)
  else
    bin=$(bash cross/build.sh "$target" | tail -n1)
  fi
  BIN[$target]=$bin
  size=$(stat -c %s "$bin")
  # shellcheck disable=SC2086 # the qemu command line is split on purpose
  out=$($qemu "$bin" --version)
  case $out in lightning-rod\ *) ;; *) log "$target: unexpected --version output: $out"; return 1 ;; esac
  # The configuration its package installs parses and validates on the board's binary.
  cfg=cross/deb/config.toml
  case $target in mips-*) cfg=cross/openwrt/config.toml ;; esac
  # shellcheck disable=SC2086
  $qemu "$bin" check-config --config "$cfg" >/dev/null
  log "$target: $size bytes; under $qemu: $out"
  if [ "$budget" != 0 ] && [ "$size" -gt "$budget" ]; then
    log "$target: $size bytes is over the budget of $budget"; return 1
  fi
}

check_deb() {
  local arch=$1 target=$2 machine=$3 deb x
  deb=$(LR_BIN=${BIN[$target]} bash cross/deb/build-deb.sh "$arch" "$CARGO_TARGET_DIR/deb" | tail -n1)
  dpkg-deb --info "$deb" >&2
  local list; list=$(dpkg-deb --contents "$deb")
  echo "$list" >&2
  [ "$(dpkg-deb -f "$deb" Architecture)" = "$arch" ] || { log "$deb: wrong Architecture"; return 1; }
  for f in ./usr/bin/lightning-rod ./etc/lightning-rod/config.toml ./lib/systemd/system/lightning-rod.service; do
    awk '{print $6}' <<<"$list" | grep -x "$f" >/dev/null || { log "$deb lacks $f"; return 1; }
  done
  awk 'NR == 1' <<<"$list" | grep '^drwxr-xr-x root/root .* \./$' >/dev/null || { log "$deb: ./ is not 0755 root"; return 1; }
  x=$(mktemp -d)
  dpkg-deb --control "$deb" "$x/DEBIAN"
  grep -qx /etc/lightning-rod/config.toml "$x/DEBIAN/conffiles"
  grep -q 'install -d -m 0700 /var/lib/lightning-rod' "$x/DEBIAN/postinst"
  dpkg-deb -x "$deb" "$x/root"
  file "$x/root/usr/bin/lightning-rod" | grep "$machine" >/dev/null || { log "$deb: binary is not $machine"; return 1; }
  grep -q '^ExecStart=/usr/bin/lightning-rod run' "$x/root/lib/systemd/system/lightning-rod.service"
  # The glibc symbol versions the binary needs must be covered by the package's Depends.
  local need; need=$(objdump -T "$x/root/usr/bin/lightning-rod" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1)
  dpkg --compare-versions "${need#GLIBC_}" le "$(dpkg-deb -f "$deb" Depends | sed -n 's/.*libc6 (>= \([0-9.]*\)).*/\1/p')" ||
    { log "$deb needs $need, more than its Depends says"; return 1; }
  rm -rf "$x"
  log "$deb ok (needs $need)"
}

check_ipk() {
  local ipk x list
  ipk=$(LR_BIN=${BIN[mips-unknown-linux-musl]} bash cross/openwrt/build-ipk.sh "$CARGO_TARGET_DIR/openwrt" | tail -n1)
  x=$(mktemp -d)
  tar -C "$x" -xzf "$ipk"
  [ "$(cat "$x/debian-binary")" = 2.0 ]
  tar -tzf "$x/control.tar.gz" | grep -x './control' >/dev/null
  list=$(tar -tzvf "$x/data.tar.gz")
  echo "$list" >&2
  awk 'NR == 1' <<<"$list" | grep '^drwxr-xr-x root/root .* \./$' >/dev/null || { log "$ipk: ./ is not 0755 root"; return 1; }
  tar -C "$x" -xzf "$x/data.tar.gz" ./usr/bin/lightning-rod ./etc/init.d/lightning-rod
  file "$x/usr/bin/lightning-rod" | grep 'MIPS.*statically linked' >/dev/null || { log "$ipk: not a static MIPS binary"; return 1; }
  rm -rf "$x"
  log "$ipk ok"
}

check_units() {
  # systemd parses every unit (the binaries' paths swapped for one that exists here).
  local x; x=$(mktemp -d)
  for u in systemd/*.service; do
    sed 's|/usr/local/bin/[a-z-]*|/bin/true|' "$u" > "$x/$(basename "$u" | sed 's/@\./@api./')"
  done
  systemd-analyze verify --man=no "$x"/*.service
  rm -rf "$x"
}

boards_tests() {
  # The cloud runs natively; the test finds the cross-built agents and the kernel by itself.
  cargo build -p iotronic --bin iotronic
  cargo nextest run -p s4t-tests --profile ci --test boards_emulated --ignore-default-filter
}

t0=$(date +%s)
step tools tools
step kernel "${nice[@]}" bash cross/vm/build-kernel.sh
for spec in "${TARGETS[@]}"; do
  step "build-${spec%%|*}" build_and_run "$spec"
done
step deb-armhf check_deb armhf armv7-unknown-linux-gnueabihf "ARM, EABI5"
step deb-arm64 check_deb arm64 aarch64-unknown-linux-gnu "ARM aarch64"
if [ -n "${BIN[mips-unknown-linux-musl]:-}" ]; then step ipk check_ipk; fi
if command -v systemd-analyze >/dev/null; then step units check_units; fi
step boards-tests boards_tests
log "done in $(( $(date +%s) - t0 ))s"
