"""`ModelRunner`: dynamic batching of single-image asyncio submits into model forward passes.

Which queued images form a batch, and when, is `ml.batching.BatchingPolicy` (a pure decision, read
its module docstring); this module is the plumbing around it. One background task asks the policy
what to do whenever something changes (a submit, a pass finishing, the oldest image falling due),
takes the images it names from the head of the queue, drops those whose deadline has passed or
whose caller gave up, and starts each forward pass (the images stacked into one uint8 N×C×H×W
tensor) in an executor of `concurrency` threads. The event loop keeps accepting submits meanwhile.

When a pass returns, the next batch starts at once, and only then are this batch's callers answered
(the model never waits for Python bookkeeping); the model must return exactly one row per image, or
every image of the batch fails. If a forward pass raises, the images are retried one at a time so
that one poison image fails alone (`ModelError`) and the rest of its batch still gets answers.

On CPU, passes side by side on one torch thread each outrun one pass on many threads, whose threads
wait for each other at every op, so `concurrency` defaults to one pass per usable core
(`ml.layout.inference_layout`; figures in `docs/benchmarks.md`).

Errors: the `RunnerError` tree of `ml.runner_errors`, each with a stable `code`, re-exported here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import torch

from ml.batching import BatchingPolicy, QueueState
from ml.layout import inference_layout, usable_cores
from ml.predictor import BatchPredictor, ForwardResult, forward_pass
from ml.runner_errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelError,
    Overloaded,
    RunnerClosed,
    RunnerError,
)
from ml.runner_stats import LatencySummary, RunnerCounters, RunnerStats

__all__ = [
    "BatchPredictor",
    "DeadlineExceeded",
    "InvalidInput",
    "LatencySummary",
    "ModelError",
    "ModelRunner",
    "Overloaded",
    "Prediction",
    "RunnerClosed",
    "RunnerError",
    "RunnerStats",
]

logger = logging.getLogger(__name__)


class Prediction(NamedTuple):
    """The model's answer for one image, with the provenance of the batch that computed it.

    A NamedTuple: immutable, and the cheapest record to build once per image on the hot path."""

    label: int
    class_name: str
    probabilities: list[float]
    batch_id: str
    batch_size: int
    queue_ms: float
    inference_ms: float
    model_version: str


class _Queued(NamedTuple):
    image: torch.Tensor | np.ndarray
    future: asyncio.Future[Prediction]
    arrived: float  # time.monotonic()
    deadline: float | None  # unix seconds


class ModelRunner:
    """Batches concurrent `submit(image)` calls into forward passes of one model.

    ```python
    async with ModelRunner(classifier, max_batch_size=64, max_wait_ms=5) as runner:
        prediction = await runner.submit(image)  # uint8 C×H×W tensor
    ```

    `concurrency`: forward passes that may run at once. Default: the worker's layout, one per usable
    core (at most `ml.layout.MAX_DEFAULT_PASSES`) on CPU, one on a GPU. More than one pays off on
    CPU, most when each pass uses fewer torch threads than there are cores.

    `max_batch_size`, `max_wait_ms`, `concurrency`, `preferred_batch_size` and `fill_when_idle`
    make the `ml.batching.BatchingPolicy` that decides which queued images form each pass: a lone
    image on an idle runner runs at once, and `max_wait_ms` is how long a batch fills while passes
    are busy.

    `executor`: where forward passes run. Default: a private executor of `concurrency` threads (torch
    uses its own intra-op threads inside each). A caller-supplied executor is not shut down by the
    runner, and needs at least `concurrency` threads for passes to overlap.
    """

    def __init__(
        self,
        classifier: BatchPredictor,
        max_batch_size: int = 64,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
        executor: Executor | None = None,
        concurrency: int | None = None,
        preferred_batch_size: int | None = None,
        fill_when_idle: bool = False,
    ) -> None:
        _validate_classifier(classifier)
        if concurrency is None:
            concurrency = default_concurrency(classifier)
        self.policy = BatchingPolicy(
            max_batch_size, max_wait_ms, concurrency, preferred_batch_size, fill_when_idle
        )
        if (
            isinstance(max_queue, bool)
            or not isinstance(max_queue, int)
            or max_queue < max_batch_size
        ):
            raise ValueError(
                f"max_queue (FMNIST_MAX_QUEUED_IMAGES) must be an integer >= max_batch_size ({max_batch_size}) "
                f"so a full batch can queue; got {max_queue!r}"
            )
        self.classifier = classifier
        self.max_batch_size = max_batch_size
        self.max_wait_ms = float(max_wait_ms)
        self.max_queue = max_queue
        self.concurrency = concurrency
        self.preferred_batch_size = self.policy.preferred
        self._input_shape = tuple(classifier.input_shape)
        self._class_names = list(classifier.class_names)
        self._model_version = str(classifier.version)
        self._forward = partial(forward_pass, classifier, len(self._class_names))
        self._executor = executor
        self._owns_executor = executor is None
        self._batch_prefix = uuid.uuid4().hex[:8]
        self._queue: deque[_Queued] = deque()  # submitted, not yet handed to a forward pass
        self._computing = 0  # images in the forward passes running now
        self._passes_running = 0  # handed to the executor: computing, or queued behind one that is
        self._wakeup = asyncio.Event()
        self._due_timer: asyncio.TimerHandle | None = None  # None once fired or cancelled
        self._loop_task: asyncio.Task[None] | None = None
        self._answering: set[asyncio.Task[None]] = set()
        self._closing = False
        self._accepting = False  # True between start() and close(): checked on every submit
        self._counters = RunnerCounters()

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> ModelRunner:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the batching task (done by `async with`)."""
        if self._loop_task is not None:
            raise RuntimeError("ModelRunner already started; use one `async with` per runner")
        if self._executor is None:
            # Each pass thread takes this thread's torch thread count: a compiled (AOTInductor)
            # program's OpenMP regions read the calling thread's own, which new threads do not inherit.
            self._executor = ThreadPoolExecutor(
                max_workers=self.concurrency,
                thread_name_prefix="fmnist-runner",
                initializer=torch.set_num_threads,
                initargs=(torch.get_num_threads(),),
            )
        self._loop_task = asyncio.get_running_loop().create_task(
            self._batching_loop(), name="fmnist-model-runner"
        )
        self._accepting = True

    async def close(self) -> None:
        """Stop taking submits, finish every queued image, then stop. Idempotent."""
        self._accepting = False
        self._closing = True
        self._wakeup.set()
        if self._loop_task is not None:
            try:
                await self._loop_task
            finally:
                if self._owns_executor and self._executor is not None:
                    self._executor.shutdown(wait=True)
                    self._executor = None

    @property
    def running(self) -> bool:
        return self._accepting and self._loop_task is not None and not self._loop_task.done()

    # --- submitting -----------------------------------------------------------------------------

    def submit(
        self, image: torch.Tensor | np.ndarray, deadline: float | None = None
    ) -> asyncio.Future[Prediction]:
        """Queue one uint8 C×H×W image; `await` the returned future for its `Prediction`.

        `deadline`: unix seconds (`time.time()`) after which the image is dropped uncomputed with
        `DeadlineExceeded`. What is wrong at once (`InvalidInput`, `Overloaded`, an expired
        deadline, `RunnerClosed`) comes back as an already-failed future, without queueing.

        A future rather than a coroutine: `await runner.submit(image)` reads the same, and
        `asyncio.gather(*(runner.submit(image) for image in images))` then needs no task per image,
        which was a third of the runner's per-image cost.
        """
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        kind = type(image)
        if (  # the common case in one cheap test; anything unusual goes to `_admit` for its error
            (
                (kind is np.ndarray and image.dtype == np.uint8)
                or (kind is torch.Tensor and image.dtype is torch.uint8)
            )
            and image.shape == self._input_shape
            and self._accepting
            and len(self._queue) < self.max_queue
            and (deadline is None or deadline > time.time())
        ):
            image_in = image
        else:
            try:
                image_in = self._admit(image, deadline)
            except RunnerError as exc:
                self._counters.failed[exc.code] += 1
                future.set_exception(exc)
                return future
        self._queue.append(_Queued(image_in, future, time.monotonic(), deadline))
        self._counters.submitted += 1
        self._wakeup.set()
        return future

    def _admit(
        self, image: torch.Tensor | np.ndarray, deadline: float | None
    ) -> torch.Tensor | np.ndarray:
        """The image as a tensor, or the error that keeps it out of the queue."""
        if not self.running:
            raise RunnerClosed(
                "ModelRunner is not running: use it inside `async with ModelRunner(...)`, before it closes"
            )
        checked = self._checked_image(image)
        if deadline is not None and time.time() >= deadline:
            raise DeadlineExceeded("the request's deadline had passed before it was queued")
        if len(self._queue) >= self.max_queue:
            raise Overloaded(
                f"model queue is full ({self.max_queue} images waiting); retry later, "
                "raise FMNIST_MAX_QUEUED_IMAGES or add workers"
            )
        return checked

    def _checked_image(self, image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        if not isinstance(image, torch.Tensor | np.ndarray):
            raise InvalidInput(
                f"expected a uint8 tensor of shape {self._input_shape}, got {type(image).__name__}"
            )
        uint8 = (
            image.dtype is torch.uint8
            if isinstance(image, torch.Tensor)
            else image.dtype == np.uint8
        )
        if not uint8:
            raise InvalidInput(f"expected dtype uint8 (pixels 0..255), got {image.dtype}")
        if image.shape != self._input_shape:
            raise InvalidInput(
                f"expected shape C×H×W = {self._input_shape} for model {self._model_version}, "
                f"got {tuple(image.shape)}"
            )
        return image

    # --- stats ----------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def stats(self) -> RunnerStats:
        return self._counters.snapshot(queue_depth=len(self._queue), computing=self._computing)

    # --- the batching loop ----------------------------------------------------------------------

    async def _batching_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (passes := await self._next_passes()) is not None:
                for items in passes:
                    self._launch(items, loop)
            while self._answering:
                await asyncio.gather(*self._answering)
        except BaseException as exc:
            self._fail_everything(exc)
            raise
        finally:
            self._disarm_due_timer()

    async def _next_passes(self) -> list[list[_Queued]] | None:
        """The images of the passes the policy starts next, taken from the queue; None once closing
        and everything queued has been handed out."""
        queue = self._queue
        while True:
            state = QueueState(
                waiting=len(queue),
                oldest_arrival=queue[0].arrived if queue else None,
                passes_running=self._passes_running,
                closing=self._closing,
                now=time.monotonic(),
            )
            decision = self.policy.decide(state)
            if decision.passes:
                self._disarm_due_timer()
                return [[queue.popleft() for _ in range(size)] for size in decision.passes]
            if decision.stop:
                return None
            if decision.due_at is not None and self._due_timer is None:
                # Some loops (uvloop: millisecond clock) fire a timer up to 1 ms early; the policy
                # then answers "not due yet" and this arms a timer for the rest.
                delay = decision.due_at - state.now
                self._due_timer = asyncio.get_running_loop().call_later(delay, self._on_due)
            self._wakeup.clear()
            await self._wakeup.wait()

    def _on_due(self) -> None:
        self._due_timer = None
        self._wakeup.set()

    def _disarm_due_timer(self) -> None:
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None

    def _launch(self, batch: list[_Queued], loop: asyncio.AbstractEventLoop) -> None:
        """Start one batch's forward pass now; a task answers its callers once it returns."""
        started = time.monotonic()
        live = self._drop_expired_and_abandoned(batch, started)
        if not live:
            return
        queue_ms = [(started - item.arrived) * 1000.0 for item in live]
        size = len(live)
        self._computing += size
        self._passes_running += 1
        forward = loop.run_in_executor(self._executor, self._forward, [item.image for item in live])

        def finished(_forward: asyncio.Future[Any]) -> None:
            self._computing -= size
            self._passes_running -= 1
            self._wakeup.set()

        # This callback is registered before the answering task's: when the pass returns, the
        # collector hears "model free" first and starts the next pass before this batch's callers
        # are answered, so the model never waits for Python bookkeeping.
        forward.add_done_callback(finished)
        answering = loop.create_task(self._answer_when_done(live, queue_ms, forward))
        self._answering.add(answering)
        answering.add_done_callback(self._answering.discard)

    def _drop_expired_and_abandoned(self, batch: list[_Queued], now: float) -> list[_Queued]:
        """The images still worth computing: not cancelled by their caller, deadline not passed."""
        now_unix = time.time()
        live: list[_Queued] = []
        for item in batch:
            if item.future.done():  # the caller gave up (cancelled)
                continue
            if item.deadline is not None and now_unix >= item.deadline:
                waited_ms = (now - item.arrived) * 1000.0
                self._fail(
                    item,
                    DeadlineExceeded(
                        f"request expired after waiting {waited_ms:.0f} ms in the model queue"
                    ),
                )
                continue
            live.append(item)
        return live

    async def _answer_when_done(
        self, live: list[_Queued], queue_ms: list[float], forward: asyncio.Future[ForwardResult]
    ) -> None:
        try:
            try:
                labels, rows, inference_ms = await forward
            except Exception as exc:
                await self._retry_one_by_one(live, queue_ms, exc)
                return
            self._answer(live, labels, rows, queue_ms, inference_ms)
        except asyncio.CancelledError:
            for item in live:
                self._fail(
                    item, RunnerClosed("model runner was cancelled while computing this image")
                )
            raise
        except Exception as exc:  # a bug here must not leave callers waiting forever
            logger.exception("event=batch_crashed batch_size=%d", len(live))
            for item in live:
                self._fail(item, ModelError(f"model runner failed on this batch: {exc!r}"))

    async def _retry_one_by_one(
        self, live: list[_Queued], queue_ms: list[float], error: Exception
    ) -> None:
        """A batch's forward pass raised: find the poison image, so the others still get answers."""
        if len(live) == 1:
            logger.warning("event=model_error batch_size=1 error=%r", error)
            self._fail(
                live[0], ModelError(f"model {self._model_version} failed on this image: {error}")
            )
            return
        logger.warning(
            "event=batch_failed batch_size=%d error=%r action=retry_one_by_one", len(live), error
        )
        loop = asyncio.get_running_loop()
        for item, waited_ms in zip(live, queue_ms, strict=True):
            if item.future.done():
                continue
            try:
                labels, rows, inference_ms = await loop.run_in_executor(
                    self._executor, self._forward, [item.image]
                )
            except Exception as exc:
                logger.warning("event=model_error batch_size=1 error=%r", exc)
                self._fail(
                    item, ModelError(f"model {self._model_version} failed on this image: {exc}")
                )
            else:
                self._answer([item], labels, rows, [waited_ms], inference_ms)

    def _answer(
        self,
        live: list[_Queued],
        labels: list[int],
        probabilities: list[list[float]],
        queue_ms: list[float],
        inference_ms: float,
    ) -> None:
        counters = self._counters
        counters.batches += 1
        batch_size = len(live)
        counters.batch_sizes[batch_size] += 1
        batch_id = f"{self._batch_prefix}-{counters.batches}"
        class_names = self._class_names
        version = self._model_version
        answered = 0
        for item, label, row, waited_ms in zip(live, labels, probabilities, queue_ms, strict=True):
            if item.future.done():
                continue
            item.future.set_result(
                Prediction(
                    label,
                    class_names[label],
                    row,
                    batch_id,
                    batch_size,
                    waited_ms,
                    inference_ms,
                    version,
                )
            )
            answered += 1
        counters.completed += answered
        counters.queue_ms.extend(queue_ms)
        counters.inference_ms.extend([inference_ms] * batch_size)

    def _fail(self, item: _Queued, error: RunnerError) -> None:
        if not item.future.done():
            self._counters.failed[error.code] += 1
            item.future.set_exception(error)

    def _fail_everything(self, cause: BaseException) -> None:
        """The batching task itself died: no caller may wait forever."""
        self._accepting = False
        self._closing = True
        while self._queue:
            item = self._queue.popleft()
            error = RunnerClosed(f"model runner stopped: {cause!r}")
            self._fail(item, error)


def default_concurrency(classifier: BatchPredictor) -> int:
    """The worker's default: one pass per usable core (at most a few) on CPU, one on a GPU."""
    on_gpu = str(getattr(classifier, "device", "cpu")) != "cpu"
    return inference_layout(usable_cores(), on_gpu=on_gpu).concurrency


def _validate_classifier(classifier: Any) -> None:
    """Reject a model the runner cannot drive, saying what it lacks."""
    if not isinstance(classifier, BatchPredictor):
        raise TypeError(
            "classifier must provide predict(images), class_names, input_shape and version "
            f"(like ml.ImageClassifier); got {type(classifier).__name__}"
        )
    shape = tuple(classifier.input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(
            f"classifier.input_shape must be three positive ints (C, H, W), got {shape!r}"
        )
    if len(classifier.class_names) < 1:
        raise ValueError("classifier.class_names is empty; the checkpoint must name its classes")
