#!/usr/bin/env bash
# Latency under load: 64-byte round trips of an interactive connection (an SSH session) while
# a bulk transfer runs to (DIR=fwd) or from (DIR=rev) the same board, over a slow link. Two
# network namespaces, "cloud" (tunnel server, the user) and "board" (tunnel client, an echo
# and a bulk service), joined by a veth pair shaped to RATE Mbit/s each way (tc tbf, MTU
# 1500). Needs root, ip, tc, python3.
#   RATE (100)  SECS (8: round trips measured while the transfer runs)  DIR (fwd)
#   CASES (ours-1conn,ours,ours-lanes3[,erebe])  EREBE_WSTUNNEL=/path adds erebe/wstunnel 10.x
#   HOLD=1: a second, quiet session is opened (one round trip, then held) after the transfer
#   starts and before the measured one, as when an SSH session is already open beside scp
#   OURS=/path: our wstunnel binary to run instead of building this tree's
# Prints one JSON line per case: idle and loaded p50/p90/p99 in ms, the transfer's MB/s.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${OURS:-}" ]; then
    cargo build --release -p wstunnel --bin wstunnel >&2
    OURS=$(realpath "${CARGO_TARGET_DIR:-target}/release/wstunnel")
fi
HOLD=${HOLD:-0}
RATE=${RATE:-100}
SECS=${SECS:-8}
DIR=${DIR:-fwd}
CASES=${CASES:-ours-1conn,ours,ours-lanes3${EREBE_WSTUNNEL:+,erebe}}
C=s4tc$$ B=s4tb$$
WORK=$(mktemp -d)
teardown() {
    for ns in "$C" "$B"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    done
    sleep 0.2
    for ns in "$C" "$B"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap 'teardown; rm -rf "$WORK"' EXIT

cat > "$WORK/tool.py" <<'PY'
import socket, socketserver, sys, threading, time, json
mode, port = sys.argv[1], int(sys.argv[2])
if mode in ("echo", "bulk"):
    class H(socketserver.BaseRequestHandler):
        def handle(self):
            # The bulk service: a first byte "F" and it reads until EOF, "R" and it writes
            # until the peer goes away.
            if mode == "bulk" and self.request.recv(1) == b"R":
                buf = b"\x5a" * 65536
                try:
                    while True:
                        self.request.sendall(buf)
                except OSError:
                    return
            while True:
                b = self.request.recv(65536)
                if not b:
                    return
                if mode == "echo":
                    self.request.sendall(b)
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer(("127.0.0.1", port), H).serve_forever()
elif mode == "load":
    s = socket.create_connection(("127.0.0.1", port))
    fwd = sys.argv[4] == "fwd"
    s.sendall(b"F" if fwd else b"R")
    buf, moved, t0 = b"\xa5" * 65536, 0, time.time()
    end = t0 + float(sys.argv[3])
    while time.time() < end:
        if fwd:
            s.sendall(buf); moved += len(buf)
        else:
            moved += len(s.recv(65536))
    print(json.dumps({"dir": sys.argv[4], "bulk_MBps": round(moved / (time.time() - t0) / 1e6, 1)}))
elif mode == "rtt":
    if len(sys.argv) > 4 and sys.argv[4] == "1":
        held = socket.create_connection(("127.0.0.1", port))
        held.sendall(b"q")
        if held.recv(1) != b"q":
            sys.exit("the held session got no echo")
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    v, end = [], time.time() + float(sys.argv[3])
    while time.time() < end:
        t = time.perf_counter(); s.sendall(b"k" * 64); got = 0
        while got < 64:
            b = s.recv(64 - got)
            if not b:
                sys.exit("connection closed")
            got += len(b)
        v.append((time.perf_counter() - t) * 1e3); time.sleep(0.02)
    v.sort(); n = len(v); q = lambda p: round(v[min(n - 1, int(n * p))], 2)
    print(json.dumps({"n": n, "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}))
PY

wait_for() { # NS HOST PORT
    for _ in $(seq 100); do
        ip netns exec "$1" python3 -c "import socket; socket.create_connection(('$2', $3), 0.2)" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $2:$3 in $1" >&2; return 1
}

run_case() {
    local case=$1 sp=8080 pe pb
    ip netns add "$C"; ip netns add "$B"
    ip link add s4tc0 type veth peer name s4tb0
    ip link set s4tc0 netns "$C"; ip link set s4tb0 netns "$B"
    ip -n "$C" addr add 10.254.0.1/24 dev s4tc0; ip -n "$B" addr add 10.254.0.2/24 dev s4tb0
    for ns in "$C" "$B"; do ip -n "$ns" link set lo up; done
    ip -n "$C" link set s4tc0 up; ip -n "$B" link set s4tb0 up
    tc -n "$C" qdisc add dev s4tc0 root tbf rate "${RATE}mbit" burst 32kb latency 50ms
    tc -n "$B" qdisc add dev s4tb0 root tbf rate "${RATE}mbit" burst 32kb latency 50ms
    ip netns exec "$B" python3 "$WORK/tool.py" echo 7007 & ip netns exec "$B" python3 "$WORK/tool.py" bulk 7009 &
    wait_for "$B" 127.0.0.1 7007; wait_for "$B" 127.0.0.1 7009
    case $case in
    ours*)
        local lanes=1
        [ "$case" = ours-1conn ] && lanes=0
        [ "$case" = ours-lanes3 ] && lanes=3
        ip netns exec "$C" "$OURS" server --listen 10.254.0.1:$sp --public-bind 127.0.0.1 --insecure \
            > "$WORK/server.log" 2>&1 &
        wait_for "$C" 10.254.0.1 $sp
        ip netns exec "$B" "$OURS" client --server ws://10.254.0.1:$sp/ -R 0:127.0.0.1:7007 -R 0:127.0.0.1:7009 \
            --lanes $lanes > "$WORK/client.log" 2>&1 &
        for _ in $(seq 100); do [ "$(grep -c exposed "$WORK/client.log")" = 2 ] && break; sleep 0.1; done
        pe=$(awk '/exposed 127.0.0.1:7007/ {print $NF}' "$WORK/client.log")
        pb=$(awk '/exposed 127.0.0.1:7009/ {print $NF}' "$WORK/client.log")
        ;;
    erebe)
        pe=17007 pb=17009
        ip netns exec "$C" "$EREBE_WSTUNNEL" server --log-lvl=ERROR ws://10.254.0.1:$sp > "$WORK/server.log" 2>&1 &
        wait_for "$C" 10.254.0.1 $sp
        ip netns exec "$B" "$EREBE_WSTUNNEL" client --log-lvl=ERROR -R tcp://127.0.0.1:$pe:127.0.0.1:7007 \
            -R tcp://127.0.0.1:$pb:127.0.0.1:7009 ws://10.254.0.1:$sp > "$WORK/client.log" 2>&1 &
        ;;
    esac
    wait_for "$C" 127.0.0.1 "$pe"; wait_for "$C" 127.0.0.1 "$pb"
    local idle loaded bulk
    idle=$(ip netns exec "$C" python3 "$WORK/tool.py" rtt "$pe" 2)
    ip netns exec "$C" python3 "$WORK/tool.py" load "$pb" $((SECS + 3)) "$DIR" > "$WORK/bulk.json" &
    local loader=$!
    sleep 2 # the transfer fills the queues first
    loaded=$(ip netns exec "$C" python3 "$WORK/tool.py" rtt "$pe" "$SECS" "$HOLD")
    wait $loader
    bulk=$(cat "$WORK/bulk.json")
    echo "{\"case\":\"$case\",\"hold\":$HOLD,\"rate_mbit\":$RATE,\"idle_rtt_ms\":$idle,\"loaded_rtt_ms\":$loaded,\"bulk\":$bulk}"
    teardown
}

for case in ${CASES//,/ }; do
    run_case "$case"
done
