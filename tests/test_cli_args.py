"""The recipe command line: hparams file, typed run options, YAML overrides, --help, errors."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import attrs
import pytest

from typedbrain._cli_args import (
    HelpRequested,
    parse_arguments,
    parse_arguments_or_exit,
    run_option_descriptions,
    run_options_help,
)
from typedbrain._config import load_hparams, split_run_options
from typedbrain._errors import ArgumentsError
from typedbrain._options import RunOptions

RECIPE = str(Path(__file__).parent / "data" / "config" / "recipe.yaml")


def test_the_first_positional_argument_is_the_hparams_file() -> None:
    parsed = parse_arguments([RECIPE])
    assert parsed.hparams_file == Path(RECIPE)
    assert parsed.run_opts == {}
    assert parsed.overrides == ""


def test_space_and_equals_forms_give_the_same_values() -> None:
    spaced = parse_arguments([RECIPE, "--debug_batches", "3", "--lr", "0.5"])
    joined = parse_arguments([RECIPE, "--debug_batches=3", "--lr=0.5"])
    assert spaced == joined
    assert spaced.run_opts == {"debug_batches": 3}
    assert spaced.overrides == "lr: 0.5\n"


def test_the_hparams_file_may_come_after_options() -> None:
    assert parse_arguments(["--lr", "0.5", RECIPE]).hparams_file == Path(RECIPE)


def test_boolean_run_options_are_flags_with_an_explicit_equals_form() -> None:
    parsed = parse_arguments([RECIPE, "--debug", "--stop_on_signals=false", "--jit=True"])
    assert parsed.run_opts == {"debug": True, "stop_on_signals": False, "jit": True}


def test_run_option_values_are_parsed_to_their_declared_types() -> None:
    parsed = parse_arguments(
        [
            RECIPE,
            "--optimizer_step_limit",
            "5",
            "--max_grad_norm",
            "2.5",
            "--ckpt_interval_minutes",
            "1",
            "--precision",
            "bf16",
            "--device",
            "cpu",
        ]
    )
    assert parsed.run_opts == {
        "optimizer_step_limit": 5,
        "max_grad_norm": 2.5,
        "ckpt_interval_minutes": 1.0,
        "precision": "bf16",
        "device": "cpu",
    }
    assert type(parsed.run_opts["optimizer_step_limit"]) is int
    assert type(parsed.run_opts["ckpt_interval_minutes"]) is float


def test_none_is_accepted_where_a_run_option_allows_it() -> None:
    parsed = parse_arguments([RECIPE, "--optimizer_step_limit", "None", "--device=none"])
    assert parsed.run_opts == {"optimizer_step_limit": None, "device": None}


def test_module_key_options_take_several_names() -> None:
    parsed = parse_arguments(
        [RECIPE, "--compile_module_keys", "encoder", "decoder", "--jit_module_keys=a,b"]
    )
    assert parsed.run_opts == {
        "compile_module_keys": ("encoder", "decoder"),
        "jit_module_keys": ("a", "b"),
    }
    assert parse_arguments([RECIPE, "--jit_module_keys", "None"]).run_opts == {
        "jit_module_keys": None
    }


def test_unknown_keys_become_yaml_overrides_keeping_equals_signs_and_types() -> None:
    parsed = parse_arguments(
        [
            RECIPE,
            "--lr",
            "0.5",
            "--output_folder=results/a=b",
            "--seed",
            "7",
            "--model.out_features",
            "3",
            "--log_file",
            "!ref <output_folder>/x.txt",
        ]
    )
    assert parsed.overrides == (
        "lr: 0.5\n"
        "output_folder: results/a=b\n"
        "seed: 7\n"
        "model:\n"
        "  out_features: 3\n"
        "log_file: !ref <output_folder>/x.txt\n"
    )
    loaded = load_hparams(parsed.hparams_file, parsed.overrides)
    assert loaded["lr"] == 0.5
    assert loaded["seed"] == 7
    assert loaded["output_folder"] == "results/a=b"
    assert loaded["log_file"] == "results/a=b/x.txt"
    assert getattr(loaded["model"], "out_features", None) == 3


def test_a_hash_that_starts_no_comment_is_part_of_the_value(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_folder: x\nnote: x\nsizes: []\n", encoding="utf-8")
    parsed = parse_arguments(
        [str(recipe), "--output_folder", "run#2", "--note", "'sweep #3'", "--sizes", "[1, 2]"]
    )
    loaded = load_hparams(parsed.hparams_file, parsed.overrides)
    assert loaded == {"output_folder": "run#2", "note": "sweep #3", "sizes": [1, 2]}


def test_an_override_given_twice_keeps_the_last_value() -> None:
    assert parse_arguments([RECIPE, "--lr", "1", "--lr", "2"]).overrides == "lr: 2\n"


def test_a_negative_number_is_a_value() -> None:
    parsed = parse_arguments([RECIPE, "--lr", "-0.5", "--max_grad_norm", "-1"])
    assert parsed.overrides == "lr: -0.5\n"
    assert parsed.run_opts == {"max_grad_norm": -1.0}


def test_the_command_line_overrides_a_run_option_set_in_the_yaml() -> None:
    # recipe.yaml sets precision: bf16 and optimizer_step_limit: 5.
    parsed = parse_arguments([RECIPE, "--precision", "fp32"])
    options, _ = split_run_options(load_hparams(parsed.hparams_file, parsed.overrides))
    run_options = RunOptions.from_sources(options, parsed.run_opts)
    assert run_options.precision == "fp32"
    assert run_options.optimizer_step_limit == 5
    assert RunOptions.from_sources(options).precision == "bf16"


def test_two_dashes_end_a_list_of_module_keys_before_the_hparams_file() -> None:
    parsed = parse_arguments(["--compile", "--compile_module_keys", "model", "--", RECIPE])
    assert parsed.hparams_file == Path(RECIPE)
    assert parsed.run_opts == {"compile": True, "compile_module_keys": ("model",)}


# Errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the hparams file is required (the first positional argument)"),
        (["--debug"], "the hparams file is required (the first positional argument)"),
        (
            ["--compile_module_keys", "model", RECIPE, "--compile"],
            "the hparams file is required (the first positional argument); "
            f"--compile_module_keys took 'model', '{RECIPE}' as its module keys: give the "
            "hparams file first, or end the keys with -- (--compile_module_keys model -- "
            "hparams.yaml)",
        ),
        (
            [RECIPE, "other.yaml"],
            "unexpected argument 'other.yaml': only one hparams file can be given",
        ),
        (
            [RECIPE, "--debug", "false"],
            "unexpected argument 'false': only one hparams file can be given; boolean run "
            "options are flags: write --name=false, not --name false",
        ),
        (
            ["--debug", "false", RECIPE],
            f"unexpected argument '{RECIPE}': only one hparams file can be given; boolean run "
            "options are flags: write --name=false, not --name false",
        ),
        (
            [RECIPE, "--optimizer_step_limit", "five"],
            "argument --optimizer_step_limit: expected an integer or None, got 'five'",
        ),
        (
            [RECIPE, "--debug_batches", "2.5"],
            "argument --debug_batches: expected an integer, got '2.5'",
        ),
        (
            [RECIPE, "--max_grad_norm", "x"],
            "argument --max_grad_norm: expected a number, got 'x'",
        ),
        (
            [RECIPE, "--precision", "fp64"],
            "argument --precision: expected one of fp32, fp16, bf16, got 'fp64'",
        ),
        ([RECIPE, "--debug=maybe"], "argument --debug: expected true or false, got 'maybe'"),
        ([RECIPE, "--debug_batches"], "argument --debug_batches: expected a value"),
        (
            [RECIPE, "--lr", "--debug"],
            "argument --lr: expected a value: 'lr' is not a run option, so it overrides the "
            "hyperparameter 'lr', which needs one (--lr VALUE)",
        ),
        (
            [RECIPE, "--lr"],
            "argument --lr: expected a value: 'lr' is not a run option, so it overrides the "
            "hyperparameter 'lr', which needs one (--lr VALUE)",
        ),
        (
            [RECIPE, "--ckpt_interval_steps", "5", "--ckpt_interval_minutes", "1"],
            "argument --ckpt_interval_steps: cannot be set together with ckpt_interval_minutes "
            "(got ckpt_interval_steps=5 and ckpt_interval_minutes=1.0); choose one",
        ),
        (
            [RECIPE, "--grad_accumulation_factor", "0"],
            "argument --grad_accumulation_factor: expected at least 1, got 0",
        ),
        ([RECIPE, "-x"], "argument -x: unknown option (options are written --name)"),
        (
            [RECIPE, "--note", "a: b"],
            "argument --note: 'a: b' is not a YAML value; quote it to pass it as a string "
            "(--note \"'a: b'\")",
        ),
        (
            [RECIPE, "--output_folder", "results/run #2"],
            "argument --output_folder: YAML reads '#2' in 'results/run #2' as a comment and "
            "would drop it: leave the comment out, or quote the value to pass it whole as a "
            "string (--output_folder \"'results/run #2'\")",
        ),
        (
            [RECIPE, "--lr=0.1 # was 0.2"],
            "argument --lr: YAML reads '# was 0.2' in '0.1 # was 0.2' as a comment and would "
            "drop it: leave the comment out, or quote the value to pass it whole as a string "
            "(--lr \"'0.1 # was 0.2'\")",
        ),
        (
            [RECIPE, "--compile_module_keys", "--debug"],
            "argument --compile_module_keys: expected one or more module names "
            "(--compile_module_keys a b or --compile_module_keys=a,b), or None; got none",
        ),
        (
            [RECIPE, "--compile_module_keys="],
            "argument --compile_module_keys: expected one or more module names "
            "(--compile_module_keys a b or --compile_module_keys=a,b), or None; got none",
        ),
        (
            [RECIPE, "--compile_module_keys=,"],
            "argument --compile_module_keys: expected one or more module names "
            "(--compile_module_keys a b or --compile_module_keys=a,b), or None; got none",
        ),
        (
            [RECIPE, "--model", "1", "--model.x", "2"],
            "argument --model.x: conflicts with --model, which sets the whole value",
        ),
        ([RECIPE, "--model..x", "2"], "argument --model..x: an empty key in a dotted name"),
    ],
)
def test_a_bad_command_line_raises_an_error_naming_the_argument(
    argv: list[str], message: str
) -> None:
    with pytest.raises(ArgumentsError) as caught:
        parse_arguments(argv)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            "h.yaml --debug",
            r"argv must be a list of the arguments, such as sys\.argv\[1:\] .*not "
            r"str 'h\.yaml --debug'",
        ),
        (None, r"argv must be a list of the arguments, .*not NoneType None"),
        (
            ["h.yaml", 5],
            r"argv must be a list of strings, such as sys\.argv\[1:\], but holds int 5",
        ),
    ],
)
def test_argv_that_is_not_a_list_of_strings_is_refused_saying_what_to_pass(
    argv: object, message: str
) -> None:
    with pytest.raises(ArgumentsError, match=message) as caught:
        parse_arguments(argv)  # type: ignore[arg-type]  # wrong on purpose
    assert caught.value.argument is None


def test_a_tuple_of_arguments_is_a_command_line() -> None:
    assert parse_arguments((RECIPE, "--debug")) == parse_arguments([RECIPE, "--debug"])


@pytest.mark.parametrize(
    "text",
    [
        "it's: here",
        'say "a: b"',
        "cost: $5 `now`",
        "a: 'b' c",
        "results/run #2",
        "lr sweep #3 (bigger batch)",
        "#1",
    ],
)
def test_the_quoting_hint_for_a_value_that_is_not_yaml_works_when_followed(
    tmp_path: Path, text: str
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("note: x\n", encoding="utf-8")
    with pytest.raises(ArgumentsError) as caught:
        parse_arguments([str(recipe), "--note", text])
    hint = str(caught.value).rpartition("(--note ")[2].removesuffix(")")
    # What a POSIX shell passes for the hint's double-quoted word.
    shell = subprocess.run(
        ["sh", "-c", f"printf %s {hint}"], capture_output=True, text=True, check=True
    )
    argument = shell.stdout
    parsed = parse_arguments([str(recipe), "--note", argument])
    assert load_hparams(parsed.hparams_file, parsed.overrides)["note"] == text


def test_the_exiting_wrapper_prints_usage_and_exits_with_status_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_arguments_or_exit([RECIPE, "--debug_batches", "x"], prog="train.py")
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        "usage: train.py HPARAMS_FILE [--RUN_OPTION [VALUE]]... [--KEY VALUE]...\n"
        "train.py: error: argument --debug_batches: expected an integer, got 'x'\n"
    )


def test_the_exiting_wrapper_returns_what_parse_arguments_returns() -> None:
    argv = [RECIPE, "--debug", "--lr", "1"]
    assert parse_arguments_or_exit(argv) == parse_arguments(argv)


# Help -----------------------------------------------------------------------------------------


def test_help_is_requested_with_the_help_text() -> None:
    with pytest.raises(HelpRequested) as caught:
        parse_arguments([RECIPE, "--help"], prog="train.py")
    assert caught.value.text == run_options_help("train.py")


def test_help_that_escapes_shows_the_help_in_its_message() -> None:
    with pytest.raises(HelpRequested) as caught:
        parse_arguments([RECIPE, "-h"], prog="train.py")
    assert str(caught.value).endswith("\n\n" + run_options_help("train.py"))
    assert str(caught.value).startswith("--help was given (parse_arguments_or_exit prints")


def test_the_exiting_wrapper_prints_help_and_exits_with_status_0(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_arguments_or_exit(["-h"], prog="train.py")
    assert caught.value.code == 0
    assert capsys.readouterr().out == run_options_help("train.py")


def test_help_lists_every_run_option_with_its_type_and_default() -> None:
    text = run_options_help("train.py")
    listed = set()
    for field in attrs.fields(RunOptions):
        lines = text.splitlines()
        heading = next(i for i, line in enumerate(lines) if line.split()[:1] == [f"--{field.name}"])
        assert lines[heading + 1].endswith(f"; default: {field.default!r}")
        listed.add(field.name)
    assert listed == RunOptions.names()
    assert "  --optimizer_step_limit INT|None\n      an integer or None; default: None\n" in text
    assert "  --debug\n      a flag (--name, or --name=true/false); default: False\n" in text


def test_every_run_option_has_a_description_from_the_docstring() -> None:
    descriptions = run_option_descriptions()
    assert set(descriptions) == RunOptions.names()
    assert all(descriptions.values())
    assert descriptions["nonfinite_patience"] == (
        "non-finite losses tolerated per epoch before NonFiniteLossError."
    )


def test_parsed_arguments_unpack_as_speechbrains_triple() -> None:
    hparams_file, run_opts, overrides = parse_arguments(["h.yaml", "--debug", "--lr", "0.5"])
    assert (hparams_file, run_opts, overrides) == (Path("h.yaml"), {"debug": True}, "lr: 0.5\n")


@pytest.mark.parametrize(
    "appended",
    [["--local-rank=1"], ["--local-rank", "1"], ["--local_rank=1"], ["--local_rank", "1"]],
    ids=["launch", "launch-spaced", "older-launch", "older-launch-spaced"],
)
def test_the_local_rank_torch_distributed_launch_appends_is_ignored(
    appended: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # python -m torch.distributed.launch adds it after the script's own arguments; it must not
    # become an override (load_hparams would refuse a key the file does not have).
    monkeypatch.setenv("LOCAL_RANK", "1")
    parsed = parse_arguments([RECIPE, "--lr", "0.5", *appended])
    assert parsed == parse_arguments([RECIPE, "--lr", "0.5"])
    assert parsed.overrides == "lr: 0.5\n"


def test_the_launchers_local_rank_is_ignored_without_local_rank_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert parse_arguments([RECIPE, "--local-rank=3"]).overrides == ""


def test_a_local_rank_that_is_not_the_environments_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ArgumentsError) as raised:
        parse_arguments([RECIPE, "--local-rank=1"])
    assert raised.value.argument == "--local-rank"
    assert "gives local rank 1, but the environment variable LOCAL_RANK is '0'" in str(raised.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--local-rank"], "expected the local rank (a number)"),
        (["--local_rank=first"], "expected the local rank, a number, got 'first'"),
    ],
)
def test_a_local_rank_without_a_number_is_an_error(
    arguments: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ArgumentsError, match=re.escape(message)):
        parse_arguments([RECIPE, *arguments])
