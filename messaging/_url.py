"""Broker URLs: split `scheme://location?options` and read backend options with types and limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

SUPPORTED_SCHEMES = ("memory", "kafka", "gcp")
URL_FORMS = "memory://[name], kafka://[user:password@]host:port[,host:port] or gcp://PROJECT_ID"


def redact_url(url: str) -> str:
    """`url` without credentials (userinfo) or query string, for messages about a URL that may not parse."""
    # Up to the last "@": a password with an unescaped "?", "/" or "@" must not leak either.
    head, at, tail = url.rpartition("@")
    if at:
        scheme, has_scheme, _ = head.partition("://")
        url = f"{scheme}://***@{tail}" if has_scheme else f"***@{tail}"
    return url.split("?", 1)[0]


@dataclass(frozen=True)
class BrokerURL:
    """A parsed broker URL. `location` is what sits between `scheme://` (or `userinfo@`) and `?`.

    `username` and `password` come from the userinfo, percent-decoded; they and the raw URL are
    kept out of `repr()`, and `redacted` is the form to print.
    """

    raw: str = field(repr=False)
    scheme: str
    location: str
    options: dict[str, str] = field(default_factory=dict)
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def redacted(self) -> str:
        """The URL without credentials or query string, safe to put in logs and error messages."""
        userinfo = "***@" if self.username is not None or self.password is not None else ""
        return f"{self.scheme}://{userinfo}{self.location}"


def parse_broker_url(url: str) -> BrokerURL:
    """Split a broker URL; raises ValueError naming the supported schemes for anything else."""
    if "://" not in url:
        raise ValueError(f"broker URL {redact_url(url)!r} has no scheme; use {URL_FORMS}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(
            f"unsupported broker URL scheme {parts.scheme!r} in {redact_url(url)!r}; "
            f"supported schemes: {', '.join(s + '://' for s in SUPPORTED_SCHEMES)} ({URL_FORMS})"
        )
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name in options:
            raise ValueError(f"broker URL option {name!r} is given twice in {redact_url(url)!r}")
        options[name] = value
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        if scheme != "kafka":
            raise ValueError(
                f"broker URL {redact_url(url)!r} carries credentials (user:password@); "
                "only kafka:// uses them (SASL)"
            )
        name, colon, secret = userinfo.partition(":")
        username = unquote(name)
        password = unquote(secret) if colon else None
    location = hosts + (parts.path if parts.path not in ("", "/") else "")
    return BrokerURL(
        raw=url,
        scheme=scheme,
        location=location,
        options=options,
        username=username,
        password=password,
    )


class OptionReader:
    """Reads typed `?name=value` options once each; `finish()` rejects any it did not read."""

    def __init__(self, url: BrokerURL) -> None:
        self._url = url
        self._unread = dict(url.options)
        self._known: list[str] = []

    @property
    def pending(self) -> frozenset[str]:
        """The options given in the URL and not read yet."""
        return frozenset(self._unread)

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

    def flag(self, name: str, default: bool) -> bool:
        text = self._take(name)
        if text is None:
            return default
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise self._fail(name, text, "true or false")

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        """The option upper-cased, if given; it must be one of `choices`."""
        text = self._take(name)
        if text is None:
            return None
        if text.upper() not in choices:
            raise self._fail(name, text, "one of " + ", ".join(choices))
        return text.upper()

    def finish(self) -> None:
        """Raise ValueError if the URL carries an option this backend does not know."""
        if self._unread:
            unknown = ", ".join(sorted(self._unread))
            known = ", ".join(sorted(self._known)) or "none"
            raise ValueError(
                f"unknown option(s) {unknown} in broker URL {self._url.redacted}; "
                f"{self._url.scheme}:// accepts: {known}"
            )
