"""Checkpointer arguments: a wrong one is a ConfigurationError naming it, before any write."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from typedbrain._checkpoint import (
    Checkpoint,
    Checkpointer,
    average_checkpoints,
    verify_checkpoint,
)
from typedbrain._epochs import EpochCounter
from typedbrain._errors import ConfigurationError


def _checkpointer(tmp_path: Path) -> Checkpointer:
    return Checkpointer(tmp_path, {"counter": EpochCounter(3)})


def _names(checkpoints: list[Checkpoint]) -> list[str]:
    return [checkpoint.path.name for checkpoint in checkpoints]


# ---------------------------------------------------------------------------- end_of_epoch


@pytest.mark.parametrize("given", [True, False, np.bool_(True), np.bool_(False)])
def test_end_of_epoch_accepts_bools_and_numpy_bools_and_stores_a_bool(
    tmp_path: Path, given: object
) -> None:
    checkpointer = _checkpointer(tmp_path)
    saved = checkpointer.save_checkpoint(end_of_epoch=given)  # type: ignore[arg-type]  # np.bool_ is the case
    assert saved.end_of_epoch is bool(given)
    # The manifest is readable, so the checkpoint is listed (not skipped as corrupt).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpointer.list_checkpoints() == [saved]
    assert verify_checkpoint(saved.path).end_of_epoch is bool(given)


@pytest.mark.parametrize("method", ["save_checkpoint", "save_and_keep_only"])
@pytest.mark.parametrize("given", [1, 0, "yes", None])
def test_end_of_epoch_that_is_not_a_bool_is_refused_before_anything_is_written(
    tmp_path: Path, method: str, given: object
) -> None:
    checkpointer = _checkpointer(tmp_path)
    with pytest.raises(ConfigurationError, match=rf"end_of_epoch must be a bool, got {given!r}"):
        getattr(checkpointer, method)(end_of_epoch=given)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- keys


@pytest.mark.parametrize("argument", ["min_keys", "max_keys"])
def test_a_single_string_as_min_keys_or_max_keys_is_refused_before_anything_is_written(
    tmp_path: Path, argument: str
) -> None:
    checkpointer = _checkpointer(tmp_path)
    best = checkpointer.save_checkpoint(meta={"loss": 0.1}, name="best")
    with pytest.raises(
        ConfigurationError,
        match=rf"{argument} must be a list of meta keys \(strings\), got 'loss'; for one key "
        rf"write {argument}=\['loss'\]",
    ):
        checkpointer.save_and_keep_only(meta={"loss": 0.5}, **{argument: "loss"})  # type: ignore[arg-type]  # wrong on purpose
    with pytest.raises(ConfigurationError, match=rf"{argument} must be a list"):
        checkpointer.delete_checkpoints(**{argument: "loss"})  # type: ignore[arg-type]  # wrong on purpose
    # Nothing saved and, above all, nothing deleted.
    assert checkpointer.list_checkpoints() == [best]


def test_a_key_that_is_not_a_string_in_min_keys_is_refused(tmp_path: Path) -> None:
    checkpointer = _checkpointer(tmp_path)
    with pytest.raises(ConfigurationError, match=r"min_keys must be a list .*got 3 in it"):
        checkpointer.save_and_keep_only(min_keys=["loss", 3])  # type: ignore[list-item]  # wrong on purpose
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def _recency(checkpoint: Checkpoint) -> float:
    return float(checkpoint.sequence)


@pytest.mark.parametrize("given", ["loss", _recency, [_recency, "loss"]])
def test_importance_keys_that_is_not_a_list_of_functions_is_refused(
    tmp_path: Path, given: object
) -> None:
    checkpointer = _checkpointer(tmp_path)
    with pytest.raises(ConfigurationError, match="importance_keys must be a list of functions"):
        checkpointer.save_and_keep_only(importance_keys=given)  # type: ignore[arg-type]  # wrong on purpose
    with pytest.raises(ConfigurationError, match="importance_keys must be a list of functions"):
        checkpointer.delete_checkpoints(importance_keys=given)  # type: ignore[arg-type]  # wrong on purpose
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_keys_given_as_tuples_work(tmp_path: Path) -> None:
    checkpointer = _checkpointer(tmp_path)
    for name, loss in [("a", 0.2), ("b", 0.1), ("c", 0.3)]:
        checkpointer.save_and_keep_only(
            meta={"loss": loss}, name=name, min_keys=("loss",), importance_keys=(_recency,)
        )
    assert _names(checkpointer.list_checkpoints()) == ["b", "c"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"min_key": ["loss"]}, r"min_key must be a meta key \(a string\) or None, got \['loss'\]"),
        ({"max_key": 1}, r"max_key must be a meta key \(a string\) or None, got 1"),
        ({"importance_key": "loss"}, r"importance_key must be a function .* got 'loss'"),
        ({"max_num_checkpoints": -1}, r"max_num_checkpoints must be an integer >= 0 .* got -1"),
        ({"max_num_checkpoints": 1.5}, r"max_num_checkpoints must be an integer >= 0 .* got 1.5"),
        ({"max_num_checkpoints": True}, r"max_num_checkpoints must be an integer >= 0 .* got True"),
    ],
)
def test_find_checkpoints_refuses_a_wrong_argument_naming_it(
    tmp_path: Path, arguments: dict[str, object], message: str
) -> None:
    checkpointer = _checkpointer(tmp_path)
    checkpointer.save_checkpoint(meta={"loss": 0.1})
    with pytest.raises(ConfigurationError, match=message):
        checkpointer.find_checkpoints(**arguments)  # type: ignore[arg-type]  # wrong on purpose


def test_max_num_checkpoints_limits_and_zero_finds_nothing(tmp_path: Path) -> None:
    checkpointer = _checkpointer(tmp_path)
    for name in ("a", "b", "c"):
        checkpointer.save_checkpoint(name=name)
    assert _names(checkpointer.find_checkpoints(max_num_checkpoints=2)) == ["c", "b"]
    assert checkpointer.find_checkpoints(max_num_checkpoints=0) == []


def test_recover_refuses_a_min_key_that_is_not_a_string(tmp_path: Path) -> None:
    checkpointer = _checkpointer(tmp_path)
    checkpointer.save_checkpoint(meta={"loss": 0.1})
    with pytest.raises(ConfigurationError, match="min_key must be a meta key"):
        checkpointer.recover_if_possible(min_key=["loss"])  # type: ignore[arg-type]  # wrong on purpose


def test_an_importance_key_that_returns_no_number_is_an_error_naming_it_and_the_checkpoint(
    tmp_path: Path,
) -> None:
    checkpointer = _checkpointer(tmp_path)
    checkpointer.save_checkpoint(meta={"bleu": 30.0}, name="a")
    checkpointer.save_checkpoint(meta={}, name="b")

    def bleu(checkpoint: Checkpoint) -> float:
        return checkpoint.meta.get("bleu")  # type: ignore[return-value]  # None for "b": the case

    with pytest.raises(
        ConfigurationError,
        match=r"importance key '.*bleu' returned None for checkpoint .*/b, not a number",
    ):
        checkpointer.find_checkpoints(importance_key=bleu)


# ---------------------------------------------------------------------------- ckpt_predicate


@pytest.mark.parametrize("method", ["save_and_keep_only", "delete_checkpoints", "find_checkpoints"])
def test_a_ckpt_predicate_that_is_not_a_function_is_refused_before_anything_is_written(
    tmp_path: Path, method: str
) -> None:
    checkpointer = _checkpointer(tmp_path)
    first = checkpointer.save_checkpoint(name="first")
    with pytest.raises(
        ConfigurationError, match=r"ckpt_predicate must be a function .* got 'intra'"
    ):
        getattr(checkpointer, method)(ckpt_predicate="intra")
    assert checkpointer.list_checkpoints() == [first]
    with pytest.raises(ConfigurationError, match="ckpt_predicate must be a function"):
        checkpointer.recover_if_possible(ckpt_predicate=True)  # type: ignore[arg-type]  # wrong on purpose


def test_an_importance_key_failing_after_the_save_says_the_checkpoint_stays_and_none_was_deleted(
    tmp_path: Path,
) -> None:
    checkpointer = _checkpointer(tmp_path)
    first = checkpointer.save_checkpoint(name="first")

    def level(checkpoint: Checkpoint) -> float:
        return "high"  # type: ignore[return-value]  # not a number: the case

    with pytest.raises(
        ConfigurationError, match=r"importance key .*level' returned 'high'"
    ) as caught:
        checkpointer.save_and_keep_only(name="second", importance_keys=[level], num_to_keep=0)
    second = tmp_path / "second"
    assert caught.value.__notes__ == [f"(checkpoint {second} was saved; none was deleted)"]
    assert _names(checkpointer.list_checkpoints()) == ["first", "second"]
    assert checkpointer.list_checkpoints()[0] == first


# ---------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"checkpoints_dir": None}, r"checkpoints_dir must be a path .* got None"),
        ({"checkpoints_dir": 3}, r"checkpoints_dir must be a path .* got int 3"),
        ({"allow_partial_load": "no"}, r"allow_partial_load must be a bool, got 'no'"),
        (
            {"recoverables": [("counter", EpochCounter(3))]},
            r"recoverables must be a mapping of name -> object, got list",
        ),
        (
            {"recoverables": torch.nn.Linear(1, 1)},
            r"recoverables must be a mapping of name -> object, got Linear",
        ),
        (
            {"recoverables": {"model": torch.nn.Linear}},
            r"recoverable 'model' is the class Linear, not an object of it",
        ),
    ],
)
def test_a_wrong_constructor_argument_is_refused_naming_it(
    tmp_path: Path, arguments: dict[str, object], message: str
) -> None:
    given: dict[str, object] = {"checkpoints_dir": tmp_path, **arguments}
    with pytest.raises(ConfigurationError, match=message):
        Checkpointer(**given)  # type: ignore[arg-type]  # wrong on purpose


def test_optional_load_that_is_not_a_bool_is_refused(tmp_path: Path) -> None:
    checkpointer = _checkpointer(tmp_path)
    with pytest.raises(ConfigurationError, match="optional_load must be a bool, got 'no'"):
        checkpointer.add_recoverable("extra", EpochCounter(2), optional_load="no")  # type: ignore[arg-type]  # wrong on purpose
    assert list(checkpointer.recoverables) == ["counter"]


@pytest.mark.parametrize(
    ("name", "size"),
    [("x" * 251, 256), ("ü" * 126, 257)],
    ids=["ASCII", "two bytes a character"],
)
def test_a_recoverable_name_too_long_for_a_file_name_is_refused_at_registration(
    tmp_path: Path, name: str, size: int
) -> None:
    checkpointer = _checkpointer(tmp_path)
    with pytest.raises(
        ConfigurationError,
        match=rf"recoverable name '{name[:40]}'\.\.\. \({len(name)} characters\) is too long: its "
        rf"file name, <name>.ckpt, takes {size} bytes in UTF-8, more than the 255",
    ):
        checkpointer.add_recoverable(name, EpochCounter(2))
    assert list(checkpointer.recoverables) == ["counter"]


def test_a_recoverable_name_of_255_bytes_with_its_suffix_is_saved(tmp_path: Path) -> None:
    name = "x" * (255 - len(".ckpt"))
    checkpoint = Checkpointer(tmp_path, {name: EpochCounter(2)}).save_checkpoint()
    assert checkpoint.paramfiles[name].name == f"{name}.ckpt"


def test_a_checkpoint_name_too_long_for_a_folder_name_is_refused_before_writing(
    tmp_path: Path,
) -> None:
    checkpointer = _checkpointer(tmp_path)
    with pytest.raises(
        ConfigurationError, match=r"checkpoint name 'x{40}'\.\.\. \(256 characters\) is too long"
    ):
        checkpointer.save_checkpoint(name="x" * 256)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_module_dict_is_taken_as_recoverables(tmp_path: Path) -> None:
    modules = torch.nn.ModuleDict({"encoder": torch.nn.Linear(2, 2)})
    checkpointer = Checkpointer(tmp_path, modules)  # mypy accepts it: the case
    assert checkpointer.recoverables == {"encoder": modules["encoder"]}
    more = torch.nn.ModuleDict({"decoder": torch.nn.Linear(2, 2)})
    checkpointer.add_recoverables(more)
    assert checkpointer.recoverables == {
        "encoder": modules["encoder"],
        "decoder": more["decoder"],
    }


def test_a_checkpoints_dir_that_is_a_file_is_refused_at_construction_and_after(
    tmp_path: Path,
) -> None:
    file = tmp_path / "save"
    file.write_text("not a folder")
    with pytest.raises(
        ConfigurationError, match=rf"checkpoints_dir {file} exists and is not a folder"
    ):
        _checkpointer(file)
    # Replaced by a file after the checkpointer was made: refused, not taken for an empty folder.
    folder = tmp_path / "later"
    checkpointer = _checkpointer(folder)
    checkpointer.save_checkpoint()
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    for call in (
        checkpointer.list_checkpoints,
        checkpointer.recover_if_possible,
        checkpointer.save_checkpoint,
    ):
        with pytest.raises(ConfigurationError, match="exists and is not a folder"):
            call()


# ---------------------------------------------------------------------------- meta


def test_an_integer_too_long_for_json_in_meta_is_refused_naming_the_key_before_writing(
    tmp_path: Path,
) -> None:
    checkpointer = _checkpointer(tmp_path)
    with pytest.raises(
        ConfigurationError,
        match=r"checkpoint meta 'count': 'count'\['inner'\] is an integer of \d+ bits, too long",
    ):
        checkpointer.save_checkpoint(meta={"count": {"inner": 10**5000}})
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- paths


def test_an_empty_checkpoints_dir_is_refused_not_taken_for_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=r"checkpoints_dir is an empty path"):
        Checkpointer("", {"counter": EpochCounter(3)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("depth", ["save", "runs/save"])
def test_a_checkpoints_dir_under_a_file_is_refused_at_construction_naming_the_file(
    tmp_path: Path, depth: str
) -> None:
    file = tmp_path / "afile"
    file.write_text("not a folder")
    folder = file / depth
    with pytest.raises(
        ConfigurationError,
        match=rf"checkpoints_dir {folder} lies under {file}, which is not a folder",
    ):
        _checkpointer(folder)
    assert file.read_text() == "not a folder"


def test_a_checkpoints_dir_whose_parent_becomes_a_file_is_refused_at_the_next_save(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run" / "save"
    checkpointer = _checkpointer(folder)
    checkpointer.save_checkpoint()
    shutil.rmtree(tmp_path / "run")
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ConfigurationError, match=r"lies under .*run, which is not a folder"):
        checkpointer.save_checkpoint()


# ---------------------------------------------------------------- a path for a Checkpoint


@pytest.mark.parametrize(("kind", "name"), [(str, "str"), (Path, "PosixPath|WindowsPath")])
def test_load_checkpoint_given_a_path_says_to_pass_a_checkpoint(
    tmp_path: Path, kind: Callable[[Path], object], name: str
) -> None:
    checkpointer = _checkpointer(tmp_path)
    saved = checkpointer.save_checkpoint()
    with pytest.raises(
        ConfigurationError,
        match=rf"checkpoint must be a Checkpoint, such as find_checkpoint\(\)'s result .*got "
        rf"({name}) ",
    ):
        checkpointer.load_checkpoint(kind(saved.path))  # type: ignore[arg-type]  # wrong on purpose


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("save/CKPT", r"checkpoints must be a list of Checkpoint, .*got str 'save/CKPT'"),
        (None, r"checkpoints must be a list of Checkpoint, .*got NoneType None"),
        (["save/CKPT"], r"each of checkpoints must be a Checkpoint, .*got str 'save/CKPT'"),
    ],
)
def test_average_checkpoints_given_paths_says_to_pass_checkpoints(
    given: object, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        average_checkpoints(given, "model")  # type: ignore[arg-type]  # wrong on purpose


def test_average_checkpoints_given_one_checkpoint_not_a_list_says_so(tmp_path: Path) -> None:
    saved = _checkpointer(tmp_path).save_checkpoint()
    with pytest.raises(ConfigurationError, match=r"checkpoints must be a list of Checkpoint"):
        average_checkpoints(saved, "counter")  # type: ignore[arg-type]  # wrong on purpose
