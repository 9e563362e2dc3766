"""Settings: environment parsing, validation, and the README's generated table."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.settings import GROUPS, Settings, with_settings_table
from tests.conftest import REPO_ROOT


def test_readme_settings_table_is_current() -> None:
    """README.md's settings table equals the one generated from Settings (`python -m app.settings --update README.md`)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert readme == with_settings_table(readme)


def test_every_setting_is_documented() -> None:
    """Each field has a description, since the README table is built from them."""
    assert all(field.description for field in Settings.model_fields.values())


def test_api_keys_are_read_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """FMNIST_API_KEYS=a, b is two keys, blanks dropped."""
    monkeypatch.setenv("FMNIST_API_KEYS", "alpha, beta,,")
    assert Settings().api_keys == ["alpha", "beta"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FMNIST_DEFAULT_MODEL", "no/slashes"),
        ("FMNIST_DEVICE", "tpu"),
        ("FMNIST_MAX_BATCH_SIZE", "0"),
        ("FMNIST_RESULTS_TOPIC", "ab"),
    ],
)
def test_invalid_values_are_refused_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """A bad value fails at start-up, naming the setting."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("FMNIST_").lower()):
        Settings()


@pytest.mark.parametrize(
    ("old", "new", "value"),
    [
        ("FMNIST_MAX_IN_FLIGHT", "max_pending_requests", 7),
        ("FMNIST_MAX_WAIT_MS", "batch_fill_wait_ms", 2.5),
        ("FMNIST_MAX_WAIT_S", "max_sync_wait_s", 9.0),
        ("FMNIST_MAX_QUEUE", "max_queued_images", 512),
    ],
)
def test_a_deprecated_variable_still_sets_its_renamed_setting(
    monkeypatch: pytest.MonkeyPatch, old: str, new: str, value: float
) -> None:
    """An old variable name fills the renamed setting when the new one is unset."""
    monkeypatch.setenv(old, str(value))
    assert getattr(Settings(), new) == value


def test_the_new_variable_wins_over_its_deprecated_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """FMNIST_MAX_PENDING_REQUESTS beats FMNIST_MAX_IN_FLIGHT when both are set."""
    monkeypatch.setenv("FMNIST_MAX_IN_FLIGHT", "7")
    monkeypatch.setenv("FMNIST_MAX_PENDING_REQUESTS", "11")
    assert Settings().max_pending_requests == 11


def test_a_deprecated_variable_logs_one_warning_naming_the_new_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """FMNIST_MAX_WAIT_MS logs one deprecation warning naming FMNIST_BATCH_FILL_WAIT_MS, however often read."""
    monkeypatch.setattr("app.settings._warned", set())
    monkeypatch.setenv("FMNIST_MAX_WAIT_MS", "3")
    with caplog.at_level("WARNING", logger="app.settings"):
        Settings()
        Settings()
    warnings = [r.getMessage() for r in caplog.records if "deprecated_setting" in r.getMessage()]
    assert warnings == [
        "event=deprecated_setting variable=FMNIST_MAX_WAIT_MS use=FMNIST_BATCH_FILL_WAIT_MS"
    ]


def test_deprecated_kafka_settings_fill_the_url_options_it_leaves_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FMNIST_KAFKA_IDEMPOTENCE/PARTITIONS become ?idempotence=/?partitions= unless the URL sets them."""
    monkeypatch.setenv("FMNIST_BROKER_URL", "kafka://k:9092?linger_ms=1&partitions=2")
    monkeypatch.setenv("FMNIST_KAFKA_IDEMPOTENCE", "false")
    monkeypatch.setenv("FMNIST_KAFKA_PARTITIONS", "12")
    assert Settings().broker_url == "kafka://k:9092?linger_ms=1&partitions=2&idempotence=false"


def test_deprecated_kafka_settings_log_one_warning_each(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """FMNIST_KAFKA_IDEMPOTENCE logs one deprecation warning naming the URL option, however often read."""
    monkeypatch.setattr("app.settings._warned", set())
    monkeypatch.setenv("FMNIST_BROKER_URL", "kafka://k:9092")
    monkeypatch.setenv("FMNIST_KAFKA_IDEMPOTENCE", "false")
    with caplog.at_level("WARNING", logger="app.settings"):
        Settings()
        Settings()
    warnings = [r.getMessage() for r in caplog.records if "deprecated_setting" in r.getMessage()]
    assert warnings == [
        'event=deprecated_setting variable=FMNIST_KAFKA_IDEMPOTENCE use="FMNIST_BROKER_URL ?idempotence="'
    ]


def test_every_setting_belongs_to_exactly_one_group() -> None:
    """The process groups partition Settings' fields: none missing, none in two groups."""
    grouped = [name for group in GROUPS.values() for name in group.model_fields]
    assert sorted(grouped) == sorted(Settings.model_fields)


def test_a_group_holds_only_its_own_settings() -> None:
    """settings.gateway carries the gateway's fields with their values, and no worker field."""
    settings = Settings(max_pending_requests=3, batch_fill_wait_ms=1.0)
    assert settings.gateway.max_pending_requests == 3
    assert settings.worker.batch_fill_wait_ms == 1.0
    assert not hasattr(settings.gateway, "batch_fill_wait_ms")
