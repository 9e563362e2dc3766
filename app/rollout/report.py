"""The comparison report: Markdown with its plots (agreement, live-vs-candidate confusion matrix,
accuracy, latency) and the summary as JSON, written to one directory. matplotlib is imported only
when a report is written, so importing this module stays cheap."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from app.rollout.compare import ComparisonSummary

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["REPORT_FILES", "write_report"]

SIDE_COLOURS = {"live": "tab:gray", "candidate": "tab:blue"}  # the same in every plot
REPORT_FILES = {
    "report": "report.md",
    "summary": "summary.json",
    "agreement": "agreement.png",
    "confusion": "confusion.png",
    "accuracy": "accuracy.png",
    "latency": "latency.png",
}


def write_report(
    summary: ComparisonSummary,
    out_dir: Path,
    *,
    title: str,
    details: Mapping[str, str],
) -> Path:
    """Write `summary` as `report.md` (with `details`, e.g. model and versions, as a table), its
    plots and `summary.json` under `out_dir` (created); returns the Markdown file's path.
    The accuracy plot is left out when no request carried a label."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_FILES["summary"]).write_text(
        json.dumps({**summary.to_json(), "details": dict(details)}, indent=2) + "\n"
    )
    _save(_agreement_figure(summary), out_dir / REPORT_FILES["agreement"])
    _save(_confusion_figure(summary), out_dir / REPORT_FILES["confusion"])
    if summary.labelled:
        _save(_accuracy_figure(summary), out_dir / REPORT_FILES["accuracy"])
    _save(_latency_figure(summary), out_dir / REPORT_FILES["latency"])
    path = out_dir / REPORT_FILES["report"]
    path.write_text("\n".join(_markdown(summary, title, details)) + "\n")
    return path


def _markdown(summary: ComparisonSummary, title: str, details: Mapping[str, str]) -> list[str]:
    lines = [f"# {title}", "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in details.items()]
    lines += ["", "## Headline", "", "```", *summary.headline(), "```", ""]
    lines += [
        "## Agreement",
        "",
        "The share of requests both versions answered with the same top-1 class, per live class.",
        "",
        f"![agreement]({REPORT_FILES['agreement']})",
        "",
        "## Live against candidate",
        "",
        "Rows: the class the live version answered; columns: the candidate's. Off the diagonal is "
        "where they disagree.",
        "",
        f"![live-vs-candidate confusion matrix]({REPORT_FILES['confusion']})",
        "",
    ]
    top = summary.top_disagreements()
    if top:
        lines += ["| live | candidate | requests |", "| --- | --- | --- |"]
        lines += [f"| {live} | {candidate} | {n} |" for live, candidate, n in top]
        lines.append("")
    lines += ["## Accuracy", ""]
    if summary.labelled:
        lines += [
            f"On the {summary.labelled} requests whose metadata carried a `label`: live "
            f"{_percent(summary.live_accuracy)}, candidate {_percent(summary.candidate_accuracy)}.",
            "",
            f"![accuracy]({REPORT_FILES['accuracy']})",
            "",
        ]
    else:
        lines += ["No request carried a `label` in its metadata, so accuracy is unknown.", ""]
    lines += [
        "## Latency",
        "",
        "Inference milliseconds per request (the batch's forward pass): live as the workers reported "
        "it, candidate as measured by the replay on this machine.",
        "",
        f"![latency]({REPORT_FILES['latency']})",
    ]
    return lines


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2%}"


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path)


def _agreement_figure(summary: ComparisonSummary) -> Figure:
    names = summary.class_names
    figure, axes = _figure(max(6, 0.6 * len(names) + 2), 4)
    shares = [0.0 if math.isnan(v) else v for v in summary.agreement_by_class()]
    axes.bar(range(len(names)), shares, color="tab:blue")
    if not math.isnan(summary.agreement):
        axes.axhline(summary.agreement, color="tab:red", linestyle="--", label="overall")
        axes.legend()
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("same top-1 class")
    axes.set_xlabel("live class")
    axes.set_title(f"agreement {_percent(summary.agreement)}")
    return figure


def _confusion_figure(summary: ComparisonSummary) -> Figure:
    names, matrix = summary.class_names, summary.disagreements
    size = len(names)
    figure, axes = _figure(max(6, 0.7 * size + 2), max(5, 0.6 * size + 2))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(size), names, rotation=45, ha="right")
    axes.set_yticks(range(size), names)
    axes.set_xlabel("candidate")
    axes.set_ylabel("live")
    axes.set_title("live against candidate (requests)")
    _annotate(axes, matrix)
    return figure


def _annotate(axes: Axes, matrix: Sequence[Sequence[int]]) -> None:
    """Counts in the cells, while there are few enough classes to read them."""
    if len(matrix) > 20:
        return
    peak = max((max(row) for row in matrix), default=0) or 1
    for row, counts in enumerate(matrix):
        for col, count in enumerate(counts):
            colour = "white" if count > peak / 2 else "black"
            axes.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=7)


def _accuracy_figure(summary: ComparisonSummary) -> Figure:
    figure, axes = _figure(4, 4)
    values = [summary.live_accuracy, summary.candidate_accuracy]
    axes.bar(["live", "candidate"], values, color=[SIDE_COLOURS["live"], SIDE_COLOURS["candidate"]])
    for x, value in enumerate(values):
        axes.text(x, value, _percent(value), ha="center", va="bottom")
    axes.set_ylim(0, 1.05)
    axes.set_title(f"accuracy on {summary.labelled} labelled requests")
    return figure


def _latency_figure(summary: ComparisonSummary) -> Figure:
    figure, axes = _figure(6, 4)
    marks = ("p50", "p90", "p99")
    width = 0.38
    for offset, (side, latency) in enumerate(
        (("live", summary.live_inference_ms), ("candidate", summary.candidate_inference_ms))
    ):
        values = [getattr(latency, mark) if latency.count else 0.0 for mark in marks]
        positions = [i + (offset - 0.5) * width for i in range(len(marks))]
        axes.bar(
            positions, values, width, label=f"{side} ({latency.count})", color=SIDE_COLOURS[side]
        )
    axes.set_xticks(range(len(marks)), marks)
    axes.set_ylabel("inference ms")
    axes.set_title("inference latency")
    axes.legend()
    return figure
