"""The replay report: Markdown, plots and JSON written from a comparison summary."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from app.rollout.compare import Answer, Comparison, ComparisonSummary
from app.rollout.report import write_report


def summary_of(pairs: list[tuple[int, int]], *, labelled: bool) -> ComparisonSummary:
    comparison = Comparison(("shirt", "coat", "bag"))
    for index, (live, candidate) in enumerate(pairs):
        comparison.add_live(f"r{index}", Answer(live, 1.0), truth=live if labelled else None)
        comparison.add_candidate(f"r{index}", Answer(candidate, 2.0))
    return comparison.summary()


def test_report_writes_markdown_plots_and_json(tmp_path: Path) -> None:
    """report.md links every plot it wrote; each is a PNG; summary.json holds the figures."""
    summary = summary_of([(0, 0), (0, 1), (2, 2)], labelled=True)
    path = write_report(summary, tmp_path / "out", title="Replay", details={"model": "fmnist"})
    text = path.read_text()
    for name in ("agreement.png", "confusion.png", "accuracy.png", "latency.png"):
        assert f"]({name})" in text
        with Image.open(tmp_path / "out" / name) as image:
            assert image.format == "PNG"
    data = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert data["agreement"] == 2 / 3 and data["details"] == {"model": "fmnist"}
    assert "| shirt | coat | 1 |" in text


def test_report_without_labels_says_accuracy_is_unknown(tmp_path: Path) -> None:
    """With no labelled request there is no accuracy plot, and the report says why."""
    summary = summary_of([(0, 0)], labelled=False)
    path = write_report(summary, tmp_path, title="Replay", details={})
    assert "accuracy is unknown" in path.read_text()
    assert not (tmp_path / "accuracy.png").exists()
