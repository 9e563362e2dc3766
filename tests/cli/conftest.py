"""Fixtures the CLI tests share with the SDK's: a classifier and a live `fmnist` server."""

from tests.sdk.conftest import classifier, live_server

__all__ = ["classifier", "live_server"]
