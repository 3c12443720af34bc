"""The complete plugin of docs/plugins.md, and its test, run as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.worker

DOC = Path(__file__).parent.parent / "docs" / "plugins.md"


def block_after(text: str, marker: str) -> str:
    """The first fenced code block after `marker`."""
    rest = text[text.index(marker) :]
    match = re.search(r"```(?:python|toml)\n(.*?)```", rest, re.S)
    assert match is not None, marker
    return match.group(1)


async def test_the_documented_plugin_and_its_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = DOC.read_text()
    package = tmp_path / "emp_connector_echo"
    package.mkdir()
    (package / "__init__.py").write_text(block_after(text, "`emp_connector_echo/__init__.py`:"))
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict[str, Any] = {}
    exec(block_after(text, "## Testing a connector against a real hub"), namespace)
    await namespace["test_echo"]()
