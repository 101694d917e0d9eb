#!/usr/bin/env bash
# The local demo of Plantlink. On a fresh Debian machine it installs what is missing, builds the
# programs, and runs what exists so far, each part on a free port in a temporary folder:
#   1. a private Mosquitto and the edge agent; readings of several firmware shapes are published,
#      and the demo shows what the agent queued, what it refused and why, and its metrics;
#   2. the batch codec on the reference dataset (bytes per reading against zstd over JSON lines).
# The cloud half (QUIC uplink, cloud-ingest, PostgreSQL, Kafka) joins as it lands.
#
#   ./deploy/demo.sh          run the demo
#   ./deploy/demo.sh --ci     a shorter run for CI
#   ./deploy/demo.sh --keep   leave Mosquitto and the agent running at the end
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/lib/services.sh

ci=0; keep=0
for a in "$@"; do
  case "$a" in
    --ci) ci=1 ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "error: unknown option $a (try --help)" >&2; exit 2 ;;
  esac
done

ensure_toolchain
ensure_mosquitto
log "building the programs (release)"
cargo build --locked --release -p edge-agent -p cloud-ingest -p firmware-sim
bin="${CARGO_TARGET_DIR:-target}/release"

work=$(mktemp -d /tmp/plantlink-demo.XXXXXX)
pids=()
cleanup() {
  if [ "$keep" -eq 1 ]; then
    log "left running (pids ${pids[*]}); files in $work"
    return
  fi
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mport=$(free_port); metrics=$(free_port)
cat > "$work/mosquitto.conf" <<EOC
listener $mport 127.0.0.1
allow_anonymous true
max_inflight_messages 1000
max_queued_messages 1000000
EOC
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do port_open 127.0.0.1 "$mport" && break; sleep 0.1; done
log "Mosquitto on 127.0.0.1:$mport"

cat > "$work/edge-agent.toml" <<EOA
[gateway]
id = "gw-demo-01"
tenant = "acme"
[store]
path = "$work/queue.db"
[mqtt]
url = "mqtt://127.0.0.1:$mport"
client_id = "plantlink-gw-demo-01"
subscriptions = ["plant/#"]
[[mqtt.topics]]
template = "plant/{site}/{line}/{device}/{metric}"
[[mqtt.topics]]
template = "plant/{site}/{line}/{device}"
[metrics]
bind = "127.0.0.1:$metrics"
[limits]
per_device_per_sec = 1000
burst = 2000
[[firmware]]
device_type = "th-100"
version = "1.x"
fields = { t = "temperature", h = "humidity" }
EOA
"$bin/edge-agent" check-config --config "$work/edge-agent.toml"
"$bin/edge-agent" run --config "$work/edge-agent.toml" 2>"$work/edge-agent.log" &
pids+=($!)
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$metrics/metrics" 2>/dev/null | grep -q '^plantlink_edge_mqtt_connected 1' && break
  sleep 0.1
done
log "edge-agent running; metrics on http://127.0.0.1:$metrics/metrics"

n=200; [ "$ci" -eq 1 ] && n=50
pub() { "$bin/firmware-sim" publish --mqtt "mqtt://127.0.0.1:$mport" --topic "$1"; }
log "publishing: bare numbers, the plant JSON shape, multi-metric JSON, firmware 1.x fields, bad input"
seq 1 "$n" | awk '{printf "%.1f\n", 80 + ($1 % 50) / 10}' | pub plant/p1/l3/press01/temperature
seq 1 "$n" | awk '{printf "{\"sensor_id\": \"press02\", \"measurement\": \"pressure\", \"value\": %.1f, \"unit\": \"hPa\", \"ts\": %d}\n", 1013 + ($1 % 10) / 10, 1767225600 + $1}' | pub plant/p1/l3/press02
seq 1 "$n" | awk '{printf "{\"ts\": %d, \"seq\": %d, \"temperature\": %.2f, \"humidity\": %.1f}\n", 1767225600000 + $1 * 1000, $1, 21 + ($1 % 7) / 100, 40 + ($1 % 9) / 10}' | pub plant/p1/l4/th-0001
seq 1 "$n" | awk '{printf "{\"type\": \"th-100\", \"fw\": \"1.4\", \"ts\": %d, \"t\": 20.5, \"h\": 41}\n", 1767225600000 + $1 * 1000}' | pub plant/p1/l4/th-0002
printf '{"temperature": "hot"}\n{not json\n' | pub plant/p1/l4/th-0003

want=$((n * 6))
for _ in $(seq 200); do
  have=$("$bin/edge-agent" queue stats --json --config "$work/edge-agent.toml" | python3 -c 'import json,sys; print(json.load(sys.stdin)["readings"])')
  [ "$have" -ge "$want" ] && break
  sleep 0.1
done

log "edge-agent queue stats: what waits for the cloud"
"$bin/edge-agent" queue stats --config "$work/edge-agent.toml"
log "edge-agent queue dead-letters: what was refused, and why"
"$bin/edge-agent" queue dead-letters --config "$work/edge-agent.toml"
log "a few of the agent's metrics"
curl -s "http://127.0.0.1:$metrics/metrics" | grep -E '^plantlink_edge_(readings|dead|queue_readings|duplicates)' || true

rounds=3
[ "$ci" -eq 1 ] && rounds=1
log "the batch codec on the reference dataset"
"$bin/firmware-sim" bench-codec --rounds "$rounds"
log "demo finished"
