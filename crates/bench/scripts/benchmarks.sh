#!/usr/bin/env bash
# Reproduces the figures in BENCHMARKS.md. Scenarios (SCENARIOS, any of):
#
#   idle             (1) 19,000 idle sessions on the standalone server: memory per session
#   fanout           (2) one room of 10,000, one WebSocket publisher at each of RATES
#   nats             the same fan-out against nats-server over WebSocket, when installed
#   rooms            (3) 10,000 sessions in 1,000 rooms of 10, 100 WebSocket publishers,
#                    at each of ROOM_RATES (msg/s over all publishers), NORMAL
#   cluster          (4) the cluster path: POST /msg -> logic -> NSQ (real nsqd, found
#                    by job through nsqlookupd) -> job -> two conn nodes (the deploy
#                    topology of scripts/cluster.sh), 10,000 sessions in one room split over
#                    the two conn nodes, at each of CLUSTER_RATES; plus (1) on one
#                    cluster conn node (19,000 idle sessions on conn-a)
#   standalone-http  (5) the same load as `cluster` (POST /msg, one room of 10,000)
#                    against the standalone server, to set beside it
#   floor            the bare-socket floor: one 64-byte message written to 10,000
#                    idle sockets by a bare writer, at FLOOR_RATE msg/s (no server)
#
# Each run gets a fresh server (or a fresh cluster from `scripts/cluster.sh up`:
# etcd, Redis, PostgreSQL, nsqlookupd + nsqd, logic-1/2, conn-1/2, job-1/2,
# on loopback under a free port offset, in a temporary folder) and waits for the machine to be quiet first; every report is kept
# as a JSON line (appended to $OUT/results.jsonl, so a later call can add
# runs) and summarised (median, min, max) at the end, leaving out runs during
# which other processes used more than $QUIET_CORES cores (idle runs are
# kept: their figure, memory, does not depend on CPU). Server logs are in
# $OUT/*.log.
#
#   cargo build --release -p chatroom -p chatroom-bench -p chatroom-conn -p chatroom-logic \
#     -p chatroom-job --bins
#   crates/bench/scripts/benchmarks.sh                 # idle fanout nats, 3 runs each
#   RUNS=1 RATES="10 100" SCENARIOS=fanout crates/bench/scripts/benchmarks.sh
#   RUNS=3 SCENARIOS="cluster standalone-http" crates/bench/scripts/benchmarks.sh
#   RUNS=3 SCENARIOS=rooms ROOM_RATES="1000 2000" crates/bench/scripts/benchmarks.sh
#
# The cluster needs what scripts/cluster.sh needs: etcd, redis-server,
# PostgreSQL and the real nsqd + nsqlookupd (on PATH or NSQD_BIN /
# NSQLOOKUPD_BIN); it says what is missing and how to get it.
# SESSIONS, DURATION and WARMUP override every scenario's session count,
# measured seconds and warm-up seconds (for a quick functional check, e.g.
# SESSIONS=300 DURATION=2 WARMUP=1 RUNS=1 CLUSTER_RATES=10 SCENARIOS=cluster).
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
BIN=$(cd "${BIN:-$root/target/release}" && pwd)
OUT=${OUT:-$(mktemp -d /tmp/chatroom-bench.XXXXXX)}
RUNS=${RUNS:-3}
RATES=${RATES:-"10 100 300 1000"}
FLOOR_RATE=${FLOOR_RATE:-10}
ROOM_RATES=${ROOM_RATES:-"1000 2000 5000"}
CLUSTER_RATES=${CLUSTER_RATES:-"10 30 100"}
SCENARIOS=${SCENARIOS:-"idle fanout nats"}
SECRET=${SECRET:-chatroom-dev-secret-change-me}
SOURCES=${SOURCES:-127.0.0.2-127.0.0.20}
QUIET_CORES=${QUIET_CORES:-0.15}
SESSIONS=${SESSIONS:-}
# Latency of one message in LATENCY_EVERY (fan-out and nats scenarios; loss
# and duplicates are always counted for every message).
LATENCY_EVERY=${LATENCY_EVERY:-1}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
results="$OUT/results.jsonl"
echo "results in $results" >&2

sessions() { # default count: $SESSIONS when set
  echo "${SESSIONS:-$1}"
}

# Every process started for the current run (name:pid), stopped in reverse
# order; the run's scratch folder (etcd data, SQLite store), removed after.
procs=()
scratch=""
cluster_dir=""
# What the generator measures: the server's pids and the supporting
# processes' pids (comma-separated).
server_pids=""
infra_pids=""

# Whether a process runs (an exited child stays a zombie until waited for,
# and kill -0 still finds it).
running() { # pid
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$state" ] && [ "$state" != Z ]
}

stop_all() {
  local i pid
  # Last started first, one at a time: job before the conn nodes, the
  # services before etcd and the broker they deregister from / drain to.
  for ((i = ${#procs[@]} - 1; i >= 0; i--)); do
    pid=${procs[i]#*:}
    kill -TERM "$pid" 2>/dev/null || true
    # Shutdown graces are a few seconds; past 20 s the process is killed.
    for _ in $(seq 1 200); do
      running "$pid" || break
      sleep 0.1
    done
    if running "$pid"; then
      echo "${procs[i]%%:*} did not stop after SIGTERM: killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  procs=()
  if [ -n "$cluster_dir" ]; then
    CLUSTER_DIR=$cluster_dir "$root/scripts/cluster.sh" down >>"$OUT/cluster-down.log" 2>&1 || true
    rm -rf "$cluster_dir"
    cluster_dir=""
  fi
  server_pids=""
  infra_pids=""
  if [ -n "$scratch" ]; then
    rm -rf "$scratch"
    scratch=""
  fi
}
trap stop_all EXIT
trap 'stop_all; exit 130' INT TERM

started() { # name pid: remember a process to stop
  procs+=("$1:$2")
}

wait_port() { # port [host]
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  return 1
}

free_ports() { # n: n distinct free ports on 127.0.0.1 (all bound at once while picked)
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "$1"
}

alive() {
  local p
  if [ -n "$cluster_dir" ] && ! CLUSTER_DIR=$cluster_dir "$root/scripts/cluster.sh" status >/dev/null; then
    echo "a cluster node stopped or is not ready; see $cluster_dir/logs" >&2
    return 1
  fi
  for p in "${procs[@]}"; do
    if ! running "${p#*:}"; then
      echo "${p%%:*} exited; see $OUT/*.log" >&2
      return 1
    fi
  done
}

# Polls `cond` (a command) every 0.1 s for up to `secs` seconds while the
# run's processes live.
wait_until() { # secs what cond...
  local secs=$1 what=$2
  shift 2
  for _ in $(seq 1 $((secs * 10))); do
    if "$@"; then return 0; fi
    alive
    sleep 0.1
  done
  echo "timed out after ${secs}s waiting for $what" >&2
  return 1
}

# The standalone server on free ports (the machine is shared: 8080/8081 may
# be someone else's server); sets ws_a and http_url.
start_chatroom() {
  local p_ws p_http
  read -r p_ws p_http < <(free_ports 2)
  ws_a="ws://127.0.0.1:$p_ws/room"
  http_url="http://127.0.0.1:$p_http"
  # Run from $OUT: the server keeps its SQLite file and uploads under ./data.
  (cd "$OUT" && CHATROOM__CONN__WS__MAX_CONNECTIONS=20000 CHATROOM__LOG__DIR= \
    CHATROOM__CONN__WS__ADDR="127.0.0.1:$p_ws" CHATROOM__LOGIC__HTTP__ADDR="127.0.0.1:$p_http" \
    exec "$BIN/chatroom") >"$OUT/chatroom.log" 2>&1 &
  started chatroom $!
  server_pids=$!
  wait_port "$p_ws"
  wait_port "$p_http"
  alive
}

# nats-server on free ports; sets ws_a.
start_nats() {
  local p_nats p_ws
  read -r p_nats p_ws < <(free_ports 2)
  ws_a="ws://127.0.0.1:$p_ws"
  printf 'listen: "127.0.0.1:%s"\nmax_payload: 1048576\nwebsocket {\n  listen: "127.0.0.1:%s"\n  no_tls: true\n}\n' \
    "$p_nats" "$p_ws" >"$OUT/nats.conf"
  nats-server -c "$OUT/nats.conf" >"$OUT/nats.log" 2>&1 &
  started nats-server $!
  server_pids=$!
  wait_port "$p_ws"
  alive
}

# --- the cluster -----------------------------------------------------------

# The deploy topology through scripts/cluster.sh (etcd, Redis, PostgreSQL,
# real nsqlookupd + nsqd, two logic, two conn, two job; every node waited on
# its /readyz), under a port offset where all its ports are free. Sets ws_a,
# ws_b, http_url and the pids (pid_conn_a, pid_conn_b, cluster_pids,
# cluster_infra).
cluster_pid() { cat "$cluster_dir/pids/$1.pid"; }
start_cluster() {
  for b in chatroom-logic chatroom-conn chatroom-job; do
    if [ ! -x "$BIN/$b" ]; then
      echo "$BIN/$b is missing: cargo build --release -p chatroom-conn -p chatroom-logic -p chatroom-job --bins" >&2
      return 1
    fi
  done
  cluster_dir=$(mktemp -d /tmp/chatroom-cluster.XXXXXX)
  local off ok=0
  for off in 20000 21000 22000 23000 24000 25000; do
    if CLUSTER_DIR=$cluster_dir PORT_OFFSET=$off BIN=$BIN CLUSTER_SECRET=$SECRET \
      CLUSTER_CONN_ENV="CHATROOM__WS__MAX_CONNECTIONS=20000" \
      "$root/scripts/cluster.sh" up >"$OUT/cluster-up.log" 2>&1; then
      ok=1
      break
    fi
    grep -q "is in use" "$OUT/cluster-up.log" || break
  done
  if [ $ok = 0 ]; then
    cat "$OUT/cluster-up.log" >&2
    return 1
  fi
  ws_a="ws://127.0.0.1:$((8080 + off))/room"
  ws_b="ws://127.0.0.1:$((8090 + off))/room"
  http_url="http://127.0.0.1:$((8081 + off))"
  pid_conn_a=$(cluster_pid conn-1)
  pid_conn_b=$(cluster_pid conn-2)
  cluster_pids="$pid_conn_a,$pid_conn_b,$(cluster_pid logic-1),$(cluster_pid logic-2),$(cluster_pid job-1),$(cluster_pid job-2)"
  cluster_infra="$(cluster_pid etcd),$(cluster_pid redis),$(cluster_pid postgres),$(cluster_pid nsqlookupd),$(cluster_pid nsqd)"
  infra_pids=$cluster_infra
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
  local line infra=()
  if [ -n "$infra_pids" ]; then infra=(--infra-pid "$infra_pids"); fi
  line=$("$BIN/chatroom-bench" run --server-pid "$server_pids" ${infra[@]+"${infra[@]}"} \
    --source-ips "$SOURCES" --json --quiet "$@" | tail -1)
  echo "{\"scenario\":\"$scenario\",\"report\":$line}" >>"$results"
  echo "$scenario: $(echo "$line" | head -c 300)..." >&2
}

# One room of 10,000 receiving sessions, one POST /msg publisher (IMPORTANT):
# the load of scenarios (4) and (5), into $http_fanout.
http_fanout_args() { # rate
  http_fanout=(--sessions "$(sessions 10000)" --room-dist single --publishers 1 --rate "$1" --publish http
    --duration "$DURATION" --warmup "$WARMUP" --token-secret "$SECRET")
}

for s in $SCENARIOS; do
  case $s in
  idle)
    for _ in $(seq 1 "$RUNS"); do
      start_chatroom
      bench idle --ws "$ws_a" --http "$http_url" --sessions "$(sessions 19000)" --publishers 0 --duration "$DURATION" --settle 5 --token-secret "$SECRET"
      stop_all
    done
    ;;
  fanout)
    for rate in $RATES; do
      for _ in $(seq 1 "$RUNS"); do
        start_chatroom
        bench "fanout-$rate" --ws "$ws_a" --http "$http_url" --sessions "$(sessions 10000)" --room-dist single --publishers 1 --rate "$rate" \
          --duration "$DURATION" --warmup "$WARMUP" --token-secret "$SECRET" --latency-every "$LATENCY_EVERY"
        stop_all
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
        bench "nats-$rate" --target nats --ws "$ws_a" --sessions "$(sessions 10000)" --room-dist single \
          --publishers 1 --rate "$rate" --duration "$DURATION" --warmup "$WARMUP" --latency-every "$LATENCY_EVERY"
        stop_all
      done
    done
    ;;
  rooms)
    # (3) many small rooms: every message is the whole path for 10 receivers.
    for rate in $ROOM_RATES; do
      for _ in $(seq 1 "$RUNS"); do
        start_chatroom
        bench "rooms-$rate" --ws "$ws_a" --http "$http_url" --sessions "$(sessions 10000)" --rooms 1000 --room-dist uniform \
          --publishers 100 --rate "$rate" --publish ws --level normal \
          --duration "$DURATION" --warmup "$WARMUP" --token-secret "$SECRET"
        stop_all
      done
    done
    ;;
  cluster)
    # (1) on a cluster conn node: 19,000 idle sessions on conn-a alone,
    # memory and CPU of conn-a alone; the rest of the cluster (logic takes
    # the heartbeats) is reported as infra.
    for _ in $(seq 1 "$RUNS"); do
      start_cluster
      server_pids=$pid_conn_a
      infra_pids="$cluster_infra,${cluster_pids#*,}"
      bench cluster-idle-conn --ws "$ws_a" --http "$http_url" --sessions "$(sessions 19000)" \
        --publishers 0 --duration "$DURATION" --settle 5 --token-secret "$SECRET"
      stop_all
    done
    # (4) POST /msg -> logic -> NSQ -> job -> conn-1 and conn-2, sessions
    # alternating between the two nodes. Server memory per session and
    # server CPU are over all six service processes (conn-1/2, logic-1/2,
    # job-1/2) together; etcd, Redis, PostgreSQL and NSQ are infra.
    for rate in $CLUSTER_RATES; do
      for _ in $(seq 1 "$RUNS"); do
        start_cluster
        server_pids=$cluster_pids
        http_fanout_args "$rate"
        bench "cluster-$rate" --ws "$ws_a,$ws_b" --http "$http_url" "${http_fanout[@]}"
        stop_all
      done
    done
    ;;
  standalone-http)
    # (5) the cluster's load against the standalone server.
    for rate in $CLUSTER_RATES; do
      for _ in $(seq 1 "$RUNS"); do
        start_chatroom
        http_fanout_args "$rate"
        bench "standalone-http-$rate" --ws "$ws_a" --http "$http_url" "${http_fanout[@]}"
        stop_all
      done
    done
    ;;
  floor)
    for _ in $(seq 1 "$RUNS"); do
      wait_quiet
      line=$("$BIN/chatroom-bench" floor --sessions "$(sessions 10000)" --rate "$FLOOR_RATE" \
        --duration "$DURATION" --source-ips "$SOURCES" --json | tail -1)
      echo "$line" >>"$OUT/floor.jsonl"
      echo "floor: $line" >&2
    done
    ;;
  *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
done

if [ -f "$OUT/floor.jsonl" ]; then
  python3 - "$OUT/floor.jsonl" <<'PY'
import json, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
med = lambda k: statistics.median(r["latency"][k] / 1000 for r in rs)
print(f"floor ({len(rs)} runs, {rs[0]['sessions']} sockets, {rs[0]['rate']} msg/s): "
      f"p50 {med('p50_us'):.1f} ms, p99 {med('p99_us'):.1f} ms, max {med('max_us'):.1f} ms, "
      f"{statistics.median(r['pass_ms'] for r in rs):.1f} ms per message to every socket, "
      f"{statistics.median(r['cpu_us_per_write'] for r in rs):.1f} µs CPU per write")
PY
fi
[ -f "$results" ] || exit 0

python3 - "$results" "$QUIET_CORES" <<'PY'
import json, statistics, sys
# Runs during which other processes used the CPUs are left out (and counted).
rows, dropped = {}, {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    other = r["report"].get("other_cpu_cores") or 0
    if other > float(sys.argv[2]) and "idle" not in r["scenario"]:
        dropped[r["scenario"]] = dropped.get(r["scenario"], 0) + 1
        continue
    rows.setdefault(r["scenario"], []).append(r["report"])
def fmt(vals, f="{:.0f}"):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    return f"{f.format(statistics.median(vals))} ({f.format(min(vals))}..{f.format(max(vals))})"
print("Server figures are over every measured process (cluster-N: conn-1/2, logic-1/2, job-1/2;")
print("cluster-idle-conn: conn-1 alone); infra = etcd, Redis, PostgreSQL, nsqlookupd and nsqd")
print("(cluster-idle-conn: also conn-2, both logic and both job nodes).")
print()
print("| scenario | runs (left out) | server processes | signed in | server KiB/session | sent msg/s | deliveries/s | msgs/frame | p50 ms | p99 ms | p99.9 ms | max ms | lost | dup | cut off | server cores | infra cores | generator cores | other cores |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for name, rs in rows.items():
    kib = [r["server_bytes_per_session"] / 1024 if r["server_bytes_per_session"] else None for r in rs]
    print("| " + " | ".join([
        name, f"{len(rs)} ({dropped.get(name, 0)})",
        fmt([len(r.get("server_pids") or []) or None for r in rs]),
        fmt([r["signed_in"] for r in rs]),
        fmt(kib, "{:.2f}"),
        fmt([r["publish_rate"] if r["publishers"] else None for r in rs], "{:.1f}"),
        fmt([r["deliveries_per_sec"] for r in rs]),
        fmt([r["deliveries"] / r["frames"] if r.get("frames") else None for r in rs], "{:.1f}"),
        fmt([r["latency"]["p50_us"] / 1000 for r in rs], "{:.1f}"),
        fmt([r["latency"]["p99_us"] / 1000 for r in rs], "{:.1f}"),
        fmt([r["latency"]["p999_us"] / 1000 for r in rs], "{:.1f}"),
        fmt([r["latency"]["max_us"] / 1000 for r in rs], "{:.1f}"),
        fmt([r["loss"]["lost"] for r in rs]), fmt([r["duplicates"] for r in rs]),
        fmt([r.get("disconnected") for r in rs]),
        fmt([r["server_cpu_cores"] for r in rs], "{:.2f}"),
        fmt([r.get("infra_cpu_cores") for r in rs], "{:.2f}"),
        fmt([r["generator_cpu_cores"] for r in rs], "{:.2f}"),
        fmt([r.get("other_cpu_cores") for r in rs], "{:.2f}"),
    ]) + " |")
PY
