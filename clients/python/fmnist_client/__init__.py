"""fmnist-client: the Python SDK for fmnist-service (sync and async clients, websocket result stream).

from fmnist_client import Client

with Client("http://127.0.0.1:8000") as client:
    prediction = client.predict("ankle-boot.png")
    print(prediction.class_name, prediction.probabilities[prediction.label])
"""

from ._async_client import AsyncClient, AsyncPredictionHandle
from ._base import Health
from ._client import Client, PredictionHandle, ProgressCallback
from ._exceptions import (
    BadRequest,
    FmnistError,
    NotFound,
    Overloaded,
    PredictionFailed,
    Timeout,
    Unauthorized,
    Unavailable,
)
from ._images import ImageInput
from ._models import (
    ErrorDetail,
    LiveStats,
    ModelInfo,
    ModelVersionInfo,
    Prediction,
    RolloutEvent,
    Status,
    TrafficWeights,
)
from ._stream import StreamEvent, StreamEventCallback, StreamState
from ._version import __version__

__all__ = [
    "AsyncClient",
    "AsyncPredictionHandle",
    "BadRequest",
    "Client",
    "ErrorDetail",
    "FmnistError",
    "Health",
    "ImageInput",
    "LiveStats",
    "ModelInfo",
    "ModelVersionInfo",
    "NotFound",
    "Overloaded",
    "Prediction",
    "PredictionFailed",
    "PredictionHandle",
    "ProgressCallback",
    "RolloutEvent",
    "Status",
    "StreamEvent",
    "StreamEventCallback",
    "StreamState",
    "Timeout",
    "TrafficWeights",
    "Unauthorized",
    "Unavailable",
    "__version__",
]
