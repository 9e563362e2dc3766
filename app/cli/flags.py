"""Command-line options as declarative tables (`Flag`, `add_flags`) and the help formatter `train` and `evaluate` share."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Flag:
    """One option: `kind` is its type, its choices (a tuple of strings), or `bool` for an on/off switch."""

    name: str
    kind: Callable[[str], Any] | tuple[str, ...]
    default: Any
    help: str
    metavar: str | None = None
    required: bool = False


def add_flags(group: argparse._ActionsContainer, flags: Sequence[Flag]) -> None:
    """Add each flag to a parser or an argument group, in order."""
    for flag in flags:
        if flag.kind is bool:
            group.add_argument(flag.name, action="store_true", help=flag.help)
        elif isinstance(flag.kind, tuple):
            group.add_argument(flag.name, choices=flag.kind, default=flag.default, help=flag.help)
        else:
            group.add_argument(
                flag.name,
                type=flag.kind,
                default=flag.default,
                help=flag.help,
                metavar=flag.metavar,
                required=flag.required,
            )


def int_list(text: str) -> tuple[int, ...]:
    """`16,32,64` as (16, 32, 64), for an option that takes several integers."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 16,32,64, got {text!r}"
        ) from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help only where that says something: not when the help
    already states its default, not for None (the help says what happens then) nor for on/off flags;
    tuples print as typed (16,32,64)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "(default" in text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(action, argparse._StoreTrueAction)
            or not action.option_strings
        ):
            return text
        if isinstance(default, tuple):
            return f"{text} (default: {','.join(str(v) for v in default)})"
        return f"{text} (default: %(default)s)"
