"""`fmnist listen`: stream results from a gateway and score them against the labels in their metadata."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from app.cli.send_images import add_gateway_arguments, require_sdk
from ml.runner_stats import LatencySummary

if TYPE_CHECKING:
    from fmnist_client import AsyncClient, Prediction, StreamEvent

STATUS_EVERY_S = 1.0  # how often the running accuracy line is refreshed
GIVE_UP_AFTER_S = 30.0  # default bound on time without a connection, long enough for a restart
READY_POLL_FIRST_S = 0.5  # first wait before asking a not-ready gateway again; doubles each time
READY_POLL_MAX_S = 5.0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "listen",
        help="stream results and print a running accuracy; Ctrl-C prints the final figures",
        description=(
            "Stream every result visible to your API key over the websocket and score the ones whose "
            "metadata carries a `label` (as `fmnist send-images` sends). Ctrl-C, or --count results, "
            "prints the final accuracy, throughput and latency percentiles."
        ),
    )
    add_gateway_arguments(parser)
    parser.add_argument(
        "--count",
        type=int,
        default=0,
        help="stop after this many results (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--after",
        type=int,
        default=None,
        help="replay results stored after this cursor first (0: every result the gateway still holds)",
    )
    parser.add_argument(
        "--give-up-after",
        type=float,
        default=GIVE_UP_AFTER_S,
        metavar="SECONDS",
        help="exit 1 after this long unable to connect, or to reconnect, to a ready gateway; "
        "0 keeps trying (default: %(default)g)",
    )
    parser.set_defaults(func=run)


class GaveUp(Exception):
    """No usable connection to the gateway for longer than `--give-up-after`."""


class LinkReport:
    """Prints one stderr line per change of the link to the gateway (connecting, connected, lost,
    retrying in N s) and raises `GaveUp` once it has been down longer than `give_up_s`."""

    def __init__(self, url: str, *, give_up_s: float, out: TextIO, listening: str) -> None:
        self.url = url
        self.give_up_s = give_up_s
        self.out = out
        self.listening = listening
        self.state: str | None = None
        self.down_since = time.monotonic()  # not connected yet counts as down
        self.reason: str | None = None

    def connecting(self) -> None:
        if self.state in (None, "connected"):
            self._say(f"connecting to {self.url} ...")
        self.state = "connecting"

    def connected(self) -> None:
        if self.state != "connected":
            self._say(f"connected to {self.url}; listening ({self.listening})")
        self.state, self.down_since, self.reason = "connected", time.monotonic(), None

    def lost(self, reason: str) -> None:
        if self.state == "connected":
            self.down_since = time.monotonic()
            self._say(f"lost the connection to {self.url}: {reason}")
        elif reason != self.reason:
            self._say(f"cannot connect to {self.url}: {reason}")
        self.state, self.reason = "lost", reason

    def retrying(self, delay_s: float) -> None:
        """Announce the next attempt, or raise `GaveUp` when it would come past the bound."""
        down_for = time.monotonic() - self.down_since
        if self.give_up_s and down_for + delay_s > self.give_up_s:
            raise GaveUp(
                f"gave up: no ready gateway at {self.url} within {self.give_up_s:g} s "
                "(--give-up-after SECONDS waits longer, 0 keeps trying)"
            )
        self._say(f"retrying in {delay_s:.1f} s")
        self.state = "retrying"

    def on_stream_event(self, event: StreamEvent) -> None:
        """`AsyncClient.stream(on_event=...)`: the stream's own reconnections, reported alike."""
        if event.state == "connecting":
            self.connecting()
        elif event.state == "connected":
            self.connected()
        elif event.state == "lost":
            self.lost(event.reason or "connection lost")
        else:
            self.retrying(event.delay_s or 0.0)

    def _say(self, text: str) -> None:
        print(f"fmnist listen: {text}", file=self.out, flush=True)


async def wait_until_ready(client: AsyncClient, link: LinkReport) -> None:
    """Ask `/healthz` and `/readyz` until the gateway can take work, reporting each change;
    a URL where no fmnist gateway answers fails at once."""
    from fmnist_client import FmnistError, Timeout, Unavailable

    delay = READY_POLL_FIRST_S
    while True:
        link.connecting()
        try:
            health = await client.health()
        except (Unavailable, Timeout) as error:
            reason = error.message
        else:
            if health.ready:
                return
            if not health.live:
                raise FmnistError(
                    f"no fmnist gateway answers at {link.url} (/healthz failed); check --url",
                    code="not_a_gateway",
                )
            reason = f"the gateway is up but not ready: {health.reason}"
        link.lost(reason)
        link.retrying(delay)
        await asyncio.sleep(delay)
        delay = min(READY_POLL_MAX_S, delay * 2)


@dataclass
class ListenStats:
    """Running tallies over the results received."""

    results: int = 0
    failed: int = 0
    labelled: int = 0
    correct: int = 0
    first_at: float | None = None  # monotonic seconds of the first result
    last_at: float | None = None
    service_ms: list[float] = field(default_factory=list)
    end_to_end_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)

    def add(self, prediction: Prediction, *, received_at: float, now_unix: float) -> None:
        self.results += 1
        self.first_at = received_at if self.first_at is None else self.first_at
        self.last_at = received_at
        if prediction.status == "failed":
            self.failed += 1
            return
        true_label = prediction.metadata.get("label")
        if true_label is not None and prediction.label is not None:
            self.labelled += 1
            self.correct += int(true_label == str(prediction.label))
        if prediction.service_ms is not None:
            self.service_ms.append(prediction.service_ms)
        if prediction.batch_size is not None:
            self.batch_sizes.append(prediction.batch_size)
        sent_at = prediction.metadata.get("sent_at")
        if sent_at:
            # Only meaningful when sender and listener share a clock (same machine or NTP).
            with contextlib.suppress(ValueError):
                self.end_to_end_ms.append(max(0.0, (now_unix - float(sent_at)) * 1000))

    @property
    def accuracy(self) -> float:
        return self.correct / self.labelled if self.labelled else math.nan

    @property
    def throughput(self) -> float:
        """Results per second between the first and the last result."""
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at:
            return math.nan
        return (self.results - 1) / (self.last_at - self.first_at)

    def status_line(self) -> str:
        return (
            f"results={self.results} failed={self.failed} "
            f"accuracy={_percent(self.accuracy)} ({self.correct}/{self.labelled} labelled) "
            f"throughput={_rate(self.throughput)}"
        )

    def summary_lines(self) -> list[str]:
        lines = [
            f"results        {self.results} ({self.failed} failed), {_rate(self.throughput)}",
            f"accuracy       {_percent(self.accuracy)} ({self.correct}/{self.labelled} labelled)",
            _latency_line("service ms", self.service_ms, "queue + inference, from the results"),
            _latency_line(
                "end-to-end ms", self.end_to_end_ms, "from send-images' sent_at to arrival here"
            ),
        ]
        if self.batch_sizes:
            mean = sum(self.batch_sizes) / len(self.batch_sizes)
            lines.append(f"batch size     mean {mean:.1f}, max {max(self.batch_sizes)}")
        return lines


def _rate(per_second: float) -> str:
    return "n/a" if math.isnan(per_second) else f"{per_second:.1f} results/s"


def _percent(fraction: float) -> str:
    return "n/a" if math.isnan(fraction) else f"{fraction:.2%}"


def _latency_line(name: str, values: list[float], what: str) -> str:
    if not values:
        return f"{name:<15}n/a ({what})"
    summary = LatencySummary.of(values)
    figures = f"p50 {summary.p50:.1f}  p90 {summary.p90:.1f}  p99 {summary.p99:.1f}"
    return f"{name:<15}{figures}  ({what})"


async def listen(
    url: str,
    api_key: str | None,
    *,
    count: int,
    after: int | None,
    give_up_s: float,
    stats: ListenStats,
    out: TextIO,
) -> None:
    """Consume the stream into `stats` until `count` results, Ctrl-C or SIGTERM.

    A status line is printed at most every STATUS_EVERY_S. The signals are handled here rather
    than left to KeyboardInterrupt so that SIGTERM (and SIGINT where a shell ignored it for a
    background job) also ends in the final summary.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        consume = asyncio.create_task(
            _consume(
                url, api_key, count=count, after=after, give_up_s=give_up_s, stats=stats, out=out
            )
        )
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({consume, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in (consume, stopped):
            task.cancel()
        await asyncio.gather(stopped, return_exceptions=True)
        with contextlib.suppress(asyncio.CancelledError):
            await consume  # re-raises the stream's error, if that is what ended it
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    if out.isatty():
        print(file=out)


async def _consume(
    url: str,
    api_key: str | None,
    *,
    count: int,
    after: int | None,
    give_up_s: float,
    stats: ListenStats,
    out: TextIO,
) -> None:
    from fmnist_client import AsyncClient

    live = out.isatty()
    last_print = 0.0
    link = LinkReport(
        url,
        give_up_s=give_up_s,
        out=sys.stderr,
        listening=f"until {count} results" if count else "Ctrl-C to stop",
    )
    async with AsyncClient(url, api_key=api_key) as client:
        await wait_until_ready(client, link)
        stream = client.stream(after=after, reconnects=None, on_event=link.on_stream_event)
        async for prediction in stream:
            now = time.monotonic()
            stats.add(prediction, received_at=now, now_unix=time.time())
            done = bool(count) and stats.results >= count
            if done or now - last_print >= STATUS_EVERY_S:
                last_print = now
                # On a terminal the line rewrites itself; in a log it is one line per refresh.
                print(
                    ("\r" if live else "") + stats.status_line(),
                    end="" if live else "\n",
                    file=out,
                    flush=True,
                )
            if done:
                return


def run(args: argparse.Namespace) -> int:
    require_sdk("listen")
    from fmnist_client import FmnistError

    stats = ListenStats()
    failure: FmnistError | GaveUp | None = None
    try:
        asyncio.run(
            listen(
                args.url,
                args.api_key,
                count=args.count,
                after=args.after,
                give_up_s=args.give_up_after,
                stats=stats,
                out=sys.stdout,
            )
        )
    except (FmnistError, GaveUp) as error:
        failure = error
    if stats.results or failure is None:
        for line in stats.summary_lines():
            print(line)
    if failure is not None:
        print(f"fmnist listen: {failure}", file=sys.stderr)
        return 1
    return 0
