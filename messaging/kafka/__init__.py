"""The `kafka://host:port[,host:port]` backend on aiokafka: consumer groups, commit-after-ack, keys and headers.

* Producer: `acks=all`, idempotent by default (`?idempotence=`, else `kafka_idempotence`; brokers
  that refuse `InitProducerId`, such as Tansu, need `?idempotence=false`). `publish()` returns when
  the broker acknowledged the record; concurrent publishes share batches (`linger_ms`). A record
  with a key goes to its key's partition (murmur2, as the Java client); records without one go to
  the topic's sticky partition (KIP-480, the Java client's default since Kafka 2.4): the same one
  until its batch goes to the broker, then another at random.
* Topics are created on first use (or by `ensure_topics`) with `?partitions=` (else `kafka_partitions`) partitions and
  `max.message.bytes = max_message_bytes`; the producer's request size and the consumer's fetch
  sizes are raised to the same bound, so 1 MB images fit by default.
* Consumer: one aiokafka consumer per subscription, auto-commit off. An offset is committed only
  when it and every earlier offset of its partition were acked (acks may come out of order); commits
  are coalesced in the background. On a rebalance the acked prefix of revoked partitions is
  committed and their unsettled messages are dropped locally: the partition's new owner gets them.
* A subscription started at a time (`start=<unix seconds>`) seeks every partition it is assigned,
  on every (re)assignment, to the first record whose timestamp is at or after that time
  (`offsets_for_times`), or to the end where no record is that new; the group's committed offsets
  are ignored for those partitions.
* `nack()` hands the message back to this subscription's own queue (it is delivered again soon);
  its offset stays uncommitted, so if this consumer dies first another member of the group gets it.

URL options: `linger_ms` (2), `max_batch_bytes` (1048576), `max_message_bytes` (4194304), `request_timeout_ms` (30000),
`session_timeout_ms` (10000), `heartbeat_interval_ms` (3000), `max_poll_interval_ms` (300000),
`rebalance_timeout_ms` (the session timeout), `fetch_max_wait_ms` (100),
`replication_factor` (min(3, brokers)), `client_id`, `idempotence` (true), `partitions` (4).

Security (every client the backend makes gets it: producer, consumers, admin client):
`kafka://[user:password@]host:port?security_protocol=PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL`,
`ssl_cafile`, `ssl_certfile` + `ssl_keyfile` (a client certificate), `ssl_check_hostname` (true),
`sasl_mechanism=PLAIN|SCRAM-SHA-256|SCRAM-SHA-512`, `sasl_username` (or the URL's user),
`sasl_password_file` or `sasl_password_env` (or the URL's password, percent-encoded). Options that
do not fit together are refused when the PubSub is made, naming what to change.
"""

from __future__ import annotations

from messaging.errors import MissingDependency

try:  # before the submodules, so that a missing library gives the one message below
    import aiokafka  # noqa: F401
except ImportError as missing:  # pragma: no cover - exercised by a test that hides aiokafka
    raise MissingDependency(
        f"kafka:// needs aiokafka ({missing}); install it with: pip install 'fmnist-service[kafka]'"
    ) from missing

from messaging.kafka._logs import quiet_client_logs
from messaging.kafka._options import KafkaOptions
from messaging.kafka._pubsub import KafkaPubSub
from messaging.kafka._security import SASL_MECHANISMS, SECURITY_PROTOCOLS, KafkaSecurity
from messaging.kafka._subscription import KafkaMessage, KafkaSubscription, _PartitionAcks

__all__ = [
    "SASL_MECHANISMS",
    "SECURITY_PROTOCOLS",
    "KafkaMessage",
    "KafkaOptions",
    "KafkaPubSub",
    "KafkaSecurity",
    "KafkaSubscription",
    "_PartitionAcks",
    "quiet_client_logs",
]
