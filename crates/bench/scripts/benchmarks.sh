#!/usr/bin/env bash
# Reproduces the figures in BENCHMARKS.md: idle capacity (19,000 sessions,
# server memory per session) and one-room fan-out (10,000 sessions, rising
# publish rates) against the standalone server, and the same fan-out against
# nats-server over WebSocket when it is installed. Each run gets a fresh
# server and waits for the machine to be quiet first; every report is kept as
# a JSON line (appended to $OUT/results.jsonl, so a later call can add runs)
# and summarised (median, min, max) at the end, leaving out runs during which
# other processes used more than $QUIET_CORES cores (idle runs are kept: their
# figure, memory, does not depend on CPU).
#
#   cargo build --release -p chatroom -p chatroom-bench
#   crates/bench/scripts/benchmarks.sh                 # everything, 3 runs each
#   RUNS=1 RATES="10 100" SCENARIOS=fanout crates/bench/scripts/benchmarks.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
BIN=$(cd "${BIN:-$root/target/release}" && pwd)
OUT=${OUT:-$(mktemp -d /tmp/chatroom-bench.XXXXXX)}
RUNS=${RUNS:-3}
RATES=${RATES:-"10 30 100 300"}
SCENARIOS=${SCENARIOS:-"idle fanout nats"}
SECRET=${SECRET:-chatroom-dev-secret-change-me}
SOURCES=${SOURCES:-127.0.0.2-127.0.0.20}
QUIET_CORES=${QUIET_CORES:-0.15}
mkdir -p "$OUT"
results="$OUT/results.jsonl"
echo "results in $results" >&2

server=""
stop_server() {
  if [ -n "$server" ]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
  fi
}
trap stop_server EXIT INT TERM

wait_port() { # port
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  return 1
}

port_free() { # port: waits until nothing listens there (a server still shutting down)
  for _ in $(seq 1 100); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "port $1 stays busy" >&2
  return 1
}

alive() {
  if ! kill -0 "$server" 2>/dev/null; then
    echo "the server exited; see $OUT/*.log" >&2
    return 1
  fi
}

start_chatroom() {
  port_free 8080
  port_free 8081
  # Run from $OUT: the server keeps its SQLite file and uploads under ./data.
  (cd "$OUT" && CHATROOM__CONN__WS__MAX_CONNECTIONS=20000 CHATROOM__LOG__DIR= exec "$BIN/chatroom") >"$OUT/chatroom.log" 2>&1 &
  server=$!
  wait_port 8080
  wait_port 8081
  alive
}

start_nats() {
  port_free 8222
  printf 'listen: "127.0.0.1:4222"\nmax_payload: 1048576\nwebsocket {\n  listen: "127.0.0.1:8222"\n  no_tls: true\n}\n' >"$OUT/nats.conf"
  nats-server -c "$OUT/nats.conf" >"$OUT/nats.log" 2>&1 &
  server=$!
  wait_port 8222
  alive
}

# Waits (up to 10 minutes) until the machine's CPUs are idle: other
# people's builds would otherwise be measured along with the server.
wait_quiet() {
  local a b
  busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
  for _ in $(seq 1 60); do
    a=$(busy); sleep 3; b=$(busy)
    if awk -v d=$((b - a)) -v q="$QUIET_CORES" 'BEGIN{exit !(d/300 < q)}'; then return 0; fi
    sleep 7
  done
  echo "machine not quiet after 10 minutes; measuring anyway" >&2
}

bench() { # scenario, then chatroom-bench run arguments
  local scenario=$1; shift
  wait_quiet
  alive
  local line
  line=$("$BIN/chatroom-bench" run --server-pid "$server" --source-ips "$SOURCES" --json --quiet "$@" | tail -1)
  echo "{\"scenario\":\"$scenario\",\"report\":$line}" >>"$results"
  echo "$scenario: $(echo "$line" | head -c 300)..." >&2
}

for s in $SCENARIOS; do
  case $s in
  idle)
    for _ in $(seq 1 "$RUNS"); do
      start_chatroom
      bench idle --sessions 19000 --publishers 0 --duration 10 --settle 5 --token-secret "$SECRET"
      stop_server
    done
    ;;
  fanout)
    for rate in $RATES; do
      for _ in $(seq 1 "$RUNS"); do
        start_chatroom
        bench "fanout-$rate" --sessions 10000 --room-dist single --publishers 1 --rate "$rate" \
          --duration 10 --warmup 3 --token-secret "$SECRET"
        stop_server
      done
    done
    ;;
  nats)
    if ! command -v nats-server >/dev/null; then
      echo "nats-server not installed (apt-get install nats-server): skipping" >&2
      continue
    fi
    for rate in $RATES; do
      for _ in $(seq 1 "$RUNS"); do
        start_nats
        bench "nats-$rate" --target nats --ws ws://127.0.0.1:8222 --sessions 10000 --room-dist single \
          --publishers 1 --rate "$rate" --duration 10 --warmup 3
        stop_server
      done
    done
    ;;
  *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
done

python3 - "$results" "$QUIET_CORES" <<'PY'
import json, statistics, sys
# Runs during which other processes used the CPUs are left out (and counted).
rows, dropped = {}, {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    other = r["report"].get("other_cpu_cores") or 0
    if other > float(sys.argv[2]) and not r["scenario"].startswith("idle"):
        dropped[r["scenario"]] = dropped.get(r["scenario"], 0) + 1
        continue
    rows.setdefault(r["scenario"], []).append(r["report"])
def fmt(vals, f="{:.0f}"):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    return f"{f.format(statistics.median(vals))} ({f.format(min(vals))}..{f.format(max(vals))})"
print("| scenario | runs (left out) | signed in | server KiB/session | deliveries/s | p50 ms | p99 ms | p99.9 ms | max ms | lost | dup | server cores | generator cores | other cores |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for name, rs in rows.items():
    kib = [r["server_bytes_per_session"] / 1024 if r["server_bytes_per_session"] else None for r in rs]
    print("| " + " | ".join([
        name, f"{len(rs)} ({dropped.get(name, 0)})", fmt([r["signed_in"] for r in rs]),
        fmt(kib, "{:.2f}"), fmt([r["deliveries_per_sec"] for r in rs]),
        fmt([r["latency"]["p50_us"] / 1000 for r in rs], "{:.1f}"),
        fmt([r["latency"]["p99_us"] / 1000 for r in rs], "{:.1f}"),
        fmt([r["latency"]["p999_us"] / 1000 for r in rs], "{:.1f}"),
        fmt([r["latency"]["max_us"] / 1000 for r in rs], "{:.1f}"),
        fmt([r["loss"]["lost"] for r in rs]), fmt([r["duplicates"] for r in rs]),
        fmt([r["server_cpu_cores"] for r in rs], "{:.2f}"), fmt([r["generator_cpu_cores"] for r in rs], "{:.2f}"),
        fmt([r.get("other_cpu_cores") for r in rs], "{:.2f}"),
    ]) + " |")
PY
