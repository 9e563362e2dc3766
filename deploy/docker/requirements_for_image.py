"""Print one image's requirements: pyproject's dependencies plus EXTRAS, minus EXCLUDED names.

usage: requirements_for_image.py PYPROJECT EXTRAS [EXCLUDED ...]   (EXTRAS comma-separated)

The Dockerfile's builder stage runs it (with the image's own Python, so only the standard library);
tests/deploy/test_dockerfile.py runs the same file on this repository's pyproject.toml.
"""

import re
import sys
import tomllib


def canonical_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        sys.exit(f"cannot read a distribution name from requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def main(argv: list[str]) -> None:
    pyproject_path, extras, *excluded = argv
    with open(pyproject_path, "rb") as file:
        project = tomllib.load(file)["project"]
    requirements = list(project["dependencies"])
    for extra in filter(None, extras.split(",")):
        requirements += project["optional-dependencies"][extra]
    declared = {canonical_name(requirement) for requirement in requirements}
    skipped = {canonical_name(name) for name in excluded}
    if stale := skipped - declared:
        sys.exit(f"excluded names are not dependencies in {pyproject_path}: {sorted(stale)}")
    for requirement in requirements:
        if canonical_name(requirement) not in skipped:
            print(requirement)


if __name__ == "__main__":
    main(sys.argv[1:])
