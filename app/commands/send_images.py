"""`fmnist send-images`: send real Fashion-MNIST test images to a gateway, labelled for `fmnist listen`."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from fmnist_client import AsyncClient

TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_IMAGES_MAGIC = 2051  # big-endian magic of an IDX file of unsigned bytes with 3 dimensions
IDX_LABELS_MAGIC = 2049  # ... with 1 dimension


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "send-images",
        help="send real Fashion-MNIST test images, with their true labels as metadata",
        description=(
            "Send Fashion-MNIST test images (PNG) to a running gateway. Each carries its true label in "
            '`X-Fmnist-Metadata` ({"label": "<int>", "index": "<i>", "sent_at": "<unix s>"}), so '
            "`fmnist listen` can score the results."
        ),
    )
    add_gateway_arguments(parser)
    parser.add_argument(
        "--count", type=_positive_int, default=1000, help="images to send (default: %(default)s)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="images per second; 0 sends as fast as allowed (default)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=16,
        help="requests in flight at once (default: %(default)s)",
    )
    parser.add_argument(
        "--start", type=int, default=0, help="index of the first test image (default: 0)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"directory with {TEST_IMAGES} (default: $FMNIST_DATA_DIR, then {DEBIAN_DATA_DIR})",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (for logs and CI)"
    )
    parser.set_defaults(func=run)


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """`--url` and `--api-key`, shared with `fmnist listen` (the SDK reads the same variables)."""
    parser.add_argument(
        "--url",
        default=os.environ.get("FMNIST_URL", "http://127.0.0.1:8000"),
        help="gateway URL (default: $FMNIST_URL, else %(default)s)",
    )
    parser.add_argument("--api-key", default=None, help="API key (default: $FMNIST_API_KEY)")


def require_sdk(command: str) -> None:
    """Exit with the install command when the SDK (a separate distribution) is missing."""
    try:
        import fmnist_client  # noqa: F401
    except ImportError:
        raise SystemExit(
            f"fmnist {command} needs the Python SDK: run `pip install ./clients/python` "
            "from the repository root (`make test` installs it too)"
        ) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def find_test_set(data_dir: Path | None) -> Path:
    """The directory holding the Fashion-MNIST test IDX files; SystemExit says where it looked."""
    if data_dir is not None:
        candidates = [data_dir]  # asked for explicitly: do not silently fall back to another copy
    else:
        from_env = os.environ.get("FMNIST_DATA_DIR")
        candidates = [Path(from_env)] if from_env else []
        candidates.append(DEBIAN_DATA_DIR)
    for directory in candidates:
        if (directory / TEST_IMAGES).is_file() and (directory / TEST_LABELS).is_file():
            return directory
    looked = ", ".join(str(c) for c in candidates)
    raise SystemExit(
        f"fmnist send-images: {TEST_IMAGES} and {TEST_LABELS} not found in {looked}. "
        "Install them (`apt-get install dataset-fashion-mnist`) or pass --data-dir."
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed) as a numpy array of its declared shape."""
    import numpy as np

    with gzip.open(path, "rb") as file:
        data = file.read()
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(data) < header_size or int.from_bytes(data[:4], "big") != magic:
        raise SystemExit(f"fmnist send-images: {path} is not an IDX file (magic {magic} expected)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    values = np.frombuffer(data, dtype=np.uint8, offset=header_size)
    if values.size != math.prod(shape):
        raise SystemExit(
            f"fmnist send-images: {path} is truncated: {values.size} bytes for shape {shape}"
        )
    return values.reshape(shape)


@dataclass
class SendSummary:
    """What happened to the images sent: how many were accepted, and failures by error code."""

    sent: int = 0
    accepted: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    first_failure: str = ""
    elapsed_s: float = 0.0

    def lines(self, url: str) -> list[str]:
        rate = self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0
        out = [f"sent {self.sent} images to {url} in {self.elapsed_s:.2f} s ({rate:.1f} images/s)"]
        out.append(f"accepted {self.accepted}, failed {sum(self.failures.values())}")
        if self.failures:
            codes = ", ".join(f"{code}={n}" for code, n in self.failures.most_common())
            out.append(f"failures by code: {codes}; first: {self.first_failure}")
        return out


async def send_images(
    client: AsyncClient,
    images: np.ndarray,
    labels: np.ndarray,
    indices: Sequence[int],
    *,
    rate: float,
    concurrency: int,
    summary: SendSummary,
    on_sent: Callable[[], object] | None = None,
) -> None:
    """Submit `images[i]` for each i in `indices`, paced to `rate` per second, `concurrency` at a time."""
    from fmnist_client import FmnistError

    slots = asyncio.Semaphore(concurrency)
    began = time.monotonic()
    in_flight: set[asyncio.Task[None]] = set()

    async def send_one(index: int) -> None:
        metadata = {
            "label": str(int(labels[index])),
            "index": str(index),
            "sent_at": f"{time.time():.6f}",
        }
        try:
            await client.submit(images[index], metadata=metadata)
            summary.accepted += 1
        except FmnistError as error:
            summary.failures[error.code] += 1
            summary.first_failure = summary.first_failure or str(error)
        finally:
            summary.sent += 1
            summary.elapsed_s = time.monotonic() - began
            slots.release()
            if on_sent is not None:
                on_sent()

    try:
        for position, index in enumerate(indices):
            if rate > 0:
                # Pace against the start time, not the previous send, so the average rate holds.
                delay = began + position / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await slots.acquire()
            task = asyncio.create_task(send_one(index))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
    finally:
        summary.elapsed_s = time.monotonic() - began


def run(args: argparse.Namespace) -> int:
    require_sdk("send-images")
    from fmnist_client import AsyncClient
    from tqdm import tqdm

    directory = find_test_set(args.data_dir)
    images = read_idx(directory / TEST_IMAGES, IDX_IMAGES_MAGIC)
    labels = read_idx(directory / TEST_LABELS, IDX_LABELS_MAGIC)
    indices = [(args.start + i) % len(images) for i in range(args.count)]
    summary = SendSummary()

    async def main() -> None:
        async with AsyncClient(args.url, api_key=args.api_key) as client:
            with tqdm(
                total=len(indices), unit="img", disable=args.no_progress, file=sys.stderr
            ) as bar:
                await send_images(
                    client,
                    images,
                    labels,
                    indices,
                    rate=args.rate,
                    concurrency=args.concurrency,
                    summary=summary,
                    on_sent=bar.update,
                )

    interrupted = False
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        interrupted = True
    for line in summary.lines(args.url):
        print(line)
    if interrupted:
        print(f"interrupted after {summary.sent} of {len(indices)} images")
        return 130
    return 1 if summary.failures else 0
