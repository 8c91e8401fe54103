"""deploy/k8s: every manifest validates offline against the Kubernetes JSON schemas
(kubernetes-validate ships them) and says what the issue asks; the KEDA ScaledObject, a
CRD outside those schemas, is checked field by field."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from shared.settings import Settings, parse_api_key

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
NAMESPACE = "attnonly"
# Core kinds must validate against this Kubernetes release (strict: unknown fields fail too).
K8S_VERSION = "1.30.0"
# Kinds that are not in the Kubernetes schemas, each checked by its own test below.
CRDS = {("keda.sh/v1alpha1", "ScaledObject")}
PRIVATE_RANGES = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"}
SETTINGS_ENV = {f"ATTNONLY_{name.upper()}" for name in Settings.model_fields}
# Environment variables of the attnonly containers that are not settings, and why.
NOT_SETTINGS = {"REMAP_SIGTERM": "billiard: SIGTERM starts Celery's cold shutdown (the job is handed back)"}
# Containers that have no probes, and why (see the comments in worker.yaml and minio.yaml).
NO_PROBES = {("Deployment", "worker"): "a Celery worker has no cheap health check that survives a Redis outage",
             ("Job", "minio-bucket"): "a one-shot Job"}
WORKLOADS = ("Deployment", "StatefulSet", "Job")


def _load() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


DOCS = _load()


def objects(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == kind}


def one(kind: str, name: str) -> dict:
    found = objects(kind)
    assert name in found, f"no {kind} {name!r} in deploy/k8s"
    return found[name]


def pod_specs():
    """(kind, name, pod spec, pod labels) of every workload."""
    for kind in WORKLOADS:
        for name, obj in objects(kind).items():
            template = obj["spec"]["template"]
            yield kind, name, template["spec"], template["metadata"].get("labels", {})


def containers():
    for kind, name, spec, _ in pod_specs():
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield kind, name, spec, c


def container(kind: str, name: str) -> dict:
    spec = one(kind, name)["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1
    return spec["containers"][0]


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity(value) -> float:
    """A Kubernetes quantity (64Gi, 500m, 2) as a number of bytes / cores."""
    text = str(value)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?", text)
    assert m, f"unreadable quantity {value!r}"
    number, unit = float(m.group(1)), m.group(2)
    if unit == "m":
        return number / 1000
    return number * _UNITS.get(unit, 1)


def environment(c: dict) -> dict[str, str]:
    """The variables a container sees (envFrom of the ConfigMaps and Secrets here, then env)."""
    env = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(one("Secret", source["secretRef"]["name"])["stringData"])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]
            if "configMapKeyRef" in ref:
                env[var["name"]] = one("ConfigMap", ref["configMapKeyRef"]["name"])["data"][ref["configMapKeyRef"]["key"]]
            elif "secretKeyRef" in ref:
                env[var["name"]] = one("Secret", ref["secretKeyRef"]["name"])["stringData"][ref["secretKeyRef"]["key"]]
    return env


def settings_for(c: dict, monkeypatch) -> Settings:
    """shared.settings.Settings as the container reads it from its environment."""
    for name in list(os.environ):
        if name.startswith("ATTNONLY_"):
            monkeypatch.delenv(name)
    for name, value in environment(c).items():
        monkeypatch.setenv(name, value)
    return Settings()


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# --- the files and the schemas ----------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed[0] == "namespace.yaml"
    assert not list(K8S.glob("*.yml")), "use .yaml: kustomization.yaml lists them"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_offline():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "KUBECONFIG": os.devnull})
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == \
        sorted((d["kind"], d["metadata"]["name"]) for _, d in DOCS)


CORE = [(f, d) for f, d in DOCS if (d["apiVersion"], d["kind"]) not in CRDS]  # CRDs: checked by their own tests


@pytest.mark.parametrize("doc", [d for _, d in CORE], ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in CORE])
def test_manifest_validates_against_the_kubernetes_schema(doc):
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {'.'.join(map(str, exc.path))}")
    except kubernetes_validate.SchemaNotFoundError as exc:  # a CRD needs its own test and an entry in CRDS
        pytest.fail(exc.message)


def test_every_object_is_in_the_namespace_and_unique():
    seen = set()
    for _, doc in DOCS:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{key} twice"
        seen.add(key)
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, key
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "StatefulSet", "NetworkPolicy",
            "ScaledObject"} <= kinds


# --- the workloads ----------------------------------------------------------------------------

def test_api_deployment_and_service():
    api = one("Deployment", "api")
    assert api["spec"]["replicas"] == 2
    c = container("Deployment", "api")
    assert c["image"] == "attnonly-api:latest"
    assert c["command"][:2] == ["uvicorn", "api.main:app"]
    assert c["command"][c["command"].index("--port") + 1] == "8000"
    assert {"containerPort": 8000, "name": "http", "protocol": "TCP"} in c["ports"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert re.search(r"^#\s+docker build -f deploy/Dockerfile\.api ", (K8S / "api.yaml").read_text(), re.M)

    service = one("Service", "api")["spec"]
    assert service["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [(8000, "http")]
    assert selects({"matchLabels": service["selector"]}, api["spec"]["template"]["metadata"]["labels"])


def test_every_container_has_resources_and_a_locked_down_security_context():
    for kind, name, spec, c in containers():
        where = f"{kind}/{name}: {c['name']}"
        resources = c.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
        assert "memory" in resources.get("limits", {}), where
        for res, amount in {**resources["requests"], **resources.get("limits", {})}.items():
            quantity(amount)  # readable
        for res, request in resources["requests"].items():
            if res in resources.get("limits", {}):
                assert quantity(request) <= quantity(resources["limits"][res]), f"{where}: {res}"

        pod = spec.get("securityContext", {})
        sc = c.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) > 0, where  # numeric: USER app is a name
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert "add" not in sc.get("capabilities", {}) and not sc.get("privileged"), where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert spec.get("automountServiceAccountToken") is False, where

        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in one(kind, name)["spec"].get("volumeClaimTemplates", [])} \
            if kind == "StatefulSet" else set()
        assert set(mounts.values()) <= set(volumes) | claims, where
        for v in volumes.values():
            if "emptyDir" in v:
                assert "sizeLimit" in v["emptyDir"], f"{where}: emptyDir {v['name']} without sizeLimit"

        if (kind, name) in NO_PROBES:
            assert "livenessProbe" not in c and "readinessProbe" not in c, where
        else:
            assert "readinessProbe" in c and "livenessProbe" in c, where


def test_worker_runs_the_compose_command_on_a_gpu():
    c = container("Deployment", "worker")
    spec = one("Deployment", "worker")["spec"]
    pod = spec["template"]["spec"]
    # docker-compose.yml's worker runs the image's CMD: the same command here.
    cmd = re.search(r"^CMD (\[.*\])$", (REPO / "deploy" / "Dockerfile.worker").read_text(), re.M)
    assert c["command"] == json.loads(cmd.group(1)) == ["celery", "-A", "worker.app", "worker", "--loglevel", "INFO"]
    assert c["image"] == "attnonly-worker:latest"
    assert "replicas" not in spec, "KEDA owns the worker count"

    assert str(c["resources"]["requests"]["nvidia.com/gpu"]) == "1"
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in pod["tolerations"])
    memory = quantity(c["resources"]["requests"]["memory"])
    assert memory >= 32 * 2**30, "conversions hold a checkpoint in host memory"
    assert quantity(c["resources"]["limits"]["memory"]) == memory, "memory is not overcommitted"

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert "command" not in compose["services"]["worker"] and "entrypoint" not in compose["services"]["worker"]

    # SIGTERM hands the job back (cold shutdown) well within the grace period
    # (test_sigterm_hands_the_running_job_back shows it with a real worker).
    env = environment(c)
    assert env["REMAP_SIGTERM"] == "SIGQUIT"
    assert 60 <= pod["terminationGracePeriodSeconds"] <= 600


HANDBACK_APP = '''
import os, pathlib, time
from shared.settings import Settings
from worker.app import make_celery

app = make_celery(Settings(redis_url=os.environ["HANDBACK_REDIS_URL"], gpu_queue=os.environ["HANDBACK_QUEUE"]))

@app.task(name="handback.slow")
def slow():
    pathlib.Path(os.environ["HANDBACK_STARTED"]).touch()
    time.sleep(600)
'''


def test_sigterm_hands_the_running_job_back(redis_url, tmp_path):
    """The worker pod's command and environment, with a slow task in place of a conversion:
    the kubelet's SIGTERM puts the running job back on the queue within the grace period
    (with Celery's default warm shutdown it would wait for the job to end instead)."""
    import signal
    import sys
    import time
    import uuid

    import redis

    c = container("Deployment", "worker")
    grace = one("Deployment", "worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    queue = f"k8s-handback-{uuid.uuid4().hex[:8]}"
    (tmp_path / "handback_app.py").write_text(HANDBACK_APP)
    started = tmp_path / "started"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNONLY_")}
    env.update({k: v for k, v in environment(c).items() if not k.startswith("ATTNONLY_")},  # REMAP_SIGTERM
               HANDBACK_REDIS_URL=redis_url, HANDBACK_QUEUE=queue, HANDBACK_STARTED=str(started),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    command = [sys.executable, "-m", *("handback_app" if a == "worker.app" else a for a in c["command"])]
    assert command[3:5] == ["-A", "handback_app"]

    from worker.app import make_celery

    sender = make_celery(Settings(redis_url=redis_url, gpu_queue=queue))
    client = redis.Redis.from_url(redis_url)
    proc = None
    try:
        sender.send_task("handback.slow")
        assert client.llen(queue) == 1
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        assert client.llen(queue) == 0  # taken: it sits in kombu's unacked hash, not in the list

        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=grace / 2)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker was still running {grace / 2:.0f} s after SIGTERM")
        assert client.llen(queue) == 1, out  # back on the queue for another worker
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        client.delete(queue)
        sender.close()
        client.close()


def test_worker_budgets_fit_its_resources(monkeypatch):
    c = container("Deployment", "worker")
    pod = one("Deployment", "worker")["spec"]["template"]["spec"]
    settings = settings_for(c, monkeypatch)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}

    work = volumes[mounts[str(settings.work_dir)]]
    assert "medium" not in work["emptyDir"]
    # The budgets are set: their defaults measure the node, not this container.
    assert settings.worker_disk_bytes is not None and settings.worker_memory_bytes is not None
    assert settings.worker_disk_bytes < quantity(work["emptyDir"]["sizeLimit"])
    in_memory = sum(quantity(v["emptyDir"]["sizeLimit"]) for v in volumes.values()
                    if v.get("emptyDir", {}).get("medium") == "Memory")
    assert settings.worker_memory_bytes + in_memory < quantity(c["resources"]["limits"]["memory"])
    assert settings.max_download_bytes < settings.worker_disk_bytes
    assert quantity(c["resources"]["requests"]["ephemeral-storage"]) >= quantity(work["emptyDir"]["sizeLimit"])
    assert mounts["/tmp"] in volumes


# --- autoscaling ------------------------------------------------------------------------------

def scaled_object() -> dict:
    obj = one("ScaledObject", "worker")
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    return obj


def redis_trigger() -> dict:
    triggers = scaled_object()["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["redis"]
    return triggers[0]["metadata"]


def test_scaled_object_scales_the_worker_on_the_celery_queue():
    spec = scaled_object()["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    assert target["name"] in objects("Deployment") and target["name"] == "worker"
    assert spec["minReplicaCount"] in (0, 1)
    assert spec["maxReplicaCount"] >= max(1, spec["minReplicaCount"])
    if spec["minReplicaCount"] == 0:  # only safe when no running job outlives the cool-down (see the file)
        assert spec["cooldownPeriod"] > int(one("ConfigMap", "attnonly-config")["data"]["ATTNONLY_TASK_TIME_LIMIT"])

    trigger = redis_trigger()
    config = one("ConfigMap", "attnonly-config")["data"]
    queue = config.get("ATTNONLY_GPU_QUEUE", Settings.model_fields["gpu_queue"].default)
    assert trigger["listName"] == queue == "gpu"
    assert int(trigger["listLength"]) >= 1
    # The list lives where the workers' broker is: the same host, port and database.
    url = urlsplit(config["ATTNONLY_REDIS_URL"])
    assert trigger["address"] == f"{url.hostname}:{url.port or 6379}"
    assert url.hostname.split(".")[1:2] == [NAMESPACE], "KEDA runs in another namespace: qualify the host"
    assert int(trigger.get("databaseIndex", "0")) == int((url.path or "/0").lstrip("/") or 0)
    assert url.hostname.split(".")[0] in objects("Service")


def test_celery_keeps_the_queue_in_the_redis_list_keda_reads():
    """How worker/app.py configures Celery: kombu's Redis transport keeps a queue's waiting
    messages in a list named after the queue unless a key prefix or priorities change it."""
    from worker.app import CONVERT_TASK, make_celery

    queue = redis_trigger()["listName"]
    app = make_celery(Settings(gpu_queue=queue))
    assert set(app.amqp.queues) == {queue}
    assert app.conf.task_default_queue == queue
    assert app.amqp.router.route({}, CONVERT_TASK)["queue"].name == queue
    options = app.conf.broker_transport_options
    assert not {"global_keyprefix", "priority_steps", "sep", "queue_order_strategy"} & set(options)
    assert app.amqp.queues[queue].max_priority is None


@pytest.mark.skipif(bool(os.environ.get("ATTNONLY_TEST_REDIS_URL")),
                    reason="writes to the queue KEDA watches: only on the tests' private Redis")
def test_a_submitted_job_lands_in_that_list(redis_url):
    import redis

    from worker.app import CONVERT_TASK, make_celery

    trigger = redis_trigger()
    url = urlsplit(redis_url)
    broker = f"redis://{url.hostname}:{url.port}/{int(trigger['databaseIndex'])}"
    client = redis.Redis.from_url(broker)
    app = make_celery(Settings(redis_url=broker, gpu_queue=trigger["listName"]))
    listed = lambda: {json.loads(m)["headers"]["id"]: m for m in client.lrange(trigger["listName"], 0, -1)}  # noqa: E731
    task_id = f"k8s-manifest-test-{os.getpid()}"
    try:
        before = client.llen(trigger["listName"])
        app.send_task(CONVERT_TASK, args=[task_id], task_id=task_id)
        assert client.type(trigger["listName"]) == b"list"
        assert client.llen(trigger["listName"]) == before + 1
        assert task_id in listed()
    finally:
        message = listed().get(task_id)
        if message is not None:
            client.lrem(trigger["listName"], 0, message)
        app.close()
        client.close()


# --- network policies -------------------------------------------------------------------------

def policy_for(component: str) -> dict:
    labels = one("Deployment" if component in ("api", "worker") else "StatefulSet", component)["spec"]["template"]
    labels = labels["metadata"]["labels"]
    found = [p for p in objects("NetworkPolicy").values()
             if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], labels)]
    assert len(found) == 1, component
    return found[0]["spec"]


def _dns(rule) -> bool:
    peers = rule.get("to", [])
    ports = {(p["protocol"], p["port"]) for p in rule.get("ports", [])}
    return ports == {("UDP", 53), ("TCP", 53)} and any(
        p.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"}
        and p.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "kube-system"}
        for p in peers)


def _to_pods(rule, component: str, port: int) -> bool:
    return [(p["protocol"], p["port"]) for p in rule.get("ports", [])] == [("TCP", port)] and any(
        p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == component
        and "namespaceSelector" not in p for p in rule.get("to", []))


def test_everything_is_denied_unless_allowed():
    deny = [p["spec"] for p in objects("NetworkPolicy").values() if p["spec"]["podSelector"] == {}]
    assert deny == [{"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}]
    # Every policy selects pods that exist (a label typo would silently select nothing).
    pods = [labels for *_, labels in pod_specs()]
    for name, policy in objects("NetworkPolicy").items():
        assert any(selects(policy["spec"]["podSelector"], labels) for labels in pods), name
        for rule in policy["spec"].get("egress", []) + policy["spec"].get("ingress", []):
            for peer in rule.get("to", []) + rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert any(selects(peer["podSelector"], labels) for labels in pods), f"{name}: {peer}"


def test_workers_reach_redis_s3_dns_and_the_internet_but_no_private_range():
    spec = policy_for("worker")
    assert spec["policyTypes"] == ["Ingress", "Egress"] and not spec.get("ingress")
    egress = spec["egress"]
    assert any(_dns(r) for r in egress)
    assert any(_to_pods(r, "redis", 6379) for r in egress)
    assert any(_to_pods(r, "minio", 9000) for r in egress)
    (block,) = [p["ipBlock"] for r in egress for p in r.get("to", []) if "ipBlock" in p]
    assert block["cidr"] == "0.0.0.0/0"
    assert set(block["except"]) >= PRIVATE_RANGES
    # No rule opens everything (a rule without `to` would allow any address, private ones too).
    assert all(r.get("to") for r in egress)


def test_api_reaches_redis_and_s3_only_and_is_reached_on_8000():
    spec = policy_for("api")
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    egress = spec["egress"]
    assert len(egress) == 3
    assert any(_dns(r) for r in egress)
    assert any(_to_pods(r, "redis", 6379) for r in egress)
    assert any(_to_pods(r, "minio", 9000) for r in egress)
    assert not [p for r in egress for p in r.get("to", []) if "ipBlock" in p]
    assert [[(p["protocol"], p["port"]) for p in r["ports"]] for r in spec["ingress"]] == [[("TCP", 8000)]]


def test_redis_admits_the_api_the_workers_and_keda():
    spec = policy_for("redis")
    assert spec["egress"] == []
    (rule,) = spec["ingress"]
    assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", 6379)]
    peers = rule["from"]
    components = {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in peers if "podSelector" in p}
    assert components == {"api", "worker"}
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}} in peers


# --- settings: ConfigMap, Secret, env ---------------------------------------------------------

def test_every_env_var_is_a_setting():
    for name in one("ConfigMap", "attnonly-config")["data"]:
        assert name in SETTINGS_ENV, f"ConfigMap: {name} is no field of shared.settings.Settings"
    for secret in objects("Secret").values():
        for name in secret["stringData"]:
            assert name in SETTINGS_ENV, f"Secret: {name} is no field of shared.settings.Settings"
    for kind, name, _, c in containers():
        for var in c.get("env", []):
            if var["name"].startswith("ATTNONLY_"):
                assert var["name"] in SETTINGS_ENV, f"{kind}/{name}: {var['name']}"
            elif c["image"].startswith("attnonly-"):
                assert var["name"] in NOT_SETTINGS, f"{kind}/{name}: {var['name']} is no setting"
        environment(c)  # every configMapKeyRef / secretKeyRef names a key that exists
    # The API and the workers read the same ConfigMap and Secret.
    refs = {n: c["envFrom"] for k, n, _, c in containers() if c["image"].startswith("attnonly-")}
    assert set(refs) == {"api", "worker"} and refs["api"] == refs["worker"]


@pytest.mark.parametrize("name", ["api", "worker"])
def test_settings_load_from_the_manifests(name, monkeypatch):
    settings = settings_for(container("Deployment", name), monkeypatch)
    assert settings.visibility_timeout > settings.task_time_limit
    assert settings.gpu_queue == redis_trigger()["listName"]
    assert settings.s3_endpoint_url == "http://minio.attnonly.svc:9000"
    assert [k.name for k in settings.api_keys] == ["REPLACE_ME"]


def test_secrets_hold_placeholders_only():
    for _, doc in DOCS:
        if doc["kind"] != "Secret":
            continue
        assert "data" not in doc, "use stringData, so that a real value cannot hide in base64"
        assert doc["stringData"]
        for key, value in doc["stringData"].items():
            assert "REPLACE_ME" in value, f"{key} must be an obvious placeholder"
            for digits in re.findall(r"[0-9a-fA-F]{32,}", value):
                assert set(digits) == {"0"}, f"{key}: a hash or key that looks real"
            assert not re.search(r"AKIA[0-9A-Z]{16}|ak_[A-Za-z0-9_-]{16,}|-----BEGIN", value), key
        assert {parse_api_key(e).sha256 for e in doc["stringData"]["ATTNONLY_API_KEYS"].split(",")} == {"0" * 64}
    text = (K8S / "secret.yaml").read_text()
    assert "Replace every value" in text
    # Nothing secret inline elsewhere: credentials come from the Secret by reference.
    for kind, name, _, c in containers():
        for var in c.get("env", []):
            if re.search(r"KEY|SECRET|PASSWORD|TOKEN|USER", var["name"]):
                assert "secretKeyRef" in var.get("valueFrom", {}), f"{kind}/{name}: {var['name']}"
