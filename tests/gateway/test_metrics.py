"""The gateway's counts of a chunk of results equal those of the same results one by one."""

from __future__ import annotations

import math
import random

from prometheus_client import CollectorRegistry, Histogram

from app.gateway.metrics import GatewayMetrics, observe_many
from app.protocol import ErrorInfo, ResultMessage


def _results(count: int, seed: int = 7) -> list[ResultMessage]:
    rng = random.Random(seed)
    results = []
    for i in range(count):
        failed = rng.random() < 0.1
        results.append(
            ResultMessage(
                request_id=f"r{i}",
                status="failed" if failed else "completed",
                label=None if failed else rng.randrange(10),
                model="fmnist",
                model_version=rng.choice(["v1", "v2"]),
                batch_id=f"b{i // 7}",
                batch_size=rng.choice([1, 7, 32, 180, 256, 5000]),
                # Bucket bounds exactly, below the first, above the last, and in between.
                queue_ms=rng.choice([0.0, 1.0, 2.5, 10.0, 0.3, 99.0, 45_000.0, rng.random() * 500]),
                inference_ms=None if failed else rng.random() * 50,
                completed_at=1_000.0 + i,
                error=ErrorInfo(code=rng.choice(["model_error", "deadline_exceeded"]), message="x")
                if failed
                else None,
            )
        )
    return results


def _samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_a_chunk_counts_as_its_results_one_by_one() -> None:
    results = _results(1_000)
    one_by_one, chunked = GatewayMetrics(lambda: 0), GatewayMetrics(lambda: 0)
    for result in results:
        one_by_one.record_result(result)
    for start in range(0, len(results), 300):  # chunks of 300, and a last one of 100
        chunked.record_results(results[start : start + 300])
    chunked.record_results(results[:3])  # a few, one by one inside
    for result in results[:3]:
        one_by_one.record_result(result)

    expected, got = _samples(one_by_one), _samples(chunked)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-9), key
    failed_v1 = (("model", "fmnist"), ("outcome", "failed"), ("version", "v1"))
    assert expected[("fmnist_model_results_total", failed_v1)] > 0
    assert one_by_one.stats_snapshot() == chunked.stats_snapshot()


def _histogram_samples(registry: CollectorRegistry, name: str) -> list[tuple[str, str, float]]:
    family = next(family for family in registry.collect() if family.name == name)
    return [
        (sample.name.removeprefix(name), sample.labels.get("le", ""), sample.value)
        for sample in family.samples
        if not sample.name.endswith("_created")
    ]


def test_observe_many_fills_the_buckets_as_observe_does() -> None:
    registry = CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1.0)
    one_by_one = Histogram("a", "a", buckets=buckets, registry=registry)
    many = Histogram("b", "b", buckets=buckets, registry=registry)
    # On a bound, between bounds, below the first, past the last, negative.
    values = [0.0, 0.001, 0.0011, 0.01, 0.5, 1.0, 1.5, 1e9, -3.0] * 5
    for value in values:
        one_by_one.observe(value)
    observe_many(many, values)
    observe_many(many, [])

    expected, got = _histogram_samples(registry, "a"), _histogram_samples(registry, "b")
    assert [(suffix, le) for suffix, le, _ in expected] == [(suffix, le) for suffix, le, _ in got]
    for (_, le, want), (_, _, value) in zip(expected, got, strict=True):
        assert math.isclose(value, want, rel_tol=1e-12, abs_tol=1e-9), le
    cumulative = {le: value for suffix, le, value in got if suffix == "_bucket"}
    assert cumulative["0.001"] == 3 * 5  # 0.0, 0.001 and -3.0: `le` is inclusive
    assert cumulative["+Inf"] == len(values)
