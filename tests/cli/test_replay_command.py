"""`fmnist replay`'s parts that need no running service: the window, its reading, and refusals."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

import messaging
from app import protocol
from app.cli import main
from app.cli.replay import parse_since
from app.cli.replay_engine import ReplayOutcome, read_window, replay

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


def _result(request_id: str, label: int, version: str = "live0000") -> messaging.Outgoing:
    result = protocol.ResultMessage(
        request_id=request_id,
        status="completed",
        label=label,
        model="fmnist",
        model_version=version,
        inference_ms=1.0,
        completed_at=time.time(),
    )
    return messaging.Outgoing(result.to_bytes(), request_id, {})


def _image_request(request_id: str, submitted_at: float, label: int) -> messaging.Outgoing:
    attributes = {
        protocol.REQUEST_ID_ATTR: request_id,
        protocol.SHAPE_ATTR: "1,28,28",
        protocol.SUBMITTED_AT_ATTR: str(submitted_at),
        protocol.METADATA_ATTR: protocol.encode_metadata({"label": str(label)}),
    }
    return messaging.Outgoing(bytes(28 * 28), request_id, attributes)


async def _replay_on_memory(
    tmp_path: Path,
    topics: dict[str, list[str]],
    *,
    last: int,
    versions: tuple[str, ...] = (),
    progress: bool = False,
    answered_by_candidate: frozenset[str] = frozenset(),
) -> ReplayOutcome:
    """`replay()` in this process on a fresh memory broker whose `topics` hold the named requests
    (submitted in the order of their names, each answered on the results topic: by the candidate's
    own version for those in `answered_by_candidate`), against a tiny untrained candidate."""
    from app.settings import Settings
    from ml import ImageClassifier
    from ml.serving import load_model

    candidate = tmp_path / "fmnist.safetensors"
    ImageClassifier(widths=(4, 8), convs_per_stage=(1, 1), seed=3).save(candidate)
    candidate_version = load_model(
        str(candidate), device="cpu", precision="fp32", runtime="eager"
    ).version
    broker = f"memory://{uuid.uuid4().hex}"
    now = time.time()
    names = sorted(name for ids in topics.values() for name in ids)
    async with messaging.connect(broker) as pubsub:
        for topic, ids in topics.items():
            items = [_image_request(i, now - 5 + names.index(i) * 0.1, len(i) % 3) for i in ids]
            await pubsub.publish_many(topic, items)
        results = [
            _result(i, len(i) % 3, candidate_version if i in answered_by_candidate else "live0000")
            for i in names
        ]
        await pubsub.publish_many("fmnist.results", results)
        return await replay(
            Settings(broker_url=broker, device="cpu", inference_precision="fp32"),
            model="fmnist",
            candidate=str(candidate),
            since=None,
            last=last,
            quiet_s=0.2,
            runtime="eager",
            out_dir=tmp_path / "report",
            progress=progress,
            versions=versions,
        )


async def test_replay_shows_a_progress_bar_per_stage_and_writes_every_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reading and the candidate each draw a tqdm bar to 100%; the report has all four plots."""
    ids = [f"r{i}" for i in range(6)]
    outcome = await _replay_on_memory(
        tmp_path, {"fmnist.requests.fmnist": ids}, last=6, progress=True
    )
    err = capsys.readouterr().err
    assert "requests: 100%" in err and "6/6" in err
    assert "candidate: 100%" in err
    assert outcome.summary is not None and outcome.summary.pairs == 6
    for plot in ("agreement.png", "confusion.png", "accuracy.png", "latency.png"):
        assert (tmp_path / "report" / plot).is_file()


async def test_replay_reads_the_topics_of_a_splits_versions_too(tmp_path: Path) -> None:
    """With `versions`, the requests on those versions' topics join the window, cut to N in all."""
    outcome = await _replay_on_memory(
        tmp_path,
        {
            "fmnist.requests.fmnist": ["r0", "r1", "r4"],
            "fmnist.requests.fmnist.v-aaaa": ["r2", "r3", "r5"],
        },
        last=4,
        versions=("aaaa",),
    )
    assert outcome.replayed == 4
    assert outcome.summary is not None and outcome.summary.pairs == 4
    assert outcome.candidate_version is not None


async def test_replay_takes_no_live_answer_from_the_candidates_own_version(tmp_path: Path) -> None:
    """Results the candidate's version gave under a split are not live answers to compare with."""
    ids = [f"r{i}" for i in range(6)]
    outcome = await _replay_on_memory(
        tmp_path,
        {"fmnist.requests.fmnist": ids},
        last=6,
        answered_by_candidate=frozenset({"r1", "r4"}),
    )
    assert outcome.replayed == 6
    assert outcome.summary is not None and outcome.summary.pairs == 4
    assert outcome.missing_live == 2


async def test_replay_of_the_live_version_compares_with_its_own_answers(tmp_path: Path) -> None:
    """When only the candidate's own version answered, those answers are the live ones."""
    ids = [f"r{i}" for i in range(4)]
    outcome = await _replay_on_memory(
        tmp_path, {"fmnist.requests.fmnist": ids}, last=4, answered_by_candidate=frozenset(ids)
    )
    assert outcome.summary is not None and outcome.summary.pairs == 4
    assert outcome.missing_live == 0
