#!/usr/bin/env python3
"""Checks Conveyor's deployment configuration on a machine with no container engine and no
cluster. Run by scripts/test after the release build:

    python3 infra/tests/check_deploy.py target/release/conveyor

- Kubernetes: the base and every overlay are rendered (with `kubectl kustomize` when it is
  installed, and always with the small renderer below for the kustomize features these
  overlays use; the two must agree), and every object validates, strictly, against the
  Kubernetes schemas (kubernetes-validate, offline). KEDA ScaledObjects are not in those
  schemas; their required fields are checked here.
- docker-compose.yml parses; every Conveyor service's command is a real subcommand of the
  binary, and its environment passes the binary's own config parsing (unknown keys fail it).
- The ConfigMap's and Secret's CONVEYOR__ keys pass the same parsing.
- The nginx configs (CDN stand-in, load balancer) pass `nginx -t` with their upstream host
  names pointed at loopback.
- Monitoring (Debian's `promtool`): the Prometheus config and the alert rules pass
  `promtool check`, the rules pass their unit tests (`promtool test rules`), every query of
  the Grafana dashboard parses (`promtool check rules` on them as recording rules), and the
  PodMonitor has the fields the Prometheus Operator needs.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import json

import jsonpatch
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
KUBERNETES_VERSION = "1.31"
failures = []


def fail(message):
    failures.append(message)
    print(f"FAIL {message}", file=sys.stderr)


def load_all(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --- A renderer for the kustomize features used here ------------------------------------------

def render(directory):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs += render(path) if path.is_dir() else load_all(path)
    for label in kustomization.get("labels", []):
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for doc in docs:
            for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                name = c["image"].rsplit(":", 1)[0]
                if name == image["name"]:
                    c["image"] = f"{name}:{image['newTag']}"
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        target = patch["target"]
        matched = [d for d in docs if d["kind"] == target["kind"] and target.get("name", d["metadata"]["name"]) == d["metadata"]["name"]]
        if not matched:
            fail(f"{directory}: patch {patch['path']} matches nothing")
        for i, doc in enumerate(docs):
            if doc in matched:
                docs[i] = jsonpatch.apply_patch(doc, ops)
    if "namespace" in kustomization:
        for doc in docs:
            doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def key(doc):
    return (doc["kind"], doc["metadata"]["name"])


def check_kubernetes():
    targets = [K8S / "base", *sorted((K8S / "overlays").iterdir())]
    kubectl = shutil.which("kubectl")
    if not kubectl:
        print("kubectl not installed: rendering with the built-in renderer only", file=sys.stderr)
    for target in targets:
        docs = render(target)
        if kubectl:
            out = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True)
            if out.returncode != 0:
                fail(f"kubectl kustomize {target}: {out.stderr.strip()}")
            else:
                theirs = {key(d): d for d in yaml.safe_load_all(out.stdout) if d}
                ours = {key(d): d for d in docs}
                if theirs != ours:
                    fail(f"{target}: kubectl kustomize and the built-in renderer disagree")
        kinds = {}
        for doc in docs:
            kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
            if doc["kind"] == "ScaledObject":
                check_scaled_object(target, doc, docs)
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{target}: {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
        check_roles(target, docs)
        print(f"ok {target.relative_to(ROOT)}: " + ", ".join(f"{len(v)} {k}" for k, v in sorted(kinds.items())))


def check_scaled_object(target, doc, docs):
    where = f"{target}: ScaledObject/{doc['metadata'].get('name')}"
    if doc.get("apiVersion") != "keda.sh/v1alpha1":
        fail(f"{where}: apiVersion must be keda.sh/v1alpha1")
    spec = doc.get("spec", {})
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    if spec.get("scaleTargetRef", {}).get("name") not in deployments:
        fail(f"{where}: scaleTargetRef.name must name a Deployment")
    if spec.get("minReplicaCount") != 1:
        fail(f"{where}: minReplicaCount must be 1")
    partitions = int(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["CONVEYOR__LOG__PARTITIONS"])
    if not isinstance(spec.get("maxReplicaCount"), int) or not 1 <= spec["maxReplicaCount"] <= 32:
        fail(f"{where}: maxReplicaCount must be at most the partition count")
    if target.name == "base" and spec.get("maxReplicaCount") != partitions:
        fail(f"{where}: maxReplicaCount must equal the partition count ({partitions})")
    triggers = spec.get("triggers") or []
    if not triggers:
        fail(f"{where}: needs a trigger")
    for t in triggers:
        meta = t.get("metadata", {})
        if t.get("type") != "kafka":
            fail(f"{where}: trigger type must be kafka")
        for field in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold"):
            if not meta.get(field):
                fail(f"{where}: kafka trigger needs metadata.{field}")
        if meta.get("consumerGroup") != spec.get("scaleTargetRef", {}).get("name"):
            fail(f"{where}: consumerGroup must be the group the target joins")
        if not str(meta.get("lagThreshold", "")).isdigit():
            fail(f"{where}: lagThreshold must be a whole number, as a string")


def check_roles(target, docs):
    """Each Deployment runs a real role, and every CONVEYOR__ key it gets parses."""
    env = {}
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            env.update(doc.get("data", {}))
        if doc["kind"] == "Secret":
            env.update(doc.get("stringData", {}))
    for doc in docs:
        if doc["kind"] == "Job":
            pod = doc["spec"]["template"]["spec"]
            for container in pod.get("initContainers", []) + pod["containers"]:
                check_command(f"{target}: Job/{doc['metadata']['name']}/{container['name']}", container["args"], env)
        if doc["kind"] != "Deployment":
            continue
        container = doc["spec"]["template"]["spec"]["containers"][0]
        check_command(f"{target}: Deployment/{doc['metadata']['name']}", container["args"], env)
        probes = (container.get("readinessProbe", {}).get("httpGet", {}).get("path"), container.get("livenessProbe", {}).get("httpGet", {}).get("path"))
        if probes != ("/readyz", "/healthz"):
            fail(f"{target}: Deployment/{doc['metadata']['name']}: probes must be /readyz and /healthz")


# --- The binary's own parsing ------------------------------------------------------------------

def check_command(where, args, env):
    run = subprocess.run([BINARY, *args, "--help"], capture_output=True, text=True)
    if run.returncode != 0:
        fail(f"{where}: `conveyor {' '.join(args)}` is not a conveyor command: {run.stderr.strip()}")
    # Compose interpolates `${VAR:-default}`; check the defaults.
    settings_env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items() if k.startswith("CONVEYOR__")}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR")}
    run = subprocess.run([BINARY, "ops", "config"], capture_output=True, text=True, env={**clean, **settings_env})
    if run.returncode != 0:
        fail(f"{where}: its CONVEYOR__ settings do not parse: {run.stderr.strip()}")


def check_compose():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    conveyor_services = 0
    for name, service in services.items():
        if service.get("image") != "conveyor:latest":
            continue
        conveyor_services += 1
        check_command(f"docker-compose.yml: {name}", service["command"], service.get("environment", {}))
        for dependency, condition in service.get("depends_on", {}).items():
            if dependency not in services:
                fail(f"docker-compose.yml: {name} depends on unknown service {dependency}")
            if condition.get("condition") == "service_healthy" and "healthcheck" not in services[dependency] and services[dependency].get("image") != "conveyor:latest":
                fail(f"docker-compose.yml: {name} waits for {dependency} to be healthy, which has no healthcheck")
    for role in ("ingest", "processor", "transcoder", "projector", "query", "kafka", "scylla", "minio", "cdn", "lb"):
        if role not in services:
            fail(f"docker-compose.yml: missing service {role}")
    for scaled in ("processor", "projector", "query"):
        if services.get(scaled, {}).get("deploy", {}).get("replicas") != 2:
            fail(f"docker-compose.yml: {scaled} should run 2 replicas")
    print(f"ok docker-compose.yml: {len(services)} services, {conveyor_services} run conveyor")


def check_dockerfile():
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    if "runtime" not in stages or len(stages) < 3:
        fail("Dockerfile: expected a multi-stage build ending in a `runtime` stage")
    runtime = text.split("AS runtime", 1)[-1]
    if not re.search(r"^USER 10001", runtime, re.M):
        fail("Dockerfile: the runtime stage must run as the non-root uid 10001")
    health = re.search(r'HEALTHCHECK .*?CMD \[(.*?)\]', runtime, re.S)
    if not health:
        fail("Dockerfile: no HEALTHCHECK")
    else:
        args = [a.strip().strip('"') for a in health.group(1).split(",")]
        if args[0] != "conveyor":
            fail("Dockerfile: the HEALTHCHECK must run conveyor")
        else:
            check_command("Dockerfile HEALTHCHECK", args[1:2], {})
    builder = text.split("AS runtime", 1)[0]
    if not re.search(r"apt-get install[^\n]*libvips-dev", builder):
        fail("Dockerfile: the build stages must install libvips-dev (the image engine)")
    if not re.search(r"apt-get install[^\n]*libvips42", runtime):
        fail("Dockerfile: the runtime stage must install libvips42 (the image engine)")
    if not re.search(r"apt-get install[^\n]*\bffmpeg\b", runtime):
        fail("Dockerfile: the runtime stage must install ffmpeg (the transcoder runs ffmpeg and ffprobe)")
    if 'ENTRYPOINT ["conveyor"]' not in runtime:
        fail("Dockerfile: the entrypoint must be conveyor")
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in ("target/", ".git/", "data/"):
        if path not in ignored:
            fail(f".dockerignore must exclude {path}")
    print(f"ok infra/docker/Dockerfile: stages {', '.join(stages)}")


def check_nginx():
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not nginx:
        fail("nginx is not installed; scripts/test installs nginx-light")
        return
    for conf in ("infra/cdn/nginx.conf", "infra/lb/nginx.conf"):
        text = (ROOT / conf).read_text()
        for host in ("query:8080", "ingest:8080", "cdn:8080"):
            text = text.replace(host, "127.0.0.1:8080")
        with tempfile.TemporaryDirectory() as tmp:
            text = text.replace("/var/cache/nginx/media", f"{tmp}/cache")
            (Path(tmp) / "nginx.conf").write_text(text.replace("events {", f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nevents {{", 1))
            run = subprocess.run([nginx, "-t", "-q", "-p", tmp, "-c", f"{tmp}/nginx.conf"], capture_output=True, text=True)
            if run.returncode != 0:
                fail(f"{conf}: nginx -t: {run.stderr.strip()}")
            else:
                print(f"ok {conf}: nginx -t")


def dashboard_queries(path):
    """Every query of a Grafana dashboard, with Grafana's own variables given the values a
    Prometheus query needs ($__rate_interval: 1m)."""
    dashboard = json.loads(path.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        if not panel.get("targets"):
            fail(f"{path.name}: panel {panel['title']!r} has no query")
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"].replace("$__rate_interval", "1m")


def check_monitoring():
    promtool = shutil.which("promtool")
    if not promtool:
        fail("promtool is not installed; scripts/deps --test installs Debian's prometheus")
        return
    prometheus = ROOT / "infra" / "prometheus"
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        run = subprocess.run([promtool, *args], cwd=prometheus, capture_output=True, text=True)
        if run.returncode != 0:
            fail(f"promtool {' '.join(args)}: {run.stdout.strip()} {run.stderr.strip()}")
        else:
            print(f"ok infra/prometheus: promtool {' '.join(args)}")
    dashboard = ROOT / "infra" / "grafana" / "conveyor.json"
    queries = list(dashboard_queries(dashboard))
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]}]}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dashboard.yml").write_text(yaml.safe_dump(rules))
        run = subprocess.run([promtool, "check", "rules", "dashboard.yml"], cwd=tmp, capture_output=True, text=True)
        if run.returncode != 0:
            fail(f"infra/grafana/conveyor.json: a query does not parse: {run.stdout.strip()} {run.stderr.strip()}")
        else:
            print(f"ok infra/grafana/conveyor.json: {len(queries)} queries parse")
    monitor = load_all(K8S / "monitoring" / "podmonitor.yaml")[0]
    if (monitor.get("apiVersion"), monitor.get("kind")) != ("monitoring.coreos.com/v1", "PodMonitor"):
        fail("infra/k8s/monitoring/podmonitor.yaml: not a monitoring.coreos.com/v1 PodMonitor")
    endpoints = monitor.get("spec", {}).get("podMetricsEndpoints", [])
    if not monitor.get("spec", {}).get("selector") or [e.get("port") for e in endpoints] != ["http"]:
        fail("infra/k8s/monitoring/podmonitor.yaml: needs a selector and one endpoint on port http")
    for role in ("ingest", "processor", "projector", "query"):
        ports = [p["name"] for d in load_all(K8S / "base" / f"{role}.yaml") if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
        if "http" not in ports:
            fail(f"infra/k8s/base/{role}.yaml: the PodMonitor scrapes a port named http, which it lacks")
    print("ok infra/k8s/monitoring/podmonitor.yaml")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: check_deploy.py PATH/TO/conveyor")
    BINARY = sys.argv[1]
    check_kubernetes()
    check_compose()
    check_dockerfile()
    check_nginx()
    check_monitoring()
    if failures:
        sys.exit(f"{len(failures)} deployment check(s) failed")
    print("deployment checks passed")
