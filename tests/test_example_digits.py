"""The digits recipe (examples/digits) trains, checkpoints, resumes and tests for real."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from examples.digits import demo
from examples.digits.train import TARGET_ACCURACY, DigitsHparams, main
from tests.test_ddp import torchrun
from typedbrain import HparamsError, load_hparams, split_run_options, structure_hparams

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "digits" / "hparams.yaml"


def test_recipe_reaches_the_target_accuracy_in_five_epochs_and_fills_its_folder(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run"
    argv = [str(RECIPE), "--number_of_epochs", "5", "--output_folder", str(folder)]
    accuracy = main([*argv, "--noprogressbar"])
    assert TARGET_ACCURACY <= accuracy <= 1.0
    names = {path.name for path in folder.iterdir()}
    assert {"hyperparams.yaml", "env.json", "log.txt", "train.py", "save"} <= names
    entries = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in entries] == [1, 2, 3, 4, 5, None]  # then the test entry
    assert entries[-1]["test"]["error"] == pytest.approx(1.0 - accuracy)
    # The test used the checkpoint with the lowest validation error.
    best = min(entries[:-1], key=lambda entry: (entry["valid"]["error"], -entry["epoch"]))
    assert entries[-1]["stats_meta"] == {"epoch loaded": best["epoch"]}


def test_recipe_yaml_structures_into_its_typed_hparams() -> None:
    options, rest = split_run_options(load_hparams(RECIPE))
    assert options == {"ckpt_interval_steps": 10, "noprogressbar": False}
    hparams = structure_hparams(rest, DigitsHparams, source=str(RECIPE))
    assert hparams.lr == pytest.approx(0.01)
    assert hparams.checkpointer.recoverables["model"] is hparams.model


def test_a_wrong_override_type_is_reported_with_the_key_and_file() -> None:
    _, rest = split_run_options(load_hparams(RECIPE, {"batch_size": "32"}))
    with pytest.raises(HparamsError) as caught:
        structure_hparams(rest, DigitsHparams, source=str(RECIPE))
    assert "batch_size" in str(caught.value)
    assert str(RECIPE) in str(caught.value)


def test_an_override_of_a_key_the_recipe_lacks_exits_2_naming_it_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(RECIPE), "--number_of_epoch", "5", "--output_folder", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("train.py: error: override 'number_of_epoch' ")
    assert "did you mean 'number_of_epochs'?" in error
    assert not (tmp_path / "run").exists()  # nothing was made


def test_the_demo_stops_the_recipe_resumes_it_and_inspects_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert demo.main() == 0
    output = tmp_path / demo.OUTPUT
    assert (output / "loss.png").read_bytes().startswith(b"\x89PNG")
    log = (output / "log.txt").read_text()
    assert "training stopped by signal 15; a checkpoint was saved" in log
    assert "continuing epoch" in log
    # The training log went on after the resume without repeating or losing an epoch.
    entries = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    epochs = [entry["epoch"] for entry in entries[:-1]]
    assert epochs == list(range(1, len(epochs) + 1))
    assert len(epochs) > demo.STOP_AFTER_EPOCHS
    assert entries[-1]["test"] is not None


def test_the_recipe_runs_unchanged_under_torchrun_on_two_processes(tmp_path: Path) -> None:
    folder = tmp_path / "ddp"
    command = torchrun(
        str(RECIPE.parent / "train.py"),
        str(RECIPE),
        "--number_of_epochs",
        "8",  # each step sees twice the examples, so there are half as many steps per epoch
        "--output_folder",
        str(folder),
        "--noprogressbar",
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    accuracies = re.findall(r"test accuracy: ([0-9.]+)%", done.stdout)
    assert len(accuracies) == 2  # each process prints the same, reduced accuracy
    assert accuracies[0] == accuracies[1]
    assert float(accuracies[0]) / 100 >= TARGET_ACCURACY
    # One process wrote the logs and the checkpoints, each epoch once.
    entries = (folder / "train_log.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in entries]
    assert epochs == [*range(1, len(epochs)), None]
    saved = [path for path in (folder / "save").iterdir() if not path.name.startswith(".")]
    assert all((path / "MANIFEST.json").exists() for path in saved)  # (not the lock file)


def test_an_interval_on_the_command_line_replaces_the_recipes_and_is_recorded(
    tmp_path: Path,
) -> None:
    """The recipe file sets ckpt_interval_steps; the command line's minutes replace it."""
    folder = tmp_path / "run"
    argv = [str(RECIPE), "--number_of_epochs", "1", "--debug", "--debug_persistently"]
    main([*argv, "--ckpt_interval_minutes", "5", "--output_folder", str(folder), "--noprogressbar"])
    recorded = json.loads((folder / "env.json").read_text())["run_opts"]
    assert (recorded["ckpt_interval_minutes"], recorded["ckpt_interval_steps"]) == (5.0, 0)


def _recipe_with(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the recipe with ``old`` replaced by ``new`` (which must be in it once)."""
    text = RECIPE.read_text()
    assert text.count(old) == 1
    recipe = tmp_path / "hparams.yaml"
    recipe.write_text(text.replace(old, new))
    return recipe


@pytest.mark.parametrize("mistake", ["unknown class", "missing include", "missing device"])
def test_a_recipe_mistake_found_while_building_exits_2_naming_it_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mistake: str
) -> None:
    recipe, extra = RECIPE, []
    if mistake == "unknown class":
        recipe = _recipe_with(tmp_path, "!new:torch.nn.ReLU", "!new:torch.nn.NoSuchReLU")
        expected = r"ImportError: .*torch\.nn\.NoSuchReLU.*\(while building"
    elif mistake == "missing include":
        missing = tmp_path / "absent.yaml"
        recipe = _recipe_with(
            tmp_path, "\nseed: 1234\n", f"\nseed: 1234\nextra: !include:{missing}\n"
        )
        expected = rf"FileNotFoundError: .*{re.escape(str(missing))}.*\(while loading"
    else:
        extra = ["--device", "cuda:99"]  # no machine has a hundredth GPU
        expected = r"run option 'device': 'cuda:99' is not available"
    argv = [str(recipe), "--output_folder", str(tmp_path / "run"), *extra]
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("train.py: error: ")
    assert re.search(expected, error), error
    assert "Traceback" not in error
