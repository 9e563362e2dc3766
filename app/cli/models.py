"""`fmnist models`: list and describe a gateway's models, set a model's traffic weights, show its
rollout history (through the SDK, like `fmnist send-images`)."""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from app.cli.send_images import add_gateway_arguments, require_sdk

if TYPE_CHECKING:
    from fmnist_client import Client, ModelInfo, RolloutEvent, TrafficWeights

# Exit status when the gateway refused or could not be reached (2 stays argparse's, for bad flags).
FAILED_STATUS = 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list models, show one, set its traffic weights, show its rollout history",
        description="Talk to a running gateway about its models: what is served, how live traffic "
        "splits between versions (canary weights), and the rollout decisions taken.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="the models, their versions and weights")
    add_gateway_arguments(listing)
    listing.set_defaults(func=run, action_func=list_models)

    show = actions.add_parser("show", help="one model: versions, weights, live figures")
    add_gateway_arguments(show)
    show.add_argument("name", help="the model's name")
    show.set_defaults(func=run, action_func=show_model)

    weights = actions.add_parser(
        "weights",
        help="split a model's live traffic between versions (needs an admin key)",
        description="Set the percent of a model's unpinned traffic each version gets; every gateway "
        "applies it. VERSION is a full id, a unique prefix or a tag; percents sum to 100.",
    )
    add_gateway_arguments(weights)
    weights.add_argument("name", help="the model's name")
    weights.add_argument(
        "split", nargs="*", metavar="VERSION=PERCENT", type=_split_item, help="e.g. v1=90 v2=10"
    )
    weights.add_argument("--clear", action="store_true", help="remove the split (no weights)")
    weights.add_argument("--reason", default="", help="why, kept in the history")
    weights.set_defaults(func=run, action_func=set_weights)

    history = actions.add_parser("history", help="a model's weights changes and rollout decisions")
    add_gateway_arguments(history)
    history.add_argument("name", help="the model's name")
    history.set_defaults(func=run, action_func=show_history)


def _split_item(text: str) -> tuple[str, int]:
    version, sep, percent = text.rpartition("=")
    if not sep or not version:
        raise argparse.ArgumentTypeError(f"{text!r}: give VERSION=PERCENT, e.g. v2=10")
    try:
        return version, int(percent)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: PERCENT must be an integer") from None


def run(args: argparse.Namespace) -> int:
    require_sdk("models")
    from fmnist_client import Client, FmnistError

    if args.action == "weights":
        problem = _weights_problem(args.split, args.clear)
        if problem:
            print(f"fmnist models weights: {problem}", file=sys.stderr)
            return 2
    action: Callable[[Client, argparse.Namespace], list[str]] = args.action_func
    try:
        with Client(args.url, api_key=args.api_key) as client:
            lines = action(client, args)
    except FmnistError as exc:
        print(f"fmnist models {args.action}: {exc}", file=sys.stderr)
        return FAILED_STATUS
    print("\n".join(lines))
    return 0


def _weights_problem(split: list[tuple[str, int]], clear: bool) -> str:
    if bool(split) == clear:
        return "give VERSION=PERCENT ... or --clear"
    versions = [version for version, _ in split]
    if len(set(versions)) != len(versions):
        return "a version is given twice"
    return ""


def list_models(client: Client, args: argparse.Namespace) -> list[str]:
    rows = [["MODEL", "DEFAULT", "READY", "WORKERS", "VERSIONS", "WEIGHTS"]]
    for model in client.models():
        rows.append(
            [
                model.name,
                "yes" if model.default else "",
                "yes" if model.ready else "no",
                str(model.live_workers),
                ", ".join(_version_label(v.version, v.tag) for v in model.versions),
                _weights_text(model.weights) or "-",
            ]
        )
    return table(rows)


def show_model(client: Client, args: argparse.Namespace) -> list[str]:
    model = client.model(args.name)
    return describe(model)


def describe(model: ModelInfo) -> list[str]:
    """A model as `fmnist models show` prints it."""
    split = _weights_text(model.weights) or "none (newest live version)"
    lines = [
        f"model     {model.name}{' (default)' if model.default else ''}",
        f"ready     {'yes' if model.ready else 'no'} ({model.live_workers} live workers)",
        f"input     {'x'.join(str(d) for d in model.input_shape)}, {len(model.class_names)} classes",
        f"weights   {split}",
    ]
    window = next((v.live.window_s for v in model.versions if v.live is not None), None)
    rows = [
        ["VERSION", "TAG", "WORKERS", "WEIGHT", "REQUESTS", "FAILED", "ERRORS", "P50 MS", "P99 MS"]
    ]
    for version in model.versions:
        live = version.live
        rows.append(
            [
                version.version,
                version.tag or "",
                str(version.live_workers),
                f"{model.weights[version.version]}%" if version.version in model.weights else "",
                str(live.requests) if live else "-",
                str(live.failed) if live else "-",
                f"{live.error_rate:.1%}" if live else "-",
                _ms(live.p50_ms) if live else "-",
                _ms(live.p99_ms) if live else "-",
            ]
        )
    if window is not None:
        lines.append(f"live      results this gateway routed in the last {window:g} s")
    return [*lines, "", *table(rows)]


def set_weights(client: Client, args: argparse.Namespace) -> list[str]:
    split = {} if args.clear else dict(args.split)
    applied = client.set_weights(args.name, split, reason=args.reason)
    return [f"{applied.model}: {_weights_text(applied.weights) or 'no split'}"]


def show_history(client: Client, args: argparse.Namespace) -> list[str]:
    entries = client.history(args.name)
    if not entries:
        return [f"{args.name}: no rollout history"]
    return [history_line(entry) for entry in entries]


def history_line(entry: TrafficWeights | RolloutEvent) -> str:
    """One history entry on one line: time, what, figures, who."""
    from fmnist_client import TrafficWeights

    if isinstance(entry, TrafficWeights):
        what = f"weights      {_weights_text(entry.weights) or 'cleared'}"
        who, why = entry.set_by, entry.reason
        when = entry.set_at
    else:
        figures = " ".join(f"{k}={v:g}" for k, v in sorted(entry.figures.items()))
        split = _weights_text(entry.weights)
        what = " ".join(
            part
            for part in (
                f"{entry.action:<12} {entry.candidate}",
                figures,
                f"-> {split}" if split else "",
            )
            if part
        )
        who, why, when = entry.by, entry.detail, entry.at
    line = f"{_time(when)}  {what}"
    if why:
        line += f"  ({why})"
    if who:
        line += f"  by {who}"
    return line


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _weights_text(weights: dict[str, int]) -> str:
    return ", ".join(f"{version}={percent}%" for version, percent in sorted(weights.items()))


def _version_label(version: str, tag: str | None) -> str:
    return version if tag is None else f"{version} ({tag})"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _time(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s).astimezone().isoformat(timespec="seconds")
