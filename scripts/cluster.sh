#!/usr/bin/env bash
# The deploy topology as local processes on loopback, in one command:
# etcd, Redis, PostgreSQL, nsqlookupd + nsqd, two logic, two conn and two
# job nodes, with the deploy/*.toml configs (addresses and node ids set per
# node through CHATROOM__* variables).
#
#   scripts/cluster.sh up       start everything, wait for each /readyz, print the URLs
#   scripts/cluster.sh status   what runs, and whether each node is ready
#   scripts/cluster.sh down     stop what `up` started (and nothing else)
#
# Needs etcd, redis-server, PostgreSQL (initdb/pg_ctl) — installed with
# apt-get when missing and run as root — and the real NSQ binaries: nsqd
# and nsqlookupd on PATH, or NSQD_BIN / NSQLOOKUPD_BIN.
# Knobs (environment):
#   CLUSTER_DIR   state: pids, logs, data        (default: $TMPDIR/chatroom-cluster)
#   BIN           chatroom binaries              (default: target/release, built if missing)
#   PORT_OFFSET   added to every port below      (default: 0)
#   CLUSTER_SECRET           token.secret of the logic nodes (default: deploy/logic.toml's)
#   CLUSTER_CONN_ENV, CLUSTER_LOGIC_ENV, CLUSTER_JOB_ENV
#                 extra "KEY=value ..." for every node of that service
# Ports (+ PORT_OFFSET): etcd 2379/2380, Redis 6379, PostgreSQL 5432,
# nsqlookupd 4160/4161, nsqd 4150/4151, logic-1 HTTP 8081 gRPC 9100,
# logic-2 HTTP 8082 gRPC 9101, conn-1 WS 8080 gRPC 9000 admin 9200,
# conn-2 WS 8090 gRPC 9001 admin 9201, job-1 admin 9300, job-2 admin 9301.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${CLUSTER_DIR:-${TMPDIR:-/tmp}/chatroom-cluster}
# status and down use the offset `up` was given (kept in the state folder).
off=${PORT_OFFSET:-$(cat "$dir/port-offset" 2>/dev/null || echo 0)}
deadline=${CLUSTER_WAIT_SECS:-60}

p() { echo $(($1 + off)); }
P_ETCD=$(p 2379) P_ETCD_PEER=$(p 2380) P_REDIS=$(p 6379) P_PG=$(p 5432)
P_LOOKUP_TCP=$(p 4160) P_LOOKUP_HTTP=$(p 4161) P_NSQD_TCP=$(p 4150) P_NSQD_HTTP=$(p 4151)
TOPIC=chatroom-room

say() { printf '%s\n' "$*"; }
die() { printf 'cluster.sh: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

# ---------------------------------------------------------------- helpers

running() { # pid: alive and not a zombie
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$state" ] && [ "$state" != Z ]
}

pidfile() { echo "$dir/pids/$1.pid"; }

alive_name() { # name: the process `up` started under that name runs
  local f
  f=$(pidfile "$1")
  [ -f "$f" ] && running "$(cat "$f")"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

http_ok() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }

# Polls `cond...` until it holds; fails if process `name` died or after $deadline s.
wait_for() { # name what cond...
  local name=$1 what=$2
  shift 2
  local end=$((SECONDS + deadline))
  while ! "$@"; do
    if [ "$name" != - ] && ! alive_name "$name"; then
      die "$name exited while waiting for $what; see $dir/logs/$name.log"
    fi
    [ $SECONDS -lt $end ] || die "timed out after ${deadline}s waiting for $what; see $dir/logs/$name.log"
    sleep 0.1
  done
}

start() { # name cwd command...: runs it in the background, remembers its pid
  local name=$1 cwd=$2
  shift 2
  (cd "$cwd" && exec nohup "$@") >"$dir/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$(pidfile "$name")"
  echo "$name" >>"$dir/pids/order"
}

find_bin() { # var name: an executable from $var, PATH, or ../shared/nsq/bin
  local var=$1 name=$2 v
  v=${!var:-}
  if [ -n "$v" ]; then
    [ -x "$v" ] || die "$var=$v is not an executable"
    echo "$v"
  elif command -v "$name" >/dev/null; then
    command -v "$name"
  elif [ -x "$root/../shared/nsq/bin/$name" ]; then
    echo "$root/../shared/nsq/bin/$name"
  else
    return 1
  fi
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

as_pg() { # PostgreSQL refuses to run as root
  if [ "$(id -u)" -eq 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}

# ---------------------------------------------------------------- up

# As root on Debian/Ubuntu, installs what apt has (like scripts/test.sh).
apt_missing() {
  local pkgs=()
  command -v etcd >/dev/null || pkgs+=(etcd-server)
  command -v redis-server >/dev/null || pkgs+=(redis-server)
  command -v curl >/dev/null || pkgs+=(curl)
  { command -v initdb >/dev/null || [ -n "$(pg_bin)" ]; } || pkgs+=(postgresql)
  if [ ${#pkgs[@]} -gt 0 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    say "installing ${pkgs[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null \
      || die "apt-get install ${pkgs[*]} failed"
  fi
}

need_tools() {
  apt_missing
  local missing=()
  command -v etcd >/dev/null || missing+=("etcd (Debian: apt-get install etcd-server)")
  command -v redis-server >/dev/null || missing+=("redis-server (apt-get install redis-server)")
  command -v curl >/dev/null || missing+=("curl (apt-get install curl)")
  { command -v initdb >/dev/null || [ -n "$(pg_bin)" ]; } || missing+=("PostgreSQL (apt-get install postgresql)")
  if ! NSQD=$(find_bin NSQD_BIN nsqd) || ! NSQLOOKUPD=$(find_bin NSQLOOKUPD_BIN nsqlookupd); then
    missing+=("nsqd and nsqlookupd (NSQ v1.3.0): put both on PATH or set NSQD_BIN and NSQLOOKUPD_BIN.
    They are in the NSQ project's release archive for your platform (nsq-1.3.0.linux-amd64.*.tar.gz, bin/),
    or build them with Go: go install github.com/nsqio/nsq/apps/nsqd@v1.3.0 github.com/nsqio/nsq/apps/nsqlookupd@v1.3.0.
    On this project's machines they are in shared/nsq/bin/ beside the repository.")
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    printf 'cluster.sh: missing:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
  fi
}

need_binaries() {
  local given=${BIN:-}
  BIN=${BIN:-${CARGO_TARGET_DIR:-$root/target}/release}
  local b missing=0
  for b in chatroom-logic chatroom-conn chatroom-job; do
    [ -x "$BIN/$b" ] || missing=1
  done
  if [ $missing = 1 ] && [ -n "$given" ]; then
    die "BIN=$given lacks chatroom-logic, chatroom-conn or chatroom-job: cargo build --release -p chatroom-logic -p chatroom-conn -p chatroom-job --bins"
  fi
  if [ $missing = 1 ]; then
    say "building the release binaries into $BIN (cargo build --release)"
    (cd "$root" && cargo build --release -p chatroom-logic -p chatroom-conn -p chatroom-job --bins)
    BIN=$(cd "${CARGO_TARGET_DIR:-$root/target}/release" && pwd)
  fi
  BIN=$(cd "$BIN" && pwd)
}

all_ports() {
  echo "$P_ETCD $P_ETCD_PEER $P_REDIS $P_PG $P_LOOKUP_TCP $P_LOOKUP_HTTP $P_NSQD_TCP $P_NSQD_HTTP"
  local i
  for i in 1 2; do
    echo "$(logic_http $i) $(logic_grpc $i) $(conn_ws $i) $(conn_grpc $i) $(conn_admin $i) $(job_admin $i)"
  done
}
logic_http() { p $((8080 + $1)); }
logic_grpc() { p $((9099 + $1)); }
conn_ws() { if [ "$1" = 1 ]; then p 8080; else p 8090; fi; }
conn_grpc() { p $((8999 + $1)); }
conn_admin() { p $((9199 + $1)); }
job_admin() { p $((9299 + $1)); }

up() {
  if [ -f "$dir/pids/order" ]; then
    local n
    while read -r n; do
      alive_name "$n" && die "already up (from $dir; $n runs): scripts/cluster.sh status | down"
    done <"$dir/pids/order"
    rm -rf "$dir/pids"
  fi
  need_tools
  need_binaries
  local port
  for port in $(all_ports); do
    port_free "$port" || die "port $port is in use (another cluster or server?); try PORT_OFFSET=1000"
  done
  mkdir -p "$dir/pids" "$dir/logs" "$dir/data" "$dir/uploads"
  chmod 755 "$dir"
  : >"$dir/pids/order"
  echo "$off" >"$dir/port-offset"
  say "state in $dir (logs: $dir/logs)"

  # etcd
  start etcd "$dir/data" etcd --name chatroom --data-dir "$dir/data/etcd" \
    --listen-client-urls "http://127.0.0.1:$P_ETCD" --advertise-client-urls "http://127.0.0.1:$P_ETCD" \
    --listen-peer-urls "http://127.0.0.1:$P_ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$P_ETCD_PEER" \
    --initial-cluster "chatroom=http://127.0.0.1:$P_ETCD_PEER"
  # Redis
  start redis "$dir/data" redis-server --port "$P_REDIS" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir/data"
  # nsqlookupd + nsqd
  start nsqlookupd "$dir/data" "$NSQLOOKUPD" --tcp-address="127.0.0.1:$P_LOOKUP_TCP" \
    --http-address="127.0.0.1:$P_LOOKUP_HTTP" --broadcast-address=127.0.0.1
  mkdir -p "$dir/data/nsqd"
  start nsqd "$dir/data" "$NSQD" --tcp-address="127.0.0.1:$P_NSQD_TCP" --http-address="127.0.0.1:$P_NSQD_HTTP" \
    --lookupd-tcp-address="127.0.0.1:$P_LOOKUP_TCP" --broadcast-address=127.0.0.1 --data-path="$dir/data/nsqd"
  # PostgreSQL (its own daemon; pg_ctl stops it)
  local pgb
  pgb=$(pg_bin)
  [ -n "$pgb" ] || pgb=$(dirname "$(command -v initdb)")
  mkdir -p "$dir/data/pg"
  [ "$(id -u)" -eq 0 ] && chown -R postgres "$dir/data/pg"
  if [ ! -f "$dir/data/pg/data/PG_VERSION" ]; then
    as_pg "'$pgb/initdb' -D '$dir/data/pg/data' -A trust -U postgres >'$dir/data/pg/initdb.log' 2>&1" \
      || die "initdb failed; see $dir/data/pg/initdb.log"
  fi
  as_pg "'$pgb/pg_ctl' -D '$dir/data/pg/data' -l '$dir/data/pg/server.log' -w -t 30 \
    -o \"-p $P_PG -k '$dir/data/pg' -c listen_addresses=127.0.0.1 -c fsync=off\" start" >/dev/null \
    || die "PostgreSQL did not start; see $dir/data/pg/server.log"
  echo "$pgb" >"$dir/pids/postgres.bin"
  head -n 1 "$dir/data/pg/data/postmaster.pid" >"$(pidfile postgres)"
  echo postgres >>"$dir/pids/order"

  wait_for etcd "etcd" http_ok "http://127.0.0.1:$P_ETCD/health"
  wait_for redis "Redis" bash -c "exec 3<>/dev/tcp/127.0.0.1/$P_REDIS && printf 'PING\r\n' >&3 && head -c5 <&3 | grep -q PONG"
  wait_for nsqlookupd "nsqlookupd" http_ok "http://127.0.0.1:$P_LOOKUP_HTTP/ping"
  wait_for nsqd "nsqd" http_ok "http://127.0.0.1:$P_NSQD_HTTP/ping"
  # The topic exists before anyone publishes, so job finds nsqd through
  # nsqlookupd on its first poll.
  curl -fsS -o /dev/null -X POST "http://127.0.0.1:$P_NSQD_HTTP/topic/create?topic=$TOPIC" \
    || die "could not create the NSQ topic"
  wait_for nsqd "nsqlookupd to list the topic" \
    bash -c "curl -fsS 'http://127.0.0.1:$P_LOOKUP_HTTP/lookup?topic=$TOPIC' | grep -q tcp_port"
  if ! as_pg "'$pgb/psql' -h 127.0.0.1 -p $P_PG -U postgres -tAc \"SELECT 1 FROM pg_database WHERE datname='chatroom'\"" | grep -q 1; then
    as_pg "'$pgb/psql' -h 127.0.0.1 -p $P_PG -U postgres -qc 'CREATE DATABASE chatroom'" >/dev/null \
      || die "could not create the chatroom database"
  fi

  local common=(
    "CHATROOM__DISCOVERY__ENDPOINTS=http://127.0.0.1:$P_ETCD"
    NO_COLOR=1
  )
  local i secret=()
  [ -n "${CLUSTER_SECRET:-}" ] && secret=("CHATROOM__TOKEN__SECRET=$CLUSTER_SECRET")
  for i in 1 2; do
    # shellcheck disable=SC2086 # CLUSTER_*_ENV are word lists on purpose
    start "logic-$i" "$root" env "${common[@]}" ${secret[@]+"${secret[@]}"} \
      "CHATROOM__NODE__ID=logic-$i" "CHATROOM__ID_NODE=$i" \
      "CHATROOM__LOG__DIR=$dir/logs/logic-$i" \
      "CHATROOM__HTTP__ADDR=127.0.0.1:$(logic_http $i)" "CHATROOM__GRPC__ADDR=127.0.0.1:$(logic_grpc $i)" \
      "CHATROOM__QUEUE__NSQD_TCP_ADDRESSES=127.0.0.1:$P_NSQD_TCP" \
      "CHATROOM__PRESENCE__URL=redis://127.0.0.1:$P_REDIS/" \
      "CHATROOM__STORE__URL=postgres://postgres@127.0.0.1:$P_PG/chatroom" \
      "CHATROOM__IM__UPLOAD_DIR=$dir/uploads" \
      ${CLUSTER_LOGIC_ENV:-} \
      "$BIN/chatroom-logic" --config "$root/deploy/logic.toml"
    # The first node migrates the store; the second starts on a ready schema.
    wait_for "logic-$i" "logic-$i /readyz" http_ok "http://127.0.0.1:$(logic_http $i)/readyz"
  done
  for i in 1 2; do
    # shellcheck disable=SC2086
    start "conn-$i" "$dir" env "${common[@]}" \
      "CHATROOM__NODE__ID=conn-$i" "CHATROOM__LOG__DIR=$dir/logs/conn-$i" \
      "CHATROOM__WS__ADDR=127.0.0.1:$(conn_ws $i)" "CHATROOM__GRPC__ADDR=127.0.0.1:$(conn_grpc $i)" \
      "CHATROOM__ADMIN__ADDR=127.0.0.1:$(conn_admin $i)" \
      ${CLUSTER_CONN_ENV:-} \
      "$BIN/chatroom-conn" --config "$root/deploy/conn.toml"
  done
  for i in 1 2; do
    wait_for "conn-$i" "conn-$i /readyz" http_ok "http://127.0.0.1:$(conn_admin $i)/readyz"
  done
  for i in 1 2; do
    # shellcheck disable=SC2086
    start "job-$i" "$dir" env "${common[@]}" \
      "CHATROOM__NODE__ID=job-$i" "CHATROOM__LOG__DIR=$dir/logs/job-$i" \
      "CHATROOM__ADMIN__ADDR=127.0.0.1:$(job_admin $i)" \
      "CHATROOM__QUEUE__LOOKUPD_HTTP_ADDRESSES=http://127.0.0.1:$P_LOOKUP_HTTP" \
      ${CLUSTER_JOB_ENV:-} \
      "$BIN/chatroom-job" --config "$root/deploy/job.toml"
  done
  for i in 1 2; do
    wait_for "job-$i" "job-$i /readyz" http_ok "http://127.0.0.1:$(job_admin $i)/readyz"
    # Ready means subscribed to nsqd (found through nsqlookupd) and pushing
    # to both conn nodes.
    wait_for "job-$i" "job-$i to connect to nsqd and see both conn nodes" bash -c \
      "m=\$(curl -fsS http://127.0.0.1:$(job_admin $i)/metrics) && \
       grep -q '^chatroom_nsq_connections{role=\"consumer\"} [1-9]' <<<\"\$m\" && \
       grep -q '^chatroom_job_conn_nodes{node=\"job-$i\"} 2' <<<\"\$m\""
  done
  write_prometheus
  print_urls
}

write_prometheus() {
  cat >"$dir/prometheus.yml" <<EOF
# Prometheus for scripts/cluster.sh (prometheus --config.file=$dir/prometheus.yml)
global:
  scrape_interval: 5s
scrape_configs:
  - job_name: chatroom-logic
    static_configs:
      - targets: ["127.0.0.1:$(logic_http 1)", "127.0.0.1:$(logic_http 2)"]
  - job_name: chatroom-conn
    static_configs:
      - targets: ["127.0.0.1:$(conn_admin 1)", "127.0.0.1:$(conn_admin 2)"]
  - job_name: chatroom-job
    static_configs:
      - targets: ["127.0.0.1:$(job_admin 1)", "127.0.0.1:$(job_admin 2)"]
EOF
}

print_urls() {
  cat <<EOF

chatroom cluster is up (state and logs in $dir)
  WebSocket   ws://127.0.0.1:$(conn_ws 1)/room   ws://127.0.0.1:$(conn_ws 2)/room   (/chat for IM JSON)
  HTTP API    http://127.0.0.1:$(logic_http 1)   http://127.0.0.1:$(logic_http 2)   (POST /tk, POST /msg, /web/chat.html)
  metrics     logic  http://127.0.0.1:$(logic_http 1)/metrics   http://127.0.0.1:$(logic_http 2)/metrics
              conn   http://127.0.0.1:$(conn_admin 1)/metrics   http://127.0.0.1:$(conn_admin 2)/metrics
              job    http://127.0.0.1:$(job_admin 1)/metrics   http://127.0.0.1:$(job_admin 2)/metrics
  health      the same hosts: /healthz, /readyz
  etcd        http://127.0.0.1:$P_ETCD      Redis redis://127.0.0.1:$P_REDIS/
  PostgreSQL  postgres://postgres@127.0.0.1:$P_PG/chatroom
  NSQ         nsqd 127.0.0.1:$P_NSQD_TCP (http :$P_NSQD_HTTP), nsqlookupd http://127.0.0.1:$P_LOOKUP_HTTP, topic $TOPIC
  Prometheus  prometheus --config.file=$dir/prometheus.yml   (dashboard: deploy/grafana/chatroom.json)
  stop        scripts/cluster.sh down
EOF
}

# ---------------------------------------------------------------- status / down

readyz_of() { # name: its /readyz URL, if it has one
  local i=${1##*-}
  case $1 in
    logic-*) echo "http://127.0.0.1:$(logic_http "$i")/readyz" ;;
    conn-*) echo "http://127.0.0.1:$(conn_admin "$i")/readyz" ;;
    job-*) echo "http://127.0.0.1:$(job_admin "$i")/readyz" ;;
  esac
}

status() {
  [ -f "$dir/pids/order" ] || { say "not running (no state in $dir)"; exit 1; }
  local n url bad=0 state
  while read -r n; do
    if alive_name "$n"; then
      state="running (pid $(cat "$(pidfile "$n")"))"
      url=$(readyz_of "$n")
      if [ -n "$url" ]; then
        if http_ok "$url"; then state="$state, ready"; else state="$state, NOT ready"; bad=1; fi
      fi
    else
      state="stopped"
      bad=1
    fi
    printf '  %-11s %s\n' "$n" "$state"
  done <"$dir/pids/order"
  exit $bad
}

stop_pid() { # name pid
  kill -TERM "$2" 2>/dev/null || return 0
  local _
  for _ in $(seq 1 200); do
    running "$2" || return 0
    sleep 0.1
  done
  say "$1 did not stop after SIGTERM: killing it"
  kill -KILL "$2" 2>/dev/null || true
}

down() {
  [ -f "$dir/pids/order" ] || { say "nothing to stop (no state in $dir)"; return 0; }
  local names n
  mapfile -t names <"$dir/pids/order"
  # Last started first: jobs, conns, logics, then what they use.
  for ((k = ${#names[@]} - 1; k >= 0; k--)); do
    n=${names[k]}
    if [ "$n" = postgres ]; then
      local pgb
      pgb=$(cat "$dir/pids/postgres.bin")
      if alive_name postgres; then
        as_pg "'$pgb/pg_ctl' -D '$dir/data/pg/data' -m fast -w stop" >/dev/null || true
      fi
      say "stopped postgres"
      continue
    fi
    if alive_name "$n"; then
      stop_pid "$n" "$(cat "$(pidfile "$n")")"
      say "stopped $n"
    fi
  done
  rm -rf "$dir/pids"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) usage ;;
esac
