"""Shared readers for the deployment files: the Dockerfile (through dockerfile-parse), the compose file,
and the CLI check that every command they run is a real `fmnist` sub-command."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from app.cli import build_parser
from tests.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
MAKEFILE = REPO_ROOT / "Makefile"
PYPROJECT = REPO_ROOT / "pyproject.toml"


# --- Dockerfile --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    global_args: list[Instruction]
    stages: dict[str, Stage]

    def chain(self, target: str) -> list[Stage]:
        """The stage and the stages it is built FROM, base first."""
        stages = [self.stages[target]]
        while stages[0].base in self.stages:
            stages.insert(0, self.stages[stages[0].base])
        return stages

    def along(self, target: str, keyword: str) -> list[Instruction]:
        """The `keyword` instructions of `target`'s chain, in build order."""
        return [i for s in self.chain(target) for i in s.instructions if i.keyword == keyword]

    def last(self, target: str, keyword: str) -> Instruction | None:
        """The instruction that is in effect for `target` (the last one along its chain)."""
        found = self.along(target, keyword)
        return found[-1] if found else None

    def env(self, target: str) -> dict[str, str]:
        """The variables `target`'s ENV instructions set, later ones winning."""
        return {
            key: value
            for instruction in self.along(target, "ENV")
            for key, _, value in (word.partition("=") for word in shlex.split(instruction.value))
        }

    def arg_default(self, name: str) -> str:
        instructions = [
            *self.global_args,
            *(i for s in self.stages.values() for i in s.instructions),
        ]
        for instruction in instructions:
            if instruction.keyword == "ARG":
                key, _, value = shlex.split(instruction.value)[0].partition("=")
                if key == name and value:
                    return value
        raise AssertionError(f"the Dockerfile declares no ARG {name} with a default")

    def runnable_targets(self) -> list[str]:
        """Targets that give an image something to run: a CMD along their chain."""
        return [name for name in self.stages if self.last(name, "CMD") is not None]

    def default_target(self) -> str:
        """What `docker build` builds without --target: the last stage."""
        return list(self.stages)[-1]


def read_dockerfile(path: Path) -> Dockerfile:
    """The stages of a multi-stage Dockerfile, read by dockerfile-parse (comments dropped)."""
    parser = DockerfileParser(path=str(path), cache_content=True)
    global_args: list[Instruction] = []
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for item in parser.structure:
        instruction = Instruction(item["instruction"].upper(), item["value"].strip())
        if instruction.keyword == "COMMENT":
            continue
        if instruction.keyword == "FROM":
            words = [word for word in instruction.value.split() if not word.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            current = stages[name] = Stage(name=name, base=words[0])
        elif current is None:
            global_args.append(instruction)
        else:
            current.instructions.append(instruction)
    return Dockerfile(global_args=global_args, stages=stages)


def exec_form(instruction: Instruction, keyword: str = "") -> list[str]:
    """The argv of a CMD (or of `HEALTHCHECK ... CMD [...]`), which must use the JSON exec form."""
    value = instruction.value
    if keyword:
        value = value[value.index(keyword) + len(keyword) :].strip()
    assert value.startswith("["), (
        f"{instruction.keyword} should use the exec form: {instruction.value}"
    )
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(arg, str) for arg in argv)
    return argv


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return read_dockerfile(DOCKERFILE)


# --- compose -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict) and document.get("services"), (
        "docker-compose.yml has no services"
    )
    return document


def our_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from this repository's Dockerfile (not Kafka)."""
    return {name: service for name, service in compose["services"].items() if "build" in service}


def build_target(service: dict[str, Any]) -> str:
    build = service["build"]
    assert isinstance(build, dict) and build.get("target"), (
        f"build {build!r} names no Dockerfile target"
    )
    assert Path(REPO_ROOT / build.get("context", ".")).resolve() == REPO_ROOT
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
    return str(build["target"])


# --- the CLI -----------------------------------------------------------------------------------


def assert_valid_cli_command(argv: list[str]) -> None:
    assert argv and argv[0] == "fmnist", f"{argv} does not start the fmnist CLI"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exit_:
        raise AssertionError(
            f"`{shlex.join(argv)}` is not a valid fmnist command (argparse exit {exit_.code})"
        ) from None
    assert callable(getattr(args, "func", None)), (
        f"`{shlex.join(argv)}` selects no sub-command function"
    )
