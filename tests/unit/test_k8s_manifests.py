"""deploy/k8s/: every overlay renders, validates against the Kubernetes schemas, and agrees with
compose/docker-compose.yml and epd/config.py.

- Rendering is ``kubectl kustomize`` (offline); schemas are kubernetes-validate's (strict: unknown
  fields are errors) for the oldest version the manifests need (native gRPC probes: 1.27) and
  the newest it ships. KEDA's ScaledObject is a CRD that validator has no schema for: it is
  checked here field by field (the fields KEDA's v2 CRD defines), its embedded HPA ``behavior``
  against the core HorizontalPodAutoscaler schema, and its queries against the metrics the
  gateway really exports (``epd_instance_load``) and the load keys each role really publishes.
- Cross-checks: every ``EPD_*`` variable of a role is a field of that role's config class and
  its value passes that class's validation; probe ports are the admin/HTTP ports the variables
  set; grace periods and liveness tolerances exceed EPD_DRAIN_TIMEOUT_S; every container has
  requests and limits; the base agrees with compose on image, command and each variable, except
  the differences listed (with their reasons) in :data:`K8S_DIFFERENCES`.

The checks return lists of problems, each naming the overlay, object and variable, so the negative
tests can feed them a patched overlay or compose file and assert what they report.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import math
import os
import re
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from epd import config

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra: pip install '.[dev]'")
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (renders the overlays, offline)")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPOSE = ROOT / "compose" / "docker-compose.yml"
DOCKERFILE = ROOT / "compose" / "Dockerfile"
ROLES = {"gateway": config.GatewayConfig, "encoder": config.EncoderConfig,
         "prefill": config.PrefillConfig, "decode": config.DecodeConfig}
BACKENDS = ("encoder", "prefill", "decode")
K8S_VERSIONS = ("1.27.0", kv.utils.latest_version())  # gRPC probes are GA from 1.27

# Where the base may differ from compose, and why (anything else must be equal).
K8S_DIFFERENCES = {
    "EPD_REDIS_URL": "from the Secret epd-redis: the URL carries the Redis password",
    "EPD_CLUSTER_SECRET": "the Secret is mounted as a file (EPD_CLUSTER_SECRET_FILE), mode 0440",
    "EPD_TORCH_THREADS": "the container's CPU limit (compose: 0 = torch sizes its pool by the host)",
}
GATEWAY_DIFFERENCES = {"EPD_HOST": "the pod IP (compose: the service name); each replica has its own inbox"}
# Sample values standing in for what only the cluster knows, to type-check the variables.
SECRET_SAMPLES = {"EPD_REDIS_URL": "redis://:password@redis:6379/0", "EPD_CLUSTER_SECRET": "0" * 32,
                  "EPD_API_KEY": "key"}
POD_IP = "10.1.2.3"
KEDA_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
             "minReplicaCount", "maxReplicaCount", "advanced", "fallback", "triggers"}
KEDA_TRIGGER = {"type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"}
PROMETHEUS_METADATA = {"serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
                       "ignoreNullValues", "unsafeSsl", "queryParameters", "authModes", "timeout"}


# -- rendering and reading ------------------------------------------------------------------------
@functools.cache
def _render_text(path: str) -> str:
    proc = subprocess.run([KUBECTL, "kustomize", path], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return proc.stdout


def render(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render_text(str(path))) if d]


def overlay_path(name: str) -> Path:
    return K8S / "base" if name == "base" else K8S / "overlays" / name


def role_deployments(objs: list[dict]) -> dict[str, dict]:
    out = {}
    for o in objs:
        role = o["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if o["kind"] == "Deployment" and role in ROLES:
            assert role not in out, f"two Deployments for role {role}"
            out[role] = o
    return out


def main_container(dep: dict, role: str) -> dict:
    spec = dep["spec"]["template"]["spec"]
    found = [c for c in spec["containers"] if c["name"] == role]
    assert found, f"deployment/{dep['metadata']['name']}: no container named {role}"
    return found[0]


def cpu_cores(q: str | int | float) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


_MEM = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def mem_bytes(q: str | int) -> float:
    m = re.fullmatch(r"([0-9.]+)([KMGT]i|[kKMGT])?", str(q))
    assert m, f"not a memory quantity: {q!r}"
    return float(m.group(1)) * _MEM.get(m.group(2) or "", 1)


def env_values(container: dict) -> tuple[dict[str, str], list[str]]:
    """The container's environment as the kubelet would set it (Secrets, pod IP and CPU limit
    replaced by samples; ``$(VAR)`` expanded from earlier entries) and the problems found."""
    values: dict[str, str] = {}
    problems = []
    for item in container.get("env", []):
        name = item["name"]
        if name in values:
            problems.append(f"{name} is set twice")
        if "value" in item:
            values[name] = re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), str(item["value"]))
            continue
        ref = item.get("valueFrom", {})
        if "secretKeyRef" in ref:
            if name.startswith("EPD_") and name not in SECRET_SAMPLES:
                problems.append(f"{name} comes from a Secret, which is meant for {sorted(SECRET_SAMPLES)} only")
            values[name] = SECRET_SAMPLES.get(name, "secret")
        elif ref.get("fieldRef", {}).get("fieldPath") == "status.podIP":
            values[name] = POD_IP
        elif "resourceFieldRef" in ref:
            r = ref["resourceFieldRef"]
            limit = container.get("resources", {}).get("limits", {}).get("cpu")
            if r.get("resource") != "limits.cpu" or limit is None:
                problems.append(f"{name}: only limits.cpu of a container with a CPU limit is understood here")
                continue
            values[name] = str(math.ceil(cpu_cores(limit) / cpu_cores(r.get("divisor", "1"))))
        else:
            problems.append(f"{name}: unsupported valueFrom {sorted(ref)}")
    return values, problems


def _isolated(cls: type) -> type:
    """``cls`` filled only from its keyword arguments, never from this process's environment."""

    class Isolated(cls):
        @classmethod
        def settings_customise_sources(cls_, settings_cls, init_settings, **_):
            return (init_settings,)

    Isolated.__name__ = cls.__name__
    return Isolated


@functools.cache
def _fake_model_dir(tmp: str) -> str:
    d = Path(tmp) / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    return str(d)


def _mounts(pod: dict, container: dict) -> dict[str, tuple[dict, dict]]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: (m, volumes.get(m["name"], {})) for m in container.get("volumeMounts", [])}


# -- checks ---------------------------------------------------------------------------------------
def env_problems(objs: list[dict], where: str, tmp: str) -> list[str]:
    """Every EPD_* variable of a role is a field of its config class and passes its validation;
    the model and cluster secret come from the mounts they name."""
    problems = []
    deps = role_deployments(objs)
    for role in ROLES:
        if role not in deps:
            problems.append(f"{where}: no Deployment for role {role}")
    for role, dep in deps.items():
        cls, pod = ROLES[role], dep["spec"]["template"]["spec"]
        c = main_container(dep, role)
        at = f"{where}: deployment/{dep['metadata']['name']}"
        values, found = env_values(c)
        problems += [f"{at}: {p}" for p in found]
        if pod.get("enableServiceLinks", True):
            problems.append(f"{at}: enableServiceLinks must be false (Service env vars could shadow EPD_*)")
        fields = {}
        for name, value in values.items():
            if not name.startswith("EPD_"):
                continue
            field = name[4:].lower()
            if field not in cls.model_fields:
                problems.append(f"{at}: {name} is not a setting of {cls.__name__} (epd/config.py)")
            else:
                fields[field] = value
        mounts = _mounts(pod, c)
        model = fields.get("model")
        if model is not None:
            mount, vol = mounts.get(model, ({}, {}))
            if not (mount.get("readOnly") and vol.get("persistentVolumeClaim", {}).get("readOnly")):
                problems.append(f"{at}: EPD_MODEL={model} is not a read-only mounted PersistentVolumeClaim")
            fields["model"] = _fake_model_dir(tmp)
        if bool(fields.get("cluster_secret")) == bool(fields.get("cluster_secret_file")):
            problems.append(f"{at}: set exactly one of EPD_CLUSTER_SECRET / EPD_CLUSTER_SECRET_FILE "
                            "(bound beyond loopback, every process needs the secret)")
        if role == "gateway" and fields.get("host", "127.0.0.1") in ("0.0.0.0", "::", "127.0.0.1", "localhost"):
            problems.append(f"{at}: EPD_HOST={fields.get('host', '127.0.0.1')!r}: the backends reply to this "
                            "address, so it must be the pod IP (fieldRef status.podIP)")
        secret_file = fields.get("cluster_secret_file")
        if secret_file and "secret" not in mounts.get(os.path.dirname(secret_file), ({}, {}))[1]:
            problems.append(f"{at}: EPD_CLUSTER_SECRET_FILE={secret_file} is not in a mounted Secret")
        try:
            _isolated(cls)(**fields)
        except ValidationError as exc:
            for err in exc.errors():
                field = str(err["loc"][0]) if err["loc"] else "?"
                problems.append(f"{at}: EPD_{field.upper()}={fields.get(field)!r}: {err['msg']}")
    return problems


def _port(container: dict, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return named[0] if named else None


def _int(value: str | None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: str | None, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default  # env_problems names the bad value


def _seconds(probe: dict) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def _prestop_sleep(container: dict) -> int:
    cmd = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return int(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else 0


def probe_problems(objs: list[dict], where: str) -> list[str]:
    """Probes on the ports the variables set; drains fit in the grace period and liveness."""
    problems = []
    for role, dep in role_deployments(objs).items():
        c, pod, cls = main_container(dep, role), dep["spec"]["template"]["spec"], ROLES[role]
        at = f"{where}: deployment/{dep['metadata']['name']}"
        values, _ = env_values(c)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if probe is None:
                problems.append(f"{at}: no {kind}")
                continue
            if role == "gateway":
                want = _int(values.get("EPD_GATEWAY_PORT", cls.model_fields["gateway_port"].default))
                got = _port(c, probe.get("httpGet", {}).get("port", -1))
                if got != want:
                    problems.append(f"{at}: {kind} is not an HTTP probe on EPD_GATEWAY_PORT ({want}), got {got}")
            else:
                want = _int(values.get("EPD_ADMIN_PORT"))
                got = probe.get("grpc", {}).get("port")
                if want in (None, 0) or got != want or _port(c, "admin") != want:
                    problems.append(f"{at}: {kind} must be a gRPC probe on EPD_ADMIN_PORT "
                                    f"({values.get('EPD_ADMIN_PORT')}) = containerPort `admin` ({_port(c, 'admin')}), "
                                    f"got {got}")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if role == "gateway":
            import aiohttp.web

            shutdown = inspect.signature(aiohttp.web.run_app).parameters["shutdown_timeout"].default
            need = _prestop_sleep(c) + shutdown
            if grace < need:
                problems.append(f"{at}: terminationGracePeriodSeconds {grace} < preStop + aiohttp's "
                                f"shutdown_timeout ({need})")
            continue
        drain = _float(values.get("EPD_DRAIN_TIMEOUT_S"), cls.model_fields["drain_timeout_s"].default)
        drain += _float(values.get("EPD_DRAIN_GRACE_S"), cls.model_fields["drain_grace_s"].default)
        if grace < _prestop_sleep(c) + drain + 5:
            problems.append(f"{at}: terminationGracePeriodSeconds {grace} leaves EPD_DRAIN_TIMEOUT_S + "
                            f"EPD_DRAIN_GRACE_S ({drain:g} s) less than 5 s to exit")
        if "livenessProbe" in c and _seconds(c["livenessProbe"]) <= drain:
            problems.append(f"{at}: livenessProbe gives up after {_seconds(c['livenessProbe'])} s of NOT_SERVING, "
                            f"within a drain ({drain:g} s): `epd drain` would get the pod killed")
    return problems


def resource_problems(objs: list[dict], where: str) -> list[str]:
    problems = []
    for o in objs:
        if o["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        pod = o["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            at = f"{where}: {o['kind'].lower()}/{o['metadata']['name']} container {c['name']}"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        problems.append(f"{at}: no {kind}.{r}")
            for r, parse in (("cpu", cpu_cores), ("memory", mem_bytes)):
                req, lim = res.get("requests", {}).get(r), res.get("limits", {}).get(r)
                if req is not None and lim is not None and parse(req) > parse(lim):
                    problems.append(f"{at}: requests.{r} {req} > limits.{r} {lim}")
    return problems


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": present and value in e.get("values", []), "NotIn": value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def policy_problems(objs: list[dict], where: str) -> list[str]:
    """One PodDisruptionBudget per role, and a NetworkPolicy over every role's pods."""
    problems = []
    pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    netpols = [o for o in objs if o["kind"] == "NetworkPolicy"]
    for role, dep in role_deployments(objs).items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        n = sum(_selects(p["spec"]["selector"], labels) for p in pdbs)
        if n != 1:
            problems.append(f"{where}: role {role} is covered by {n} PodDisruptionBudgets, want 1")
        if not any(_selects(p["spec"]["podSelector"], labels) for p in netpols):
            problems.append(f"{where}: no NetworkPolicy selects the {role} pods")
    return problems


def schema_problems(objs: list[dict], where: str) -> list[str]:
    problems = []
    for o in objs:
        if o["apiVersion"].startswith("keda.sh/"):
            continue  # no core schema: scaledobject_problems
        for version in K8S_VERSIONS:
            try:
                kv.validate(o, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{where}: {o['kind']}/{o['metadata']['name']} (k8s {version}): {path}: {exc.message}")
            except kv.SchemaNotFoundError:
                problems.append(f"{where}: {o['kind']} {o['apiVersion']} has no schema in Kubernetes {version}")
    return problems


# -- the metrics the autoscaler reads ---------------------------------------------------------------
@functools.cache
def load_keys(role: str) -> frozenset[str]:
    """Keys of what ``load()`` in services/<role>/proc.py returns (what the heartbeat publishes):
    the fields of the engine's typed load record (``asdict(self.engine.load())``), or the keys of a
    dict literal."""
    import dataclasses
    import importlib

    typed = {"encoder": ("services.encoder.records", "EncoderLoad"),
             "prefill": ("services.prefill.records", "PrefillLoad")}
    source = (ROOT / "services" / role / "proc.py").read_text()
    if role in typed and "asdict(self.engine.load())" in source:
        module, name = typed[role]
        return frozenset(f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name)))
    tree = ast.parse(source)
    keys = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name == "load":
            for node in ast.walk(fn):
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict):
                    keys |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    assert keys, f"services/{role}/proc.py: no load() returning a dict literal"
    return frozenset(keys)


@functools.cache
def gateway_series() -> dict[str, frozenset[str]]:
    """Metric name -> label names of what the gateway's /metrics renders, with one instance per role."""
    from prometheus_client.parser import text_string_to_metric_families

    from services.gateway.metrics import GatewayMetrics

    instances = {role: [types.SimpleNamespace(instance_id=f"{role}-0", restarts=0,
                                              load=dict.fromkeys(load_keys(role), 1.0))] for role in BACKENDS}
    router = types.SimpleNamespace(instances=instances, charged=lambda: {})
    text = GatewayMetrics(router).render().decode()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
            out.setdefault(family.name, set()).update(sample.labels)
    return {k: frozenset(v) for k, v in out.items()}


def query_problems(query: str, namespace: str, at: str) -> list[str]:
    """Every selector names an exported metric, existing labels, a role and a key it publishes."""
    problems = []
    series = gateway_series()
    selectors = re.findall(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", query)
    if not selectors:
        problems.append(f"{at}: query selects no metric: {query}")
    for metric, body in selectors:
        if metric not in series:
            problems.append(f"{at}: {metric} is not exported by the gateway's /metrics")
            continue
        # The target's `instance` label wins; the gateway's becomes `exported_instance`.
        allowed = (series[metric] - {"instance"}) | {"exported_instance", "namespace", "pod", "job"}
        matchers = dict((k, v) for k, _, v in re.findall(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"', body))
        for label in matchers:
            if label not in allowed:
                problems.append(f"{at}: {metric} has no label {label!r} (it has {sorted(allowed)})")
        if matchers.get("namespace") != namespace:
            problems.append(f"{at}: {metric} must select namespace=\"{namespace}\", got {matchers.get('namespace')!r}")
        role, key = matchers.get("role"), matchers.get("key")
        if metric == "epd_instance_load":
            if role not in BACKENDS:
                problems.append(f"{at}: epd_instance_load role={role!r}: not one of {BACKENDS}")
            elif key not in load_keys(role):
                problems.append(f"{at}: epd_instance_load key={key!r}: the {role} publishes {sorted(load_keys(role))}")
    for group in re.findall(r"\bby\s*\(([^)]*)\)", query):
        for label in (g.strip() for g in group.split(",")):
            if label not in ("exported_instance", "role", "key"):
                problems.append(f"{at}: `by ({label})`: group by exported_instance (one value per instance)")
    return problems


def scaledobject_problems(objs: list[dict], where: str) -> list[str]:
    """KEDA ScaledObjects: the fields KEDA defines, a real target without its own replicas, an HPA
    behavior the core schema accepts, and queries on metrics that exist."""
    problems = []
    deployments = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    for so in (o for o in objs if o["kind"] == "ScaledObject"):
        at = f"{where}: scaledobject/{so['metadata']['name']}"
        spec = so.get("spec", {})
        problems += [f"{at}: unknown field spec.{k}" for k in sorted(set(spec) - KEDA_SPEC)]
        target = spec.get("scaleTargetRef", {})
        dep = deployments.get(target.get("name"))
        if dep is None or target.get("kind", "Deployment") != "Deployment":
            problems.append(f"{at}: scaleTargetRef {target} is not a Deployment of this overlay")
        elif "replicas" in dep["spec"]:
            problems.append(f"{at}: deployment/{target['name']} sets replicas, which would fight the autoscaler")
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            problems.append(f"{at}: want 1 <= minReplicaCount <= maxReplicaCount (the gateway needs one of each role)")
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior is not None:
            hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
                   "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1,
                            "behavior": behavior}}
            found = schema_problems([hpa], "")
            problems += [f"{at} behavior{p.split('HorizontalPodAutoscaler/x', 1)[1]}" for p in found]
        if not spec.get("triggers"):
            problems.append(f"{at}: no triggers")
        for i, trig in enumerate(spec.get("triggers", [])):
            tat = f"{at} trigger {trig.get('name', i)}"
            problems += [f"{tat}: unknown field {k}" for k in sorted(set(trig) - KEDA_TRIGGER)]
            meta = trig.get("metadata", {})
            if trig.get("type") != "prometheus":
                problems.append(f"{tat}: type {trig.get('type')!r}; the load is in Prometheus, not in a Redis list")
            if trig.get("metricType", "AverageValue") not in ("AverageValue", "Value"):
                problems.append(f"{tat}: metricType {trig.get('metricType')!r}")
            problems += [f"{tat}: unknown metadata {k}" for k in sorted(set(meta) - PROMETHEUS_METADATA)]
            problems += [f"{tat}: metadata {k} must be a string" for k, v in meta.items() if not isinstance(v, str)]
            if not str(meta.get("serverAddress", "")).startswith(("http://", "https://")):
                problems.append(f"{tat}: serverAddress {meta.get('serverAddress')!r}")
            try:
                assert float(meta["threshold"]) > 0
            except (KeyError, ValueError, AssertionError, TypeError):
                problems.append(f"{tat}: threshold {meta.get('threshold')!r} is not a positive number")
            problems += query_problems(str(meta.get("query", "")), so["metadata"].get("namespace", ""), tat)
    return problems


# -- compose ----------------------------------------------------------------------------------------
def interpolate(value, env: dict[str, str]):
    """docker compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?err}`` and ``$$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1)) or (m.group(3) or "" if m.group(2) == ":-" else "")

    return re.sub(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, value)


def compose_doc() -> dict:
    env = {"EPD_CLUSTER_SECRET": SECRET_SAMPLES["EPD_CLUSTER_SECRET"]}  # compose refuses to start without it
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


def _entrypoint() -> list[str]:
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.M)
    return yaml.safe_load(m.group(1)) if m else []


def compose_problems(objs: list[dict], compose: dict, objs_all: list[dict] | None = None) -> list[str]:
    """The base (``objs``) runs what compose runs: image, command, ports and every variable."""
    problems = []
    services = compose["services"]
    deps = role_deployments(objs)
    for role, dep in deps.items():
        svc, c = services.get(role), main_container(dep, role)
        at = f"deployment/{role} vs compose service {role}"
        if svc is None:
            problems.append(f"{at}: compose has no service {role}")
            continue
        if c["image"] != svc["image"]:
            problems.append(f"{at}: image {c['image']!r} != {svc['image']!r}")
        k8s_argv = (c.get("command") or _entrypoint()) + (c.get("args") or [])
        compose_argv = _entrypoint() + svc["command"]
        if k8s_argv != compose_argv:
            problems.append(f"{at}: command {k8s_argv} != {compose_argv}")
        if svc["command"][-1:] != [f"services.{role}"]:
            problems.append(f"{at}: compose's {role} runs {svc['command']}")
        k8s_env = {e["name"]: e for e in c.get("env", [])}
        allowed = {**K8S_DIFFERENCES, **(GATEWAY_DIFFERENCES if role == "gateway" else {})}
        for name, value in svc.get("environment", {}).items():
            if name in allowed:
                continue
            item = k8s_env.get(name)
            if item is None:
                problems.append(f"{at}: {name} is set in compose ({value!r}) but not in k8s")
            elif str(item.get("value")) != str(value):
                got = item.get("value", item.get("valueFrom"))
                problems.append(f"{at}: {name}={got!r} in k8s, {value!r} in compose")
        if role == "gateway":
            published = [str(p).rsplit(":", 1)[-1] for p in svc.get("ports", [])]
            if [str(_port(c, "http"))] != published:
                problems.append(f"{at}: container port http {_port(c, 'http')} != compose's {published}")
    images = {main_container(d, r)["image"] for r, d in deps.items()}
    if len(images) != 1:
        problems.append(f"one image for every role, as compose: got {sorted(images)}")
    for o in objs_all or []:
        if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "redis":
            c = o["spec"]["template"]["spec"]["containers"][0]
            redis = services["redis"]
            if c["image"] != redis["image"]:
                problems.append(f"statefulset/redis: image {c['image']} != compose's {redis['image']}")
            argv = c.get("command", []) + c.get("args", [])
            if argv[0] != redis["command"][0] or " ".join(redis["command"][1:]) not in " ".join(argv[1:]):
                problems.append(f"statefulset/redis: {argv} does not run compose's {redis['command']}")
    return problems


# -- tests ------------------------------------------------------------------------------------------
def test_overlays_exist():
    assert {"dev", "prod"} <= set(OVERLAYS)


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_renders_and_validates(name):
    objs = render(overlay_path(name))
    assert objs, f"{name} renders nothing"
    assert schema_problems(objs, name) == []


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_consistent_with_config(name, tmp_path):
    objs = render(overlay_path(name))
    problems = env_problems(objs, name, str(tmp_path))
    problems += probe_problems(objs, name) + resource_problems(objs, name) + policy_problems(objs, name)
    problems += scaledobject_problems(objs, name)
    assert problems == []


def test_base_matches_compose():
    base = render(K8S / "base")
    dev = render(overlay_path("dev"))  # the in-cluster Redis comes with dev
    assert any(o["kind"] == "StatefulSet" for o in dev)
    assert compose_problems(base, compose_doc(), dev) == []


def test_prod_autoscales_every_backend_on_queue_depth():
    objs = render(overlay_path("prod"))
    targets = {o["spec"]["scaleTargetRef"]["name"] for o in objs if o["kind"] == "ScaledObject"}
    assert targets == set(BACKENDS)
    scaled = [o for o in objs if o["kind"] == "ScaledObject"]
    queries = " ".join(t["metadata"]["query"] for o in scaled for t in o["spec"]["triggers"])
    for key in ("queued_patches", "queued_tokens", "running", "free_blocks"):
        assert f'key="{key}"' in queries
    assert not any(o["kind"] == "StatefulSet" for o in objs), "prod uses an external Redis"


# -- the checks fail, naming what is wrong ------------------------------------------------------------
def _overlay_on(tmp_path: Path, base: str, patch: str) -> list[dict]:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(overlay_path(base), tmp_path)], "patches": [{"patch": patch}],
    }))
    return render(tmp_path)


ENCODER_ENV_PATCH = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: encoder}
spec:
  template:
    spec:
      containers:
        - name: encoder
          env:
            - {name: %s, value: "%s"}
"""


def test_unknown_variable_in_an_overlay_is_named(tmp_path):
    objs = _overlay_on(tmp_path, "dev", ENCODER_ENV_PATCH % ("EPD_NOT_A_VAR", "1"))
    problems = env_problems(objs, "patched", str(tmp_path))
    assert problems == ["patched: deployment/encoder: EPD_NOT_A_VAR is not a setting of EncoderConfig (epd/config.py)"]


def test_gateway_setting_on_a_backend_is_named(tmp_path):
    objs = _overlay_on(tmp_path, "dev", ENCODER_ENV_PATCH % ("EPD_GATEWAY_PORT", "8000"))
    assert env_problems(objs, "patched", str(tmp_path)) == [
        "patched: deployment/encoder: EPD_GATEWAY_PORT is not a setting of EncoderConfig (epd/config.py)"]


def test_mistyped_variable_is_named(tmp_path):
    objs = _overlay_on(tmp_path, "dev", ENCODER_ENV_PATCH % ("EPD_ADMIN_PORT", "nine"))
    problems = env_problems(objs, "patched", str(tmp_path))
    assert len(problems) == 1 and problems[0].startswith("patched: deployment/encoder: EPD_ADMIN_PORT='nine': ")
    assert any("EPD_ADMIN_PORT" in p and "startupProbe" in p for p in probe_problems(objs, "patched"))


def test_probe_on_another_port_is_named():
    objs = copy.deepcopy(render(overlay_path("dev")))
    main_container(role_deployments(objs)["decode"], "decode")["readinessProbe"]["grpc"]["port"] = 9001
    problems = probe_problems(objs, "dev")
    assert len(problems) == 1 and "deployment/decode: readinessProbe" in problems[0]


def test_grace_period_shorter_than_the_drain_is_named(tmp_path):
    objs = _overlay_on(tmp_path, "prod", ENCODER_ENV_PATCH % ("EPD_DRAIN_TIMEOUT_S", "120"))
    problems = probe_problems(objs, "patched")
    assert len(problems) == 2 and all("deployment/encoder" in p for p in problems)
    assert "terminationGracePeriodSeconds 45" in problems[0] and "livenessProbe" in problems[1]


def test_missing_limits_are_named():
    objs = copy.deepcopy(render(overlay_path("prod")))
    del main_container(role_deployments(objs)["encoder"], "encoder")["resources"]["limits"]["memory"]
    assert resource_problems(objs, "prod") == ["prod: deployment/encoder container encoder: no limits.memory"]


def test_schema_error_is_named():
    objs = copy.deepcopy(render(overlay_path("dev")))
    main_container(role_deployments(objs)["prefill"], "prefill")["livenessProbe"]["grpc"]["sevice"] = "prefill"
    problems = schema_problems(objs, "dev")
    assert problems and all("Deployment/prefill" in p and "sevice" in p for p in problems)


def test_compose_mismatch_is_named():
    compose = compose_doc()
    compose["services"]["encoder"]["command"] = ["python", "-m", "services.prefill"]
    compose["services"]["decode"]["environment"]["EPD_DRAIN_TIMEOUT_S"] = "60"
    compose["services"]["redis"]["image"] = "redis:8"
    problems = compose_problems(render(K8S / "base"), compose, render(overlay_path("dev")))
    assert sorted(problems) == sorted([
        "deployment/encoder vs compose service encoder: command ['python', '-m', 'services.encoder'] != "
        "['python', '-m', 'services.prefill']",
        "deployment/encoder vs compose service encoder: compose's encoder runs ['python', '-m', 'services.prefill']",
        "deployment/decode vs compose service decode: EPD_DRAIN_TIMEOUT_S='30' in k8s, '60' in compose",
        "statefulset/redis: image redis:7-alpine != compose's redis:8",
    ])


def test_k8s_setting_missing_from_a_role_is_named():
    base = copy.deepcopy(render(K8S / "base"))
    c = main_container(role_deployments(base)["prefill"], "prefill")
    c["env"] = [e for e in c["env"] if e["name"] != "EPD_PREFILL_BUFFER_MB"]
    assert compose_problems(base, compose_doc()) == [
        "deployment/prefill vs compose service prefill: EPD_PREFILL_BUFFER_MB is set in compose ('256') but not in k8s"]


def test_autoscaler_on_a_metric_that_does_not_exist_is_named():
    objs = copy.deepcopy(render(overlay_path("prod")))
    so = next(o for o in objs if o["kind"] == "ScaledObject" and o["metadata"]["name"] == "encoder")
    meta = so["spec"]["triggers"][0]["metadata"]
    meta["query"] = meta["query"].replace('key="queued_patches"', 'key="queued_pixels"')
    so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleUp"]["policies"][0]["periodSecond"] = 1
    problems = scaledobject_problems(objs, "prod")
    assert len(problems) == 3, problems
    assert "key='queued_pixels': the encoder publishes" in problems[2]
    assert all("scaledobject/encoder" in p for p in problems) and "periodSecond" in problems[0]
