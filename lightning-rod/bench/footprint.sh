#!/usr/bin/env bash
# Footprint of the board agent: release binary sizes for x86_64 and armv7 (the `board`
# profile of the root Cargo.toml), and idle RSS on x86_64 with one WAMP session and two idle
# reverse tunnels (lightning-rod/examples/footprint.rs). Prints figures; checks nothing.
# Usage: bash lightning-rod/bench/footprint.sh [IDLE_S]
set -euo pipefail
cd "$(dirname "$0")/../.."
IDLE=${1:-5}
TARGET_DIR=${CARGO_TARGET_DIR:-target}

cargo build -q -p lightning-rod --profile board
cargo build -q -p lightning-rod --release
rustup target add armv7-unknown-linux-gnueabihf >/dev/null 2>&1 || true
cargo build -q -p lightning-rod --profile board --target armv7-unknown-linux-gnueabihf

size() { stat -c %s "$1"; }
echo "== binary sizes (stripped) =="
printf '%-34s %10s bytes\n' "x86_64 board profile" "$(size "$TARGET_DIR/board/lightning-rod")"
printf '%-34s %10s bytes\n' "x86_64 release profile" "$(size "$TARGET_DIR/release/lightning-rod")"
printf '%-34s %10s bytes\n' "armv7-gnueabihf board profile" "$(size "$TARGET_DIR/armv7-unknown-linux-gnueabihf/board/lightning-rod")"

echo "== idle footprint, x86_64 board profile =="
cargo run -q --release -p lightning-rod --example footprint -- "$TARGET_DIR/board/lightning-rod" "$IDLE"
