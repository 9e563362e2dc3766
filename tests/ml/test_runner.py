"""ModelRunner: batching, the oldest-item timer, per-item errors, deadlines, overload, settings."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from ml.runner import (
    DeadlineExceeded,
    InvalidInput,
    ModelError,
    ModelRunner,
    Overloaded,
    Prediction,
    RunnerClosed,
)
from tests.ml.models import (
    GatedClassifier,
    PoisonClassifier,
    TinyClassifier,
    WrongRowsClassifier,
    image,
)

pytestmark = pytest.mark.timeout(30)


async def wait_until_entered(model: GatedClassifier) -> None:
    """Wait (without blocking the loop) until a forward pass is parked at the gate."""
    await asyncio.wait_for(asyncio.to_thread(model.entered.wait, 10), timeout=10)


async def test_concurrent_submits_are_grouped_into_full_batches() -> None:
    """32 concurrent submits with max_batch_size=8 run as four forward passes of 8."""
    model = TinyClassifier()
    async with ModelRunner(model, max_batch_size=8, max_wait_ms=1000, concurrency=1) as runner:
        predictions = await asyncio.gather(*(runner.submit(image(seed=i)) for i in range(32)))
    assert model.calls == [8, 8, 8, 8]
    assert {p.batch_size for p in predictions} == {8}
    assert len({p.batch_id for p in predictions}) == 4


async def test_each_caller_gets_the_prediction_for_its_own_image() -> None:
    """Results are routed back in order: each equals the model's answer for that caller's image."""
    model = TinyClassifier()
    images = [image(seed=i) for i in range(20)]
    expected = model.predict(torch.stack(images))
    async with ModelRunner(model, max_batch_size=7, max_wait_ms=2, concurrency=1) as runner:
        predictions = await asyncio.gather(*(runner.submit(img) for img in images))
    for prediction, row in zip(predictions, expected, strict=True):
        assert isinstance(prediction, Prediction)
        assert prediction.probabilities == pytest.approx(row.tolist(), abs=1e-6)
        assert prediction.label == int(row.argmax())
        assert prediction.class_name == f"class{prediction.label}"
        assert prediction.model_version == model.version


async def test_a_lone_image_on_an_idle_runner_runs_at_once() -> None:
    """With no other traffic and no pass running, one image is computed without waiting max_wait_ms."""
    model = TinyClassifier()
    async with ModelRunner(model, max_batch_size=64, max_wait_ms=2000, concurrency=1) as runner:
        prediction = await runner.submit(image(1))
    assert prediction.batch_size == 1
    assert prediction.queue_ms < 500


async def test_with_fill_when_idle_a_lone_image_waits_max_wait_ms_then_runs_alone() -> None:
    """fill_when_idle: with no other traffic, one image is computed about max_wait_ms after it arrived."""
    model = TinyClassifier()
    async with ModelRunner(
        model, max_batch_size=64, max_wait_ms=50, concurrency=1, fill_when_idle=True
    ) as runner:
        prediction = await runner.submit(image(1))
    assert prediction.batch_size == 1
    assert 50 <= prediction.queue_ms < 400


async def test_the_timer_runs_from_the_oldest_item_not_the_newest() -> None:
    """A later arrival joins the batch but does not push back when the batch closes."""
    model = TinyClassifier()
    async with ModelRunner(
        model, max_batch_size=64, max_wait_ms=300, concurrency=1, fill_when_idle=True
    ) as runner:
        first = asyncio.ensure_future(runner.submit(image(1)))
        await asyncio.sleep(0.15)
        second = await runner.submit(image(2))
        first_result = await first
    assert first_result.batch_id == second.batch_id
    assert (
        300 <= first_result.queue_ms < 420
    )  # timed from the first arrival (a reset would give >= 450)
    assert second.queue_ms < first_result.queue_ms


async def test_an_image_queued_while_the_model_is_busy_runs_as_soon_as_it_is_free() -> None:
    """Its timer started on arrival: once the busy batch ends it is due, so it runs at once."""
    model = GatedClassifier()
    async with ModelRunner(model, max_batch_size=64, max_wait_ms=200, concurrency=1) as runner:
        busy = asyncio.ensure_future(runner.submit(image(1)))
        await wait_until_entered(model)
        late = asyncio.ensure_future(runner.submit(image(2)))
        await asyncio.sleep(0.5)  # the late image's 200 ms pass while the model is busy
        model.release()
        await asyncio.gather(busy, late)
    (_, busy_end), (late_start, _) = model.call_windows
    assert model.calls == [1, 1]
    assert late_start - busy_end < 0.1  # not another 200 ms counted from when the runner looked


async def test_an_overdue_batch_waiting_for_the_model_does_not_spin_the_event_loop() -> None:
    """While the model is busy, an overdue batch costs the loop no CPU (the pass needs every core)."""
    model = GatedClassifier()
    async with ModelRunner(model, max_batch_size=64, max_wait_ms=1, concurrency=1) as runner:
        busy = asyncio.ensure_future(runner.submit(image(1)))
        await wait_until_entered(model)
        late = asyncio.ensure_future(runner.submit(image(2)))
        cpu_before = time.thread_time()
        await asyncio.sleep(0.3)  # the late image is overdue after 1 ms; the model is still busy
        loop_cpu_s = time.thread_time() - cpu_before
        model.release()
        await asyncio.gather(busy, late)
    assert model.calls == [1, 1]
    assert loop_cpu_s < 0.05, f"event loop used {loop_cpu_s * 1000:.0f} ms of CPU in 300 ms idle"


async def test_images_arriving_during_a_forward_pass_form_the_next_batch() -> None:
    """Pipelining: while one batch computes, the next one fills; never two forward passes at once."""
    model = GatedClassifier()
    async with ModelRunner(model, max_batch_size=16, max_wait_ms=0, concurrency=1) as runner:
        busy = asyncio.ensure_future(runner.submit(image(1)))
        await wait_until_entered(model)
        waiting = [asyncio.ensure_future(runner.submit(image(seed=i))) for i in range(10)]
        await asyncio.sleep(0.05)
        assert runner.stats().queue_depth == 10
        assert runner.stats().computing == 1
        model.release()
        await asyncio.gather(busy, *waiting)
    assert model.calls == [1, 10]
    assert model.max_concurrent == 1


async def test_a_due_batch_is_shared_among_free_passes_and_a_full_one_is_not() -> None:
    """concurrency=2: 40 due images run as two passes of 20; 128 (a full batch) as one pass."""
    model = TinyClassifier()
    async with ModelRunner(model, max_batch_size=128, max_wait_ms=0, concurrency=2) as runner:
        await asyncio.gather(*(runner.submit(image(seed=i)) for i in range(40)))
        assert model.calls == [20, 20]
        await asyncio.gather(*(runner.submit(image(seed=i)) for i in range(128)))
        assert model.calls[2:] == [128]
        await asyncio.gather(*(runner.submit(image(seed=i)) for i in range(20)))
        assert model.calls[3:] == [20]  # too small to share: parts would be under MIN_SHARED_BATCH


async def test_a_deep_queue_fills_batches_past_the_preferred_size() -> None:
    """preferred 8, max 64: a burst of 200 computes in passes of 64; a trickle in passes of 8."""
    model = TinyClassifier()
    async with ModelRunner(
        model, max_batch_size=64, preferred_batch_size=8, max_wait_ms=1000, concurrency=1
    ) as runner:
        await asyncio.gather(*(runner.submit(image(seed=i)) for i in range(200)))
        assert model.calls[:3] == [64, 64, 64]
        assert sum(model.calls) == 200
        del model.calls[:]
        for i in range(3):  # one at a time: a batch is full at the preferred size, not the max
            await asyncio.gather(*(runner.submit(image(seed=i)) for i in range(8)))
        assert model.calls == [8, 8, 8]


async def test_concurrency_runs_that_many_passes_side_by_side() -> None:
    """With concurrency=2 a second due batch starts while the first computes; a third waits for one."""
    model = GatedClassifier()
    async with ModelRunner(model, max_batch_size=16, max_wait_ms=0, concurrency=2) as runner:
        first = asyncio.ensure_future(runner.submit(image(1)))
        await wait_until_entered(model)
        second = asyncio.ensure_future(runner.submit(image(2)))
        for _ in range(100):  # the second pass starts in the executor's other thread
            await asyncio.sleep(0.01)
            if model.max_concurrent == 2:
                break
        assert model.max_concurrent == 2
        third = [asyncio.ensure_future(runner.submit(image(seed=i))) for i in range(3)]
        await asyncio.sleep(0.05)
        assert (runner.stats().computing, runner.queue_depth) == (2, 3)
        model.release()
        await asyncio.gather(first, second, *third)
    assert model.calls[2:] == [3]
    assert sorted(model.calls[:2]) == [1, 1]
    assert model.max_concurrent == 2


async def test_a_full_batch_does_not_wait_for_the_timer() -> None:
    """max_batch_size images close the batch immediately even with a long max_wait_ms."""
    model = TinyClassifier()
    async with ModelRunner(model, max_batch_size=4, max_wait_ms=10_000, concurrency=1) as runner:
        started = time.monotonic()
        await asyncio.gather(*(runner.submit(image(seed=i)) for i in range(4)))
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros((1, 28, 27), dtype=torch.uint8),
        torch.zeros((3, 28, 28), dtype=torch.uint8),
        torch.zeros((1, 28, 28), dtype=torch.float32),
        "not an image",
    ],
    ids=["short-width", "three-channels", "float", "string"],
)
async def test_an_unusable_image_gets_its_own_error_and_the_rest_succeed(bad: object) -> None:
    """A wrong shape or dtype fails with InvalidInput for that caller only."""
    model = TinyClassifier()
    async with ModelRunner(model, max_batch_size=8, max_wait_ms=5, concurrency=1) as runner:
        results = await asyncio.gather(
            runner.submit(image(seed=1)),
            runner.submit(bad),  # type: ignore[arg-type]
            runner.submit(image(seed=2)),
            return_exceptions=True,
        )
    assert isinstance(results[0], Prediction) and isinstance(results[2], Prediction)
    assert isinstance(results[1], InvalidInput)
    assert "expected" in str(results[1])


async def test_numpy_images_are_accepted() -> None:
    """A uint8 numpy C×H×W array is classified like the same tensor."""
    model = TinyClassifier()
    pixels = image(seed=3)
    async with ModelRunner(model, max_wait_ms=0, concurrency=1) as runner:
        from_numpy = await runner.submit(pixels.numpy())
        from_tensor = await runner.submit(pixels)
    assert from_numpy.probabilities == from_tensor.probabilities


async def test_read_only_arrays_and_tensors_share_a_batch() -> None:
    """Zero-copy read-only views (what a worker submits) batch with tensors; each gets its own answer."""
    model = TinyClassifier()
    images = [image(seed=i) for i in range(6)]
    views = [np.frombuffer(img.numpy().tobytes(), np.uint8).reshape(1, 28, 28) for img in images]
    assert not views[0].flags.writeable
    expected = model.predict(torch.stack(images))
    async with ModelRunner(model, max_batch_size=6, max_wait_ms=1000, concurrency=1) as runner:
        mixed = await asyncio.gather(
            *(runner.submit(v) for v in views[:3]), *(runner.submit(t) for t in images[3:])
        )
        arrays = await asyncio.gather(*(runner.submit(v) for v in views))
    for predictions in (mixed, arrays):
        assert {p.batch_size for p in predictions} == {6}
        for prediction, row in zip(predictions, expected, strict=True):
            assert prediction.probabilities == pytest.approx(row.tolist(), abs=1e-6)


async def test_a_poison_image_fails_alone_after_its_batch_is_retried_one_by_one() -> None:
    """The forward pass raises for the batch; only the poison image gets ModelError."""
    model = PoisonClassifier()
    async with ModelRunner(model, max_batch_size=8, max_wait_ms=1000, concurrency=1) as runner:
        images = [image(seed=i) for i in range(8)]
        images[3] = image(255)
        results = await asyncio.gather(
            *(runner.submit(img) for img in images), return_exceptions=True
        )
    assert isinstance(results[3], ModelError)
    assert "poison pixel" in str(results[3])
    good = [r for i, r in enumerate(results) if i != 3]
    assert all(isinstance(r, Prediction) and r.batch_size == 1 for r in good)
    assert runner.stats().failed == {"model_error": 1}


async def test_a_model_that_returns_the_wrong_number_of_rows_fails_each_item() -> None:
    """One output per input is checked: a short output is a ModelError, never a shifted answer."""
    model = WrongRowsClassifier()
    async with ModelRunner(model, max_batch_size=4, max_wait_ms=1000, concurrency=1) as runner:
        results = await asyncio.gather(
            *(runner.submit(image(seed=i)) for i in range(4)), return_exceptions=True
        )
    assert all(isinstance(r, ModelError) for r in results)
    assert "expected (4, 10)" in str(results[0]) or "expected (1, 10)" in str(results[0])


async def test_an_already_expired_deadline_is_refused_at_submit() -> None:
    """A deadline in the past raises DeadlineExceeded without queueing."""
    model = TinyClassifier()
    async with ModelRunner(model, max_wait_ms=0, concurrency=1) as runner:
        with pytest.raises(DeadlineExceeded):
            await runner.submit(image(1), deadline=time.time() - 1)
    assert model.calls == []


async def test_an_image_whose_deadline_passes_in_the_queue_is_dropped_before_compute() -> None:
    """Expired while the model was busy: DeadlineExceeded, and the model never sees it."""
    model = GatedClassifier()
    async with ModelRunner(model, max_batch_size=8, max_wait_ms=0, concurrency=1) as runner:
        busy = asyncio.ensure_future(runner.submit(image(1)))
        await wait_until_entered(model)
        expiring = asyncio.ensure_future(runner.submit(image(2), deadline=time.time() + 0.05))
        fresh = asyncio.ensure_future(runner.submit(image(3), deadline=time.time() + 30))
        await asyncio.sleep(0.2)
        model.release()
        with pytest.raises(DeadlineExceeded):
            await expiring
        assert (await fresh).batch_size == 1
        await busy
    assert model.calls == [1, 1]
    assert runner.stats().failed == {"deadline_exceeded": 1}


async def test_a_full_queue_raises_overloaded_at_once() -> None:
    """With max_queue images waiting, the next submit fails immediately with Overloaded.

    The images waiting are those not yet handed to the model: behind the pass that computes, one
    full batch per `concurrency` is handed over ahead of time and no longer counts."""
    model = GatedClassifier()
    async with ModelRunner(
        model, max_batch_size=4, max_wait_ms=0, max_queue=4, concurrency=1
    ) as runner:
        busy = asyncio.ensure_future(runner.submit(image(1)))
        await wait_until_entered(model)
        handed = [asyncio.ensure_future(runner.submit(image(seed=i))) for i in range(4)]
        await asyncio.sleep(0)
        assert runner.stats().computing == 5 and runner.queue_depth == 0
        queued = [asyncio.ensure_future(runner.submit(image(seed=10 + i))) for i in range(4)]
        await asyncio.sleep(0)
        assert runner.queue_depth == 4
        started = time.monotonic()
        with pytest.raises(Overloaded, match="FMNIST_MAX_QUEUED_IMAGES"):
            await runner.submit(image(9))
        assert time.monotonic() - started < 0.05
        model.release()
        await asyncio.gather(busy, *handed, *queued)


async def test_close_answers_everything_queued_then_refuses_new_submits() -> None:
    """Leaving `async with` drains the queue; a submit after that raises RunnerClosed."""
    model = TinyClassifier()
    runner = ModelRunner(model, max_batch_size=16, max_wait_ms=10_000)
    async with runner:
        pending = [asyncio.ensure_future(runner.submit(image(seed=i))) for i in range(5)]
        await asyncio.sleep(0)
    assert all(isinstance(p.result(), Prediction) for p in pending)
    with pytest.raises(RunnerClosed):
        await runner.submit(image(1))


async def test_submit_before_start_says_how_to_use_the_runner() -> None:
    """Using the runner outside `async with` is a clear RunnerClosed, not a hang."""
    runner = ModelRunner(TinyClassifier())
    with pytest.raises(RunnerClosed, match="async with"):
        await runner.submit(image(1))


async def test_a_cancelled_caller_is_skipped_without_blocking_its_batch() -> None:
    """A submit cancelled while queued is not computed; the others in its batch still are."""
    model = GatedClassifier()
    async with ModelRunner(model, max_batch_size=8, max_wait_ms=0, concurrency=1) as runner:
        busy = asyncio.ensure_future(runner.submit(image(1)))
        await wait_until_entered(model)
        cancelled = asyncio.ensure_future(runner.submit(image(2)))
        kept = asyncio.ensure_future(runner.submit(image(3)))
        await asyncio.sleep(0)
        cancelled.cancel()
        model.release()
        await asyncio.gather(busy, kept)
    assert model.calls == [1, 1]


async def test_stats_report_batch_sizes_and_timings() -> None:
    """The stats snapshot has the batch size histogram, counts and latency percentiles."""
    model = TinyClassifier()
    async with ModelRunner(model, max_batch_size=5, max_wait_ms=1000, concurrency=1) as runner:
        await asyncio.gather(*(runner.submit(image(seed=i)) for i in range(10)))
        stats = runner.stats()
    assert stats.batch_sizes == {5: 2}
    assert (stats.submitted, stats.completed, stats.batches, stats.queue_depth) == (10, 10, 2, 0)
    assert stats.queue_ms.count == 10 and stats.inference_ms.count == 10
    assert stats.inference_ms.p50 > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "FMNIST_MAX_BATCH_SIZE"),
        ({"max_batch_size": 2.5}, "FMNIST_MAX_BATCH_SIZE"),
        ({"max_wait_ms": -1}, "FMNIST_BATCH_FILL_WAIT_MS"),
        ({"max_wait_ms": float("nan")}, "FMNIST_BATCH_FILL_WAIT_MS"),
        ({"max_batch_size": 64, "max_queue": 10}, "FMNIST_MAX_QUEUED_IMAGES"),
        ({"concurrency": 0}, "FMNIST_INFERENCE_CONCURRENCY"),
        ({"concurrency": True}, "FMNIST_INFERENCE_CONCURRENCY"),
        ({"max_batch_size": 8, "preferred_batch_size": 9}, "FMNIST_PREFERRED_BATCH_SIZE"),
        ({"preferred_batch_size": 0}, "FMNIST_PREFERRED_BATCH_SIZE"),
    ],
)
def test_invalid_settings_are_rejected_at_construction(
    kwargs: dict[str, float], message: str
) -> None:
    """Settings that cannot work fail in the constructor and name the setting to change."""
    with pytest.raises(ValueError, match=message):
        ModelRunner(TinyClassifier(), **kwargs)  # type: ignore[arg-type]


def test_an_object_without_predict_is_rejected() -> None:
    """The classifier must provide the BatchPredictor interface."""
    with pytest.raises(TypeError, match="predict"):
        ModelRunner(object())  # type: ignore[arg-type]


async def test_a_saturated_runner_uses_full_batches() -> None:
    """Under a burst far larger than a batch, nearly every forward pass is full."""
    model = TinyClassifier()
    images = np.random.default_rng(0).integers(0, 255, (512, 1, 28, 28), dtype=np.uint8)
    async with ModelRunner(model, max_batch_size=64, max_wait_ms=5, concurrency=1) as runner:
        await asyncio.gather(*(runner.submit(img) for img in images))
    assert sum(model.calls) == 512
    assert model.calls.count(64) >= 7


class EarlyTimerLoop(asyncio.SelectorEventLoop):
    """An event loop whose timers fire 3 ms early, as millisecond-clock loops (uvloop) can."""

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return super().call_later(max(0.0, delay - 0.003), callback, *args, context=context)


def test_a_timer_that_fires_early_does_not_strand_the_batch() -> None:
    """A lone image is still computed about max_wait_ms after arrival when the loop's timer fires early."""

    async def lone_image() -> Prediction:
        async with ModelRunner(
            TinyClassifier(), max_batch_size=64, max_wait_ms=20, fill_when_idle=True
        ) as runner:
            return await asyncio.wait_for(runner.submit(image(1)), timeout=2.0)

    with asyncio.Runner(loop_factory=EarlyTimerLoop) as loop_runner:
        prediction = loop_runner.run(lone_image())
    assert 20 <= prediction.queue_ms < 300


def test_batches_form_under_uvloop() -> None:
    """Under uvloop (uvicorn's default loop), whose zero-delay timers lack `when()`, batches still form."""
    import uvloop  # installed with uvicorn[standard] on Linux: a missing one must fail, not skip

    async def burst_then_lone_image() -> list[Prediction]:
        async with ModelRunner(TinyClassifier(), max_batch_size=8, max_wait_ms=5) as runner:
            burst = await asyncio.gather(*(runner.submit(image(i)) for i in range(20)))
            lone = await asyncio.wait_for(runner.submit(image(1)), timeout=2.0)
            return [*burst, lone]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
        predictions = loop_runner.run(burst_then_lone_image())
    assert len(predictions) == 21
    assert max(p.batch_size for p in predictions) == 8


def test_the_default_concurrency_is_one_pass_per_usable_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without `concurrency`, the runner takes the worker's CPU layout: one pass per usable core."""
    monkeypatch.setattr("ml.runner.usable_cores", lambda: 3)
    assert ModelRunner(TinyClassifier()).concurrency == 3
