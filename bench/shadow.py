"""What running a shadow costs live traffic: live latency with and without a shadow worker, side by side.

    .venv/bin/python -m bench.shadow                       # 2 rounds of each, 6 s measured per round
    .venv/bin/python -m bench.shadow --rounds 3 --rate 80 --seconds 8

One Tansu broker, one `fmnist gateway` and one `fmnist worker` of the shipped checkpoint run for the
whole benchmark, each its own process. Rounds alternate: `without` (no shadow worker) and `with`
(`fmnist worker --shadow` of a candidate, started before the round and stopped after it, so each
`with` round's shadow starts at the topic's end like any new shadow). In each round an open-loop
client sends single real test PNGs (`POST /v1/predictions?wait=10`, raw `image/png`, with their
label in `X-Fmnist-Metadata`) at a fixed rate over keep-alive connections and records each answer's
latency; only 200s count. Reported per round: p50, p99, answered, and for `with` rounds the
comparison's samples (`GET /v1/models/fmnist/shadow`). The verdict is the ratio of the medians of
the rounds' p99s.

The candidate is a small untrained network (cheap forward passes), so the figure is the cost of a
second reader on the live topic, of the shadow results and of the gateway's comparison. On one
machine a candidate as large as the live model would also take CPU from the live worker; in a
deployment the shadow runs on its own machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.e2e and ml

import httpx

from bench.http_single import DATA_DIR, REPO_ROOT, START_TIMEOUT_S, machine_context, running
from tests.e2e import processes
from tests.e2e.conftest import KAFKA_E2E_OPTIONS
from tests.e2e.images import load_test_pngs
from tests.e2e.processes import ManagedProcess

SHADOW_READY = r"event=shadow_worker_ready"


@dataclass(frozen=True)
class Round:
    kind: str  # "without" or "with"
    latencies_ms: list[float]
    sent: int
    samples: int | None

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def _post(
    host: str,
    port: int,
    body: bytes,
    label: int,
    connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
) -> float | None:
    """One POST on a free keep-alive connection: its latency in ms, or None unless it answered 200."""
    reader, writer = await connections.get()
    started = time.perf_counter()
    try:
        head = (
            f"POST /v1/predictions?wait=10 HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: image/png\r\nX-Fmnist-Metadata: {json.dumps({'label': str(label)})}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        return (time.perf_counter() - started) * 1000 if status == 200 else None
    finally:
        connections.put_nowait((reader, writer))


async def send_at_rate(
    port: int, pngs: Sequence[bytes], labels: Sequence[int], rate: float, seconds: float
) -> tuple[list[float], int]:
    """Send `rate` requests per second for `seconds`, each on schedule whatever the previous did."""
    host = "127.0.0.1"
    connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(32):
        connections.put_nowait(await asyncio.open_connection(host, port))
    count = int(rate * seconds)
    start = time.perf_counter()
    tasks = []
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        index = i % len(pngs)
        tasks.append(
            asyncio.create_task(_post(host, port, pngs[index], labels[index], connections))
        )
    answers = await asyncio.gather(*tasks)
    while not connections.empty():
        connections.get_nowait()[1].close()
    return [a for a in answers if a is not None], count


@contextmanager
def live_stack(checkpoint: Path, log_dir: Path) -> Iterator[tuple[dict[str, str], int]]:
    """Tansu, one serving worker and a gateway; yields the shared settings and the gateway's port."""
    broker_port, port = processes.free_port(), processes.free_port()
    settings = {
        **processes.broker_env(f"kafka://127.0.0.1:{broker_port}?{KAFKA_E2E_OPTIONS}"),
        "FMNIST_LOG_LEVEL": "INFO",
    }
    broker = processes.tansu(broker_port, log_dir, name="bench-shadow-tansu")
    worker = processes.fmnist(
        "bench-shadow-live",
        "worker",
        log_dir,
        {**settings, "FMNIST_MODEL_PATH": str(checkpoint), "FMNIST_WORKER_ID": "live"},
    )
    gateway = processes.fmnist(
        "bench-shadow-gateway",
        "gateway",
        log_dir,
        {**settings, "FMNIST_HOST": "127.0.0.1", "FMNIST_PORT": str(port)},
    )
    with running(broker):
        broker.wait_for_port(broker_port)
        with running(worker):
            worker.wait_for_log("event=worker_ready", timeout=START_TIMEOUT_S)
            with running(gateway):
                gateway.wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=START_TIMEOUT_S)
                yield settings, port


def shadow_worker(
    settings: dict[str, str], candidate: Path, log_dir: Path, n: int
) -> ManagedProcess:
    return processes.fmnist(
        f"bench-shadow-candidate-{n}",
        "worker",
        log_dir,
        {**settings, "FMNIST_WORKER_ID": f"shadow-{n}"},
        "--model",
        f"fmnist={candidate}",
        "--shadow",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO_ROOT / "models" / "fmnist.safetensors"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each kind, alternating")
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per round")
    args = parser.parse_args(argv)
    from ml import ImageClassifier

    pngs, labels = load_test_pngs(DATA_DIR, 256)
    print(
        f"# Shadow cost: {machine_context()}; {args.rate:.0f} req/s for {args.seconds:.0f} s per round"
    )
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        log_dir = Path(tmp)
        candidate = log_dir / "candidate.safetensors"
        ImageClassifier(widths=(4, 8), convs_per_stage=(1, 1), seed=3).save(candidate)
        with live_stack(args.checkpoint, log_dir) as (settings, port):
            url = f"http://127.0.0.1:{port}"
            asyncio.run(send_at_rate(port, pngs, labels, args.rate, 2.0))  # warm-up
            for n in range(2 * args.rounds):
                kind = "without" if n % 2 == 0 else "with"
                if kind == "without":
                    latencies, sent = asyncio.run(
                        send_at_rate(port, pngs, labels, args.rate, args.seconds)
                    )
                    rounds.append(Round(kind, latencies, sent, None))
                    continue
                with running(shadow_worker(settings, candidate, log_dir, n)) as (shadow,):
                    shadow.wait_for_log(SHADOW_READY, timeout=START_TIMEOUT_S)
                    before = _samples(url)
                    latencies, sent = asyncio.run(
                        send_at_rate(port, pngs, labels, args.rate, args.seconds)
                    )
                    time.sleep(0.5)  # the last shadow results reach the gateway
                    rounds.append(Round(kind, latencies, sent, _samples(url) - before))
    print()
    print("| round | shadow | answered | p50 ms | p99 ms | shadow samples |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, r in enumerate(rounds, 1):
        samples = "–" if r.samples is None else str(r.samples)
        print(
            f"| {i} | {r.kind} | {len(r.latencies_ms)}/{r.sent} | {r.percentile(0.5):.1f} "
            f"| {r.percentile(0.99):.1f} | {samples} |"
        )
    medians = {
        kind: statistics.median(r.percentile(0.99) for r in rounds if r.kind == kind)
        for kind in ("without", "with")
    }
    print()
    print(
        f"median p99: without {medians['without']:.1f} ms, with {medians['with']:.1f} ms "
        f"({medians['with'] / medians['without'] - 1:+.0%})"
    )
    return 0


def _samples(url: str) -> int:
    candidates = httpx.get(f"{url}/v1/models/fmnist/shadow", timeout=10).json()["candidates"]
    return sum(c["samples"] for c in candidates)


if __name__ == "__main__":
    raise SystemExit(main())
