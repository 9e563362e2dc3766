"""deploy/k8s/components/gpu-worker: added to every overlay, it renders, validates against the Kubernetes
schema, and gives the workers (only them) the CUDA image, one GPU each and the cuda device.

There is no cluster or GPU node where the tests run: `kubectl kustomize` renders an overlay made in a
temporary folder (each shipped overlay plus the component) and `kubernetes-validate` checks the objects.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.settings import Settings
from tests.conftest import REPO_ROOT, missing_service
from tests.deploy.conftest import Dockerfile

K8S = REPO_ROOT / "deploy" / "k8s"
COMPONENT = K8S / "components" / "gpu-worker"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}
GPU_RESOURCE = "nvidia.com/gpu"
CUDA_TARGET = "worker-cuda"
# The worker's device setting (issue 14); see the same constant in test_dockerfile.py.
DEVICE_VARIABLE = "FMNIST_DEVICE"


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing_service("kubectl not found; run `apt-get install kubectl`")
    assert kubectl is not None
    out = subprocess.run(
        [kubectl, "kustomize", str(folder)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_with_gpu(overlay: str | None, tmp_path: Path) -> list[dict[str, Any]]:
    """The overlay (or None: nothing) plus the gpu-worker component, rendered from a temporary kustomization."""
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        # kustomize refuses absolute paths here.
        "resources": [os.path.relpath(K8S / "overlays" / overlay, tmp_path)] if overlay else [],
        "components": [os.path.relpath(COMPONENT, tmp_path)],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(tmp_path)


def deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_overlay_validates_against_the_kubernetes_schema(overlay: str, tmp_path: Path) -> None:
    """Every core object of an overlay with the gpu-worker component passes strict schema validation."""
    docs = render_with_gpu(overlay, tmp_path)
    core = [doc for doc in docs if doc["kind"] not in CUSTOM_KINDS]
    assert "fmnist-worker" in deployments(docs)
    for doc in core:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_component_gives_workers_one_gpu_and_the_cuda_image(
    overlay: str, tmp_path: Path
) -> None:
    """Workers get the worker-cuda image, a limit of one nvidia.com/gpu, FMNIST_DEVICE=cuda and the GPU taint's toleration."""
    worker = deployments(render_with_gpu(overlay, tmp_path))["fmnist-worker"]
    container = only_container(worker)
    assert container["image"].rpartition(":")[2] == CUDA_TARGET
    assert container["resources"]["limits"][GPU_RESOURCE] == 1
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    assert env[DEVICE_VARIABLE] == "cuda"
    tolerations = worker["spec"]["template"]["spec"]["tolerations"]
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in tolerations


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_component_leaves_the_gateway_alone(overlay: str, tmp_path: Path) -> None:
    """The gateway Deployment renders the same with and without the component: no GPU, no CUDA image."""
    plain = deployments(kustomize(K8S / "overlays" / overlay))["fmnist-gateway"]
    assert deployments(render_with_gpu(overlay, tmp_path))["fmnist-gateway"] == plain


def test_gpu_component_needs_a_worker_to_patch(tmp_path: Path) -> None:
    """Alone, the component renders nothing: it patches the worker of an overlay and creates no objects."""
    with pytest.raises(subprocess.CalledProcessError) as failure:
        render_with_gpu(None, tmp_path)
    assert "fmnist-worker" in failure.value.stderr


def test_gpu_image_tag_is_a_dockerfile_target_with_the_cuda_device(
    dockerfile: Dockerfile, tmp_path: Path
) -> None:
    """The image tag the component names is the Dockerfile's CUDA worker, whose ENV sets the same device."""
    worker = deployments(render_with_gpu(OVERLAYS[0], tmp_path))["fmnist-worker"]
    target = only_container(worker)["image"].rpartition(":")[2]
    assert target in dockerfile.stages
    assert dockerfile.env(target)[DEVICE_VARIABLE] == "cuda"


def test_gpu_worker_variables_are_settings_or_the_device(tmp_path: Path) -> None:
    """Every FMNIST_* variable the component adds is a setting, FMNIST_DEVICE included once it is a field."""
    known = {f"FMNIST_{name.upper()}" for name in Settings.model_fields} | {DEVICE_VARIABLE}
    worker = deployments(render_with_gpu(OVERLAYS[0], tmp_path))["fmnist-worker"]
    names = {v["name"] for v in only_container(worker)["env"] if v["name"].startswith("FMNIST_")}
    assert names <= known, sorted(names - known)
