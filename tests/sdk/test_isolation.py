"""The SDK stands alone: it imports and works with only httpx and websockets (no torch, numpy, Pillow, server code)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
    async_client = fmnist_client.AsyncClient("http://x")
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
