#!/usr/bin/env bash
# Smoke test of a cross-built agent under qemu-user: the ARM edge-agent (from ./cross/build.sh)
# runs under qemu-<arch>-static against a private Mosquitto and an x86 cloud-ingest with a
# database of its own; 1,000 readings are published and must all reach PostgreSQL.
#
#   ./cross/smoke.sh aarch64
#   ./cross/smoke.sh armv7      (says so and exits 0 when armhf's standard library package
#                                of this compiler is not available from apt here)
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/lib/services.sh
arch=${1:-}
case "$arch" in
  aarch64) target=aarch64-unknown-linux-gnu; qemu=qemu-aarch64-static; gnu=aarch64-linux-gnu; loader=/lib/ld-linux-aarch64.so.1 ;;
  armv7) target=armv7-unknown-linux-gnueabihf; qemu=qemu-arm-static; gnu=arm-linux-gnueabihf; loader=/lib/ld-linux-armhf.so.3 ;;
  *) echo "usage: $0 aarch64|armv7" >&2; exit 2 ;;
esac
ensure_mosquitto
ensure_postgres
command -v "$qemu" >/dev/null || apt_install qemu-user-static
status=0
./cross/build.sh "$arch" || status=$?
if [ "$status" -eq 3 ]; then
  log "$arch: the standard library package for this compiler is not available here (see above); the $arch smoke test did not run"
  exit 0
fi
[ "$status" -eq 0 ] || exit "$status"
# The C library the agent runs on, under qemu: the target's multiarch libc6 (a dependency of the
# standard library package) when it is installed, else the cross toolchain's copy in /usr/<gnu>.
# Never the cross loader with the multiarch libc: `-L /usr/<gnu>` finds its loader there, which
# then loads /lib/<gnu>/libc.so.6 from the other build, and that pair spins forever in the
# first pthread_create.
qemu_args=()
[ -e "$loader" ] || qemu_args=(-L "/usr/$gnu")
agent="target/dist/$target/edge-agent"
cargo build --locked -q -p edge-agent -p cloud-ingest -p firmware-sim
bin="${CARGO_TARGET_DIR:-target}/debug"

scratch_workspace smoke

start_private_mosquitto "$work"
mport=$mqtt_port
make_demo_pki "$work" "$bin/cloud-ingest"
qport=$(free_port udp)
start_plain_cloud_ingest "$bin/cloud-ingest" "$work" "$qport" "$db"

ametrics=$(free_port)
sed -e "s#@DIR@#$work#g" -e "s#@MQTT_PORT@#$mport#g" -e "s#@CLOUD@#127.0.0.1:$qport#g" \
  deploy/demo/edge-agent.toml > "$work/edge-agent.toml"
printf '\n[metrics]\nbind = "127.0.0.1:%s"\n' "$ametrics" >> "$work/edge-agent.toml"
log "the $arch agent under $qemu: $(file -b "$agent" | cut -d, -f1-2)"
RUST_LOG=warn "$qemu" "${qemu_args[@]}" "$agent" run --config "$work/edge-agent.toml" 2>"$work/edge-agent.log" &
pids+=($!)
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$ametrics/metrics" 2>/dev/null | grep -q '^plantlink_edge_uplink_connected 1' && break
  sleep 0.1
done

log "publishing 500 messages of two readings each"
now=$(date +%s%3N)
seq 0 499 | awk -v now="$now" '{printf "{\"ts\": %d, \"seq\": %d, \"temperature\": %.2f, \"humidity\": %.1f}\n", now + $1 * 10, $1, 20 + ($1 % 13) / 10, 40 + ($1 % 7)}' \
  | "$bin/firmware-sim" publish --mqtt "mqtt://127.0.0.1:$mport" --topic plant/smoke-dev01 >/dev/null
n=0
for _ in $(seq 1200); do
  n=$(psql -h 127.0.0.1 -U postgres -d "$db" -tAc "SELECT count(*) FROM raw_metrics WHERE device_id = 'smoke-dev01'")
  [ "$n" -ge 1000 ] && break
  sleep 0.1
done
if [ "$n" -ne 1000 ]; then
  for f in "$work"/*.log; do echo "--- $f"; tail -n 20 "$f"; done
  echo "error: $n of 1000 readings reached PostgreSQL from the $arch agent" >&2
  exit 1
fi
log "smoke test passed: 1000 of 1000 readings from the $arch agent (under qemu) are in PostgreSQL"
