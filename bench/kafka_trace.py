"""Where a Kafka round trip spends its time: one hop through `messaging`, then the whole service, at light load.

    .venv/bin/python -m bench.kafka_trace hop --options "fetch_max_wait_ms=100" "fetch_max_wait_ms=5"
    .venv/bin/python -m bench.kafka_trace roundtrip --options "" "fetch_max_wait_ms=5" --requests 200
    .venv/bin/python -m bench.kafka_trace roundtrip --options "" "FMNIST_BATCH_FILL_WHEN_IDLE=true"
    .venv/bin/python -m bench.kafka_trace many --rounds 4
    .venv/bin/python -m bench.kafka_trace decay --options "TREE=/work/wt/before" ""
    .venv/bin/python -m bench.kafka_trace broker-log

`hop` starts Tansu and sends one message at a time (every `--interval-ms`, so the consumer is idle
in between) through our `messaging` Kafka backend, with each URL query in turn, and reports per
configuration: how long `publish` took (the broker's acknowledgement, after the producer's linger)
and how long from the publish call to the consumer's `receive` (publish + the consumer's fetch).

`roundtrip` starts Tansu + `fmnist worker` + `fmnist gateway` per configuration and sends
single-image `POST /v1/predictions?wait=10` one at a time. Each answer carries the worker's
timings, so one request's time splits into: intake (client send to the gateway's `submitted_at`),
request hop + model queue (`queue_ms`: `submitted_at` to inference, broker transit included),
inference (`inference_ms`), and back (the worker's `completed_at` to the answer at the client: the
result's publish, the gateway's fetch and store, the HTTP answer). All clocks are this machine's.
The last column is the CPU the server's processes (Tansu, worker, gateway) used per request while
its requests ran (20 ms apart, so polling between requests counts: what a fetch wait costs).
A roundtrip configuration may also set the servers' `FMNIST_*` settings (space-separated from the
URL query). Configurations alternate request by request in rounds (`--rounds`), so drift hits all alike.

`decay` starts Tansu + `fmnist worker` + `fmnist gateway` per configuration (`TREE=DIR` serves
another checkout, as in `bench/ab.py`) and measures single-image images/s at 64 connections in
consecutive windows of one server's life: Tansu's memory storage lists every stored batch of a
partition on each fetch, so what a run measures depends on how long its broker has been taking
records (docs/benchmarks.md, "Tansu lists the whole log on every fetch").

`broker-log` publishes and fetches one record at a time on a bare Tansu while its partition's log
grows, and reports Tansu's CPU per round at each log length.

`many` publishes `--per-call` request-like records per `publish_many` through the base class's path
(a task per message) and through the Kafka backend's own (records handed to the producer in turn),
alternating on one Tansu, and reports messages per second and per CPU-second of the publisher.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

from bench.http_single import (
    DATA_DIR,
    REPO_ROOT,
    Server,
    group_cpu_seconds,
    machine_context,
    multipart_body,
    ours_kafka,
    run_wrk,
    write_bodies,
)
from messaging import connect
from tests.brokers import start_tansu
from tests.e2e.images import load_test_pngs


def quantiles(values: Sequence[float]) -> str:
    """p50 / p90 of `values` (ms), as text."""
    if not values:
        return "n/a"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"{statistics.median(ordered):.1f} / {p90:.1f}"


# --- one hop through messaging -------------------------------------------------------------------


async def hop(
    bootstrap: str, options: str, count: int, interval_s: float
) -> tuple[list[float], list[float]]:
    """Publish `count` messages one at a time; (publish ms, publish-to-receive ms) per message."""
    url = f"kafka://{bootstrap}" + (f"?{options}" if options else "")
    topic, group = f"trace-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    publish_ms: list[float] = []
    receive_ms: list[float] = []
    async with connect(url, kafka_idempotence=False, kafka_partitions=1) as pubsub:
        await pubsub.ensure_topics(topic)
        async with pubsub.subscribe(topic, group=group, start="latest") as subscription:
            for _ in range(count):
                started = time.perf_counter()
                await pubsub.publish(topic, b"x" * 784, key=uuid.uuid4().hex)
                published = time.perf_counter()
                message = await asyncio.wait_for(anext(subscription), 10)
                received = time.perf_counter()
                await message.ack()
                publish_ms.append((published - started) * 1000)
                receive_ms.append((received - started) * 1000)
                # Publish at a random point of the consumer's fetch cycle, as real traffic does.
                await asyncio.sleep(interval_s * (0.5 + (len(publish_ms) * 0.618) % 1.0))
    return publish_ms, receive_ms


def run_hop(configurations: Sequence[str], count: int, interval_ms: float) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="fmnist-trace-"))
    broker = start_tansu(log_dir)
    try:
        print("| URL options | publish p50 / p90 ms | publish to receive p50 / p90 ms |")
        print("| --- | ---: | ---: |")
        for options in configurations:
            publish_ms, receive_ms = asyncio.run(
                hop(f"127.0.0.1:{broker.port}", options, count, interval_ms / 1000)
            )
            print(
                f"| {options or '(defaults)'} | {quantiles(publish_ms)} | {quantiles(receive_ms)} |"
            )
    finally:
        broker.stop()


# --- publish_many ---------------------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 3 + bytes(16)  # 784 bytes: one 28×28 image
ATTRIBUTES = {
    "request_id": "0" * 32,
    "shape": "1,28,28",
    "submitted_at": "1764246000.123",
    "deadline": "1764246060.123",
    "owner": "",
    "metadata": "{}",
}


async def many(bootstrap: str, rounds: int, per_call: int, calls: int) -> None:
    """`publish_many` of `per_call` request-like records, `calls` times per round: the base class's
    path (a task per message) and the Kafka backend's own, alternating; messages per wall and per
    CPU second of this process (the client's own work: the broker runs elsewhere)."""
    from messaging._base import PubSub

    url = f"kafka://{bootstrap}"
    async with connect(url, kafka_idempotence=False, kafka_partitions=4) as pubsub:
        topic = f"many-{uuid.uuid4().hex[:8]}"
        await pubsub.ensure_topics(topic)
        items = [(PAYLOAD, f"r{i}", ATTRIBUTES) for i in range(per_call)]
        paths = {
            "task per message (PubSub)": PubSub.publish_many,
            "kafka": type(pubsub).publish_many,
        }
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for path in paths.values():  # warm-up: connections, metadata
            await path(pubsub, topic, items)
        for _ in range(rounds):
            for name, path in paths.items():
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(calls):
                    outcomes = await path(pubsub, topic, items, timeout_s=30)
                    if any(outcome is not None for outcome in outcomes):
                        raise RuntimeError(f"{name}: {outcomes[:3]}")
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                rates[name].append((per_call * calls / wall, per_call * calls / cpu))
    print(
        "| publish_many path | messages/s (median) | messages per CPU-s (median) | rounds (per CPU-s) |"
    )
    print("| --- | ---: | ---: | --- |")
    for name, values in rates.items():
        walls, cpus = [v[0] for v in values], [v[1] for v in values]
        rounds_text = " / ".join(f"{v:,.0f}" for v in cpus)
        print(
            f"| {name} | {statistics.median(walls):,.0f} | {statistics.median(cpus):,.0f} | {rounds_text} |"
        )


def run_many(rounds: int, per_call: int, calls: int) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="fmnist-trace-"))
    broker = start_tansu(log_dir)
    try:
        asyncio.run(many(f"127.0.0.1:{broker.port}", rounds, per_call, calls))
    finally:
        broker.stop()


# --- the whole service ---------------------------------------------------------------------------


def round_trips(server: Server, pngs: Sequence[bytes], count: int) -> Iterator[dict[str, float]]:
    """Send `count` single-image requests one at a time; the split of each, in ms."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=15) as client:
        for index in range(count):
            png = pngs[index % len(pngs)]
            sent = time.time()
            response = client.post(
                "/v1/predictions?wait=10",
                files={"file": ("image.png", png, "image/png")},
            )
            answered = time.time()
            body = response.json()
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {body}")
            inference, queue = body["inference_ms"], body["queue_ms"]
            completed = body["completed_at"]
            submitted = completed - (queue + inference) / 1000
            yield {
                "total": (answered - sent) * 1000,
                "intake": (submitted - sent) * 1000,
                "hop_and_queue": queue,
                "inference": inference,
                "back": (answered - completed) * 1000,
            }
            time.sleep(0.02)


def split_configuration(text: str) -> tuple[str, dict[str, str]]:
    """A configuration as (URL query, the servers' environment): `FMNIST_X=1 linger_ms=0&a=b`;
    `TREE=DIR` serves another checkout's code, as in `bench/ab.py`."""
    query: list[str] = []
    settings: dict[str, str] = {}
    for item in text.split():
        name, _, value = item.partition("=")
        if name.startswith("FMNIST_"):
            settings[name] = value
        elif name == "TREE":
            settings |= {"PYTHONPATH": str(Path(value).resolve()), "PYTHONSAFEPATH": "1"}
        else:
            query.append(item)
    return "&".join(query), settings


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) one process used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def broker_log(sizes: Sequence[int], round_s: float) -> None:
    """Tansu's CPU per publish-and-fetch of one record as its partition's log grows to `sizes`."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    log_dir = Path(tempfile.mkdtemp(prefix="fmnist-broker-log-"))
    broker = start_tansu(log_dir)
    bootstrap = f"127.0.0.1:{broker.port}"
    tp = TopicPartition("log", 0)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=2)
    try:
        await producer.start()
        await producer.send_and_wait(tp.topic, b"first", partition=0)
        await consumer.start()
        consumer.assign([tp])
        written = 1
        print("| records in the partition | publish + fetch rounds | Tansu CPU µs per round |")
        print("| ---: | ---: | ---: |")
        for size in sizes:
            while written < size:  # 500 at a time: the producer makes batches of them
                sent = [await producer.send(tp.topic, b"x" * 1200, partition=0) for _ in range(500)]
                await asyncio.gather(*sent)
                written += 500
            await consumer.seek_to_end(tp)
            rounds = 0
            cpu_before = _cpu_seconds(broker.process.pid)
            deadline = time.monotonic() + round_s
            while time.monotonic() < deadline:
                await producer.send_and_wait(tp.topic, b"x" * 1200, partition=0)
                await consumer.getmany(tp, timeout_ms=100)
                rounds += 1
            cpu_s = _cpu_seconds(broker.process.pid) - cpu_before
            written += rounds
            print(f"| {written:,} | {rounds:,} | {cpu_s * 1e6 / rounds:,.0f} |")
    finally:
        await consumer.stop()
        await producer.stop()
        broker.stop()


def run_decay(
    configurations: Sequence[str], windows: int, window_s: float, partitions: int, checkpoint: Path
) -> None:
    """Per configuration, one fresh Tansu + worker + gateway under single-image load at 64
    connections, measured in consecutive windows: how images/s moves as the broker's log grows."""
    log_dir = Path(tempfile.mkdtemp(prefix="fmnist-decay-"))
    pngs, _ = load_test_pngs(DATA_DIR, 256)
    bodies = write_bodies(log_dir / "single", [multipart_body([png], "file") for png in pngs])
    print(
        f"| configuration | {' | '.join(f'{(i + 1) * window_s:.0f} s' for i in range(windows))} |"
    )
    print("| --- |" + " ---: |" * windows)
    for configuration in configurations:
        options, settings = split_configuration(configuration)
        server = ours_kafka(checkpoint, log_dir, options=options, partitions=partitions, **settings)
        rates = []
        with server as running:
            for _ in range(windows):
                summary, _ = run_wrk(
                    running.url,
                    running.path,
                    bodies,
                    len(pngs),
                    connections=64,
                    duration_s=window_s,
                )
                rates.append(summary["completed"] / (summary["duration_us"] / 1e6))
        print(f"| {configuration or '(defaults)'} | {' | '.join(f'{r:,.0f}' for r in rates)} |")


def run_roundtrip(configurations: Sequence[str], count: int, rounds: int, checkpoint: Path) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="fmnist-trace-"))
    pngs, _ = load_test_pngs(DATA_DIR, 64)
    splits: dict[str, list[dict[str, float]]] = {c: [] for c in configurations}
    with ExitStack() as stack:
        servers = {}
        for configuration in configurations:
            options, settings = split_configuration(configuration)
            servers[configuration] = stack.enter_context(
                ours_kafka(checkpoint, log_dir, options=options, **settings)
            )
        per_round = max(1, count // rounds)
        cpu_s = dict.fromkeys(configurations, 0.0)
        for _ in range(rounds):
            for options, server in servers.items():
                groups = {p.pid for p in server.processes if p.running()}
                before = group_cpu_seconds(groups)
                splits[options].extend(round_trips(server, pngs, per_round))
                cpu_s[options] += group_cpu_seconds(groups) - before
    parts = ("total", "intake", "hop_and_queue", "inference", "back")
    print(
        "| configuration | "
        + " | ".join(f"{p} p50 / p90 ms" for p in parts)
        + " | server CPU ms per request |"
    )
    print("| --- |" + " ---: |" * (len(parts) + 1))
    for options, rows in splits.items():
        cells = " | ".join(quantiles([row[p] for row in rows]) for p in parts)
        cpu_ms = cpu_s[options] * 1000 / max(1, len(rows))
        print(f"| {options or '(defaults)'} | {cells} | {cpu_ms:.1f} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["hop", "roundtrip", "many", "decay", "broker-log"])
    parser.add_argument(
        "--options",
        nargs="+",
        default=[""],
        help="kafka:// URL query strings; in roundtrip, FMNIST_*=value settings may join them "
        "(space-separated): one configuration per argument",
    )
    parser.add_argument("--count", type=int, default=100, help="messages per configuration (hop)")
    parser.add_argument(
        "--interval-ms", type=float, default=30.0, help="gap between messages (hop)"
    )
    parser.add_argument("--requests", type=int, default=200, help="requests per configuration")
    parser.add_argument("--rounds", type=int, default=4, help="alternations (roundtrip, many)")
    parser.add_argument("--per-call", type=int, default=256, help="records per publish_many (many)")
    parser.add_argument("--calls", type=int, default=20, help="publish_many calls per round (many)")
    parser.add_argument("--windows", type=int, default=6, help="consecutive windows (decay)")
    parser.add_argument("--window-s", type=float, default=6.0, help="seconds per window (decay)")
    parser.add_argument("--partitions", type=int, default=4, help="topic partitions (decay)")
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO_ROOT / "models" / "fmnist.safetensors"
    )
    args = parser.parse_args(argv)
    print(f"# {machine_context()}")
    if args.what == "hop":
        run_hop(args.options, args.count, args.interval_ms)
    elif args.what == "many":
        run_many(args.rounds, args.per_call, args.calls)
    elif args.what == "broker-log":
        asyncio.run(broker_log([1_000, 10_000, 30_000, 60_000], round_s=3.0))
    elif args.what == "decay":
        run_decay(args.options, args.windows, args.window_s, args.partitions, args.checkpoint)
    else:
        run_roundtrip(args.options, args.requests, args.rounds, args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
