"""Tensors of the Open Inference Protocol: datatypes, the BYTES element framing, and output encodings.

Fixed-size datatypes travel as little-endian row-major bytes (binary data extension, gRPC raw contents)
or as flat lists (JSON, typed gRPC contents); BYTES elements as a 4-byte little-endian length then the
bytes, one after the other.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.gateway.errors import ApiError

# The datatypes the model's input accepts, with their numpy types (BYTES: encoded images).
NUMPY_TYPES: dict[str, np.dtype] = {
    "UINT8": np.dtype("<u1"),
    "FP32": np.dtype("<f4"),
    "INT64": np.dtype("<i8"),
}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class InputTensor:
    """One input of an infer request, whichever encoding it came in.

    Exactly one of `raw` (fixed-size types: little-endian bytes), `elements` (BYTES) and `values`
    (a JSON list or typed gRPC contents, flat or nested) is set.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None = None
    elements: list[bytes] | None = None
    values: Sequence[object] | None = None


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the client asked for; `binary` is the binary data extension's per-output choice."""

    name: str
    binary: bool | None = None


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def check_shape(name: str, shape: object) -> tuple[int, ...]:
    """A tensor's shape as a tuple of non-negative ints; 400 otherwise."""
    if not isinstance(shape, list | tuple) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise bad_request(f"input {name!r}: shape must be a list of non-negative integers")
    return tuple(shape)


def split_bytes_elements(name: str, raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor in the binary framing (4-byte little-endian length, bytes)."""
    elements: list[bytes] = []
    position = 0
    view = memoryview(raw)
    while position < len(raw):
        if position + 4 > len(raw):
            raise bad_request(f"input {name!r}: BYTES data ends inside an element's length")
        (length,) = _LENGTH.unpack_from(raw, position)
        position += 4
        if position + length > len(raw):
            raise bad_request(f"input {name!r}: a BYTES element runs past the end of the data")
        elements.append(bytes(view[position : position + length]))
        position += length
    return elements


def join_bytes_elements(elements: Sequence[bytes]) -> bytes:
    """BYTES elements in the binary framing."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """One output of an infer response: numbers as a numpy array, BYTES as a list of bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray | None = None
    elements: list[bytes] | None = None

    def raw(self) -> bytes:
        """The tensor's bytes (binary data extension, gRPC raw contents)."""
        if self.elements is not None:
            return join_bytes_elements(self.elements)
        assert self.array is not None
        return self.array.tobytes()

    def json_data(self) -> list[object]:
        """The tensor's elements as a flat JSON list (BYTES as UTF-8 strings)."""
        if self.elements is not None:
            return [element.decode("utf-8", "replace") for element in self.elements]
        assert self.array is not None
        data: list[object] = self.array.reshape(-1).tolist()
        return data
