"""docker-compose.yml agrees with the settings, the CLI, the Dockerfile's targets and itself.

Docker cannot run where the tests run: these tests read the compose file as `docker compose` would
(interpolation included) and check it against the real settings class and CLI parser.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shlex
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from app.settings import Settings
from tests.deploy.conftest import (
    Dockerfile,
    assert_valid_cli_command,
    build_target,
    exec_form,
    our_services,
)

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


def service_command(service: dict[str, Any], dockerfile: Dockerfile) -> list[str]:
    """What the container runs: the compose `command`, else the target's CMD."""
    command = service.get("command")
    if command is None:
        cmd = dockerfile.last(build_target(service), "CMD")
        assert cmd is not None, "the service has no command and its target no CMD"
        return exec_form(cmd)
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


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
            url = urlsplit(service_environment(service, {})["FMNIST_BROKER_URL"])
            partitions.add(int(dict(parse_qsl(url.query)).get("partitions", "4")))
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
