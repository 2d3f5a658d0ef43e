"""create_experiment_directory on a restart: an earlier hyperparams.yaml that differs is kept."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest

from typedbrain._errors import ResumeWarning
from typedbrain._experiment import create_experiment_directory

HPARAMS = textwrap.dedent(
    """\
    seed: 3
    lr: 0.1
    model: !new:torch.nn.Linear
        in_features: 4
        out_features: 1
    """
)


# create_experiment_directory adds handlers to the root logger: each test's are taken away.
pytestmark = pytest.mark.usefixtures("restore_root_logging")


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "hparams.yaml"
    path.write_text(HPARAMS, encoding="utf-8")
    return path


def _start(folder: Path, recipe: Path, overrides: dict[str, object] | str | None = None) -> None:
    create_experiment_directory(
        folder, recipe, overrides, save_env_desc=False, script_file=recipe.parent / "none.py"
    )


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_a_restart_with_a_changed_override_keeps_the_earlier_file_and_warns_naming_the_key(
    tmp_path: Path, recipe: Path
) -> None:
    folder = tmp_path / "run"
    _start(folder, recipe, {"lr": 0.01})
    first = (folder / "hyperparams.yaml").read_bytes()
    with pytest.warns(ResumeWarning) as caught:
        _start(folder, recipe, {"lr": 0.05})
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "kept as hyperparams.1.yaml; changed: lr." in message
    assert "keeps the checkpoint's optimizer, scheduler and other saved state" in message
    assert caught[0].filename == __file__  # points at the caller's line
    assert _names(folder) == ["hyperparams.1.yaml", "hyperparams.yaml", "log.txt"]
    assert (folder / "hyperparams.1.yaml").read_bytes() == first
    assert "\nlr: 0.05\n" in (folder / "hyperparams.yaml").read_text(encoding="utf-8")

    with pytest.warns(ResumeWarning, match=r"kept as hyperparams\.2\.yaml; changed: seed, lr\."):
        _start(folder, recipe, {"lr": 0.1, "seed": 4})
    assert (folder / "hyperparams.1.yaml").read_bytes() == first  # never overwritten
    assert "\nlr: 0.05\n" in (folder / "hyperparams.2.yaml").read_text(encoding="utf-8")


def test_nested_keys_and_added_or_removed_keys_are_named_by_their_path(
    tmp_path: Path, recipe: Path
) -> None:
    folder = tmp_path / "run"
    _start(folder, recipe)
    recipe.write_text(
        HPARAMS.replace("in_features: 4", "in_features: 8").replace("seed: 3\n", "")
        + "dropout: 0.1\n",
        encoding="utf-8",
    )
    with pytest.warns(ResumeWarning, match=r"changed: seed, model\.in_features, dropout\."):
        _start(folder, recipe)


def test_an_unchanged_restart_neither_warns_nor_copies(tmp_path: Path, recipe: Path) -> None:
    folder = tmp_path / "run"
    _start(folder, recipe, "lr: 0.05")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _start(folder, recipe, "lr: 0.05")
    assert _names(folder) == ["hyperparams.yaml", "log.txt"]


def test_a_header_that_differs_with_the_same_values_is_replaced_without_a_copy_or_warning(
    tmp_path: Path, recipe: Path
) -> None:
    folder = tmp_path / "run"
    _start(folder, recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _start(folder, recipe, {"lr": 0.1})  # the value the file has: only the header changes
    assert _names(folder) == ["hyperparams.yaml", "log.txt"]
    assert '#   {"lr": 0.1}' in (folder / "hyperparams.yaml").read_text(encoding="utf-8")


def test_a_run_from_the_saved_hyperparams_yaml_keeps_no_copy_and_writes_one_header(
    tmp_path: Path, recipe: Path
) -> None:
    # Reproducing a run from its folder's own file (train.py results/run/hyperparams.yaml).
    folder = tmp_path / "run"
    _start(folder, recipe, "lr: 0.05")
    saved = folder / "hyperparams.yaml"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            _start(folder, saved)
    assert _names(folder) == ["hyperparams.yaml", "log.txt"]
    text = saved.read_text(encoding="utf-8")
    assert text.startswith(
        f"# Resolved from {saved} by typedbrain.create_experiment_directory.\nseed: 3\n"
    )
    assert text.count("# Resolved from") == 1
    assert "Overrides applied" not in text
    assert "\nlr: 0.05\n" in text
    with pytest.warns(ResumeWarning, match=r"kept as hyperparams\.1\.yaml; changed: lr\."):
        _start(folder, saved, "lr: 0.5")  # a changed value from the saved file is still kept
    assert (folder / "hyperparams.1.yaml").read_text(encoding="utf-8") == text


def test_a_comment_written_by_the_user_at_the_top_is_kept(tmp_path: Path, recipe: Path) -> None:
    recipe.write_text("# Resolved from my notes\n" + HPARAMS, encoding="utf-8")
    folder = tmp_path / "run"
    _start(folder, recipe)
    text = (folder / "hyperparams.yaml").read_text(encoding="utf-8")
    assert "\n# Resolved from my notes\n" in text


def test_an_earlier_file_that_is_not_yaml_is_kept_and_the_warning_says_so(
    tmp_path: Path, recipe: Path
) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "hyperparams.yaml").write_text("[not: a mapping\n", encoding="utf-8")
    with pytest.warns(
        ResumeWarning, match=r"cannot be compared \(it is not a YAML mapping, or too large\)"
    ):
        _start(folder, recipe)
    assert (folder / "hyperparams.1.yaml").read_text(encoding="utf-8") == "[not: a mapping\n"


def test_the_copy_takes_the_next_number_and_never_writes_through_a_link(
    tmp_path: Path, recipe: Path
) -> None:
    sentinel = tmp_path / "precious.txt"
    sentinel.write_bytes(b"precious\n")
    folder = tmp_path / "run"
    _start(folder, recipe)
    (folder / "hyperparams.1.yaml").symlink_to(sentinel)
    (folder / "hyperparams.7.yaml").write_text("mine\n", encoding="utf-8")
    with pytest.warns(ResumeWarning, match=r"kept as hyperparams\.8\.yaml"):
        _start(folder, recipe, {"lr": 0.5})
    assert sentinel.read_bytes() == b"precious\n"
    assert (folder / "hyperparams.7.yaml").read_text(encoding="utf-8") == "mine\n"
    assert "\nlr: 0.1\n" in (folder / "hyperparams.8.yaml").read_text(encoding="utf-8")


def test_the_copy_keeps_the_earlier_files_permission_bits(tmp_path: Path, recipe: Path) -> None:
    folder = tmp_path / "run"
    _start(folder, recipe)
    (folder / "hyperparams.yaml").chmod(0o640)
    with pytest.warns(ResumeWarning):
        _start(folder, recipe, {"lr": 0.5})
    assert (folder / "hyperparams.1.yaml").stat().st_mode & 0o777 == 0o640


def test_a_failed_write_leaves_the_earlier_file_in_place_and_no_copy(
    tmp_path: Path, recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "run"
    _start(folder, recipe)
    first = (folder / "hyperparams.yaml").read_bytes()

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", str(folder / "hyperparams.yaml"))

    monkeypatch.setattr("typedbrain._hyperparams_file.replace_file", full_disk)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(OSError, match="No space left"):
            _start(folder, recipe, {"lr": 0.5})
    assert (folder / "hyperparams.yaml").read_bytes() == first
    assert _names(folder) == ["hyperparams.yaml", "log.txt"]


def test_other_ranks_neither_copy_nor_warn(
    tmp_path: Path, recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "run"
    _start(folder, recipe)
    first = (folder / "hyperparams.yaml").read_bytes()
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _start(folder, recipe, {"lr": 0.5})
    assert _names(folder) == ["hyperparams.yaml", "log.txt"]
    assert (folder / "hyperparams.yaml").read_bytes() == first


def test_aliases_of_empty_mappings_are_counted_against_the_comparison_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each level names the one below twice: 2**12 key paths from 13 lines. Every mapping
    # walked counts, the empty ones included, so the walk stops at the budget.
    from typedbrain import _hyperparams_file

    lines = ["l0: &l0 {}"] + [f"l{i}: &l{i} {{p: *l{i - 1}, q: *l{i - 1}}}" for i in range(1, 13)]
    bomb = "\n".join(lines) + "\n"
    grown = bomb.replace("l0: &l0 {}", "l0: &l0 {}\nextra: 1")
    assert _hyperparams_file._changed_keys(bomb, grown) == ["extra"]
    monkeypatch.setattr(_hyperparams_file, "_MAX_COMPARED_NODES", 2_000)
    assert _hyperparams_file._changed_keys(bomb, grown) is None
    assert _hyperparams_file._changed_keys("a: {b: 1}\n", "a: {b: 2}\n") == ["a.b"]


def test_a_mapping_replaced_by_a_value_is_named_once() -> None:
    from typedbrain._hyperparams_file import _changed_keys

    assert _changed_keys("a: {b: 1, c: 2}\nd: 1\n", "a: 3\nd: 1\n") == ["a"]
    assert _changed_keys("a: !tag {b: 1}\n", "a: !other {b: 1}\n") == ["a"]
    assert _changed_keys("a: [1, 2]\n", "a: [1, 3]\n") == ["a"]
    assert _changed_keys("a: 1 # one\n", "# header\na: 1\n") == []
