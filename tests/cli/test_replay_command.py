"""`fmnist replay`'s parts that need no running service: the window, its reading, and refusals."""

from __future__ import annotations

import time
import uuid
from datetime import datetime

import numpy as np
import pytest

import messaging
from app import protocol
from app.cli import main
from app.cli.replay import parse_since, read_window

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", NOW - 90),
        ("10m", NOW - 600),
        ("2h", NOW - 7200),
        ("1d", NOW - 86400),
        ("30", NOW - 30),
    ],
)
def test_since_takes_a_time_ago(text: str, expected: float) -> None:
    """`--since 10m` and the like mean that long before now."""
    assert parse_since(text, NOW) == expected


def test_since_takes_an_iso_time() -> None:
    """An ISO time with an offset is that instant."""
    assert (
        parse_since("2027-01-15T08:00:00+00:00", NOW)
        == datetime.fromisoformat("2027-01-15T08:00:00+00:00").timestamp()
    )


@pytest.mark.parametrize("text", ["yesterday", "2999-01-01T00:00:00+00:00", "-5m"])
def test_since_refuses_what_is_not_a_past_time(text: str) -> None:
    """Words, future times and negative durations are refused with a message."""
    with pytest.raises(ValueError, match=r"ISO time|future"):
        parse_since(text, NOW)


def _request(request_id: str, submitted_at: float, label: int) -> messaging.Outgoing:
    attributes = {
        protocol.REQUEST_ID_ATTR: request_id,
        protocol.SHAPE_ATTR: "1,2,2",
        protocol.SUBMITTED_AT_ATTR: str(submitted_at),
        protocol.METADATA_ATTR: protocol.encode_metadata({"label": str(label)}),
    }
    return messaging.Outgoing(bytes([label] * 4), request_id, attributes)


async def test_read_window_keeps_the_last_n_once_each_and_nothing_after_the_start() -> None:
    """--last N keeps the newest N distinct requests submitted before the replay began."""
    now = time.time()
    items = [_request(f"r{i}", now - 10 + i, i % 3) for i in range(6)]
    items.append(_request("r5", now - 4, 2))  # a re-queued try of r5
    items.append(_request("late", now + 5, 1))  # live traffic after the replay began
    async with messaging.connect(f"memory://{uuid.uuid4().hex}") as pubsub:
        await pubsub.publish_many("fmnist.requests.fmnist", items)
        async with pubsub.subscribe(
            "fmnist.requests.fmnist", group="replay.test", start=0.0
        ) as subscription:
            window = await read_window(subscription, until=now, last=3, quiet_s=0.2, num_classes=10)
    assert [r.request_id for r in window] == ["r3", "r4", "r5"]
    assert [r.truth for r in window] == [0, 1, 2]
    assert window[0].image.shape == (1, 2, 2) and np.all(window[0].image == 0)


def test_replay_refuses_the_embedded_broker(capsys: pytest.CaptureFixture[str]) -> None:
    """On memory:// the command exits 2 and says the embedded broker is out of its reach."""
    status = main(
        [
            "replay",
            "--model",
            "fmnist",
            "--version",
            "x.safetensors",
            "--last",
            "5",
            "--broker",
            "memory://",
        ]
    )
    assert status == 2
    assert "lives inside `fmnist serve`'s process" in capsys.readouterr().err


def test_replay_needs_a_window(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --since or --last argparse exits 2 naming both."""
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--model", "fmnist", "--version", "x.safetensors"])
    assert exit_info.value.code == 2
    assert "--since" in capsys.readouterr().err


def test_replay_names_what_version_takes_for_a_bad_candidate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A candidate that is no model source exits 1 before any broker is reached."""
    status = main(
        [
            "replay",
            "--model",
            "fmnist",
            "--version",
            "not-a-model",
            "--last",
            "5",
            "--broker",
            "kafka://127.0.0.1:1",
        ]
    )
    assert status == 1
    assert "--version takes what `fmnist worker --model` takes" in capsys.readouterr().err
