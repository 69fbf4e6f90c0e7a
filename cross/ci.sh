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
# 3. the armhf and arm64 .deb and the OpenWrt .ipk, checked with dpkg-deb / tar (the .ipk's
#    init script also run under dash with fake agents); the systemd units and their drop-ins
#    (systemd-analyze verify) and the package-operations drop-in's capabilities;
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
  # It may be given a registration code: readable by root only.
  grep '^-rw------- root/root .* \./etc/lightning-rod/config\.toml$' <<<"$list" >/dev/null ||
    { log "$deb: config.toml is not 0600 root"; return 1; }
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
  grep '^-rw------- root/root .* \./etc/lightning-rod/config\.toml$' <<<"$list" >/dev/null ||
    { log "$ipk: config.toml is not 0600 root"; return 1; }
  tar -C "$x" -xzf "$x/data.tar.gz" ./usr/bin/lightning-rod ./etc/init.d/lightning-rod ./usr/sbin/lightning-rod-respawn
  file "$x/usr/bin/lightning-rod" | grep 'MIPS.*statically linked' >/dev/null || { log "$ipk: not a static MIPS binary"; return 1; }
  check_openwrt_init "$x"
  rm -rf "$x"
  log "$ipk ok"
}

check_openwrt_init() {
  # /etc/init.d/lightning-rod and its respawn loop as ROOT (the .ipk's data) holds them, run
  # under dash with the part of rc.common they use, with fake agents: one that exits 1 is
  # started again, one that exits 78 is not, and `stop` ends the loop and a serving agent
  # before it returns (and survives itself: it used to `killall lightning-rod`, its own name).
  local root=$1 x n pid
  x=$(mktemp -d)
  mkdir "$x/bin"
  # shellcheck disable=SC2016 # expanded by rc.common
  printf '%s\n' 'initscript=$1 action=$2; shift 2; . "$initscript"; $action "$@"' > "$x/rc.common"
  sed -e "1s|.*|#!/bin/dash $x/rc.common|" -e "s|^BIN=.*|BIN=$x/agent|" \
    -e "s|^RESPAWN=.*|RESPAWN=$x/lightning-rod-respawn|" -e "s|^CONFIG=.*|CONFIG=$x/config.toml|" \
    -e "s|^PIDFILE=.*|PIDFILE=$x/pid|" "$root/etc/init.d/lightning-rod" > "$x/lightning-rod"
  sed '1s|.*|#!/bin/dash|' "$root/usr/sbin/lightning-rod-respawn" > "$x/lightning-rod-respawn"
  printf '#!/bin/sh\ncat >> %s/log\n' "$x" > "$x/bin/logger"
  cat > "$x/agent" <<AGENT
#!/bin/sh
echo "run \$\$" >> $x/runs
trap 'echo "term \$\$" >> $x/runs; exit 0' TERM
case \$(cat $x/mode) in exit1) exit 1 ;; exit78) exit 78 ;; esac
while :; do sleep 1 & wait \$!; done
AGENT
  chmod 0755 "$x/lightning-rod" "$x/lightning-rod-respawn" "$x/bin/logger" "$x/agent"
  runs() { grep -c "^run " "$x/runs" 2>/dev/null || true; }
  # Polls a condition (shell text) for at most 15 s (the loop restarts after 5 s).
  within() { n=0; until eval "$1"; do n=$((n + 1)); [ $n -lt 150 ] || return 1; sleep 0.1; done; }
  gone() { ! kill -0 "$1" 2>/dev/null; }
  fail() {
    log "init script: $*"; cat "$x/log" "$x/runs" >&2 2>/dev/null || true
    for pid in $(cat "$x/pid" 2>/dev/null) $(awk '{print $2}' "$x/runs" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    rm -rf "$x"; return 1
  }
  local rc=(env "PATH=$x/bin:$PATH" "$x/lightning-rod")
  : > "$x/runs"
  echo exit1 > "$x/mode"
  "${rc[@]}" start
  within '[ "$(runs)" -ge 2 ]' || { fail "an agent that exited 1 was not started again"; return 1; }
  pid=$(cat "$x/pid")
  "${rc[@]}" stop || { fail "stop failed with $?"; return 1; }
  gone "$pid" && [ ! -e "$x/pid" ] || { fail "stop left the loop $pid or its pidfile"; return 1; }
  : > "$x/runs"
  echo exit78 > "$x/mode"
  "${rc[@]}" start
  within 'grep "exited 78: not restarted" "$x/log" >/dev/null' || { fail "no 'not restarted' after exit 78"; return 1; }
  within '[ ! -e "$x/pid" ]' || { fail "the loop did not end after exit 78"; return 1; }
  [ "$(runs)" = 1 ] || { fail "an agent that exited 78 was started again"; return 1; }
  : > "$x/runs"
  echo serve > "$x/mode"
  "${rc[@]}" start
  within '[ "$(runs)" = 1 ]' || { fail "the agent did not start"; return 1; }
  within '[ -s "$x/pid" ]' || { fail "no pidfile"; return 1; }
  pid=$(cat "$x/pid")
  "${rc[@]}" stop || { fail "stop failed with $?"; return 1; }
  # Synchronously: the agent had its TERM and both are gone when stop returns.
  grep '^term ' "$x/runs" >/dev/null && gone "$pid" && gone "$(awk '/^run /{print $2}' "$x/runs")" ||
    { fail "stop returned before the loop $pid and the agent ended"; return 1; }
  [ ! -e "$x/pid" ] || { fail "stop left the pidfile"; return 1; }
  rm -rf "$x"
  log "init script: respawns after exit 1, not after 78; stop ends the loop and the agent"
}

check_units() {
  # systemd parses every unit with its drop-ins (the binaries' paths swapped for one that
  # exists here): the template as iotronic@api and as iotronic@wstun-agent (with
  # iotronic@wstun-agent.service.d), lightning-rod.service with lightning-rod.service.d. verify
  # exits 0 on an unknown or misspelt key, so any diagnostic fails the check.
  local x out; x=$(mktemp -d)
  for u in systemd/*.service; do
    sed 's|/usr/local/bin/[a-z-]*|/bin/true|' "$u" > "$x/$(basename "$u")"
  done
  cp -R systemd/*.service.d "$x/"
  out=$(systemd-analyze verify --man=no "$x/iotronic.service" "$x/iotronic@api.service" \
    "$x/iotronic@wstun-agent.service" "$x/lightning-rod.service" 2>&1) || { echo "$out" >&2; rm -rf "$x"; return 1; }
  rm -rf "$x"
  [ -z "$out" ] || { echo "$out" >&2; log "systemd-analyze verify: diagnostics above"; return 1; }
}

check_package_operations() {
  # dpkg sets a file's owner, then its mode: unless the unit's bounding set holds CAP_FSETID,
  # root's chmod of a setgid file whose group is not root drops the setgid bit (apt upgrade run
  # by the cloud left unix_chkpwd, crontab, chage … without it). That chmod, under the bounding
  # set lightning-rod.service and package-operations.conf give together (their
  # CapabilityBoundingSet= lines add up; neither resets nor inverts it).
  local unit=systemd/lightning-rod.service drop=systemd/lightning-rod.service.d/package-operations.conf
  local caps x
  caps=$(sed -n 's/^CapabilityBoundingSet=//p' "$unit" "$drop" | tr ' ' '\n' | sed -n 's/^CAP_\(.*\)/+\L\1/p' | paste -sd, -)
  x=$(mktemp -d)
  touch "$x/f"
  chown 0:42 "$x/f"
  setpriv --bounding-set "-all,$caps" chmod 2755 "$x/f"
  if [ ! -g "$x/f" ]; then
    rm -rf "$x"; log "$drop: chmod 2755 under its capabilities ($caps) drops setgid (CAP_FSETID)"; return 1
  fi
  rm -rf "$x"
  # Kernel packages unpack into /usr/lib/modules, hidden by ProtectKernelModules=yes.
  [ "$(sed -n 's/^ProtectKernelModules=//p' "$unit" "$drop" | tail -n1)" = no ] ||
    { log "$drop: ProtectKernelModules is not undone"; return 1; }
  log "package operations: setgid kept, /usr/lib/modules writable"
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
# A developer machine without systemd skips the unit check; CI (CI set by the runner) does not.
if command -v systemd-analyze >/dev/null; then
  step units check_units
elif [ -n "${CI:-}" ]; then
  log "systemd-analyze is missing: the units cannot be checked"; exit 1
else
  log "systemd-analyze is missing: skipping the unit check"
fi
step package-operations check_package_operations
step boards-tests boards_tests
log "done in $(( $(date +%s) - t0 ))s"
