#!/usr/bin/env bash
# Starts a throwaway PostgreSQL 15 cluster with the settings deploy/SCALING.md recommends
# for sustained ingest, for the benchmarks to run against instead of the machine's default
# cluster:
#
#   eval "$(cloud-ingest/bench/tuned-pg.sh start)"   # prints: export PLANTLINK_PG=...
#   ... run a benchmark ...
#   cloud-ingest/bench/tuned-pg.sh stop
#
# Options (environment): TUNED_PG_DIR (default /tmp/plantlink-tuned-pg), TUNED_PG_PORT
# (default 55432), TUNED_PG_SHARED_BUFFERS (default 2GB).
set -euo pipefail

dir=${TUNED_PG_DIR:-/tmp/plantlink-tuned-pg}
port=${TUNED_PG_PORT:-55432}
buffers=${TUNED_PG_SHARED_BUFFERS:-2GB}
bin=$(ls -d /usr/lib/postgresql/15/bin 2>/dev/null || dirname "$(command -v initdb)")

# PostgreSQL refuses to run as root: run its commands as the postgres user then.
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
start)
    if [ ! -f "$dir/PG_VERSION" ]; then
        mkdir -p "$dir"
        [ "$(id -u)" = 0 ] && chown postgres "$dir"
        as_pg "$bin/initdb" -D "$dir" -U postgres --auth=trust >/dev/null
        cat >>"$dir/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
shared_buffers = $buffers
max_wal_size = 8GB
checkpoint_timeout = 15min
wal_compression = on
wal_buffers = 64MB
max_connections = 200
EOF
    fi
    as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/log" -w start >/dev/null
    echo "export PLANTLINK_PG='host=127.0.0.1 port=$port user=postgres dbname=postgres'"
    ;;
stop)
    as_pg "$bin/pg_ctl" -D "$dir" -m fast -w stop >/dev/null || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start|stop   (starts or removes a tuned PostgreSQL for the benchmarks)" >&2
    exit 2
    ;;
esac
