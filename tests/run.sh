#!/usr/bin/env bash
# Runs every Plantlink test. On a fresh Debian machine it first installs and starts what the
# tests need (build tools, Mosquitto, PostgreSQL, the Tansu Kafka-API broker, and the
# TimescaleDB extension files for the storage tests' private TimescaleDB cluster).
#
#   ./tests/run.sh               all tests, the deploy checks, the demo in its short mode
#                                (./deploy/demo.sh --ci) and the ARM smoke tests (./cross/smoke.sh)
#   ./tests/run.sh -- FILTER     pass arguments on to `cargo test` (and skip the demo)
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/lib/services.sh

ensure_all_services
ensure_timescaledb_files
log "Mosquitto on 127.0.0.1:1883, PostgreSQL on 127.0.0.1:5432, Tansu at $PLANTLINK_TANSU"

filtered=0
[ "${1:-}" = "--" ] && { shift; filtered=1; }
log "cargo test"
cargo test --locked "$@"

if [ "$filtered" -eq 0 ]; then
  log "the deploy files"
  ./deploy/check.sh
  log "the demo, short mode (fails unless firmware-sim verify passes and the alert fires)"
  ./deploy/demo.sh --ci
  log "the ARM agents under qemu-user (cross-built with Debian's rustc-web; armv7 says so and skips when its standard library is not available)"
  ./cross/smoke.sh aarch64
  ./cross/smoke.sh armv7
fi

log "building the fuzz targets (run them with: cargo fuzz run decode_batch, in shared/)"
cargo build --locked -p plantlink-fuzz --bins
