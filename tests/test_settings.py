"""Settings: environment parsing, validation, and the README's generated table."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.settings import Settings, with_settings_table
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
