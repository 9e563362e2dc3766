"""Deployment files: docker-compose.yml, the Dockerfile and .dockerignore agree with the settings,
the CLI, the dependencies and each other.

Docker cannot run where the tests run, so these tests read the files and execute the parts that can
run without Docker: the Dockerfile's requirement splitter, its HEALTHCHECK command, and the gateway
code path with only the gateway image's packages importable.
"""

from __future__ import annotations

import base64
import binascii
import http.server
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.cli import build_parser
from app.settings import Settings
from tests.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
PYPROJECT = REPO_ROOT / "pyproject.toml"
MAKEFILE = REPO_ROOT / "Makefile"

# The heredoc in the builder stage that derives each image's requirements from pyproject.toml.
REQUIREMENTS_SCRIPT = "/build/requirements_for_image.py"
GATEWAY_TARGET = "gateway"


# --- Dockerfile reading ------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    value: str
    heredocs: dict[str, str] = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    global_args: list[Instruction]
    stages: dict[str, Stage]

    def chain(self, target: str) -> list[Stage]:
        """The stage and the stages it is built FROM, base first."""
        stages = [self.stages[target]]
        while stages[0].base in self.stages:
            stages.insert(0, self.stages[stages[0].base])
        return stages

    def last(self, target: str, keyword: str) -> Instruction | None:
        """The instruction that is in effect for `target` (the last one along its chain)."""
        found = None
        for stage in self.chain(target):
            for instruction in stage.instructions:
                if instruction.keyword == keyword:
                    found = instruction
        return found

    def arg_default(self, name: str) -> str:
        for instruction in [
            *self.global_args,
            *(i for s in self.stages.values() for i in s.instructions),
        ]:
            if instruction.keyword == "ARG" and instruction.value.startswith(f"{name}="):
                return instruction.value.partition("=")[2].strip().strip("\"'")
        raise AssertionError(f"the Dockerfile declares no ARG {name} with a default")

    def heredoc(self, target_path: str) -> str:
        for stage in self.stages.values():
            for instruction in stage.instructions:
                if instruction.keyword == "COPY" and instruction.value.split()[-1] == target_path:
                    return next(iter(instruction.heredocs.values()))
        raise AssertionError(f"the Dockerfile has no heredoc copied to {target_path}")


HEREDOC_START = re.compile(r"<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_]*)\2")


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions with continuations joined, comments dropped and heredoc bodies collected."""
    lines = text.splitlines()
    global_args: list[Instruction] = []
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    index = 0
    while index < len(lines):
        logical = lines[index].strip()
        index += 1
        if not logical or logical.startswith("#"):
            continue
        while logical.endswith("\\") and index < len(lines):
            continuation = lines[index].strip()
            index += 1
            if not continuation.startswith("#"):  # Docker drops comment lines inside a continuation
                logical = logical[:-1].rstrip() + " " + continuation
        keyword, _, value = logical.partition(" ")
        instruction = Instruction(keyword.upper(), value.strip())
        for strip_tabs, _, delimiter in HEREDOC_START.findall(value):
            body: list[str] = []
            while index < len(lines):
                line = lines[index].lstrip("\t") if strip_tabs else lines[index]
                index += 1
                if line == delimiter:
                    break
                body.append(line)
            instruction.heredocs[delimiter] = "\n".join(body) + "\n"
        if instruction.keyword == "FROM":
            words = [word for word in instruction.value.split() if not word.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            current = stages[name] = Stage(name=name, base=words[0])
        elif current is None:
            global_args.append(instruction)
        else:
            current.instructions.append(instruction)
    return Dockerfile(global_args=global_args, stages=stages)


def exec_form(instruction: Instruction, keyword: str = "") -> list[str]:
    """The argv of a CMD (or of `HEALTHCHECK ... CMD [...]`), which must use the JSON exec form."""
    value = instruction.value
    if keyword:
        value = value[value.index(keyword) + len(keyword) :].strip()
    assert value.startswith("["), (
        f"{instruction.keyword} should use the exec form: {instruction.value}"
    )
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(arg, str) for arg in argv)
    return argv


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


# --- compose reading ---------------------------------------------------------------------------

INTERPOLATION = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, environment: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$VAR` and `$$`, as `docker compose` reads them."""

    def substitute(match: re.Match[str]) -> str:
        escaped, braced, operator, default, bare = match.groups()
        if escaped:
            return "$"
        name = braced or bare
        current = environment.get(name)
        if operator == ":-" and not current:
            return default
        if operator == "-" and current is None:
            return default
        return current or ""

    if re.search(r"\$\{[^}]*:?\?", value):
        raise AssertionError(
            f"{value!r}: required variables (`${{VAR?}}`) make `docker compose up` fail"
        )
    return INTERPOLATION.sub(substitute, value)


def service_environment(
    service: dict[str, Any], host_environment: dict[str, str]
) -> dict[str, str]:
    """The variables a container gets, from the map or the `KEY=VALUE` list form."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {key: interpolate(str(value), host_environment) for key, value in raw.items()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict) and document.get("services"), (
        "docker-compose.yml has no services"
    )
    return document


def our_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from this repository's Dockerfile (not Kafka)."""
    return {name: service for name, service in compose["services"].items() if "build" in service}


def build_target(service: dict[str, Any]) -> str:
    build = service["build"]
    assert isinstance(build, dict) and build.get("target"), (
        f"build {build!r} names no Dockerfile target"
    )
    assert Path(REPO_ROOT / build.get("context", ".")).resolve() == REPO_ROOT
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
    return str(build["target"])


def service_command(service: dict[str, Any], dockerfile: Dockerfile) -> list[str]:
    """What the container runs: the compose `command`, else the target's CMD."""
    command = service.get("command")
    if command is None:
        cmd = dockerfile.last(build_target(service), "CMD")
        assert cmd is not None, "the service has no command and its target no CMD"
        return exec_form(cmd)
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def assert_valid_cli_command(argv: list[str]) -> None:
    assert argv and argv[0] == "fmnist", f"{argv} does not start the fmnist CLI"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exit_:
        raise AssertionError(
            f"`{shlex.join(argv)}` is not a valid fmnist command (argparse exit {exit_.code})"
        ) from None
    assert callable(getattr(args, "func", None)), (
        f"`{shlex.join(argv)}` selects no sub-command function"
    )


# --- compose file ------------------------------------------------------------------------------


def test_compose_build_targets_exist_in_dockerfile(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    """Every service built here names a stage of the Dockerfile as its target."""
    services = our_services(compose)
    assert services, "no service is built from this repository"
    for name, service in services.items():
        assert build_target(service) in dockerfile.stages, (
            f"service {name}: no stage {build_target(service)!r}"
        )


def test_compose_services_are_configured_only_through_fmnist_variables(
    compose: dict[str, Any],
) -> None:
    """Services built here get no environment variable outside the FMNIST_ settings."""
    for name, service in our_services(compose).items():
        others = [key for key in service_environment(service, {}) if not key.startswith("FMNIST_")]
        assert not others, f"service {name} sets non-FMNIST_ variables: {others}"


def test_compose_fmnist_variables_name_real_settings(compose: dict[str, Any]) -> None:
    """Every FMNIST_* variable of every service is `FMNIST_<field>` of `app.settings.Settings`."""
    fields = {f"FMNIST_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        unknown = sorted(
            key
            for key in service_environment(service, {})
            if key.startswith("FMNIST_") and key not in fields
        )
        assert not unknown, f"service {name}: {unknown} are not settings (known: {sorted(fields)})"


@pytest.mark.parametrize(
    "host_environment", [{}, {"FMNIST_API_KEYS": "key-one,key-two", "FMNIST_LOG_LEVEL": "DEBUG"}]
)
def test_compose_environment_validates_as_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, host_environment: dict[str, str]
) -> None:
    """Each service's environment, as compose interpolates it, builds a valid `Settings` from the environment."""
    for name, service in our_services(compose).items():
        for key in [key for key in os.environ if key.startswith("FMNIST_")]:
            monkeypatch.delenv(key)
        environment = service_environment(service, host_environment)
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        for key in host_environment:
            if key in environment:
                assert key.removeprefix("FMNIST_").lower() in settings.model_fields_set, (
                    f"service {name}: {key} ignored"
                )


def test_compose_commands_are_cli_commands(compose: dict[str, Any], dockerfile: Dockerfile) -> None:
    """Every service built here runs a real `fmnist` sub-command with arguments the CLI accepts."""
    for service in our_services(compose).values():
        assert_valid_cli_command(service_command(service, dockerfile))


def test_compose_healthy_dependencies_have_healthchecks(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    """A `condition: service_healthy` dependency has a healthcheck, in compose or in its image target."""
    services = compose["services"]
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), (
            f"service {name}: use the long depends_on form with conditions"
        )
        for dependency, condition in depends_on.items():
            assert dependency in services, f"service {name} depends on unknown service {dependency}"
            if condition.get("condition") != "service_healthy":
                continue
            target = services[dependency]
            check = target.get("healthcheck")
            if check is None and "build" in target:
                image_check = dockerfile.last(build_target(target), "HEALTHCHECK")
                check = (
                    None
                    if image_check is None or image_check.value == "NONE"
                    else image_check.value
                )
            assert check and not (isinstance(check, dict) and check.get("disable")), (
                f"{dependency} has no healthcheck"
            )


def test_compose_broker_url_reaches_an_advertised_kafka_listener(compose: dict[str, Any]) -> None:
    """`FMNIST_BROKER_URL` names a compose service and a listener that service advertises."""
    services = compose["services"]
    for name, service in our_services(compose).items():
        url = service_environment(service, {}).get("FMNIST_BROKER_URL", "memory://")
        assert url.startswith("kafka://"), f"service {name}: broker {url} is not the compose Kafka"
        for address in url.removeprefix("kafka://").partition("?")[0].split(","):
            host, _, port = address.partition(":")
            assert host in services, f"service {name}: broker host {host} is not a compose service"
            advertised = service_environment(services[host], {}).get(
                "KAFKA_ADVERTISED_LISTENERS", ""
            )
            assert f"//{host}:{port}" in advertised, (
                f"{host} does not advertise {address}: {advertised}"
            )


def test_compose_services_agree_on_broker_settings(compose: dict[str, Any]) -> None:
    """Gateway and workers use the same broker URL, topics and partition count."""
    shared = (
        "FMNIST_BROKER_URL",
        "FMNIST_KAFKA_PARTITIONS",
        "FMNIST_REQUESTS_TOPIC",
        "FMNIST_RESULTS_TOPIC",
        "FMNIST_DEADLETTER_TOPIC",
    )
    views = {
        name: tuple(service_environment(service, {}).get(key) for key in shared)
        for name, service in our_services(compose).items()
    }
    assert len(set(views.values())) == 1, f"services disagree on {shared}: {views}"


def test_compose_partitions_cover_worker_replicas(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    """There are at least as many partitions as workers, or the extra workers would sit idle."""
    workers = 0
    partitions: set[int] = set()
    for service in our_services(compose).values():
        if service_command(service, dockerfile)[1:2] == ["worker"]:
            workers += int((service.get("deploy") or {}).get("replicas", 1))
            partitions.add(
                int(
                    service_environment(service, {}).get(
                        "FMNIST_KAFKA_PARTITIONS", Settings.model_fields["kafka_partitions"].default
                    )
                )
            )
    assert workers >= 2, "the compose file should run at least two workers"
    assert partitions and min(partitions) >= workers, (
        f"{workers} workers but partitions {partitions}"
    )


def test_compose_kafka_cluster_id_is_a_base64_uuid(compose: dict[str, Any]) -> None:
    """Kafka's CLUSTER_ID is 16 bytes in URL-safe base64, as `kafka-storage.sh format` requires."""
    kafka_services = [
        s
        for s in compose["services"].values()
        if str(s.get("image", "")).startswith("apache/kafka")
    ]
    assert kafka_services, "no apache/kafka service"
    for service in kafka_services:
        cluster_id = service_environment(service, {})["CLUSTER_ID"]
        try:
            raw = base64.urlsafe_b64decode(cluster_id + "=" * (-len(cluster_id) % 4))
        except binascii.Error:
            raw = b""
        assert len(cluster_id) == 22 and len(raw) == 16, (
            f"CLUSTER_ID {cluster_id!r} is not a base64url UUID"
        )


# --- Dockerfile --------------------------------------------------------------------------------


def runtime_targets(compose: dict[str, Any], dockerfile: Dockerfile) -> set[str]:
    """The targets users run: those compose builds and the default (last) stage."""
    return {build_target(s) for s in our_services(compose).values()} | {list(dockerfile.stages)[-1]}


def test_dockerfile_targets_run_as_non_root(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    """Every runnable target ends with a USER that is not root."""
    for target in runtime_targets(compose, dockerfile):
        user = dockerfile.last(target, "USER")
        assert user is not None, f"target {target} runs as root (no USER)"
        assert user.value.partition(":")[0] not in ("root", "0"), (
            f"target {target} runs as {user.value}"
        )


def test_dockerfile_commands_are_cli_commands(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    """Every runnable target's CMD is a real `fmnist` sub-command."""
    for target in runtime_targets(compose, dockerfile):
        cmd = dockerfile.last(target, "CMD")
        assert cmd is not None, f"target {target} has no CMD"
        assert_valid_cli_command(exec_form(cmd))


def http_targets(compose: dict[str, Any], dockerfile: Dockerfile) -> list[str]:
    """Targets whose command serves HTTP (`gateway`, `serve`)."""
    targets = []
    for target in sorted(runtime_targets(compose, dockerfile)):
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
    """Every FMNIST_* ENV default in the Dockerfile is a setting and validates."""
    fields = {f"FMNIST_{name.upper()}" for name in Settings.model_fields}
    defaults: dict[str, str] = {}
    for stage in dockerfile.stages.values():
        for instruction in stage.instructions:
            if instruction.keyword == "ENV":
                for assignment in shlex.split(instruction.value):
                    key, _, value = assignment.partition("=")
                    if key.startswith("FMNIST_"):
                        defaults[key] = value
    assert defaults, "the Dockerfile sets no FMNIST_ defaults"
    assert set(defaults) <= fields, f"not settings: {sorted(set(defaults) - fields)}"
    for key, value in defaults.items():
        monkeypatch.setenv(key, value)
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
    match = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", MAKEFILE.read_text(), re.MULTILINE)
    assert match, "the Makefile no longer pins TORCH_SPEC ?= torch==X"
    assert dockerfile.arg_default("TORCH_VERSION") == match.group(1)


# --- the gateway image without torch -----------------------------------------------------------


def image_requirements(
    dockerfile: Dockerfile, tmp_path: Path, *excluded: str
) -> subprocess.CompletedProcess[str]:
    """Run the Dockerfile's own requirement splitter on this repository's pyproject.toml."""
    script = tmp_path / "requirements_for_image.py"
    script.write_text(dockerfile.heredoc(REQUIREMENTS_SCRIPT))
    argv = [
        sys.executable,
        str(script),
        str(PYPROJECT),
        dockerfile.arg_default("EXTRAS"),
        *excluded,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def gateway_requirements(dockerfile: Dockerfile, tmp_path: Path) -> list[Requirement]:
    result = image_requirements(dockerfile, tmp_path, *dockerfile.arg_default("MODEL_ONLY").split())
    assert result.returncode == 0, result.stderr
    return [Requirement(line) for line in result.stdout.splitlines() if line.strip()]


def test_gateway_requirements_leave_out_torch(dockerfile: Dockerfile, tmp_path: Path) -> None:
    """The gateway image's requirement list has the web stack and the broker clients but not torch."""
    names = {
        canonicalize_name(requirement.name)
        for requirement in gateway_requirements(dockerfile, tmp_path)
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
    dockerfile: Dockerfile, tmp_path: Path
) -> None:
    """Excluding a name that is not a project dependency fails the build instead of passing silently."""
    result = image_requirements(dockerfile, tmp_path, "torch", "not-a-dependency")
    assert result.returncode != 0
    assert "not-a-dependency" in result.stderr


def test_gateway_stage_installs_nothing_from_torch(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
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
    dockerfile: Dockerfile, tmp_path: Path
) -> None:
    """The gateway app, the CLI and the broker backends import with every package outside the gateway image blocked."""
    # The project itself, and what `python -m venv` puts in every virtualenv, are in the image too.
    image_extras = {canonicalize_name("fmnist-service"), "pip", "setuptools"}
    allowed = requirement_closure(gateway_requirements(dockerfile, tmp_path)) | image_extras
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


# --- .dockerignore -----------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line, in order, with Docker's glob rules (`**` crosses folders)."""
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.removeprefix("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]*\])", glob):
            if token == "**/":
                regex += "(?:.*/)?"
            elif token == "**":
                regex += ".*"
            elif token == "*":
                regex += "[^/]*"
            elif token == "?":
                regex += "[^/]"
            elif token.startswith("["):
                regex += token
            else:
                regex += re.escape(token)
        patterns.append((negated, re.compile(regex + r"\Z")))
    return patterns


def excluded_from_context(path: str) -> bool:
    """Whether Docker leaves `path` (relative, with /) out of the build context."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, pattern in dockerignore_patterns():
        if any(pattern.match(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def context_sources(dockerfile: Dockerfile) -> list[str]:
    """Paths the Dockerfile COPYs from the build context."""
    sources = []
    for stage in dockerfile.stages.values():
        for instruction in stage.instructions:
            if instruction.keyword in ("COPY", "ADD") and not instruction.heredocs:
                words = [w for w in shlex.split(instruction.value) if not w.startswith("--")]
                if "--from" not in instruction.value:
                    sources += words[:-1]
    return sources


def test_dockerignore_admits_every_copied_path(dockerfile: Dockerfile) -> None:
    """Every path the Dockerfile copies from the context, and each tracked file under it, is in the context."""
    sources = context_sources(dockerfile)
    assert {"pyproject.toml", "app/", "models/"} <= set(sources)
    for source in sources:
        assert not excluded_from_context(source), (
            f".dockerignore leaves out {source}, which the Dockerfile copies"
        )
        tracked = subprocess.run(
            ["git", "ls-files", "--", source],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        left_out = [path for path in tracked if excluded_from_context(path)]
        assert not left_out, f".dockerignore leaves out tracked files: {left_out[:5]}"


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "app/__pycache__/cli.cpython-311.pyc",
        ".env",
    ],
)
def test_dockerignore_keeps_local_state_out_of_the_context(path: str) -> None:
    """The virtualenv, git metadata, tests, byte code and .env files never reach the build context."""
    assert excluded_from_context(path)


# --- local installs: the Makefile's torch variant and the wheel's shipped model -----------------


def make_dry_run(*variables: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`make -n` of the install step into a fresh virtualenv path: prints the commands, runs none."""
    venv = tmp_path / "venv"
    argv = ["make", "-n", "-B", f"VENV={venv}", *variables, f"{venv}/.installed"]
    return subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False
    )


def torch_install_line(dry_run: subprocess.CompletedProcess[str]) -> str:
    assert dry_run.returncode == 0, dry_run.stderr
    lines = [
        line for line in dry_run.stdout.splitlines() if "pip install" in line and "torch==" in line
    ]
    assert len(lines) == 1, dry_run.stdout
    return lines[0]


def test_makefile_cpu_variant_takes_torch_from_the_cpu_index(tmp_path: Path) -> None:
    """`make run TORCH_VARIANT=cpu` installs torch with pip's --index-url set to PyTorch's CPU index."""
    line = torch_install_line(make_dry_run("TORCH_VARIANT=cpu", tmp_path=tmp_path))
    assert "--index-url https://download.pytorch.org/whl/cpu" in shlex.join(shlex.split(line))


def test_makefile_default_variant_takes_torch_from_the_configured_index(tmp_path: Path) -> None:
    """Without TORCH_VARIANT the torch install names no index, so pip's own configuration applies."""
    line = torch_install_line(make_dry_run(tmp_path=tmp_path))
    assert "--index-url" not in line and "--extra-index-url" not in line


def test_makefile_refuses_an_unknown_torch_variant(tmp_path: Path) -> None:
    """A misspelt TORCH_VARIANT stops make with a message naming the accepted values."""
    result = make_dry_run("TORCH_VARIANT=cuda", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "TORCH_VARIANT=cpu" in result.stderr


def test_dockerfile_torch_index_is_the_makefile_cpu_index(dockerfile: Dockerfile) -> None:
    """The images install torch from the same CPU-only index that `TORCH_VARIANT=cpu` uses."""
    match = re.search(r"^TORCH_CPU_INDEX_URL := (\S+)$", MAKEFILE.read_text(), re.MULTILINE)
    assert match, "the Makefile no longer sets TORCH_CPU_INDEX_URL := URL"
    assert dockerfile.arg_default("TORCH_INDEX_URL") == match.group(1)


# What the Dockerfile's builder stage copies before `pip wheel .` (links in ml/shipped/ need models/).
WHEEL_SOURCES = ["pyproject.toml", "README.md", "app", "ml", "messaging", "models"]


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from the paths the Dockerfile's builder copies (offline, venv's setuptools), unpacked.

    A copy, not the checkout: a stale build/ there would hide a file missing from the package data.
    """
    source = tmp_path_factory.mktemp("source")
    for path in WHEEL_SOURCES:
        if (REPO_ROOT / path).is_dir():
            shutil.copytree(
                REPO_ROOT / path,
                source / path,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
            )
        else:
            shutil.copy2(REPO_ROOT / path, source / path)
    wheel_dir = tmp_path_factory.mktemp("wheel")
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    build = subprocess.run(
        [*argv, "-w", str(wheel_dir), str(source)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("fmnist_service-*.whl")
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


@pytest.mark.parametrize("name", ["fmnist.safetensors", "fmnist.md"])
def test_wheel_carries_the_shipped_model(unpacked_wheel: Path, name: str) -> None:
    """The wheel holds the shipped checkpoint and its model card, byte for byte as in models/."""
    shipped = unpacked_wheel / "ml" / "shipped" / name
    assert shipped.is_file(), f"the wheel has no ml/shipped/{name}"
    assert shipped.read_bytes() == (REPO_ROOT / "models" / name).read_bytes()


def test_default_model_path_is_the_installed_checkpoint_outside_the_checkout(
    unpacked_wheel: Path, tmp_path: Path
) -> None:
    """From a directory without models/, the installed package's default FMNIST_MODEL_PATH is its own copy."""
    probe = "from app.settings import Settings; print(Settings().model_path.resolve())"
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("FMNIST_") and name != "PYTHONPATH"
    }
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**environment, "PYTHONPATH": str(unpacked_wheel)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (
        Path(result.stdout.strip()) == (unpacked_wheel / "ml/shipped/fmnist.safetensors").resolve()
    )
