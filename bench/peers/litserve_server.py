"""Peer for bench/http_single.py: LitServe with dynamic batching serving the same checkpoint from the same PNGs.

    python bench/peers/litserve_server.py --port 8101 --checkpoint models/fmnist.safetensors

`POST /predict`, multipart field `file` holding a PNG (the same request our gateway gets) → JSON
`{"label", "class_name", "probabilities"}`. Batching as LitServe documents it: `batch`/`unbatch`,
max_batch_size=64, batch_timeout=5 ms (our `FMNIST_BATCH_FILL_WAIT_MS` default).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# The precision our workers use here (FMNIST_INFERENCE_PRECISION, `auto` by default), so the
# comparison is between serving layers, on the same model computing the same way.
from app.settings import Settings
from app.worker.inference import resolve_precision
from ml import ImageClassifier


class FashionMNISTAPI(ls.LitAPI):
    """Decode PNG → uint8 1×28×28, stack a batch, one `ImageClassifier.predict`, one answer per image."""

    def __init__(self, checkpoint: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint = checkpoint

    def setup(self, device: str) -> None:
        self.classifier = ImageClassifier.load(
            self.checkpoint, precision=resolve_precision(Settings().inference_precision)
        )

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe passes the parsed form
        """Multipart form → uint8 1×28×28."""
        upload = request["file"]
        data = upload.file.read() if hasattr(upload, "file") else upload
        return np.asarray(Image.open(io.BytesIO(data)).convert("L"))[None]

    def batch(self, inputs: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(inputs))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.predict(images)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probabilities: torch.Tensor) -> dict[str, Any]:
        label = int(probabilities.argmax())
        return {
            "label": label,
            "class_name": self.classifier.class_names[label],
            "probabilities": probabilities.tolist(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--checkpoint", type=Path, default=Path("models/fmnist.safetensors"))
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.005)
    parser.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ transport")
    args = parser.parse_args()
    api = FashionMNISTAPI(
        args.checkpoint, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=args.fast_queue)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
