"""The public surface of `messaging`: what `__all__` exports and the exception tree."""

from __future__ import annotations

import messaging


def test_all_is_sorted_and_every_name_exists() -> None:
    """`messaging.__all__` is sorted and names only attributes the package has."""
    assert messaging.__all__ == sorted(
        messaging.__all__, key=lambda name: (not name.isupper(), name)
    )
    assert [name for name in messaging.__all__ if not hasattr(messaging, name)] == []


def test_every_error_is_a_messaging_error() -> None:
    """Callers can catch MessagingError for every error the layer raises on purpose."""
    for error in (
        messaging.BrokerUnavailable,
        messaging.MissingDependency,
        messaging.NotConnected,
        messaging.BacklogFull,
    ):
        assert issubclass(error, messaging.MessagingError)
    assert issubclass(messaging.MissingDependency, ImportError)


def test_only_the_embedded_broker_is_not_durable() -> None:
    """memory://'s log dies with the process; Kafka's and Pub/Sub's outlive it."""
    assert not messaging.connect("memory://api-check").durable
    assert messaging.connect("kafka://127.0.0.1:9").durable
    assert messaging.connect("gcp://project").durable
