"""The pages under docs/ agree with the code and the repository: signatures, links, pointers."""

from __future__ import annotations

import ast
import inspect
import re

from tests.conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"
# A path written in backticks or as a Markdown link target, e.g. `../shared/DESIGN.md` or (api.md).
RELATIVE_FILE = re.compile(r"[`(]((?:\.\./|\./)?[\w./-]+\.(?:md|py|toml|yml|png))[`)]")


def documented_call(page: str, callee: str) -> ast.Call:
    """The first `callee(...)` written in a code block of `page` (a bare `*,` marker is allowed)."""
    text = (DOCS / page).read_text(encoding="utf-8")
    match = re.search(rf"^{callee}\((.*?)\)$", text, re.MULTILINE | re.DOTALL)
    assert match, f"docs/{page} shows no {callee}(...) signature"
    call = ast.parse(f"{callee}({match.group(1).replace('*,', '')})", mode="eval").body
    assert isinstance(call, ast.Call)
    return call


def test_model_page_shows_the_classifier_constructor_defaults() -> None:
    """docs/model.md's ImageClassifier(...) lists every parameter with the default the code has."""
    from ml import ImageClassifier

    documented = {
        keyword.arg: ast.literal_eval(keyword.value)
        for keyword in documented_call("model.md", "ImageClassifier").keywords
    }
    parameters = list(inspect.signature(ImageClassifier.__init__).parameters.values())[1:]
    actual = {parameter.name: parameter.default for parameter in parameters}
    assert documented == actual


def test_docs_point_only_at_files_in_the_repository() -> None:
    """Every relative file path a docs page names exists, resolved from the page or the repository root."""
    missing = []
    for page in sorted(DOCS.glob("*.md")):
        for name in RELATIVE_FILE.findall(page.read_text(encoding="utf-8")):
            inside = [(page.parent / name).resolve(), (REPO_ROOT / name).resolve()]
            if not any(path.is_relative_to(REPO_ROOT) and path.exists() for path in inside):
                missing.append(f"docs/{page.name}: {name}")
    assert missing == []
