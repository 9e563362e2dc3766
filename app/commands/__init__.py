"""Sub-commands of the `fmnist` CLI, one module each (see `app.cli`)."""

import os


def passive_torch_threads() -> None:
    """Let torch's idle OpenMP threads sleep instead of spin, unless the user chose otherwise.

    Must run before torch is imported. Spinning threads steal the CPU the event loop needs between
    batches: +20-30% single-image images/s in `bench/http_single.py` on 2 cores.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
