"""tools/dependency_floors.py: the pins ``make test`` runs part of the suite at."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tools.dependency_floors import floors, main

ROOT = Path(__file__).resolve().parent.parent


def test_every_runtime_dependency_is_pinned_at_its_floor_and_torch_at_the_given_pin() -> None:
    pins = floors(ROOT / "pyproject.toml", "torch==2.13.0")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert len(pins) == len(declared)
    for pin, requirement in zip(pins, declared, strict=True):
        name, version = pin.split("==")
        assert requirement.startswith(name)
        if name != "torch":  # each pin is the requirement's own >= bound
            assert f">={version}" in requirement.replace(" ", "")
    assert "torch==2.13.0" in pins


def test_a_dependency_without_a_floor_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["attrs>=24.3", "tqdm<5"]\n')
    with pytest.raises(ValueError, match=r"'tqdm<5' names no >= floor"):
        floors(pyproject, "torch==2.13.0")
    with pytest.raises(SystemExit) as caught:
        main(["--torch", "torch==2.13.0", str(pyproject)])
    assert caught.value.code == 2
    assert "'tqdm<5' names no >= floor" in capsys.readouterr().err


def test_extras_and_markers_are_read_past(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    marked = "hyperpyyaml[x] >= 1.2.3 ; python_version>'3'"
    pyproject.write_text(f'[project]\ndependencies = ["torch>=2.7", "{marked}"]\n')
    assert floors(pyproject, "torch==9") == ["torch==9", "hyperpyyaml==1.2.3"]
