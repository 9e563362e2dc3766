"""Result work per gateway: results each of N gateways sharing state decodes, against its own requests.

    .venv/bin/python -m bench.gateways --gateways 1 2 4
    .venv/bin/python -m bench.gateways --gateways 3 --partitions 4

For each gateway count N, a fresh stack of real processes: Tansu, Debian's `redis-server` (no
persistence), `--workers` `fmnist worker`s and N `fmnist gateway`s sharing state
(`FMNIST_SHARED_STATE_URL`, so they share one results consumer group), every topic created with
`--partitions` partitions. Then, per phase, `--requests` single-image POSTs (raw PNG, 202):

* `even`: round-robin over the gateways;
* `skewed` (N >= 2): `--skew` percent to the first gateway, the rest spread evenly over the others.

After a phase the bench waits until every gateway holds no pending request (each accepted request
has its result at the gateway that accepted it), reads `fmnist_predictions_total{outcome="accepted"}`
and `fmnist_results_decoded_total` from every gateway's /metrics, and prints what the phase added:
per gateway its accepted requests, its results decoded, and the ratio decoded / (its accepted share ×
the phase's requests), which is decoded / accepted. Issue 17 bounds that ratio by 1.25.

Each stack runs under `--time-limit` seconds (startup included) and is stopped by PID on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench, tests and ml

from bench.http_single import DATA_DIR, DEFAULT_KAFKA_OPTIONS, REPO_ROOT, machine_context
from tests.brokers import start_redis, with_url_option
from tests.e2e import processes
from tests.e2e.images import load_test_pngs
from tests.e2e.processes import ManagedProcess

BOUND = 1.25  # issue 17: results decoded per gateway at most 1.25x its own share of requests
WORKER_READY = r"event=worker_ready"
_METRIC = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$", re.MULTILINE)


class OutOfTime(RuntimeError):
    """A stack did not finish within `--time-limit`."""


@dataclass(frozen=True)
class Counts:
    """One gateway's counters read from /metrics."""

    accepted: float
    decoded: float
    in_flight: float

    def __sub__(self, other: Counts) -> Counts:
        return Counts(self.accepted - other.accepted, self.decoded - other.decoded, self.in_flight)


def parse_counts(text: str) -> Counts:
    """The counters this bench reads, from a Prometheus text exposition."""
    accepted = decoded = in_flight = 0.0
    for match in _METRIC.finditer(text):
        name, labels, value = match["name"], match["labels"] or "", float(match["value"])
        if name == "fmnist_predictions_total" and 'outcome="accepted"' in labels:
            accepted = value
        elif name == "fmnist_results_decoded_total":
            decoded = value
        elif name == "fmnist_in_flight":
            in_flight = value
    return Counts(accepted, decoded, in_flight)


def split(total: int, gateways: int, first_percent: float | None) -> list[int]:
    """Requests per gateway: even, or `first_percent` to the first and the rest spread evenly."""
    if first_percent is None or gateways == 1:
        shares = [1.0 / gateways] * gateways
    else:
        rest = (100.0 - first_percent) / 100.0 / (gateways - 1)
        shares = [first_percent / 100.0] + [rest] * (gateways - 1)
    counts = [int(total * share) for share in shares]
    for index in range(total - sum(counts)):  # the remainder, one each from the first on
        counts[index % gateways] += 1
    return counts


def schedule(counts: Sequence[int]) -> list[int]:
    """Gateway index per request, interleaved so every gateway's requests spread over the phase."""
    slots = [
        ((k + 0.5) / count, gateway) for gateway, count in enumerate(counts) for k in range(count)
    ]
    return [gateway for _, gateway in sorted(slots)]


class Cluster:
    """Tansu, redis-server, workers and gateways sharing state, as real processes."""

    def __init__(self, args: argparse.Namespace, gateways: int, log_dir: Path) -> None:
        self.args = args
        self.gateway_count = gateways
        self.log_dir = log_dir
        self.urls: list[str] = []
        self.deadline = time.monotonic() + args.time_limit

    def remaining(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise OutOfTime(f"over {self.args.time_limit:g} s before {what}")
        return left

    @contextmanager
    def running(self) -> Iterator[Cluster]:
        with ExitStack() as stack:
            broker_port = processes.free_port()
            broker = processes.tansu(broker_port, self.log_dir, name="bench-tansu")
            stack.callback(broker.stop)
            broker.start().wait_for_port(broker_port, timeout=self.remaining("Tansu listened"))
            redis = start_redis(self.log_dir)
            stack.callback(redis.stop)
            options = self.args.kafka_options
            broker_url = f"kafka://127.0.0.1:{broker_port}" + (f"?{options}" if options else "")
            env = {
                **processes.broker_env(
                    with_url_option(broker_url, "partitions", str(self.args.partitions))
                ),
                "FMNIST_SHARED_STATE_URL": f"redis://127.0.0.1:{redis.port}/0",
            }
            workers = [
                processes.fmnist(
                    f"bench-worker-{i}",
                    "worker",
                    self.log_dir,
                    {
                        **env,
                        "FMNIST_MODEL_PATH": str(self.args.checkpoint),
                        "FMNIST_WORKER_ID": f"bench-worker-{i}",
                    },
                )
                for i in range(self.args.workers)
            ]
            for worker in workers:  # first: they create the topics with the partitions asked for
                stack.callback(worker.stop)
                worker.start()
            for worker in workers:
                worker.wait_for_log(WORKER_READY, timeout=self.remaining("the workers were ready"))
            gateways: list[ManagedProcess] = []
            for i in range(self.gateway_count):
                port = processes.free_port()
                gateway = processes.fmnist(
                    f"bench-gateway-{i}",
                    "gateway",
                    self.log_dir,
                    {
                        **env,
                        "FMNIST_GATEWAY_ID": f"bench-{i}",
                        "FMNIST_HOST": "127.0.0.1",
                        "FMNIST_PORT": str(port),
                        "FMNIST_LOG_LEVEL": "WARNING",
                    },
                )
                stack.callback(gateway.stop)
                gateways.append(gateway.start())
                self.urls.append(f"http://127.0.0.1:{port}")
            for gateway, url in zip(gateways, self.urls, strict=True):
                gateway.wait_for_http(
                    f"{url}/readyz", timeout=self.remaining("the gateways were ready")
                )
            yield self

    async def counts(self, client: httpx.AsyncClient) -> list[Counts]:
        answers = await asyncio.gather(*(client.get(f"{url}/metrics") for url in self.urls))
        return [parse_counts(answer.raise_for_status().text) for answer in answers]

    async def all_ready(self, client: httpx.AsyncClient) -> None:
        """Wait until every gateway answers /readyz 200 at once (the results group has settled)."""
        while True:
            self.remaining("every gateway was ready at once")
            answers = await asyncio.gather(*(client.get(f"{url}/readyz") for url in self.urls))
            if all(answer.status_code == 200 for answer in answers):
                return
            await asyncio.sleep(0.2)

    async def phase(
        self, client: httpx.AsyncClient, pngs: Sequence[bytes], targets: Sequence[int]
    ) -> tuple[list[Counts], Counter[int]]:
        """Send `targets[i]` requests to gateway i, wait for every result; (counters added, statuses)."""
        before = await self.counts(client)
        order = schedule(targets)
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        for index, gateway in enumerate(order):
            queue.put_nowait((index, gateway))
        statuses: Counter[int] = Counter()

        async def sender() -> None:
            while not queue.empty():
                index, gateway = queue.get_nowait()
                answer = await client.post(
                    f"{self.urls[gateway]}/v1/predictions",
                    content=pngs[index % len(pngs)],
                    headers={"content-type": "image/png"},
                )
                statuses[answer.status_code] += 1

        await asyncio.gather(*(sender() for _ in range(self.args.concurrency)))
        while True:  # every result at the gateway that accepted its request
            self.remaining("every result arrived")
            now = await self.counts(client)
            added = [after - earlier for after, earlier in zip(now, before, strict=True)]
            accepted = sum(c.accepted for c in added)
            if all(c.in_flight == 0 for c in now) and sum(c.decoded for c in added) >= accepted:
                return added, statuses
            await asyncio.sleep(0.2)


def rows(gateways: int, partitions: int, phase: str, added: Sequence[Counts]) -> list[str]:
    total = sum(c.accepted for c in added)
    lines = []
    for index, counts in enumerate(added):
        share = counts.accepted / total if total else 0.0
        ratio = counts.decoded / (share * total) if share else float("inf")
        lines.append(
            f"| {gateways} | {partitions} | {phase} | {index} | {counts.accepted:.0f} | {share:.0%} "
            f"| {counts.decoded:.0f} | {ratio:.2f} |"
        )
    return lines


async def measure(cluster: Cluster, pngs: Sequence[bytes]) -> list[str]:
    args = cluster.args
    n = cluster.gateway_count
    phases: list[tuple[str, float | None]] = [("even", None)]
    if n >= 2 and args.skew:
        phases.append((f"skewed {args.skew:g}%", args.skew))
    lines = []
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        # Warm-up (unmeasured): the workers' first batches, the gateways' first results.
        await cluster.phase(client, pngs, split(4 * n, n, None))
        await cluster.all_ready(client)
        for name, first_percent in phases:
            added, statuses = await cluster.phase(
                client, pngs, split(args.requests, n, first_percent)
            )
            lines += rows(n, args.partitions, name, added)
            decoded = sum(c.decoded for c in added)
            worst = max((c.decoded / c.accepted if c.accepted else float("inf")) for c in added)
            verdict = "holds" if worst <= BOUND else "does not hold"
            lines.append(
                f"<!-- N={n} P={args.partitions} {name}: {decoded:.0f} results decoded for "
                f"{sum(c.accepted for c in added):.0f} accepted, HTTP statuses {dict(statuses)}; worst ratio "
                f"{worst:.2f}: the {BOUND}x bound {verdict} -->"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO_ROOT / "models" / "fmnist.safetensors"
    )
    parser.add_argument("--gateways", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--partitions", type=int, default=4, help="of every topic, the results topic included"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--requests", type=int, default=800, help="per phase")
    parser.add_argument(
        "--skew", type=float, default=70.0, help="percent to the first gateway; 0: no skewed phase"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=58.0, help="seconds per stack")
    parser.add_argument("--logs", type=Path, default=None)
    parser.add_argument(
        "--kafka-options", default=DEFAULT_KAFKA_OPTIONS, help="broker URL query string"
    )
    args = parser.parse_args(argv)

    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="fmnist-bench-gateways-"))
    pngs, _ = load_test_pngs(DATA_DIR, 256)
    print(f"# {machine_context()}; checkpoint {args.checkpoint}; logs in {log_dir}")
    print(
        "| gateways | results partitions | phase | gateway | accepted | share | decoded | decoded / (share × total) |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    failed = False
    for gateways in args.gateways:
        started = time.monotonic()
        cluster = Cluster(args, gateways, log_dir)
        try:
            with cluster.running():
                lines = asyncio.run(measure(cluster, pngs))
        except (OutOfTime, processes.ProcessFailed, RuntimeError) as exc:
            print(f"<!-- N={gateways}: failed: {exc} -->")
            failed = True
            continue
        print("\n".join(lines))
        print(
            f"<!-- N={gateways}: stack up, measured and stopped in {time.monotonic() - started:.0f} s -->"
        )
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
