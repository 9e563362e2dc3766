"""The gateway's submit path: idempotency claims, the in-flight cap, publishing requests and settling what failed.

`Publisher.submit` turns normalised images into published requests: each is claimed (its idempotency
key, here or in Redis), counted against `FMNIST_MAX_PENDING_REQUESTS`, recorded as pending and published
with `publish_many`; what the broker did not take becomes a retryable error for that image alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from app.gateway.errors import ApiError
from app.gateway.metrics import GatewayMetrics
from app.gateway.refusals import broker_unavailable, shared_unavailable, too_many_requests
from app.gateway.registry import ModelRegistry, ModelVersion
from app.gateway.results import (
    ACCEPTED_KIND,
    MARKER_KIND_ATTR,
    AcceptedMarker,
    ResultStore,
    Submission,
)
from app.gateway.rollout import RolloutState, publish_by_topic, versions_for
from app.gateway.shared_state import SharedState
from app.gateway.submission import (
    Accepted,
    FreshImage,
    IdempotencyClaim,
    claim_idempotency_keys,
    new_request_ids,
    release_claims,
    repeat_of,
    request_attributes,
)
from app.logs import kv
from app.protocol import (
    GATEWAY_ATTR,
    MODEL_ATTR,
    MODEL_VERSION_ATTR,
    REQUEST_ID_ATTR,
    encode_shape,
    requests_topic_for,
)
from app.settings import Settings
from messaging import BacklogFull, MessagingError, Outgoing, PubSub

log = logging.getLogger(__name__)


class Publisher:
    """Publishes the requests of one gateway; `on_broker_failure(reason)` hears of a publish the broker refused."""

    def __init__(
        self,
        settings: Settings,
        store: ResultStore,
        metrics: GatewayMetrics,
        shared: SharedState | None,
        *,
        registry: ModelRegistry,
        rollout: RolloutState,
        gateway_id: str,
        broker_url: str,
        on_broker_failure: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.shared = shared
        self.registry = registry
        self.rollout = rollout
        self.gateway_id = gateway_id
        self.broker_url = broker_url
        self._on_broker_failure = on_broker_failure

    def check_capacity(self, count: int) -> None:
        """429 when `count` more requests would exceed the cap on requests accepted and not yet answered."""
        in_flight = self.store.pending_count
        pending_cap = self.settings.max_pending_requests
        if in_flight + count > pending_cap:
            raise too_many_requests(
                f"{in_flight} requests in flight, {count} more would exceed the limit of {pending_cap} "
                "(FMNIST_MAX_PENDING_REQUESTS); retry later"
            )

    async def submit(
        self,
        pubsub: PubSub,
        model: ModelVersion,
        owner: str,
        payloads: Sequence[bytes],
        *,
        metadata: dict[str, str],
        idempotency: Sequence[IdempotencyClaim | None] | None,
        request_ids: Sequence[str] | None,
        pinned: bool,
    ) -> list[Accepted | ApiError]:
        """Publish normalised images for `model`; one `Accepted` (or the error that refused it) per
        payload, in order (see `Gateway.submit`)."""
        ids = request_ids or new_request_ids(len(payloads))
        if self.shared is None:
            outcomes, fresh = claim_idempotency_keys(self.store, owner, payloads, ids, idempotency)
        else:
            outcomes, fresh = await self._claim_shared(owner, payloads, ids, idempotency)
        if not fresh:
            return outcomes
        try:
            self.check_capacity(len(fresh))
            if self.shared is not None:
                await self._add_shared_pending(owner, metadata, fresh)
        except ApiError:
            await self._release_claims(owner, fresh)
            raise
        results = await self._publish(pubsub, owner, model, pinned, metadata, fresh)
        await self._settle(owner, fresh, results, outcomes)
        return outcomes

    async def _claim_shared(
        self,
        owner: str,
        payloads: Sequence[bytes],
        request_ids: Sequence[str],
        claims: Sequence[IdempotencyClaim | None] | None,
    ) -> tuple[list[Accepted | ApiError], list[FreshImage]]:
        """`claim_idempotency_keys` against Redis: a key is honoured across gateways."""
        shared = self.shared
        assert shared is not None
        outcomes: list[Accepted | ApiError] = []
        fresh: list[FreshImage] = []
        for index, payload in enumerate(payloads):
            request_id = request_ids[index]
            claim = claims[index] if claims else None
            if claim is not None:
                try:
                    earlier = await shared.claim_idempotency_key(
                        owner, claim[0], claim[1], request_id
                    )
                except Exception as exc:
                    await self._release_claims(owner, fresh)
                    raise shared_unavailable(exc) from None
                if earlier is not None:
                    outcomes.append(repeat_of(earlier, claim))
                    continue
            outcomes.append(Accepted(request_id))
            fresh.append(FreshImage(index, request_id, payload, claim))
        return outcomes, fresh

    async def _add_shared_pending(
        self, owner: str, metadata: dict[str, str], fresh: list[FreshImage]
    ) -> None:
        """Record the ids in Redis before publishing, so any gateway answers `pending` for them."""
        shared = self.shared
        assert shared is not None
        deadline = time.time() + self.settings.request_deadline_s
        try:
            await shared.add_pending(
                [Submission(image.request_id, owner, deadline, metadata) for image in fresh]
            )
        except Exception as exc:
            raise shared_unavailable(exc) from None

    async def _release_claims(self, owner: str, images: Sequence[FreshImage]) -> None:
        if self.shared is None:
            release_claims(self.store, owner, images)
            return
        claimed = [(image.claim[0], image.request_id) for image in images if image.claim]
        await self.shared.release_idempotency_keys(owner, claimed)

    async def _publish(
        self,
        pubsub: PubSub,
        owner: str,
        model: ModelVersion,
        pinned: bool,
        metadata: dict[str, str],
        fresh: list[FreshImage],
    ) -> list[object]:
        """Publish the images as pending requests; per image None, or the exception that failed it."""
        submitted_at = time.time()
        deadline = submitted_at + self.settings.request_deadline_s
        common = request_attributes(
            shape=encode_shape(model.input_shape),
            owner=owner,
            submitted_at=submitted_at,
            deadline=deadline,
            metadata=metadata,
        )
        common[MODEL_ATTR] = model.name
        if self.shared is not None:  # results are routed back here without being decoded
            common[GATEWAY_ATTR] = self.gateway_id
        versions = versions_for(self.rollout, self.registry, model, owner, fresh, pinned)
        outgoing = []
        for image, version in zip(fresh, versions, strict=True):
            self.store.add_pending(Submission(image.request_id, owner, deadline, metadata))
            self.rollout.routed(image.request_id, submitted_at, model.name, version)
            attributes = {**common, REQUEST_ID_ATTR: image.request_id}
            if (
                version is not None
            ):  # pinned, or chosen by the split: the worker treats it as pinned
                attributes[MODEL_VERSION_ATTR] = version
            topic = requests_topic_for(self.settings.requests_topic, model.name, version)
            outgoing.append((topic, Outgoing(image.payload, None, attributes)))
        sends = publish_by_topic(pubsub, outgoing, timeout_s=self.settings.publish_timeout_s)
        # No marker where pending ids live in Redis, or where the broker's log dies with this process.
        if self.shared is not None or not pubsub.durable:
            return list(await sends)
        marker = self._mark_accepted(pubsub, owner, submitted_at, deadline, metadata, fresh)
        results, _ = await asyncio.gather(sends, marker)
        return list(results)

    async def _mark_accepted(
        self,
        pubsub: PubSub,
        owner: str,
        accepted_at: float,
        deadline: float,
        metadata: dict[str, str],
        fresh: Sequence[FreshImage],
    ) -> None:
        """Publish the marker that lets this gateway, restarted, answer `pending` for these ids."""
        marker = AcceptedMarker(
            gateway_id=self.gateway_id,
            owner=owner,
            accepted_at=accepted_at,
            deadline=deadline,
            metadata=metadata,
            request_ids=[image.request_id for image in fresh],
        )
        (error,) = await pubsub.publish_many(
            self.settings.results_topic,
            # No key: the gateway's id is in the marker, and a key would put every marker of this
            # gateway in one partition's small batches instead of the results' sticky one.
            [Outgoing(marker.to_bytes(), None, {MARKER_KIND_ATTR: ACCEPTED_KIND})],
            timeout_s=self.settings.publish_timeout_s,
        )
        if error is not None:
            # The requests stand without it: only a restart before their results answers 404.
            log.warning(kv("accepted_marker_failed", broker=self.broker_url, error=error))

    async def _settle(
        self,
        owner: str,
        fresh: list[FreshImage],
        results: list[object],
        outcomes: list[Accepted | ApiError],
    ) -> None:
        """Turn failed publishes into errors (pending entry and idempotency key released), log, count."""
        failed = [
            (image, outcome)
            for image, outcome in zip(fresh, results, strict=True)
            if isinstance(outcome, BaseException)
        ]
        for image, outcome in failed:
            self.store.discard_pending(image.request_id)
            outcomes[image.position] = self._publish_error(outcome, image.request_id)
        await self._release_claims(owner, [image for image, _ in failed])
        if failed and self.shared is not None:
            await self.shared.discard_pending([image.request_id for image, _ in failed])
        if failed:
            first = outcomes[failed[0][0].position]  # the first refusal, not the first image
            log.warning(
                kv("publish_failed", broker=self.broker_url, count=len(failed), error=first)
            )
        self.metrics.record_accepted(len(fresh) - len(failed))

    def _publish_error(self, exc: BaseException, request_id: str) -> ApiError:
        if isinstance(exc, BacklogFull):
            return too_many_requests(
                f"the workers' backlog is full ({exc}); retry later", request_id
            )
        if not isinstance(exc, MessagingError | OSError | TimeoutError):
            # A client library failing in a way it does not document (e.g. a producer closed
            # mid-publish) is still the broker path failing: the client gets a retryable 503, never
            # a 500 that leaves the rest of its batch unanswered.
            log.error(kv("publish_crashed", broker=self.broker_url, error=repr(exc)))
        self._on_broker_failure(f"publishing to {self.broker_url} failed: {exc}")
        return broker_unavailable(
            f"the broker did not accept the request ({exc}); retry later", request_id
        )
