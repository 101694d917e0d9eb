#!/usr/bin/env bash
# Checks the deploy files as far as this machine allows (no Docker, no cluster): every YAML file
# parses; the compose file has its five services with images or builds; every Kubernetes
# document has apiVersion, kind and metadata.name, and the set of kinds the guide promises;
# the Grafana dashboard is JSON. (That the dashboard's metrics exist is a cargo test:
# cloud-ingest/tests/dashboard.rs.)
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
for s in ["kafka", "timescaledb", "cloud-ingest", "prometheus", "grafana"]:
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
json.load(open("deploy/grafana/plantlink-pipeline.json"))
print(f"deploy files: {len(files)} YAML files parse; compose, Kubernetes and the dashboard are complete")
PY
