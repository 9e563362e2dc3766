"""`fmnist models`: list, show, weights and history against a real gateway under uvicorn."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest
from fmnist_client import Client

from app.cli import main
from app.cli.prologue import model_options
from app.settings import Settings
from tests.sdk.conftest import LiveServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def served(live_server: Callable[..., LiveServer]) -> tuple[str, str]:
    """A gateway with a worker under uvicorn: its URL and the worker's model version."""
    server = live_server()
    with Client(server.url) as client:
        return server.url, client.model("fmnist").versions[0].version


def test_weights_show_and_history_round_trip(
    served: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`models weights` sets a split by version prefix; `show`, `list` and `history` print it."""
    base_url, version = served
    url = ["--url", base_url]
    assert (
        main(["models", "weights", "fmnist", f"{version[:6]}=100", "--reason", "all in", *url]) == 0
    )
    set_out = capsys.readouterr().out
    assert main(["models", "show", "fmnist", *url]) == 0
    show_out = capsys.readouterr().out
    assert main(["models", "list", *url]) == 0
    list_out = capsys.readouterr().out
    assert main(["models", "history", "fmnist", *url]) == 0
    history_out = capsys.readouterr().out
    assert f"fmnist: {version}=100%" in set_out
    assert f"weights   {version}=100%" in show_out and "REQUESTS" in show_out
    assert "fmnist" in list_out and f"{version}=100%" in list_out
    assert "weights" in history_out and "(all in)" in history_out


def test_refused_weights_exit_1_with_the_gateways_reason(
    served: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Weights not summing to 100 exit 1 and print the gateway's invalid_weights message."""
    base_url, version = served
    assert main(["models", "weights", "fmnist", f"{version}=90", "--url", base_url]) == 1
    assert "sum to 90" in capsys.readouterr().err


def test_weights_need_a_split_or_clear_not_both(capsys: pytest.CaptureFixture[str]) -> None:
    """`models weights NAME v=100 --clear` exits 2 before calling any gateway."""
    assert (
        main(["models", "weights", "fmnist", "v1=100", "--clear", "--url", "http://0.0.0.0:9"]) == 2
    )
    assert "--clear" in capsys.readouterr().err


def test_serve_takes_one_model_name_with_two_sources() -> None:
    """`--model fmnist=a --model fmnist=b` gives two versions of one model; the same pair twice is refused."""
    settings = Settings()
    two = argparse.Namespace(model=["fmnist=a.safetensors", "fmnist=b.safetensors"])
    same = argparse.Namespace(model=["fmnist=a.safetensors", "fmnist=a.safetensors"])
    assert model_options(two, settings) == [
        ("fmnist", "a.safetensors"),
        ("fmnist", "b.safetensors"),
    ]
    assert model_options(same, settings) is None
