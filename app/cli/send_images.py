"""`fmnist send-images`: send real Fashion-MNIST test images to a gateway, labelled for `fmnist listen`."""

from __future__ import annotations

import argparse
import asyncio
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
        help="directory with the Fashion-MNIST test files (default: $FMNIST_DATA_DIR, then "
        "/usr/share/datasets/fashion-mnist)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (for logs and CI)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="send to this model (default: the service's default model; it must take "
        "Fashion-MNIST's 28×28 grayscale images or fit them to its input)",
    )
    parser.add_argument(
        "--version", default=None, help="pin a version of the model: its hash or tag"
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


def load_test_set(data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The test images (N×28×28) and labels, or exit with where it looked and how to get them."""
    from ml.readers import (
        IDX_IMAGES_MAGIC,
        IDX_LABELS_MAGIC,
        DataError,
        fashion_mnist_test_files,
        read_idx,
    )

    try:
        images_path, labels_path = fashion_mnist_test_files(data_dir)
        return read_idx(images_path, IDX_IMAGES_MAGIC), read_idx(labels_path, IDX_LABELS_MAGIC)
    except (DataError, ValueError, OSError, EOFError) as exc:
        raise SystemExit(f"fmnist send-images: {exc}") from None


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
    model: str | None = None,
    version: str | None = None,
) -> None:
    """Submit `images[i]` for each i in `indices`, paced to `rate` per second, `concurrency` at a
    time, to `model` at `version` (default: the default model, its newest live version)."""
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
            await client.submit(images[index], metadata=metadata, model=model, version=version)
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

    images, labels = load_test_set(args.data_dir)
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
                    model=args.model,
                    version=args.version,
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
