#!/usr/bin/env bash
# Where a board binary's bytes go: code size per crate, from the symbol table of an unstripped
# build (`cargo bloat --crates` needs cargo to drive the build, which zigbuild targets defeat).
#
#   CARGO_PROFILE_BOARD_STRIP=false bash cross/build.sh TARGET   # rebuilds TARGET unstripped
#   bash cross/bloat.sh BINARY [ROWS]
#
# Counts text symbols (functions) only; generic code is charged to the crate that defines the
# function (`<alloc::vec::Vec<T> as Drop>::drop` is alloc), C and libc code is `[C/other]`.
# Uses llvm-nm from the rustup `llvm-tools` component (installed when missing).
set -euo pipefail
bin=${1:?usage: cross/bloat.sh BINARY [ROWS]}
rows=${2:-30}
cd "$(dirname "$0")/.."
rustup component list --installed | grep -q '^llvm-tools' || rustup component add llvm-tools >&2
nm="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-nm"
"$nm" -S --size-sort -C --radix=d "$bin" | awk '
  $3 ~ /^[tTwW]$/ {
    size = $2 + 0; $1 = ""; $2 = ""; $3 = ""; name = $0
    sub(/^ +/, "", name); sub(/^[<&\[]+/, "", name); sub(/^(impl|dyn|mut) /, "", name)
    crate = index(name, "::") ? substr(name, 1, index(name, "::") - 1) : "[C/other]"
    total[crate] += size; all += size
  }
  END {
    for (c in total) printf "%9d %5.1f%%  %s\n", total[c], 100 * total[c] / all, c
    printf "%9d 100.0%%  (all functions)\n", all
  }' | sort -rn | head -n "$((rows + 1))"
echo "file: $(stat -c %s "$bin") bytes (unstripped)"
