"""The Kubernetes manifests in docker/k8s, checked offline (no cluster, no network).

Each kustomization is rendered here by a small reimplementation of the kustomize features
the manifests use (resources, images, JSON 6902 patches; anything else fails the test), and,
where `kubectl` is installed, compared with `kubectl kustomize`. Every object is validated
against the Kubernetes OpenAPI schemas bundled with the kubernetes-validate package (strict:
unknown fields are errors), for the oldest supported Kubernetes (1.30) and the newest the
package knows. Then the properties the deployment relies on are asserted, several of them
against the server's own code (its flags, metric names and shutdown timeout).
"""
from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from kvclip.service.app import create_app
from tests.service_helpers import make_config, run_serve

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
KUSTOMIZATIONS = {"server": K8S, "cpu": K8S / "overlays" / "cpu", "build": K8S / "build"}
ADAPTER_RULES = K8S / "monitoring" / "prometheus-adapter-rules.yaml"
MIN_KUBERNETES = "1.30"  # preStop `sleep` is beta (on by default) from 1.30
SUPPORTED_KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}


# --- rendering ---------------------------------------------------------------------------
def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _apply_json_patch(doc: dict, ops: list[dict]) -> None:
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = int(last) if isinstance(node, list) else last
        if op["op"] == "remove":
            del node[key]  # KeyError/IndexError: the patch names a path the base lacks
        elif op["op"] == "replace":
            assert (key < len(node)) if isinstance(node, list) else (key in node), \
                f"replace needs an existing path (RFC 6902): {op['path']}"
            node[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else key, copy.deepcopy(op["value"]))
            else:
                node[key] = copy.deepcopy(op["value"])
        else:
            raise AssertionError(f"unsupported patch op {op['op']!r}")


def _matches(target: dict, doc: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    return (target.get("kind", doc["kind"]) == doc["kind"]
            and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
            and target.get("group", group) == group and target.get("version", version) == version)


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def render(folder: Path) -> list[dict]:
    """What `kubectl kustomize folder` gives, for the features these manifests use."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED_KUSTOMIZE_KEYS
    assert not unknown, f"{folder}: kustomize features this test does not render: {unknown}"
    docs: list[dict] = []
    for entry in kust.get("resources", []):
        path = (folder / entry).resolve()
        docs += render(path) if path.is_dir() else load_yaml_docs(path)
    for patch in kust.get("patches", []):
        assert set(patch) == {"target", "patch"}, "only inline JSON 6902 patches are rendered here"
        hits = [doc for doc in docs if _matches(patch["target"], doc)]
        assert hits, f"{folder}: patch target {patch['target']} matches nothing"
        for doc in hits:
            _apply_json_patch(doc, yaml.safe_load(patch["patch"]))
    for image in kust.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {key: render(folder) for key, folder in KUSTOMIZATIONS.items()}


@pytest.fixture(scope="module")
def server(rendered) -> list[dict]:
    return rendered["server"]


@pytest.fixture(scope="module")
def deployment(server) -> dict:
    return find(server, "Deployment", "kvclip")


@pytest.fixture(scope="module")
def job(rendered) -> dict:
    return find(rendered["build"], "Job")


def container_of(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(workload: dict, configmap: dict) -> dict[str, str | dict]:
    """The container's environment: envFrom ConfigMaps resolved, then env (which wins)."""
    container = container_of(workload)
    env: dict[str, str | dict] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == configmap["metadata"]["name"]
        env.update(configmap["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"].get("configMapKeyRef")
            if ref is not None:
                assert ref["name"] == configmap["metadata"]["name"]
                env[var["name"]] = configmap["data"][ref["key"]]  # KeyError: no such key
            else:
                env[var["name"]] = var["valueFrom"]
    return env


def mounts(workload: dict) -> dict[str, dict]:
    """mountPath -> the volume mounted there (with the mount's readOnly)."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return {m["mountPath"]: {**volumes[m["name"]], "mountReadOnly": m.get("readOnly", False)}
            for m in container_of(workload).get("volumeMounts", [])}


def writable(workload: dict, path: str) -> bool:
    for mount_path, volume in mounts(workload).items():
        if (path == mount_path or path.startswith(mount_path.rstrip("/") + "/")) and not volume["mountReadOnly"]:
            return True
    return False


# --- rendering and schemas ---------------------------------------------------------------
def test_every_manifest_file_is_used():
    """A manifest nobody applies is dead: each file is a kustomization, listed by one, or the
    adapter rule (applied into the adapter's namespace by hand)."""
    listed = {ADAPTER_RULES}
    for kust_file in K8S.rglob("kustomization.yaml"):
        kust = yaml.safe_load(kust_file.read_text())
        for entry in kust.get("resources", []):
            path = (kust_file.parent / entry).resolve()
            assert path.exists(), f"{kust_file} lists missing {entry}"
            listed.add(path / "kustomization.yaml" if path.is_dir() else path)
    files = {p.resolve() for p in K8S.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml")}
    orphans = {p for p in files if p.name != "kustomization.yaml"} - listed
    assert not orphans, f"manifests no kustomization lists: {sorted(map(str, orphans))}"


@pytest.mark.parametrize("version", [MIN_KUBERNETES, latest_version()])
def test_manifests_validate_against_kubernetes_schemas(rendered, version):
    checked, errors = 0, []
    for key, docs in {**rendered, "adapter": load_yaml_docs(ADAPTER_RULES)}.items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(map(str, exc.path))
                errors.append(f"{key}: {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
            checked += 1
    assert not errors, f"invalid for Kubernetes {version}:\n" + "\n".join(errors)
    assert checked == 7 + 7 + 1 + 1  # server, CPU overlay, build Job, adapter rule


def test_schema_validation_catches_mistakes(deployment):
    """The validator is live: a misspelt field, a wrong type and a missing field fail."""
    broken = copy.deepcopy(deployment)
    container_of(broken)["readynessProbe"] = container_of(broken).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, MIN_KUBERNETES, strict=True)
    broken = copy.deepcopy(deployment)
    container_of(broken)["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, MIN_KUBERNETES, strict=True)
    broken = copy.deepcopy(deployment)
    del broken["spec"]["selector"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, MIN_KUBERNETES, strict=True)


def _canonical(docs: list[dict]) -> list[dict]:
    return sorted(docs, key=lambda d: (d["kind"], d["metadata"]["name"]))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (the Python rendering is checked anyway)")
@pytest.mark.parametrize("key", sorted(KUSTOMIZATIONS))
def test_python_rendering_matches_kubectl_kustomize(rendered, key):
    out = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZATIONS[key])], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert _canonical([d for d in yaml.safe_load_all(out) if d]) == _canonical(rendered[key])


# --- the server Deployment ---------------------------------------------------------------
def test_probes_use_healthz_readyz_on_port_8000(deployment):
    container = container_of(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}

    def probe(kind: str) -> dict:
        get = container[kind]["httpGet"]
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == 8000, kind
        return container[kind] | {"path": get["path"]}

    startup, live, ready = probe("startupProbe"), probe("livenessProbe"), probe("readinessProbe")
    assert (startup["path"], live["path"], ready["path"]) == ("/healthz", "/healthz", "/readyz")
    # `kvclip serve` listens only once the model is loaded: the startup probe allows minutes.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    for p in (live, ready):
        assert 1 <= p["failureThreshold"] <= 5 and p["periodSeconds"] <= 15 and p["timeoutSeconds"] >= 1


@pytest.mark.anyio
async def test_health_routes_exist_in_the_server(tmp_path):
    # Without its lifespan the app loads nothing: /readyz says 503, but every route answers.
    transport = httpx.ASGITransport(app=create_app(make_config(tmp_path)))
    async with httpx.AsyncClient(transport=transport, base_url="http://kvclip.test") as client:
        for route in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(route)).status_code in (200, 503), route


def test_gpu_request_and_resources(deployment, rendered):
    resources = container_of(deployment)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[part])
    assert any(t["key"] == "nvidia.com/gpu" for t in deployment["spec"]["template"]["spec"]["tolerations"])
    cpu = find(rendered["cpu"], "Deployment", "kvclip")
    cpu_resources = container_of(cpu)["resources"]
    assert "nvidia.com/gpu" not in cpu_resources["limits"] | cpu_resources["requests"]
    assert container_of(deployment)["image"] == "kvclip:gpu" and container_of(cpu)["image"] == "kvclip:cpu"
    assert {"cpu", "memory"} <= set(cpu_resources["limits"]) and "tolerations" not in cpu["spec"]["template"]["spec"]
    # Everything else in the overlay is the base.
    same = [d for d in rendered["cpu"] if d["kind"] != "Deployment"]
    assert _canonical(same) == _canonical([d for d in rendered["server"] if d["kind"] != "Deployment"])


def test_caches_pvc_is_shared_by_servers_and_build_job(server, deployment, job):
    pvc = find(server, "PersistentVolumeClaim", "kvclip-caches")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for workload in (deployment, job):
        caches = mounts(workload)["/caches"]
        assert caches["persistentVolumeClaim"]["claimName"] == "kvclip-caches"
        assert writable(workload, "/caches")
    data = mounts(job)["/data"]
    assert data["persistentVolumeClaim"]["claimName"] == find(server, "PersistentVolumeClaim", "kvclip-build-data")["metadata"]["name"]
    assert data["mountReadOnly"] and "/data" not in mounts(deployment)


def test_api_keys_come_from_a_secret(rendered, deployment):
    env = {v["name"]: v for v in container_of(deployment)["env"]}
    ref = env["KVCLIP_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "kvclip-api-keys" and ref["key"] and not ref.get("optional", False)
    # No key anywhere in the manifests: no literal value, no Secret with data, not in a ConfigMap.
    for docs in rendered.values():
        for doc in docs:
            assert doc["kind"] != "Secret"
            if doc["kind"] == "ConfigMap":
                assert not any("API_KEY" in k for k in doc["data"])
            for container in _containers(doc):
                for var in container.get("env", []):
                    assert not ("API_KEY" in var["name"] and "value" in var), var
    assert not any("API_KEY" in line and ":admin" in line
                   for p in K8S.rglob("*.yaml") for line in p.read_text().splitlines())


def _server_parser() -> argparse.ArgumentParser:
    from kvclip.cache_builder.cli import add_commands as add_builder_commands
    from kvclip.service.cli import add_commands as add_server_commands

    parser = argparse.ArgumentParser(prog="kvclip")
    sub = parser.add_subparsers(dest="command", required=True)
    add_builder_commands(sub)
    add_server_commands(sub)
    return parser


def test_configmap_is_a_valid_server_configuration(server, deployment, monkeypatch):
    """`kvclip serve` with the pod's environment parses into the ServerConfig we mean."""
    from dataclasses import fields as dataclass_fields

    from kvclip.service import config as server_config

    configmap = find(server, "ConfigMap", "kvclip")
    env = env_of(deployment, configmap)
    fields = {f.name for f in dataclass_fields(server_config.ServerConfig)}
    for name in env:
        if name.startswith("KVCLIP_") and name != "KVCLIP_API_KEYS":
            assert name.removeprefix("KVCLIP_").lower() in fields, f"{name} is no server flag"
    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    args = _server_parser().parse_args(container_of(deployment)["args"])
    assert args.command == "serve"
    config = server_config.from_namespace(args)
    assert config.reload_interval_s > 0  # replicas pick up versions published by the Job
    assert str(config.caches) == "/caches" and config.host == "0.0.0.0" and config.port == 8000
    for path in (config.caches, config.jobs_root, config.model_cache_dir,
                 *(env[v] for v in ("HOME", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME"))):
        assert writable(deployment, str(path)), f"{path} is on the read-only root filesystem"


def test_build_job(job, deployment, server):
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1 and spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    container = container_of(job)
    assert container["image"] == container_of(deployment)["image"]
    configmap = find(server, "ConfigMap", "kvclip")
    env = env_of(job, configmap)
    # Expand $(VAR) as the kubelet does; every reference must be defined.
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    parsed = _server_parser().parse_args(args)
    assert parsed.command == "build" and parsed.out.parent == Path("/caches")
    assert parsed.data_dir.is_relative_to("/data")
    # The Job builds with the servers' model and weights folder (else the cache is refused).
    assert parsed.model == configmap["data"]["KVCLIP_MODEL"]
    assert parsed.model_cache_dir == configmap["data"]["KVCLIP_MODEL_CACHE_DIR"]
    assert not parsed.no_activate  # the build moves CURRENT: servers' reload polling sees it
    for path in (str(parsed.out), parsed.model_cache_dir, env["HOME"], env["HF_HOME"], env["HF_HUB_CACHE"]):
        assert writable(job, path), path
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "build"


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_security_context(rendered, kind):
    workload = find(rendered["server"] + rendered["build"], kind)
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert pod["automountServiceAccountToken"] is False
    sc = container_of(workload)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert "emptyDir" in mounts(workload)["/tmp"]


def test_graceful_shutdown_fits_the_grace_period(deployment, monkeypatch, capsys, tmp_path):
    # What `kvclip serve` hands uvicorn, not a number read out of its source.
    code, err, served = run_serve(monkeypatch, capsys, "--caches", str(tmp_path), "--model", "tiny-random",
                                  "--device", "cpu")
    assert code == 0, err
    drain = served.timeout_graceful_shutdown
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = container_of(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert drain + pre_stop <= pod["terminationGracePeriodSeconds"] <= drain + pre_stop + 15


def test_prometheus_scrape_annotations(deployment):
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000" and annotations["prometheus.io/path"] == "/metrics"


def test_service_reaches_the_server_pods(server, deployment):
    service = find(server, "Service", "kvclip")
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    container_ports = {p["name"]: p["containerPort"] for p in container_of(deployment)["ports"]}
    assert container_ports.get(port["targetPort"], port["targetPort"]) == 8000
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_pdb_covers_server_pods_only(server, deployment, job):
    pdb = find(server, "PodDisruptionBudget", "kvclip")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_hpa_scales_the_deployment_on_request_rate_and_cpu(server, deployment):
    hpa = find(server, "HorizontalPodAutoscaler", "kvclip")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "kvclip_http_requests_per_second"
    assert metrics["Pods"]["pods"]["target"]["type"] == "AverageValue"
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    # The Deployment leaves replicas to the HPA: re-applying must not reset them.
    assert "replicas" not in deployment["spec"]
    # A CPU utilisation target needs a CPU request.
    assert "cpu" in container_of(deployment)["resources"]["requests"]


def test_adapter_rule_serves_the_hpa_metric(server):
    (configmap,) = load_yaml_docs(ADAPTER_RULES)
    (rule,) = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    hpa = find(server, "HorizontalPodAutoscaler", "kvclip")
    pods_metric = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Pods")["pods"]["metric"]["name"]
    assert rule["name"]["as"] == pods_metric
    assert re.fullmatch(rule["name"]["matches"], "kvclip_http_requests_total")
    assert rule["seriesQuery"].startswith("kvclip_http_requests_total{")
    assert re.search(r"rate\(<<\.Series>>\{<<\.LabelMatchers>>.*\}\[1m\]\)", rule["metricsQuery"])
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    # The counter the rule reads is the one the server exports (prometheus adds _total).
    from kvclip.service.metrics import Metrics

    metrics = Metrics()
    metrics.requests.labels(method="POST", route="/v1/classify", status="200").inc()
    assert 'kvclip_http_requests_total{method="POST",route="/v1/classify",status="200"} 1.0' in metrics.render().decode()
