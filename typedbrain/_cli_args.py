"""A recipe's command line, SpeechBrain style: ``train.py hparams.yaml --run_option --key value``.

:func:`parse_arguments` splits a command line into the hyperparameter file, typed run options
and a YAML string of overrides for :func:`~typedbrain.load_hparams`. The run options it knows,
their types, defaults and ``--help`` descriptions all come from :class:`~typedbrain.RunOptions`.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal, NamedTuple, NoReturn, TypeAlias, cast, get_args, get_origin

import attrs

from typedbrain._errors import ArgumentsError, ConfigurationError, RunOptionsError
from typedbrain._options import RunOptions, RunOptionsDict

__all__ = [
    "HelpRequested",
    "ParsedArguments",
    "parse_arguments",
    "parse_arguments_or_exit",
    "run_option_descriptions",
    "run_options_help",
]

_NONE_WORDS: Final = frozenset({"None", "none", "null"})
_TRUE_WORDS: Final = frozenset({"true", "yes", "1"})
_FALSE_WORDS: Final = frozenset({"false", "no", "0"})
_PLAIN_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
# What ``python -m torch.distributed.launch`` appends to each process's command line (older
# releases spelt it with an underscore); the rank is read from the environment instead.
_LAUNCH_LOCAL_RANK: Final = frozenset({"local-rank", "local_rank"})

_Tree: TypeAlias = "dict[str, _Tree | str]"
"""Overrides by key path: nested mappings, with the YAML text of each value at the leaves."""


class ParsedArguments(NamedTuple):
    """A parsed command line; unpacks as SpeechBrain's triple.

    ``hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])`` works as in a
    SpeechBrain recipe, each name with its own type.

    Attributes:
        hparams_file: the hyperparameter file (the first positional argument).
        run_opts: the run options given, each parsed to its declared type; options not given
            are absent, so that keys of the hparams file can set them.
        overrides: every other ``--key value`` as a YAML string, for
            :func:`~typedbrain.load_hparams`; empty when there are none.
    """

    hparams_file: Path
    run_opts: RunOptionsDict
    overrides: str


class HelpRequested(Exception):  # noqa: N818 - a request, not an error
    """``--help`` (or ``-h``) was on the command line; :attr:`text` is the help to show.

    :func:`parse_arguments_or_exit` prints it and exits with status 0.

    Attributes:
        text: the help: usage, every run option with its type, default and description, and
            how overrides are written.
    """

    def __init__(self, text: str) -> None:
        # The message carries the help, so that a script that lets the exception escape (a
        # ported recipe calling parse_arguments) still shows it, below the traceback.
        super().__init__(
            "--help was given (parse_arguments_or_exit prints this and exits instead); the "
            f"help:\n\n{text}"
        )
        self.text = text


def parse_arguments(argv: Sequence[str], *, prog: str | None = None) -> ParsedArguments:
    """Parse a recipe's command line (without the program name, like ``sys.argv[1:]``).

    - The first positional argument is the hyperparameter file.
    - ``--name value`` and ``--name=value`` set a run option or override a key.
    - A run option's value is parsed to its declared type (``--optimizer_step_limit 5`` gives
      the integer 5; ``None`` where ``None`` is allowed) and checked like any run option.
    - Boolean run options are flags: ``--debug`` sets ``debug`` to true; ``--debug=false``
      (or ``=true``) sets it explicitly.
    - ``*_module_keys`` take one or more names: ``--compile_module_keys encoder decoder`` or
      ``--compile_module_keys=encoder,decoder``.
    - Any other ``--key value`` becomes a YAML override: the value is YAML (numbers stay numbers,
      ``!ref <lr>`` works, an ``=`` in it is kept) and a dotted key sets a nested key
      (``--model.hidden_size 64``). Given twice, the last one wins. A value that is not one
      YAML value (``a: b``), or that YAML would read with a comment (``run #2``, whose ``#2``
      YAML drops), is refused with the quoted form that passes it as a string.
    - ``--local-rank N`` (or ``--local_rank N``, with or without ``=``), which
      ``python -m torch.distributed.launch`` appends to each process's arguments, is accepted
      and ignored: the rank comes from the environment (``LOCAL_RANK``), as under ``torchrun``.
      When ``LOCAL_RANK`` is set to another number, the command line is refused.

    Args:
        argv: the arguments.
        prog: the program name shown by ``--help`` (default: ``sys.argv[0]``'s name).

    Raises:
        ArgumentsError: no hparams file, more than one, a missing value, a value that does
            not parse (or holds a YAML comment), a run option out of range, or a
            ``--local-rank`` that is not the environment's ``LOCAL_RANK``; the message names
            the argument. Or ``argv`` is not a list of strings (one string, say).
        HelpRequested: ``--help`` or ``-h`` was given.
    """
    _check_argv(argv)
    options = {field.name: field for field in attrs.fields(RunOptions)}
    positionals: list[str] = []
    run_opts: dict[str, object] = {}
    overrides: _Tree = {}
    key_lists: list[tuple[str, list[str]]] = []  # key-list options and the words they took
    index = 0
    only_positionals = False
    while index < len(argv):
        token = argv[index]
        index += 1
        if only_positionals or not token.startswith("-") or token == "-":
            positionals.append(token)
            continue
        if token == "--":
            only_positionals = True
            continue
        if token in ("-h", "--help"):
            raise HelpRequested(run_options_help(prog))
        if not token.startswith("--"):
            raise ArgumentsError(token, "unknown option (options are written --name)")
        name, has_inline, inline = token[2:].partition("=")
        argument = f"--{name}"
        if not name:
            raise ArgumentsError(token, "expected a name after --")
        if name in _LAUNCH_LOCAL_RANK:
            if has_inline:
                text = inline
            elif index < len(argv) and not argv[index].startswith("--"):
                text = argv[index]
                index += 1
            else:
                raise ArgumentsError(argument, "expected the local rank (a number)")
            _check_local_rank(argument, text)
            continue
        field = options.get(name)
        if field is not None and field.type is bool:
            run_opts[name] = _parse_flag(argument, inline) if has_inline else True
        elif field is not None and _is_key_list(field.type):
            if has_inline:
                values = [inline]
            else:
                values = []
                while index < len(argv) and not argv[index].startswith("--"):
                    values.append(argv[index])
                    index += 1
                key_lists.append((argument, values))
            run_opts[name] = _parse_keys(argument, values)
        else:
            if has_inline:
                text = inline
            elif index < len(argv) and not argv[index].startswith("--"):
                text = argv[index]
                index += 1
            elif field is not None:
                raise ArgumentsError(argument, "expected a value")
            else:
                raise ArgumentsError(
                    argument,
                    f"expected a value: {name!r} is not a run option, so it overrides the "
                    f"hyperparameter {name!r}, which needs one ({argument} VALUE)",
                )
            if field is not None:
                run_opts[name] = _parse_value(argument, text, field.type)
            else:
                _add_override(overrides, argument, name, text)
    _check_run_options(run_opts)
    return ParsedArguments(
        hparams_file=Path(_one_file(positionals, run_opts, key_lists)),
        run_opts=cast(RunOptionsDict, run_opts),  # every key and value was checked above
        overrides=_dump(overrides),
    )


def _check_argv(argv: object) -> None:
    """Refuse an ``argv`` that is not a list of strings: one string would be read by letter.

    Raises:
        ArgumentsError: it is not; the message says what to pass.
    """
    if isinstance(argv, str | bytes) or not isinstance(argv, Sequence):
        raise ArgumentsError(
            None,
            "argv must be a list of the arguments, such as sys.argv[1:] (or "
            f"shlex.split(line) for one command line), not {type(argv).__name__} {argv!r}",
        )
    for token in argv:
        if not isinstance(token, str):
            raise ArgumentsError(
                None,
                f"argv must be a list of strings, such as sys.argv[1:], but holds "
                f"{type(token).__name__} {token!r}",
            )


def parse_arguments_or_exit(
    argv: Sequence[str] | None = None, *, prog: str | None = None
) -> ParsedArguments:
    """:func:`parse_arguments`, for a script's entry point, with argparse's conventions.

    ``--help`` prints the help to standard output and exits with status 0; a bad command line
    prints the usage and the error to standard error and exits with status 2.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        prog: the program name for the usage line (default: ``sys.argv[0]``'s name).
    """
    arguments = sys.argv[1:] if argv is None else argv
    try:
        return parse_arguments(arguments, prog=prog)
    except HelpRequested as request:
        sys.stdout.write(request.text)
        raise SystemExit(0) from None
    except ConfigurationError as error:
        _exit_with_error(prog, str(error))


def run_options_help(prog: str | None = None) -> str:
    """The ``--help`` text: usage, every run option with its type, default and description."""
    name = _prog(prog)
    lines = [
        _usage(name),
        "",
        "Run a recipe with the hyperparameters in HPARAMS_FILE (HyperPyYAML).",
        "",
        "positional arguments:",
        "  HPARAMS_FILE  the hyperparameter file (a recipe's YAML is code: trust it as a script)",
        "",
        "options:",
        "  -h, --help  show this help and exit",
        "",
        "run options (they override keys of the same name in HPARAMS_FILE):",
    ]
    descriptions = run_option_descriptions()
    for field in attrs.fields(RunOptions):
        metavar = _metavar(field.type)
        lines.append(f"  --{field.name}{' ' + metavar if metavar else ''}")
        lines.append(f"      {_type_words(field.type)}; default: {field.default!r}")
        description = descriptions.get(field.name, "")
        lines.extend(
            textwrap.wrap(description, width=92, initial_indent=" " * 6, subsequent_indent=" " * 6)
        )
    lines += [
        "",
        "overrides (any other --KEY):",
        "  --KEY VALUE, --KEY=VALUE",
        "      set KEY in HPARAMS_FILE to VALUE, read as YAML (numbers stay numbers, !ref works);",
        "      --model.hidden_size 64 sets a nested key; only keys HPARAMS_FILE has can be set",
        "",
    ]
    return "\n".join(lines)


def run_option_descriptions() -> dict[str, str]:
    """Each run option's description, from the Attributes section of ``RunOptions``' docstring.

    Markup is removed (``:class:`~typedbrain.X``` becomes ``X``); an option the docstring does
    not describe is absent.
    """
    doc = inspect.cleandoc(RunOptions.__doc__ or "")
    section = doc.partition("\nAttributes:\n")[2]
    descriptions: dict[str, str] = {}
    current: str | None = None
    for line in section.splitlines():
        entry = re.fullmatch(r" {4}(\w+): (.*)", line)
        if entry:
            current = entry.group(1)
            descriptions[current] = entry.group(2)
        elif current is not None and line.startswith(" " * 8):
            descriptions[current] += " " + line.strip()
        elif line.strip():
            break
    return {key: _plain(text) for key, text in descriptions.items()}


def _plain(text: str) -> str:
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"\1", text)
    return text.replace("``", "")


def _prog(prog: str | None) -> str:
    return prog or Path(sys.argv[0]).name or "train.py"


def _usage(prog: str) -> str:
    return f"usage: {prog} HPARAMS_FILE [--RUN_OPTION [VALUE]]... [--KEY VALUE]..."


def _exit_with_error(prog: str | None, message: str) -> NoReturn:
    name = _prog(prog)
    sys.stderr.write(f"{_usage(name)}\n{name}: error: {message}\n")
    raise SystemExit(2)


def _arms(tp: object) -> tuple[object, ...]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        return get_args(tp)
    return (tp,)


def _is_key_list(tp: object) -> bool:
    return any(get_origin(arm) is tuple for arm in _arms(tp))


def _metavar(tp: object) -> str:
    if tp is bool:
        return ""
    parts: list[str] = []
    for arm in _arms(tp):
        if arm is type(None):
            parts.append("None")
        elif get_origin(arm) is Literal:
            parts.append("{" + ",".join(str(choice) for choice in get_args(arm)) + "}")
        elif get_origin(arm) is tuple:
            parts.append("NAME...")
        else:
            parts.append(getattr(arm, "__name__", str(arm)).upper())
    return "|".join(parts)


def _type_words(tp: object) -> str:
    words: list[str] = []
    for arm in _arms(tp):
        if arm is bool:
            words.append("a flag (--name, or --name=true/false)")
        elif arm is int:
            words.append("an integer")
        elif arm is float:
            words.append("a number")
        elif arm is str:
            words.append("a string")
        elif arm is type(None):
            words.append("None")
        elif get_origin(arm) is Literal:
            words.append("one of " + ", ".join(str(choice) for choice in get_args(arm)))
        elif get_origin(arm) is tuple:
            words.append("module names")
    return " or ".join(words)


def _parse_flag(argument: str, text: str) -> bool:
    if text.lower() in _TRUE_WORDS:
        return True
    if text.lower() in _FALSE_WORDS:
        return False
    raise ArgumentsError(argument, f"expected true or false, got {text!r}")


def _parse_keys(argument: str, values: list[str]) -> tuple[str, ...] | None:
    if len(values) == 1 and values[0] in _NONE_WORDS:
        return None
    names = tuple(name for value in values for name in value.split(",") if name)
    if not names:
        raise ArgumentsError(
            argument,
            f"expected one or more module names ({argument} a b or {argument}=a,b), or None; "
            "got none",
        )
    return names


def _parse_value(argument: str, text: str, tp: object) -> object:
    arms = _arms(tp)
    if type(None) in arms and text in _NONE_WORDS:
        return None
    for arm in arms:
        if arm is int:
            if re.fullmatch(r"[+-]?\d+", text.strip()):
                return int(text)
        elif arm is float:
            try:
                return float(text)
            except ValueError:
                pass
        elif arm is str or (get_origin(arm) is Literal and text in get_args(arm)):
            return text
    raise ArgumentsError(argument, f"expected {_type_words(tp)}, got {text!r}")


def _check_local_rank(argument: str, text: str) -> None:
    """Check the local rank a launcher put on the command line against ``$LOCAL_RANK``."""
    if not text.isdecimal():
        raise ArgumentsError(argument, f"expected the local rank, a number, got {text!r}")
    environment = os.environ.get("LOCAL_RANK")
    if environment is not None and not (
        environment.strip().isdecimal() and int(environment) == int(text)
    ):
        raise ArgumentsError(
            argument,
            f"gives local rank {int(text)}, but the environment variable LOCAL_RANK is "
            f"{environment!r}: typedbrain takes the rank from the environment, and the two "
            "must agree (is the command line copied from another process?)",
        )


def _check_run_options(run_opts: dict[str, object]) -> None:
    try:
        RunOptions.from_sources(None, run_opts)
    except RunOptionsError as error:
        message = str(error).removeprefix(f"run option {error.key!r}: ")
        # Every value here came from the command line: where each came from says nothing.
        message = re.sub(r" \((?:\w+ )?from run_opts(?:, \w+ from run_opts)*\)$", "", message)
        raise ArgumentsError(f"--{error.key}", message) from None


def _one_file(
    positionals: list[str], run_opts: dict[str, object], key_lists: list[tuple[str, list[str]]]
) -> str:
    if not positionals:
        hint = ""
        if key_lists and key_lists[-1][1]:  # the last module-key list may have taken the file
            argument, values = key_lists[-1]
            hint = (
                f"; {argument} took {', '.join(map(repr, values))} as its module keys: give the "
                f"hparams file first, or end the keys with -- ({argument} {values[0]} -- "
                "hparams.yaml)"
            )
        raise ArgumentsError(
            None, f"the hparams file is required (the first positional argument){hint}"
        )
    if len(positionals) > 1:
        extra = positionals[1]
        hint = ""
        # A flag's "value" taken as a positional: after the file (recipe.yaml --debug false),
        # or before it (--debug false recipe.yaml, where it was taken as the file).
        if any(word.lower() in _TRUE_WORDS | _FALSE_WORDS for word in positionals[:2]) and any(
            value is True for value in run_opts.values()
        ):
            hint = "; boolean run options are flags: write --name=false, not --name false"
        raise ArgumentsError(
            None, f"unexpected argument {extra!r}: only one hparams file can be given{hint}"
        )
    return positionals[0]


def _add_override(tree: _Tree, argument: str, name: str, text: str) -> None:
    parts = name.split(".")
    if not all(parts):
        raise ArgumentsError(argument, "an empty key in a dotted name")
    _check_yaml_value(argument, text)
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if isinstance(child, str):
            above = "--" + ".".join(parts[: depth + 1])
            raise ArgumentsError(argument, f"conflicts with {above}, which sets the whole value")
        node = child
    if isinstance(node.get(parts[-1]), dict):
        raise ArgumentsError(argument, f"conflicts with the {argument}.* overrides given before")
    node[parts[-1]] = text


def _check_yaml_value(argument: str, text: str) -> None:
    # Imported here: importing ruamel.yaml adds warning filters, and importing typedbrain must
    # change nothing global.
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError
    from ruamel.yaml.nodes import MappingNode

    entry = _entry("key", text, 0)
    try:
        root = YAML(typ="rt").compose(entry)
        comment = _first_comment(entry)
    except YAMLError:
        root, comment = None, None
    quoted = "'" + text.replace("'", "''") + "'"  # YAML's single quotes double a quote
    shell = re.sub(r'(["\\$`])', r"\\\1", quoted)  # escaped for a shell's double quotes
    if not isinstance(root, MappingNode) or len(root.value) != 1:
        raise ArgumentsError(
            argument,
            f'{text!r} is not a YAML value; quote it to pass it as a string ({argument} "{shell}")',
        )
    if comment is not None:
        raise ArgumentsError(
            argument,
            f"YAML reads {comment!r} in {text!r} as a comment and would drop it: leave the "
            f'comment out, or quote the value to pass it whole as a string ({argument} "{shell}")',
        )


def _first_comment(document: str) -> str | None:
    """The first comment of a YAML ``document`` (without its line end), if it has one.

    Raises:
        YAMLError: ``document`` is not YAML.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.tokens import CommentToken

    def first(found: object) -> CommentToken | None:
        # The round-trip scanner hangs comments on the tokens, in lists nested by position.
        if isinstance(found, CommentToken):
            return found
        if isinstance(found, list | tuple):
            return next((c for c in map(first, found) if c is not None), None)
        return None

    for token in YAML(typ="rt").scan(document):
        comment = first(token) if isinstance(token, CommentToken) else first(token.comment)
        if comment is not None:
            return str(comment.value).strip()
    return None


def _key(name: str) -> str:
    if _PLAIN_KEY.fullmatch(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _entry(name: str, text: str, indent: int) -> str:
    pad = " " * indent
    if "\n" not in text:
        return f"{pad}{_key(name)}: {text}".rstrip() + "\n"
    body = textwrap.indent(text, pad + "  ")
    return f"{pad}{_key(name)}:\n{body}".rstrip() + "\n"


def _dump(tree: _Tree, indent: int = 0) -> str:
    text = ""
    for name, value in tree.items():
        if isinstance(value, str):
            text += _entry(name, value, indent)
        else:
            text += f"{' ' * indent}{_key(name)}:\n{_dump(value, indent + 2)}"
    return text
