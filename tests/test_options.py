"""Run options: SpeechBrain's names and defaults, precedence, validation, brain attributes."""

from __future__ import annotations

import math
import typing
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import RegressionBrain, regression_brain, sgd
from tests.strategies import RUN_OPTION_VALUES, run_option_mappings
from typedbrain import (
    Brain,
    ConfigurationError,
    Hparams,
    RunOptions,
    RunOptionsDict,
    RunOptionsError,
)
from typedbrain._devices import missing_device

# The defaults of SpeechBrain 1.x, as listed in speechbrain-brain-surface.md.
SPEECHBRAIN_DEFAULTS: dict[str, object] = {
    "test_only": False,
    "debug": False,
    "debug_batches": 2,
    "debug_epochs": 2,
    "debug_persistently": False,
    "device": None,
    "data_parallel_backend": False,
    "distributed_backend": "nccl",
    "distributed_launch": False,
    "find_unused_parameters": False,
    "jit": False,
    "jit_module_keys": None,
    "compile": False,
    "compile_module_keys": None,
    "compile_mode": "default",
    "compile_using_fullgraph": False,
    "compile_using_dynamic_shape_tracing": False,
    "precision": "fp32",
    "eval_precision": "fp32",
    "max_grad_norm": 5.0,
    "skip_nonfinite_grads": False,
    "nonfinite_patience": 3,
    "noprogressbar": False,
    "ckpt_interval_minutes": 0,
    "ckpt_interval_steps": 0,
    "grad_accumulation_factor": 1,
    "optimizer_step_limit": None,
    "tqdm_colored_bar": False,
    "remove_vector_weight_decay": False,
    "profile_training": False,
    "profile_warmup": 5,
    "profile_steps": 5,
    # typedbrain's own, not SpeechBrain's:
    "fsdp": False,
    "sync_batchnorm": False,
    "stop_on_signals": True,
}


def test_every_speechbrain_option_and_typedbrains_own_exist_with_their_defaults() -> None:
    assert attrs.asdict(RunOptions()) == SPEECHBRAIN_DEFAULTS


def test_precedence_is_defaults_then_hparams_then_run_opts() -> None:
    options = RunOptions.from_sources(
        hparams={"max_grad_norm": 1.0, "debug_batches": 7, "lr": 0.1},
        run_opts={"max_grad_norm": 2.0},
    )
    assert options.max_grad_norm == 2.0  # run_opts beat hparams
    assert options.debug_batches == 7  # hparams beat the default
    assert options.nonfinite_patience == 3  # the default otherwise


@given(hparams=run_option_mappings(), run_opts=run_option_mappings())
def test_precedence_holds_for_any_valid_options(
    hparams: dict[str, object], run_opts: dict[str, object]
) -> None:
    intervals = ("ckpt_interval_minutes", "ckpt_interval_steps")
    if all(hparams.get(key, 0) for key in intervals) or all(
        run_opts.get(key, 0) for key in intervals
    ):
        with pytest.raises(RunOptionsError, match="ckpt_interval_steps"):
            RunOptions.from_sources(hparams, run_opts)
        return
    options = RunOptions.from_sources(hparams, run_opts)
    chosen_in_run_opts = any(run_opts.get(key, 0) for key in intervals)
    for name in RunOptions.names():
        expected = run_opts.get(name, hparams.get(name, SPEECHBRAIN_DEFAULTS[name]))
        if name in intervals and name not in run_opts and chosen_in_run_opts:
            expected = SPEECHBRAIN_DEFAULTS[name]  # the run_opts interval replaced it
        assert getattr(options, name) == expected, name


def test_hparams_keys_that_are_not_options_are_ignored() -> None:
    options = RunOptions.from_sources(hparams={"lr": "anything", "model": object()})
    assert options == RunOptions()


@pytest.mark.parametrize(
    ("key", "option"),
    [
        ("precison", "precision"),
        ("max_grad_nrom", "max_grad_norm"),
        ("debug_batchs", "debug_batches"),
    ],
)
def test_a_hparams_key_like_a_misspelt_run_option_warns_naming_both(key: str, option: str) -> None:
    with pytest.warns(UserWarning, match="is not a run option") as caught:
        options = RunOptions.from_sources(hparams={key: "bf16", "lr": 0.1})
    assert options == RunOptions()  # still a hyperparameter: it sets nothing
    assert [str(warning.message) for warning in caught] == [
        f"hyperparameter {key!r} is not a run option, so it sets none; did you mean the run "
        f"option {option!r}? (if {key!r} is a hyperparameter of your own, ignore this warning)"
    ]
    assert caught[0].filename == __file__  # the user's line, not typedbrain's


def test_a_brain_built_with_a_misspelt_run_option_in_its_hparams_warns_at_the_users_line() -> None:
    with pytest.warns(UserWarning, match="did you mean the run option 'precision'") as caught:
        brain = RegressionBrain(
            {"model": torch.nn.Linear(1, 1)}, sgd(), hparams={"precison": "bf16"}
        )
    assert brain.precision == "fp32"
    assert [warning.filename for warning in caught] == [__file__]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("key", ["devise", "max_norm", "accumulation_factor", "lr", "model"])
def test_a_hparams_key_merely_near_a_run_option_does_not_warn(key: str) -> None:
    assert RunOptions.from_sources(hparams={key: 1}) == RunOptions()


def test_unknown_run_option_is_an_error_that_suggests_the_closest_name() -> None:
    with pytest.raises(RunOptionsError) as caught:
        RunOptions.from_sources(run_opts={"max_grad_nrom": 1.0})
    assert caught.value.key == "max_grad_nrom"
    assert str(caught.value) == (
        "run option 'max_grad_nrom': no such run option; did you mean 'max_grad_norm'?"
    )


@pytest.mark.parametrize(
    ("source", "key", "value", "message"),
    [
        (
            "run_opts",
            "optimizer_step_limit",
            "5",
            "expected an integer or None, got str '5' (from run_opts)",
        ),
        ("hparams", "debug", 1, "expected true or false, got int 1 (from hparams)"),
        ("run_opts", "debug_batches", True, "expected an integer, got bool True (from run_opts)"),
        (
            "run_opts",
            "precision",
            "fp64",
            "expected one of 'fp32', 'fp16', 'bf16', got str 'fp64' (from run_opts)",
        ),
        (
            "hparams",
            "compile_module_keys",
            "model",
            "expected a list of strings or None, got str 'model' (from hparams)",
        ),
        ("run_opts", "grad_accumulation_factor", 0, "expected at least 1, got 0 (from run_opts)"),
        (
            "run_opts",
            "max_grad_norm",
            math.nan,
            "expected a number (0 or less disables clipping), not NaN, got nan (from run_opts)",
        ),
        (
            "run_opts",
            "device",
            "gpu:0",
            "expected a torch device such as 'cpu', got 'gpu:0' (from run_opts)",
        ),
    ],
)
def test_bad_value_is_an_error_naming_key_value_and_source(
    source: str, key: str, value: object, message: str
) -> None:
    with pytest.raises(RunOptionsError) as caught:
        RunOptions.from_sources(**{source: {key: value}})
    assert caught.value.key == key
    assert str(caught.value) == f"run option {key!r}: {message}"


def test_mapping_spellings_are_normalised() -> None:
    options = RunOptions.from_sources(
        run_opts={"compile_module_keys": ["model"], "max_grad_norm": 3, "ckpt_interval_minutes": 1}
    )
    assert options.compile_module_keys == ("model",)
    assert options.max_grad_norm == 3.0
    assert isinstance(options.max_grad_norm, float)
    assert isinstance(options.ckpt_interval_minutes, float)


def test_direct_construction_validates_too() -> None:
    with pytest.raises(
        RunOptionsError, match=r"run option 'nonfinite_patience': expected at least 0"
    ):
        RunOptions(nonfinite_patience=-1)


@pytest.mark.parametrize(
    ("hparams", "run_opts"),
    [
        ({"ckpt_interval_minutes": 15.0}, {"ckpt_interval_steps": 100}),
        ({"ckpt_interval_steps": 100}, {"ckpt_interval_minutes": 15.0}),
    ],
)
def test_a_checkpoint_interval_in_run_opts_replaces_the_other_one_in_hparams(
    hparams: dict[str, object], run_opts: dict[str, object]
) -> None:
    """The command line (run_opts) chooses how to save over the recipe file (hparams)."""
    options = RunOptions.from_sources(hparams=hparams, run_opts=run_opts)
    assert {key: getattr(options, key) for key in run_opts} == run_opts
    assert {key: getattr(options, key) for key in hparams} == dict.fromkeys(hparams, 0)


def test_both_checkpoint_intervals_in_one_source_names_it() -> None:
    with pytest.raises(RunOptionsError) as caught:
        RunOptions.from_sources(
            run_opts={"ckpt_interval_minutes": 15.0, "ckpt_interval_steps": 100}
        )
    assert caught.value.key == "ckpt_interval_steps"
    assert str(caught.value).endswith(
        "(ckpt_interval_steps from run_opts, ckpt_interval_minutes from run_opts)"
    )


def test_both_checkpoint_intervals_is_an_error() -> None:
    with pytest.raises(RunOptionsError) as caught:
        RunOptions(ckpt_interval_minutes=15.0, ckpt_interval_steps=100)
    assert caught.value.key == "ckpt_interval_steps"
    assert "cannot be set together with ckpt_interval_minutes" in str(caught.value)


@given(
    st.sampled_from(sorted(RUN_OPTION_VALUES)).flatmap(
        lambda n: st.tuples(st.just(n), RUN_OPTION_VALUES[n])
    )
)
def test_every_valid_value_is_accepted(name_value: tuple[str, object]) -> None:
    name, value = name_value
    assert getattr(RunOptions.from_sources(run_opts={name: value}), name) == value


def test_typed_dict_declares_the_same_options_and_types() -> None:
    hints = typing.get_type_hints(RunOptionsDict)
    fields = {field.name: field.type for field in attrs.fields(RunOptions)}
    assert set(hints) == set(fields)
    for name, field_type in fields.items():
        declared = hints[name]
        # Mappings may spell a tuple of module keys as a list.
        if name.endswith("_module_keys"):
            assert declared == tuple[str, ...] | list[str] | None, name
        else:
            assert declared == field_type, name


def test_brain_exposes_every_option_as_an_attribute() -> None:
    brain = regression_brain(run_opts={"debug_batches": 9, "precision": "bf16"})
    for name in RunOptions.names():
        assert getattr(brain, name) == getattr(brain.run_opts, name), name
    assert brain.debug_batches == 9
    assert brain.precision == "bf16"


def test_setting_an_option_attribute_validates_and_replaces_run_opts() -> None:
    brain = regression_brain()
    before = brain.run_opts
    brain.max_grad_norm = 1.5
    assert brain.run_opts.max_grad_norm == 1.5
    assert before.max_grad_norm == 5.0  # the old options object is unchanged (frozen)
    with pytest.raises(RunOptionsError, match="'debug_batches': expected at least 1"):
        brain.debug_batches = 0
    assert brain.debug_batches == 2


def test_device_defaults_to_cuda_when_available_else_cpu() -> None:
    brain = regression_brain()
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert brain.device == expected
    assert brain.run_opts.device == expected
    assert {p.device for p in brain.modules.parameters()} == {torch.device(expected)}


def test_explicit_device_moves_the_modules() -> None:
    brain = regression_brain(run_opts={"device": "meta"})
    assert brain.device == "meta"
    assert {p.device.type for p in brain.modules.parameters()} == {"meta"}


@pytest.mark.parametrize("device", ["cuda:99", "xpu:99"])
def test_a_device_this_machine_lacks_is_a_run_option_error_naming_it(device: str) -> None:
    with pytest.raises(RunOptionsError, match=rf"run option 'device': '{device}' is not avail"):
        regression_brain(run_opts={"device": device})


def test_a_missing_cuda_device_is_told_without_making_a_cuda_context() -> None:
    """Every rank of a job checks its device: a check that touched GPU 0 would make a
    context there for each of them."""
    initialized = torch.cuda.is_initialized
    before = initialized()  # type: ignore[no-untyped-call]  # untyped in torch
    assert missing_device("cpu") is None
    assert missing_device("meta") is None
    reason = missing_device("cuda:99")
    assert reason == f"this machine has {torch.cuda.device_count()} CUDA device(s) available"
    assert initialized() == before  # type: ignore[no-untyped-call]  # untyped in torch


@attrs.frozen
class TypedHparams:
    lr: float
    nonfinite_patience: int


def test_attrs_hparams_set_run_options_and_stay_typed() -> None:
    hparams = TypedHparams(lr=0.5, nonfinite_patience=9)
    brain: Brain[object, object, TypedHparams] = Brain(hparams=hparams)
    assert brain.hparams is hparams
    assert brain.nonfinite_patience == 9


def test_mapping_hparams_set_run_options_and_read_both_ways() -> None:
    brain = RegressionBrain(
        {"model": torch.nn.Linear(4, 2)}, sgd(), hparams={"lr": 0.5, "debug": True}
    )
    assert isinstance(brain.hparams, Hparams)
    assert brain.hparams.lr == 0.5
    assert brain.hparams["lr"] == 0.5
    assert brain.debug is True


def test_run_opts_from_the_constructor_beat_hparams() -> None:
    brain = RegressionBrain(
        {"model": torch.nn.Linear(4, 2)},
        sgd(),
        hparams={"debug": True},
        run_opts={"debug": False},
    )
    assert brain.debug is False


def test_a_whole_run_options_is_taken_as_run_opts_every_option_from_it() -> None:
    donor = regression_brain(run_opts={"max_grad_norm": 1.0, "debug_batches": 7})
    brain = RegressionBrain(
        {"model": torch.nn.Linear(4, 2)},
        sgd(),
        hparams={"max_grad_norm": 3.0},
        run_opts=donor.run_opts,
    )
    assert brain.run_opts == donor.run_opts
    assert brain.max_grad_norm == 1.0  # the RunOptions' own value beats hparams


@pytest.mark.parametrize("given", [[("debug", True)], "debug"])
def test_run_opts_that_is_no_mapping_is_a_configuration_error_naming_its_type(
    given: object,
) -> None:
    with pytest.raises(ConfigurationError, match=r"run_opts must be a mapping .* got (list|str)"):
        RunOptions.from_sources(None, given)  # type: ignore[arg-type]  # wrong on purpose


@pytest.mark.parametrize("key", [1, None, ("debug",)])
def test_a_run_opts_key_that_is_not_a_string_is_refused_naming_it(key: object) -> None:
    with pytest.raises(
        ConfigurationError,
        match=rf"run_opts must map run option names \(strings\) to values, got the key "
        rf"{type(key).__qualname__} ",
    ) as caught:
        RunOptions.from_sources(None, {key: True})  # type: ignore[dict-item]  # wrong on purpose
    assert repr(key) in str(caught.value)


def test_a_hyperparameter_key_that_is_not_a_string_is_left_alone() -> None:
    # Hyperparameters are not all run options: a key of any type is simply not one.
    assert RunOptions.from_sources({1: True}, None) == RunOptions()  # type: ignore[dict-item]  # the case


def test_bad_hparams_run_option_fails_the_constructor() -> None:
    with pytest.raises(RunOptionsError, match=r"'precision'.*\(from hparams\)"):
        RegressionBrain({"model": torch.nn.Linear(4, 2)}, sgd(), hparams={"precision": "fp8"})


def test_reference_page_lists_every_option_with_its_default() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "run-options.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line.split("|")[3].strip().strip("`")
        for line in page.splitlines()
        if line.startswith("| `")
    }
    assert set(rows) == RunOptions.names()
    for field in attrs.fields(RunOptions):
        assert rows[field.name] == repr(field.default), field.name


def test_assigning_run_opts_with_another_device_is_refused() -> None:
    brain = regression_brain(run_opts={"device": "cpu"})
    with pytest.raises(ConfigurationError, match="device cannot change from 'cpu' to 'meta'"):
        brain.run_opts = attrs.evolve(brain.run_opts, device="meta")
    assert brain.device == "cpu"
    brain.run_opts = attrs.evolve(brain.run_opts, max_grad_norm=1.0)  # the rest may change
    assert brain.max_grad_norm == 1.0


def test_assigning_run_opts_without_a_device_keeps_the_brains_device() -> None:
    brain = regression_brain(run_opts={"device": "cpu"})
    brain.run_opts = RunOptions(max_grad_norm=1.0)
    assert (brain.device, brain.run_opts.device, brain.max_grad_norm) == ("cpu", "cpu", 1.0)


def test_module_keys_given_as_a_list_of_strings_become_a_tuple_on_every_path() -> None:
    assert RunOptions(jit_module_keys=["model"]).jit_module_keys == ("model",)
    brain = regression_brain()
    brain.compile_module_keys = ["model"]  # type: ignore[assignment]  # a list, as YAML gives
    assert brain.compile_module_keys == ("model",)
    with pytest.raises(
        RunOptionsError, match=r"expected a list of strings or None, got list \['model', 3\]"
    ):
        RunOptions(compile_module_keys=["model", 3])  # type: ignore[list-item]  # the mistake


def test_assigning_run_opts_anything_but_run_options_is_refused() -> None:
    brain = regression_brain()
    with pytest.raises(ConfigurationError, match="must be assigned a RunOptions, not dict"):
        brain.run_opts = {"max_grad_norm": 1.0}  # type: ignore[assignment]  # the mistake


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"modules": [torch.nn.Linear(4, 2)]}, "a list of them holds \\(name, module\\) pairs"),
        ({"modules": torch.nn.Linear(4, 2)}, "modules must map names to torch modules.*not Linear"),
        ({"modules": {"model": "linear"}}, r"modules\['model'\] is str, not a torch.nn.Module"),
        ({"opt_class": 5}, "opt_class must be callable"),
        ({"checkpointer": "/tmp/ckpts"}, "checkpointer must be a Checkpointer.*not str"),
    ],
)
def test_the_constructor_names_an_argument_of_the_wrong_kind(
    arguments: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RegressionBrain(**arguments)  # type: ignore[call-overload]  # the mistakes under test


def test_modules_may_be_pairs_and_a_module_may_be_none_as_module_dict_allows() -> None:
    model = torch.nn.Linear(4, 2)
    brain = RegressionBrain([("model", model), ("lm", None)])  # type: ignore[call-overload]  # ModuleDict's forms
    assert brain.modules["model"] is model
    assert "lm" in brain.modules
    assert brain.modules["lm"] is None


def test_a_module_dict_is_taken_as_the_modules() -> None:
    model = torch.nn.Linear(4, 2)
    brain = RegressionBrain(torch.nn.ModuleDict({"model": model}))  # as SpeechBrain recipes may
    assert brain.modules["model"] is model
