"""create_experiment_directory: the folder's files, its log, idempotence, rank 0 only."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import python_blocks
from typedbrain._checkpoint import Checkpointer
from typedbrain._config import load_hparams
from typedbrain._errors import ConfigurationError, OverrideError
from typedbrain._experiment import _ExperimentLogHandler, create_experiment_directory, git_commit
from typedbrain._version import __version__

HPARAMS = textwrap.dedent(
    """\
    seed: 3
    lr: 0.1
    folder: !ref results/<seed>
    model: !new:torch.nn.Linear
        in_features: 4
        out_features: 1
    """
)


# create_experiment_directory adds handlers to the root logger: each test's are taken away.
pytestmark = pytest.mark.usefixtures("restore_root_logging")


def _experiment_handlers() -> list[logging.FileHandler]:
    return [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, _ExperimentLogHandler)
    ]


def _close_handlers() -> None:
    """Close the root logger's handlers (for tests that gave it a list of their own)."""
    for handler in logging.getLogger().handlers:
        handler.close()


def _flush() -> None:
    for handler in _experiment_handlers():
        handler.flush()


@pytest.fixture
def hparams_file(tmp_path: Path) -> Path:
    path = tmp_path / "hparams.yaml"
    path.write_text(HPARAMS, encoding="utf-8")
    return path


def test_the_folder_holds_hyperparams_script_log_and_environment(
    tmp_path: Path, hparams_file: Path
) -> None:
    folder = create_experiment_directory(
        tmp_path / "results" / "run",
        hyperparams_to_save=hparams_file,
        overrides={"seed": 7},
        run_opts={"device": "cpu", "precision": "bf16", "odd": object},
    )
    assert folder == tmp_path / "results" / "run"
    assert sorted(path.name for path in folder.iterdir()) == [
        "env.json",
        "hyperparams.yaml",
        "log.txt",
        "test_experiment.py",
    ]
    assert (folder / "test_experiment.py").read_bytes() == Path(__file__).read_bytes()

    assert (folder / "hyperparams.yaml").read_text(encoding="utf-8") == (
        f"# Resolved from {hparams_file} by typedbrain.create_experiment_directory.\n"
        "# Overrides applied:\n"
        '#   {"seed": 7}\n'
        "seed: 7\n"
        "lr: 0.1\n"
        "folder: results/7\n"
        "model: !new:torch.nn.Linear\n"
        "  in_features: 4\n"
        "  out_features: 1\n"
    )

    environment = json.loads((folder / "env.json").read_text(encoding="utf-8"))
    assert environment["typedbrain"] == __version__
    assert environment["torch"] == str(torch.__version__)
    assert environment["python"] == platform.python_version()
    assert environment["run_opts"] == {
        "device": "cpu",
        "precision": "bf16",
        "odd": str(object),
    }
    assert environment["script"] == __file__
    assert {"platform", "argv", "numpy", "cuda", "time", "git_commit"} <= set(environment)


def test_log_txt_receives_typedbrain_records(tmp_path: Path) -> None:
    folder = create_experiment_directory(tmp_path / "run", save_env_desc=False)
    logging.getLogger("typedbrain._brain").info("an info record from the library")
    logging.getLogger("typedbrain._brain").debug("a debug record is not kept")
    _flush()
    lines = (folder / "log.txt").read_text(encoding="utf-8").splitlines()
    assert lines[-1].endswith(" - typedbrain._brain - INFO - an info record from the library")
    assert not any("debug record" in line for line in lines)


def test_warnings_still_reach_the_console_when_logging_was_not_set_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As in a script that configured no logging: Python's last-resort handler printed warnings
    # until the log file's handler made the root logger non-empty.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    for _ in range(2):
        create_experiment_directory(tmp_path / "run", save_env_desc=False)
    logging.getLogger("typedbrain._signals").warning("received SIGTERM")
    logging.getLogger("typedbrain._brain").info("an info record stays in log.txt")
    _close_handlers()
    assert capsys.readouterr().err == "received SIGTERM\n"


def test_no_console_handler_is_added_to_logging_set_up_already(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    own = logging.NullHandler()
    monkeypatch.setattr(logging.getLogger(), "handlers", [own])
    create_experiment_directory(tmp_path / "run", save_env_desc=False)
    logging.getLogger("typedbrain._signals").warning("received SIGTERM")
    assert capsys.readouterr().err == ""
    assert [type(h) for h in logging.getLogger().handlers] == [
        logging.NullHandler,
        _ExperimentLogHandler,
    ]
    _close_handlers()


def test_calling_again_appends_to_the_log_without_a_second_handler(
    tmp_path: Path, hparams_file: Path
) -> None:
    for _ in range(2):
        create_experiment_directory(tmp_path / "run", hyperparams_to_save=hparams_file)
    assert len(_experiment_handlers()) == 1
    _flush()
    log = (tmp_path / "run" / "log.txt").read_text(encoding="utf-8")
    assert log.count(f"experiment {tmp_path / 'run'}: typedbrain {__version__}") == 2


def test_a_new_experiment_folder_replaces_the_previous_handler(tmp_path: Path) -> None:
    create_experiment_directory(tmp_path / "first", save_env_desc=False)
    create_experiment_directory(tmp_path / "second", save_env_desc=False)
    assert [Path(handler.baseFilename) for handler in _experiment_handlers()] == [
        (tmp_path / "second" / "log.txt").resolve()
    ]


def test_other_ranks_write_nothing(
    tmp_path: Path, hparams_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    folder = create_experiment_directory(tmp_path / "run", hyperparams_to_save=hparams_file)
    assert folder == tmp_path / "run"
    assert not folder.exists()
    assert _experiment_handlers() == []


def test_log_config_replaces_the_default_handler(tmp_path: Path) -> None:
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"own": {"class": "logging.NullHandler"}},
        "loggers": {"typedbrain.test_experiment": {"handlers": ["own"]}},
    }
    folder = create_experiment_directory(tmp_path / "run", log_config=config)
    assert not (folder / "log.txt").exists()
    assert isinstance(logging.getLogger("typedbrain.test_experiment").handlers[0], logging.Handler)
    logging.getLogger("typedbrain.test_experiment").handlers.clear()


def test_bad_hyperparameters_are_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: !ref <missing>\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"^'a' \(.*bad\.yaml:1\): !ref <missing>: no top"):
        create_experiment_directory(tmp_path / "run", hyperparams_to_save=path)
    # A reference through one hyperpyyaml has not resolved yet (it goes in the file's order).
    path.write_text("a: !ref <alias[x]>\nbase: {x: 1}\nalias: !ref <base>\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"cannot resolve the hyperparameters .*bad\.yaml"):
        create_experiment_directory(tmp_path / "run", hyperparams_to_save=path)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigurationError, match="cannot read the hyperparameters"):
        create_experiment_directory(tmp_path / "run", hyperparams_to_save=tmp_path / "absent")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lrr": 1}, "'lrr'"),
        ("model:\n  hiden: 8\n", "'model.hiden'"),
    ],
)
def test_an_override_of_a_key_the_file_lacks_is_refused_as_load_hparams_refuses_it(
    hparams_file: Path, overrides: str | dict[str, object], message: str
) -> None:
    run = hparams_file.parent / "run"
    with pytest.raises(OverrideError, match=message) as caught:
        create_experiment_directory(run, hyperparams_to_save=hparams_file, overrides=overrides)
    with pytest.raises(OverrideError) as from_load:
        load_hparams(hparams_file, overrides)
    assert str(caught.value) == str(from_load.value)
    assert not run.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"run_opts": ["--debug"]}, r"run_opts must be a mapping .*got list \['--debug'\]"),
        ({"run_opts": "cpu"}, r"run_opts must be a mapping .*got str 'cpu'"),
        ({"log_config": {"version": 2}}, r"log_config: 'version' must be 1 .*got 2"),
        ({"log_config": {"handlers": {}}}, r"log_config: 'version' must be 1 .*got None"),
        ({"log_config": "logging.ini"}, r"log_config must be a logging.config.dictConfig"),
        ({"save_env_desc": "no"}, r"save_env_desc must be a bool, got 'no'"),
        ({"overrides": ["lr=0.2"]}, r"overrides must be a mapping or a YAML string"),
        ({"script_file": 5}, r"script_file must be a path .*got int 5"),
        ({"hyperparams_to_save": ""}, r"hyperparams_to_save is an empty path"),
    ],
)
def test_a_wrong_argument_is_refused_naming_it_before_anything_is_written(
    hparams_file: Path, arguments: dict[str, Any], message: str
) -> None:
    run = hparams_file.parent / "run"
    given: dict[str, Any] = {"hyperparams_to_save": hparams_file, **arguments}
    with pytest.raises(ConfigurationError, match=message):
        create_experiment_directory(run, **given)
    assert not run.exists()
    assert _experiment_handlers() == []


@pytest.mark.parametrize("given", [None, 5, ""])
def test_an_experiment_directory_that_is_no_path_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: object
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigurationError, match=r"experiment_directory (must be a path|is an emp)"
    ):
        create_experiment_directory(given)  # type: ignore[arg-type]  # wrong on purpose
    assert list(tmp_path.iterdir()) == []
    assert _experiment_handlers() == []


@pytest.mark.parametrize("rank", ["0", "1"], ids=["main process", "another process"])
@pytest.mark.parametrize("under", ["", "run"], ids=["the file", "under the file"])
def test_an_experiment_directory_that_is_or_lies_under_a_file_is_refused_naming_it(
    hparams_file: Path, under: str, rank: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", rank)  # every process checks: a path is the same for all
    file = hparams_file.parent / "exp"
    file.write_text("not a folder", encoding="utf-8")
    folder = file / under if under else file
    message = (
        rf"experiment_directory {folder} lies under {file}, which is not a folder"
        if under
        else rf"experiment_directory {file} exists and is not a folder"
    )
    with pytest.raises(ConfigurationError, match=message):
        create_experiment_directory(folder, hyperparams_to_save=hparams_file)
    assert file.read_text(encoding="utf-8") == "not a folder"
    assert _experiment_handlers() == []


def test_a_log_config_that_logging_refuses_leaves_no_folder(tmp_path: Path) -> None:
    config = {"version": 1, "handlers": {"own": {"class": "no.such.Handler"}}}
    run = tmp_path / "results" / "run"
    with pytest.raises(ConfigurationError, match=r"log_config: logging cannot use it: .*own"):
        create_experiment_directory(run, log_config=config)
    assert list(tmp_path.iterdir()) == []


def test_an_include_is_read_next_to_the_recipe_not_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe_folder = tmp_path / "recipe"
    recipe_folder.mkdir()
    (recipe_folder / "model.yaml").write_text("size: 4\n", encoding="utf-8")
    (recipe_folder / "train.yaml").write_text(
        "lr: 0.1\nmodel: !include:model.yaml\n", encoding="utf-8"
    )
    (tmp_path / "model.yaml").write_text("size: 999\n", encoding="utf-8")  # a decoy
    monkeypatch.chdir(tmp_path)
    folder = create_experiment_directory(
        tmp_path / "run", hyperparams_to_save="recipe/train.yaml", save_env_desc=False
    )
    saved = (folder / "hyperparams.yaml").read_text(encoding="utf-8")
    assert load_hparams(folder / "hyperparams.yaml") == load_hparams("recipe/train.yaml")
    assert "size: 4" in saved
    assert "999" not in saved


def test_a_tagged_override_is_saved_as_load_hparams_applies_it(hparams_file: Path) -> None:
    overrides = "model: !new:torch.nn.Identity {}\n"
    folder = create_experiment_directory(
        hparams_file.parent / "run",
        hyperparams_to_save=hparams_file,
        overrides=overrides,
        save_env_desc=False,
    )
    saved = load_hparams(folder / "hyperparams.yaml")
    assert type(saved["model"]) is torch.nn.Identity
    assert type(load_hparams(hparams_file, overrides)["model"]) is torch.nn.Identity


def test_the_git_commit_of_the_scripts_repository_is_recorded(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repository = tmp_path / "repo"
    repository.mkdir()
    script = repository / "train.py"
    script.write_text("print('training')\n", encoding="utf-8")

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            cwd=repository,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()

    git("init", "-q")
    git("add", "train.py")
    git("commit", "-q", "-m", "first")
    folder = create_experiment_directory(tmp_path / "run", script_file=script)
    environment = json.loads((folder / "env.json").read_text(encoding="utf-8"))
    assert environment["git_commit"] == git("rev-parse", "HEAD")
    assert len(environment["git_commit"]) == 40
    assert (folder / "train.py").read_text(encoding="utf-8") == "print('training')\n"


def test_no_git_commit_outside_a_repository(tmp_path: Path) -> None:
    if shutil.which("git") is not None:
        inside = subprocess.run(
            ["git", "-C", str(tmp_path), "rev-parse", "--is-inside-work-tree"],
            capture_output=True,
            check=False,
            timeout=60,
        )
        if inside.returncode == 0:
            pytest.skip("the temporary folder is inside a git repository")
    assert git_commit(tmp_path) is None


def test_env_json_is_standard_json_with_non_finite_run_options_as_strings(
    tmp_path: Path,
) -> None:
    run_opts = {"max_grad_norm": math.inf, "low": -math.inf, "odd": math.nan, "keys": ("a",)}
    folder = create_experiment_directory(tmp_path / "run", run_opts=run_opts)

    def refuse(constant: str) -> float:
        raise AssertionError(f"not standard JSON: {constant}")

    environment = json.loads(
        (folder / "env.json").read_text(encoding="utf-8"), parse_constant=refuse
    )
    assert environment["run_opts"] == {
        "max_grad_norm": "Infinity",
        "low": "-Infinity",
        "odd": "NaN",
        "keys": ["a"],
    }


@pytest.mark.slow
def test_no_script_is_copied_from_python_dash_c(tmp_path: Path) -> None:
    code = (
        "from typedbrain._experiment import create_experiment_directory\n"
        f"create_experiment_directory({str(tmp_path / 'run')!r}, save_env_desc=False)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["log.txt"]


def test_the_logging_guide_examples_run_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = python_blocks("docs/logging-and-experiments.md")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hparams").mkdir()
    (tmp_path / "hparams" / "train.yaml").write_text(HPARAMS, encoding="utf-8")
    namespace: dict[str, object] = {}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"logging-and-experiments.md, example {number}", "exec"), namespace)
    _flush()
    folder = tmp_path / "results" / "digits" / "1986"
    assert "lr: 0.01" in (folder / "hyperparams.yaml").read_text(encoding="utf-8")
    assert json.loads((folder / "env.json").read_text())["run_opts"]["precision"] == "bf16"
    assert (folder / "log.txt").is_file()
    assert (tmp_path / "results" / "run").is_dir()
    # The last example's checkpointer saves and restores the training log with the model.
    checkpointer = namespace["checkpointer"]
    assert isinstance(checkpointer, Checkpointer)
    saved = checkpointer.save_checkpoint()
    assert set(saved.files) == {"model", "counter", "train_log"}
    assert checkpointer.recover_if_possible() == saved


# ----------------------------------------------------------------------------- failed writes


def _under_file_size_limit(code: str, limit: int) -> dict[str, object]:
    """Run ``code`` in a new Python whose files cannot grow past ``limit`` bytes.

    A write past the limit fails with ``EFBIG``, as a write to a full disk fails with
    ``ENOSPC``, part of the data written. ``code`` sees ``create_experiment_directory`` and
    ``os``; the OSError it raises, if any, is returned as its errno and filename.
    """
    script = textwrap.dedent(
        f"""\
        import json, os, resource, signal
        from typedbrain._experiment import create_experiment_directory
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process
        resource.setrlimit(
            resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
        )
        try:
            {code}
        except OSError as error:
            print(json.dumps({{"errno": error.errno, "filename": error.filename}}))
        else:
            print("{{}}")
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], check=True, timeout=120, capture_output=True, text=True
    )
    outcome: dict[str, object] = json.loads(completed.stdout.splitlines()[-1])
    return outcome


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_file_that_cannot_be_rewritten_keeps_its_content_and_the_error_names_it(
    tmp_path: Path, hparams_file: Path
) -> None:
    folder = create_experiment_directory(tmp_path / "run", hyperparams_to_save=hparams_file)
    names = sorted(path.name for path in folder.iterdir())
    before = (folder / "hyperparams.yaml").read_bytes()
    larger = tmp_path / "larger.yaml"
    larger.write_text(HPARAMS + "note: " + "x" * 20_000 + "\n", encoding="utf-8")
    # A restart on a disk with room for 8 KiB per file: the new hyperparams.yaml does not fit.
    outcome = _under_file_size_limit(
        f"create_experiment_directory({str(folder)!r}, hyperparams_to_save={str(larger)!r})",
        limit=8192,
    )
    assert outcome == {"errno": errno.EFBIG, "filename": str(folder / "hyperparams.yaml")}
    assert (folder / "hyperparams.yaml").read_bytes() == before  # not cut to 8 KiB
    assert sorted(path.name for path in folder.iterdir()) == names  # no temporary file left


def test_a_rewritten_file_keeps_its_permissions_and_the_script_copy_those_of_the_script(
    tmp_path: Path, hparams_file: Path
) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('train')\n", encoding="utf-8")
    script.chmod(0o750)
    folder = create_experiment_directory(
        tmp_path / "run", hyperparams_to_save=hparams_file, script_file=script
    )
    (folder / "hyperparams.yaml").chmod(0o600)
    create_experiment_directory(folder, hyperparams_to_save=hparams_file, script_file=script)
    assert (folder / "hyperparams.yaml").stat().st_mode & 0o777 == 0o600
    assert (folder / "train.py").stat().st_mode & 0o777 == 0o750
    assert (folder / "train.py").stat().st_mtime == script.stat().st_mtime  # as copy2 copies


# ----------------------------------------------------------------------------- undecodable paths

# A file name that is not valid UTF-8, as os.fsdecode gives it (with surrogate escapes).
_UNDECODABLE = os.fsdecode(b"bad\xff\xfename")


def test_a_record_naming_a_path_that_is_not_utf8_is_written_with_escapes(tmp_path: Path) -> None:
    folder = create_experiment_directory(tmp_path / "run", save_env_desc=False)
    logging.getLogger("typedbrain._brain").info("loading %s", tmp_path / _UNDECODABLE)
    _flush()
    last = (folder / "log.txt").read_bytes().splitlines()[-1]
    assert last.endswith(b" - INFO - loading " + bytes(tmp_path) + b"/bad\\udcff\\udcfename")


def test_hyperparameters_in_a_folder_that_is_not_utf8_are_saved(
    tmp_path: Path, hparams_file: Path
) -> None:
    try:
        source_folder = tmp_path / _UNDECODABLE
        source_folder.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    source = source_folder / "hparams.yaml"
    shutil.copy(hparams_file, source)
    folder = create_experiment_directory(tmp_path / "run", hyperparams_to_save=source)
    first = (folder / "hyperparams.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert first == (
        f"# Resolved from {tmp_path}/bad\\udcff\\udcfename/hparams.yaml by "
        "typedbrain.create_experiment_directory."
    )


def test_a_script_that_cannot_be_read_is_named_as_itself_not_as_its_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('training')\n", encoding="utf-8")
    real_open = Path.open

    def opening(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == script:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", opening)
    with pytest.raises(PermissionError) as caught:
        create_experiment_directory(tmp_path / "run", script_file=script, save_env_desc=False)
    assert caught.value.filename == str(script)
    assert not (tmp_path / "run" / "train.py").exists()


# ----------------------------------------------------------------------------- planted links

_SENTINEL = b"precious data outside the experiment folder\n"


def _sentinel(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    sentinel = outside / "precious.txt"
    sentinel.write_bytes(_SENTINEL)
    return sentinel


def _script_and_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A recipe script, and an experiment folder that exists (empty) for things to be planted in."""
    script = tmp_path / "train.py"
    script.write_text("print('train')\n", encoding="utf-8")
    folder = tmp_path / "run"
    folder.mkdir()
    return script, folder


@pytest.mark.parametrize("name", ["log.txt", "hyperparams.yaml", "env.json", "train.py"])
def test_a_link_at_a_file_it_writes_is_refused_naming_it_and_its_target_is_untouched(
    tmp_path: Path, hparams_file: Path, name: str
) -> None:
    sentinel = _sentinel(tmp_path)
    script, folder = _script_and_folder(tmp_path)
    (folder / name).symlink_to(sentinel)
    with pytest.raises(ConfigurationError) as caught:
        create_experiment_directory(folder, hyperparams_to_save=hparams_file, script_file=script)
    assert str(folder / name) in str(caught.value)
    assert f"a symbolic link (to {sentinel})" in str(caught.value)
    logging.getLogger("typedbrain._brain").warning("a record after the refusal")
    assert sentinel.read_bytes() == _SENTINEL
    assert [path.name for path in folder.iterdir()] == [name]  # nothing written
    assert _experiment_handlers() == []


def test_a_dangling_link_at_log_txt_is_refused_and_its_target_not_created(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "log.txt").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(ConfigurationError, match=r"log\.txt is a symbolic link"):
        create_experiment_directory(folder, save_env_desc=False)
    assert not (tmp_path / "elsewhere.txt").exists()


def test_a_link_made_after_the_check_is_still_not_written_through(
    tmp_path: Path, hparams_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The links appear between the check and the writes (a race): the writes themselves do not
    # follow them. log.txt's open and the read of the earlier hyperparams.yaml refuse theirs;
    # env.json and the script's copy replace theirs.
    sentinel = _sentinel(tmp_path)
    script, folder = _script_and_folder(tmp_path)
    for name in ("log.txt", "hyperparams.yaml", "env.json", "train.py"):
        (folder / name).symlink_to(sentinel)
    monkeypatch.setattr("typedbrain._experiment._check_own_files", lambda folder, names: None)
    with pytest.raises(ConfigurationError, match=r"log\.txt is a symbolic link"):
        create_experiment_directory(folder, script_file=script)
    (folder / "log.txt").unlink()
    (folder / "log.txt").symlink_to(tmp_path / "elsewhere.txt")  # dangling: O_CREAT would make it
    with pytest.raises(ConfigurationError, match=r"log\.txt is a symbolic link"):
        create_experiment_directory(folder, script_file=script)
    assert not (tmp_path / "elsewhere.txt").exists()
    no_log = {"version": 1, "disable_existing_loggers": False}
    with pytest.raises(ConfigurationError, match=r"hyperparams\.yaml is a symbolic link"):
        create_experiment_directory(folder, hparams_file, script_file=script, log_config=no_log)
    create_experiment_directory(folder, script_file=script, log_config=no_log)
    assert sentinel.read_bytes() == _SENTINEL
    assert not (folder / "env.json").is_symlink()
    assert json.loads((folder / "env.json").read_text(encoding="utf-8"))["script"] == str(script)
    assert not (folder / "train.py").is_symlink()
    assert (folder / "train.py").read_bytes() == script.read_bytes()


def test_a_link_at_the_scripts_name_to_the_script_itself_is_left_alone(tmp_path: Path) -> None:
    script, folder = _script_and_folder(tmp_path)
    (folder / "train.py").symlink_to(script)  # nothing is copied over it: no write through it
    create_experiment_directory(folder, script_file=script, save_env_desc=False)
    assert (folder / "train.py").is_symlink()
    assert script.read_text(encoding="utf-8") == "print('train')\n"


def test_replace_file_replaces_a_link_itself_and_leaves_its_target(tmp_path: Path) -> None:
    from typedbrain._files import replace_file

    target = tmp_path / "target.txt"
    target.write_bytes(b"old\n")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    replace_file(link, lambda stream: stream.write(b"replaced\n"))
    assert not link.is_symlink()
    assert link.read_bytes() == b"replaced\n"
    assert target.read_bytes() == b"old\n"


@pytest.mark.parametrize("name", ["log.txt", "hyperparams.yaml", "env.json", "train.py"])
@pytest.mark.parametrize("kind", ["a FIFO", "a folder"])
def test_a_fifo_or_folder_at_a_file_it_writes_is_refused_before_anything_is_written(
    tmp_path: Path, hparams_file: Path, name: str, kind: str
) -> None:
    script, folder = _script_and_folder(tmp_path)
    if kind == "a FIFO":
        os.mkfifo(folder / name)
    else:
        (folder / name).mkdir()
    handlers = list(logging.getLogger().handlers)
    with pytest.raises(ConfigurationError) as caught:
        create_experiment_directory(folder, hyperparams_to_save=hparams_file, script_file=script)
    assert f"{folder / name} is {kind}, not a regular file" in str(caught.value)
    assert [path.name for path in folder.iterdir()] == [name]  # nothing written
    assert logging.getLogger().handlers == handlers  # nor a handler attached


def test_a_fifo_made_at_log_txt_after_the_check_is_refused_and_logging_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The FIFO appears between the check and the open (a race): the open refuses it, naming it,
    # although opening a FIFO nobody reads for writing fails with ENXIO before any check.
    from typedbrain._files import NotAFileError

    folder = tmp_path / "run"
    folder.mkdir()
    os.mkfifo(folder / "log.txt")
    monkeypatch.setattr("typedbrain._experiment._check_own_files", lambda folder, names: None)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    with pytest.raises(NotAFileError, match=r"a FIFO, not a regular file") as caught:
        create_experiment_directory(folder, save_env_desc=False)
    assert caught.value.filename == str(folder / "log.txt")
    assert logging.getLogger().handlers == []  # no console handler left behind


def test_open_file_names_a_fifo_opened_for_writing_that_nobody_reads(tmp_path: Path) -> None:
    from typedbrain._files import NotAFileError, open_file

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for follow_links in (False, True):
        with pytest.raises(NotAFileError, match=r"a FIFO, not a regular file") as caught:
            open_file(fifo, os.O_WRONLY, follow_links=follow_links)
        assert caught.value.filename == str(fifo)
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError):
        open_file(missing, os.O_WRONLY, follow_links=False)
