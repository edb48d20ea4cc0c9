#!/usr/bin/env bash
# The whole test suite on a fresh machine: checks formatting and clippy
# (warnings are errors), installs what is missing (apt-get, as root), starts etcd, Redis and PostgreSQL on temporary ports and folders, builds the
# binaries the cluster tests spawn, runs `cargo test --workspace`, the Node
# tests (protobuf.js protocol, IM client) and the browser suite (headless
# Chromium through playwright-core), then stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

log() { printf '\n== %s\n' "$*"; }

# Style first: a format or lint slip fails in seconds, not after the suite.
log "cargo fmt --check, cargo clippy -D warnings"
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v redis-server >/dev/null || need+=(redis-server)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v curl >/dev/null || need+=(curl)
# The browser suite drives Debian's Chromium (playwright-core downloads no browser).
command -v chromium >/dev/null || need+=(chromium)
# The load generator's smoke test also drives nats-server, the peer it is compared with.
[ -x /usr/sbin/nats-server ] || command -v nats-server >/dev/null || need+=(nats-server)
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
[ -n "$(pg_bin)" ] || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: need root to apt-get install ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

work=$(mktemp -d /tmp/chatroom-test.XXXXXX)
chmod 755 "$work"
pids=()
pg_stop=""
cleanup() {
  [ -n "$pg_stop" ] && eval "$pg_stop" >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_for() { # what, command...
  local what=$1; shift
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "scripts/test.sh: $what did not start" >&2
  return 1
}

log "starting etcd and redis"
etcd_port=$(free_port); etcd_peer=$(free_port)
etcd --name test --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "test=http://127.0.0.1:$etcd_peer" >"$work/etcd.log" 2>&1 &
pids+=($!)
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)
wait_for etcd curl -sf "http://127.0.0.1:$etcd_port/health"
wait_for redis bash -c "exec 3<>/dev/tcp/127.0.0.1/$redis_port && printf 'PING\r\n' >&3 && head -c5 <&3 | grep -q PONG"

log "starting postgresql"
pg_port=$(free_port)
pgb=$(pg_bin)
mkdir -p "$work/pg"
as_pg() { # PostgreSQL refuses to run as root
  if [ "$(id -u)" -eq 0 ]; then chown -R postgres "$work/pg"; su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}
as_pg "'$pgb/initdb' -D '$work/pg/data' -A trust -U postgres >'$work/pg/initdb.log' 2>&1"
as_pg "'$pgb/pg_ctl' -D '$work/pg/data' -l '$work/pg/server.log' -w -t 30 \
  -o \"-p $pg_port -k '$work/pg' -c listen_addresses=127.0.0.1 -c fsync=off\" start >/dev/null"
pg_stop="as_pg \"'$pgb/pg_ctl' -D '$work/pg/data' -m immediate stop\""

export CHATROOM_TEST_ETCD="http://127.0.0.1:$etcd_port"
export CHATROOM_TEST_REDIS="redis://127.0.0.1:$redis_port/"
export CHATROOM_TEST_PG="postgres://postgres@127.0.0.1:$pg_port/postgres"
echo "etcd $CHATROOM_TEST_ETCD, redis $CHATROOM_TEST_REDIS, postgres $CHATROOM_TEST_PG"

log "building"
cargo build --workspace --bins
export CHATROOM_BIN_DIR="${CARGO_TARGET_DIR:-$root/target}/debug"

if [ -n "${NSQD_BIN:-}" ]; then
  echo "real NSQ: NSQD_BIN=$NSQD_BIN NSQLOOKUPD_BIN=${NSQLOOKUPD_BIN:-(beside nsqd)}"
else
  echo "real NSQ: NSQD_BIN is not set; the real-nsqd cluster test will not run"
fi

log "cargo test --workspace"
cargo test --workspace 2>&1 | tee "$work/cargo-test.log"
# With NSQD_BIN set the test cannot pass without running (it only returns
# early when NSQD_BIN is unset).
if [ -n "${NSQD_BIN:-}" ] && grep -q '^test cluster_with_real_nsqd \.\.\. ok' "$work/cargo-test.log"; then
  real_nsq="ran and passed (real nsqd + nsqlookupd)"
else
  real_nsq="did NOT run (set NSQD_BIN and NSQLOOKUPD_BIN, e.g. from shared/nsq/bin/)"
fi
echo "real-NSQ cluster test: $real_nsq"

log "npm ci (protobuf.js, ws, playwright-core)"
(cd web && npm ci --no-audit --no-fund --loglevel=error)
export CHATROOM_BIN="$CHATROOM_BIN_DIR/chatroom"

log "Node tests: protobuf.js protocol, reconnection, IM client, vendored protobuf.js"
(cd web && node --test $(ls test/*.test.mjs | grep -v '/browser-'))

log "browser suite: headless Chromium on the room and IM pages"
CHROMIUM=$(command -v chromium)
export CHROMIUM
(cd web && node --test test/browser-*.test.mjs)
echo "screenshots: $root/web/screenshots/"
log "all tests passed; real-NSQ cluster test $real_nsq"
