"""The exception tree of the messaging layer.

MessagingError                  anything the broker layer raises on purpose
 ├── BrokerUnavailable          the broker cannot be reached, or refused a request it must serve
 ├── MissingDependency          the backend's optional client library is not installed
 ├── NotConnected               the PubSub was used before `connect()` / after `close()`
 └── BacklogFull                memory://: a consumer group's backlog stayed full past the timeout
"""

from __future__ import annotations


class MessagingError(Exception):
    """Base class of every error this package raises on purpose."""


class BrokerUnavailable(MessagingError):
    """The broker could not be reached or refused a request; the message names the URL."""


class MissingDependency(MessagingError, ImportError):
    """A backend's client library is missing; the message holds the exact `pip install` to run."""


class NotConnected(MessagingError):
    """The PubSub was used before `connect()` (or `async with`) or after `close()`."""


class BacklogFull(MessagingError):
    """memory://: a group's unacknowledged backlog stayed at its bound for longer than the publish timeout."""
