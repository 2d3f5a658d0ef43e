"""Loading HyperPyYAML recipes: tags, checked overrides, placeholders, typed hparams."""

from __future__ import annotations

import collections
import functools
import io
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Literal

import attrs
import pytest
import torch

from tests.helpers import python_blocks
from typedbrain._cli_args import parse_arguments
from typedbrain._config import LoadedHparams, load_hparams, split_run_options
from typedbrain._errors import (
    ConfigurationError,
    HparamsError,
    HparamsProblem,
    OverrideError,
    PlaceholderError,
    RunOptionsError,
)
from typedbrain._options import Precision, RunOptions
from typedbrain._typed_hparams import load_typed_hparams, structure_hparams

DATA = Path(__file__).parent / "data" / "config"
RECIPE = DATA / "recipe.yaml"
DOCS = Path(__file__).parent.parent / "docs" / "configuration.md"


@attrs.frozen
class Data:
    batch_size: int
    shuffle: bool


@attrs.frozen
class Hyper:
    lr: float
    epochs: int
    model: torch.nn.Linear
    opt_class: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
    data: Data


@pytest.fixture
def in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """File names in messages are relative to the working folder: make it the repository's."""
    monkeypatch.chdir(Path(__file__).parent.parent)


# Tags -----------------------------------------------------------------------------------------


def test_new_tag_builds_the_object() -> None:
    model = load_hparams(RECIPE)["model"]
    assert isinstance(model, torch.nn.Linear)
    assert (model.in_features, model.out_features) == (4, 2)


def test_name_tag_with_arguments_gives_a_partial() -> None:
    optimizer = load_hparams(RECIPE)["optimizer"]
    assert isinstance(optimizer, functools.partial)
    assert optimizer.func is torch.optim.SGD
    assert optimizer.keywords == {"lr": 0.1}


def test_ref_tag_interpolates_strings_and_evaluates_arithmetic() -> None:
    loaded = load_hparams(RECIPE)
    assert loaded["log_file"] == "results/run/log.txt"
    assert loaded["double_lr"] == pytest.approx(0.2)


def test_copy_tag_builds_a_separate_object() -> None:
    loaded = load_hparams(RECIPE)
    assert isinstance(loaded["model_copy"], torch.nn.Linear)
    assert loaded["model_copy"] is not loaded["model"]


def test_apply_tag_calls_the_function() -> None:
    assert load_hparams(RECIPE)["total"] == 6


def test_include_tag_reads_the_file_next_to_the_recipe_with_its_own_overrides() -> None:
    assert load_hparams(RECIPE)["data"] == {"batch_size": 8, "shuffle": True}


def test_a_stream_loads_like_a_file() -> None:
    loaded = load_hparams(io.StringIO("a: 1\nb: !ref <a> + 1\n"))
    assert loaded == {"a": 1, "b": 2}


def test_top_level_keys_starting_with_two_underscores_are_left_out() -> None:
    loaded = load_hparams(io.StringIO("__hidden: 4\nsize: !ref <__hidden>\n"))
    assert loaded == {"size": 4}


def test_loaded_hparams_remember_file_and_line_of_each_key() -> None:
    loaded = load_hparams(RECIPE)
    assert isinstance(loaded, LoadedHparams)
    assert loaded.locations[("lr",)] == (str(RECIPE), 3)
    assert loaded.locations[("model", "in_features")] == (str(RECIPE), 8)


# Overrides ------------------------------------------------------------------------------------


def test_overrides_as_a_mapping_replace_values_before_references_resolve() -> None:
    loaded = load_hparams(RECIPE, {"lr": 0.5, "model": {"out_features": 3}})
    assert loaded["lr"] == 0.5
    assert loaded["double_lr"] == pytest.approx(1.0)
    model = loaded["model"]
    assert isinstance(model, torch.nn.Linear)
    assert model.out_features == 3


def test_overrides_as_a_yaml_string_replace_values() -> None:
    loaded = load_hparams(RECIPE, "lr: 0.5\nmodel:\n  out_features: 3\n")
    assert loaded["lr"] == 0.5
    model = loaded["model"]
    assert isinstance(model, torch.nn.Linear)
    assert model.out_features == 3


MERGED = """\
base: &base
  a: 1
  b: 2
extra: &extra
  b: 20
  e: 5
child:
  <<: [*base, *extra]
  c: 3
"""


def test_an_override_may_set_a_key_a_yaml_merge_key_brings_in() -> None:
    loaded = load_hparams(io.StringIO(MERGED), {"child": {"a": 10, "e": 50, "c": 30}})
    assert loaded["child"] == {"a": 10, "b": 2, "c": 30, "e": 50}  # b: the earlier merge wins
    assert loaded["base"] == {"a": 1, "b": 2}  # the anchored mapping is left as it was
    with pytest.raises(OverrideError, match="'child' has no key 'd'"):
        load_hparams(io.StringIO(MERGED), {"child": {"d": 1}})


NUMBER_KEYS = """\
weights: {0: 1.0, 1: 1.0, 2.5: 1.0, null: 1.0, "7": 1.0}
flags: {true: 1.0, false: 1.0}
"""


@pytest.mark.parametrize(
    ("name", "override", "key"),
    [
        ("weights", "1", 1),
        ("weights", "2.5", 2.5),
        ("weights", "null", None),
        ("weights", "7", "7"),
        ("flags", "true", True),
    ],
)
def test_an_override_key_written_as_text_sets_the_number_bool_or_null_key(
    name: str, override: str, key: object
) -> None:
    """Override keys are strings (``--weights.1 5.0``): one names the key YAML reads from its
    text, rather than adding a second key beside it."""
    loaded = load_hparams(io.StringIO(NUMBER_KEYS), {name: {override: 5.0}})
    before = load_hparams(io.StringIO(NUMBER_KEYS))[name]
    mapping = loaded[name]
    assert isinstance(mapping, dict)
    assert isinstance(before, dict)
    assert mapping.keys() == before.keys()
    assert mapping[key] == 5.0
    assert sorted(mapping.values()) == [1.0] * (len(before) - 1) + [5.0]


def test_an_override_reaches_into_an_included_file() -> None:
    assert load_hparams(RECIPE, {"data": {"shuffle": False}})["data"] == {
        "batch_size": 8,
        "shuffle": False,
    }


@pytest.mark.parametrize("overrides", [{"data": {"hidden": 32}}, "data:\n  hidden: 32\n"])
def test_an_override_sets_keys_of_a_bare_include(
    tmp_path: Path, overrides: dict[str, object] | str
) -> None:
    (tmp_path / "data.yaml").write_text("hidden: 8\nlayers: 2\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 1\ndata: !include:data.yaml\n")
    assert load_hparams(recipe, overrides)["data"] == {"hidden": 32, "layers": 2}


def test_an_unknown_key_under_a_bare_include_names_the_included_keys(tmp_path: Path) -> None:
    (tmp_path / "data.yaml").write_text("hidden: 8\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 1\ndata: !include:data.yaml\n")
    with pytest.raises(OverrideError, match=r"'data' has no key 'hiden'; did you mean 'hidden'"):
        load_hparams(recipe, {"data": {"hiden": 32}})


@pytest.mark.parametrize("overrides", [None, {"data": {"hidden": 32}}, "data:\n  hidden: 32\n"])
def test_an_include_that_is_missing_is_named_with_or_without_overrides_under_it(
    tmp_path: Path, overrides: dict[str, object] | str | None
) -> None:
    # The keys under it cannot be checked: each used to be "unknown", hiding the missing file.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 1\ndata: !include:missing.yaml\n")
    with pytest.raises(FileNotFoundError) as caught:
        load_hparams(recipe, overrides)
    assert caught.value.filename == str(tmp_path / "missing.yaml")


def test_keys_under_a_bare_include_of_a_missing_file_inside_an_included_file_are_refused(
    tmp_path: Path,
) -> None:
    # An override cannot write there whether or not the file exists: the reason, not the file.
    (tmp_path / "outer.yaml").write_text("a: 1\ndeep: !include:missing.yaml\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sub: !include:outer.yaml\n")
    with pytest.raises(OverrideError, match=r"'sub.deep' is a bare !include: in an included file"):
        load_hparams(recipe, {"sub": {"deep": {"x": 5}}})
    with pytest.raises(FileNotFoundError):
        load_hparams(recipe)


def test_keys_under_a_bare_include_inside_an_included_file_are_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    (tmp_path / "inner.yaml").write_text("x: 1\n")
    (tmp_path / "outer.yaml").write_text("a: 1\ndeep: !include:inner.yaml\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sub: !include:outer.yaml\n")
    with pytest.raises(OverrideError, match=r"'sub.deep' is a bare !include: in an included file"):
        load_hparams(recipe, {"sub": {"deep": {"x": 5}}})


def test_a_nested_unknown_override_names_key_file_and_parent_line(in_repo_root: None) -> None:
    with pytest.raises(OverrideError) as caught:
        load_hparams("tests/data/config/recipe.yaml", {"model": {"out_feature": 3}})
    assert str(caught.value) == (
        "override 'model.out_feature' (tests/data/config/recipe.yaml:7): 'model' has no key "
        "'out_feature'; did you mean 'out_features'?"
    )
    assert (caught.value.key, caught.value.line) == ("model.out_feature", 7)


def test_a_nested_unknown_override_is_rejected_before_any_object_is_built(
    in_repo_root: None,
) -> None:
    text = "model: !new:tests.test_config.Exploding\n  size: 1\n"
    with pytest.raises(OverrideError, match=r"'model' has no key 'hidden_size'"):
        load_hparams(io.StringIO(text), "model:\n  hidden_size: 3\n")


class Exploding:
    """Fails the test if a tag ever builds it."""

    def __init__(self, size: int) -> None:
        raise AssertionError(f"built with size={size}")


def test_an_unknown_top_level_override_is_rejected_with_a_suggestion(in_repo_root: None) -> None:
    with pytest.raises(OverrideError) as caught:
        load_hparams("tests/data/config/recipe.yaml", "lrr: 0.3")
    assert str(caught.value) == (
        "override 'lrr' (tests/data/config/recipe.yaml): no top-level key 'lrr' (an override "
        "cannot add keys); did you mean 'lr'?"
    )


def test_an_unknown_override_close_to_a_run_option_suggests_it(in_repo_root: None) -> None:
    with pytest.raises(OverrideError, match=r"did you mean the run option 'debug'\?$"):
        load_hparams("tests/data/config/recipe.yaml", {"debg": True})


def test_a_dotted_key_in_a_mapping_override_is_explained(in_repo_root: None) -> None:
    with pytest.raises(OverrideError) as caught:
        load_hparams("tests/data/config/recipe.yaml", {"model.in_features": 3})
    assert str(caught.value).endswith(
        "a nested key is a nested mapping in overrides: {'model': {'in_features': ...}}"
    )


def test_keys_under_a_value_that_is_not_a_mapping_are_rejected(in_repo_root: None) -> None:
    with pytest.raises(OverrideError) as caught:
        load_hparams("tests/data/config/recipe.yaml", {"lr": {"value": 1}})
    assert str(caught.value) == (
        "override 'lr.value' (tests/data/config/recipe.yaml:3): 'lr' is not a mapping, so an "
        "override cannot set keys under it; give it a whole new value instead"
    )


def test_an_unknown_key_under_an_include_is_rejected(in_repo_root: None) -> None:
    with pytest.raises(OverrideError, match=r"^override 'data.nope' \(.*recipe.yaml:15\)"):
        load_hparams("tests/data/config/recipe.yaml", {"data": {"nope": 1}})


def test_overrides_that_are_not_a_mapping_are_rejected() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_hparams(RECIPE, "- 1\n- 2\n")
    assert str(caught.value) == (
        "the overrides must be a YAML mapping (key: value lines), got '- 1\\n- 2\\n'"
    )


@pytest.mark.parametrize("overrides", [[("lr", 0.5)], 5])
def test_overrides_that_are_neither_a_mapping_nor_a_string_are_a_configuration_error(
    overrides: object,
) -> None:
    with pytest.raises(
        ConfigurationError, match=r"overrides must be a mapping or a YAML string holding one, got"
    ):
        load_hparams(RECIPE, overrides)  # type: ignore[arg-type]  # wrong on purpose


LINEAR_RECIPE = "model: !new:torch.nn.Linear\n    in_features: 4\n    out_features: 2\nlr: 0.1\n"


@pytest.mark.parametrize(
    "overrides",
    [
        "model: !new:torch.nn.Identity {}\n",
        "model: !new:torch.nn.Identity\n  unused_argument: 1\n",
    ],
)
def test_a_tagged_mapping_override_replaces_the_value_whole(overrides: str) -> None:
    loaded = load_hparams(io.StringIO(LINEAR_RECIPE), overrides)
    assert type(loaded["model"]) is torch.nn.Identity
    assert loaded["lr"] == 0.1


def test_a_tagged_mapping_override_from_the_command_line_needs_none_of_the_old_keys(
    tmp_path: Path,
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(LINEAR_RECIPE, encoding="utf-8")
    parsed = parse_arguments(
        [
            str(recipe),
            "--model",
            "!new:torch.nn.Bilinear {in1_features: 1, in2_features: 1, out_features: 3}",
        ]
    )
    model = load_hparams(parsed.hparams_file, parsed.overrides)["model"]
    assert isinstance(model, torch.nn.Bilinear)
    assert model.out_features == 3


def test_an_untagged_mapping_override_still_merges_into_a_tagged_one() -> None:
    model = load_hparams(io.StringIO(LINEAR_RECIPE), "model: {out_features: 3}\n")["model"]
    assert isinstance(model, torch.nn.Linear)
    assert (model.in_features, model.out_features) == (4, 3)


def test_a_tagged_mapping_override_replaces_a_plain_mapping_whole() -> None:
    loaded = load_hparams(
        io.StringIO("counts:\n  a: 1\n  b: 2\n"), "counts: !new:collections.Counter {c: 3}\n"
    )
    assert loaded["counts"] == collections.Counter(c=3)


def test_an_override_value_yaml_cannot_write_is_an_error_naming_its_key() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_hparams(io.StringIO("paths:\n  data: x\n"), {"paths": {"data": Path("/data")}})
    assert str(caught.value).startswith(
        "override 'paths.data': cannot represent an object: PosixPath('/data'); override values "
        "must be plain YAML data"
    )


# Placeholders ---------------------------------------------------------------------------------


def test_an_unfilled_placeholder_names_its_key_and_line(in_repo_root: None) -> None:
    with pytest.raises(PlaceholderError) as caught:
        load_hparams("tests/data/config/placeholder.yaml")
    assert str(caught.value) == (
        "'paths.data_folder' (tests/data/config/placeholder.yaml:3) is a !PLACEHOLDER and was "
        "not given a value: override it (--paths.data_folder VALUE on the command line, or the "
        "key in load_hparams' overrides)"
    )


def test_a_filled_placeholder_loads() -> None:
    loaded = load_hparams(DATA / "placeholder.yaml", {"paths": {"data_folder": "/data"}})
    assert loaded["paths"] == {"data_folder": "/data"}


def test_replacing_the_parent_of_a_placeholder_fills_it() -> None:
    assert load_hparams(DATA / "placeholder.yaml", "paths: none")["paths"] == "none"


def test_a_placeholder_in_a_list_points_at_the_key_holding_the_list(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("paths:\n  folders: [!PLACEHOLDER , b]\n", encoding="utf-8")
    with pytest.raises(PlaceholderError) as caught:
        load_hparams(recipe)
    assert caught.value.key == "paths.folders[0]"
    assert caught.value.override == "paths.folders"
    assert "(--paths.folders VALUE on the command line" in str(caught.value)
    assert "--paths.folders[0]" not in str(caught.value)
    # The suggested override does fill it.
    parsed = parse_arguments([str(recipe), "--paths.folders", "[a, b]"])
    assert load_hparams(parsed.hparams_file, parsed.overrides)["paths"] == {"folders": ["a", "b"]}


# References -----------------------------------------------------------------------------------

_REFERENCES = """\
hidden_size: 8
folder: results
model: !new:torch.nn.Linear
    in_features: 4
    out_features: 2
sizes:
    small: 2
layers: [1, 2]
"""


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "out: !ref <hidden_sise>",
            "'out' (recipe.yaml:9): !ref <hidden_sise>: no top-level key 'hidden_sise'; did you "
            "mean 'hidden_size'?",
        ),
        (
            "out: !ref <hidden_sise> * 2",
            "'out' (recipe.yaml:9): !ref <hidden_sise> * 2: no top-level key 'hidden_sise'; did "
            "you mean 'hidden_size'?",
        ),
        (
            "out: !ref <folder>/<nmae>/log",
            "'out' (recipe.yaml:9): !ref <folder>/<nmae>/log: no top-level key 'nmae'",
        ),
        (
            "out: !ref <sizes[smal]>",
            "'out' (recipe.yaml:9): !ref <sizes[smal]>: 'sizes' has no key 'smal'; did you mean "
            "'small'?",
        ),
        (
            "out: !ref <model[in_feature]>",
            "'out' (recipe.yaml:9): !ref <model[in_feature]>: 'model' has no key 'in_feature'; "
            "did you mean 'in_features'?",
        ),
        (
            "out: !ref <modle.weight>",
            "'out' (recipe.yaml:9): !ref <modle.weight>: no top-level key 'modle'; did you mean "
            "'model'?",
        ),
        (
            "out: !ref <sizes.small>",
            "'out' (recipe.yaml:9): !ref <sizes.small>: <sizes.small> reads the attribute 'small' "
            "of 'sizes', a mapping, which has no such attribute: to name its key write "
            "<sizes[small]>",
        ),
        (
            "out: !ref <layers[0]>",
            "'out' (recipe.yaml:9): !ref <layers[0]>: 'layers' is a list, and a reference names "
            "keys of mappings only, not items of a list (such as '0')",
        ),
        (
            "out: !copy <modl>",
            "'out' (recipe.yaml:9): !copy <modl>: no top-level key 'modl'; did you mean 'model'?",
        ),
        (
            "out:\n    - 1\n    - deep: !ref <hiden_size>",
            "'out[1].deep' (recipe.yaml:11): !ref <hiden_size>: no top-level key 'hiden_size'; "
            "did you mean 'hidden_size'?",
        ),
    ],
    ids=[
        "missing",
        "in an expression",
        "in a path",
        "nested",
        "an argument of a new object",
        "attribute of a missing key",
        "attribute of a mapping",
        "item of a list",
        "copy",
        "deep in a list",
    ],
)
def test_a_reference_to_a_missing_key_names_the_referring_key_line_and_a_close_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("recipe.yaml").write_text(_REFERENCES + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigurationError) as caught:
        load_hparams("recipe.yaml")
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("out: !ref <hidden_size> * 2", 16),
        ("out: !ref <folder>/<hidden_size>", "results/8"),
        ("out: !ref <sizes[small]>", 2),
        ("out: !ref <model[in_features]>", 4),
        ("out: !ref <model.in_features>", 4),  # an attribute of the object built
    ],
)
def test_references_hyperpyyaml_resolves_still_load(
    tmp_path: Path, line: str, expected: object
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_REFERENCES + line + "\n", encoding="utf-8")
    assert load_hparams(recipe)["out"] == expected


def test_a_reference_through_a_merge_key_loads() -> None:
    text = "base: &base {x: 1}\nderived:\n    <<: *base\n    y: 2\nout: !ref <derived[x]>\n"
    assert load_hparams(io.StringIO(text))["out"] == 1


def test_a_reference_an_override_replaces_is_not_checked_and_one_in_the_overrides_is() -> None:
    text = "lr: 0.1\nout: !ref <missing>\n"
    assert load_hparams(io.StringIO(text), {"out": 3})["out"] == 3
    with pytest.raises(
        ConfigurationError,
        match=r"^'out' \(the overrides, line 1\): !ref <lrr>: no top-level key 'lrr'; did you "
        r"mean 'lr'\?$",
    ):
        load_hparams(io.StringIO(text), "out: !ref <lrr>\n")
    assert load_hparams(io.StringIO(text), "out: !ref <lr>\n")["out"] == 0.1


def test_a_reference_to_a_key_an_override_adds_under_a_null_value_loads() -> None:
    text = "sizes: null\nout: !ref <sizes[small]>\n"
    assert load_hparams(io.StringIO(text), "sizes: {small: 3}")["out"] == 3


def test_a_reference_in_the_overrides_of_an_include_names_the_main_file(tmp_path: Path) -> None:
    (tmp_path / "model.yaml").write_text("size: 1\n", encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "hidden: 4\nmodel: !include:model.yaml\n    size: !ref <hiden>\n", encoding="utf-8"
    )
    with pytest.raises(
        ConfigurationError, match=r"^'model.size' \(.*recipe.yaml:3\): !ref <hiden>"
    ):
        load_hparams(recipe)
    recipe.write_text(
        "hidden: 4\nmodel: !include:model.yaml\n    size: !ref <hidden>\n", encoding="utf-8"
    )
    assert load_hparams(recipe)["model"] == {"size": 4}


# Files ----------------------------------------------------------------------------------------


def test_a_missing_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_hparams(tmp_path / "absent.yaml")
    assert str(caught.value) == (
        f"cannot read hyperparameter file {tmp_path / 'absent.yaml'}: No such file or directory"
    )


@pytest.mark.parametrize("source", [5, None, ["recipe.yaml"]])
def test_a_source_that_is_neither_a_path_nor_a_stream_is_refused_naming_it(source: object) -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"^the hyperparameter source must be a path \(a str or os.PathLike\) or an open "
        rf"text stream, got {type(source).__name__} ",
    ):
        load_hparams(source)  # type: ignore[arg-type]  # wrong on purpose


def test_a_binary_stream_is_refused_saying_to_open_it_as_text() -> None:
    stream = io.BytesIO(b"lr: 0.1\n")
    with pytest.raises(ConfigurationError, match=r"gave bytes, not text: open it in text mode"):
        load_hparams(stream)  # type: ignore[arg-type]  # wrong on purpose


def test_a_document_that_is_not_a_mapping_is_rejected() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_hparams(io.StringIO("- 1\n"))
    assert str(caught.value) == (
        "<stream> must hold a mapping of hyperparameters (key: value lines), not a sequence"
    )


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n", "{}\n"])
def test_an_empty_or_comments_only_file_loads_as_an_empty_mapping(text: str) -> None:
    loaded = load_hparams(io.StringIO(text))
    assert loaded == {}
    assert isinstance(loaded, LoadedHparams)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "lr: 0.1\n1: 2\n",
            "top-level key '1' (<stream>:2) is an integer, not a string: hyperparameter names "
            "are strings (quote the key to make it one)",
        ),
        ("null: 1\n", "top-level key 'null' (<stream>:1) is null, not a string"),
        ("? [a, b]\n: 1\n", "top-level key [...] (<stream>:1) is a sequence, not a string"),
    ],
)
def test_a_top_level_key_that_is_not_a_string_names_the_key_and_line(
    text: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_hparams(io.StringIO(text))
    assert str(caught.value).startswith(message)


def test_a_quoted_number_is_a_string_key() -> None:
    assert load_hparams(io.StringIO('"1": 2\n')) == {"1": 2}


def test_a_stream_with_a_name_is_named_by_it_in_errors() -> None:
    stream = io.StringIO("a: [1, 2\n")
    stream.name = "in-memory recipe.yaml"
    with pytest.raises(ConfigurationError, match=r"^in-memory recipe.yaml is not valid YAML: "):
        load_hparams(stream)


def test_invalid_yaml_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"^<stream> is not valid YAML: "):
        load_hparams(io.StringIO("a: [1, 2\n"))


def test_an_error_raised_while_building_an_object_names_its_key_and_line(
    in_repo_root: None,
) -> None:
    with pytest.raises(ImportError) as caught:
        load_hparams(io.StringIO("lr: 1\nmodel: !new:no_such_module.Thing\n"))
    assert caught.value.__notes__ == ["while building 'model' (<stream>, line 2)"]


def test_a_build_error_deep_in_the_file_names_the_nested_key_path(tmp_path: Path) -> None:
    (tmp_path / "encoder.yaml").write_text(
        "size: 2\nlayers:\n  - !new:torch.nn.ReLU\n  - !new:torch.nn.Linear\n"
        "    in_features: 2\n    out_featres: 3\n"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 1\nencoder: !include:encoder.yaml\n")
    with pytest.raises(TypeError, match="out_featres") as caught:
        load_hparams(recipe)
    where = f"({tmp_path / 'encoder.yaml'}, line 4)"
    assert caught.value.__notes__ == [f"while building 'encoder.layers[1]' {where}"]


def test_an_error_outside_any_value_being_built_names_the_file() -> None:
    # A reference through another one that hyperpyyaml has not resolved yet (it resolves them
    # in the file's order): the key exists, and hyperpyyaml refuses it while no value is built.
    text = "b: !ref <alias[x]>\nbase: {x: 1}\nalias: !ref <base>\n"
    with pytest.raises(ValueError, match="not valid") as caught:
        load_hparams(io.StringIO(text))
    assert caught.value.__notes__ == ["while loading hyperparameters from <stream>"]


# Typed hparams --------------------------------------------------------------------------------


def test_structuring_builds_the_class_with_objects_passing_through() -> None:
    with pytest.warns(UserWarning, match="run options"):  # see the next test
        hyper = load_typed_hparams(DATA / "typed.yaml", Hyper)
    assert hyper.lr == 0.1
    assert hyper.epochs == 3
    assert isinstance(hyper.model, torch.nn.Linear)
    assert hyper.data == Data(batch_size=8, shuffle=True)
    optimizer = hyper.opt_class(hyper.model.parameters())
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["lr"] == 0.1


def test_run_option_keys_are_not_fields_of_the_typed_class_and_loading_warns() -> None:
    # typed.yaml sets precision: bf16, which Hyper does not declare: it is not returned.
    with pytest.warns(UserWarning, match=r"sets the run options \['precision'\], which Hyper"):
        assert load_typed_hparams(DATA / "typed.yaml", Hyper).lr == 0.1


def test_a_run_option_the_class_declares_is_structured_into_it() -> None:
    @attrs.frozen
    class WithPrecision:
        precision: str

    loaded = load_hparams(io.StringIO("precision: bf16\n"))
    assert structure_hparams(loaded, WithPrecision) == WithPrecision(precision="bf16")


def test_one_error_lists_missing_extra_and_wrong_type_problems(in_repo_root: None) -> None:
    source = "tests/data/config/typed_bad.yaml"
    with pytest.raises(HparamsError) as caught:
        load_typed_hparams(source, Hyper)
    assert str(caught.value) == (
        f"hyperparameters from {source} do not fit Hyper (6 problems):\n"
        f"  - lr ({source}:1): expected a number, got str 'fast'\n"
        f"  - epochs ({source}): missing: required by Hyper\n"
        f"  - data.batch_size ({source}:8): expected an integer, got str '8'\n"
        f"  - data.shuffle ({source}:7): missing: required by Data\n"
        f"  - data.shufle ({source}:9): unexpected key: Data has no such field; did you mean "
        "'shuffle'?\n"
        f"  - dropout ({source}:10): unexpected key: Hyper has no such field"
    )
    assert caught.value.problems[0] == HparamsProblem(
        "lr", "expected a number, got str 'fast'", source=source, line=1
    )
    assert caught.value.target == "Hyper"


def test_types_are_strict() -> None:
    @attrs.frozen
    class Strict:
        count: int
        flag: bool
        name: str
        names: list[str]

    with pytest.raises(HparamsError) as caught:
        structure_hparams({"count": True, "flag": 1, "name": 5, "names": "ab"}, Strict)
    assert [str(problem) for problem in caught.value.problems] == [
        "count: expected an integer, got bool True",
        "flag: expected true or false, got int 1",
        "name: expected a string, got int 5",
        "names: expected a list, got str 'ab'",
    ]


def test_a_literal_field_is_strict_about_the_type_of_its_values() -> None:
    @attrs.frozen
    class Heads:
        heads: Literal[1, 2]

    assert structure_hparams({"heads": 2}, Heads) == Heads(heads=2)
    for value in (True, 1.0, "1"):
        with pytest.raises(HparamsError) as caught:
            structure_hparams({"heads": value}, Heads)
        assert [str(problem) for problem in caught.value.problems] == [
            f"heads: expected one of 1, 2, got {type(value).__name__} {value!r}"
        ]


def test_a_class_field_takes_a_subclass_and_rejects_anything_else() -> None:
    @attrs.frozen
    class Factory:
        cls: type[torch.nn.Module]

    loaded = load_hparams(io.StringIO("cls: !name:torch.nn.Linear\n"))
    assert structure_hparams(loaded, Factory).cls is torch.nn.Linear
    for value in (5, torch.optim.SGD, torch.nn.Linear(1, 1)):
        with pytest.raises(HparamsError) as caught:
            structure_hparams({"cls": value}, Factory)
        assert [str(problem) for problem in caught.value.problems] == [
            "cls: expected a class that is a subclass of Module (a !name: class), "
            f"got {type(value).__name__} {value!r}"
        ]


def test_a_mapping_field_given_a_list_is_reported_as_such() -> None:
    @attrs.frozen
    class Weights:
        weights: Mapping[str, float]
        layers: dict[str, torch.nn.Module]

    assert structure_hparams(
        {"weights": {"a": 1}, "layers": {"relu": torch.nn.ReLU()}}, Weights
    ).weights == {"a": 1.0}
    with pytest.raises(HparamsError) as caught:
        structure_hparams({"weights": [1], "layers": {"x": 3}}, Weights)
    assert [str(problem) for problem in caught.value.problems] == [
        "weights: expected a mapping, got list [1]",
        "layers.x: expected a Module, got int 3",
    ]


def test_a_wrong_object_for_a_class_typed_field_is_a_problem() -> None:
    loaded = {"lr": 0.1, "epochs": 1, "model": "linear", "opt_class": 3, "data": [1]}
    with pytest.raises(HparamsError) as caught:
        structure_hparams(loaded, Hyper, source="my recipe")
    assert str(caught.value) == (
        "hyperparameters from my recipe do not fit Hyper (3 problems):\n"
        "  - model: expected a Linear, got str 'linear'\n"
        "  - opt_class: expected a callable (a class, function or !name: factory), got int 3\n"
        "  - data: expected a mapping of Data's fields, got list [1]"
    )


def test_list_items_unions_and_optional_fields_are_checked() -> None:
    @attrs.frozen
    class Mixed:
        sizes: tuple[int, ...]
        size_or_name: int | str
        limit: int | None = None
        anything: object = None

    assert structure_hparams(
        {"sizes": [1, 2], "size_or_name": "x", "anything": torch.nn.ReLU}, Mixed
    ) == Mixed(sizes=(1, 2), size_or_name="x", anything=torch.nn.ReLU)
    with pytest.raises(HparamsError) as caught:
        structure_hparams({"sizes": [1, "2"], "size_or_name": 1.5, "limit": "3"}, Mixed)
    assert [str(problem) for problem in caught.value.problems] == [
        "sizes[1]: expected an integer, got str '2'",
        "size_or_name: expected int or str, got float 1.5",
        "limit: expected int or None, got str '3'",
    ]


def test_a_validator_of_the_class_is_reported_as_a_problem() -> None:
    @attrs.frozen
    class Positive:
        lr: float = attrs.field(validator=attrs.validators.gt(0))

    with pytest.raises(HparamsError) as caught:
        structure_hparams({"lr": -1.0}, Positive)
    assert caught.value.problems == (HparamsProblem("", "'lr' must be > 0: -1.0"),)
    assert str(caught.value) == (
        "hyperparameters from the given mapping do not fit Positive (1 problem):\n"
        "  - (top level): 'lr' must be > 0: -1.0"
    )


# Run options ----------------------------------------------------------------------------------


def test_split_run_options_separates_run_options_from_the_rest() -> None:
    loaded = load_hparams(DATA / "run_options.yaml", {"optimizer_step_limit": 5})
    options, rest = split_run_options(loaded)
    assert options == {
        "precision": "bf16",
        "grad_accumulation_factor": 2,
        "optimizer_step_limit": 5,
    }
    assert rest == {"lr": 0.1}
    assert isinstance(rest, LoadedHparams)
    assert rest.locations[("lr",)] == (str(DATA / "run_options.yaml"), 1)
    run_options = RunOptions.from_sources(options)
    assert (run_options.precision, run_options.grad_accumulation_factor) == ("bf16", 2)


@pytest.mark.parametrize("loaded", [5, None, [("lr", 0.1)]])
def test_split_run_options_refuses_what_is_not_a_mapping_naming_it(loaded: object) -> None:
    with pytest.raises(
        ConfigurationError,
        match=rf"split_run_options takes the loaded hyperparameters, a mapping such as "
        rf"load_hparams' result, got {type(loaded).__name__} ",
    ):
        split_run_options(loaded)  # type: ignore[arg-type]  # wrong on purpose


def test_a_string_for_an_integer_run_option_in_yaml_is_an_error_naming_the_key() -> None:
    options, _ = split_run_options(load_hparams(DATA / "run_options.yaml"))
    with pytest.raises(RunOptionsError) as caught:
        RunOptions.from_sources(options)
    assert str(caught.value) == (
        "run option 'optimizer_step_limit': expected an integer or None, got str '5' (from hparams)"
    )


# The documentation ----------------------------------------------------------------------------


def test_the_python_examples_in_the_configuration_docs_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks("docs/configuration.md")
    assert blocks
    namespace: dict[str, object] = {"__name__": "configuration_docs"}
    for block in blocks:
        exec(compile(block, str(DOCS), "exec", dont_inherit=True), namespace)


@pytest.mark.parametrize("included", [False, True])
def test_a_recipe_that_is_not_utf8_is_named(tmp_path: Path, included: bool) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("note: caf\xe9\n".encode("latin-1"))
    recipe = latin
    if included:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("sub: !include:latin.yaml\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=rf"{re.escape(str(latin))}.* not UTF-8 text"):
        load_hparams(recipe)


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("lr: 0.1\nepochs: 3\nlr: 0.2\n", "'lr'", "1 and 3"),
        ("model:\n  size: 1\n  size: 2\n", "'size'", "2 and 3"),
        ("runs:\n  - {a: 1, a: 2}\n", "'a'", "2 and 2"),
    ],
)
def test_a_key_twice_in_one_mapping_is_named_with_its_lines(
    text: str, key: str, lines: str
) -> None:
    with pytest.raises(ConfigurationError, match=rf"key {key} appears twice .*lines {lines}"):
        load_hparams(io.StringIO(text))


def test_an_alias_of_a_mapping_is_not_a_duplicate() -> None:
    loaded = load_hparams(io.StringIO("base: &b {a: 1}\ncopy: *b\nchild:\n  <<: *b\n  c: 2\n"))
    assert loaded["child"] == {"a": 1, "c": 2}


OPTIONAL_BLOCKS = "loader_kwargs: {}\naugment: null\nmodel: {size: 1}\n"


@pytest.mark.parametrize(
    "overrides",
    [
        {"loader_kwargs": {"num_workers": 2}, "augment": {"p": 0.5}},
        "loader_kwargs: {num_workers: 2}\naugment:\n  p: 0.5\n",
    ],
)
def test_an_override_may_give_a_mapping_where_the_file_has_null_or_an_empty_one(
    overrides: dict[str, object] | str,
) -> None:
    loaded = load_hparams(io.StringIO(OPTIONAL_BLOCKS), overrides)
    assert loaded["loader_kwargs"] == {"num_workers": 2}
    assert loaded["augment"] == {"p": 0.5}
    with pytest.raises(OverrideError, match="'model' has no key 'sise'"):  # still checked there
        load_hparams(io.StringIO(OPTIONAL_BLOCKS), {"model": {"sise": 2}})


def test_a_wrong_object_is_shown_on_one_short_line() -> None:
    @attrs.frozen
    class WithModel:
        model: torch.nn.Linear

    big = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(20)))
    with pytest.raises(HparamsError) as caught:
        structure_hparams({"model": big}, WithModel)
    lines = str(caught.value).splitlines()
    assert len(lines) == 2  # the headline, and the one problem
    assert "got Sequential Sequential( ...)" in lines[1]


@pytest.mark.parametrize(
    ("text", "cycle"),
    [
        ("a: !ref <b>\nb: !ref <a>\n", "b (line 2) -> a (line 1) -> b (line 2)"),
        ("out: !ref <log>/x\nlog: !ref <out>/y\n", "log (line 2) -> out (line 1) -> log (line 2)"),
        ("model:\n  size: !ref <model>\n", "model.size (line 2) -> model.size (line 2)"),
        ("a: !copy <b[x]>\nb: !ref <a>\n", "b (line 2) -> a (line 1) -> b (line 2)"),
        # hyperpyyaml resolves a reference through its top-level key, whole.
        ("sizes:\n  a: 1\n  b: !ref <sizes[a]>\n", "sizes.b (line 3) -> sizes.b (line 3)"),
    ],
)
def test_references_that_lead_back_to_themselves_are_named(text: str, cycle: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(f"form a cycle: {cycle}")):
        load_hparams(io.StringIO(text))


def test_references_within_a_mapping_and_to_shared_parents_are_no_cycle() -> None:
    text = "sizes: {a: 1, b: !ref <x>}\nx: 2\nmodel:\n  h: !ref <sizes[b]>\nalso: !ref <sizes>\n"
    loaded = load_hparams(io.StringIO(text))
    assert loaded["model"] == {"h": 2}
    assert loaded["also"] == {"a": 1, "b": 2}


def test_a_run_option_field_missing_after_split_run_options_says_why() -> None:
    @attrs.frozen
    class WithPrecision:
        lr: float
        precision: Precision

    loaded = load_hparams(io.StringIO("lr: 0.1\nprecision: bf16\n"))
    _, rest = split_run_options(loaded)
    with pytest.raises(HparamsError, match="'precision' is a run option: split_run_options"):
        structure_hparams(rest, WithPrecision)
    assert structure_hparams(loaded, WithPrecision).precision == "bf16"
