#!/usr/bin/env bash
# P2: edge-agent MQTT ingest (QoS 1, durable commit) against a bare subscriber draining the
# same stream, in the same run, on a private Mosquitto.
#
# Method: for each consumer, N messages are queued at the broker for its persistent session
# while it is away; then it starts and the time to drain all N is measured. The agent is done
# when its queue (SQLite) holds every reading; mosquitto_sub when it has received N messages.
# Rounds alternate peer, agent FULL, agent NORMAL; the median of each is reported.
#
#   edge-agent/bench/ingest.sh [--messages N] [--metrics K] [--rounds R]
#     --metrics 1: bare-number messages (one reading each); K > 1: one JSON object with K metrics
set -euo pipefail
cd "$(dirname "$0")/../.."
N=100000; K=1; ROUNDS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --messages) N=$2; shift 2 ;;
    --metrics) K=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build -q --release -p edge-agent -p firmware-sim
AGENT="$CARGO_TARGET_DIR/release/edge-agent"
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/m.conf" <<EOC
listener $port 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 1000
max_queued_messages 10000000
EOC
mosquitto -c "$work/m.conf" >/dev/null 2>&1 &
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done

# The stream: N messages on 100 devices.
python3 - "$N" "$K" > "$work/lines" <<'EOP'
import sys
n, k = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    if k == 1:
        print(f"{i % 1000}.{i // 1000}")
    else:
        fields = ", ".join(f'"m{j}": {i % 997}.{j}' for j in range(k))
        print(f'{{"ts": {1767225600000 + i}, "seq": {i}, {fields}}}')
EOP
topic="bench/d1/m"; [ "$K" -gt 1 ] && topic="bench/d1"

queue_for() { # client id: create its session, then publish the stream into it
  mosquitto_sub -p "$port" -c -i "$1" -q 1 -t 'bench/#' -W 1 >/dev/null 2>&1 || true
  "$CARGO_TARGET_DIR/release/firmware-sim" publish --mqtt "mqtt://127.0.0.1:$port" --topic "$topic" < "$work/lines" 2>/dev/null
}

now() { date +%s.%N; }
results=()
run_peer() {
  queue_for "peer$1"
  local t0; t0=$(now)
  mosquitto_sub -p "$port" -c -i "peer$1" -q 1 -t 'bench/#' -C "$N" >/dev/null
  python3 -c "print($N/($(now)-$t0))"
}
run_agent() { # round, synchronous
  local db="$work/q$1$2.db"
  cat > "$work/a.toml" <<EOA
[gateway]
id = "bench"
[store]
path = "$db"
synchronous = "$2"
[mqtt]
url = "mqtt://127.0.0.1:$port"
client_id = "agent$1$2"
subscriptions = ["bench/#"]
[[mqtt.topics]]
template = "bench/{device}/{metric}"
[[mqtt.topics]]
template = "bench/{device}"
[limits]
per_device_per_sec = 1e9
burst = 1e9
EOA
  queue_for "agent$1$2"
  local want=$((N * K)) t0; t0=$(now)
  /usr/bin/time -f "%M" -o "$work/rss" "$AGENT" run --config "$work/a.toml" 2>/dev/null &
  local pid=$!
  # One poller process (spawning one per check would load the CPU being measured); it
  # prints the time at which the queue first held every reading. Nothing is shipped here
  # (no cloud), so ids run 1..N*K and the highest id stored tells: an index lookup, the same
  # for the queue layout before schema 3 (`readings`) and since (`chunks`).
  local t1; t1=$(python3 - "$db" "$want" <<'EOW'
import sqlite3, sys, time
db, want = sys.argv[1], int(sys.argv[2])
conn = None
while True:
    try:
        conn = conn or sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            top = conn.execute("select coalesce(max(last), 0) from chunks").fetchone()[0]
        except sqlite3.OperationalError:
            top = conn.execute("select coalesce(max(id), 0) from readings").fetchone()[0]
        if top >= want:
            break
    except sqlite3.Error:
        conn = None
    time.sleep(0.01)
print(time.time())
EOW
)
  kill -TERM "$(pgrep -P $pid)" 2>/dev/null || true; wait $pid 2>/dev/null || true
  # The agent checkpoints on exit: the file then holds the whole queue.
  local bytes=$(( $(stat -c %s "$db") + $(stat -c %s "$db-wal" 2>/dev/null || echo 0) ))
  echo "$(python3 -c "print($N/($t1-$t0))") $(cat "$work/rss") $bytes"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
peer=(); full=(); normal=(); rss=(); qbytes=()
for r in $(seq "$ROUNDS"); do
  peer+=("$(run_peer "$r")")
  read -r rate kb b < <(run_agent "$r" full); full+=("$rate"); rss+=("$kb"); qbytes+=("$b")
  read -r rate kb b < <(run_agent "$r" normal); normal+=("$rate"); rss+=("$kb"); qbytes+=("$b")
  echo "round $r: peer ${peer[-1]} msg/s, agent full ${full[-1]}, normal ${normal[-1]}" >&2
done
p=$(median "${peer[@]}"); f=$(median "${full[@]}"); n=$(median "${normal[@]}")
maxrss=$(printf '%s\n' "${rss[@]}" | sort -n | tail -1)
qb=$(median "${qbytes[@]}")
python3 - <<EOP
p, f, n, k, rss, qb = $p, $f, $n, $K, $maxrss, $qb
print(f"messages {$N} x {k} reading(s); medians of $ROUNDS rounds")
print(f"peer mosquitto_sub   {p:>10.0f} msg/s")
print(f"agent synchronous=full   {f:>10.0f} msg/s = {f*k:>10.0f} readings/s  ratio {f/p:.2f}")
print(f"agent synchronous=normal {n:>10.0f} msg/s = {n*k:>10.0f} readings/s  ratio {n/p:.2f}")
print(f"agent peak RSS {rss/1024:.1f} MiB")
print(f"queue file {qb/1e6:.1f} MB = {qb/($N*k):.1f} bytes a reading (median)")
EOP
