"""The `gcp://PROJECT_ID` backend on google-cloud-pubsub: one subscription per group, streaming pull, asyncio bridge.

* Topics are created on first use (or by `ensure_topics`) with message retention
  (`topic_retention_s`, 1 day by default); each consumer group is one subscription named
  `<topic>.<group>`, created the first time the group subscribes. A new group with
  `start="earliest"` is sought back over the retention window, so it also receives what was
  published before it existed, as on Kafka; with `start="latest"` it is sought to its creation.
  (`?topic_retention_s=0` creates topics without retention: then every new group starts "latest".
  The emulator cannot seek ordered subscriptions: there, `start` takes effect only with
  `?ordering=false`; otherwise a new group sees what the topic retained.)
  A subscription started at a time (`start=<unix seconds>`) seeks the group's subscription to that
  time each time it opens: messages published since (within the topic's retention) are delivered
  again, acked or not. The emulator seeks unordered subscriptions only; on an ordered one it logs
  `pubsub_seek_unsupported` and the subscription keeps its own position (unacked messages only).
* Keys become ordering keys (subscriptions have message ordering on), so messages with one key
  arrive in order, as on Kafka; attributes are Pub/Sub attributes. Pub/Sub hands out the next
  message of a key only after the previous one was acked: give messages that a consumer should
  hold at the same time (a batch) different keys, as request ids are. `?ordering=false` turns it off.
* Streaming pull with `FlowControl(max_messages=max_in_flight)`; the client library extends the
  leases of held messages, so a slow batch is not redelivered. `ack()` / `nack()` map to Pub/Sub's.
  Messages a closed (or dead) subscription held come back to the group after the ack deadline
  (`ack_deadline_s`); ones the client pulled but had not handed over are nacked at once.
* The client's threads never touch the event loop: its callback hands each message over with
  `loop.call_soon_threadsafe`, publish futures are awaited through `asyncio.wrap_future`, and
  blocking admin calls run in worker threads.
* Recovery: when the emulator restarts empty (or a project's topics and subscriptions are deleted),
  the backend notices (a failed gRPC channel, NotFound on publish, a streaming pull ended by
  NotFound), reports `link_up` and `Subscription.healthy` False, waits until the broker answers,
  re-creates every topic and subscription it made (same names and settings; a re-created
  subscription starts from its creation, which is all a new empty topic holds), restarts the
  streaming pulls and reports healthy again, logging one line per state change. Publishes during
  the outage fail with `BrokerUnavailable` within the connect timeout.
* `PUBSUB_EMULATOR_HOST` (or the URL option `?emulator=host:port`) points the clients at the emulator.

URL options: `emulator`, `ack_deadline_s` (60), `max_latency_ms` (publish batching, 5), `ordering` (true),
`topic_retention_s` (86400; Pub/Sub allows 600 to 2678400, or 0 for none; retained bytes are billed).
"""

from __future__ import annotations

from messaging.errors import MissingDependency

try:  # before the submodules, so that a missing library gives the one message below
    import google.api_core.exceptions
    import google.cloud.pubsub_v1  # noqa: F401
    import grpc  # noqa: F401
except ImportError as missing:  # pragma: no cover - exercised by a test that hides the library
    raise MissingDependency(
        f"gcp:// needs google-cloud-pubsub ({missing}); install it with: pip install 'fmnist-service[gcp]'"
    ) from missing

from messaging.gcp._options import GcpOptions
from messaging.gcp._pubsub import GooglePubSub
from messaging.gcp._subscription import GoogleMessage, GoogleSubscription

__all__ = ["GcpOptions", "GoogleMessage", "GooglePubSub", "GoogleSubscription"]
