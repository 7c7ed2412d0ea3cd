"""Static checks of deploy/k8s/: no cluster needed.

Every built-in resource is validated, strictly (unknown fields refused), against the Kubernetes
OpenAPI schemas that kubernetes-validate ships; KEDA's ScaledObject and TriggerAuthentication
against the openAPIV3Schema of KEDA's own CRDs (vendored in tests/schemas/keda/, see its README),
with unknown fields refused as ``kubectl apply --validate=strict`` does. Then the wiring: one
GPU per worker pod, probes on the metrics port, the grace period derived from
VQA_SHUTDOWN_GRACE_S, KEDA scaling the worker Deployment to zero on the queue's lists with the
Redis password from its Secret, selectors that match, persistence for Redis and MinIO.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from producer import keys

pytestmark = pytest.mark.timeout(60)

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KEDA_CRDS = Path(__file__).resolve().parent / "schemas" / "keda"
KUBERNETES_VERSION = "1.37.0"  # the newest schema set kubernetes-validate ships (kubernetes_validate.latest_version())
KEDA_KINDS = {"ScaledObject": "keda.sh_scaledobjects.yaml", "TriggerAuthentication": "keda.sh_triggerauthentications.yaml"}


def _documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


DOCS = list(_documents())


def _one(kind: str, name: str) -> dict[str, Any]:
    [doc] = [doc for _, doc in DOCS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return doc


def _crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((KEDA_CRDS / KEDA_KINDS[kind]).read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def _unknown_fields(doc: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare (a structural schema would prune them silently: a typo would go unnoticed)."""
    if isinstance(doc, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") or "properties" not in schema:
            values = schema.get("additionalProperties")
            if isinstance(values, dict):
                return [bad for key, value in doc.items() for bad in _unknown_fields(value, values, f"{path}.{key}")]
            return []
        found = []
        for key, value in doc.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += _unknown_fields(value, schema["properties"][key], f"{path}.{key}")
        return found
    if isinstance(doc, list) and isinstance(schema.get("items"), dict):
        return [bad for n, item in enumerate(doc) for bad in _unknown_fields(item, schema["items"], f"{path}[{n}]")]
    return []


def test_the_kustomization_lists_every_file() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == "vqa"


@pytest.mark.parametrize(("path", "doc"), [item for item in DOCS if item[1]["kind"] not in KEDA_KINDS],
                         ids=lambda value: value if isinstance(value, str) else f"{value['kind']}/{value['metadata']['name']}")
def test_builtin_resources_match_the_kubernetes_schemas(path: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kind", sorted(KEDA_KINDS))
def test_keda_resources_match_kedas_crd_schema(kind: str) -> None:
    schema = _crd_schema(kind)
    docs = [doc for _, doc in DOCS if doc["kind"] == kind]
    assert docs
    for doc in docs:
        jsonschema.validate(doc, schema)
        assert _unknown_fields(doc, schema) == []
    broken = {**docs[0], "spec": {**docs[0]["spec"], "minReplicaCount": "zero"}} if kind == "ScaledObject" else None
    if broken is not None:  # the validator does reject what is wrong
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)
        assert _unknown_fields({**docs[0], "spec": {**docs[0]["spec"], "minReplicas": 0}}, schema) == [".spec.minReplicas"]


def test_workers_get_one_gpu_probes_and_a_grace_period_beyond_the_shutdown_grace() -> None:
    config = _one("ConfigMap", "vqa-config")["data"]
    pod = _one("Deployment", "vqa-worker")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["resources"]["requests"]["nvidia.com/gpu"] == 1
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["metrics"] == int(config["VQA_METRICS_PORT"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # the first download and load of the 7B model
    # The kubelet's SIGKILL comes after terminationGracePeriodSeconds: the warm shutdown must fit, with a margin.
    assert pod["terminationGracePeriodSeconds"] == float(config["VQA_SHUTDOWN_GRACE_S"]) + 30
    env = {item["name"]: item for item in container["env"]}
    assert env["VQA_BROKER_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
    assert list(env).index("REDIS_PASSWORD") < list(env).index("VQA_BROKER_URL")  # $(VAR) expands only from earlier entries
    assert env["VQA_WORKER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_keda_scales_the_worker_deployment_to_zero_on_every_lane_with_the_redis_password() -> None:
    scaled = _one("ScaledObject", "vqa-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "vqa-worker" and _one("Deployment", "vqa-worker")
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] >= 1
    queue = _one("ConfigMap", "vqa-config")["data"]["VQA_QUEUE"]
    triggers = scaled["triggers"]
    assert {t["type"] for t in triggers} == {"redis"}
    assert [t["metadata"]["listName"] for t in triggers] == keys.priority_queue_keys(queue)
    assert all(t["metadata"]["activationListLength"] == "0" and int(t["metadata"]["listLength"]) > 0 for t in triggers)
    service = _one("Service", "redis")
    for trigger in triggers:
        host, port = trigger["metadata"]["address"].split(":")
        assert host.split(".")[:2] == [service["metadata"]["name"], "vqa"] and int(port) == service["spec"]["ports"][0]["port"]
        auth = _one("TriggerAuthentication", trigger["authenticationRef"]["name"])
        [ref] = auth["spec"]["secretTargetRef"]
        assert ref["parameter"] == "password" and ref["key"] in _one("Secret", ref["name"])["stringData"]
    redis_args = _one("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis_args[redis_args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"


def test_selectors_match_and_services_reach_their_pods() -> None:
    workloads = [doc for _, doc in DOCS if doc["kind"] in ("Deployment", "StatefulSet")]
    for doc in workloads:
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), doc["metadata"]["name"]
    for _, service in ((p, d) for p, d in DOCS if d["kind"] == "Service"):
        [target] = [w for w in workloads if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        port_names = {port["name"] for c in target["spec"]["template"]["spec"]["containers"] for port in c.get("ports", [])}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names, service["metadata"]["name"]
    api = _one("Deployment", "vqa-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["args"][0] == "api" and api["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_redis_and_minio_keep_their_data() -> None:
    for name in ("redis", "minio"):
        sts = _one("StatefulSet", name)["spec"]
        [claim] = sts["volumeClaimTemplates"]
        mounts = sts["template"]["spec"]["containers"][0]["volumeMounts"]
        assert any(mount["name"] == claim["metadata"]["name"] for mount in mounts)
    args = _one("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--appendfsync") + 1] == "always"


def test_the_kubernetes_validator_refuses_a_misspelt_field() -> None:
    worker = _one("Deployment", "vqa-worker")
    container = {**worker["spec"]["template"]["spec"]["containers"][0], "livenessProb": {}}
    broken = {**worker, "spec": {**worker["spec"], "template": {**worker["spec"]["template"],
              "spec": {**worker["spec"]["template"]["spec"], "containers": [container]}}}}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenessProb"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
