#!/usr/bin/env bash
# P9: one firmware-sim process drives DEVICES devices at RATE messages/s each (QoS 0) into a
# private Mosquitto, against `mosquitto_pub -l` fed the same number of messages of the same
# shape, alternating, ROUNDS rounds each. The broker's own $SYS counter says how many messages
# arrived, for both.
#
#   firmware-sim/bench/p9.sh [DEVICES] [RATE] [SECONDS] [ROUNDS]     (defaults 10000 10 10 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
devices=${1:-10000}; rate=${2:-10}; secs=${3:-10}; rounds=${4:-3}
cargo build --locked --release -q -p firmware-sim
bin="${CARGO_TARGET_DIR:-target}/release/firmware-sim"
work=$(mktemp -d /tmp/plantlink-p9.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\nsys_interval 1\nmax_queued_messages 1000000\n' "$port" > "$work/m.conf"
mosquitto -c "$work/m.conf" >/dev/null 2>&1 &
mpid=$!
trap 'kill $mpid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

received() { # the broker's count of PUBLISH messages received so far
  sleep 1.2
  mosquitto_sub -p "$port" -C 1 -t '$SYS/broker/publish/messages/received' 2>/dev/null || echo 0
}

n=$((devices * rate * secs))
python3 - "$n" > "$work/lines" <<'PY'
import json, sys
n = int(sys.argv[1])
for i in range(n):
    print(json.dumps({"ts": 1795000000000 + i, "seq": i, "temperature": 21.5 + i % 7, "humidity": 40.1,
                      "vibration": 0.3, "counter": i, "run_state": 1}))
PY

for r in $(seq "$rounds"); do
  before=$(received)
  t0=$(date +%s.%N)
  mosquitto_pub -p "$port" -q 0 -t p9/peer -l < "$work/lines"
  t1=$(date +%s.%N)
  after=$(received)
  peer=$(python3 -c "print(round(($after - $before) / ($t1 - $t0)))")

  before=$(received)
  out=$("$bin" run --mqtt "mqtt://127.0.0.1:$port" --qos 0 --devices "$devices" --rate "$rate" \
        --duration "$secs" --device-types multi-json --prefix p9 --json)
  after=$(received)
  elapsed=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["elapsed_s"])')
  ours=$(python3 -c "print(round(($after - $before) / $elapsed))")
  echo "round $r: mosquitto_pub -l $peer msg/s ($((after - before)) vs $n lines); firmware-sim $ours msg/s from $devices devices (ratio $(python3 -c "print(round($ours / $peer, 2))"))"
done
