"""Route `POST /v1/models/{name}/replay` (admin): replay a model's retained requests through a
candidate version, where the process that runs the gateway can (`fmnist serve`, embedded broker).

The gateway never imports torch, so it does not run the candidate itself: it calls a `ReplayHook`
that `fmnist serve` installs (`create_app(..., replay=hook)`, `app.cli.serve_replay`). Without one
(`fmnist gateway`, or a broker other processes can read) the route answers 409 and points to
`fmnist replay`, which reads such a broker from its own process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import HTTPConnection

from app.gateway.deps import GatewayDep
from app.gateway.errors import ApiError, error_responses
from app.gateway.rollout_routes import AdminDep
from app.gateway.shadow import candidate_json
from app.gateway.shadow_api import CandidateComparison
from app.logs import kv
from app.rollout.compare import ComparisonSummary

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["models"])


@dataclass(frozen=True)
class LoadedVersion:
    """A version of a model loaded in the hook's process: one a replay can run."""

    version: str
    tag: str | None = None


@dataclass(frozen=True)
class ReplayFindings:
    """What one replay found: the comparison and the window it covered."""

    summary: ComparisonSummary
    replayed: int
    """Requests of the window run through the candidate."""
    missing_live: int
    """Replayed requests whose live result the broker did not hold (yet, or any more)."""
    live_versions: list[str]
    since: float
    """Unix seconds: when the oldest replayed request was submitted."""
    until: float
    """Unix seconds: when the replay began; later requests are not part of the window."""


class ReplayHook(Protocol):
    """Runs replays for the gateway in its own process (`fmnist serve` installs one)."""

    def loaded(self, model: str) -> list[LoadedVersion]:
        """The versions of `model` this process has loaded, serving or shadow."""
        ...

    async def replay(
        self,
        model: str,
        candidate: str,
        *,
        since: float | None,
        last: int | None,
        split_versions: Sequence[str],
        class_names: Sequence[str],
    ) -> ReplayFindings | None:
        """Replay the window of `model`'s requests (its topic and the topics of `split_versions`)
        through the loaded version `candidate` (a full id), naming classes by `class_names`; None
        when the window holds no request."""
        ...


class ReplayBusy(Exception):
    """Raised by a hook while another replay runs: one at a time, beside the live traffic."""


async def get_replay_hook(connection: HTTPConnection) -> ReplayHook | None:
    """The replay hook of the process running this app, or None."""
    hook: ReplayHook | None = getattr(connection.app.state, "replay", None)
    return hook


class ReplayRequest(BaseModel):
    """Which candidate replays which requests: the last N the broker retains, or those since a time."""

    model_config = ConfigDict(extra="forbid")

    candidate: str = Field(
        min_length=1,
        max_length=128,
        examples=["4c1d9e0a7b22"],
        description="A version loaded in this process (`--model` or `--shadow` of `fmnist serve`): "
        "its full id, a unique prefix or its tag.",
    )
    last: int | None = Field(
        None, ge=1, examples=[500], description="Replay the newest N retained requests."
    )
    since: float | None = Field(
        None, ge=0, description="Replay the retained requests submitted from this unix time on."
    )

    @model_validator(mode="after")
    def _one_window(self) -> ReplayRequest:
        if (self.last is None) == (self.since is None):
            raise ValueError("give exactly one of `last` (N requests) and `since` (unix seconds)")
        return self


class ReplayReport(CandidateComparison):
    """The candidate against the live answers of the same requests, with the shadow endpoint's
    figures, and the window the replay covered."""

    model: str = Field(examples=["fmnist"])
    since: float = Field(
        description="Unix seconds: when the oldest replayed request was submitted."
    )
    until: float = Field(description="Unix seconds: the replay began; later requests are left out.")
    replayed: int = Field(description="Requests of the window run through the candidate.")
    missing_live: int = Field(
        description="Replayed requests with no live result in the broker (still in flight, or "
        "past the results topic's retention); they are not in `samples`."
    )
    live_versions: list[str] = Field(description="The versions whose answers were the live side.")


def resolve_candidate(model: str, given: str, loaded: Sequence[LoadedVersion]) -> str:
    """The full id of the loaded version `given` names (full id, tag, or unique prefix); 422 otherwise."""
    matches = {v.version for v in loaded if given in (v.version, v.tag)}
    if not matches:
        matches = {v.version for v in loaded if v.version.startswith(given)}
    if len(matches) == 1:
        return matches.pop()
    known = ", ".join(v.version if v.tag is None else f"{v.version} ({v.tag})" for v in loaded)
    reason = "matches several" if matches else "is none"
    raise ApiError(
        422,
        "unknown_candidate",
        f"{given!r} {reason} of the versions of {model!r} loaded in this process: "
        f"{known or 'none'} (load one with `fmnist serve --model {model}=PATH` or `--shadow PATH`)",
    )


@router.post(
    "/models/{name}/replay",
    response_model=ReplayReport,
    summary="Replay retained requests through a candidate (fmnist serve)",
    responses=error_responses(401, 403, 404, 409, 422),
)
async def post_replay(
    gateway: GatewayDep,
    admin: AdminDep,
    hook: Annotated[ReplayHook | None, Depends(get_replay_hook)],
    name: Annotated[str, Path(max_length=128, description="The model's name.")],
    body: ReplayRequest,
) -> ReplayReport:
    """Run the model's retained requests (the newest `last`, or those submitted from `since`)
    through a candidate loaded in this process and compare its answers with the live ones (admin).
    Clients see nothing: the replay reads the broker's retained log outside every consumer group and
    publishes nothing. Only inside `fmnist serve` on the embedded broker: elsewhere 409
    `replay_unavailable` (use `fmnist replay`); 409 `replay_running` while another replay runs, and
    409 `nothing_to_replay` when the window holds no request of the model."""
    if hook is None:
        raise ApiError(
            409,
            "replay_unavailable",
            "this gateway cannot replay in its own process (only `fmnist serve` on the embedded "
            f"broker can); run `fmnist replay --model {name} --version CANDIDATE --last N` "
            "against the broker instead",
        )
    if not gateway.registry.versions(name):
        known = ", ".join(gateway.registry.names()) or "none yet"
        raise ApiError(404, "model_not_found", f"no model {name!r}; known models: {known}")
    candidate = resolve_candidate(name, body.candidate, hook.loaded(name))
    split = [v for v, percent in gateway.rollout.weights(name).items() if percent > 0]
    versions = gateway.registry.versions(name)
    # The live version's class names, as the shadow comparison names them; else the candidate's.
    named = [v for v in versions if v.ready] or [v for v in versions if v.version == candidate]
    class_names = (named or versions)[0].class_names
    log.info(kv("replay_started", model=name, candidate=candidate, last=body.last, by=admin))
    try:
        findings = await hook.replay(
            name,
            candidate,
            since=body.since,
            last=body.last,
            split_versions=split,
            class_names=class_names,
        )
    except ReplayBusy as exc:
        raise ApiError(409, "replay_running", str(exc), headers={"Retry-After": "5"}) from None
    if findings is None:
        raise ApiError(
            409,
            "nothing_to_replay",
            f"the broker retains no request of model {name!r} in the window; send traffic first, "
            "or widen `last`/`since` (the embedded broker keeps each topic's last messages: "
            "`?retain=` in FMNIST_BROKER_URL)",
        )
    log.info(
        kv(
            "replay_done",
            model=name,
            candidate=candidate,
            replayed=findings.replayed,
            samples=findings.summary.pairs,
            missing_live=findings.missing_live,
        )
    )
    figures = candidate_json(candidate, findings.summary, findings.since)
    return ReplayReport(
        **figures,
        model=name,
        until=findings.until,
        replayed=findings.replayed,
        missing_live=findings.missing_live,
        live_versions=findings.live_versions,
    )
