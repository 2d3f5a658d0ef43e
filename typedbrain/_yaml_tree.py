"""The YAML node tree of a hyperparameter file: override and placeholder checks, key lines.

Kept apart from :mod:`typedbrain._config` because it needs ``ruamel.yaml``, whose import adds
warning filters: :func:`~typedbrain.load_hparams` imports this module when it is first called,
so that ``import typedbrain`` changes no global state.
"""

from __future__ import annotations

import difflib
import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TextIO, final

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from typedbrain._config import (
    _INCLUDE,
    _PLACEHOLDER,
    KeyPath,
    _OverrideTree,
    format_key_path,
)
from typedbrain._errors import ConfigurationError, OverrideError, PlaceholderError
from typedbrain._options import RunOptions

__all__ = [
    "NamedStringIO",
    "check_overrides",
    "check_placeholders",
    "compose",
    "override_tree",
    "read_source",
    "record_locations",
]


@final
class NamedStringIO(io.StringIO):
    """YAML text for hyperpyyaml, with the file's name so that ``!include:`` finds its folder."""

    def __init__(self, text: str, name: str | None) -> None:
        super().__init__(text)
        if name is not None:
            self.name = name


def read_source(source: str | os.PathLike[str] | TextIO) -> tuple[str, str, Path | None]:
    """The text, a name for messages and the folder ``!include:`` paths are relative to."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise ConfigurationError(f"cannot read hyperparameter file {path}: {reason}") from error
        return text, str(path), path.resolve().parent
    text = source.read()
    name = getattr(source, "name", None)
    if isinstance(name, str) and Path(name).is_file():
        return text, name, Path(name).resolve().parent
    return text, "<stream>", None


def compose(text: str, name: str) -> MappingNode:
    """The document's node tree: its structure, tags and lines, with no tag run."""
    try:
        root = YAML(typ="rt").compose(text)
    except YAMLError as error:
        raise ConfigurationError(f"{name} is not valid YAML: {error}") from error
    if root is None:
        return MappingNode("tag:yaml.org,2002:map", [])
    if not isinstance(root, MappingNode):
        kind = "a sequence" if isinstance(root, SequenceNode) else "a single value"
        raise ConfigurationError(
            f"{name} must hold a mapping of hyperparameters (key: value lines), not {kind}"
        )
    return root


def _line(node: Node) -> int:
    line: int = node.start_mark.line
    return line + 1


def _items(node: MappingNode) -> Iterator[tuple[str, Node, Node]]:
    """A mapping node's (key text, key node, value node) triples, in order."""
    for key_node, value_node in node.value:
        if isinstance(key_node, ScalarNode):
            yield str(key_node.value), key_node, value_node


def override_tree(overrides: Mapping[str, object] | str | None) -> _OverrideTree:
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        root = _compose_overrides(overrides)
        return _tree_from_node(root) if root is not None else {}
    return _tree_from_mapping(overrides)


def _compose_overrides(text: str) -> MappingNode | None:
    try:
        root = YAML(typ="rt").compose(text)
    except YAMLError as error:
        raise ConfigurationError(f"the overrides are not valid YAML: {error}") from error
    if root is not None and not isinstance(root, MappingNode):
        raise ConfigurationError(
            f"the overrides must be a YAML mapping (key: value lines), got {text!r}"
        )
    return root


def _tree_from_node(node: MappingNode) -> _OverrideTree:
    return {
        key: _tree_from_node(value) if isinstance(value, MappingNode) else None
        for key, _, value in _items(node)
    }


def _tree_from_mapping(mapping: Mapping[str, object]) -> _OverrideTree:
    tree: _OverrideTree = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            tree[str(key)] = _tree_from_mapping(value)
        else:
            tree[str(key)] = None
    return tree


def _include_root(node: Node, folder: Path | None) -> tuple[MappingNode, str, Path | None] | None:
    """The composed document an ``!include:`` node names, or ``None`` if it cannot be read.

    An unreadable include is left for hyperpyyaml to report when it loads the file.
    """
    tag = node.tag or ""
    if not tag.startswith(_INCLUDE):
        return None
    path = Path(tag.removeprefix(_INCLUDE))
    if folder is not None:
        path = folder / path
    try:
        text = path.read_text(encoding="utf-8")
        root = YAML(typ="rt").compose(text)
    except (OSError, YAMLError):
        return None
    if not isinstance(root, MappingNode):
        return None
    resolved = path.resolve()
    try:
        name = str(resolved.relative_to(Path.cwd()))
    except ValueError:
        name = str(resolved)
    return root, name, resolved.parent


def check_overrides(
    tree: _OverrideTree,
    node: MappingNode,
    path: tuple[str, ...],
    source: str,
    folder: Path | None,
    *,
    parent_line: int | None = None,
    included: tuple[MappingNode, str, Path | None] | None = None,
) -> None:
    """Raise :class:`OverrideError` for the first override ``node`` cannot take."""
    own = {key: (key_node, value) for key, key_node, value in _items(node)}
    more: dict[str, tuple[Node, Node]] = {}
    if included is not None:
        more = {key: (key_node, value) for key, key_node, value in _items(included[0])}
    for key, subtree in tree.items():
        key_path = (*path, key)
        dotted = format_key_path(key_path)
        if key in own:
            key_node, value = own[key]
            where, where_folder = source, folder
        elif key in more and included is not None:
            key_node, value = more[key]
            where, where_folder = included[1], included[2]
        else:
            raise OverrideError(
                dotted,
                _unknown_key_message(key, path, [*own, *more]),
                source=source,
                line=parent_line,
            )
        if subtree is None:
            continue
        if not isinstance(value, MappingNode):
            raise OverrideError(
                dotted + "." + next(iter(subtree)) if subtree else dotted,
                f"{dotted!r} is not a mapping, so an override cannot set keys under it; "
                "give it a whole new value instead",
                source=where,
                line=_line(key_node),
            )
        check_overrides(
            subtree,
            value,
            key_path,
            where,
            where_folder,
            parent_line=_line(key_node),
            included=_include_root(value, where_folder),
        )


def _unknown_key_message(key: str, parent: tuple[str, ...], known: list[str]) -> str:
    if parent:
        message = f"{format_key_path(parent)!r} has no key {key!r}"
    else:
        message = f"no top-level key {key!r} (an override cannot add keys)"
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    elif not parent:
        options = difflib.get_close_matches(key, sorted(RunOptions.names()), n=1)
        if options:
            message += f"; did you mean the run option {options[0]!r}?"
    if "." in key and key.split(".", 1)[0] in known:
        head, tail = key.split(".", 1)
        message += (
            f"; a nested key is a nested mapping in overrides: {{{head!r}: {{{tail!r}: ...}}}}"
        )
    return message


def _placeholders(node: Node, path: KeyPath) -> Iterator[tuple[KeyPath, int]]:
    """Every ``!PLACEHOLDER`` node under ``node`` (key path, line), in document order."""
    if node.tag == _PLACEHOLDER:
        yield path, _line(node)
    elif isinstance(node, MappingNode):
        for key, _, value in _items(node):
            yield from _placeholders(value, (*path, key))
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            yield from _placeholders(item, (*path, index))


def _replaced(tree: _OverrideTree, path: KeyPath) -> bool:
    """Whether the overrides replace the value at ``path`` or one of its parents."""
    current: _OverrideTree | None = tree
    for part in path:
        if current is None:
            return True
        if not isinstance(part, str) or part not in current:
            return False
        current = current[part]
    return current is None


def check_placeholders(root: MappingNode, tree: _OverrideTree, source: str) -> None:
    for path, line in _placeholders(root, ()):
        if not _replaced(tree, path):
            raise PlaceholderError(format_key_path(path), source=source, line=line)


def record_locations(
    node: Node,
    path: KeyPath,
    source: str,
    folder: Path | None,
    out: dict[KeyPath, tuple[str, int]],
    *,
    depth: int,
) -> None:
    """Fill ``out`` with the file and line of every key and item under ``node``."""
    if depth > 32:  # an !include: cycle; hyperpyyaml reports it when it loads
        return
    included = _include_root(node, folder)
    if included is not None:
        record_locations(included[0], path, included[1], included[2], out, depth=depth + 1)
    if isinstance(node, MappingNode):
        for key, key_node, value in _items(node):
            out[(*path, key)] = (source, _line(key_node))
            record_locations(value, (*path, key), source, folder, out, depth=depth)
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            out[(*path, index)] = (source, _line(item))
            record_locations(item, (*path, index), source, folder, out, depth=depth)
