"""The steps of one submit, as `Gateway.submit` runs them: claim idempotency keys, check capacity,
publish (`Gateway`), settle each image's outcome.

A `BodyFingerprint` is the hash of one upload's bytes that an `Idempotency-Key` is bound to (not the
API-key fingerprint a request's `owner` carries).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from app.gateway.errors import ApiError
from app.gateway.results import ResultStore
from app.protocol import (
    DEADLINE_ATTR,
    METADATA_ATTR,
    OWNER_ATTR,
    SHAPE_ATTR,
    SUBMITTED_AT_ATTR,
    encode_metadata,
)

# An upload's Idempotency-Key and the fingerprint of its body: (key, body fingerprint).
IdempotencyClaim = tuple[str, str]


def new_request_ids(count: int) -> list[str]:
    """`count` random 128-bit ids as 32 hex characters, from one read of the OS's random source."""
    pool = os.urandom(16 * count).hex()
    return [pool[i : i + 32] for i in range(0, 32 * count, 32)]


@dataclass(frozen=True, slots=True)
class Accepted:
    """One image taken in: its request id, and whether it repeats an earlier submit (idempotency)."""

    request_id: str
    repeated: bool = False


class FreshImage(NamedTuple):
    """An image to publish: its position in the request, its new id, its bytes and its claim."""

    position: int
    request_id: str
    payload: bytes
    claim: IdempotencyClaim | None


def claim_idempotency_keys(
    store: ResultStore,
    owner: str,
    payloads: Sequence[bytes],
    request_ids: Sequence[str],
    claims: Sequence[IdempotencyClaim | None] | None,
) -> tuple[list[Accepted | ApiError], list[FreshImage]]:
    """Each image's outcome so far, and the images to publish: a key seen before (for this owner)
    answers the earlier request id without publishing, or 422 when it came with another body."""
    outcomes: list[Accepted | ApiError] = []
    fresh: list[FreshImage] = []
    for index, payload in enumerate(payloads):
        request_id = request_ids[index]
        claim = claims[index] if claims else None
        if claim is not None:
            earlier = store.claim_idempotency_key(owner, claim[0], claim[1], request_id)
            if earlier is not None:
                outcomes.append(repeat_of(earlier, claim))
                continue
        outcomes.append(Accepted(request_id))
        fresh.append(FreshImage(index, request_id, payload, claim))
    return outcomes, fresh


def repeat_of(earlier: tuple[str, str], claim: IdempotencyClaim) -> Accepted | ApiError:
    earlier_id, earlier_body_fingerprint = earlier
    if earlier_body_fingerprint == claim[1]:
        return Accepted(earlier_id, repeated=True)
    return ApiError(
        422,
        "idempotency_key_reused",
        "this Idempotency-Key was already used with a different request body; "
        "use a new key for a new request",
        request_id=earlier_id,
    )


def release_claims(store: ResultStore, owner: str, images: Sequence[FreshImage]) -> None:
    """Give back the idempotency keys of images that were not published."""
    for image in images:
        if image.claim is not None:
            store.release_idempotency_key(owner, image.claim[0], image.request_id)


def request_attributes(
    *, shape: str, owner: str, submitted_at: float, deadline: float, metadata: dict[str, str]
) -> dict[str, str]:
    """The attributes every image of one submit shares (app.protocol); the request id is added per image."""
    attributes = {
        SHAPE_ATTR: shape,
        SUBMITTED_AT_ATTR: repr(submitted_at),
        DEADLINE_ATTR: repr(deadline),
        OWNER_ATTR: owner,
    }
    if metadata:
        attributes[METADATA_ATTR] = encode_metadata(metadata)
    return attributes
