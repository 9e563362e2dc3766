""".dockerignore admits what the Dockerfile copies and keeps local state out of the build context.

The file is read with pathspec's gitignore rules. Docker's rules differ from gitignore's in places, so
the file keeps to the forms both read alike (every pattern anchored with a leading `/`, or starting
with `**/`), and the tests below check pathspec's reading of each form against Docker's documented one.
"""

from __future__ import annotations

import shlex
import subprocess

import pytest
from pathspec import GitIgnoreSpec

from tests.conftest import REPO_ROOT
from tests.deploy.conftest import Dockerfile

DOCKERIGNORE = REPO_ROOT / ".dockerignore"


def patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def excluded_from_context(path: str, lines: list[str] | None = None) -> bool:
    """Whether Docker leaves `path` (relative, with /; a folder ends in /) out of the build context."""
    return GitIgnoreSpec.from_lines(patterns() if lines is None else lines).match_file(path)


def context_sources(dockerfile: Dockerfile) -> list[str]:
    """Paths the Dockerfile COPYs from the build context."""
    sources = []
    for stage in dockerfile.stages.values():
        for instruction in stage.instructions:
            if instruction.keyword in ("COPY", "ADD") and "--from" not in instruction.value:
                words = [w for w in shlex.split(instruction.value) if not w.startswith("--")]
                sources += words[:-1]
    return sources


def test_every_pattern_reads_the_same_in_docker_and_gitignore() -> None:
    """Each pattern is anchored (`/x`, Docker's reading of `x`) or starts with `**/` (any depth in both)."""
    for line in patterns():
        assert line.removeprefix("!").startswith(("/", "**/")), (
            f"{line!r}: gitignore reads an unanchored pattern at any depth, Docker at the root only"
        )


@pytest.mark.parametrize(
    ("lines", "path", "docker_excludes"),
    [
        # `*` at the root excludes the top-level entries, and so everything below them.
        (["/*"], "tests/conftest.py", True),
        # An exception for a folder re-admits everything below it.
        (["/*", "!/app/"], "app/gateway/main.py", False),
        # Docker anchors patterns at the root: a folder of the same name deeper down stays out.
        (["/*", "!/app/"], "tests/app/x.py", True),
        # An exception can re-admit one file inside an excluded folder, and only that file.
        (["/*", "!/deploy/docker/x.py"], "deploy/docker/x.py", False),
        (["/*", "!/deploy/docker/x.py"], "deploy/docker/y.py", True),
        # `**/` matches zero or more folders.
        (["**/__pycache__"], "__pycache__/a.pyc", True),
        (["**/__pycache__"], "app/gateway/__pycache__/a.pyc", True),
        (["**/*.py[cod]"], "app/x.pyc", True),
        (["**/*.py[cod]"], "app/x.py", False),
        # The last matching line wins: a later exclusion beats an earlier exception.
        (["/*", "!/app/", "**/__pycache__"], "app/__pycache__/x.pyc", True),
    ],
)
def test_pathspec_reads_our_pattern_forms_as_docker_does(
    lines: list[str], path: str, docker_excludes: bool
) -> None:
    """pathspec's gitignore reading of each pattern form the file uses agrees with Docker's documented rules."""
    assert excluded_from_context(path, lines) is docker_excludes


def test_dockerignore_admits_every_copied_path(dockerfile: Dockerfile) -> None:
    """Every path the Dockerfile copies from the context, and each tracked file under it, is in the context."""
    sources = context_sources(dockerfile)
    assert {"pyproject.toml", "app/", "models/"} <= set(sources)
    for source in sources:
        assert not excluded_from_context(source), (
            f".dockerignore leaves out {source}, which the Dockerfile copies"
        )
        tracked = subprocess.run(
            ["git", "ls-files", "--", source],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        left_out = [path for path in tracked if excluded_from_context(path)]
        assert not left_out, f".dockerignore leaves out tracked files: {left_out[:5]}"


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "app/__pycache__/cli.cpython-311.pyc",
        ".env",
        "deploy/k8s/base/worker.yaml",
    ],
)
def test_dockerignore_keeps_local_state_out_of_the_context(path: str) -> None:
    """The virtualenv, git metadata, tests, byte code, .env files and the manifests never reach the build context."""
    assert excluded_from_context(path)
