"""The HTTP response model and the SDK's Prediction agree with the wire schema (app/protocol.py).

The SDK must not import the server, so the comparison lives here: field names and types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from fmnist_client import Prediction

from app.gateway.models import PredictionResponse
from app.protocol import ErrorInfo, ResultMessage

# Fields only the server side of the wire carries (the API key's fingerprint stays in the gateway).
SERVER_ONLY = {"owner"}
# Fields the HTTP answer adds to a result: its link, and the SDK's stream cursor.
HTTP_ONLY = {"links"}
SDK_ONLY = {"cursor"}


def _base(annotation: Any) -> str:
    """A type's printed form with None removed, so `float` and `float | None` compare equal."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
        return " | ".join(sorted(_base(a) for a in args))
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def wire_fields() -> dict[str, str]:
    return {
        name: _base(field.annotation)
        for name, field in ResultMessage.model_fields.items()
        if name not in SERVER_ONLY
    }


def test_the_http_prediction_has_the_wire_result_fields_and_types() -> None:
    """PredictionResponse carries every result field of ResultMessage, with the same type."""
    http = {name: _base(f.annotation) for name, f in PredictionResponse.model_fields.items()}
    assert set(http) - HTTP_ONLY == set(wire_fields())
    for name, kind in wire_fields().items():
        if name == "status":  # the HTTP answer adds `pending`
            continue
        assert http[name] == kind, name


def test_the_sdk_prediction_has_the_wire_result_fields_and_types() -> None:
    """fmnist_client.Prediction carries every result field of ResultMessage, with the same type."""
    hints = typing.get_type_hints(Prediction)
    sdk = {f.name: _base(hints[f.name]) for f in dataclasses.fields(Prediction)}
    assert set(sdk) - SDK_ONLY == set(wire_fields())
    for name, kind in wire_fields().items():
        if name in {"status", "error"}:  # compared below: a Literal alias and the SDK's own class
            continue
        assert sdk[name] == kind, name
    error_hints = typing.get_type_hints(typing.get_args(hints["error"])[0])
    assert set(error_hints) == set(ErrorInfo.model_fields)
