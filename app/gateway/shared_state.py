"""State that gateways behind one load balancer share, in Redis (`FMNIST_SHARED_STATE_URL`).

With it the gateways share the results topic in one consumer group: the gateway holding a result's
partition writes it here as it came, routed by the attributes workers add (owner, accepting gateway)
and not decoded (`store_results`, one Lua script per result, one round trip per chunk):

* `{p}:result:{id}`   "CURSOR JSON" with the result TTL, set only if absent (the first result wins);
* `{p}:pending:{id}`  the accepted submission (owner, deadline, metadata, accepting gateway) until its
                      result, kept past its deadline as long as a result: an overdue one is answered
                      `failed` (`deadline_exceeded`) by whichever gateway looks it up (`get_pending`),
                      since its own gateway, which would have, may be gone;
* `{p}:idem:{owner}:{key}` "REQUEST_ID FINGERPRINT", claimed with SET NX;
* `{p}:owner:{owner}` a sorted set of request ids by cursor, for stream resume (`results_after`);
* `{p}:cursor`        the last cursor given: µs of Redis' clock, strictly increasing across gateways.

Each stored result is published, as "CURSOR REQUEST_ID JSON", on the channel of its owner
(`{p}:owner:{owner}`, for streams and waits on any gateway) and of the gateway that accepted it
(`{p}:gw:{id}`, which clears its pending entry). A gateway subscribes to its own channel always and
to an owner's while a stream or a wait of that owner is open on it (`watch`); what arrives goes to
its sink, which decodes it into its local `ResultStore`: so each gateway decodes the results of its
own requests and of the owners it watches, however the results topic's partitions fall.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from app.gateway.results import EXPIRY_GRACE_S, Submission, deadline_failure
from app.logs import kv
from app.protocol import ResultMessage
from messaging import MissingDependency

log = logging.getLogger(__name__)

PIP_HINT = "pip install 'fmnist-service[redis]'"
_PING_INTERVAL_S = 1.0
_RESUBSCRIBE_BACKOFF_S = 0.5

# KEYS: result, pending, cursor, owner set. ARGV: result JSON, TTL ms, request id, owner channel, gateway
# channel prefix, accepting gateway from the result's attributes ("" if none), used when no pending
# entry names one. Returns the cursor, or 0 when the id already had a result.
_STORE_RESULT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
local cursor = string.format('%.0f', math.max(last + 1, now))
local value = cursor .. ' ' .. ARGV[1]
if not redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('SET', KEYS[3], cursor)
local pending = redis.call('GET', KEYS[2])
if pending then redis.call('DEL', KEYS[2]) end
redis.call('ZADD', KEYS[4], cursor, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', string.format('%.0f', tonumber(cursor) - ARGV[2] * 1000))
redis.call('PEXPIRE', KEYS[4], ARGV[2])
local published = cursor .. ' ' .. ARGV[3] .. ' ' .. ARGV[1]
redis.call('PUBLISH', ARGV[4], published)
local gateway = ARGV[6]
if pending then gateway = cjson.decode(pending)['gateway'] or gateway end
if gateway ~= '' then redis.call('PUBLISH', ARGV[5] .. gateway, published) end
return cursor
"""

# A published result (cursor, request id, JSON as the worker sent it, whether on the own channel).
ResultSink = Callable[[int, str, bytes, bool], object]
_SEEN_MAX = 4096  # a result published on two channels this gateway holds is handed over once


def _load_redis() -> Any:
    try:
        import redis.asyncio as redis_asyncio
    except ImportError:
        raise MissingDependency(
            f"FMNIST_SHARED_STATE_URL needs the redis package: {PIP_HINT}"
        ) from None
    return redis_asyncio


def parse_stored(value: bytes | str) -> tuple[int, ResultMessage]:
    """A stored or published value, "CURSOR JSON", as (cursor, result); ValueError on anything else."""
    raw = value.encode() if isinstance(value, str) else value
    cursor, _, data = raw.partition(b" ")
    return int(cursor), ResultMessage.from_bytes(data)


def parse_published(value: bytes | str) -> tuple[int, str, bytes]:
    """A published value, "CURSOR REQUEST_ID JSON", as (cursor, request id, JSON, not decoded)."""
    raw = value.encode() if isinstance(value, str) else value
    cursor, _, rest = raw.partition(b" ")
    request_id, _, data = rest.partition(b" ")
    if not request_id:
        raise ValueError("a published result names no request id")
    return int(cursor), request_id.decode(), data


class SharedState:
    """One gateway's link to Redis: commands, its channel subscriptions, and a health flag."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        gateway_id: str,
        ttl_s: float,
        timeout_s: float,
        sink: ResultSink,
    ) -> None:
        redis_asyncio = _load_redis()
        self._redis_module = redis_asyncio
        self.prefix = prefix
        self.gateway_id = gateway_id
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.timeout_s = timeout_s
        self._sink = sink
        self.client = redis_asyncio.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.redacted_url = url.split("@")[-1] if "@" in url else url
        self._store_script = self.client.register_script(_STORE_RESULT)
        self.healthy = False
        self.last_error = "shared state not connected yet"
        self._watched: dict[str, int] = {}  # owner -> open streams and waits
        self._seen: dict[bytes, None] = {}  # published values handed over lately, oldest first
        self._confirmed: dict[str, asyncio.Event] = {}  # channel -> subscription confirmed
        self._pubsub: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self.on_reconnect: Callable[[], Any] | None = None

    # --- keys ------------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def owner_channel(self, owner: str) -> str:
        return self._key("owner", owner)

    @property
    def own_channel(self) -> str:
        return self._key("gw", self.gateway_id)

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect in the background; returns after the first ping, answered or not."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout_s):
                await self.client.ping()
                self._mark(True)
        self._tasks = [
            asyncio.create_task(self._monitor(), name="fmnist-shared-state-ping"),
            asyncio.create_task(self._listen(), name="fmnist-shared-state-listen"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        with contextlib.suppress(Exception):
            await self.client.aclose()

    def _mark(self, healthy: bool, error: object = None) -> None:
        """Record Redis' state; one log line per change."""
        if error is not None:
            self.last_error = f"shared state {self.redacted_url} unavailable: {error}"
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            log.info(kv("shared_state_up", url=self.redacted_url))
        else:
            log.warning(kv("shared_state_down", url=self.redacted_url, error=error))

    async def _monitor(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self.client.ping()
            except Exception as exc:
                self._mark(False, exc)
            else:
                self._mark(True)
            await asyncio.sleep(_PING_INTERVAL_S)

    async def _listen(self) -> None:
        """Hold the subscriptions (own channel, watched owners); re-subscribe after a break."""
        while True:
            pubsub = self.client.pubsub()
            try:
                self._pubsub = pubsub
                channels = [self.own_channel, *(self.owner_channel(o) for o in self._watched)]
                await pubsub.subscribe(*channels)
                if self.on_reconnect is not None:
                    await self.on_reconnect()
                async for message in pubsub.listen():
                    self._on_message(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._mark(False, exc)
            finally:
                self._pubsub = None
                for event in self._confirmed.values():
                    event.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(_RESUBSCRIBE_BACKOFF_S)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        name = channel.decode() if isinstance(channel, bytes) else str(channel)
        if kind == "subscribe":
            self._confirmed.setdefault(name, asyncio.Event()).set()
            return
        if kind != "message":
            return
        value = message["data"]
        if value in self._seen:
            return
        self._seen[value] = None
        if len(self._seen) > _SEEN_MAX:
            del self._seen[next(iter(self._seen))]
        try:
            cursor, request_id, data = parse_published(value)
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning(kv("malformed_shared_result", channel=name, error=exc))
            return
        self._sink(cursor, request_id, data, name == self.own_channel)

    async def watch(self, owner: str) -> None:
        """Receive `owner`'s results from now on (returns once subscribed); pair with `unwatch`."""
        count = self._watched.get(owner, 0)
        self._watched[owner] = count + 1
        channel = self.owner_channel(owner)
        event = self._confirmed.setdefault(channel, asyncio.Event())
        if count == 0 and self._pubsub is not None:
            event.clear()
            await self._pubsub.subscribe(channel)
        async with asyncio.timeout(self.timeout_s):
            await event.wait()

    async def unwatch(self, owner: str) -> None:
        count = self._watched.get(owner, 0) - 1
        if count > 0:
            self._watched[owner] = count
            return
        self._watched.pop(owner, None)
        channel = self.owner_channel(owner)
        self._confirmed.pop(channel, None)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    # --- commands --------------------------------------------------------------------------
    async def _run(self, coroutine: Any) -> Any:
        """One command (or pipeline) within the timeout; a failure marks Redis down and propagates."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await coroutine
        except Exception as exc:
            self._mark(False, exc)
            raise

    async def claim_idempotency_key(
        self, owner: str, key: str, fingerprint: str, request_id: str
    ) -> tuple[str, str] | None:
        """Bind (owner, key) to `request_id` unless bound; then the earlier (request_id, fingerprint)."""
        name = self._key("idem", owner, key)
        value = f"{request_id} {fingerprint}"
        claimed = await self._run(self.client.set(name, value, nx=True, px=self.ttl_ms))
        if claimed:
            return None
        earlier = await self._run(self.client.get(name))
        if earlier is None:  # expired in between: ours now
            return await self.claim_idempotency_key(owner, key, fingerprint, request_id)
        earlier_id, _, earlier_fingerprint = earlier.decode().partition(" ")
        return earlier_id, earlier_fingerprint

    async def release_idempotency_keys(self, owner: str, claims: Sequence[tuple[str, str]]) -> None:
        """Give back (key, request_id) claims whose requests were never published."""
        for key, request_id in claims:
            name = self._key("idem", owner, key)
            with contextlib.suppress(Exception):
                earlier = await self._run(self.client.get(name))
                if earlier is not None and earlier.decode().split(" ", 1)[0] == request_id:
                    await self._run(self.client.delete(name))

    async def add_pending(self, submissions: Sequence[Submission]) -> None:
        """Record accepted requests until their results come (or their deadline passes)."""
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        for submission in submissions:
            value = json.dumps(
                {
                    "owner": submission.owner,
                    "deadline": submission.deadline,
                    "metadata": submission.metadata,
                    "gateway": self.gateway_id,
                }
            )
            # Past the deadline too, so that a request whose gateway died reads `failed`, not unknown.
            ttl_ms = max(1, int((submission.deadline + EXPIRY_GRACE_S - now) * 1000)) + self.ttl_ms
            pipe.set(self._key("pending", submission.request_id), value, px=ttl_ms)
        await self._run(pipe.execute())

    async def discard_pending(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            with contextlib.suppress(Exception):
                await self._run(
                    self.client.delete(*(self._key("pending", rid) for rid in request_ids))
                )

    async def get_pending(self, request_id: str) -> Submission | None:
        """The accepted submission still waiting for its result; None when there is none, or when it
        was overdue: then its `deadline_exceeded` failure is stored in its place (first result wins),
        for the caller's next look."""
        raw = await self._run(self.client.get(self._key("pending", request_id)))
        if raw is None:
            return None
        fields = json.loads(raw)
        submission = Submission(request_id, fields["owner"], fields["deadline"], fields["metadata"])
        now = time.time()
        if submission.deadline + EXPIRY_GRACE_S >= now:
            return submission
        # Its gateway's sweep answers it at this point; that gateway being gone, the reader does.
        failure = deadline_failure(submission, now)
        await self.store_results(
            [(request_id, submission.owner, failure.to_bytes(), fields.get("gateway") or "")]
        )
        return None

    async def get_results(self, request_ids: Sequence[str]) -> list[tuple[int, ResultMessage]]:
        """The stored results of these ids (those that have one)."""
        if not request_ids:
            return []
        values = await self._run(
            self.client.mget([self._key("result", rid) for rid in request_ids])
        )
        found = []
        for rid, value in zip(request_ids, values, strict=True):
            if value is None:
                continue
            try:
                found.append(parse_stored(value))
            except ValueError as exc:  # the accepting gateway replaces it with a failed result
                log.warning(kv("malformed_shared_result", request_id=rid, error=exc))
        return found

    async def results_after(self, owner: str, cursor: int) -> list[tuple[int, ResultMessage]]:
        """`owner`'s results with a cursor greater than `cursor`, oldest first."""
        ids = await self._run(
            self.client.zrangebyscore(self.owner_channel(owner), f"({cursor}", "+inf")
        )
        found = await self.get_results([rid.decode() for rid in ids])
        return sorted(found, key=lambda item: item[0])

    async def store_results(self, results: Sequence[tuple[str, str, bytes, str]]) -> list[int]:
        """Store (request_id, owner, JSON, accepting gateway or "") results, first per id wins, and
        publish them; per result its cursor, 0 for a repeat. The JSON is stored as it came."""
        if not results:
            return []
        pipe = self.client.pipeline(transaction=False)
        gateway_prefix = self._key("gw", "")
        for rid, owner, data, gateway in results:
            await self._store_script(
                keys=[
                    self._key("result", rid),
                    self._key("pending", rid),
                    self._key("cursor"),
                    self.owner_channel(owner),
                ],
                args=[data, self.ttl_ms, rid, self.owner_channel(owner), gateway_prefix, gateway],
                client=pipe,
            )
        cursors = await self._run(pipe.execute())
        return [int(cursor) for cursor in cursors]

    async def replace_result(self, result: ResultMessage, cursor: int) -> None:
        """Put `result` in place of a malformed stored one (same cursor and TTL) and publish it to
        its owner's channel, for lookups and streams on the other gateways; best effort."""
        data = result.to_bytes()
        pipe = self.client.pipeline(transaction=False)
        pipe.set(
            self._key("result", result.request_id), b"%d %s" % (cursor, data), xx=True, keepttl=True
        )
        pipe.publish(
            self.owner_channel(result.owner),
            b"%d %s %s" % (cursor, result.request_id.encode(), data),
        )
        with contextlib.suppress(Exception):
            await self._run(pipe.execute())
