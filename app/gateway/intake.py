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

from app.gateway.errors import ApiError
from app.gateway.images import ImageHeader, ImagePolicy, decode_pixels, read_header

MAX_METADATA_BYTES = 1024
MAX_IDEMPOTENCY_KEY_CHARS = 255
# Costly decodes run on a worker thread: Pillow releases the GIL while decoding and resizing, and the
# event loop keeps serving. Cheap ones (the hot path: model-sized images) stay on the loop, where a
# thread hop would cost more than the decode. The cost follows the pixel count in the header (a few
# bytes of PNG can hold millions of pixels) and, for formats that decode in passes, the byte count.
_THREAD_DECODE_IMAGE_BYTES = 64 * 1024
_THREAD_DECODE_TOTAL_BYTES = 1024 * 1024
_THREAD_DECODE_IMAGE_PIXELS = 128 * 128
_THREAD_DECODE_TOTAL_PIXELS = 256 * 32 * 32  # a full batch of model-sized images stays inline


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
# One `; key=value` parameter of Content-Disposition, read in order from the previous one, so that a
# quoted value (a filename holding "; name=x") is consumed whole and never read as a parameter.
_PARAMETER = re.compile(rb'\s*;\s*([^\s=;"]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]*))\s*')
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
            name = _disposition_name(value)
        elif key == b"content-type":
            content_type = value.strip().decode("latin-1")
    return name, content_type


def _disposition_name(value: bytes) -> bytes | None:
    """The `name` parameter of a Content-Disposition value (`form-data; name="file"; filename="a.png"`)."""
    position = value.find(b";")
    name: bytes | None = None
    while position != -1 and value[position:].strip(b" \t;"):
        parameter = _PARAMETER.match(value, position)
        if parameter is None:
            raise _bad_multipart("a part's Content-Disposition parameters are malformed")
        if parameter.group(1).lower() == b"name":
            quoted = parameter.group(2)
            if quoted is None:
                name = parameter.group(3)
            else:  # unescaping only where there is an escape: parts are parsed by the hundred
                name = re.sub(rb"\\(.)", rb"\1", quoted) if b"\\" in quoted else quoted
        position = parameter.end()
    return name


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
    """Metadata from the header or a websocket submit: a JSON object of strings, ≤ 1 KiB as UTF-8; else 422."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ApiError(
            422,
            "invalid_metadata",
            'metadata must be a JSON object of strings, e.g. {"label": "3"}',
        )
    try:
        # Measured as compact JSON, as the header and the SDK send it.
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800": JSON allows it, UTF-8 does not
        raise ApiError(
            422,
            "invalid_metadata",
            "metadata must be valid Unicode text: a lone surrogate escape (\\ud800-\\udfff) is not",
        ) from None
    if len(encoded) > MAX_METADATA_BYTES:
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


def batch_item_key(key: str, index: int) -> str:
    """The idempotency key of item `index` of a batch sent with `key`.

    A control character keeps it apart from every key a single request can send (printable ASCII).
    """
    return f"{key}\x1fbatch\x1f{index}"


def body_fingerprint(data: bytes, metadata: dict[str, str] | None) -> str:
    """What makes two submits "the same request" for idempotency: the bytes and the metadata."""
    digest = hashlib.blake2b(data, digest_size=16)
    if metadata:
        digest.update(json.dumps(metadata, sort_keys=True).encode())
    return digest.hexdigest()


async def decode_uploads(uploads: Sequence[Upload], policy: ImagePolicy) -> list[bytes | ApiError]:
    """Decode each upload to the model's input, or the error refusing it (per item, in order).

    Headers are read first (on the loop, unless the bytes alone say the work is big): they refuse
    what the limits forbid and tell what decoding the rest will cost, which decides the thread.
    """
    sizes = [len(upload.data) for upload in uploads]
    if max(sizes) > _THREAD_DECODE_IMAGE_BYTES or sum(sizes) > _THREAD_DECODE_TOTAL_BYTES:
        return await to_thread.run_sync(_read_and_decode, uploads, policy)
    headers = [_header_or_error(upload, policy) for upload in uploads]
    if decodes_on_a_thread(headers):
        return await to_thread.run_sync(_decode_all, headers, policy)
    return _decode_all(headers, policy)


def decodes_on_a_thread(headers: Sequence[ImageHeader | ApiError]) -> bool:
    """Whether decoding these (already read) headers costs more than a thread hop: by pixel count."""
    pixels = [header.pixels for header in headers if isinstance(header, ImageHeader)]
    return bool(pixels) and (
        max(pixels) > _THREAD_DECODE_IMAGE_PIXELS or sum(pixels) > _THREAD_DECODE_TOTAL_PIXELS
    )


def _header_or_error(upload: Upload, policy: ImagePolicy) -> ImageHeader | ApiError:
    try:
        return read_header(upload.data, upload.content_type, policy)
    except ApiError as exc:
        return exc


def _decode_all(
    headers: Sequence[ImageHeader | ApiError], policy: ImagePolicy
) -> list[bytes | ApiError]:
    decoded: list[bytes | ApiError] = []
    for header in headers:
        if isinstance(header, ApiError):
            decoded.append(header)
            continue
        try:
            decoded.append(decode_pixels(header, policy))
        except ApiError as exc:
            decoded.append(exc)
    return decoded


def _read_and_decode(uploads: Sequence[Upload], policy: ImagePolicy) -> list[bytes | ApiError]:
    return _decode_all([_header_or_error(upload, policy) for upload in uploads], policy)
