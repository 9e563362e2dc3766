"""The SDK's public surface: an explicit, sorted, complete `__all__` (httpx's convention, ruff's order)."""

from __future__ import annotations

import fmnist_client


def _isort_key(name: str) -> tuple[int, str]:
    """Ruff's RUF022 order: CONSTANTS, then CamelCase, then everything else, each alphabetical."""
    if name.isupper() and len(name) > 1:
        return (0, name)
    return (1, name) if name[:1].isupper() else (2, name)


def test_all_is_sorted_and_complete() -> None:
    """`__all__` lists exactly the public names of `fmnist_client`, in ruff's sorted order."""
    public = [
        name for name in vars(fmnist_client) if not name.startswith("_") or name == "__version__"
    ]
    assert fmnist_client.__all__ == sorted(public, key=_isort_key)


def test_exceptions_form_one_tree() -> None:
    """Every exported exception derives from `FmnistError`, so one `except` catches them all."""
    errors = [
        getattr(fmnist_client, name)
        for name in fmnist_client.__all__
        if isinstance(getattr(fmnist_client, name), type)
        and issubclass(getattr(fmnist_client, name), BaseException)
    ]
    assert len(errors) == 8
    assert all(issubclass(error, fmnist_client.FmnistError) for error in errors)


def test_exception_tree_is_drawn_for_every_exception() -> None:
    """The tree in `_exceptions`' docstring names every exported exception."""
    from fmnist_client import _exceptions

    doc = _exceptions.__doc__ or ""
    for name in fmnist_client.__all__:
        value = getattr(fmnist_client, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert name in doc, name


def test_package_is_typed() -> None:
    """The `py.typed` marker ships next to the code, so users' type checkers read our hints."""
    from importlib.resources import files

    assert files("fmnist_client").joinpath("py.typed").is_file()


def test_sync_and_async_clients_offer_the_same_methods() -> None:
    """`Client` and `AsyncClient` have the same public methods (stream and health included), but
    for how they close."""

    def methods(cls: type) -> set[str]:
        return {
            name for name in vars(cls) if not name.startswith("_") and callable(vars(cls)[name])
        }

    assert methods(fmnist_client.Client) - {"close"} == methods(fmnist_client.AsyncClient) - {
        "aclose"
    }
    assert {"stream", "health", "predict_many"} <= methods(fmnist_client.Client)
