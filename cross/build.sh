#!/usr/bin/env bash
# Cross-builds lightning-rod for a board and prints the path of the binary (last line of stdout;
# everything else goes to stderr).
#
#   bash cross/build.sh TARGET            # the size-optimised `board` profile
#   S4T_CROSS_PROFILE=release bash cross/build.sh TARGET
#
# Installs what it needs when missing: the rustup target or rust-src, the Debian cross gcc,
# and for targets without a prebuilt std, cargo-zigbuild + ziglang from PyPI in a venv
# ($S4T_ZIG_VENV, default /var/cache/s4t/zigvenv). apt needs root. See cross/README.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "cross/build.sh: $*" >&2; }

usage() {
  cat >&2 <<'EOF'
usage: cross/build.sh TARGET
  armv7-unknown-linux-gnueabihf    Raspberry Pi 2/3/4, 32-bit Raspberry Pi OS (glibc)
  aarch64-unknown-linux-gnu        Raspberry Pi 3/4/5, 64-bit Raspberry Pi OS (glibc)
  aarch64-unknown-linux-musl       64-bit ARM, static (any distribution; the emulated board)
  armv7-unknown-linux-musleabihf   32-bit ARMv7, static
  arm-unknown-linux-gnueabihf      Raspberry Pi Zero/1 (ARMv6), Raspberry Pi OS (glibc >= 2.28)
  arm-unknown-linux-musleabihf     Raspberry Pi Zero/1 (ARMv6), static
  mips-unknown-linux-musl          Arduino Yun (AR9331, MIPS 24Kc, big-endian), static
EOF
}

target=${1:-}
[ $# -eq 1 ] || { usage; exit 2; }
profile=${S4T_CROSS_PROFILE:-board}
# How each target is built: `rustup` = stable std from rustup + Debian's cross gcc;
# `zig` = std rebuilt from rust-src (-Zbuild-std) and linked by zig (no prebuilt std exists).
apt=()
zig_target=$target
flags=""
build_std=no
# Cargo features of lightning-rod left out on this target (cross/README.md lists them).
features=()
case $target in
  armv7-unknown-linux-gnueabihf)
    # std rebuilt with the board profile (size-optimised, no unwinding): the prebuilt std
    # would put the agent over its 4 MB budget.
    method=rustup; build_std=yes; apt=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
  aarch64-unknown-linux-gnu) method=rustup; apt=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
  aarch64-unknown-linux-musl)
    method=rustup; apt=(gcc-aarch64-linux-gnu)
    # ring's C parts are freestanding: the glibc cross gcc compiles them for musl too.
    export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc ;;
  armv7-unknown-linux-musleabihf | arm-unknown-linux-musleabihf)
    # build-std has no self-contained crt objects; zig brings its own.
    method=zig; flags="-C link-self-contained=no" ;;
  arm-unknown-linux-gnueabihf)
    # glibc 2.28 symbols: runs on Raspberry Pi OS buster and later.
    method=zig; zig_target=$target.2.28 ;;
  mips-unknown-linux-musl)
    # Without a static relocation model rustc makes a static-pie that crashes at start.
    method=zig; flags="-C relocation-model=static"
    # MIPS code is about 1.5 times the size of ARM code: without the WebAssembly plugin
    # runtime the agent fits its 5 MB budget (wasm plugins are refused, with a message saying
    # why; process and python plugins remain).
    features=(--no-default-features) ;;
  *) log "unknown target: $target"; usage; exit 2 ;;
esac

need_apt() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    log "missing packages ${missing[*]}: run as root or apt-get install them"; exit 1
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q >&2
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >&2
}

cd "$root"
t0=$(date +%s)
[ ${#apt[@]} -eq 0 ] || need_apt "${apt[@]}"
[ $method = zig ] && build_std=yes
# Where std is rebuilt, it is rebuilt for size: `optimize_for_size` (and none of std's default
# features: no backtrace symbolizer, useless in a stripped binary; no unwinder, useless with
# panic=abort); panics carry no file/line/column (`-Zlocation-detail=none`: the message stays);
# the registry and toolchain paths of this machine are cut from the strings that remain.
# -Z flags are unstable: RUSTC_BOOTSTRAP lets the pinned stable toolchain accept them.
build_std_args=(-Zbuild-std=std,panic_abort -Zbuild-std-features=optimize_for_size)
if [ $build_std = yes ]; then
  flags="$flags -Zlocation-detail=none --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}/registry/src=/cargo"
  # Not the checkout's own path: cargo already names workspace sources relative to it, and a
  # flag that changes with the checkout would make every clean clone rebuild std and all
  # dependencies from scratch (RUSTFLAGS are part of cargo's fingerprint).
  flags="$flags --remap-path-prefix=${RUSTUP_HOME:-$HOME/.rustup}/toolchains=/rust"
  export RUSTC_BOOTSTRAP=1
fi
tenv=$(echo "$target" | tr 'a-z-' 'A-Z_')
if [ -n "$flags" ]; then
  export "CARGO_TARGET_${tenv}_RUSTFLAGS=$flags"
fi
args=(-p lightning-rod --bin lightning-rod --locked --profile "$profile" "${features[@]}")
if [ $method = rustup ]; then
  rustup target list --installed | grep -x "$target" >/dev/null || rustup target add "$target" >&2
  if [ $build_std = yes ]; then
    rustup component list --installed | grep '^rust-src' >/dev/null || rustup component add rust-src >&2
    cargo build "${args[@]}" --target "$target" "${build_std_args[@]}" >&2
  else
    cargo build "${args[@]}" --target "$target" >&2
  fi
else
  need_apt python3-venv
  rustup component list --installed | grep '^rust-src' >/dev/null || rustup component add rust-src >&2
  venv=${S4T_ZIG_VENV:-/var/cache/s4t/zigvenv}
  if [ ! -x "$venv/bin/cargo-zigbuild" ]; then
    log "installing cargo-zigbuild and ziglang into $venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q cargo-zigbuild==0.24.0 ziglang==0.17.0 >&2
  fi
  export PATH="$venv/bin:$PATH"
  cargo zigbuild "${args[@]}" --target "$zig_target" "${build_std_args[@]}" >&2
fi

case $profile in dev) dir=debug ;; *) dir=$profile ;; esac
target_dir=${CARGO_TARGET_DIR:-$root/target}
bin="$target_dir/$target/$dir/lightning-rod"
[ -f "$bin" ] || { log "build finished but $bin is missing"; exit 1; }
log "$target: $(stat -c %s "$bin") bytes, built in $(( $(date +%s) - t0 ))s"
echo "$bin"
