"""HTTP benchmark: single-image POSTs at 64 connections against ours (memory, Kafka), LitServe and plain FastAPI.

    .venv/bin/python -m bench.http_single --duration 20            # all four, one after another
    .venv/bin/python -m bench.http_single --only ours-memory litserve

Every server gets the same request: `multipart/form-data` with one real Fashion-MNIST test PNG in
field `file` (rotating over 256 images), from the same load generator (`wrk`, one thread, C code,
so the client costs a fraction of a core), on the same checkpoint, one server at a time. Ours is
asked with `?wait=10` so a 200 carries the prediction, like the peers' answers. Reported: images/s
(200 answers / wall time), p50/p99 latency, and the CPU seconds spent by the server's processes and
by wrk during the run (the machine has 2 cores; both share them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.e2e and ml

from tests.brokers import with_url_option
from tests.e2e import processes
from tests.e2e.images import load_test_pngs
from tests.e2e.processes import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
WRK_SCRIPT = Path(__file__).with_name("wrk_report.lua")
PEERS = Path(__file__).with_name("peers")
BOUNDARY = "fmnistbenchboundary7d93a"
DATA_DIR = Path(os.environ.get("FMNIST_DATA_DIR", "/usr/share/datasets/fashion-mnist"))
START_TIMEOUT_S = 120.0
# The backend's own defaults: they fetch with a short wait while records flow, so Tansu's late answer
# to a waiting fetch no longer needs a URL option here (docs/benchmarks.md, "Where a Kafka round trip
# spends its time").
DEFAULT_KAFKA_OPTIONS = ""


# --- request bodies ------------------------------------------------------------------------------


def multipart_body(files: Sequence[bytes], field_name: str) -> bytes:
    """A multipart/form-data body with each PNG as a part named `field_name`."""
    parts = []
    for index, png in enumerate(files):
        parts.append(
            f"--{BOUNDARY}\r\n"
            f'Content-Disposition: form-data; name="{field_name}"; filename="image{index}.png"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + png
            + b"\r\n"
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def write_bodies(directory: Path, bodies: Sequence[bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index, body in enumerate(bodies):
        (directory / f"{index}.body").write_bytes(body)
    return directory


# --- measuring -----------------------------------------------------------------------------------


def group_cpu_seconds(process_groups: set[int]) -> float:
    """CPU seconds (user + system) used so far by every live process in the given process groups."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) in process_groups:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class LoadResult:
    """One wrk run against one server."""

    name: str
    seconds: float
    requests: int
    completed: int  # 200 answers
    images_per_request: int
    not_completed: int  # 202, 429/503, other statuses, socket errors
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_cpu_s: float
    client_cpu_s: float
    notes: str = ""

    @property
    def images_per_s(self) -> float:
        return self.completed * self.images_per_request / self.seconds

    @property
    def images_per_cpu_s(self) -> float:
        """Images per CPU-second the server's processes used: robust to other load on the machine."""
        return self.completed * self.images_per_request / max(self.server_cpu_s, 1e-9)

    def row(self) -> str:
        cores = 2.0
        return (
            f"| {self.name} | {self.images_per_s:,.0f} | {self.p50_ms:.1f} | {self.p99_ms:.1f} | "
            f"{self.not_completed} | {self.server_cpu_s / self.seconds / cores:.0%} | "
            f"{self.images_per_cpu_s:,.0f} | {self.client_cpu_s / self.seconds / cores:.0%} |"
        )


TABLE_HEADER = (
    "| server | images/s | p50 ms | p99 ms | non-200 | server CPU (of 2 cores) "
    "| images per server CPU-s | wrk CPU (of 2 cores) |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def run_wrk(
    url: str,
    path: str,
    bodies: Path,
    body_count: int,
    *,
    connections: int,
    duration_s: float,
    content_type: str = MULTIPART_TYPE,
) -> tuple[dict[str, int], float]:
    """Run wrk (one thread) against `url + path`; its WRK_JSON summary and its own CPU seconds."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: run `apt-get install wrk`")
    argv = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{duration_s:.0f}s",
        "--timeout",
        "30s",
        "-s",
        str(WRK_SCRIPT),
    ]
    argv += [f"{url}{path}", "--", path, str(bodies), str(body_count), content_type]
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
        # wait4 rather than wait: it also returns the child's own CPU usage.
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read()
    for line in output.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line.removeprefix("WRK_JSON ")), usage.ru_utime + usage.ru_stime
    raise RuntimeError(f"wrk printed no summary:\n{output}")


def measure(
    name: str,
    server: Server,
    bodies: Path,
    body_count: int,
    *,
    connections: int,
    duration_s: float,
    warmup_s: float,
    images_per_request: int = 1,
    profile_to: Path | None = None,
) -> LoadResult:
    """Warm the server up, then one measured wrk run with CPU accounting on both sides.

    With `profile_to`, py-spy samples the server's last process (the gateway, or `fmnist serve`)
    during the measured run and writes collapsed stacks there.
    """
    if warmup_s > 0:
        run_wrk(
            server.url,
            server.path,
            bodies,
            body_count,
            connections=connections,
            duration_s=warmup_s,
        )
    groups = {p.pid for p in server.processes if p.running()}
    profiler = (
        start_profiler(server.processes[-1].pid, duration_s, profile_to) if profile_to else None
    )
    cpu_before = group_cpu_seconds(groups)
    summary, client_cpu = run_wrk(
        server.url, server.path, bodies, body_count, connections=connections, duration_s=duration_s
    )
    if profiler is not None:
        profiler.wait(timeout=60)
    server_cpu = group_cpu_seconds(groups) - cpu_before
    seconds = summary["duration_us"] / 1e6
    not_completed = summary["requests"] - summary["completed"] + summary["socket_errors"]
    return LoadResult(
        name=name,
        seconds=seconds,
        requests=summary["requests"],
        completed=summary["completed"],
        images_per_request=images_per_request,
        not_completed=not_completed,
        p50_ms=summary["p50_us"] / 1000,
        p90_ms=summary["p90_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        server_cpu_s=server_cpu,
        client_cpu_s=client_cpu,
    )


def start_profiler(pid: int, duration_s: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy record (collapsed stacks, 200 Hz) of `pid` for `duration_s` seconds."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [py_spy, "record", "--pid", str(pid), "--duration", f"{duration_s:.0f}", "--rate", "200"]
    argv += ["--format", "raw", "--output", str(out), "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


IDLE_FRAMES = frozenset({"Condition.wait", "EpollSelector.select", "select", "sleep", "Event.wait"})


def summarize_profile(collapsed: Path, top: int = 25) -> str:
    """The functions holding the most samples, inclusive (anywhere on the stack) and exclusive (on top)."""
    inclusive: dict[str, int] = {}
    exclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = [_frame_name(frame) for frame in stack.split(";")]
        if frames[-1].split(" (")[0] in IDLE_FRAMES:
            continue  # a thread waiting for work, not spending CPU
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        exclusive[frames[-1]] = exclusive.get(frames[-1], 0) + count
    lines = [f"# {total} busy samples (threads waiting for work left out)"]
    for title, table in (("inclusive", inclusive), ("exclusive", exclusive)):
        lines.append(f"## {title}")
        for frame, count in sorted(table.items(), key=lambda item: -item[1])[:top]:
            lines.append(f"{count / max(total, 1):6.1%}  {frame}")
    return "\n".join(lines)


def _frame_name(frame: str) -> str:
    """`func (path/to/module.py:12)` → `func (module.py)`: lines split one function into many rows."""
    function, _, where = frame.partition(" (")
    return f"{function} ({where.rsplit('/', 1)[-1].split(':')[0]})" if where else function


# --- the servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    """A running server under test: its base URL, the path wrk posts to, and its processes."""

    url: str
    path: str
    processes: list[ManagedProcess] = field(default_factory=list)


@contextmanager
def running(*procs: ManagedProcess) -> Iterator[list[ManagedProcess]]:
    started: list[ManagedProcess] = []
    try:
        for proc in procs:
            started.append(proc.start())
        yield started
    finally:
        for proc in reversed(started):
            proc.stop()


@contextmanager
def ours_memory(checkpoint: Path, log_dir: Path, **env: str) -> Iterator[Server]:
    """`fmnist serve`: gateway + worker + memory broker in one process."""
    port = processes.free_port()
    settings = {"FMNIST_MODEL_PATH": str(checkpoint), "FMNIST_LOG_LEVEL": "WARNING", **env}
    serve = processes.fmnist(
        "serve", "serve", log_dir, settings, "--host", "127.0.0.1", "--port", str(port)
    )
    with running(serve):
        serve.wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=START_TIMEOUT_S)
        yield Server(f"http://127.0.0.1:{port}", "/v1/predictions?wait=10", [serve])


@contextmanager
def ours_kafka(
    checkpoint: Path,
    log_dir: Path,
    *,
    workers: int = 1,
    partitions: int = 4,
    options: str = DEFAULT_KAFKA_OPTIONS,
    **env: str,
) -> Iterator[Server]:
    """Tansu + `fmnist worker` × `workers` + `fmnist gateway`, each its own process.

    `options` is the broker URL's query string (e.g. `fetch_max_wait_ms=20`), see messaging/kafka.py.
    """
    broker_port, port = processes.free_port(), processes.free_port()
    broker_url = f"kafka://127.0.0.1:{broker_port}" + (f"?{options}" if options else "")
    settings = {
        **processes.broker_env(with_url_option(broker_url, "partitions", str(partitions))),
        "FMNIST_MODEL_PATH": str(checkpoint),
        "FMNIST_LOG_LEVEL": "WARNING",
        **env,
    }
    broker = processes.tansu(broker_port, log_dir, name="bench-tansu")
    worker_procs = [
        processes.fmnist(
            f"bench-worker-{i}",
            "worker",
            log_dir,
            {**settings, "FMNIST_WORKER_ID": f"bench-worker-{i}"},
        )
        for i in range(workers)
    ]
    gateway = processes.fmnist(
        "bench-gateway",
        "gateway",
        log_dir,
        {**settings, "FMNIST_HOST": "127.0.0.1", "FMNIST_PORT": str(port)},
    )
    with running(broker):
        broker.wait_for_port(broker_port)
        with running(*worker_procs, gateway):
            gateway.wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=START_TIMEOUT_S)
            wait_until_served(f"http://127.0.0.1:{port}", worker_procs)
            yield Server(
                f"http://127.0.0.1:{port}",
                "/v1/predictions?wait=10",
                [broker, *worker_procs, gateway],
            )


def wait_until_served(url: str, watched: Sequence[ManagedProcess]) -> None:
    """Block until one real request completes (the workers have joined their group)."""
    import httpx

    png = load_test_pngs(DATA_DIR, 1)[0][0]
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc in watched:
            if not proc.running():
                raise proc.failure("exited while the bench waited for the first answer")
        try:
            response = httpx.post(
                f"{url}/v1/predictions?wait=5",
                content=png,
                headers={"Content-Type": "image/png"},
                timeout=10,
            )
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no request completed through {url} within {START_TIMEOUT_S:.0f} s")


@contextmanager
def peer(
    script: str, checkpoint: Path, log_dir: Path, health: str, *extra: str
) -> Iterator[Server]:
    port = processes.free_port()
    argv = [
        sys.executable,
        str(PEERS / script),
        "--port",
        str(port),
        "--checkpoint",
        str(checkpoint),
    ]
    argv += extra
    proc = ManagedProcess(script.removesuffix(".py"), argv, log_dir=log_dir)
    with running(proc):
        proc.wait_for_http(f"http://127.0.0.1:{port}{health}", timeout=START_TIMEOUT_S)
        yield Server(f"http://127.0.0.1:{port}", "/predict", [proc])


def server_under_test(
    name: str, checkpoint: Path, log_dir: Path, kafka_options: str
) -> AbstractContextManager[Server]:
    """Start the named server (see `--only`); leaving the context stops it and everything it spawned."""
    if name == "ours-memory":
        return ours_memory(checkpoint, log_dir)
    if name == "ours-kafka":
        return ours_kafka(checkpoint, log_dir, options=kafka_options)
    if name == "litserve":
        return peer("litserve_server.py", checkpoint, log_dir, "/health")
    if name == "litserve-zmq":
        return peer("litserve_server.py", checkpoint, log_dir, "/health", "--fast-queue")
    if name == "plain-fastapi":
        return peer("fastapi_server.py", checkpoint, log_dir, "/health")
    raise ValueError(f"unknown server {name!r}; choose from {', '.join(SERVER_NAMES)}")


SERVER_NAMES = ("ours-memory", "ours-kafka", "litserve", "litserve-zmq", "plain-fastapi")
DEFAULT_SERVERS = ("ours-memory", "ours-kafka", "litserve", "plain-fastapi")


def machine_context() -> str:
    load1, load5, _ = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load1:.1f} (1 min) / {load5:.1f} (5 min) at start"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO_ROOT / "models" / "fmnist.safetensors"
    )
    parser.add_argument("--only", nargs="+", choices=SERVER_NAMES, default=list(DEFAULT_SERVERS))
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per server")
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="unmeasured seconds before each run"
    )
    parser.add_argument(
        "--images", type=int, default=256, help="distinct test images to rotate over"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the whole sequence (noisy machines)"
    )
    parser.add_argument("--logs", type=Path, default=None, help="keep server logs here")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy each server's main process during its run"
    )
    parser.add_argument(
        "--kafka-options",
        default=DEFAULT_KAFKA_OPTIONS,
        help="query string of the Kafka broker URL for ours-kafka ('' for the backend's defaults)",
    )
    args = parser.parse_args(argv)

    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="fmnist-bench-"))
    pngs, _ = load_test_pngs(DATA_DIR, args.images)
    bodies = write_bodies(log_dir / "single", [multipart_body([png], "file") for png in pngs])
    print(
        f"# {machine_context()}; {args.connections} connections, {args.duration:.0f} s per server"
    )
    print(f"# checkpoint {args.checkpoint}; logs in {log_dir}")
    results: list[LoadResult] = []
    for round_index in range(args.rounds):
        for name in args.only:
            profile = log_dir / f"{name}-{round_index + 1}.collapsed" if args.profile else None
            with server_under_test(name, args.checkpoint, log_dir, args.kafka_options) as server:
                result = measure(
                    name,
                    server,
                    bodies,
                    len(pngs),
                    connections=args.connections,
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    profile_to=profile,
                )
            results.append(result)
            print(f"# round {round_index + 1}: {result.row()}", flush=True)
            if profile is not None and profile.exists():
                summary = profile.with_suffix(".txt")
                summary.write_text(summarize_profile(profile))
                print(f"# profile of {name}: {summary}")
    print(TABLE_HEADER)
    for result in results:
        print(result.row())
    best = {r.name: max(x.images_per_s for x in results if x.name == r.name) for r in results}
    if "litserve" in best:
        for ours in ("ours-memory", "ours-kafka"):
            if ours in best:
                print(f"# {ours} / litserve = {best[ours] / best['litserve']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
