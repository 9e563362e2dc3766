"""Peer for bench/http_single.py: a plain FastAPI endpoint that runs the model once per request, no batching.

    python bench/peers/fastapi_server.py --port 8102 --checkpoint models/fmnist.safetensors

`POST /predict`, multipart field `file` holding a PNG → `{"label", "class_name", "probabilities"}`.
This is what most people write first: a sync endpoint (FastAPI runs it in its thread pool) calling
`predict` on a batch of one.
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# The precision our workers use here (FMNIST_INFERENCE_PRECISION, `auto` by default), so the
# comparison is between serving layers, on the same model computing the same way.
from app.settings import Settings
from app.worker.inference import resolve_precision
from ml import ImageClassifier


def create_app(checkpoint: Path) -> FastAPI:
    classifier = ImageClassifier.load(
        checkpoint, precision=resolve_precision(Settings().inference_precision)
    )
    # The classifier is thread-safe for one caller at a time; FastAPI's pool has 40 threads.
    model_lock = threading.Lock()
    app = FastAPI()

    @app.post("/predict")
    def predict(file: Annotated[bytes, File()]) -> dict[str, Any]:
        pixels = np.asarray(Image.open(io.BytesIO(file)).convert("L"))[None, None]
        with model_lock:
            probabilities = classifier.predict(torch.from_numpy(pixels))[0]
        label = int(probabilities.argmax())
        return {
            "label": label,
            "class_name": classifier.class_names[label],
            "probabilities": probabilities.tolist(),
        }

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8102)
    parser.add_argument("--checkpoint", type=Path, default=Path("models/fmnist.safetensors"))
    args = parser.parse_args()
    uvicorn.run(create_app(args.checkpoint), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
