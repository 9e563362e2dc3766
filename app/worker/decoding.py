"""Request messages into what a worker computes on: the request id, the uint8 C×H×W image, deadline and metadata."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from app import protocol
from messaging import Message


class UndecodableRequest(ValueError):
    """The request message cannot be turned into an image (missing or malformed attributes, wrong size)."""

    code = "undecodable_request"


class Request(NamedTuple):
    """A decoded request message."""

    request_id: str
    image: np.ndarray
    deadline: float | None
    submitted_at: float | None
    metadata: dict[str, str]


def request_id_of(message: Message) -> str:
    """The request id a message carries (attribute, else key); "" when it has none."""
    return protocol.request_id_from(message.attributes, message.key)


def decode_request(message: Message) -> tuple[str, np.ndarray]:
    """The request id and the uint8 C×H×W image of a request message; raises UndecodableRequest."""
    attributes = message.attributes
    request_id = request_id_of(message)
    if not request_id:
        raise UndecodableRequest(
            f"message has no `{protocol.REQUEST_ID_ATTR}` attribute and no key"
        )
    try:
        shape = protocol.decode_shape(attributes.get(protocol.SHAPE_ATTR, ""))
    except ValueError as exc:
        raise UndecodableRequest(f"bad `{protocol.SHAPE_ATTR}` attribute: {exc}") from None
    expected_bytes = shape[0] * shape[1] * shape[2]
    if len(message.data) != expected_bytes:
        raise UndecodableRequest(
            f"payload has {len(message.data)} bytes, but shape {shape} needs {expected_bytes} (uint8 C×H×W)"
        )
    # A read-only view of the payload, no copy; the runner stacks a batch into a fresh tensor.
    # numpy rather than torch: a torch call hands the GIL to the model's threads and waits to get
    # it back, once per request.
    image = np.frombuffer(message.data, dtype=np.uint8).reshape(shape)
    return request_id, image


def parse_request(message: Message) -> Request:
    """Everything a worker needs from a request message; raises ValueError (or RecursionError for
    absurdly nested metadata) when it cannot be decoded."""
    attributes = message.attributes
    request_id, image = decode_request(message)
    return Request(
        request_id,
        image,
        _float_attribute(attributes, protocol.DEADLINE_ATTR),
        _float_attribute(attributes, protocol.SUBMITTED_AT_ATTR),
        protocol.decode_metadata(attributes.get(protocol.METADATA_ATTR)),
    )


def _float_attribute(attributes: Mapping[str, str], name: str) -> float | None:
    text = attributes.get(name)
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise UndecodableRequest(f"attribute `{name}` must be unix seconds, got {text!r}") from None
