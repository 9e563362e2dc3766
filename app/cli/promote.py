"""`fmnist promote`: move a model's live traffic to a candidate version in steps, only while its gates
hold, and roll back by itself when the candidate regresses.

It talks to a gateway over HTTP only (the rollout endpoints of docs/api.md): the gate reads the
candidate's shadow comparison (`GET /v1/models/{name}/shadow`), or runs a replay in this process
(`--replay-last N`, app/cli/replay.py); each step sets the weights (`PUT /v1/models/{name}/weights`)
and watches both versions' live stats (`GET /v1/models/{name}`); every decision, with its figures, is
recorded (`POST /v1/models/{name}/history`), so `fmnist models history NAME` shows it. The decisions
themselves are app/rollout/promotion.py's, which does no I/O.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.cli.flags import Flag, HelpFormatter, add_flags
from app.cli.rollout_api import GatewayError, RolloutApi
from app.rollout.promotion import (
    DEFAULT_STEPS,
    Decision,
    GateFigures,
    Observation,
    Promotion,
    PromotionError,
    PromotionPolicy,
    VersionStats,
    choose_live,
    parse_steps,
    resolve_version,
)

if TYPE_CHECKING:
    pass

PROMOTED, REFUSED, ROLLED_BACK, ABORTED = 0, 1, 3, 130
STEP_S = 60.0  # default watch per step: the gateway's live stats cover about this long
POLL_S = 1.0  # how often a step reads the live stats
_DEFAULTS = PromotionPolicy(min_agreement=0.0, min_accuracy=0.0, min_samples=1)

Echo = Callable[[str], None]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "promote",
        help="move live traffic to a candidate version in gated steps, rolling back on regression",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("name", metavar="NAME", help="the model")
    parser.add_argument("candidate", metavar="CANDIDATE", help=CANDIDATE_HELP)
    add_flags(parser, _flags())
    parser.set_defaults(func=run)


DESCRIPTION = (
    "Promote CANDIDATE over the live version of model NAME. The gate first: the candidate's "
    "shadow comparison (GET /v1/models/NAME/shadow), or with --replay-last N a replay of the "
    "last N requests in this process, must have at least --min-samples requests, agreement "
    "with the live version of at least --min-agreement and accuracy on labelled requests of "
    "at least --min-accuracy. Then live traffic moves in --steps, each watched for --step-s "
    "seconds; when the candidate's error rate exceeds the live version's by more than "
    "--max-error-rate, or its p99 latency is more than --max-p99-ratio times the live "
    "version's, the live version gets all traffic back. Every decision is recorded on the "
    "rollout topic (`fmnist models history NAME`). Exit status: 0 promoted, 1 refused at the "
    "gate, stopped for want of traffic (--min-step-requests) or the gateway could not be "
    "used, 2 invalid flags, 3 rolled back, 130 interrupted."
)
CANDIDATE_HELP = (
    "the candidate version: its id, a unique prefix of it or its tag; with --replay-last, "
    "what `fmnist worker --model` takes (a checkpoint, an exported program or "
    "package.module:Class), whose version is then promoted"
)


def _flags() -> list[Flag]:
    """The options, in --help order (defaults read at call time: $FMNIST_URL, $FMNIST_API_KEY)."""
    return [
        Flag(
            "--url",
            str,
            os.environ.get("FMNIST_URL", "http://127.0.0.1:8000"),
            "gateway URL (default: $FMNIST_URL, else %(default)s)",
        ),
        Flag(
            "--api-key",
            str,
            os.environ.get("FMNIST_API_KEY"),
            "an admin API key (default: $FMNIST_API_KEY); needed when the gateway has keys",
        ),
        Flag(
            "--min-agreement",
            _share,
            None,
            "least share of compared requests on which the candidate answers as the live version",
            "A",
            required=True,
        ),
        Flag(
            "--min-accuracy",
            _share,
            None,
            "least accuracy of the candidate on requests whose metadata carries a `label` "
            "(0: pass without labels)",
            "B",
            required=True,
        ),
        Flag(
            "--min-samples",
            _positive_int,
            None,
            "least number of requests the gate's comparison must hold",
            "N",
            required=True,
        ),
        Flag(
            "--steps",
            _steps,
            DEFAULT_STEPS,
            "the candidate's percent of live traffic at each step, rising to 100",
            "P,P,...",
        ),
        Flag(
            "--step-s",
            _positive_float,
            STEP_S,
            "how long each step is watched before the next",
            "S",
        ),
        Flag(
            "--max-error-rate",
            _share,
            _DEFAULTS.max_error_rate,
            "roll back when the candidate's error rate exceeds the live version's by more than "
            "this share",
            "E",
        ),
        Flag(
            "--max-p99-ratio",
            _positive_float,
            _DEFAULTS.max_p99_ratio,
            "roll back when the candidate's p99 latency exceeds R times the live version's",
            "R",
        ),
        Flag(
            "--min-p99-requests",
            int,
            _DEFAULTS.min_p99_requests,
            "compare p99s only once each version has N results in the gateway's window: the p99 "
            "of a few requests is their slowest, often the candidate's cold start",
            "N",
        ),
        Flag(
            "--min-step-requests",
            int,
            _DEFAULTS.min_step_requests,
            "stop (the live version back at 100) when the candidate answered fewer than N "
            "requests by the end of a step: no traffic is no evidence (0: off)",
            "N",
        ),
        Flag(
            "--replay-last",
            _positive_int,
            None,
            "gate on a replay of the model's last N retained requests through CANDIDATE (a model "
            "source) instead of its shadow; needs --broker or FMNIST_BROKER_URL (Kafka or Pub/Sub)",
            "N",
        ),
        Flag("--broker", str, None, "broker URL for --replay-last (FMNIST_BROKER_URL)", "URL"),
        Flag(
            "--replay-out",
            Path,
            None,
            "where --replay-last writes its report (default: promote-replay-NAME-YYYYMMDD-HHMMSS)",
            "DIR",
        ),
        Flag("--no-progress", bool, False, "no progress bars during --replay-last"),
    ]


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share between 0 and 1, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _steps(text: str) -> tuple[int, ...]:
    try:
        return parse_steps(text)
    except PromotionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    try:
        policy = PromotionPolicy(
            min_agreement=args.min_agreement,
            min_accuracy=args.min_accuracy,
            min_samples=args.min_samples,
            steps=args.steps,
            max_error_rate=args.max_error_rate,
            max_p99_ratio=args.max_p99_ratio,
            min_step_requests=args.min_step_requests,
            min_p99_requests=args.min_p99_requests,
        )
    except PromotionError as exc:
        print(f"fmnist promote: {exc}", file=sys.stderr)
        return 2
    api = RolloutApi(args.url, args.api_key)
    try:
        replay_gate = _replay_gate(args) if args.replay_last else None
        return promote(
            api,
            args.name,
            args.candidate,
            policy,
            step_s=args.step_s,
            replay_gate=replay_gate,
        )
    except (GatewayError, PromotionError) as exc:
        print(f"fmnist promote: {exc}", file=sys.stderr)
        return REFUSED
    except KeyboardInterrupt:  # before the promotion started (a step's Ctrl-C is handled there)
        print("fmnist promote: interrupted before any decision", file=sys.stderr)
        return ABORTED
    finally:
        api.close()


# Given the split in force, replays and returns the candidate's version and its gate figures.
ReplayGate = Callable[[Mapping[str, int]], tuple[str, GateFigures]]


def promote(
    api: RolloutApi,
    name: str,
    candidate_text: str,
    policy: PromotionPolicy,
    *,
    step_s: float,
    poll_s: float = POLL_S,
    replay_gate: ReplayGate | None = None,
    echo: Echo = print,
) -> int:
    """Run one promotion against the gateway `api`; returns the exit status. `replay_gate`, when
    given, runs the replay and returns the candidate's version and its figures."""
    model = api.model(name)
    versions: list[dict[str, Any]] = model.get("versions", [])
    weights: dict[str, int] = model.get("weights") or {}
    figures: GateFigures | None = None
    if replay_gate is not None:
        echo(f"replaying the last requests of {name} through {candidate_text} for the gate")
        candidate, figures = replay_gate(weights)
    else:
        candidate = resolve_version(versions, candidate_text)
    live = choose_live(versions, weights, candidate)
    promotion = Promotion(
        model=name, live=live, candidate=candidate, policy=policy, initial_weights=weights
    )
    record = _recorder(api, name, candidate, echo)
    record(promotion.start())
    try:
        if figures is None:
            figures = _shadow_gate(api, name, candidate)
        decision = promotion.gate(figures)
        record(decision)
        if decision.action == "gate_failed":
            print(
                f"fmnist promote: refused at the gate, {candidate} stays out of live traffic: "
                f"{decision.detail}",
                file=sys.stderr,
            )
            return REFUSED
        _require_serving(api.model(name), candidate)
        return _steps_until_done(api, promotion, record, step_s, poll_s, echo)
    except KeyboardInterrupt:
        if not promotion.done:  # a decision already taken stands
            _abort(api, promotion, record, "interrupted (Ctrl-C)")
        return ABORTED
    except (GatewayError, PromotionError) as exc:
        # Traffic a step moved goes back to the live version before the error is reported.
        if not promotion.done:
            _abort(api, promotion, record, str(exc))
        raise


def _steps_until_done(
    api: RolloutApi,
    promotion: Promotion,
    record: Callable[[Decision], None],
    step_s: float,
    poll_s: float,
    echo: Echo,
) -> int:
    name, candidate = promotion.model, promotion.candidate
    while True:
        decision = promotion.next_step()
        if decision.action == "promoted":
            record(decision)
            return PROMOTED
        api.set_weights(name, decision.weights, f"promote {candidate}: {decision.detail}")
        record(decision)
        stopped = _watch(api, promotion, step_s, poll_s, echo)
        if stopped is not None:
            api.set_weights(name, stopped.weights, f"promote {candidate}: {stopped.detail}")
            record(stopped)
            what = "rolled back" if stopped.action == "rolled_back" else "stopped"
            print(
                f"fmnist promote: {what}, {promotion.live} takes all live traffic again: "
                f"{stopped.detail}",
                file=sys.stderr,
            )
            return ROLLED_BACK if stopped.action == "rolled_back" else REFUSED


def _abort(
    api: RolloutApi, promotion: Promotion, record: Callable[[Decision], None], why: str
) -> None:
    """Record the abort, putting the live version back at 100 first when a step moved traffic; a
    gateway that cannot be reached any more leaves the error to the caller's message."""
    aborted = promotion.abort(why)
    try:
        if promotion.moved_traffic:
            reason = f"promote {promotion.candidate}: {aborted.detail}"
            api.set_weights(promotion.model, aborted.weights, reason)
        record(aborted)
    except GatewayError as exc:
        print(f"fmnist promote: could not record the abort: {exc}", file=sys.stderr)


def _recorder(api: RolloutApi, name: str, candidate: str, echo: Echo) -> Callable[[Decision], None]:
    def record(decision: Decision) -> None:
        api.record(name, decision.event_body(name, candidate))
        echo(f"{decision.action:<12} {decision.detail}{_figures_text(decision.figures)}")

    return record


def _figures_text(figures: Mapping[str, float]) -> str:
    if not figures:
        return ""
    return " [" + ", ".join(f"{key}={value:g}" for key, value in figures.items()) + "]"


def _shadow_gate(api: RolloutApi, name: str, candidate: str) -> GateFigures:
    for entry in api.shadow(name):
        if entry.get("version") == candidate:
            return GateFigures.from_shadow(entry)
    raise PromotionError(
        f"no shadow of {candidate} runs for {name}: start one (`fmnist worker --model SOURCE "
        "--shadow`) and let it see traffic, or gate on a replay with --replay-last N"
    )


def _require_serving(model: Mapping[str, Any], candidate: str) -> None:
    for version in model.get("versions", []):
        serving = version.get("role", "serving") == "serving" and version.get("ready", True)
        if version.get("version") == candidate and serving:
            return
    raise PromotionError(
        f"{candidate} passed its gate but has no serving worker to take traffic: start "
        "`fmnist worker --model SOURCE` for it (while a split holds the live version at 100 "
        "it takes none), then promote again"
    )


def _version_entry(model: Mapping[str, Any], version: str) -> Mapping[str, Any]:
    for entry in model.get("versions", []):
        if entry.get("version") == version:
            found: Mapping[str, Any] = entry
            return found
    return {}


def _watch(
    api: RolloutApi,
    promotion: Promotion,
    step_s: float,
    poll_s: float,
    echo: Echo,
) -> Decision | None:
    """Poll both versions' live stats for `step_s`; the rollback (or, without enough candidate
    traffic, abort) decision, or None if the step held."""
    deadline = time.monotonic() + step_s
    observation: Observation | None = None
    while True:
        model = api.model(promotion.model)
        observation = Observation(
            live=VersionStats.from_json(_version_entry(model, promotion.live).get("live")),
            candidate=VersionStats.from_json(
                _version_entry(model, promotion.candidate).get("live")
            ),
        )
        rollback = promotion.observe(observation)
        if rollback is not None:
            return rollback
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(poll_s, left))
    short = promotion.step_watched(observation)
    if short is not None:
        return short
    echo(
        f"{'held':<12} {promotion.candidate} at {promotion.percent}% for {step_s:g} s"
        f"{_figures_text(observation.figures())}"
    )
    return None


def _replay_gate(args: argparse.Namespace) -> ReplayGate:
    """The gate on a replay of the last `--replay-last` requests through CANDIDATE, in this process."""

    def gate(weights: Mapping[str, int]) -> tuple[str, GateFigures]:
        import asyncio

        from app.cli.prologue import start_command
        from app.cli.replay import replay_failed
        from app.cli.replay_engine import QUIET_S, replay

        settings = start_command("promote", {"broker_url": args.broker}, runs_model=True)
        if settings is None:
            raise PromotionError("invalid settings for --replay-last (see above)")
        if settings.broker_url.startswith("memory://"):
            raise PromotionError(
                "--replay-last needs a broker another process can read: pass --broker "
                "kafka://HOST:9092 or gcp://PROJECT (FMNIST_BROKER_URL)"
            )
        out_dir = args.replay_out or Path(
            f"promote-replay-{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        try:
            outcome = asyncio.run(
                replay(
                    settings,
                    model=args.name,
                    candidate=args.candidate,
                    since=None,
                    last=args.replay_last,
                    quiet_s=QUIET_S,
                    runtime="auto",
                    out_dir=out_dir,
                    progress=not args.no_progress,
                    # Under a split the live traffic is on the weighted versions' topics.
                    versions=[version for version, percent in weights.items() if percent > 0],
                )
            )
        except Exception as exc:
            replay_failed(exc, "promote")
            raise PromotionError("the replay gate could not run (see above)") from None
        if outcome.summary is None or outcome.candidate_version is None:
            raise PromotionError(
                f"the replay found no retained request of {args.name}: nothing to gate on"
            )
        print(f"replay report  {outcome.report}")
        return outcome.candidate_version, GateFigures.from_replay(outcome.summary)

    return gate
