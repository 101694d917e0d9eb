#!/usr/bin/env bash
# P4's peer: how long a persistent Mosquitto bridge takes to forward a 1,000,000-message backlog
# once its link comes back, the way plants ship today. Compare with the agent's backlog drain
# into PostgreSQL (cargo test --release -p cloud-ingest --test bench_uplink -- --ignored
# --nocapture backlog_drain).
#
# A "plant" Mosquitto bridges plant/# at QoS 1 (persistent session) to a "cloud" Mosquitto
# through a TCP relay that is down while N readings (one JSON reading per message, as bridge
# scripts send them) are published to the plant broker at QoS 1; then the relay comes up and
# the clock runs until a subscriber on the cloud broker has received all N.
#
#   ./edge-agent/bench/bridge_peer.sh [N]       (default 1000000)
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/lib/services.sh
ensure_mosquitto
command -v socat >/dev/null || apt_install socat
n=${1:-1000000}
# firmware-sim publish waits for every PUBACK (mosquitto_pub -l can exit with messages unsent).
cargo build --locked --release -q -p firmware-sim
bin="${CARGO_TARGET_DIR:-target}/release"
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

work=$(mktemp -d /tmp/plantlink-bridge.XXXXXX)
pids=()
cleanup() { stop_all "${pids[@]}"; [ -n "${PLANTLINK_KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

cloud_port=$(free_port)
relay_port=$(free_port)
plant_port=$(free_port)
mkdir -p "$work/cloud" "$work/plant"
cat > "$work/cloud/mosquitto.conf" <<EOC
listener $cloud_port 127.0.0.1
allow_anonymous true
max_queued_messages 0
max_inflight_messages 1000
EOC
cat > "$work/plant/mosquitto.conf" <<EOC
listener $plant_port 127.0.0.1
allow_anonymous true
persistence true
persistence_location $work/plant/
max_queued_messages 0
max_inflight_messages 1000
connection cloud
address 127.0.0.1:$relay_port
topic plant/# out 1
cleansession false
restart_timeout 1 1
bridge_protocol_version mqttv311
EOC
mosquitto -c "$work/cloud/mosquitto.conf" >"$work/cloud.log" 2>&1 &
pids+=($!)
mosquitto -c "$work/plant/mosquitto.conf" >"$work/plant.log" 2>&1 &
pids+=($!)
for p in "$cloud_port" "$plant_port"; do
  for _ in $(seq 100); do port_open 127.0.0.1 "$p" && break; sleep 0.1; done
done

# The cloud side's consumer, subscribed before anything is forwarded.
mosquitto_sub -p "$cloud_port" -q 1 -t "plant/#" -C "$n" -i bench-sink >/dev/null &
sink=$!
pids+=("$sink")

log "publishing $n readings to the plant broker (QoS 1) while its bridge is cut off"
start=$(date +%s.%N)
awk -v n="$n" 'BEGIN { srand(1); for (i = 0; i < n; i++) printf "{\"device\":\"dev%04d\",\"metric\":\"temperature\",\"ts\":%d,\"value\":%.2f}\n", i % 1000, 1795000000000 + i * 10, 20 + rand() * 10 }' \
  | "$bin/firmware-sim" publish --mqtt "mqtt://127.0.0.1:$plant_port" --qos 1 --topic plant/bench >/dev/null
log "queued in $(elapsed "$start") s; the link comes back"

start=$(date +%s.%N)
socat "TCP-LISTEN:$relay_port,bind=127.0.0.1,reuseaddr,fork" "TCP:127.0.0.1:$cloud_port" &
pids+=($!)
deadline=$((SECONDS + 600))
while kill -0 "$sink" 2>/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || { echo "error: not all $n messages arrived in 600 s" >&2; exit 1; }
  sleep 0.5
done
wait "$sink"
secs=$(elapsed "$start")
log "bridge drain: $n messages (one reading each) in $secs s = $(awk -v n="$n" -v s="$secs" 'BEGIN { printf "%.0f", n / s }') readings/s (includes up to 1 s of the bridge's reconnect wait)"
