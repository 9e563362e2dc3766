"""The READMEs' examples work: each ```python and ```bash block runs against a real `fmnist serve`.

Blocks whose info string carries `no-run` (e.g. `bash no-run` for `make run`) are skipped. Each block
runs in a fresh interpreter, in its README's directory (so relative paths like
`examples/ankle-boot.png` resolve as a reader's would), with `http://127.0.0.1:8000` / `http://localhost:8000` pointed at the test server.

A ```json output block shows what the runnable block before it prints; it is compared with that output
field by field (probabilities within the README's rounding). When the service's answer changes (a new
field, recalibrated probabilities), regenerate those blocks against a fresh `fmnist serve`:

    PYTHONPATH=. python -m tests.test_readme --update
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.sdk.serving import fmnist_serve, served_checkpoint

pytestmark = [pytest.mark.e2e]

READMES = [REPO_ROOT / "README.md", REPO_ROOT / "clients" / "python" / "README.md"]
DOCUMENTED_URLS = ("http://127.0.0.1:8000", "http://localhost:8000")
BLOCK_TIMEOUT_S = 60
# The info string of a block that shows the output of the runnable block before it.
OUTPUT_INFO = "json output"
# Fields that differ from call to call: the README's value only has to be of the same type.
VOLATILE_FIELDS = frozenset(
    {"request_id", "batch_id", "queue_ms", "inference_ms", "worker_id", "completed_at", "links"}
)
# The README rounds probabilities to this many decimals.
PROBABILITY_DECIMALS = 3
# How each runnable block language is executed; bash blocks run with `set -euo pipefail`.
RUNNERS = {"python": [sys.executable, "-c"], "bash": ["bash", "-euo", "pipefail", "-c"]}
# An opening fence with its info string, the body, and the closing fence (same backtick count).
FENCE = re.compile(
    r"^(?P<fence>`{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S
)


@dataclass(frozen=True)
class CodeBlock:
    readme: Path
    line: int
    info: str
    code: str

    @property
    def runnable(self) -> bool:
        words = self.info.split()
        return bool(words) and words[0] in RUNNERS and "no-run" not in words[1:]

    @property
    def test_id(self) -> str:
        return f"{self.readme.relative_to(REPO_ROOT)}:{self.line}"


def code_blocks(readme: Path) -> list[CodeBlock]:
    """Every fenced block of `readme`, with the line its fence opens on."""
    text = readme.read_text(encoding="utf-8")
    return [
        CodeBlock(
            readme, text.count("\n", 0, match.start()) + 1, match["info"].strip(), match["body"]
        )
        for match in FENCE.finditer(text)
    ]


def shown_outputs(readme: Path) -> list[tuple[CodeBlock, CodeBlock]]:
    """Each ```json output block of `readme`, paired with the runnable block whose output it shows."""
    pairs = []
    last_runnable: CodeBlock | None = None
    for block in code_blocks(readme):
        if block.info == OUTPUT_INFO:
            assert last_runnable is not None, f"{block.test_id} shows output of no runnable block"
            pairs.append((last_runnable, block))
        elif block.runnable:
            last_runnable = block
    return pairs


def run_block(block: CodeBlock, service_url: str) -> subprocess.CompletedProcess[str]:
    """Run one block against the service at `service_url`, in its README's directory."""
    code = block.code
    for documented in DOCUMENTED_URLS:
        code = code.replace(documented, service_url)
    return subprocess.run(
        [*RUNNERS[block.info.split()[0]], code],
        cwd=block.readme.parent,
        # The `fmnist` and `python` a reader's blocks call: this interpreter's environment's.
        env={
            **os.environ,
            "FMNIST_URL": service_url,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        },
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )


def render_output(answer: dict[str, Any]) -> str:
    """An answer as the README shows it: one field a line, probabilities rounded."""
    lines = []
    for name, value in answer.items():
        if name == "probabilities":
            shown = ", ".join(f"{p:.{PROBABILITY_DECIMALS}f}" for p in value)
            lines.append(f'  "{name}": [{shown}]')
        else:
            lines.append(f"  {json.dumps(name)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def output_differences(shown: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """How the README's answer differs from the service's, one line a field (empty: they agree)."""
    differences = [f"{name}: not in the README" for name in actual.keys() - shown.keys()]
    differences += [f"{name}: not in the answer" for name in shown.keys() - actual.keys()]
    tolerance = 0.5 * 10**-PROBABILITY_DECIMALS + 1e-9
    for name in shown.keys() & actual.keys():
        value, real = shown[name], actual[name]
        if name in VOLATILE_FIELDS:
            same = type(value) is type(real) or {type(value), type(real)} <= {int, float}
            if isinstance(real, dict):
                same = isinstance(value, dict) and value.keys() == real.keys()
        elif name == "probabilities":
            same = len(value) == len(real) and all(
                abs(p - q) <= tolerance for p, q in zip(value, real, strict=True)
            )
        else:
            same = value == real
        if not same:
            differences.append(f"{name}: README {value!r}, service {real!r}")
    return sorted(differences)


def _runnable_blocks() -> list[CodeBlock]:
    return [
        block
        for readme in READMES
        if readme.is_file()
        for block in code_blocks(readme)
        if block.runnable
    ]


@pytest.fixture(scope="module")
def service_url(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A real `fmnist serve` with the shipped checkpoint, shared by this module's tests."""
    with fmnist_serve(tmp_path_factory.mktemp("readme-serve"), served_checkpoint(request)) as url:
        yield url


def test_fence_parser_reads_info_strings_and_skips_no_run(tmp_path: Path) -> None:
    """The parser finds ```python blocks, keeps their line numbers, and honours `python no-run`."""
    readme = tmp_path / "README.md"
    readme.write_text(
        "# t\n\n```python\nprint(1)\n```\n\n```python no-run\nboom()\n```\n\n```bash no-run\nls\n```\n"
    )
    blocks = code_blocks(readme)
    assert [(b.line, b.info, b.runnable) for b in blocks] == [
        (3, "python", True),
        (7, "python no-run", False),
        (11, "bash no-run", False),
    ]
    assert blocks[0].code == "print(1)\n"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_readme_has_runnable_python_examples(readme: Path) -> None:
    """Each README shows the SDK with at least one runnable Python block (so this suite cannot pass empty)."""
    assert any(block.runnable for block in code_blocks(readme)), f"{readme} has no ```python block"


@pytest.mark.parametrize("block", _runnable_blocks(), ids=lambda b: b.test_id)
def test_readme_block_runs(block: CodeBlock, service_url: str) -> None:
    """The block exits 0 against a running service (its output is shown when it does not)."""
    result = run_block(block, service_url)
    assert result.returncode == 0, (
        f"{block.test_id} failed (exit {result.returncode})\n--- stdout ---\n{result.stdout}"
        f"\n--- stderr ---\n{result.stderr}"
    )


def test_readme_shows_the_answer_of_its_curl_example() -> None:
    """The README's first screen pairs its POST example with the answer it prints (so that is checked)."""
    assert [
        (command.info, shown.info) for command, shown in shown_outputs(REPO_ROOT / "README.md")
    ] == [("bash", OUTPUT_INFO)]


def test_output_comparison_accepts_other_timings_and_ids() -> None:
    """Another request id, other timings and probabilities within the README's rounding agree."""
    shown = {"request_id": "a", "queue_ms": 5.2, "label": 9, "probabilities": [0.062, 0.938]}
    actual = {"request_id": "b", "queue_ms": 6, "label": 9, "probabilities": [0.0624, 0.9376]}
    assert output_differences(shown, actual) == []


def test_output_comparison_flags_a_recalibrated_probability() -> None:
    """Probabilities that moved past the README's rounding (e.g. after calibration) are reported."""
    shown = {"label": 9, "probabilities": [0.062, 0.938]}
    actual = {"label": 9, "probabilities": [0.02, 0.98]}
    assert output_differences(shown, actual) == [
        "probabilities: README [0.062, 0.938], service [0.02, 0.98]"
    ]


@pytest.mark.parametrize(
    "pair",
    [pair for readme in READMES if readme.is_file() for pair in shown_outputs(readme)],
    ids=lambda pair: pair[1].test_id,
)
def test_readme_output_is_what_the_service_answers(
    pair: tuple[CodeBlock, CodeBlock], service_url: str
) -> None:
    """A ```json output block matches, field by field, what its command prints against the service."""
    command, shown = pair
    result = run_block(command, service_url)
    assert result.returncode == 0, result.stderr
    actual = json.loads(result.stdout)
    differences = output_differences(json.loads(shown.code), actual)
    assert differences == [], (
        f"{shown.test_id} is stale; regenerate it with `PYTHONPATH=. python -m tests.test_readme "
        f"--update`, or paste:\n{render_output(actual)}"
    )


def update_shown_outputs(checkpoint: Path) -> None:
    """Rewrite every ```json output block with what its command prints against a fresh `fmnist serve`."""
    with tempfile.TemporaryDirectory() as log_dir, fmnist_serve(Path(log_dir), checkpoint) as url:
        for readme in READMES:
            text = readme.read_text(encoding="utf-8")
            for command, shown in reversed(shown_outputs(readme)):
                run_block(command, url)  # the first pass of a fresh worker includes its warm-up
                result = run_block(command, url)
                if result.returncode != 0:
                    sys.exit(f"{command.test_id} failed: {result.stderr}")
                fence = f"```{OUTPUT_INFO}\n"
                start = text.index(fence + shown.code) + len(fence)
                text = (
                    text[:start]
                    + render_output(json.loads(result.stdout))
                    + text[start + len(shown.code) :]
                )
            readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python -m tests.test_readme --update")
    from tests.conftest import SHIPPED_CHECKPOINT

    update_shown_outputs(SHIPPED_CHECKPOINT)
