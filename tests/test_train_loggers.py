"""Training loggers: exact line formats, JSONL round trip, resume without duplicates, rank 0."""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from typedbrain._checkpoint import Checkpointer
from typedbrain._errors import ConfigurationError, ResumeWarning, TrainLogError
from typedbrain._train_log import (
    FileTrainLogger,
    JsonlTrainLogger,
    LogEntry,
    ScalarWriter,
    StatValue,
    TensorboardTrainLogger,
    TrainLogger,
    format_stat,
    read_jsonl_log,
)

# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.234, "1.23"),
        (99.5, "99.50"),
        (99.999, "100.00"),  # inside (1, 100), so fixed-point even though it rounds up
        (1.0, "1.00e+00"),  # the bounds are excluded
        (100.0, "1.00e+02"),
        (0.1, "1.00e-01"),
        (0.0, "0.00e+00"),
        (-2.5, "-2.50e+00"),
        (12345.678, "1.23e+04"),
        (math.nan, "nan"),
        (3, "3"),
        (True, "True"),
        ("adam", "adam"),
    ],
)
def test_format_stat_uses_fixed_point_strictly_between_1_and_100(
    value: StatValue, expected: str
) -> None:
    assert format_stat(value) == expected


def test_format_stat_precision_applies_to_both_notations() -> None:
    assert (format_stat(3.14159, 3), format_stat(0.001234, 3)) == ("3.142", "1.234e-03")


def test_file_logger_writes_speechbrain_style_lines(tmp_path: Path) -> None:
    log = FileTrainLogger(tmp_path / "train_log.txt")
    log.log_stats({"epoch": 1, "lr": 0.1}, {"loss": 1.234}, {"loss": 1.1, "error": 0.25})
    log.log_stats({"Epoch loaded": 1}, test_stats={"loss": 2.0})
    assert (tmp_path / "train_log.txt").read_text(encoding="utf-8") == (
        "epoch: 1, lr: 1.00e-01 - train loss: 1.23 - valid loss: 1.10, valid error: 2.50e-01\n"
        "Epoch loaded: 1 - test loss: 2.00\n"
    )


def test_file_logger_creates_missing_folders_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "log.txt"
    path.parent.mkdir(parents=True)
    path.write_text("earlier run\n", encoding="utf-8")
    FileTrainLogger(path).log_stats({"epoch": 2})
    assert path.read_text(encoding="utf-8") == "earlier run\nepoch: 2\n"


def test_file_logger_rejects_a_negative_precision(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="precision"):
        FileTrainLogger(tmp_path / "log.txt", precision=-1)


@pytest.mark.parametrize(
    ("logger_class", "usual"),
    [(FileTrainLogger, "train_log.txt"), (JsonlTrainLogger, "train_log.jsonl")],
)
def test_a_folder_as_the_log_file_is_refused_at_construction_naming_it(
    tmp_path: Path, logger_class: type[FileTrainLogger | JsonlTrainLogger], usual: str
) -> None:
    with pytest.raises(
        ConfigurationError,
        match=rf"save_file {tmp_path} is a folder, not a file; name the log file in it, such as "
        rf"{tmp_path / usual}",
    ):
        logger_class(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("logger_class", [FileTrainLogger, JsonlTrainLogger])
@pytest.mark.parametrize(
    ("given", "message"),
    [(None, r"save_file must be a path .*got NoneType None"), ("", r"save_file is an empty")],
)
def test_a_log_file_that_is_no_path_is_refused_naming_it(
    logger_class: type[FileTrainLogger | JsonlTrainLogger], given: object, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        logger_class(given)  # type: ignore[arg-type]  # wrong on purpose


def test_verbose_logs_the_line_at_info(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="typedbrain"):
        FileTrainLogger(tmp_path / "log.txt").log_stats({"epoch": 1}, {"loss": 2.5}, verbose=True)
    assert [record.getMessage() for record in caplog.records] == ["epoch: 1 - train loss: 2.50"]


# ----------------------------------------------------------------------------- JSON lines


def test_jsonl_logger_writes_one_object_per_line_with_fixed_keys(tmp_path: Path) -> None:
    path = tmp_path / "train_log.jsonl"
    log = JsonlTrainLogger(path)
    log.log_stats({"epoch": 1, "lr": 0.1}, {"loss": 1.5}, {"loss": 1.25, "error": 0.5})
    log.log_stats({"Epoch loaded": 1}, test_stats={"loss": 1.75})
    assert path.read_text(encoding="utf-8").splitlines() == [
        '{"step": 1, "epoch": 1, "stats_meta": {"epoch": 1, "lr": 0.1}, "train": {"loss": 1.5}, '
        '"valid": {"loss": 1.25, "error": 0.5}, "test": null}',
        '{"step": 2, "epoch": null, "stats_meta": {"Epoch loaded": 1}, "train": null, '
        '"valid": null, "test": {"loss": 1.75}}',
    ]


def test_jsonl_log_reads_back_what_was_logged(tmp_path: Path) -> None:
    path = tmp_path / "train_log.jsonl"
    log = JsonlTrainLogger(path)
    log.log_stats({"epoch": 1, "lr": 0.1, "optimizer": "sgd"}, {"loss": 1 / 3}, {"loss": math.inf})
    log.log_stats({"epoch": 2}, {"loss": 0.2, "count": 7})
    entries = read_jsonl_log(path)
    assert entries == [
        LogEntry(
            step=1,
            epoch=1,
            stats_meta={"epoch": 1, "lr": 0.1, "optimizer": "sgd"},
            train={"loss": 1 / 3},
            valid={"loss": math.inf},
        ),
        LogEntry(step=2, epoch=2, stats_meta={"epoch": 2}, train={"loss": 0.2, "count": 7}),
    ]
    assert entries[0].to_json() == path.read_text(encoding="utf-8").splitlines()[0]


def test_jsonl_logger_refuses_values_that_are_not_numbers_or_strings(tmp_path: Path) -> None:
    log = JsonlTrainLogger(tmp_path / "log.jsonl")
    bad: dict[str, object] = {"loss": torch.tensor([1.0, 2.0])}
    with pytest.raises(
        ConfigurationError,
        match=r"'train': 'loss' is tensor\(\[1\., 2\.\]\) \(a torch\.Tensor of 2 elements\), "
        "not a real number or a string",
    ):
        log.log_stats({"epoch": 1}, bad)  # type: ignore[arg-type]  # the wrong type on purpose
    assert not (tmp_path / "log.jsonl").exists()


def test_a_refused_value_is_shortened_in_the_message(tmp_path: Path) -> None:
    log = JsonlTrainLogger(tmp_path / "log.jsonl")
    huge: dict[str, object] = {"per_class": list(range(10**6))}
    with pytest.raises(ConfigurationError) as caught:
        log.log_stats({"epoch": 1}, huge)  # type: ignore[arg-type]  # the wrong type on purpose
    message = str(caught.value)
    assert "'train': 'per_class' is [0, 1, 2, 3, 4, 5, ...] (a list)" in message
    assert len(message) < 400


def test_jsonl_logger_refuses_a_key_that_is_not_a_string_naming_the_key(tmp_path: Path) -> None:
    log = JsonlTrainLogger(tmp_path / "log.jsonl")
    bad: dict[object, object] = {1: 2.0}
    with pytest.raises(ConfigurationError, match=r"'train': the key 1 is not a string \(int\)"):
        log.log_stats({"epoch": 1}, bad)  # type: ignore[arg-type]  # the wrong type on purpose
    assert not (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "a JSON list, not an object"),
        ('{"step": 2, "epoch": 1}', "the keys are"),
        (
            '{"step": 0, "epoch": 1, "stats_meta": {}, "train": null, "valid": null, "test": null}',
            "'step' is 0",
        ),
        (
            '{"step": 2, "epoch": 1, "stats_meta": {}, "train": {"loss": [1]}, "valid": null, '
            '"test": null}',
            "'train': 'loss' is [1]",
        ),
    ],
)
def test_reading_a_bad_line_names_the_file_and_the_line(
    tmp_path: Path, line: str, reason: str
) -> None:
    path = tmp_path / "log.jsonl"
    JsonlTrainLogger(path).log_stats({"epoch": 1}, {"loss": 1.0})
    with path.open("a", encoding="utf-8") as stream:
        stream.write(line + "\n")
    with pytest.raises(TrainLogError) as caught:
        read_jsonl_log(path)
    assert (caught.value.path, caught.value.line) == (path, 2)
    assert str(caught.value).startswith(f"training log {path}, line 2: ")
    assert reason in caught.value.reason


def test_reading_skips_an_interrupted_last_line_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    JsonlTrainLogger(path).log_stats({"epoch": 1}, {"loss": 1.0})
    with path.open("a", encoding="utf-8") as stream:
        stream.write('{"step": 2, "ep')
    with pytest.warns(UserWarning, match=r"skipped line 2 of .*: it has no newline"):
        entries = read_jsonl_log(path)
    assert [entry.step for entry in entries] == [1]


def test_reading_a_missing_log_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_jsonl_log(tmp_path / "absent.jsonl")


_GOOD_LINE = (
    '{"step": 1, "epoch": 1, "stats_meta": {"epoch": 1}, "train": {"loss": 1.5}, '
    '"valid": null, "test": null}'
)
_HOSTILE_LINES = [  # (line, reason): lines no logger writes, that json.loads cannot return
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="deep"),
    pytest.param(
        _GOOD_LINE.replace("1.5", "[" * 5000 + "]" * 5000).encode(),
        "nested too deeply",
        id="deep-in-stats",
    ),
    pytest.param(b"1" * 100_000, "an integer of more than", id="long-int"),
    pytest.param(
        _GOOD_LINE.replace("1.5", "7" * 10_000).encode(),
        "an integer of more than",
        id="long-int-in-stats",
    ),
    pytest.param(
        _GOOD_LINE.encode().replace(b"1.5", b'"\xff"'),
        "not UTF-8",
        id="not-utf8",
    ),
]


@pytest.mark.parametrize(("line", "reason"), _HOSTILE_LINES)
def test_a_hostile_line_is_a_train_log_error_naming_file_and_line(
    tmp_path: Path, line: bytes, reason: str
) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(_GOOD_LINE.encode() + b"\n" + line + b"\n")
    with pytest.raises(TrainLogError) as caught:
        read_jsonl_log(path)
    assert (caught.value.path, caught.value.line) == (path, 2)
    assert reason in caught.value.reason


@pytest.mark.parametrize(("line", "reason"), _HOSTILE_LINES)
def test_a_resume_cuts_a_hostile_line_after_the_checkpoint(
    tmp_path: Path, line: bytes, reason: str
) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(_GOOD_LINE.encode() + b"\n" + line + b"\n")
    resumed = JsonlTrainLogger(path)
    resumed.load_state_dict({"position": len(_GOOD_LINE) + 1, "entries": 1})
    del reason  # the resumed logger cuts the line, whatever is wrong with it
    resumed.log_stats({"epoch": 2}, {"loss": 0.5})
    assert [(entry.step, entry.epoch) for entry in read_jsonl_log(path)] == [(1, 1), (2, 2)]


# ----------------------------------------------------------------------------- values


_ALL_LOGGERS = ("file", "jsonl", "tensorboard")


def _logger(kind: str, tmp_path: Path) -> tuple[TrainLogger, Callable[[], str]]:
    """A logger of ``kind`` and a function returning what it wrote as text ("" for nothing)."""
    if kind == "tensorboard":
        factory = _FakeWriterFactory()
        board = TensorboardTrainLogger(tmp_path / "tb", writer_factory=factory)
        return board, lambda: "".join(repr(writer.scalars) for writer in factory.writers)
    path = tmp_path / "log"
    log = FileTrainLogger(path) if kind == "file" else JsonlTrainLogger(path)
    return log, lambda: path.read_text(encoding="utf-8") if path.exists() else ""


def test_tensors_and_numpy_scalars_are_logged_as_numbers_by_every_logger(tmp_path: Path) -> None:
    meta: dict[str, object] = {"epoch": torch.tensor(3), "lr": np.float32(0.125)}
    train: dict[str, object] = {"loss": torch.tensor([0.5])}
    valid: dict[str, object] = {"error": np.float64(0.25), "n": np.int64(7), "ok": np.bool_(True)}
    board_factory = _FakeWriterFactory()
    board = TensorboardTrainLogger(tmp_path / "tb", writer_factory=board_factory)
    loggers: list[TrainLogger] = [
        FileTrainLogger(tmp_path / "log.txt"),
        JsonlTrainLogger(tmp_path / "log.jsonl"),
        board,
    ]
    for log in loggers:
        log.log_stats(meta, train, valid)  # type: ignore[arg-type]  # accepted at run time
    assert (tmp_path / "log.txt").read_text(encoding="utf-8") == (
        "epoch: 3, lr: 1.25e-01 - train loss: 5.00e-01 - valid error: 2.50e-01, valid n: 7, "
        "valid ok: True\n"
    )
    (entry,) = read_jsonl_log(tmp_path / "log.jsonl")
    assert entry == LogEntry(
        step=1,
        epoch=3,
        stats_meta={"epoch": 3, "lr": 0.125},
        train={"loss": 0.5},
        valid={"error": 0.25, "n": 7, "ok": True},
    )
    assert entry.valid is not None
    assert [type(value) for value in entry.valid.values()] == [float, int, bool]
    assert board_factory.writers[0].scalars == [
        ("meta/lr", 0.125, 3),
        ("train/loss", 0.5, 3),
        ("valid/error", 0.25, 3),
        ("valid/n", 7.0, 3),
        ("valid/ok", 1.0, 3),
    ]


def test_the_file_logger_applies_its_precision_to_numpy_floats(tmp_path: Path) -> None:
    line = FileTrainLogger(tmp_path / "log.txt", precision=3).format_line(
        {"epoch": 1},
        {"acc": np.float32(12.3456)},  # type: ignore[dict-item]  # accepted at run time
    )
    assert line == "epoch: 1 - train acc: 12.346"


_NUMBER_LOGGERS = [kind for kind in _ALL_LOGGERS if kind != "file"]


@pytest.mark.parametrize("kind", _NUMBER_LOGGERS)
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ([0.1, 0.2], r"\[0\.1, 0\.2\] \(a list\)"),
        (None, r"None \(a NoneType\)"),
        (torch.ones(3), r"\(a torch\.Tensor of 3 elements\)"),
        (np.zeros(2), r"\(a numpy\.ndarray of 2 elements\)"),
        (1 + 2j, r"\(1\+2j\) \(a complex\)"),
        (torch.tensor(1 + 2j), r"\(a torch\.Tensor\)"),
    ],
)
def test_every_logger_refuses_a_value_that_is_not_a_number_naming_key_and_type(
    tmp_path: Path, kind: str, value: object, shown: str
) -> None:
    log, written = _logger(kind, tmp_path)
    stats: dict[str, object] = {"loss": 1.0, "bad": value}
    with pytest.raises(ConfigurationError, match=rf"'valid': 'bad' is .*{shown}, not a real"):
        log.log_stats({"epoch": 1}, valid_stats=stats)  # type: ignore[arg-type]  # on purpose
    assert written() == ""
    log.log_stats({"epoch": 1}, valid_stats={"loss": 1.0})  # the next entry is written
    assert "loss" in written()


@pytest.mark.parametrize(
    ("value", "text"),
    [([0.1, 0.2], "[0.1, 0.2]"), (None, "None"), (1 + 2j, "(1+2j)")],
)
def test_the_file_logger_writes_other_values_as_their_text(
    tmp_path: Path, value: object, text: str
) -> None:
    """As SpeechBrain's file logger does: a text log can show any value."""
    log = FileTrainLogger(tmp_path / "log.txt")
    log.log_stats({"epoch": 1, "lr": value}, {"loss": torch.tensor(0.5)})  # type: ignore[dict-item]  # on purpose
    assert (tmp_path / "log.txt").read_text() == f"epoch: 1, lr: {text} - train loss: 5.00e-01\n"


# ----------------------------------------------------------------------------- resume

LoggerFactory = Callable[[Path], FileTrainLogger | JsonlTrainLogger]
FACTORIES: list[LoggerFactory] = [FileTrainLogger, JsonlTrainLogger]


def _epoch(log: FileTrainLogger | JsonlTrainLogger, epoch: int) -> None:
    log.log_stats(
        {"epoch": epoch, "lr": 0.1 / epoch}, {"loss": 10.0 / epoch}, {"loss": 11.0 / epoch}
    )


@pytest.mark.parametrize("factory", FACTORIES)
def test_resumed_log_equals_the_uninterrupted_one(tmp_path: Path, factory: LoggerFactory) -> None:
    reference = factory(tmp_path / "reference.log")
    for epoch in range(1, 6):
        _epoch(reference, epoch)

    path = tmp_path / "resumed.log"
    first = factory(path)
    _epoch(first, 1)
    _epoch(first, 2)
    state = first.state_dict()  # the checkpoint after epoch 2
    _epoch(first, 3)  # logged, then the run dies before its checkpoint
    _epoch(first, 4)

    second = factory(path)
    second.load_state_dict(dict(state))
    for epoch in range(3, 6):
        _epoch(second, epoch)
    assert path.read_bytes() == (tmp_path / "reference.log").read_bytes()


@pytest.mark.parametrize("factory", FACTORIES)
def test_test_entries_logged_after_the_checkpoint_survive_a_resumed_training_entry(
    tmp_path: Path, factory: LoggerFactory
) -> None:
    path = tmp_path / "resumed.log"
    first = factory(path)
    _epoch(first, 1)
    state = first.state_dict()  # the checkpoint after epoch 1
    _epoch(first, 2)  # the run ends after epoch 2 without a checkpoint of it
    first.log_stats({"Epoch loaded": 1}, test_stats={"loss": 2.0})
    first.log_stats({"Epoch loaded": 1}, test_stats={"loss": 3.0})

    reference = factory(tmp_path / "reference.log")  # the entries the resumed file must hold
    _epoch(reference, 1)
    reference.log_stats({"Epoch loaded": 1}, test_stats={"loss": 2.0})
    reference.log_stats({"Epoch loaded": 1}, test_stats={"loss": 3.0})
    _epoch(reference, 2)

    second = factory(path)
    second.load_state_dict(dict(state))
    _epoch(second, 2)  # a restart with more epochs trains from the checkpoint again
    assert path.read_bytes() == (tmp_path / "reference.log").read_bytes()


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_resume_says_how_many_entries_it_removed_and_kept(
    tmp_path: Path, factory: LoggerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "resumed.log"
    first = factory(path)
    _epoch(first, 1)
    state = first.state_dict()  # the checkpoint after epoch 1
    _epoch(first, 2)
    first.log_stats({"Epoch loaded": 1}, test_stats={"loss": 2.0})
    training_line = path.read_bytes()[state["position"] :].split(b"\n")[0]  # epoch 2's
    second = factory(path)
    second.load_state_dict(dict(state))
    with caplog.at_level(logging.INFO, logger="typedbrain"):
        _epoch(second, 2)
    [message] = [r.getMessage() for r in caplog.records if "after the checkpoint" in r.message]
    assert message == (
        f"removed 1 entry logged after the checkpoint from {path} ({len(training_line) + 1} "
        "bytes; it is logged again) and kept the 1 other entry there"
    )


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_resume_after_which_only_test_entries_were_logged_leaves_the_log_untouched(
    tmp_path: Path, factory: LoggerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A finished run started again with more epochs: its test entry stays, nothing is cut."""
    path = tmp_path / "resumed.log"
    first = factory(path)
    _epoch(first, 1)
    state = first.state_dict()  # the checkpoint after the last epoch
    first.log_stats({"Epoch loaded": 1}, test_stats={"loss": 2.0})
    before = path.read_bytes()
    second = factory(path)
    second.load_state_dict(dict(state))
    with caplog.at_level(logging.INFO, logger="typedbrain"):
        _epoch(second, 2)
    assert not [r for r in caplog.records if "after the checkpoint" in r.getMessage()]
    assert path.read_bytes().startswith(before)  # the new epoch is appended after it


@pytest.mark.parametrize("train_stats", [{"loss:ctc": 0.5}, {"a - b": 0.5}, {}])
def test_a_training_line_is_not_kept_at_a_resume_whatever_its_keys(
    tmp_path: Path, train_stats: dict[str, StatValue]
) -> None:
    path = tmp_path / "log.txt"
    reference = tmp_path / "reference.txt"
    first = FileTrainLogger(path)
    first.log_stats({"epoch": 1}, train_stats)
    state = first.state_dict()
    first.log_stats({"epoch": 2}, train_stats)  # cut off at the resume, and logged again
    second = FileTrainLogger(path)
    second.load_state_dict(dict(state))
    second.log_stats({"epoch": 2}, train_stats)
    straight = FileTrainLogger(reference)
    straight.log_stats({"epoch": 1}, train_stats)
    straight.log_stats({"epoch": 2}, train_stats)
    assert path.read_text() == reference.read_text()


@pytest.mark.parametrize("factory", FACTORIES)
def test_state_records_bytes_and_entries(tmp_path: Path, factory: LoggerFactory) -> None:
    path = tmp_path / "log"
    log = factory(path)
    assert log.state_dict() == {"position": 0, "entries": 0}
    _epoch(log, 1)
    assert log.state_dict() == {"position": path.stat().st_size, "entries": 1}


def test_resume_through_a_checkpointer_leaves_no_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "train_log.jsonl"
    log = JsonlTrainLogger(path)
    checkpointer = Checkpointer(tmp_path / "save", {"train_log": log})
    _epoch(log, 1)
    checkpointer.save_and_keep_only()
    _epoch(log, 2)  # the run is killed after logging epoch 2, before its checkpoint

    resumed = JsonlTrainLogger(path)
    Checkpointer(tmp_path / "save", {"train_log": resumed}).recover_if_possible()
    assert len(read_jsonl_log(path)) == 2  # nothing changes until the next entry
    _epoch(resumed, 2)
    _epoch(resumed, 3)
    assert [(entry.step, entry.epoch) for entry in read_jsonl_log(path)] == [
        (1, 1),
        (2, 2),
        (3, 3),
    ]


def test_a_test_entry_after_loading_an_older_checkpoint_is_appended(tmp_path: Path) -> None:
    # evaluate() loads the best checkpoint, not the newest: the later epochs stay logged.
    path = tmp_path / "train_log.jsonl"
    log = JsonlTrainLogger(path)
    _epoch(log, 1)
    best = log.state_dict()
    _epoch(log, 2)
    _epoch(log, 3)
    log.load_state_dict(dict(best))
    log.log_stats({"Epoch loaded": 1}, test_stats={"loss": 0.5})
    assert [(entry.step, entry.epoch, entry.test) for entry in read_jsonl_log(path)] == [
        (1, 1, None),
        (2, 2, None),
        (3, 3, None),
        (4, None, {"loss": 0.5}),
    ]


def _evaluate(log: FileTrainLogger | JsonlTrainLogger, best: dict[str, int], loss: float) -> None:
    """What an ``evaluate`` does to the log: recover the best checkpoint, log a test entry."""
    log.load_state_dict(dict(best))
    log.log_stats({"Epoch loaded": 1}, test_stats={"loss": loss})


def _fit_then_two_evaluates(
    log: FileTrainLogger | JsonlTrainLogger, *, stop: bool
) -> tuple[dict[str, int], dict[str, int]]:
    """``fit`` (2 epochs, a checkpoint after each), then ``evaluate(valid); evaluate(test)``.

    Each evaluate recovers the checkpoint of epoch 1 (the best) first; with ``stop`` the
    script stops during the second, before it logs. Returns the best and newest checkpoints'
    states of the log.
    """
    _epoch(log, 1)
    best = log.state_dict()
    _epoch(log, 2)
    newest = log.state_dict()
    _evaluate(log, best, 2.0)
    if stop:
        log.load_state_dict(dict(best))  # the second evaluate's recovery, then it stops
    else:
        _evaluate(log, best, 3.0)
    return best, newest


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_script_restarted_during_its_evaluates_logs_each_test_entry_once(
    tmp_path: Path, factory: LoggerFactory
) -> None:
    _fit_then_two_evaluates(factory(tmp_path / "reference.log"), stop=False)
    path = tmp_path / "resumed.log"
    best, newest = _fit_then_two_evaluates(factory(path), stop=True)
    # Started again: fit recovers the newest checkpoint and has nothing left to train; the
    # evaluates run again, the first logging what the stopped script logged already.
    again = factory(path)
    again.load_state_dict(dict(newest))
    _evaluate(again, best, 2.0)
    _evaluate(again, best, 3.0)
    assert path.read_bytes() == (tmp_path / "reference.log").read_bytes()


def test_an_entry_logged_again_is_recognised_once_so_a_second_equal_one_is_written(
    tmp_path: Path,
) -> None:
    """A script whose two evaluates log equal entries, stopped after the first: both stay."""
    path = tmp_path / "train_log.jsonl"
    first = JsonlTrainLogger(path)
    _epoch(first, 1)
    best = first.state_dict()
    first.log_stats({"Epoch loaded": 1}, test_stats={"loss": 2.0})  # then it stops
    again = JsonlTrainLogger(path)
    for _ in range(2):
        _evaluate(again, best, 2.0)
    assert [(entry.step, entry.test) for entry in read_jsonl_log(path)] == [
        (1, None),
        (2, {"loss": 2.0}),
        (3, {"loss": 2.0}),
    ]


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_finished_run_restarted_with_more_epochs_logs_its_new_evaluation_too(
    tmp_path: Path, factory: LoggerFactory
) -> None:
    """After a resumed training entry, no entry is taken for one an earlier process wrote."""
    path = tmp_path / "train_log"
    first = factory(path)
    _epoch(first, 1)
    best = first.state_dict()
    _epoch(first, 2)
    newest = first.state_dict()
    _evaluate(first, best, 2.0)  # the run is over
    again = factory(path)  # the same script, with a higher epoch limit
    again.load_state_dict(dict(newest))
    _epoch(again, 3)
    _evaluate(again, best, 2.0)  # epoch 1 is still the best: the same evaluation
    reference = factory(tmp_path / "reference")
    for epoch in (1, 2):
        _epoch(reference, epoch)
    reference.log_stats({"Epoch loaded": 1}, test_stats={"loss": 2.0})
    _epoch(reference, 3)
    reference.log_stats({"Epoch loaded": 1}, test_stats={"loss": 2.0})
    assert path.read_bytes() == (tmp_path / "reference").read_bytes()


def test_one_script_logging_the_same_test_entry_twice_keeps_both(tmp_path: Path) -> None:
    """Only entries an earlier process wrote are recognised as logged again."""
    path = tmp_path / "train_log.jsonl"
    log = JsonlTrainLogger(path)
    _epoch(log, 1)
    best = log.state_dict()
    for _ in range(2):
        _evaluate(log, best, 2.0)
    assert [entry.step for entry in read_jsonl_log(path)] == [1, 2, 3]


def test_a_restart_logging_another_test_entry_appends_it_and_recognises_no_later_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "train_log.txt"
    first = FileTrainLogger(path)
    _epoch(first, 1)
    best = first.state_dict()
    first.log_stats({"Epoch loaded": 1}, test_stats={"loss": 2.0})
    first.log_stats({"Epoch loaded": 1}, test_stats={"loss": 3.0})
    again = FileTrainLogger(path)
    _evaluate(again, best, 9.0)  # not the entry there
    again.log_stats({"Epoch loaded": 1}, test_stats={"loss": 3.0})  # order broken: appended
    assert [line.split(" - ")[1] for line in path.read_text().splitlines()[1:]] == [
        "test loss: 2.00",
        "test loss: 3.00",
        "test loss: 9.00",
        "test loss: 3.00",
    ]


def test_a_log_shorter_than_the_checkpoint_says_is_warned_about(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    log = FileTrainLogger(path)
    _epoch(log, 1)
    _epoch(log, 2)
    state = log.state_dict()
    path.write_text("epoch: 1\n", encoding="utf-8")  # the log was replaced meanwhile
    resumed = FileTrainLogger(path)
    resumed.load_state_dict(dict(state))
    with pytest.warns(ResumeWarning, match="does not match the checkpoint"):
        _epoch(resumed, 3)
    assert path.read_text(encoding="utf-8").splitlines()[0] == "epoch: 1"
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2


def test_an_incomplete_last_line_is_removed_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = JsonlTrainLogger(path)
    _epoch(log, 1)
    with path.open("a", encoding="utf-8") as stream:
        stream.write('{"step": 2, "epo')  # a write cut short by a crash
    _epoch(JsonlTrainLogger(path), 2)
    assert [entry.epoch for entry in read_jsonl_log(path)] == [1, 2]


@pytest.mark.parametrize("factory", FACTORIES)
def test_two_loggers_on_one_file_number_its_entries_in_order(
    tmp_path: Path, factory: LoggerFactory
) -> None:
    path = tmp_path / "log"
    first, second = factory(path), factory(path)
    first.log_stats({"epoch": 1}, {"loss": 1.0})
    second.log_stats({"epoch": 1}, valid_stats={"loss": 2.0})
    first.log_stats({"epoch": 2}, {"loss": 1.0})
    assert first.state_dict() == {"position": path.stat().st_size, "entries": 3}
    if isinstance(first, JsonlTrainLogger):
        assert [entry.step for entry in read_jsonl_log(path)] == [1, 2, 3]


# ----------------------------------------------------------------------------- links

_PRECIOUS = b"precious data outside the experiment folder\nwithout a last newline"


def _planted_link(tmp_path: Path) -> tuple[Path, Path]:
    """An experiment folder whose ``train_log`` is a link to a file outside it: (link, file)."""
    outside = tmp_path / "outside" / "precious.txt"
    outside.parent.mkdir()
    outside.write_bytes(_PRECIOUS)
    folder = tmp_path / "handed-over"
    folder.mkdir()
    link = folder / "train_log"
    link.symlink_to(outside)
    return link, outside


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_log_that_is_a_link_is_refused_at_construction_naming_it(
    tmp_path: Path, factory: LoggerFactory
) -> None:
    link, outside = _planted_link(tmp_path)
    with pytest.raises(ConfigurationError, match=rf"training log {link} is a symbolic link"):
        factory(link)
    assert outside.read_bytes() == _PRECIOUS


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_fifo_as_the_log_is_refused_before_it_is_read(
    tmp_path: Path, factory: LoggerFactory
) -> None:
    """Counting a FIFO's lines would wait for a writer that never comes."""
    path = tmp_path / "train_log"
    os.mkfifo(path)
    with pytest.raises(ConfigurationError, match=rf"training log {path} is not a regular file"):
        factory(path)
    path.unlink()
    log = factory(path)
    os.mkfifo(path)  # planted after the logger was made
    with pytest.raises(ConfigurationError, match="is not a regular file"):
        log.log_stats({"epoch": 1}, train_stats={"loss": 1.0})
    with pytest.raises(ConfigurationError, match="is not a regular file"):
        log.state_dict()


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("training", [True, False])
def test_a_link_planted_after_construction_is_neither_cut_nor_appended_to(
    tmp_path: Path, factory: LoggerFactory, training: bool
) -> None:
    link, outside = _planted_link(tmp_path)
    link.unlink()
    log = factory(link)
    link.symlink_to(outside)
    # A training entry or a test one: the incomplete last line is removed before either.
    stats: dict[str, StatValue] = {"loss": 1.0}
    train, test = (stats, None) if training else (None, stats)
    with pytest.raises(ConfigurationError, match="is a symbolic link"):
        log.log_stats({"epoch": 1}, train_stats=train, test_stats=test)
    assert outside.read_bytes() == _PRECIOUS
    with pytest.raises(ConfigurationError, match="is a symbolic link"):
        log.state_dict()  # which would also remove the incomplete line, and count through it
    assert outside.read_bytes() == _PRECIOUS


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_resume_does_not_replace_the_target_of_a_link(
    tmp_path: Path, factory: LoggerFactory
) -> None:
    link, outside = _planted_link(tmp_path)
    outside.write_bytes(_PRECIOUS + b"\n")
    link.unlink()
    log = factory(link)
    link.symlink_to(outside)
    log.load_state_dict({"position": 0, "entries": 0})  # a hostile checkpoint's state
    with pytest.raises(ConfigurationError, match="is a symbolic link"):
        _epoch(log, 1)  # the cut back to 0 bytes would replace the file
    assert outside.read_bytes() == _PRECIOUS + b"\n"
    assert link.is_symlink()
    assert sorted(path.name for path in link.parent.iterdir()) == ["train_log"]


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_dangling_link_does_not_create_its_target(tmp_path: Path, factory: LoggerFactory) -> None:
    link, outside = _planted_link(tmp_path)
    link.unlink()
    log = factory(link)
    link.symlink_to(tmp_path / "outside" / "created.txt")
    with pytest.raises(ConfigurationError, match="is a symbolic link"):
        _epoch(log, 1)
    assert sorted(path.name for path in outside.parent.iterdir()) == ["precious.txt"]


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_log_in_a_linked_folder_is_written(tmp_path: Path, factory: LoggerFactory) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (tmp_path / "results").symlink_to(scratch, target_is_directory=True)
    path = tmp_path / "results" / "train_log"
    log = factory(path)
    _epoch(log, 1)
    state = log.state_dict()
    _epoch(log, 2)
    resumed = factory(path)
    resumed.load_state_dict(dict(state))
    _epoch(resumed, 2)  # the cut replaces the file in the linked folder
    assert (scratch / "train_log").read_bytes() == path.read_bytes()
    assert len(path.read_bytes().splitlines()) == 2


def test_a_bad_state_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="the training log"):
        JsonlTrainLogger(tmp_path / "log").load_state_dict({"position": -1, "entries": 0})


# ----------------------------------------------------------------------------- main process only


def test_other_ranks_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    factory = _FakeWriterFactory()
    loggers: list[FileTrainLogger | JsonlTrainLogger] = [
        FileTrainLogger(tmp_path / "log.txt"),
        JsonlTrainLogger(tmp_path / "log.jsonl"),
    ]
    for log in loggers:
        _epoch(log, 1)
        assert log.state_dict() == {"position": 0, "entries": 0}
        log.load_state_dict({"position": 5, "entries": 1})
        _epoch(log, 2)
    board = TensorboardTrainLogger(tmp_path / "tb", writer_factory=factory)
    board.log_stats({"epoch": 1}, {"loss": 1.0})
    assert list(tmp_path.iterdir()) == []
    assert factory.calls == []


# ----------------------------------------------------------------------------- TensorBoard


class _FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.flushes = 0
        self.closed = False

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        self.scalars.append((tag, scalar_value, global_step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


class _FakeWriterFactory:
    def __init__(self) -> None:
        self.calls: list[tuple[Path, int | None]] = []
        self.writers: list[_FakeWriter] = []

    def __call__(self, log_dir: Path, purge_step: int | None) -> ScalarWriter:
        self.calls.append((log_dir, purge_step))
        self.writers.append(_FakeWriter())
        return self.writers[-1]


def test_tensorboard_logger_writes_each_number_under_stage_and_name(tmp_path: Path) -> None:
    factory = _FakeWriterFactory()
    board = TensorboardTrainLogger(tmp_path / "tb", writer_factory=factory)
    board.log_stats({"epoch": 1, "lr": 0.5, "note": "x"}, {"loss": 2.0}, {"loss": 1.5, "err": 1})
    board.log_stats({"epoch": 2}, {"loss": 1.0})
    board.log_stats({"Epoch loaded": 2}, test_stats={"loss": 0.75})
    assert factory.calls == [(tmp_path / "tb", None)]
    assert factory.writers[0].scalars == [
        ("meta/lr", 0.5, 1),
        ("train/loss", 2.0, 1),
        ("valid/loss", 1.5, 1),
        ("valid/err", 1.0, 1),
        ("train/loss", 1.0, 2),
        ("meta/Epoch loaded", 2.0, 2),
        ("test/loss", 0.75, 2),
    ]
    assert factory.writers[0].flushes == 3


def test_tensorboard_writes_an_int_too_large_for_a_float_as_an_infinity(tmp_path: Path) -> None:
    factory = _FakeWriterFactory()
    board = TensorboardTrainLogger(tmp_path, writer_factory=factory)
    board.log_stats({"epoch": 1}, {"count": 10**400, "debt": -(10**400)})
    assert factory.writers[0].scalars == [
        ("train/count", math.inf, 1),
        ("train/debt", -math.inf, 1),
    ]


def test_tensorboard_resume_purges_the_steps_after_the_checkpoint(tmp_path: Path) -> None:
    first = TensorboardTrainLogger(tmp_path, writer_factory=_FakeWriterFactory())
    first.log_stats({"epoch": 1}, {"loss": 1.0})
    state = first.state_dict()
    assert state == {"step": 1}

    factory = _FakeWriterFactory()
    resumed = TensorboardTrainLogger(tmp_path, writer_factory=factory)
    resumed.load_state_dict(dict(state))
    resumed.log_stats({"epoch": 2}, {"loss": 0.5})
    assert factory.calls == [(tmp_path, 2)]


def test_tensorboard_test_entry_after_loading_purges_nothing(tmp_path: Path) -> None:
    factory = _FakeWriterFactory()
    board = TensorboardTrainLogger(tmp_path, writer_factory=factory)
    board.load_state_dict({"step": 1})
    board.log_stats({"Epoch loaded": 1}, test_stats={"loss": 0.5})
    assert factory.calls == [(tmp_path, None)]
    assert factory.writers[0].scalars[-1] == ("test/loss", 0.5, 1)


def test_tensorboard_rejects_a_bad_state(tmp_path: Path) -> None:
    board = TensorboardTrainLogger(tmp_path, writer_factory=_FakeWriterFactory())
    with pytest.raises(ConfigurationError, match="TensorBoard logger"):
        board.load_state_dict({"step": "3"})


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed"
)
def test_tensorboard_missing_is_warned_when_the_logger_is_made_and_raised_when_it_logs(
    tmp_path: Path,
) -> None:
    with pytest.warns(UserWarning, match=r"typedbrain\[tensorboard\].*logging an entry will"):
        board = TensorboardTrainLogger(tmp_path / "tb")
    with pytest.raises(ConfigurationError, match=r"typedbrain\[tensorboard\]"):
        board.log_stats({"epoch": 1}, {"loss": 1.0})
    assert not (tmp_path / "tb").exists()


def test_a_jsonl_line_is_valid_json_for_other_readers(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    JsonlTrainLogger(path).log_stats({"epoch": 1}, {"loss": 0.5})
    assert json.loads(path.read_text(encoding="utf-8"))["train"] == {"loss": 0.5}


def test_every_logger_satisfies_the_train_logger_protocol(tmp_path: Path) -> None:
    loggers: list[TrainLogger] = [  # checked by mypy; log_stats is called through the protocol
        FileTrainLogger(tmp_path / "log.txt"),
        JsonlTrainLogger(tmp_path / "log.jsonl"),
        TensorboardTrainLogger(tmp_path / "tb", writer_factory=_FakeWriterFactory()),
    ]
    for log in loggers:
        log.log_stats({"epoch": 1}, {"loss": 1.5})
    assert (tmp_path / "log.txt").read_text(encoding="utf-8") == "epoch: 1 - train loss: 1.50\n"


def test_a_failed_tensorboard_start_still_purges_at_the_next_attempt(tmp_path: Path) -> None:
    calls: list[int | None] = []

    def failing_then_working(log_dir: Path, purge_step: int | None) -> ScalarWriter:
        calls.append(purge_step)
        if len(calls) == 1:
            raise ConfigurationError("no tensorboard")
        return _FakeWriter()

    board = TensorboardTrainLogger(tmp_path, writer_factory=failing_then_working)
    board.load_state_dict({"step": 4})
    with pytest.raises(ConfigurationError):
        board.log_stats({"epoch": 5}, {"loss": 1.0})
    board.log_stats({"epoch": 5}, {"loss": 1.0})
    assert calls == [5, 5]


# ----------------------------------------------------------------------------- failed writes

_LIMITS = """\
import json, resource, signal
from typedbrain._train_log import FileTrainLogger, JsonlTrainLogger
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, with EFBIG
_HARD = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
def limit(size): resource.setrlimit(resource.RLIMIT_FSIZE, (size, _HARD))
def lift(): resource.setrlimit(resource.RLIMIT_FSIZE, (_HARD, _HARD))
def error(call):
    try:
        call()
    except OSError as error:
        return {"errno": error.errno, "filename": error.filename}
"""


def _with_file_size_limits(code: str) -> list[object]:
    """Run ``code`` in a new Python where ``limit(size)`` stops files from growing past ``size``.

    A write past the limit fails with ``EFBIG``, part of its data written, as one to a full
    disk fails with ``ENOSPC``; ``lift()`` removes the limit, ``error(call)`` returns the
    errno and filename of the OSError ``call()`` raises. Returns the JSON lines it prints.
    """
    completed = subprocess.run(
        [sys.executable, "-c", _LIMITS + textwrap.dedent(code)],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    return [json.loads(line) for line in completed.stdout.splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_failed_write_names_the_log_and_the_next_entry_removes_its_part(tmp_path: Path) -> None:
    jsonl, text = tmp_path / "train_log.jsonl", tmp_path / "train_log.txt"
    printed = _with_file_size_limits(
        f"""\
        for log in (JsonlTrainLogger({str(jsonl)!r}), FileTrainLogger({str(text)!r})):
            log.log_stats({{"epoch": 1}}, train_stats={{"loss": 1.0}})
            limit(log.save_file.stat().st_size + 100)
            # A short line stays in the buffer: its write fails at the flush on close.
            print(json.dumps(error(lambda: log.log_stats({{"epoch": 2, "note": "x" * 1000}}))))
            lift()
            log.log_stats({{"epoch": 3}}, train_stats={{"loss": 0.25}})
        """
    )
    assert printed == [
        {"errno": errno.EFBIG, "filename": str(jsonl)},
        {"errno": errno.EFBIG, "filename": str(text)},
    ]
    assert [(entry.step, entry.epoch) for entry in read_jsonl_log(jsonl)] == [(1, 1), (2, 3)]
    assert text.read_text(encoding="utf-8") == (
        "epoch: 1 - train loss: 1.00e+00\nepoch: 3 - train loss: 2.50e-01\n"
    )


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_resume_that_cannot_write_the_kept_entries_leaves_the_log_as_it_was(
    tmp_path: Path,
) -> None:
    path = tmp_path / "train_log.jsonl"
    first = JsonlTrainLogger(path)
    _epoch(first, 1)
    state = first.state_dict()
    _epoch(first, 2)
    first.log_stats({"Epoch loaded": 1}, test_stats={"note": "x" * 1000})  # kept at the cut
    before = path.read_bytes()
    printed = _with_file_size_limits(
        f"""\
        log = JsonlTrainLogger({str(path)!r})
        log.load_state_dict({state!r})
        limit({state["position"]} + 100)  # room for part of the test entry only
        print(json.dumps(error(lambda: log.log_stats({{"epoch": 2}}, {{"loss": 5.0}}))))
        print(json.dumps(sorted(path.name for path in log.save_file.parent.iterdir())))
        print(json.dumps(log.save_file.read_bytes() == {before!r}))  # the test entry is kept
        lift()
        log.log_stats({{"epoch": 2}}, {{"loss": 5.0}})  # the cut is tried again
        """
    )
    assert printed == [
        {"errno": errno.EFBIG, "filename": str(path)},
        ["train_log.jsonl"],  # no temporary file left
        True,
    ]
    reference = JsonlTrainLogger(tmp_path / "reference.jsonl")
    _epoch(reference, 1)
    reference.log_stats({"Epoch loaded": 1}, test_stats={"note": "x" * 1000})
    reference.log_stats({"epoch": 2}, {"loss": 5.0})
    assert path.read_bytes() == reference.save_file.read_bytes()


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_value_naming_a_path_that_is_not_utf8_is_written_with_escapes(
    tmp_path: Path, factory: LoggerFactory
) -> None:
    path = tmp_path / "log"
    undecodable = os.fsdecode(b"/data/bad\xff\xfename")  # as os.fsdecode gives such a name
    factory(path).log_stats({"epoch": 1, "data": undecodable})
    assert b"/data/bad\\udcff\\udcfename" in path.read_bytes()
    if factory is JsonlTrainLogger:
        # The escape is JSON's: the value reads back as it was logged.
        assert read_jsonl_log(path)[0].stats_meta["data"] == undecodable
