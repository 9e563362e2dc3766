"""`POST /v1/models/{name}/replay`: a replay inside a real `fmnist serve` on its embedded broker, and
the refusals of a gateway that cannot replay in its own process."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import messaging
from tests.cli.test_serve_and_gateway import fmnist
from tests.e2e.images import load_test_pngs
from tests.gateway.helpers import fashion_like, gateway_settings, png_bytes, running_gateway
from tests.sdk.conftest import gateway_learned

SENT = 24  # labelled test images sent through the live version
REPLAYED = 20  # the newest of them replayed


@dataclass(frozen=True)
class Served:
    url: str
    live: str
    candidate: str
    answers: list[dict[str, Any]]
    labels: list[int]


def send_labelled(url: str, pngs: list[bytes], labels: list[int]) -> list[dict[str, Any]]:
    """POST each image with its true class in the metadata; the live results, in order."""
    with httpx.Client(base_url=url, timeout=30) as client:
        answers = [
            client.post(
                "/v1/predictions?wait=20",
                content=png,
                headers={
                    "Content-Type": "image/png",
                    "X-Fmnist-Metadata": json.dumps({"label": str(label)}),
                },
            )
            for png, label in zip(pngs, labels, strict=True)
        ]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return [a.json() for a in answers]


def shadow_samples(url: str, version: str, samples: int) -> dict[str, Any]:
    """The shadow endpoint's entry for `version` once it compared `samples` requests."""
    deadline = time.monotonic() + 20
    while True:
        candidates = httpx.get(f"{url}/v1/models/fmnist/shadow").json()["candidates"]
        entry = next((c for c in candidates if c["version"] == version), None)
        if entry is not None and entry["samples"] >= samples:
            return entry
        assert time.monotonic() < deadline, candidates
        time.sleep(0.1)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, shipped_checkpoint: Path, fashion_mnist_dir: Path
) -> Iterator[Served]:
    """`fmnist serve` with the shipped model live and an untrained one shadowing it, after `SENT`
    labelled images were answered and compared."""
    from ml import ImageClassifier

    root = tmp_path_factory.mktemp("serve-replay")
    # The untrained checkpoint the other serve tests load too, so that no test compiles it again.
    candidate_path = root / "model.safetensors"
    ImageClassifier(seed=3).save(candidate_path)
    args = ["--port", "0", "--grpc-port", "0", "--model", f"fmnist={shipped_checkpoint}"]
    with fmnist("serve", *args, "--shadow", str(candidate_path), log=root / "serve.log") as (
        _,
        url,
    ):
        versions = httpx.get(f"{url}/v1/models/fmnist").json()["versions"]
        live = next(v["version"] for v in versions if v["role"] == "serving")
        candidate = next(v["version"] for v in versions if v["role"] == "shadow")
        pngs, labels = load_test_pngs(fashion_mnist_dir, SENT)
        answers = send_labelled(url, pngs, labels)
        shadow_samples(url, candidate, SENT)
        yield Served(url, live, candidate, answers, labels)


def replay(url: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/fmnist/replay", json=body, timeout=60)


@pytest.mark.e2e
@pytest.mark.data
@pytest.mark.timeout(120)
def test_replay_in_serve_compares_the_newest_requests_with_their_live_answers(
    served: Served,
) -> None:
    """A replay of the newest N requests through the shadow candidate reports them all, with the
    live accuracy the clients' own answers show."""
    answer = replay(served.url, candidate=served.candidate[:8], last=REPLAYED)
    assert answer.status_code == 200, answer.text
    report = answer.json()
    newest = list(zip(served.answers, served.labels, strict=True))[-REPLAYED:]
    live_right = sum(a["label"] == label for a, label in newest)
    assert report["version"] == served.candidate and report["model"] == "fmnist"
    assert (report["replayed"], report["samples"], report["labelled"]) == (REPLAYED,) * 3
    assert report["missing_live"] == 0 and report["live_versions"] == [served.live]
    assert report["live_accuracy"] == pytest.approx(live_right / REPLAYED)


@pytest.mark.e2e
@pytest.mark.data
@pytest.mark.timeout(120)
def test_replay_in_serve_finds_what_the_shadow_found_on_the_same_requests(served: Served) -> None:
    """Replaying every request through the shadow's own model gives the shadow's agreement and
    accuracies: the same answers, joined the same way."""
    shadow = shadow_samples(served.url, served.candidate, SENT)
    answer = replay(served.url, candidate=served.candidate, since=0)
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["samples"] == shadow["samples"] == SENT
    for figure in ("agreement", "live_accuracy", "candidate_accuracy", "disagreement"):
        assert report[figure] == shadow[figure], figure


@pytest.mark.e2e
@pytest.mark.data
@pytest.mark.timeout(120)
def test_replay_in_serve_refuses_a_version_not_loaded_and_an_empty_window(served: Served) -> None:
    """422 `unknown_candidate` for a version this process did not load; 409 `nothing_to_replay`
    when no retained request was submitted in the window."""
    unknown = replay(served.url, candidate="ffffffffffff", last=5)
    empty = replay(served.url, candidate=served.live, since=time.time() + 3600)
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "unknown_candidate"
    assert served.live in unknown.json()["error"]["message"]
    assert empty.status_code == 409 and empty.json()["error"]["code"] == "nothing_to_replay"


@asynccontextmanager
async def serve_in_process(
    tmp_path: Path, sent: int
) -> AsyncIterator[tuple[Any, list[str], httpx.AsyncClient]]:
    """What `fmnist serve` wires, in this process: a worker and the gateway with the replay hook on
    one embedded broker, after `sent` labelled images were answered; yields (broker, the model's
    requests and results topics, client)."""
    from app.cli.serve_replay import EmbeddedReplay
    from app.protocol import requests_topic_for
    from app.worker.consumer import Worker
    from messaging.memory import MemoryPubSub
    from ml import ImageClassifier
    from ml.serving import load_model

    path = tmp_path / "model.safetensors"
    ImageClassifier(seed=3).save(path)  # the untrained checkpoint the serve tests compile too
    served = await asyncio.to_thread(load_model, str(path), name="fmnist")
    settings = gateway_settings()
    async with messaging.connect(settings.broker_url) as pubsub:
        assert isinstance(pubsub, MemoryPubSub)
        hook = EmbeddedReplay(settings, pubsub, {"fmnist": [served]})
        async with (
            Worker(settings, pubsub, served),
            running_gateway(settings, replay=hook, announce=False) as (app, client),
        ):
            await gateway_learned(app.state.gateway, "fmnist")
            for index in range(sent):
                answer = await client.post(
                    "/v1/predictions?wait=20",
                    content=png_bytes(fashion_like(index)),
                    headers={"Content-Type": "image/png", "X-Fmnist-Metadata": '{"label": "1"}'},
                )
                assert answer.status_code == 200, answer.text
            topics = [requests_topic_for(settings.requests_topic, "fmnist"), settings.results_topic]
            yield pubsub.broker, topics, client


@pytest.mark.timeout(60)
async def test_a_replay_in_process_joins_no_group_and_publishes_nothing(tmp_path: Path) -> None:
    """The replay reads a snapshot: every topic keeps the groups and retained messages it had, and
    the live version replayed against itself agrees on every request."""
    async with serve_in_process(tmp_path, 6) as (broker, topics, client):
        before = {t: (set(broker.topics[t].groups), len(broker.topics[t].retained)) for t in topics}
        version = (await client.get("/v1/models/fmnist")).json()["versions"][0]["version"]
        answer = await client.post(
            "/v1/models/fmnist/replay", json={"candidate": version, "last": 6}
        )
        after = {t: (set(broker.topics[t].groups), len(broker.topics[t].retained)) for t in topics}
    assert answer.status_code == 200, answer.text
    assert (answer.json()["replayed"], answer.json()["agreement"]) == (6, 1.0)
    assert before[topics[0]][1] == 6 and after == before


@pytest.mark.timeout(60)
async def test_a_second_replay_while_one_runs_is_refused_with_409(tmp_path: Path) -> None:
    """One replay runs at a time beside the live traffic: a concurrent one gets 409 `replay_running`."""
    async with serve_in_process(tmp_path, 4) as (_, _, client):
        version = (await client.get("/v1/models/fmnist")).json()["versions"][0]["version"]
        body = {"candidate": version, "last": 4}
        answers = await asyncio.gather(
            *(client.post("/v1/models/fmnist/replay", json=body) for _ in range(2))
        )
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 409], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 409)
    assert refused.json()["error"]["code"] == "replay_running" and refused.headers["retry-after"]


async def test_a_gateway_without_a_replay_hook_answers_409_pointing_to_fmnist_replay() -> None:
    """`fmnist gateway` (no process of its own to run a model in) refuses a replay with 409."""
    async with running_gateway(gateway_settings()) as (_, client):
        answer = await client.post("/v1/models/fmnist/replay", json={"candidate": "x", "last": 5})
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["code"] == "replay_unavailable"
    assert "fmnist replay" in answer.json()["error"]["message"]


async def test_replay_needs_an_admin_key_once_the_gateway_has_keys() -> None:
    """A replay with a plain API key is refused with 403, as every admin call."""
    settings = gateway_settings(api_keys=["plain"], admin_api_keys=["admin"])
    async with running_gateway(settings) as (_, client):
        answer = await client.post(
            "/v1/models/fmnist/replay",
            json={"candidate": "x", "last": 5},
            headers={"X-API-Key": "plain"},
        )
    assert answer.status_code == 403, answer.text


@pytest.mark.parametrize(
    "body",
    [{"candidate": "x"}, {"candidate": "x", "last": 5, "since": 0}, {"candidate": "x", "last": 0}],
)
async def test_replay_takes_exactly_one_window(body: dict[str, Any]) -> None:
    """422 for a body with neither or both of `last` and `since`, or a `last` below 1."""
    async with running_gateway(gateway_settings()) as (_, client):
        answer = await client.post("/v1/models/fmnist/replay", json=body)
    assert answer.status_code == 422, answer.text
