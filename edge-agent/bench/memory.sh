#!/usr/bin/env bash
# P3 (memory): the edge agent's resident memory, idle and at its peak with a 1,000,000-reading
# backlog while live traffic goes on at full rate. Release builds of the real programs, each
# with its own Mosquitto, database and ports:
#   1. idle: the agent connected to its Mosquitto, nothing arriving: VmRSS after 5 s;
#   2. backlog: the cloud is down while firmware-sim publishes (QoS 1, 2,000 devices, as fast
#      as the agent takes them) until the agent's queue holds 1,000,000 readings;
#   3. drain: cloud-ingest comes up, the agent drains its backlog while the publishing goes on,
#      for up to 120 s from its connection or until the queue is back under 50,000 readings.
# The peak is the agent's VmHWM (the kernel's high-water mark of its resident memory).
#
#   ./edge-agent/bench/memory.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/lib/services.sh
ensure_mosquitto
ensure_postgres
log "building (release)"
cargo build --locked --release -q -p edge-agent -p cloud-ingest -p firmware-sim
bin="${CARGO_TARGET_DIR:-target}/release"

scratch_workspace memory

start_private_mosquitto "$work"
make_demo_pki "$work" "$bin/cloud-ingest"
qport=$(free_port udp)
ametrics=$(free_port)
sed -e "s#@DIR@#$work#g" -e "s#@MQTT_PORT@#$mqtt_port#g" -e "s#@CLOUD@#127.0.0.1:$qport#g" \
  deploy/demo/edge-agent.toml > "$work/edge-agent.toml"
printf '\n[metrics]\nbind = "127.0.0.1:%s"\n' "$ametrics" >> "$work/edge-agent.toml"
RUST_LOG=warn "$bin/edge-agent" run --config "$work/edge-agent.toml" 2>"$work/edge-agent.log" &
agent=$!
pids+=("$agent")

metric() { curl -sf "http://127.0.0.1:$ametrics/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
kib() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$agent/status"; }
for _ in $(seq 300); do [ "$(metric plantlink_edge_mqtt_connected 2>/dev/null)" = 1 ] && break; sleep 0.1; done
[ "$(metric plantlink_edge_mqtt_connected)" = 1 ] || { tail "$work/edge-agent.log"; echo "error: the agent did not connect to Mosquitto" >&2; exit 1; }
sleep 5 # the idle window itself
idle=$(kib VmRSS)
log "idle: VmRSS $((idle / 1024)) MiB ($idle KiB)"

"$bin/firmware-sim" run --mqtt "mqtt://127.0.0.1:$mqtt_port" --devices 2000 --rate 50 --duration 900 \
  --qos 1 >"$work/sim.log" 2>&1 &
pids+=($!)
start=$(date +%s)
while :; do
  q=$(metric plantlink_edge_queue_readings)
  [ "${q%.*}" -ge 1000000 ] && break
  [ $(( $(date +%s) - start )) -lt 600 ] || { echo "error: only $q readings queued after 600 s" >&2; exit 1; }
  printf '\r==> backlog: %s readings queued, VmRSS %s KiB ' "$q" "$(kib VmRSS)" >&2
  sleep 1
done
echo >&2
backlog_s=$(( $(date +%s) - start ))
hwm_backlog=$(kib VmHWM)
log "backlog of $q readings in ${backlog_s} s (cloud down, $(( ${q%.*} / (backlog_s > 0 ? backlog_s : 1) )) readings/s in): VmHWM $((hwm_backlog / 1024)) MiB"

start_plain_cloud_ingest "$bin/cloud-ingest" "$work" "$qport" "$db"
# The agent retries with a growing back-off (up to 30 s) while the cloud is down.
for _ in $(seq 600); do [ "$(metric plantlink_edge_uplink_connected)" = 1 ] && break; sleep 0.1; done
[ "$(metric plantlink_edge_uplink_connected)" = 1 ] || { echo "error: the agent did not reach cloud-ingest" >&2; exit 1; }
# CPU seconds (user + system) each program has used so far: agent, cloud, Mosquitto,
# firmware-sim, and all of PostgreSQL.
cpu_of() { awk '{s += $14 + $15} END {printf "%.1f", s / 100}' $(for p in "$@"; do echo "/proc/$p/stat"; done) 2>/dev/null; }
cpu_all() {
  local sim cloud
  cloud=$(pgrep -f "cloud-ingest run --config $work/" | head -1)
  sim=$(pgrep -f "firmware-sim run --mqtt mqtt://127.0.0.1:$mqtt_port" | head -1)
  echo "agent $(cpu_of "$agent") cloud-ingest $(cpu_of "$cloud") mosquitto $(cpu_of "$(pgrep -f "mosquitto -c $work/" | head -1)") firmware-sim $(cpu_of "$sim") postgres $(cpu_of $(pgrep -x postgres))"
}
cpu0=$(cpu_all)
start=$(date +%s)
acked0=$(metric plantlink_edge_readings_acked_total)
stored0=$(metric plantlink_edge_readings_stored_total)
while :; do
  q=$(metric plantlink_edge_queue_readings)
  [ "${q%.*}" -lt 50000 ] && break
  [ $(( $(date +%s) - start )) -lt 120 ] || break
  printf '\r==> drain: %s readings queued, VmRSS %s KiB ' "$q" "$(kib VmRSS)" >&2
  sleep 1
done
echo >&2
drain_s=$(( $(date +%s) - start ))
[ "$drain_s" -gt 0 ] || drain_s=1
acked=$(( $(metric plantlink_edge_readings_acked_total | cut -d. -f1) - ${acked0%.*} ))
stored=$(( $(metric plantlink_edge_readings_stored_total | cut -d. -f1) - ${stored0%.*} ))
hwm=$(kib VmHWM)
cpu1=$(cpu_all)
log "CPU seconds used during the drain: $(paste -d' ' <(echo "$cpu0" | tr ' ' '\n') <(echo "$cpu1" | tr ' ' '\n') | awk 'NR % 2 == 1 {name = $1; next} {printf "%s %.1f  ", name, $2 - $1}')(of $((2 * drain_s)) on 2 cores)"
log "drain with live traffic, from the uplink's connection: ${drain_s} s, $((acked / drain_s)) readings/s acknowledged while $((stored / drain_s)) readings/s came in; $q still queued"
log "peak: VmHWM $((hwm / 1024)) MiB ($hwm KiB); idle VmRSS $((idle / 1024)) MiB ($idle KiB)"
log "goals: idle <= 16 MiB: $([ "$idle" -le 16384 ] && echo met || echo NOT met); peak <= 64 MiB: $([ "$hwm" -le 65536 ] && echo met || echo NOT met)"
