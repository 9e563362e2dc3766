"""Broker URLs: split `scheme://location?options` and read backend options with types and limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

SUPPORTED_SCHEMES = ("memory", "kafka", "gcp")
URL_FORMS = "memory://[name], kafka://host:port[,host:port] or gcp://PROJECT_ID"


@dataclass(frozen=True)
class BrokerURL:
    """A parsed broker URL. `location` is what sits between `scheme://` and `?`."""

    raw: str
    scheme: str
    location: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def redacted(self) -> str:
        """The URL without its query string, safe to put in logs and error messages."""
        return f"{self.scheme}://{self.location}"


def parse_broker_url(url: str) -> BrokerURL:
    """Split a broker URL; raises ValueError naming the supported schemes for anything else."""
    if "://" not in url:
        raise ValueError(f"broker URL {url!r} has no scheme; use {URL_FORMS}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(
            f"unsupported broker URL scheme {parts.scheme!r} in {url!r}; "
            f"supported schemes: {', '.join(s + '://' for s in SUPPORTED_SCHEMES)} ({URL_FORMS})"
        )
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name in options:
            raise ValueError(f"broker URL option {name!r} is given twice in {url!r}")
        options[name] = value
    location = parts.netloc + (parts.path if parts.path not in ("", "/") else "")
    return BrokerURL(raw=url, scheme=scheme, location=location, options=options)


class OptionReader:
    """Reads typed `?name=value` options once each; `finish()` rejects any it did not read."""

    def __init__(self, url: BrokerURL) -> None:
        self._url = url
        self._unread = dict(url.options)
        self._known: list[str] = []

    def _take(self, name: str) -> str | None:
        self._known.append(name)
        return self._unread.pop(name, None)

    def _fail(self, name: str, value: str, expected: str) -> ValueError:
        return ValueError(
            f"broker URL option {name}={value!r} in {self._url.redacted}: expected {expected}"
        )

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        text = self._take(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise self._fail(name, text, "an integer") from None
        if value < minimum:
            raise self._fail(name, text, f"an integer >= {minimum}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        text = self._take(name)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            raise self._fail(name, text, "a number") from None
        if not value >= minimum:
            raise self._fail(name, text, f"a number >= {minimum}")
        return value

    def text(self, name: str, default: str | None) -> str | None:
        value = self._take(name)
        return default if value is None else value

    def finish(self) -> None:
        """Raise ValueError if the URL carries an option this backend does not know."""
        if self._unread:
            unknown = ", ".join(sorted(self._unread))
            known = ", ".join(sorted(self._known)) or "none"
            raise ValueError(
                f"unknown option(s) {unknown} in broker URL {self._url.redacted}; "
                f"{self._url.scheme}:// accepts: {known}"
            )
