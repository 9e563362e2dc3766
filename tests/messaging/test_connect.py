"""messaging.connect(): URL schemes and options, missing extras, unreachable brokers."""

from __future__ import annotations

import sys
import time

import pytest

import messaging
from tests.brokers import connect_options, free_port

pytestmark = pytest.mark.timeout(30)


def test_unknown_scheme_lists_the_supported_ones() -> None:
    """An unsupported scheme is a ValueError naming memory://, kafka:// and gcp://."""
    with pytest.raises(ValueError, match=r"memory://, kafka://, gcp://"):
        messaging.connect("redis://localhost:6379")


def test_url_without_scheme_is_rejected() -> None:
    """A bare host:port is a ValueError showing the URL forms."""
    with pytest.raises(ValueError, match="has no scheme"):
        messaging.connect("localhost:9092")


async def test_invalid_topic_name_is_rejected_on_every_backend() -> None:
    """A topic name that some backend would refuse (Pub/Sub needs 3+ characters) is a ValueError."""
    async with messaging.connect("memory://") as pubsub:
        with pytest.raises(ValueError, match="invalid topic name"):
            pubsub.subscribe("ab", group="g")
        with pytest.raises(ValueError, match="invalid topic name"):
            await pubsub.publish("has space", b"x")


@pytest.mark.parametrize(
    ("url", "module", "extra"),
    [
        ("kafka://127.0.0.1:9", "aiokafka", "kafka"),
        ("gcp://project", "google.cloud.pubsub_v1", "gcp"),
    ],
)
def test_missing_client_library_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, url: str, module: str, extra: str
) -> None:
    """Without the backend's library, connect() raises MissingDependency with the exact pip install."""
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    parent, _, name = module.rpartition(".")
    if (
        parent in sys.modules
    ):  # `from parent import name` would find an attribute left by an earlier import
        monkeypatch.delattr(sys.modules[parent], name, raising=False)
    monkeypatch.delitem(sys.modules, f"messaging.{url.split(':')[0]}", raising=False)
    with pytest.raises(
        messaging.MissingDependency, match=rf"pip install 'fmnist-service\[{extra}\]'"
    ):
        messaging.connect(url)


@pytest.mark.parametrize(
    "scheme",
    [pytest.param("kafka", marks=pytest.mark.kafka), pytest.param("gcp", marks=pytest.mark.gcp)],
)
async def test_unreachable_broker_raises_broker_unavailable_in_time(scheme: str) -> None:
    """Connecting to a closed port raises BrokerUnavailable naming the URL, within the connect timeout."""
    port = free_port()  # nothing listens there
    url = (
        f"kafka://127.0.0.1:{port}"
        if scheme == "kafka"
        else f"gcp://fmnist-test?emulator=127.0.0.1:{port}"
    )
    started = time.monotonic()
    with pytest.raises(messaging.BrokerUnavailable, match=f"127.0.0.1:{port}|fmnist-test"):
        async with messaging.connect(url, connect_timeout=2.0, kafka_idempotence=False):
            pass
    assert time.monotonic() - started < 4.0


@pytest.mark.kafka
async def test_tansu_without_idempotence_setting_names_the_setting(kafka_url: str) -> None:
    """A broker that refuses InitProducerId gives an error naming the URL option ?idempotence=false."""
    if connect_options(kafka_url)["kafka_idempotence"]:
        pytest.skip("the external test broker supports the idempotent producer")
    with pytest.raises(messaging.BrokerUnavailable, match=r"\?idempotence=false"):
        async with messaging.connect(kafka_url, connect_timeout=5.0, kafka_idempotence=True):
            pass


def test_kafka_url_options_set_idempotence_and_partitions() -> None:
    """`?idempotence=false&partitions=12` in a kafka:// URL win over connect()'s kafka_* arguments."""
    pubsub = messaging.connect(
        "kafka://127.0.0.1:9?idempotence=false&partitions=12", kafka_idempotence=True
    )
    assert (pubsub.idempotence, pubsub.partitions) == (False, 12)  # type: ignore[attr-defined]


def test_kafka_without_url_options_keeps_connects_arguments() -> None:
    """A kafka:// URL without those options uses connect()'s kafka_idempotence and kafka_partitions."""
    pubsub = messaging.connect("kafka://127.0.0.1:9", kafka_idempotence=False, kafka_partitions=3)
    assert (pubsub.idempotence, pubsub.partitions) == (False, 3)  # type: ignore[attr-defined]


@pytest.mark.parametrize("query", ["partitions=0", "idempotence=maybe"])
def test_kafka_url_refuses_bad_idempotence_or_partitions(query: str) -> None:
    """A bad ?partitions= or ?idempotence= is a ValueError naming the option."""
    with pytest.raises(ValueError, match=query.split("=")[0]):
        messaging.connect(f"kafka://127.0.0.1:9?{query}")
