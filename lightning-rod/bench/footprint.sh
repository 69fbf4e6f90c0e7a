#!/usr/bin/env bash
# Footprint of the board agent: stripped binary sizes for x86_64 (the `board` and `release`
# profiles of the root Cargo.toml) and for the boards with a size budget, built the way boards
# get them (`cross/build.sh`: armv7 <= 4,000,000 bytes, MIPS <= 5,000,000), and idle RSS on
# x86_64 with one WAMP session and two idle reverse tunnels (lightning-rod/examples/footprint.rs).
# Prints figures and the load average; checks nothing (cross/ci.sh checks the budgets).
# Usage: bash lightning-rod/bench/footprint.sh [IDLE_S]
#   S4T_FOOTPRINT_TARGETS="armv7-unknown-linux-gnueabihf"   the board targets to size (default:
#   armv7 and MIPS; each is a cold build-std compile the first time, see cross/README.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
IDLE=${1:-5}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
TARGETS=${S4T_FOOTPRINT_TARGETS:-armv7-unknown-linux-gnueabihf mips-unknown-linux-musl}

cargo build -q -p lightning-rod --profile board
cargo build -q -p lightning-rod --release
declare -A BIN
for t in $TARGETS; do
  BIN[$t]=$(bash cross/build.sh "$t" | tail -n1)
done

size() { stat -c %s "$1"; }
echo "== binary sizes (stripped), load average $(cat /proc/loadavg) =="
printf '%-34s %10s bytes\n' "x86_64 board profile" "$(size "$TARGET_DIR/board/lightning-rod")"
printf '%-34s %10s bytes\n' "x86_64 release profile" "$(size "$TARGET_DIR/release/lightning-rod")"
for t in $TARGETS; do
  printf '%-34s %10s bytes\n' "$t" "$(size "${BIN[$t]}")"
done

echo "== idle footprint, x86_64 board profile =="
cargo run -q --release -p lightning-rod --example footprint -- "$TARGET_DIR/board/lightning-rod" "$IDLE"
