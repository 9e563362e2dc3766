"""kafka:// TLS and SASL: URL options, redaction, and connections to Tansu over TLS and with SASL.

Tansu 0.6.0 cannot serve TLS itself (its `--cert` and `--key` flags are in one clap group that
accepts only one of them), so the TLS tests put a TLS-terminating proxy (Python's ssl, OpenSSL)
in front of a plaintext Tansu that advertises the proxy's port: every client connection, the
admin client's, the producer's and the consumers', goes through TLS. SASL tests use Tansu's own
`--authentication`, which offers SCRAM-SHA-256/512 and not PLAIN; users cannot be created on it
(`tansu user create` is refused while authentication is on, and memory storage does not outlive a
restart), so only refused logins are tested here.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import messaging
from messaging._url import parse_broker_url
from messaging.kafka import KafkaOptions
from tests.brokers import (
    BrokerProcess,
    free_port,
    start_tansu,
    unique_name,
)
from tests.conftest import missing_service

pytestmark = pytest.mark.timeout(60)

# --- URL options (no broker) -------------------------------------------------------------------


def test_userinfo_credentials_are_percent_decoded_for_sasl() -> None:
    """kafka://USER:PASSWORD@ gives SASL the percent-decoded user name and password."""
    options = KafkaOptions.from_url(
        parse_broker_url(
            "kafka://api%2Bkey:p%40ss%3Aw%2Fd@h:9093?security_protocol=SASL_SSL&sasl_mechanism=SCRAM-SHA-512"
        )
    )
    kwargs = options.security.client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("api+key", "p@ss:w/d")
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)


async def test_url_password_is_in_no_printed_form() -> None:
    """The URL's password shows in neither the PubSub's url, the options' repr nor a connect error."""
    secret = "hunter2-secret"
    url = f"kafka://alice:{secret}@127.0.0.1:{free_port()}?security_protocol=SASL_PLAINTEXT&sasl_mechanism=PLAIN"
    pubsub = messaging.connect(url, connect_timeout=2)
    assert pubsub.url == f"kafka://***@{url.split('@')[1].split('?')[0]}"
    printed = [pubsub.url, repr(pubsub.options), repr(parse_broker_url(url))]  # type: ignore[attr-defined]
    with pytest.raises(messaging.BrokerUnavailable) as refused:
        await pubsub.connect()
    printed.append(str(refused.value))
    with pytest.raises(ValueError) as invalid:
        messaging.connect(url + "&sasl_mechanism=PLAIN")  # given twice
    printed.append(str(invalid.value))
    assert not [text for text in printed if secret in text]


def test_password_from_a_file_or_an_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sasl_password_file= and sasl_password_env= supply the password, so it need not sit in the URL."""
    (tmp_path / "password").write_text("from-file\n")
    monkeypatch.setenv("KAFKA_TEST_PASSWORD", "from-env")
    base = "kafka://h:9093?security_protocol=SASL_SSL&sasl_mechanism=PLAIN&sasl_username=bob"
    from_file = KafkaOptions.from_url(
        parse_broker_url(f"{base}&sasl_password_file={tmp_path / 'password'}")
    )
    from_env = KafkaOptions.from_url(
        parse_broker_url(f"{base}&sasl_password_env=KAFKA_TEST_PASSWORD")
    )
    assert from_file.security.sasl_password == "from-file"
    assert from_env.security.sasl_password == "from-env"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        pytest.param(
            "security_protocol=SSL&ssl_certfile=/etc/hostname",
            "ssl_certfile without ssl_keyfile",
            id="cert-without-key",
        ),
        pytest.param(
            "security_protocol=SASL_SSL&sasl_mechanism=SCRAM-SHA-256",
            "without a user name",
            id="mechanism-without-credentials",
        ),
        pytest.param(
            "security_protocol=PLAINTEXT&ssl_cafile=/etc/hostname",
            "does not use TLS",
            id="ssl-with-plaintext",
        ),
        pytest.param(
            "ssl_cafile=/etc/hostname", "add ?security_protocol=SSL", id="ssl-without-protocol"
        ),
        pytest.param(
            "security_protocol=SASL_SSL&sasl_username=u&sasl_password_env=HOME",
            "without sasl_mechanism",
            id="sasl-without-mechanism",
        ),
        pytest.param(
            "security_protocol=SSL&sasl_mechanism=PLAIN", "does not use SASL", id="sasl-with-ssl"
        ),
        pytest.param(
            "security_protocol=SASL_SSL&sasl_mechanism=GSSAPI",
            "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
            id="unsupported-mechanism",
        ),
        pytest.param(
            "security_protocol=TLS", "PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL", id="bad-protocol"
        ),
        pytest.param(
            "security_protocol=SSL&ssl_cafile=/no/such/ca.pem",
            "ssl_cafile=/no/such/ca.pem is not a readable file",
            id="missing-ca-file",
        ),
        pytest.param(
            "security_protocol=SSL&ssl_check_hostname=maybe", "true or false", id="bad-flag"
        ),
    ],
)
def test_inconsistent_security_options_are_refused(query: str, message: str) -> None:
    """Security options that cannot work together are a ValueError saying what to change."""
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        messaging.connect(f"kafka://127.0.0.1:9093?{query}")


def test_two_password_sources_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A password in the URL and in sasl_password_env at once is refused, naming both."""
    monkeypatch.setenv("KAFKA_TEST_PASSWORD", "x")
    with pytest.raises(ValueError, match="the URL's password and sasl_password_env"):
        messaging.connect(
            "kafka://u:p@h:9093?security_protocol=SASL_SSL&sasl_mechanism=PLAIN"
            "&sasl_password_env=KAFKA_TEST_PASSWORD"
        )


def test_credentials_on_other_schemes_are_refused() -> None:
    """user:password@ on memory:// or gcp:// is refused without echoing the password."""
    with pytest.raises(ValueError, match="only kafka:// uses them") as refused:
        messaging.connect("gcp://me:topsecret@project")
    assert "topsecret" not in str(refused.value)


# --- throwaway PKI and a TLS front for Tansu --------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    client_cert: Path
    client_key: Path
    server: (
        ssl.SSLContext
    )  # the proxy's: broker certificate for "localhost", client certificate required


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    dns: str | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if dns is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None
) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


def make_pki(directory: Path) -> Pki:
    """A CA, a broker certificate for localhost (no IP address), a client certificate and a stranger CA."""
    ca_key, other_key, server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()) for _ in range(4)
    )
    ca = _write(directory / "ca.pem", _issue("test-ca", ca_key, None))
    other_ca = _write(directory / "other-ca.pem", _issue("other-ca", other_key, None))
    server = _write(
        directory / "server.pem",
        _issue("localhost", server_key, ("test-ca", ca_key), dns="localhost"),
        server_key,
    )
    client = _write(
        directory / "client.pem", _issue("fmnist", client_key, ("test-ca", ca_key)), client_key
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    context.load_cert_chain(server, server.with_suffix(".key"))
    context.verify_mode = ssl.CERT_REQUIRED
    return Pki(ca, other_ca, client, client.with_suffix(".key"), context)


class TlsProxy:
    """Terminates TLS on `port` and forwards the bytes to a plaintext port, on a thread of its own."""

    def __init__(self, context: ssl.SSLContext, port: int, target_port: int) -> None:
        self.port = port
        self._context = context
        self._target_port = target_port
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    def __enter__(self) -> TlsProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TLS proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._loop.set_exception_handler(
            lambda loop, context: None
        )  # refused handshakes are the point
        server = await asyncio.start_server(
            self._forward, "127.0.0.1", self.port, ssl=self._context
        )
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _forward(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        try:
            broker_in, broker_out = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            client_out.close()
            return
        await asyncio.gather(
            self._pipe(client_in, broker_out),
            self._pipe(broker_in, client_out),
            return_exceptions=True,
        )

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()
        finally:
            sink.close()


@dataclass(frozen=True)
class TlsKafka:
    pki: Pki
    port: int  # the TLS port; Tansu advertises it as localhost:port

    def url(self, host: str = "localhost", **options: str) -> str:
        query = "&".join(f"{name}={value}" for name, value in options.items())
        return f"kafka://{host}:{self.port}?security_protocol=SSL&session_timeout_ms=2000&heartbeat_interval_ms=200&fetch_max_wait_ms=50&{query}"

    def client_options(self) -> dict[str, str]:
        return {
            "ssl_cafile": str(self.pki.ca),
            "ssl_certfile": str(self.pki.client_cert),
            "ssl_keyfile": str(self.pki.client_key),
        }


def _tansu(log_dir: Path, *args: str, advertised_port: int | None = None) -> BrokerProcess:
    try:
        return start_tansu(log_dir, *args, advertised_port=advertised_port)
    except RuntimeError as exc:
        missing_service(str(exc))
        raise AssertionError("unreachable") from exc


@pytest.fixture(scope="module")
def tls_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsKafka]:
    """Tansu behind a TLS proxy that requires a client certificate signed by the test CA."""
    directory = tmp_path_factory.mktemp("tls")
    pki = make_pki(directory)
    proxy_port = free_port()
    broker = _tansu(directory, advertised_port=proxy_port)
    try:
        with TlsProxy(pki.server, proxy_port, broker.port):
            yield TlsKafka(pki, proxy_port)
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def sasl_kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a Tansu that requires SASL authentication (`--authentication`)."""
    broker = _tansu(tmp_path_factory.mktemp("sasl"), "--authentication")
    try:
        yield f"127.0.0.1:{broker.port}"
    finally:
        broker.stop()


# --- against Tansu ----------------------------------------------------------------------------


@pytest.mark.kafka
async def test_publish_and_subscribe_over_tls_with_a_client_certificate(
    tls_kafka: TlsKafka,
) -> None:
    """A message published over TLS (with a client certificate) reaches a subscriber over TLS."""
    topic, group = unique_name("tls"), unique_name("g")
    url = tls_kafka.url(**tls_kafka.client_options())
    pubsub = messaging.connect(url, kafka_idempotence=False, kafka_partitions=1)
    async with pubsub, pubsub.subscribe(topic, group=group) as messages:
        await pubsub.publish(topic, b"over tls", key="k", attributes={"a": "1"})
        message = await asyncio.wait_for(anext(messages), 20)
        await message.ack()
    assert (message.data, message.key, message.attributes) == (b"over tls", "k", {"a": "1"})


@pytest.mark.kafka
async def test_a_broker_certificate_from_another_ca_is_refused(tls_kafka: TlsKafka) -> None:
    """A client trusting another CA gets BrokerUnavailable naming the refused certificate and ssl_cafile."""
    options = {**tls_kafka.client_options(), "ssl_cafile": str(tls_kafka.pki.other_ca)}
    pubsub = messaging.connect(
        tls_kafka.url(**options), kafka_idempotence=False, connect_timeout=10
    )
    with pytest.raises(messaging.BrokerUnavailable, match=r"certificate was refused .*ssl_cafile"):
        await pubsub.connect()


@pytest.mark.kafka
async def test_host_name_check_can_be_switched_off(tls_kafka: TlsKafka) -> None:
    """An address the certificate does not name is refused, and accepted with ssl_check_hostname=false."""
    options = tls_kafka.client_options()
    checked = messaging.connect(tls_kafka.url("127.0.0.1", **options), kafka_idempotence=False)
    with pytest.raises(messaging.BrokerUnavailable, match="certificate was refused"):
        await checked.connect()
    unchecked = tls_kafka.url("127.0.0.1", ssl_check_hostname="false", **options)
    async with messaging.connect(unchecked, kafka_idempotence=False) as pubsub:
        await pubsub.ping()


@pytest.mark.kafka
async def test_a_client_without_its_certificate_is_refused(tls_kafka: TlsKafka) -> None:
    """Without ssl_certfile/ssl_keyfile a broker that wants a client certificate gives BrokerUnavailable."""
    url = tls_kafka.url(ssl_cafile=str(tls_kafka.pki.ca))
    pubsub = messaging.connect(url, kafka_idempotence=False, connect_timeout=10)
    with pytest.raises(messaging.BrokerUnavailable, match="ssl_certfile and ssl_keyfile"):
        await pubsub.connect()


@pytest.mark.kafka
async def test_a_scram_login_with_unknown_credentials_is_refused(sasl_kafka_bootstrap: str) -> None:
    """A SCRAM-SHA-512 login the broker refuses is a BrokerUnavailable naming the user and what to check."""
    url = (
        f"kafka://nobody:wrong@{sasl_kafka_bootstrap}"
        "?security_protocol=SASL_PLAINTEXT&sasl_mechanism=SCRAM-SHA-512"
    )
    pubsub = messaging.connect(url, kafka_idempotence=False, connect_timeout=10)
    with pytest.raises(messaging.BrokerUnavailable) as refused:
        await pubsub.connect()
    assert "SASL SCRAM-SHA-512 login as 'nobody' failed" in str(refused.value)
    assert "wrong" not in str(refused.value)


@pytest.mark.kafka
async def test_a_mechanism_the_broker_does_not_offer_is_named(sasl_kafka_bootstrap: str) -> None:
    """SASL PLAIN against Tansu (SCRAM only) is a BrokerUnavailable naming the mechanism to check."""
    url = (
        f"kafka://alice:pw@{sasl_kafka_bootstrap}"
        "?security_protocol=SASL_PLAINTEXT&sasl_mechanism=PLAIN"
    )
    pubsub = messaging.connect(url, kafka_idempotence=False, connect_timeout=10)
    with pytest.raises(
        messaging.BrokerUnavailable, match=r"SASL PLAIN login as 'alice' failed .*mechanism"
    ):
        await pubsub.connect()
