"""Sub-commands of the `fmnist` CLI, one module each (see `app.cli`)."""

import os


def passive_torch_threads() -> None:
    """Let torch's idle OpenMP threads sleep instead of spin, unless the user chose otherwise.

    Must run before torch is imported. Spinning threads steal the CPU the event loop needs between
    batches: +20-30% single-image images/s in `bench/http_single.py` on 2 cores.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def tune_garbage_collector(threshold: int) -> None:
    """Collect the young generation every `threshold` allocations instead of Python's 700.

    A server holding ~100k results in its store spent most of its tail latency in cyclic GC: at 64
    connections `fmnist serve` went from 1,583 to 2,435 images/s and p99 211 → 33 ms with 200,000
    (`bench/http_single.py`). Objects alive now (imports, settings) are frozen out of every later
    collection. 0 keeps Python's defaults.
    """
    import gc

    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, gen1, gen2)
