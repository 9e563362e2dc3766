"""Rate-limiting of aiokafka's repeated log lines while a broker is away."""

from __future__ import annotations

import logging
import time

# aiokafka logs an ERROR per retry of every client while a broker is away: let one line
# of each kind through per window, and say how many were held back.
_CLIENT_LOG_WINDOW_S = 30.0


class _RepeatedLineFilter(logging.Filter):
    """Lets the first record of each (logger, message template) through once per window."""

    def __init__(self, window_s: float) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        first, held = self._seen.get(key, (-self.window_s, 0))
        if now - first < self.window_s:
            self._seen[key] = (first, held + 1)
            return False
        self._seen[key] = (now, 0)
        if held:
            record.msg = (
                f"{record.msg} ({held} similar lines held back in the last {self.window_s:g} s)"
            )
        return True


_client_log_filter: _RepeatedLineFilter | None = None


def quiet_client_logs(window_s: float = _CLIENT_LOG_WINDOW_S) -> None:
    """Rate-limit aiokafka's repeated WARNING/ERROR lines (idempotent; called when connecting)."""
    global _client_log_filter
    if _client_log_filter is None:
        _client_log_filter = _RepeatedLineFilter(window_s)
    names = [name for name in logging.root.manager.loggerDict if name.startswith("aiokafka")]
    for name in ["aiokafka", *names]:
        client_logger = logging.getLogger(name)
        if _client_log_filter not in client_logger.filters:
            client_logger.addFilter(_client_log_filter)
