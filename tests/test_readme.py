"""The READMEs' examples work: each ```python and ```bash block runs against a real `fmnist serve`.

Blocks whose info string carries `no-run` (e.g. `bash no-run` for `make run`) are skipped. Each block
runs in a fresh interpreter, in its README's directory (so relative paths like
`examples/ankle-boot.png` resolve as a reader's would), with `http://127.0.0.1:8000` / `http://localhost:8000` pointed at the test server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.sdk.serving import fmnist_serve, served_checkpoint

pytestmark = [pytest.mark.e2e]

READMES = [REPO_ROOT / "README.md", REPO_ROOT / "clients" / "python" / "README.md"]
DOCUMENTED_URLS = ("http://127.0.0.1:8000", "http://localhost:8000")
BLOCK_TIMEOUT_S = 60
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
    code = block.code
    for documented in DOCUMENTED_URLS:
        code = code.replace(documented, service_url)
    result = subprocess.run(
        [*RUNNERS[block.info.split()[0]], code],
        cwd=block.readme.parent,
        env={**os.environ, "FMNIST_URL": service_url},
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{block.test_id} failed (exit {result.returncode})\n--- stdout ---\n{result.stdout}"
        f"\n--- stderr ---\n{result.stderr}"
    )
