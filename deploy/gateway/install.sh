#!/usr/bin/env bash
# Installs the Plantlink edge agent on a gateway (run as root on the gateway):
#
#   sudo ./install.sh --binary edge-agent --config edge-agent.toml \
#        --ca ca.pem --cert gw-plant1-01.pem --key gw-plant1-01.key
#
# It puts the binary in /usr/local/bin, the config and certificates in /etc/plantlink (keys
# readable by the service only), checks the config, installs and starts the systemd unit.
# Running it again upgrades in place; the queue in /var/lib/plantlink is kept.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
binary=; config=; ca=; cert=; key=
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --ca) ca=$2; shift 2 ;;
    --cert) cert=$2; shift 2 ;;
    --key) key=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done
for v in binary config ca cert key; do
  if [ -z "${!v}" ] || [ ! -f "${!v}" ]; then
    echo "error: --$v FILE is required and must exist (got '${!v}')" >&2; exit 2
  fi
done
[ "$(id -u)" -eq 0 ] || { echo "error: run as root (sudo)" >&2; exit 1; }

install -d -m 0755 /etc/plantlink
install -m 0755 "$binary" /usr/local/bin/edge-agent.new
mv /usr/local/bin/edge-agent.new /usr/local/bin/edge-agent
install -m 0644 "$config" /etc/plantlink/edge-agent.toml
install -m 0644 "$ca" /etc/plantlink/ca.pem
install -m 0644 "$cert" /etc/plantlink/gateway.pem
install -m 0600 "$key" /etc/plantlink/gateway.key
for want in 'path = "/var/lib/plantlink/queue.db"' 'ca = "/etc/plantlink/ca.pem"' \
            'cert = "/etc/plantlink/gateway.pem"' 'key = "/run/credentials/plantlink-edge-agent.service/gateway.key"'; do
  grep -qF "$want" /etc/plantlink/edge-agent.toml \
    || echo "warning: /etc/plantlink/edge-agent.toml should say: $want (see FLASHING.md)" >&2
done
install -m 0644 "$here/plantlink-edge-agent.service" /etc/systemd/system/plantlink-edge-agent.service
systemctl daemon-reload
systemctl enable --now plantlink-edge-agent.service
systemctl restart plantlink-edge-agent.service
sleep 2
systemctl --no-pager status plantlink-edge-agent.service | head -n 5
echo "installed; check shipping with: edge-agent queue stats --config /etc/plantlink/edge-agent.toml"
