"""Loading HyperPyYAML hyperparameter files, with overrides checked against the file first.

:func:`load_hparams` reads a recipe's YAML with every HyperPyYAML tag (``hyperpyyaml`` builds
the objects). Before any object is built, the file is composed into a node tree (no tag runs)
and every override is checked against it: an override of a key the file does not have, at any
depth, is an :class:`~typedbrain.OverrideError` naming the key path and the line of its nearest
existing parent, and a ``!PLACEHOLDER`` left without a value is a
:class:`~typedbrain.PlaceholderError`. The loaded mapping remembers where each key was written,
so :func:`~typedbrain.structure_hparams` can point at lines too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TextIO, TypeAlias, final

from typedbrain._errors import ConfigurationError
from typedbrain._options import RunOptions

__all__ = ["KeyPath", "LoadedHparams", "format_key_path", "load_hparams", "split_run_options"]

KeyPath: TypeAlias = tuple[str | int, ...]
"""Where a value sits in a document: mapping keys and sequence indices from the top."""

_OverrideTree: TypeAlias = "dict[str, _OverrideTree | None]"
"""The keys an override sets: a nested mapping's keys, with ``None`` for a replaced value."""

_INCLUDE = "!include:"
_PLACEHOLDER = "!PLACEHOLDER"


def format_key_path(path: KeyPath) -> str:
    """Write a key path the way messages show it: ``model.hidden_size``, ``layers[2]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


@final
class LoadedHparams(dict[str, object]):
    """A loaded hyperparameter mapping that remembers where each key was written.

    It is a plain ``dict`` in every other respect; :func:`load_hparams` returns one, and
    :func:`~typedbrain.structure_hparams` uses :attr:`locations` to name files and lines.

    Args:
        values: the loaded hyperparameters.
        source: the name of the file they were loaded from.
        locations: key path -> (file, 1-based line) for every key the files wrote.
    """

    __slots__ = ("locations", "source")

    def __init__(
        self,
        values: Mapping[str, object],
        *,
        source: str,
        locations: Mapping[KeyPath, tuple[str, int]],
    ) -> None:
        super().__init__(values)
        self.source = source
        self.locations = locations


def load_hparams(
    source: str | os.PathLike[str] | TextIO,
    overrides: Mapping[str, object] | str | None = None,
) -> LoadedHparams:
    """Load a HyperPyYAML file, after checking the overrides against it.

    Every HyperPyYAML tag works (``!new:``, ``!name:``, ``!apply:``, ``!ref``, ``!copy``,
    ``!include:``, ``!PLACEHOLDER``...): loading is delegated to
    ``hyperpyyaml.load_hyperpyyaml``. A recipe file is code: its tags import and call Python,
    so load only files you trust as you would a script.

    Overrides replace values of the file before any object is built. They can only change keys
    the file has, at any depth (hyperpyyaml itself would silently add a nested key it does not
    know); a nested mapping without a tag in an override merges into the file's mapping, and
    anything else, a tagged mapping (``!new:torch.nn.Identity {}``) included, replaces the
    value whole.

    An empty file (or one with only comments) gives an empty mapping.

    Args:
        source: a path to the file, or an open text stream (``io.StringIO`` for YAML held in a
            string; messages name it by its ``name``, if it has one). ``!include:`` paths are
            relative to the file's folder (to the working folder for a stream whose ``name``
            is not a file).
        overrides: a (nested) mapping, or a YAML string holding one (what
            :func:`~typedbrain.parse_arguments` produces).

    Returns:
        The hyperparameters, top-level keys starting with ``__`` left out (a
        :class:`LoadedHparams`, which also records each key's file and line).

    Raises:
        OverrideError: an override names a key the file does not have, or sets keys under a
            value that is not a mapping.
        PlaceholderError: a ``!PLACEHOLDER`` is left without a value.
        ConfigurationError: ``source`` is neither a path nor a text stream, the file or the
            overrides are not valid YAML, the file does not hold a mapping, one of its
            top-level keys is not a string, or an override value is not plain YAML data.
    """
    # Imported here, not at the top: importing ruamel.yaml (which hyperpyyaml uses) adds warning
    # filters, and importing typedbrain must change nothing global.
    import hyperpyyaml

    from typedbrain import _yaml_tree as tree_check

    text, name, folder = tree_check.read_source(source)
    root, tree = tree_check.checked_document(text, overrides, name, folder)
    tree_check.check_placeholders(root, tree, name)
    if not root.value:  # an empty file, or one with comments only
        return LoadedHparams({}, source=name, locations={})
    locations: dict[KeyPath, tuple[str, int]] = {}
    tree_check.record_locations(root, (), name, folder, locations, depth=0)

    # The overrides are applied here rather than by hyperpyyaml, whose merge would keep the
    # old tag of a mapping that a tagged override replaces.
    stream = tree_check.NamedStringIO(
        tree_check.apply_overrides(text, overrides), name if folder is not None else None
    )
    try:
        loaded = hyperpyyaml.load_hyperpyyaml(stream)
    except Exception as error:
        path = tree_check.building_key(error.__traceback__)
        error.add_note(_building_note(path, name, locations))
        raise
    values: dict[str, object] = dict(loaded or {})
    return LoadedHparams(values, source=name, locations=locations)


def _building_note(path: KeyPath, source: str, locations: Mapping[KeyPath, tuple[str, int]]) -> str:
    """Where loading failed: the key whose value was being built, with its file and line."""
    if not path:
        return f"while loading hyperparameters from {source}"
    for end in range(len(path), 0, -1):
        if path[:end] in locations:
            file, line = locations[path[:end]]
            return f"while building {format_key_path(path)!r} ({file}, line {line})"
    return f"while building {format_key_path(path)!r} (in {source})"


def split_run_options(loaded: Mapping[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """Split loaded hyperparameters into (run option values, everything else).

    A key named like a run option (``precision``, ``debug``...) is a run option: give the first
    mapping to :meth:`RunOptions.from_sources` as its ``hparams`` (or pass the whole loaded mapping
    as a brain's ``hparams``, which does the same), and the second to
    :func:`~typedbrain.structure_hparams`. The second keeps :class:`LoadedHparams`' locations.

    Raises:
        ConfigurationError: ``loaded`` is not a mapping (what :func:`load_hparams` returns).
    """
    if not isinstance(loaded, Mapping):
        raise ConfigurationError(
            "split_run_options takes the loaded hyperparameters, a mapping such as "
            f"load_hparams' result, got {type(loaded).__name__} {loaded!r}"
        )
    names = RunOptions.names()
    options = {key: value for key, value in loaded.items() if key in names}
    rest = {key: value for key, value in loaded.items() if key not in names}
    if isinstance(loaded, LoadedHparams):
        return options, LoadedHparams(rest, source=loaded.source, locations=loaded.locations)
    return options, rest
