"""The console script: listing and verifying checkpoints, plotting logs, exit statuses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import rewrite_manifest
from typedbrain._checkpoint import Checkpointer
from typedbrain._cli import main
from typedbrain._errors import CheckpointWarning
from typedbrain._train_log import JsonlTrainLogger

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    """Two committed, intact checkpoints: ``a`` (loss 0.2) then ``b`` (loss 0.3)."""
    folder = tmp_path / "save"
    checkpointer = Checkpointer(folder, {"model": torch.nn.Linear(2, 1)})
    checkpointer.save_checkpoint(meta={"loss": 0.2}, name="CKPT-a")
    checkpointer.save_checkpoint(meta={"loss": 0.3}, end_of_epoch=False, name="CKPT-b")
    return folder


@pytest.fixture
def damaged_folder(good_folder: Path) -> Path:
    """``good_folder`` plus ``c`` (committed, then a byte flipped) and ``d`` (uncommitted)."""
    checkpointer = Checkpointer(good_folder, {"model": torch.nn.Linear(2, 1)})
    checkpoint = checkpointer.save_checkpoint(meta={"loss": 0.1}, name="CKPT-c")
    data = bytearray(checkpoint.paramfiles["model"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.paramfiles["model"].write_bytes(bytes(data))
    uncommitted = good_folder / "CKPT-d"
    uncommitted.mkdir()
    (uncommitted / "model.ckpt").write_bytes(b"half written")
    return good_folder


def _statuses(out: str) -> dict[str, tuple[str, bool, bool]]:
    document = json.loads(out)
    return {
        row["name"]: (row["status"], row["newest"], row["best"]) for row in document["checkpoints"]
    }


# ----------------------------------------------------------------------------- checkpoints


def test_intact_checkpoints_list_with_status_0(
    good_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run(capsys, "checkpoints", str(good_folder), "--verify", "--json")
    assert (status, err) == (0, "")
    document = json.loads(out)
    assert document["folder"] == str(good_folder)
    assert document["ok"] is True
    first, second = document["checkpoints"]
    assert first == {
        "name": "CKPT-a",
        "status": "OK",
        "reason": None,
        "sequence": 1,
        "unixtime": first["unixtime"],
        "end_of_epoch": True,
        "phase": None,
        "meta": {"loss": 0.2},
        "newest": False,
        "best": False,
    }
    assert (second["name"], second["sequence"], second["end_of_epoch"]) == ("CKPT-b", 2, False)
    assert second["newest"] is True


def test_without_verify_only_manifests_are_read(
    damaged_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run(capsys, "checkpoints", str(damaged_folder), "--json")
    assert status == 1  # the uncommitted folder
    assert _statuses(out) == {
        "CKPT-a": ("COMMITTED", False, False),
        "CKPT-b": ("COMMITTED", False, False),
        "CKPT-c": ("COMMITTED", True, False),  # the flipped byte is not looked for
        "CKPT-d": ("UNCOMMITTED", False, False),
    }


def test_verify_finds_the_flipped_byte_and_marks_newest_and_best_among_usable(
    damaged_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run(
        capsys, "checkpoints", str(damaged_folder), "--verify", "--min-key", "loss", "--json"
    )
    assert status == 1
    assert _statuses(out) == {
        "CKPT-a": ("OK", False, True),
        "CKPT-b": ("OK", True, False),
        "CKPT-c": ("CORRUPT", False, False),
        "CKPT-d": ("UNCOMMITTED", False, False),
    }
    rows = {row["name"]: row for row in json.loads(out)["checkpoints"]}
    assert (rows["CKPT-c"]["sequence"], rows["CKPT-c"]["meta"]) == (3, {"loss": 0.1})
    assert rows["CKPT-d"]["sequence"] is None
    reasons = {name: row["reason"] for name, row in rows.items()}
    assert reasons["CKPT-c"] == (
        "the file model.ckpt (recoverable 'model') fails its SHA-256 check "
        "(its bytes changed after the commit)"
    )
    assert reasons["CKPT-d"] == "no MANIFEST.json: the save was interrupted before its commit"


def test_max_key_marks_the_highest_value(
    good_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run(capsys, "checkpoints", str(good_folder), "--max-key", "loss", "--json")
    assert status == 0
    assert _statuses(out)["CKPT-b"] == ("COMMITTED", True, True)


def test_the_table_shows_status_sequence_marks_and_reasons(
    damaged_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run(
        capsys, "checkpoints", str(damaged_folder), "--verify", "--min-key", "loss"
    )
    assert status == 1
    lines = out.splitlines()
    assert lines[0] == f"{damaged_folder}: 4 checkpoint folder(s), files verified"
    assert lines[1].split() == ["STATUS", "SEQ", "SAVED", "END", "PHASE", "FOLDER", "META"]
    assert lines[2].split()[:2] == ["OK", "1"]
    assert lines[2].split()[4:] == ["epoch", "-", "CKPT-a", "[best]", '{"loss":', "0.2}"]
    assert lines[3].split()[4:] == ["mid", "-", "CKPT-b", "[newest]", '{"loss":', "0.3}"]
    assert lines[4].split()[:2] == ["CORRUPT", "3"]
    assert lines[5].split() == ["UNCOMMITTED", "-", "-", "-", "-", "CKPT-d", "-"]
    assert lines[6].startswith("CKPT-c: CORRUPT: the file model.ckpt (recoverable 'model')")
    assert lines[7] == (
        "CKPT-d: UNCOMMITTED: no MANIFEST.json: the save was interrupted before its commit"
    )


def test_an_empty_folder_lists_nothing_with_status_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run(capsys, "checkpoints", str(tmp_path))
    assert (status, out) == (
        0,
        f"{tmp_path}: 0 checkpoint folder(s), manifests read, files not verified\n",
    )


def test_a_missing_or_non_folder_path_is_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run(capsys, "checkpoints", str(tmp_path / "absent"))
    assert (status, out, err) == (
        2,
        "",
        f"typedbrain: error: {tmp_path / 'absent'}: no such folder\n",
    )
    (tmp_path / "file").write_text("x", encoding="utf-8")
    status, _, err = _run(capsys, "checkpoints", str(tmp_path / "file"))
    assert (status, err) == (2, f"typedbrain: error: {tmp_path / 'file'}: not a folder\n")


def test_both_keys_or_no_command_are_usage_errors(
    good_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = _run(
        capsys, "checkpoints", str(good_folder), "--min-key", "a", "--max-key", "b"
    )
    assert status == 2
    assert "not allowed with argument" in err
    assert _run(capsys)[0] == 2


def test_a_meta_value_that_is_not_a_number_is_left_out_of_the_ranking_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 1)})
    checkpointer.save_checkpoint(meta={"loss": 0.5}, name="CKPT-a")
    checkpointer.save_checkpoint(meta={"loss": "low"}, name="CKPT-b")
    status, out, err = _run(capsys, "checkpoints", str(tmp_path), "--min-key", "loss")
    assert status == 0, err
    assert "CKPT-b: meta 'loss' is 'low', not a number; not ranked by 'loss'" in out
    assert "CKPT-a [best]" in out
    assert "CKPT-b [newest]" in out
    # The library ranks them the same way (with a warning instead of the note).
    with pytest.warns(CheckpointWarning, match="'low', not a number"):
        best = checkpointer.find_checkpoint(min_key="loss")
    assert best is not None
    assert best.path.name == "CKPT-a"

    status, out, _ = _run(capsys, "checkpoints", str(tmp_path), "--min-key", "loss", "--json")
    assert status == 0
    document = json.loads(out)
    assert document["notes"] == ["CKPT-b: meta 'loss' is 'low', not a number; not ranked by 'loss'"]
    assert _statuses(out) == {
        "CKPT-a": ("COMMITTED", False, True),
        "CKPT-b": ("COMMITTED", True, False),
    }


def test_a_key_whose_values_are_not_numbers_says_so_rather_than_that_it_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 1)})
    checkpointer.save_checkpoint(meta={"loss": "low"}, name="CKPT-a")
    status, out, _ = _run(capsys, "checkpoints", str(tmp_path), "--min-key", "loss")
    assert status == 0
    assert out.splitlines()[-2:] == [
        "CKPT-a: meta 'loss' is 'low', not a number; not ranked by 'loss'",
        "no usable checkpoint has a number as its meta 'loss'",
    ]
    status, out, _ = _run(capsys, "checkpoints", str(tmp_path), "--max-key", "acc", "--json")
    assert status == 0
    assert json.loads(out)["notes"] == ["no usable checkpoint has the meta key 'acc'"]


@pytest.mark.parametrize("option", ["--min-key", "--max-key"])
def test_an_empty_meta_key_is_a_usage_error(
    good_folder: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    status, out, err = _run(capsys, "checkpoints", str(good_folder), option, "")
    assert (status, out) == (2, "")
    assert err == f"typedbrain: error: {option} needs the name of a meta key, got an empty string\n"


def test_listing_the_folder_above_the_checkpoints_suggests_the_checkpoints_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Checkpointer(tmp_path / "run" / "save", {"model": torch.nn.Linear(2, 1)}).save_checkpoint()
    status, out, _ = _run(capsys, "checkpoints", str(tmp_path / "run"), "--json")
    assert status == 1
    (row,) = json.loads(out)["checkpoints"]
    assert (row["name"], row["status"]) == ("save", "UNCOMMITTED")
    assert row["reason"] == (
        "no MANIFEST.json, but it holds checkpoint folders: it is a checkpoints folder, not a "
        f"checkpoint; did you mean typedbrain checkpoints {tmp_path / 'run' / 'save'}?"
    )


@pytest.mark.slow
def test_a_reader_that_stops_early_ends_the_listing_quietly_with_status_141(
    tmp_path: Path,
) -> None:
    for index in range(3000):  # about 1 MB of JSON: more than a pipe holds
        (tmp_path / f"CKPT-{index:04d}").mkdir()
    with subprocess.Popen(
        [sys.executable, "-m", "typedbrain", "checkpoints", str(tmp_path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        assert process.stdout.readline() == b"{\n"
        process.stdout.close()  # as `| head -1` does
        error = process.stderr.read()
        status = process.wait(timeout=120)
    assert (status, error) == (141, b"")


def test_a_symbolic_link_to_a_checkpoint_folder_is_not_listed_as_a_checkpoint(
    good_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (good_folder / "best").symlink_to(good_folder / "CKPT-a", target_is_directory=True)
    status, out, _ = _run(capsys, "checkpoints", str(good_folder), "--json")
    assert status == 0
    document = json.loads(out)
    assert [row["name"] for row in document["checkpoints"]] == ["CKPT-a", "CKPT-b"]
    assert document["notes"] == ["best: a symbolic link, not a checkpoint folder; not listed"]
    status, out, _ = _run(capsys, "checkpoints", str(good_folder))
    assert status == 0
    assert "2 checkpoint folder(s)" in out
    assert "best: a symbolic link, not a checkpoint folder; not listed" in out
    # The checkpointer ignores the link as well.
    checkpointer = Checkpointer(good_folder, {"model": torch.nn.Linear(2, 1)})
    assert [c.path.name for c in checkpointer.list_checkpoints()] == ["CKPT-a", "CKPT-b"]


def test_json_is_standard_json_with_non_finite_meta_values_as_strings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 1)})
    meta = {"loss": math.nan, "acc": math.inf, "low": -math.inf, "ok": 0.5}
    checkpointer.save_checkpoint(meta=meta, name="CKPT-a")
    status, out, _ = _run(capsys, "checkpoints", str(tmp_path), "--json")
    assert status == 0

    def refuse(constant: str) -> float:
        raise AssertionError(f"not standard JSON: {constant}")

    document = json.loads(out, parse_constant=refuse)
    assert document["checkpoints"][0]["meta"] == {
        "loss": "NaN",
        "acc": "Infinity",
        "low": "-Infinity",
        "ok": 0.5,
    }


def test_a_saved_time_out_of_the_platforms_range_is_shown_as_the_number(
    good_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rewrite_manifest(good_folder / "CKPT-a", lambda data: data.update(unixtime=1e300))
    status, out, _ = _run(capsys, "checkpoints", str(good_folder))
    assert status == 0
    (row,) = [line for line in out.splitlines() if "CKPT-a" in line]
    assert row.split()[:3] == ["COMMITTED", "1", "1e+300"]


_HOSTILE_PHASE = "\x1b[2J\x1b[31mOK\x1b[0m\r\u202e\ud800"  # clear, red, overwrite, RTL, surrogate


def test_a_hostile_phase_is_shown_escaped_in_the_table_and_as_json_in_json(
    good_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rewrite_manifest(good_folder / "CKPT-a", lambda data: data.update(phase=_HOSTILE_PHASE))
    status, out, _ = _run(capsys, "checkpoints", str(good_folder))
    assert status == 0
    (row,) = [line for line in out.splitlines() if "CKPT-a" in line]
    assert row.split()[5] == r"\x1b[2J\x1b[31mOK\x1b[0m\r\u202e\ud800"
    assert all(line.isprintable() for line in out.splitlines())
    status, out, _ = _run(capsys, "checkpoints", str(good_folder), "--json")
    assert status == 0
    assert out.isascii()
    assert json.loads(out)["checkpoints"][0]["phase"] == _HOSTILE_PHASE


def test_a_folder_name_that_is_not_utf8_is_shown_escaped(
    good_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = os.fsdecode(b"CKPT-\xff\x1b[2J")  # "CKPT-\udcff\x1b[2J", as listing it gives
    try:
        (good_folder / name).mkdir()
    except (OSError, UnicodeEncodeError):  # a file system that takes UTF-8 names only
        pytest.skip("the file system refuses a name that is not UTF-8")
    status, out, _ = _run(capsys, "checkpoints", str(good_folder))
    assert status == 1  # the folder has no manifest
    assert "CKPT-\\udcff\\x1b[2J" in out
    assert all(line.isprintable() for line in out.splitlines())
    status, out, _ = _run(capsys, "checkpoints", str(good_folder), "--json")
    names = [row["name"] for row in json.loads(out)["checkpoints"]]
    assert name in names


def _nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def test_a_meta_value_nested_too_deeply_to_print_is_replaced_with_a_note(
    good_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Deep enough for json.dumps's Python encoder (--json indents) to run out of stack.
    rewrite_manifest(
        good_folder / "CKPT-a", lambda data: data.update(meta={"loss": 0.2, "k": _nested(500)})
    )
    placeholder = "<nested more than 100 levels deep: not shown>"
    status, out, _ = _run(capsys, "checkpoints", str(good_folder), "--json", "--min-key", "loss")
    assert status == 0
    document = json.loads(out)
    row = document["checkpoints"][0]
    assert (row["name"], row["best"]) == ("CKPT-a", True)
    assert row["meta"] == {"loss": 0.2, "k": placeholder}
    assert document["notes"] == [
        f"CKPT-a: meta 'k' nests lists or objects more than 100 levels deep; shown as "
        f"{placeholder!r}"
    ]
    status, out, _ = _run(capsys, "checkpoints", str(good_folder), "--min-key", "k")
    assert status == 0
    assert placeholder in out
    assert "CKPT-a: meta 'k' is [[[[[[[...]]]]]]], not a number; not ranked by 'k'" in out


def test_a_meta_value_nested_at_the_limit_is_printed(
    good_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rewrite_manifest(
        good_folder / "CKPT-a", lambda data: data.update(meta={"loss": 0.2, "k": _nested(100)})
    )
    status, out, _ = _run(capsys, "checkpoints", str(good_folder), "--json")
    assert status == 0
    document = json.loads(out)
    assert document["checkpoints"][0]["meta"]["k"] == _nested(100)
    assert document["notes"] == []


def test_help_returns_0(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "--help")
    assert status == 0
    assert "checkpoints" in out
    assert "plot" in out


@pytest.mark.slow
def test_python_dash_m_runs_the_console_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "typedbrain", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: typedbrain [-h] [--version] COMMAND ...")


# ----------------------------------------------------------------------------- plot


def _training_log(path: Path) -> Path:
    log = JsonlTrainLogger(path)
    for epoch in range(1, 5):
        log.log_stats(
            {"epoch": epoch, "lr": 0.1},
            {"loss": 2.0 / epoch},
            {"loss": 2.5 / epoch, "error": 0.5 / epoch},
        )
    log.log_stats({"Epoch loaded": 4}, test_stats={"loss": 0.6})
    return path


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots" / "log.png"
    status, stdout, err = _run(
        capsys, "plot", str(_training_log(tmp_path / "log.jsonl")), "--out", str(out)
    )
    assert (status, err) == (0, "")
    assert stdout == f"wrote {out} (2 panel(s), 4 entries)\n"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_plot_of_a_missing_log_is_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = _run(capsys, "plot", str(tmp_path / "absent.jsonl"), "--out", "x.png")
    assert (status, err) == (2, f"typedbrain: error: {tmp_path / 'absent.jsonl'}: no such file\n")


def test_plot_of_a_corrupt_log_names_the_line_with_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _training_log(tmp_path / "log.jsonl")
    lines = log.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1][:-5]
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    status, _, err = _run(capsys, "plot", str(log), "--out", str(tmp_path / "x.png"))
    assert status == 1
    assert err.startswith(f"typedbrain: error: training log {log}, line 2: not JSON")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("line", "reason"),
    [("[" * 100_000 + "]" * 100_000, "nested too deeply"), ("1" * 100_000, "an integer of more")],
)
def test_plot_of_a_hostile_log_line_is_status_1_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, reason: str
) -> None:
    log = _training_log(tmp_path / "log.jsonl")
    with log.open("a", encoding="utf-8") as stream:
        stream.write(line + "\n")
    count = len(log.read_text(encoding="utf-8").splitlines())
    status, _, err = _run(capsys, "plot", str(log), "--out", str(tmp_path / "x.png"))
    assert status == 1
    assert err.startswith(f"typedbrain: error: training log {log}, line {count}: ")
    assert reason in err
    assert not (tmp_path / "x.png").exists()


def test_plot_of_a_log_without_training_numbers_is_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.jsonl"
    JsonlTrainLogger(log).log_stats({"Epoch loaded": 1}, test_stats={"loss": 1.0})
    status, _, err = _run(capsys, "plot", str(log), "--out", str(tmp_path / "x.png"))
    assert (status, err) == (1, f"typedbrain: error: {log}: no train or valid numbers to plot\n")


def test_plot_without_matplotlib_names_the_extra_with_status_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    log = _training_log(tmp_path / "log.jsonl")
    status, _, err = _run(capsys, "plot", str(log), "--out", str(tmp_path / "x.png"))
    assert status == 3
    assert "install the 'typedbrain[plot]' extra" in err


def test_plot_to_an_existing_folder_is_status_2_before_the_log_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run(capsys, "plot", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path))
    assert (status, out, err) == (
        2,
        "",
        f"typedbrain: error: {tmp_path}: is a folder, not a PNG file\n",
    )


def test_plot_under_a_path_that_is_a_file_is_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x", encoding="utf-8")
    out = tmp_path / "file" / "sub" / "x.png"
    log = _training_log(tmp_path / "log.jsonl")
    status, _, err = _run(capsys, "plot", str(log), "--out", str(out))
    assert (status, err) == (2, f"typedbrain: error: {out}: {tmp_path / 'file'} is not a folder\n")


def test_plot_draws_no_panel_for_a_metric_without_a_finite_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    for epoch in (1, 2):
        JsonlTrainLogger(log).log_stats({"epoch": epoch}, {"loss": 1.0 / epoch, "err": math.nan})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns about a legend with nothing in it
        status, stdout, err = _run(capsys, "plot", str(log), "--out", str(tmp_path / "x.png"))
    assert (status, err) == (0, "")
    assert stdout == f"wrote {tmp_path / 'x.png'} (1 panel(s), 2 entries)\n"


def test_plot_leaves_out_an_integer_too_large_for_a_float(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    JsonlTrainLogger(log).log_stats({"epoch": 1}, {"loss": 1.0, "count": 123456789})
    JsonlTrainLogger(log).log_stats({"epoch": 2}, {"loss": 0.5, "count": 7})
    log.write_text(
        log.read_text(encoding="utf-8").replace("123456789", "9" * 400), encoding="utf-8"
    )
    status, stdout, err = _run(capsys, "plot", str(log), "--out", str(tmp_path / "x.png"))
    assert (status, err) == (0, "")
    assert stdout == f"wrote {tmp_path / 'x.png'} (2 panel(s), 2 entries)\n"
