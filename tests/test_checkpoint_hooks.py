"""Custom checkpoint hooks: per object, per class (decorators), MRO lookup, signature checks."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import attrs
import pytest
import torch

from typedbrain._checkpoint import (
    Checkpointer,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from typedbrain._errors import (
    CheckpointError,
    ConfigurationError,
    HookContractError,
    UnsafeCheckpointError,
)


@register_checkpoint_hooks
class Vocabulary:
    """A non-Stateful object saved as JSON by class hooks; records how it was loaded."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.loaded_end_of_epoch: bool | None = None

    @mark_as_saver
    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"kind": "vocabulary", "words": self.words}))

    @mark_as_loader
    def load(self, path: Path, end_of_epoch: bool) -> None:
        data = json.loads(path.read_text())
        assert data["kind"] == "vocabulary"
        self.words = data["words"]
        self.loaded_end_of_epoch = end_of_epoch


class SubVocabulary(Vocabulary):
    """Inherits Vocabulary's hooks through the MRO."""


@register_checkpoint_hooks
class UpperVocabulary(Vocabulary):
    """Overrides the saver only; the loader is still Vocabulary's."""

    @mark_as_saver
    def save_upper(self, path: Path) -> None:
        path.write_text(
            json.dumps({"kind": "vocabulary", "words": [w.upper() for w in self.words]})
        )


@register_checkpoint_hooks
class HookedModule(torch.nn.Linear):
    """Stateful, but its class hooks win over the state_dict default."""

    @mark_as_saver
    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"bias": self.bias.tolist()}))

    @mark_as_loader
    def load(self, path: Path, end_of_epoch: bool) -> None:
        with torch.no_grad():
            self.bias.copy_(torch.tensor(json.loads(path.read_text())["bias"]))


def test_class_hooks_save_and_load_with_the_end_of_epoch_flag(tmp_path: Path) -> None:
    Checkpointer(tmp_path, {"vocab": Vocabulary(["a", "b"])}).save_checkpoint(end_of_epoch=False)
    restored = Vocabulary([])
    checkpoint = Checkpointer(tmp_path, {"vocab": restored}).recover_if_possible()
    assert checkpoint is not None
    assert restored.words == ["a", "b"]
    assert restored.loaded_end_of_epoch is False
    assert json.loads(checkpoint.paramfiles["vocab"].read_text())["kind"] == "vocabulary"


def test_a_subclass_uses_the_hooks_found_along_its_mro(tmp_path: Path) -> None:
    Checkpointer(tmp_path, {"vocab": SubVocabulary(["x"])}).save_checkpoint()
    restored = SubVocabulary([])
    Checkpointer(tmp_path, {"vocab": restored}).recover_if_possible()
    assert restored.words == ["x"]
    assert restored.loaded_end_of_epoch is True


def test_a_registered_subclass_overrides_only_the_hooks_it_marks(tmp_path: Path) -> None:
    Checkpointer(tmp_path, {"vocab": UpperVocabulary(["x", "y"])}).save_checkpoint()
    restored = UpperVocabulary([])
    Checkpointer(tmp_path, {"vocab": restored}).recover_if_possible()
    assert restored.words == ["X", "Y"]  # saved by the subclass's saver
    assert restored.loaded_end_of_epoch is True  # loaded by the parent's loader


class CasedVocabulary(Vocabulary):
    """Overrides the marked saver by name, without marking or registering anything."""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"kind": "vocabulary", "words": self.words, "cased": True}))


def test_a_subclass_override_of_a_marked_method_is_what_runs(tmp_path: Path) -> None:
    checkpoint = Checkpointer(tmp_path, {"vocab": CasedVocabulary(["a"])}).save_checkpoint()
    assert json.loads(checkpoint.paramfiles["vocab"].read_text())["cased"] is True
    restored = CasedVocabulary([])
    Checkpointer(tmp_path, {"vocab": restored}).recover_if_possible()
    assert restored.words == ["a"]  # by the inherited loader


def test_a_subclass_override_of_the_wrong_shape_is_refused_at_registration_naming_it() -> None:
    class Broken(Vocabulary):
        def load(self, path: Path) -> None:  # type: ignore[override]  # the end_of_epoch flag is missing: the case
            pass

    with pytest.raises(
        HookContractError,
        match=r"recoverable 'vocab': .*Broken.load must have the signature "
        r"\(self, path: Path, end_of_epoch: bool\) -> None",
    ):
        Checkpointer(Path("unused"), {"vocab": Broken([])})


def test_marks_in_a_class_that_is_not_registered_are_refused_naming_the_class() -> None:
    class Forgot(torch.nn.Linear):  # Stateful: without the check its marks would go unseen
        @mark_as_saver
        def save(self, path: Path) -> None:
            path.write_text("{}")

    with pytest.raises(
        HookContractError,
        match=r"recoverable 'module': .*Forgot.save is marked with mark_as_saver, but .*Forgot "
        r"is not decorated with @register_checkpoint_hooks",
    ):
        Checkpointer(Path("unused"), {"module": Forgot(1, 1)})


@attrs.define  # slotted: it builds a new class from the one register_checkpoint_hooks saw
@register_checkpoint_hooks
class SlottedVocabulary:
    words: list[str] = attrs.field(factory=list)

    @mark_as_saver
    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.words))

    @mark_as_loader
    def load(self, path: Path, end_of_epoch: bool) -> None:
        self.words = json.loads(path.read_text())


@dataclasses.dataclass(slots=True)
@register_checkpoint_hooks
class SlottedWords:
    words: list[str] = dataclasses.field(default_factory=list)

    @mark_as_saver
    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.words))

    @mark_as_loader
    def load(self, path: Path, end_of_epoch: bool) -> None:
        self.words = json.loads(path.read_text())


@pytest.mark.parametrize("cls", [SlottedVocabulary, SlottedWords])
def test_a_class_rebuilt_by_a_decorator_above_register_checkpoint_hooks_keeps_its_hooks(
    tmp_path: Path, cls: type[SlottedVocabulary] | type[SlottedWords]
) -> None:
    assert "__slots__" in vars(cls)  # the class decorated was replaced: the case
    checkpoint = Checkpointer(tmp_path, {"vocab": cls(["a", "b"])}).save_checkpoint()
    assert json.loads(checkpoint.paramfiles["vocab"].read_text()) == ["a", "b"]
    restored = cls([])
    Checkpointer(tmp_path, {"vocab": restored}).recover_if_possible()
    assert restored.words == ["a", "b"]


def test_marks_registered_in_a_class_that_a_decorator_replaced_and_renamed_say_so() -> None:
    def renaming(cls: type) -> type:
        return type("Renamed", cls.__bases__, dict(vars(cls)))

    @renaming
    @register_checkpoint_hooks
    class Original:
        @mark_as_saver
        def save(self, path: Path) -> None:
            path.write_text("[]")

        @mark_as_loader
        def load(self, path: Path, end_of_epoch: bool) -> None:
            pass

    with pytest.raises(
        HookContractError,
        match=r"recoverable 'vocab': Renamed.save is marked with mark_as_saver and was registered "
        r"by @register_checkpoint_hooks in the class .*Original, which is not .*Renamed: the "
        r"decorated class was replaced by a new one after decoration .* Make "
        r"@register_checkpoint_hooks the outermost \(top\) decorator",
    ):
        Checkpointer(Path("unused"), {"vocab": Original()})


@register_checkpoint_hooks
class SaverOnly(torch.nn.Module):
    """Stateful, with a custom saver and the default loader: its file does not load."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 3

    @mark_as_saver
    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"seen": self.seen}))


@register_checkpoint_hooks
class LoaderOnly(torch.nn.Linear):
    """Stateful, with the default saver and a custom loader that cannot read its file."""

    @mark_as_loader
    def load(self, path: Path, end_of_epoch: bool) -> None:
        json.loads(path.read_text())


def test_a_class_marking_only_a_saver_fails_to_load_with_an_error_naming_both_hooks(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"stats": SaverOnly()})
    checkpointer.save_checkpoint()
    with pytest.raises(CheckpointError) as caught:
        checkpointer.recover_if_possible()
    assert not isinstance(caught.value, UnsafeCheckpointError)
    message = str(caught.value)
    assert (
        "recoverable 'stats' (a SaverOnly) is saved by its custom saver SaverOnly.save" in message
    )
    assert "loaded by the default loader (load_state_dict" in message
    assert "mark the method that reads the file back with @mark_as_loader in SaverOnly" in message
    assert "unsafe" not in message


def test_a_per_object_saver_without_a_loader_says_to_give_a_custom_load_hook(
    tmp_path: Path,
) -> None:
    def save_text(module: torch.nn.Linear, path: Path) -> None:
        path.write_text("weights")

    checkpointer = Checkpointer(tmp_path)
    checkpointer.add_recoverable("model", torch.nn.Linear(1, 1), custom_save_hook=save_text)
    checkpointer.save_checkpoint()
    with pytest.raises(
        CheckpointError,
        match=r"custom saver custom_save_hook 'test_a_per_object_saver_without_a_loader_says_to_"
        r"give_a_custom_load_hook.<locals>.save_text' .*give add_recoverable a custom_load_hook",
    ):
        checkpointer.recover_if_possible()


def test_a_class_marking_only_a_loader_fails_to_load_with_an_error_naming_both_hooks(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"layer": LoaderOnly(1, 1)})
    checkpointer.save_checkpoint()
    with pytest.raises(
        CheckpointError,
        match=r"recoverable 'layer' did not take its state .*UnicodeDecodeError.*Its hooks may be "
        r"the cause: recoverable 'layer' \(a LoaderOnly\) is saved by the default saver "
        r"\(torch.save of its state_dict\(\)\) but loaded by its custom loader LoaderOnly.load.*"
        r"mark the method that writes the file with @mark_as_saver in LoaderOnly",
    ):
        checkpointer.recover_if_possible()


def test_class_hooks_win_over_state_dict(tmp_path: Path) -> None:
    module = HookedModule(2, 2)
    checkpoint = Checkpointer(tmp_path, {"module": module}).save_checkpoint()
    assert set(json.loads(checkpoint.paramfiles["module"].read_text())) == {"bias"}
    restored = HookedModule(2, 2)
    Checkpointer(tmp_path, {"module": restored}).recover_if_possible()
    assert torch.equal(restored.bias, module.bias)
    assert not torch.equal(restored.weight, module.weight)


def test_per_object_hooks_win_over_class_hooks(tmp_path: Path) -> None:
    calls: list[str] = []

    def save(vocab: Vocabulary, path: Path) -> None:
        calls.append("save")
        path.write_text(",".join(vocab.words))

    def load(vocab: Vocabulary, path: Path, end_of_epoch: bool) -> None:
        calls.append(f"load end_of_epoch={end_of_epoch}")
        vocab.words = path.read_text().split(",")

    checkpointer = Checkpointer(tmp_path)
    checkpointer.add_recoverable(
        "vocab", Vocabulary(["p", "q"]), custom_save_hook=save, custom_load_hook=load
    )
    checkpoint = checkpointer.save_checkpoint()
    assert checkpoint.paramfiles["vocab"].read_text() == "p,q"
    restored = Vocabulary([])
    reader = Checkpointer(tmp_path)
    reader.add_recoverable("vocab", restored, custom_save_hook=save, custom_load_hook=load)
    reader.recover_if_possible()
    assert restored.words == ["p", "q"]
    assert restored.loaded_end_of_epoch is None  # the class loader did not run
    assert calls == ["save", "load end_of_epoch=True"]


def test_per_object_hooks_make_any_object_recoverable(tmp_path: Path) -> None:
    def save(words: list[str], path: Path) -> None:
        path.write_text("\n".join(words))

    def load(words: list[str], path: Path, end_of_epoch: bool) -> None:
        words[:] = path.read_text().split("\n")

    checkpointer = Checkpointer(tmp_path)
    checkpointer.add_recoverable("words", ["a", "b"], custom_save_hook=save, custom_load_hook=load)
    checkpointer.save_checkpoint()
    restored: list[str] = []
    reader = Checkpointer(tmp_path)
    reader.add_recoverable("words", restored, custom_save_hook=save, custom_load_hook=load)
    reader.recover_if_possible()
    assert restored == ["a", "b"]


def test_an_object_with_only_a_save_hook_is_refused_naming_the_recoverable(
    tmp_path: Path,
) -> None:
    def save(words: list[str], path: Path) -> None:
        path.write_text("")

    with pytest.raises(ConfigurationError, match=r"recoverable 'words': cannot load a list"):
        Checkpointer(tmp_path).add_recoverable("words", [], custom_save_hook=save)


def test_a_save_hook_that_writes_nothing_fails_the_save_and_commits_nothing(
    tmp_path: Path,
) -> None:
    def save(words: list[str], path: Path) -> None:
        del words, path

    def load(words: list[str], path: Path, end_of_epoch: bool) -> None:
        del words, path, end_of_epoch

    checkpointer = Checkpointer(tmp_path)
    checkpointer.add_recoverable("words", [], custom_save_hook=save, custom_load_hook=load)
    with pytest.raises(CheckpointError, match="save hook of recoverable 'words' wrote no file"):
        checkpointer.save_checkpoint()
    # Only the writer lock file that the first save leaves in the folder.
    assert [path.name for path in tmp_path.iterdir()] == [".typedbrain-writer.lock"]


def test_a_saver_with_the_wrong_signature_is_refused_at_decoration_naming_it() -> None:
    def save_nothing(self: object) -> None:
        del self

    with pytest.raises(HookContractError, match=r"saver 'test_a_saver.*save_nothing'"):
        mark_as_saver(save_nothing)  # type: ignore[type-var]  # the wrong signature is the test


def test_a_loader_without_end_of_epoch_is_refused_at_decoration_naming_it() -> None:
    with pytest.raises(HookContractError, match=r"loader '.*Broken.load' .*end_of_epoch"):

        class Broken:
            @mark_as_loader  # type: ignore[type-var]  # the wrong signature is the test
            def load(self, path: Path) -> None:
                del path


def test_a_hook_that_is_not_a_function_is_refused() -> None:
    with pytest.raises(HookContractError, match="plain function"):
        mark_as_saver(staticmethod(print))


def test_hook_contract_error_is_a_type_error() -> None:
    assert issubclass(HookContractError, TypeError)


def test_registering_a_class_without_marked_methods_is_refused() -> None:
    with pytest.raises(HookContractError, match=r"Plain' marks no method"):

        @register_checkpoint_hooks
        class Plain:
            pass


def test_registering_a_class_with_two_savers_is_refused() -> None:
    with pytest.raises(HookContractError, match=r"several savers \('a', 'b'\)"):

        @register_checkpoint_hooks
        class Twice:
            @mark_as_saver
            def a(self, path: Path) -> None:
                del path

            @mark_as_saver
            def b(self, path: Path) -> None:
                del path


# ---------------------------------------------------------------------------- per-object hooks


def _save_words(words: list[str], path: Path) -> None:
    path.write_text("\n".join(words))


def _load_words(words: list[str], path: Path, end_of_epoch: bool) -> None:
    del end_of_epoch
    words[:] = path.read_text().split("\n")


def _load_words_with_a_device(
    words: list[str], path: Path, end_of_epoch: bool, device: str
) -> None:
    del end_of_epoch, device
    words[:] = path.read_text().split("\n")


def test_a_custom_hook_with_the_wrong_signature_is_refused_at_registration_naming_the_recoverable(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    with pytest.raises(
        HookContractError,
        match=r"recoverable 'vocab': custom_load_hook '_load_words_with_a_device' must have the "
        r"signature \(obj, path: Path, end_of_epoch: bool\) -> None: .*'device'",
    ):
        checkpointer.add_recoverable(
            "vocab",
            ["a"],
            custom_save_hook=_save_words,
            custom_load_hook=_load_words_with_a_device,  # type: ignore[arg-type]  # the wrong signature is the test
        )
    with pytest.raises(
        HookContractError, match=r"recoverable 'vocab': custom_save_hook '_load_words' must have"
    ):
        checkpointer.add_recoverable(
            "vocab",
            ["a"],
            custom_save_hook=_load_words,  # type: ignore[arg-type]  # the wrong signature is the test
            custom_load_hook=_load_words,
        )
    # Refused before anything changed: a later save and load never meet the bad hook.
    assert list(checkpointer.recoverables) == ["model"]


def test_a_custom_hook_that_is_not_callable_is_refused_at_registration_naming_the_recoverable(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path)
    with pytest.raises(
        HookContractError,
        match=r"recoverable 'vocab': custom_save_hook 'not callable' is a str, not callable",
    ):
        checkpointer.add_recoverable(
            "vocab",
            [],
            custom_save_hook="not callable",  # type: ignore[arg-type]  # wrong on purpose
            custom_load_hook=_load_words,
        )
    assert dict(checkpointer.recoverables) == {}


class _Loader:
    """A callable object (not a function) with the loader's shape."""

    def __call__(self, words: list[str], path: Path, end_of_epoch: bool) -> None:
        _load_words(words, path, end_of_epoch)


def test_any_callable_of_the_right_shape_is_accepted_as_a_custom_hook(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path)
    checkpointer.add_recoverable(
        "words",
        ["a", "b"],
        custom_save_hook=functools.partial(_save_words),
        custom_load_hook=_Loader(),
    )
    checkpointer.save_checkpoint()
    restored: list[str] = []
    reader = Checkpointer(tmp_path)
    reader.add_recoverable(
        "words", restored, custom_save_hook=_save_words, custom_load_hook=_Loader()
    )
    assert reader.recover_if_possible() is not None
    assert restored == ["a", "b"]


def test_a_per_object_loader_without_a_saver_says_to_give_a_custom_save_hook(
    tmp_path: Path,
) -> None:
    def load_json(module: torch.nn.Linear, path: Path, end_of_epoch: bool) -> None:
        json.loads(path.read_text())

    checkpointer = Checkpointer(tmp_path)
    checkpointer.add_recoverable("model", torch.nn.Linear(1, 1), custom_load_hook=load_json)
    checkpointer.save_checkpoint()
    with pytest.raises(
        CheckpointError,
        match=r"recoverable 'model' did not take its state .*Its hooks may be the cause: "
        r"recoverable 'model' \(a Linear\) is saved by the default saver .*custom loader "
        r"custom_load_hook 'test_a_per_object_loader_without_a_saver_says_to_give_a_custom_save_"
        r"hook.<locals>.load_json'.*give add_recoverable a custom_save_hook as well",
    ):
        checkpointer.recover_if_possible()
