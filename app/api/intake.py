"""Request intake shared by the HTTP and websocket routes: bounded body reads, headers, multipart, decoding."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from anyio import to_thread
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.errors import ApiError
from app.images import ImagePolicy, decode_image

MAX_METADATA_BYTES = 1024
MAX_IDEMPOTENCY_KEY_CHARS = 255
# Uploads bigger than this (in total) are decoded on a worker thread: Pillow releases the GIL while
# decoding, and the event loop keeps serving. Small images (the hot path) stay on the loop: cheaper.
_THREAD_DECODE_BYTES = 64 * 1024


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


async def parse_multipart_files(
    request: Request, body: bytes, field: str, *, max_files: int
) -> list[Upload]:
    """The files uploaded under `field` in a multipart body (already read and size-checked)."""

    async def once() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        parser = MultiPartParser(
            request.headers,
            once(),
            max_files=max_files
            + 1,  # one more than allowed, so "too many" is told apart from malformed
            max_fields=32,
            max_part_size=MAX_METADATA_BYTES * 4,
        )
        form = await parser.parse()
    except MultiPartException as exc:
        if "too many files" in exc.message.lower():
            raise _too_many_files(max_files) from exc
        raise ApiError(
            422, "invalid_multipart", f"malformed multipart body: {exc.message}"
        ) from exc
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise ApiError(422, "invalid_multipart", f"malformed multipart body: {exc}") from exc
    try:
        uploads = []
        for value in form.getlist(field):
            if not isinstance(value, UploadFile):
                raise ApiError(
                    422,
                    "invalid_multipart",
                    f"multipart field `{field}` must be a file, not a text field",
                )
            uploads.append(Upload(await value.read(), value.content_type))
    finally:
        await form.close()
    if not uploads:
        raise ApiError(422, "invalid_multipart", f"no file in multipart field `{field}`")
    if len(uploads) > max_files:
        raise _too_many_files(max_files)
    return uploads


def _too_many_files(max_files: int) -> ApiError:
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
    except ValueError:
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
    if len(json.dumps(value).encode()) > MAX_METADATA_BYTES:
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

    if sum(len(upload.data) for upload in uploads) > _THREAD_DECODE_BYTES:
        return await to_thread.run_sync(decode_all)
    return decode_all()
