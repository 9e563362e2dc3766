"""TLS and SASL for every Kafka client, read from the broker URL."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.helpers import create_ssl_context

from messaging._url import BrokerURL, OptionReader

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """TLS and SASL for every client, read from the URL's userinfo and its `ssl_*` / `sasl_*` options."""

    protocol: str = "PLAINTEXT"
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    ssl_certfile: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient."""
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.ssl_context is not None:
            kwargs["ssl_context"] = self.ssl_context
        if self.sasl_mechanism is not None:
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        return kwargs

    @classmethod
    def from_url(cls, url: BrokerURL, read: OptionReader) -> KafkaSecurity:
        """Read the security options; a missing or contradictory one is a ValueError saying what to set."""
        where = url.redacted
        protocol = read.choice("security_protocol", SECURITY_PROTOCOLS)
        cafile = _readable_file(read.text("ssl_cafile", None), "ssl_cafile", where)
        certfile = _readable_file(read.text("ssl_certfile", None), "ssl_certfile", where)
        keyfile = _readable_file(read.text("ssl_keyfile", None), "ssl_keyfile", where)
        check_hostname = read.flag("ssl_check_hostname", True)
        mechanism = read.choice("sasl_mechanism", SASL_MECHANISMS)
        username = _one_of(
            where,
            ("the URL's user name", url.username),
            ("sasl_username", read.text("sasl_username", None)),
        )
        password_file = read.text("sasl_password_file", None)
        password_env = read.text("sasl_password_env", None)
        password = _one_of(
            where,
            ("the URL's password", url.password),
            ("sasl_password_file", _read_secret_file(password_file, where)),
            ("sasl_password_env", _read_secret_env(password_env, where)),
        )
        tls_given = _given(
            ssl_cafile=cafile,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            ssl_check_hostname=None if check_hostname else "false",
        )
        sasl_given = _given(
            sasl_mechanism=mechanism, **{"user name": username, "password": password}
        )
        if protocol is None:
            if tls_given or sasl_given:
                wanted = "SASL_SSL" if sasl_given else "SSL"
                raise ValueError(
                    f"kafka:// URL {where} sets {', '.join(tls_given + sasl_given)} but no "
                    f"security_protocol: add ?security_protocol={wanted} (or one of {', '.join(SECURITY_PROTOCOLS)})"
                )
            return cls()
        tls, sasl = _check_combination(
            where, protocol, tls_given, sasl_given, mechanism, username, password, certfile, keyfile
        )
        context = None
        if tls:
            try:
                context = create_ssl_context(cafile=cafile, certfile=certfile, keyfile=keyfile)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"kafka:// URL {where}: could not load the TLS files (ssl_cafile={cafile}, "
                    f"ssl_certfile={certfile}, ssl_keyfile={keyfile}): {exc}"
                ) from exc
            context.check_hostname = check_hostname
        return cls(
            protocol=protocol,
            ssl_context=context,
            ssl_certfile=certfile,
            sasl_mechanism=mechanism if sasl else None,
            sasl_username=username,
            sasl_password=password,
        )


def _given(**options: str | None) -> list[str]:
    """The names of the options that have a value."""
    return [name for name, value in options.items() if value is not None]


def _check_combination(
    where: str,
    protocol: str,
    tls_given: list[str],
    sasl_given: list[str],
    mechanism: str | None,
    username: str | None,
    password: str | None,
    certfile: str | None,
    keyfile: str | None,
) -> tuple[bool, bool]:
    """Whether `protocol` uses TLS and SASL; a ValueError naming what to change where options clash."""
    tls = protocol in ("SSL", "SASL_SSL")
    sasl = protocol in ("SASL_PLAINTEXT", "SASL_SSL")
    if tls_given and not tls:
        raise ValueError(
            f"kafka:// URL {where} sets {', '.join(tls_given)} with security_protocol={protocol}, "
            "which does not use TLS: use security_protocol=SSL or SASL_SSL, or drop the ssl_* options"
        )
    if sasl_given and not sasl:
        raise ValueError(
            f"kafka:// URL {where} sets SASL credentials ({', '.join(sasl_given)}) with "
            f"security_protocol={protocol}, which does not use SASL: use SASL_SSL or SASL_PLAINTEXT"
        )
    if sasl and mechanism is None:
        raise ValueError(
            f"kafka:// URL {where} uses security_protocol={protocol} without sasl_mechanism: "
            f"add ?sasl_mechanism= one of {', '.join(SASL_MECHANISMS)} (the one your provider names)"
        )
    if sasl and (not username or password is None):
        missing = "a user name" if not username else "a password"
        raise ValueError(
            f"kafka:// URL {where} uses SASL {mechanism} without {missing}: write "
            "kafka://USER:PASSWORD@host:port (percent-encoded), or give sasl_username= and "
            "sasl_password_file= or sasl_password_env="
        )
    if (certfile is None) != (keyfile is None):
        given, lacking = (
            ("ssl_certfile", "ssl_keyfile") if keyfile is None else ("ssl_keyfile", "ssl_certfile")
        )
        raise ValueError(
            f"kafka:// URL {where} sets {given} without {lacking}: a client certificate needs both"
        )
    return tls, sasl


def _readable_file(path: str | None, option: str, where: str) -> str | None:
    if path is not None and not os.access(path, os.R_OK):
        raise ValueError(f"kafka:// URL {where}: {option}={path} is not a readable file")
    return path


def _read_secret_file(path: str | None, where: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(
            f"kafka:// URL {where}: cannot read sasl_password_file={path}: {exc.strerror}"
        ) from None


def _read_secret_env(name: str | None, where: str) -> str | None:
    if name is None:
        return None
    value = os.environ.get(name)
    if value is None:
        raise ValueError(
            f"kafka:// URL {where}: sasl_password_env={name} names an environment variable that is not set"
        )
    return value


def _one_of(where: str, *sources: tuple[str, str | None]) -> str | None:
    """The one source that is given; two given at once is a ValueError naming them."""
    given = [(name, value) for name, value in sources if value is not None]
    if len(given) > 1:
        raise ValueError(
            f"kafka:// URL {where} gives {' and '.join(name for name, _ in given)}: keep one"
        )
    return given[0][1] if given else None
