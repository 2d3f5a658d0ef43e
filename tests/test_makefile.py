"""The Makefile's markers: a venv made with another torch pin is brought to the one asked for."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _dry_run(target: Path, **variables: str) -> str:
    """What ``make -n target`` would run here, with ``variables`` set on its command line."""
    settings = [f"{name}={value}" for name, value in variables.items()]
    done = subprocess.run(
        ["make", "-n", "-C", str(ROOT), *settings, str(target)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def _venv(folder: Path, marker: str, pin: str) -> Path:
    """A venv folder whose ``marker`` (made after its python) records ``pin``."""
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").write_text("")
    (folder / marker).write_text(f"{pin}\n")
    return folder / marker


@pytest.mark.parametrize("pin", ["torch==2.13.0", "torch==2.7.1"])
def test_the_venv_torch_marker_is_remade_only_for_another_pin(tmp_path: Path, pin: str) -> None:
    marker = _venv(tmp_path / "venv", ".torch", "torch==2.13.0")
    planned = _dry_run(marker, VENV=str(tmp_path / "venv"), TORCH_SPEC=pin)
    installs = f"--disable-pip-version-check install {pin}" in planned
    assert installs == (pin != "torch==2.13.0"), planned


@pytest.mark.parametrize("pin", ["torch==2.13.0", "torch==2.7.1"])
def test_the_floors_venv_is_made_afresh_only_for_another_pin(tmp_path: Path, pin: str) -> None:
    floors = tmp_path / "floors"
    _venv(floors, ".torch", "torch==2.13.0")
    marker = floors / ".installed"
    marker.write_text("")  # newer than pyproject.toml and tools/dependency_floors.py
    planned = _dry_run(marker, FLOORS_VENV=str(floors), TORCH_SPEC=pin)
    remade = f"rm -rf {floors}" in planned
    assert remade == (pin != "torch==2.13.0"), planned
    if remade:
        assert f"echo '{pin}' > {floors}/.torch" in planned
