"""deploy/k8s: every overlay renders with kustomize, validates against the Kubernetes schema, and agrees
with the settings, the routes, the metrics and the broker's naming.

There is no cluster where the tests run: `kubectl kustomize` renders the manifests and
`kubernetes-validate` checks the core objects against the Kubernetes API schema. The custom resources
(KEDA ScaledObject and TriggerAuthentication, Prometheus Operator ServiceMonitor) have no schema there,
so the tests below check the fields that matter for them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import kubernetes_validate
import pytest
import yaml

from app.gateway.metrics import GatewayMetrics
from app.protocol import requests_topic_for, worker_group_for
from app.settings import Settings
from tests.conftest import REPO_ROOT, missing_service
from tests.gateway.helpers import gateway_settings, running_gateway

K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
KAFKA_OVERLAYS = [name for name in OVERLAYS if name.startswith("kafka")]
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing_service("kubectl not found; run `apt-get install kubectl`")
    assert kubectl is not None
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def deployment(docs: tuple[dict[str, Any], ...], name: str) -> dict[str, Any]:
    (found,) = [doc for doc in of_kind(docs, "Deployment") if doc["metadata"]["name"] == name]
    return found


def container_env(docs: tuple[dict[str, Any], ...], name: str) -> dict[str, str]:
    """The FMNIST_* variables one Deployment's container gets: its env plus its envFrom ConfigMaps."""
    (container,) = deployment(docs, name)["spec"]["template"]["spec"]["containers"]
    config_maps = {
        doc["metadata"]["name"]: doc.get("data", {}) for doc in of_kind(docs, "ConfigMap")
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "<from a reference>")
    return env


def test_there_are_overlays_for_kafka_and_pubsub() -> None:
    """Kafka (KEDA and HPA) and Pub/Sub overlays exist."""
    assert {"kafka", "kafka-hpa", "pubsub"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_against_the_kubernetes_schema(overlay: str) -> None:
    """Every core object of the rendered overlay passes strict schema validation."""
    docs = render(overlay)
    core = [doc for doc in docs if doc["kind"] not in CUSTOM_KINDS]
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap"} <= {
        d["kind"] for d in core
    }
    for doc in core:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_fmnist_variable_is_a_setting(overlay: str) -> None:
    """A typo in an FMNIST_* variable would be silently ignored by the service: every one is a field."""
    known = {f"FMNIST_{name.upper()}" for name in Settings.model_fields}
    docs = render(overlay)
    for name in ("fmnist-gateway", "fmnist-worker"):
        variables = {key for key in container_env(docs, name) if key.startswith("FMNIST_")}
        assert variables, name
        assert variables <= known, (name, sorted(variables - known))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_may_outlast_their_drain(overlay: str) -> None:
    """A worker's grace period is longer than the request deadline that bounds its drain."""
    docs = render(overlay)
    env = container_env(docs, "fmnist-worker")
    deadline = float(
        env.get("FMNIST_REQUEST_DEADLINE_S", Settings.model_fields["request_deadline_s"].default)
    )
    grace = deployment(docs, "fmnist-worker")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert grace > deadline + 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_requests_resources_and_has_probes(overlay: str) -> None:
    """Each container asks for CPU and memory and has readiness and liveness probes."""
    for doc in of_kind(render(overlay), "Deployment"):
        for container in doc["spec"]["template"]["spec"]["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "readinessProbe" in container and "livenessProbe" in container


async def test_gateway_probes_name_routes_the_gateway_serves() -> None:
    """The gateway's probe paths answer 200 on a running gateway, on the port the container listens on."""
    docs = render("kafka")
    (container,) = deployment(docs, "fmnist-gateway")["spec"]["template"]["spec"]["containers"]
    async with running_gateway(gateway_settings()) as (_, client):
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            answer = await client.get(container[probe]["httpGet"]["path"])
            assert answer.status_code == 200, (probe, answer.status_code)
    port = int(container_env(docs, "fmnist-gateway")["FMNIST_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port]


def test_worker_probes_use_the_worker_health_port() -> None:
    """The worker's probes go to the port its FMNIST_WORKER_HEALTH_PORT opens."""
    docs = render("kafka")
    (container,) = deployment(docs, "fmnist-worker")["spec"]["template"]["spec"]["containers"]
    port = int(container_env(docs, "fmnist-worker")["FMNIST_WORKER_HEALTH_PORT"])
    (declared,) = container["ports"]
    assert declared["containerPort"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == declared["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_select_running_pods(overlay: str) -> None:
    """Each PodDisruptionBudget selects the pods of one Deployment."""
    docs = render(overlay)
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs, "Deployment")]
    budgets = of_kind(docs, "PodDisruptionBudget")
    assert len(budgets) == 2
    for budget in budgets:
        wanted = budget["spec"]["selector"]["matchLabels"].items()
        assert sum(wanted <= labels.items() for labels in pod_labels) == 1


@pytest.mark.parametrize("overlay", KAFKA_OVERLAYS)
def test_autoscaling_never_exceeds_the_partitions(overlay: str) -> None:
    """Workers beyond the requests topic's partitions would idle: the autoscaler's maximum is capped."""
    docs = render(overlay)
    url = urlsplit(container_env(docs, "fmnist-worker")["FMNIST_BROKER_URL"])
    partitions = int(dict(parse_qsl(url.query))["partitions"])
    maxima = [d["spec"]["maxReplicaCount"] for d in of_kind(docs, "ScaledObject")]
    maxima += [d["spec"]["maxReplicas"] for d in of_kind(docs, "HorizontalPodAutoscaler")]
    assert len(maxima) == 1
    assert 1 <= maxima[0] <= partitions


def test_keda_watches_the_workers_group_on_the_requests_topic() -> None:
    """The Kafka lag trigger names the consumer group and topic the workers use."""
    docs = render("kafka")
    (scaled,) = of_kind(docs, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    settings = Settings()
    assert trigger["type"] == "kafka"
    # The deployed worker serves the shipped checkpoint, a model named after its file: fmnist.
    assert trigger["metadata"]["consumerGroup"] == worker_group_for(settings.worker_group, "fmnist")
    assert trigger["metadata"]["topic"] == requests_topic_for(settings.requests_topic, "fmnist")
    broker_url = container_env(docs, "fmnist-worker")["FMNIST_BROKER_URL"]
    assert (
        broker_url.removeprefix("kafka://").split("?")[0] == trigger["metadata"]["bootstrapServers"]
    )
    assert scaled["spec"]["scaleTargetRef"]["name"] == "fmnist-worker"


def test_keda_watches_the_workers_subscription_on_pubsub() -> None:
    """The Pub/Sub backlog trigger names the subscription the gcp backend creates for the workers."""
    docs = render("pubsub")
    (scaled,) = of_kind(docs, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    settings = Settings()
    assert trigger["type"] == "gcp-pubsub"
    # messaging/gcp.py names a group's subscription "<topic>.<group>".
    topic = requests_topic_for(settings.requests_topic, "fmnist")
    group = worker_group_for(settings.worker_group, "fmnist")
    assert trigger["metadata"]["subscriptionName"] == f"{topic}.{group}"
    (auth,) = of_kind(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_the_service_monitor_scrapes_the_gateways_metrics() -> None:
    """The ServiceMonitor selects the gateway Service and scrapes /metrics on its named port."""
    docs = render("kafka")
    (monitor,) = of_kind(docs, "ServiceMonitor")
    (service,) = of_kind(docs, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}


def test_the_dashboard_queries_only_metrics_the_gateway_exports() -> None:
    """Every metric the Grafana dashboard plots is one the gateway's /metrics exposes."""
    docs = render("kafka")
    (config_map,) = [
        d
        for d in of_kind(docs, "ConfigMap")
        if d["metadata"].get("labels", {}).get("grafana_dashboard")
    ]
    dashboard = json.loads(config_map["data"]["fmnist-dashboard.json"])
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {
        family.name + suffix
        for family in GatewayMetrics(in_flight=lambda: 0).registry.collect()
        for suffix in suffixes[family.type]
    }
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= {word for word in _identifiers(target["expr"]) if word.startswith("fmnist_")}
    assert queried
    assert queried <= exported, sorted(queried - exported)


def _identifiers(expr: str) -> set[str]:
    return set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", expr))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateways_take_the_shared_state_url_from_an_optional_secret(overlay: str) -> None:
    """Every overlay's gateway reads FMNIST_SHARED_STATE_URL from a Secret that may be absent (one gateway)."""
    (gateway,) = [
        doc
        for doc in render(overlay)
        if doc["kind"] == "Deployment" and "gateway" in doc["metadata"]["name"]
    ]
    env = {
        item["name"]: item for item in gateway["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    reference = env["FMNIST_SHARED_STATE_URL"]["valueFrom"]["secretKeyRef"]
    assert reference["optional"] is True
