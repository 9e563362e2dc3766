"""Request intake shared by the HTTP and websocket routes: bounded body reads, headers, multipart, decoding."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from anyio import to_thread
from fastapi import Request

from app.errors import ApiError
from app.images import ImagePolicy, decode_image

MAX_METADATA_BYTES = 1024
MAX_IDEMPOTENCY_KEY_CHARS = 255
# Big images are decoded on a worker thread: Pillow releases the GIL while decoding, and the event
# loop keeps serving. Small images (the hot path) stay on the loop: a thread hop would cost more.
_THREAD_DECODE_IMAGE_BYTES = 64 * 1024
_THREAD_DECODE_TOTAL_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Upload:
    """One uploaded file: its bytes and the content type it declared."""

    data: bytes
    content_type: str | None


async def read_body(request: Request, limit: int, setting: str) -> bytes:
    """The request body; 413 as soon as Content-Length or the streamed bytes exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_size = int(declared)
        except ValueError:
            raise ApiError(400, "bad_request", f"invalid Content-Length {declared!r}") from None
        if declared_size > limit:
            raise _body_too_large(declared_size, limit, setting)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _body_too_large(size, limit, setting, streamed=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(size: int, limit: int, setting: str, *, streamed: bool = False) -> ApiError:
    what = f"more than {limit} bytes arrived" if streamed else f"the upload is {size} bytes"
    return ApiError(413, "payload_too_large", f"{what}; the limit is {limit} ({setting})")


_BOUNDARY = re.compile(r';\s*boundary=(?:"([^"]{1,200})"|([^";\s]{1,200}))', re.IGNORECASE)
_FIELD_NAME = re.compile(rb';\s*name=(?:"([^"]*)"|([^;\s]+))', re.IGNORECASE)
_MAX_PART_HEADER_BYTES = 4096
_MAX_OTHER_FIELDS = 32


def parse_multipart_files(
    content_type: str, body: bytes, field: str, *, max_files: int
) -> list[Upload]:
    """The files uploaded under `field` in a `multipart/form-data` body (RFC 7578), in order.

    A small parser over the whole (already size-checked) body: `bytes.find` does the scanning, so a
    batch of hundreds of small images costs microseconds per part. Other fields are ignored.
    """
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise _bad_multipart("the Content-Type has no boundary parameter")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    separator = b"\r\n" + delimiter
    first = body.find(delimiter)
    if first == -1 or (first > 0 and body[first - 2 : first] != b"\r\n"):
        raise _bad_multipart("the body does not start with the boundary")
    wanted = field.encode()
    uploads: list[Upload] = []
    others = 0
    position = first + len(delimiter)
    while True:
        if body.startswith(b"--", position):
            break  # the closing delimiter
        if not body.startswith(b"\r\n", position):
            raise _bad_multipart("a boundary is not followed by CRLF")
        position += 2
        end = body.find(separator, position)
        if end == -1:
            raise _bad_multipart("the last part is not terminated by the boundary")
        headers_end = body.find(b"\r\n\r\n", position, end)
        if headers_end == -1:
            if body.startswith(b"\r\n", position):
                headers_end = position - 2  # a part without headers
            else:
                raise _bad_multipart("a part's headers are not terminated")
        if headers_end - position > _MAX_PART_HEADER_BYTES:
            raise _bad_multipart(f"a part's headers exceed {_MAX_PART_HEADER_BYTES} bytes")
        name, part_type = _part_headers(body[position:headers_end])
        if name == wanted:
            if len(uploads) >= max_files:
                raise _too_many_files(max_files)
            uploads.append(Upload(body[headers_end + 4 : end], part_type))
        else:
            others += 1
            if others > _MAX_OTHER_FIELDS:
                raise _bad_multipart(f"more than {_MAX_OTHER_FIELDS} fields besides `{field}`")
        position = end + len(separator)
    if not uploads:
        raise ApiError(422, "invalid_multipart", f"no file in multipart field `{field}`")
    return uploads


def _part_headers(block: bytes) -> tuple[bytes | None, str | None]:
    """(field name, content type) from a part's header block."""
    name: bytes | None = None
    content_type: str | None = None
    for line in block.split(b"\r\n"):
        key, colon, value = line.partition(b":")
        if not colon:
            if line:
                raise _bad_multipart("a part header line has no colon")
            continue
        key = key.strip().lower()
        if key == b"content-disposition":
            found = _FIELD_NAME.search(value)
            if found is not None:
                name = found.group(1) if found.group(1) is not None else found.group(2)
        elif key == b"content-type":
            content_type = value.strip().decode("latin-1")
    return name, content_type


def _bad_multipart(reason: str) -> ApiError:
    return ApiError(422, "invalid_multipart", f"malformed multipart body: {reason}")


def _too_many_files(max_files: int) -> ApiError:
    if max_files == 1:  # the single-image route
        return ApiError(
            422,
            "invalid_multipart",
            "send exactly one file in field 'file' (use POST /v1/predictions:batch for many)",
        )
    return ApiError(
        413,
        "too_many_images",
        f"more than {max_files} files in one request (FMNIST_MAX_BATCH_IMAGES); split the batch",
    )


def parse_metadata(raw: str | None) -> dict[str, str] | None:
    """The `X-Fmnist-Metadata` JSON object of strings; 431 when over 1 KiB, 422 when malformed."""
    if raw is None:
        return None
    size = len(raw.encode("utf-8", "surrogateescape"))
    if size > MAX_METADATA_BYTES:
        raise ApiError(
            431,
            "header_too_large",
            f"X-Fmnist-Metadata is {size} bytes; the limit is {MAX_METADATA_BYTES}",
        )
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays fit in 1 KiB
        raise ApiError(
            422,
            "invalid_metadata",
            'X-Fmnist-Metadata must be a JSON object of strings, e.g. {"label": "3"}',
        ) from None
    return check_metadata(value)


def check_metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ApiError(
            422,
            "invalid_metadata",
            'metadata must be a JSON object of strings, e.g. {"label": "3"}',
        )
    # Measured as compact JSON, as the header and the SDK send it.
    if (
        len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        > MAX_METADATA_BYTES
    ):
        raise ApiError(
            422, "invalid_metadata", f"metadata is over the limit of {MAX_METADATA_BYTES} bytes"
        )
    return value


def check_idempotency_key(key: str | None) -> str | None:
    """The `Idempotency-Key` header, if any; 400 unless it is 1-255 printable ASCII characters."""
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not all(" " <= c <= "~" for c in key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters",
        )
    return key


def fingerprint(data: bytes, metadata: dict[str, str] | None) -> str:
    """What makes two submits "the same request" for idempotency: the bytes and the metadata."""
    digest = hashlib.blake2b(data, digest_size=16)
    if metadata:
        digest.update(json.dumps(metadata, sort_keys=True).encode())
    return digest.hexdigest()


async def decode_uploads(uploads: Sequence[Upload], policy: ImagePolicy) -> list[bytes | ApiError]:
    """Decode each upload to the model's input, or the error refusing it (per item, in order)."""

    def decode_all() -> list[bytes | ApiError]:
        decoded: list[bytes | ApiError] = []
        for upload in uploads:
            try:
                decoded.append(decode_image(upload.data, upload.content_type, policy))
            except ApiError as exc:
                decoded.append(exc)
        return decoded

    sizes = [len(upload.data) for upload in uploads]
    if max(sizes) > _THREAD_DECODE_IMAGE_BYTES or sum(sizes) > _THREAD_DECODE_TOTAL_BYTES:
        return await to_thread.run_sync(decode_all)
    return decode_all()
