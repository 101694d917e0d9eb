#!/usr/bin/env bash
# Checks the deploy files as far as this machine allows (no Docker, no cluster): every YAML file
# parses; the compose file has its five services with images or builds; every Kubernetes
# document has apiVersion, kind and metadata.name, and the set of kinds the guide promises;
# the Grafana dashboard is JSON. (That the dashboard's metrics exist is a cargo test:
# cloud-ingest/tests/dashboard.rs.) Then the schema checks, with validators installed from the
# registries into ~/.cache/plantlink-tools when missing:
# - compose.yaml against the Compose Specification's JSON schema and the compose rules of
#   dclint (npm), minus its four style rules (key order, service order, quote style, and
#   "build and image together", which is how compose names the image it builds) and the rule
#   that every published port name an interface (the gateways' and the API's ports are meant
#   for every IPv4 and IPv6 interface; "0.0.0.0:" would drop IPv6), and the rule against two
#   services publishing one port (the `single` and `roles` profiles are alternatives: the
#   one-process cloud-ingest and the receiver publish the same ports; check.sh asserts that
#   they are in different profiles). Without Node.js >= 20.19
#   (Debian 12 has 18), the schema alone, taken from dclint's npm package, with jsonschema;
# - every Kubernetes manifest against the API schemas of Kubernetes 1.30 to 1.33 in strict
#   mode (no unknown fields), with kubernetes-validate (PyPI);
# - the gateway's systemd unit with `systemd-analyze verify` and `security` (exposure <= 2.0).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import yaml' 2>/dev/null || {
  . tests/lib/services.sh
  apt_install python3-yaml
}
python3 - <<'PY'
import glob, json, sys, yaml
files = sorted(glob.glob("deploy/**/*.yaml", recursive=True) + glob.glob("deploy/**/*.yml", recursive=True))
for f in files:
    list(yaml.safe_load_all(open(f)))
compose = yaml.safe_load(open("deploy/compose/compose.yaml"))
services = compose["services"]
for s in ["kafka", "timescaledb", "cloud-ingest", "receiver", "writer", "alerting", "prometheus", "grafana"]:
    assert s in services, f"compose.yaml: no service {s}"
    assert "image" in services[s] or "build" in services[s], f"compose.yaml: {s} has no image"
assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller", "Kafka must run in KRaft mode"
kinds = set()
for doc in yaml.safe_load_all(open("deploy/k8s/cloud-ingest.yaml")):
    for k in ["apiVersion", "kind", "metadata"]:
        assert k in doc, f"k8s document without {k}: {doc}"
    assert doc["metadata"].get("name"), f"k8s {doc['kind']} without a name"
    kinds.add(doc["kind"])
    if doc["kind"] == "Deployment":
        c = doc["spec"]["template"]["spec"]["containers"][0]
        assert "readinessProbe" in c and "livenessProbe" in c, "probes missing"
    if doc["kind"] == "Service" and any(p.get("protocol") == "UDP" for p in doc["spec"]["ports"]):
        kinds.add("UDP Service")
want = {"ConfigMap", "Secret", "Deployment", "UDP Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
assert want <= kinds, f"k8s: missing {want - kinds}"
# The scale-out mode: a Deployment per role from one image and ConfigMap, a PDB each, the UDP
# Service on the receivers, and KEDA objects that scale existing Deployments on their lag.
docs = list(yaml.safe_load_all(open("deploy/k8s/cloud-ingest-roles.yaml")))
deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
images = set()
for role in ["receiver", "writer", "alerting"]:
    d = deployments.get(f"cloud-ingest-{role}")
    assert d, f"cloud-ingest-roles.yaml: no Deployment for the {role} role"
    c = d["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:3] == ["run", "--role", role], f"{role}: args {c['args']}"
    assert "readinessProbe" in c and "livenessProbe" in c, f"{role}: probes missing"
    images.add(c["image"])
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert any(x["kind"] == "PodDisruptionBudget" and x["spec"]["selector"]["matchLabels"] == labels for x in docs), f"{role}: no PodDisruptionBudget"
assert len(images) == 1, f"the roles run different images: {images}"
udp = [x for x in docs if x["kind"] == "Service" and any(p.get("protocol") == "UDP" for p in x["spec"]["ports"])]
assert udp and all(x["spec"]["selector"].get("role") == "receiver" for x in udp), "the UDP Service must select the receivers"
cm = next(x for x in docs if x["kind"] == "ConfigMap")["data"]["cloud-ingest.toml"]
assert "backbone_partitions" in cm, "the roles' ConfigMap sets no backbone_partitions"
scaled = list(yaml.safe_load_all(open("deploy/k8s/keda/scaledobjects.yaml")))
for so in scaled:
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject", so
    target = so["spec"]["scaleTargetRef"]["name"]
    assert target in deployments, f"KEDA {so['metadata']['name']}: no Deployment {target}"
    role = target.removeprefix("cloud-ingest-")
    q = so["spec"]["triggers"][0]["metadata"]["query"]
    assert "plantlink_cloud_consumer_lag" in q and f'group="plantlink-{role}"' in q, f"KEDA {target}: query {q}"
    assert so["spec"]["maxReplicaCount"] <= int(cm.split("backbone_partitions = ")[1].split()[0]), f"KEDA {target}: more replicas than partitions"
assert {so["spec"]["scaleTargetRef"]["name"] for so in scaled} == {"cloud-ingest-writer", "cloud-ingest-alerting"}
assert services["cloud-ingest"]["profiles"] == ["single"] and services["receiver"]["profiles"] == ["roles"], "compose: the one process and the receiver publish the same ports; they must be in different profiles"
assert "roles" in services["receiver"]["profiles"] and "roles" in services["writer"]["profiles"] and "roles" in services["alerting"]["profiles"], "compose: no roles profile"
json.load(open("deploy/grafana/plantlink-pipeline.json"))
json.load(open("deploy/grafana/plantlink-plant-data.json"))
print(f"deploy files: {len(files)} YAML files parse; compose, Kubernetes and the dashboard are complete")
PY

tools="${PLANTLINK_TOOLS:-$HOME/.cache/plantlink-tools}"
mkdir -p "$tools"
if [ ! -x "$tools/venv/bin/kubernetes-validate" ]; then
  echo "==> installing kubernetes-validate 1.37.0 (and jsonschema) from PyPI into $tools/venv"
  python3 -m venv "$tools/venv" || { . tests/lib/services.sh; apt_install python3-venv; python3 -m venv "$tools/venv"; }
  "$tools/venv/bin/pip" install -q kubernetes-validate==1.37.0
fi

dclint_rules=(service-keys-order services-alphabetical-order require-quotes-in-ports no-build-and-image no-unbound-port-interfaces no-duplicate-exported-ports)
node_ok() { command -v node >/dev/null && node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)'; }
if node_ok; then
  if [ ! -x "$tools/node_modules/.bin/dclint" ]; then
    echo "==> installing dclint 3.1.0 from npm into $tools"
    npm install --prefix "$tools" --no-audit --no-fund --silent dclint@3.1.0 || {
      echo "error: npm could not install dclint 3.1.0 (above)" >&2
      exit 1
    }
  fi
  "$tools/node_modules/.bin/dclint" deploy/compose/compose.yaml --color=false --max-warnings 0 \
    --disable-rule "${dclint_rules[@]}"
  echo "compose.yaml: valid against the Compose Specification schema and dclint's rules (dclint $("$tools/node_modules/.bin/dclint" --version))"
else
  schema="$tools/compose.schema.json"
  if [ ! -s "$schema" ]; then
    echo "==> fetching the Compose Specification schema from dclint 3.1.0's npm package (no Node.js >= 20.19 here)"
    curl -fsSL https://registry.npmjs.org/dclint/-/dclint-3.1.0.tgz \
      | tar -xzO package/schemas/compose.schema.json > "$schema.part"
    mv "$schema.part" "$schema"
  fi
  "$tools/venv/bin/python" - "$schema" deploy/compose/compose.yaml <<'PY'
import json, sys, yaml
from jsonschema import Draft7Validator
errors = sorted(Draft7Validator(json.load(open(sys.argv[1]))).iter_errors(yaml.safe_load(open(sys.argv[2]))), key=str)
for e in errors:
    print(f"compose.yaml: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY
  echo "compose.yaml: valid against the Compose Specification schema (from dclint 3.1.0; jsonschema)"
fi

for v in 1.30.0 1.31.0 1.32.0 1.33.0; do
  "$tools/venv/bin/kubernetes-validate" --strict -k "$v" deploy/k8s/*.yaml >/dev/null || {
    "$tools/venv/bin/kubernetes-validate" --strict -k "$v" deploy/k8s/*.yaml
    echo "error: deploy/k8s does not validate against Kubernetes $v (above)" >&2
    exit 1
  }
done
echo "deploy/k8s: every manifest valid (strict) against Kubernetes 1.30-1.33"

# The gateway's systemd unit: systemd's own checks, with the binary path pointed at /bin/true
# (the agent is not installed here), and its hardening scored by systemd (0 = best, 10 = none).
if command -v systemd-analyze >/dev/null; then
  unitdir=$(mktemp -d)
  trap 'rm -rf "$unitdir"' EXIT
  sed 's#/usr/local/bin/edge-agent#/bin/true#g' deploy/gateway/plantlink-edge-agent.service \
    > "$unitdir/plantlink-edge-agent.service"
  # verify exits 0 on unknown keys (a typo'd hardening option is silently ignored): any
  # complaint fails the check.
  complaints=$(systemd-analyze verify "$unitdir/plantlink-edge-agent.service" 2>&1) || true
  if [ -n "$complaints" ]; then
    echo "$complaints" >&2
    echo "error: systemd-analyze verify complains about deploy/gateway/plantlink-edge-agent.service (above)" >&2
    exit 1
  fi
  exposure=$(systemd-analyze security --offline=yes "$unitdir/plantlink-edge-agent.service" \
    | awk '/Overall exposure level/ {print $(NF-2)}')
  awk -v e="$exposure" 'BEGIN { exit !(e != "" && e + 0 <= 2.0) }' || {
    echo "error: plantlink-edge-agent.service: systemd rates its exposure ${exposure:-(unknown)}, above 2.0; run systemd-analyze security --offline=yes on it" >&2
    exit 1
  }
  echo "plantlink-edge-agent.service: systemd-analyze verify passes; exposure $exposure (goal <= 2.0)"
else
  echo "warning: systemd-analyze is not installed: the gateway unit was not verified" >&2
fi
