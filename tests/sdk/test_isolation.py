"""The SDK stands alone: it imports and works with only httpx and websockets (no torch, numpy, Pillow, server code)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import fmnist_client
from packaging.requirements import Requirement

from tests.conftest import REPO_ROOT

# Run in a fresh interpreter with these top-level packages made unimportable.
BLOCKED = ["torch", "numpy", "PIL", "fastapi", "starlette", "pydantic", "app", "ml", "messaging"]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Block())
    import httpx
    import fmnist_client
    from fmnist_client._images import encode_image

    def answer(request):
        assert request.headers["content-type"] == "image/png"
        return httpx.Response(200, json={"request_id": "r", "status": "completed", "label": 1})

    with fmnist_client.Client("http://x", transport=httpx.MockTransport(answer)) as client:
        assert client.predict(b"\\x89PNG\\r\\n\\x1a\\n...").label == 1
    fmnist_client.AsyncClient("http://x")
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("leaked:", leaked)
    """
)


def test_sdk_works_without_torch_numpy_pillow_or_server_packages() -> None:
    """`import fmnist_client` and a predict() need none of the blocked packages."""
    code = f"BLOCKED = {BLOCKED!r}\n{SCRIPT}"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT / "clients" / "python",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "leaked: []"


def _distribution_closure(*names: str) -> set[str]:
    """The installed distributions `names` need at runtime (extras excluded), names included."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def test_wheel_installs_alone_into_a_clean_environment(tmp_path: Path) -> None:
    """The built wheel holds only `fmnist_client` (with py.typed), requires only httpx and websockets,
    and works in a fresh venv that has nothing else: no torch, numpy, Pillow or server code."""
    source = tmp_path / "src"
    shutil.copytree(
        REPO_ROOT / "clients" / "python",
        source,
        ignore=shutil.ignore_patterns("*.egg-info", "build"),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w", str(wheels)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = wheels.glob("fmnist_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist()}
        meta = archive.read(
            next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        ).decode()
        assert "fmnist_client/py.typed" in archive.namelist()
    assert top_level == {"fmnist_client", wheel.name.split("-py3")[0] + ".dist-info"}
    assert f"Version: {fmnist_client.__version__}" in meta
    required = [
        line.split(":", 1)[1].strip()
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert [r for r in required if "extra ==" not in r] == ["httpx>=0.27", "websockets>=13"]

    # A venv without pip or site packages; the wheel and its runtime dependencies go on its path.
    venv.create(tmp_path / "venv", with_pip=False, symlinks=True)
    python = tmp_path / "venv" / "bin" / "python"
    installed = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(installed), str(wheel)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    for name in _distribution_closure("httpx", "websockets"):
        for file in metadata.distribution(name).files or []:
            top = file.parts[0]
            target = installed / top
            if top.endswith((".dist-info", ".pth")) or top == ".." or target.exists():
                continue
            target.symlink_to(Path(str(file.locate())).parents[len(file.parts) - 1] / top)
    code = (
        "import sys, fmnist_client\n"
        "import importlib.util as u\n"
        "missing = [m for m in ('torch', 'numpy', 'PIL', 'app', 'ml') if u.find_spec(m) is not None]\n"
        "assert not missing, f'clean env can import {missing}'\n"
        "png = fmnist_client._images.encode_png(bytes(range(16)), width=4, height=4)\n"
        "print(fmnist_client.__version__, png[:4])\n"
    )
    result = subprocess.run(
        [str(python), "-I", "-c", f"import sys; sys.path.insert(0, {str(installed)!r})\n{code}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{fmnist_client.__version__} b'\\x89PNG'"
