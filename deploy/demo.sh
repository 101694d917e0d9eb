#!/usr/bin/env bash
# The local demo of Plantlink. On a fresh Debian machine it installs what is missing,
# builds the programs, and shows what exists so far:
# - each program's --help;
# - the batch codec on the reference dataset (bytes per reading against zstd over JSON lines).
# The full pipeline (Mosquitto -> edge-agent -> QUIC -> cloud-ingest -> PostgreSQL/Kafka)
# joins the demo as those parts land; see the README's status table.
#
#   ./deploy/demo.sh          run the demo
#   ./deploy/demo.sh --ci     a shorter run for CI
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/lib/services.sh

ci=0
for a in "$@"; do
  case "$a" in
    --ci) ci=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "error: unknown option $a (try --help)" >&2; exit 2 ;;
  esac
done

ensure_toolchain
log "building the programs (release)"
cargo build --locked --release -p edge-agent -p cloud-ingest -p firmware-sim
bin="${CARGO_TARGET_DIR:-target}/release"

for p in edge-agent cloud-ingest firmware-sim; do
  log "$p --help"
  "$bin/$p" --help
  echo
done

rounds=3
[ "$ci" -eq 1 ] && rounds=1
log "the batch codec on the reference dataset"
"$bin/firmware-sim" bench-codec --rounds "$rounds"
