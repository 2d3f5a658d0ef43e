"""The tutorial (docs/tutorial.md) runs as written, block after block, and type-checks."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from mypy import api as mypy_api

from tests.helpers import python_blocks

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "tutorial.md"


def tutorial_code() -> str:
    blocks = python_blocks("docs/tutorial.md")
    assert len(blocks) >= 6
    return "\n".join(blocks)


def test_the_tutorial_runs_block_after_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # A real module, as a script would be: typing helpers look classes' modules up.
    module = types.ModuleType("tutorial_docs")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(tutorial_code(), str(PAGE), "exec"), vars(module))
    assert isinstance(vars(module)["test_loss"], float)


@pytest.mark.slow
def test_the_tutorial_passes_mypy_strict(tmp_path: Path) -> None:
    module = tmp_path / "tutorial.py"
    module.write_text(tutorial_code())
    stdout, stderr, status = mypy_api.run(
        ["--config-file", str(ROOT / "mypy.ini"), "--no-incremental", str(module)]
    )
    assert status == 0, stdout + stderr
