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


def test_only_the_embedded_broker_publishes_in_process() -> None:
    """Callers await memory:// publishes in turn; Kafka and Pub/Sub publishes go out concurrently."""
    assert messaging.connect("memory://api-check").publishes_in_process
    assert not messaging.connect("kafka://127.0.0.1:9").publishes_in_process
    assert not messaging.connect("gcp://project").publishes_in_process
