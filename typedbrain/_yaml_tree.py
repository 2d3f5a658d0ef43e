"""The YAML of a hyperparameter file: override and placeholder checks, key lines, overrides.

Kept apart from :mod:`typedbrain._config` because it needs ``ruamel.yaml``, whose import adds
warning filters: :func:`~typedbrain.load_hparams` imports this module when it is first called,
so that ``import typedbrain`` changes no global state.
"""

from __future__ import annotations

import difflib
import io
import itertools
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import Final, TextIO, TypeGuard, final

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, TaggedScalar
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.representer import RepresenterError

from typedbrain._config import (
    _INCLUDE,
    _PLACEHOLDER,
    KeyPath,
    _OverrideTree,
    format_key_path,
)
from typedbrain._errors import ConfigurationError, OverrideError, PlaceholderError
from typedbrain._options import RunOptions

_MAP_TAG: Final = "tag:yaml.org,2002:map"
_STR_TAG: Final = "tag:yaml.org,2002:str"
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_KINDS: Final = {
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:timestamp": "a date",
}

__all__ = [
    "NamedStringIO",
    "apply_overrides",
    "building_key",
    "check_overrides",
    "check_placeholders",
    "check_references",
    "checked_document",
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
        except UnicodeDecodeError as error:
            raise ConfigurationError(
                f"cannot read hyperparameter file {path}: it is not UTF-8 text ({error.reason} "
                f"at byte {error.start})"
            ) from error
        return text, str(path), path.resolve().parent
    if not callable(getattr(source, "read", None)):
        raise ConfigurationError(
            "the hyperparameter source must be a path (a str or os.PathLike) or an open text "
            f"stream, got {type(source).__name__} {source!r}"
        )
    text = source.read()
    name = getattr(source, "name", None)
    if not isinstance(text, str):
        raise ConfigurationError(
            f"the hyperparameter stream {name if isinstance(name, str) else source!r} gave "
            f"{type(text).__name__}, not text: open it in text mode (encoding='utf-8')"
        )
    if isinstance(name, str) and Path(name).is_file():
        return text, name, Path(name).resolve().parent
    return text, name if isinstance(name, str) and name else "<stream>", None


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
    for key_node, _ in root.value:
        if key_node.tag not in (_STR_TAG, _MERGE_TAG):
            raise ConfigurationError(
                f"top-level key {_key_text(key_node)} ({name}:{_line(key_node)}) is "
                f"{_kind(key_node)}, not a string: hyperparameter names are strings "
                "(quote the key to make it one)"
            )
    _check_unique_keys(root, name)
    _check_no_reference_cycle(root, name)
    return root


_REFERENCE_TAGS: Final = frozenset({"!ref", "!copy"})
_REFERENCE: Final = re.compile(r"<([^<>]+)>")


def _check_no_reference_cycle(root: MappingNode, name: str) -> None:
    """Refuse ``!ref`` / ``!copy`` references that lead back to themselves.

    hyperpyyaml would fail on them with a ``RecursionError`` or an unrelated error, naming no
    key. It resolves a reference through the top-level key it names, whole: ``<sizes.a>``
    depends on every reference under ``sizes``, so one under ``sizes`` that names
    ``<sizes.a>`` leads back to itself too.
    """
    references = {
        path: (
            [
                target.replace("[", ".").replace("]", "").strip()
                for target in _REFERENCE.findall(str(node.value))
            ],
            _line(node),
        )
        for node, path in _nodes(root)
        if isinstance(node, ScalarNode) and str(node.tag) in _REFERENCE_TAGS
    }

    def depends(target: str, path: str) -> bool:
        return target.split(".", 1)[0] == path.split(".", 1)[0]

    edges = {
        path: [other for target in targets for other in references if depends(target, other)]
        for path, (targets, _) in references.items()
    }
    state: dict[str, int] = {}  # 1: on the current walk, 2: done
    for start, first in edges.items():
        if state.get(start) == 2:
            continue
        state[start] = 1
        walk = [(start, iter(first))]
        trail = [start]
        while walk:
            current, following = walk[-1]
            step = next(following, None)
            if step is None:
                walk.pop()
                trail.pop()
                state[current] = 2
            elif state.get(step) == 1:
                cycle = [*trail[trail.index(step) :], step]
                shown = " -> ".join(f"{key} (line {references[key][1]})" for key in cycle)
                raise ConfigurationError(f"the references in {name} form a cycle: {shown}")
            elif state.get(step) != 2:
                state[step] = 1
                walk.append((step, iter(edges[step])))
                trail.append(step)


def _nodes(root: Node) -> Iterator[tuple[Node, str]]:
    """Every node of the tree once, with its key path (``model.size``, a list item's index).

    An alias's node is visited once, where it was anchored.
    """
    pending: list[tuple[Node, str]] = [(root, "")]
    visited: set[int] = set()
    while pending:
        node, path = pending.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        yield node, path
        if isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode) and key_node.tag != _MERGE_TAG:
                    key = str(key_node.value)
                    pending.append((value_node, f"{path}.{key}" if path else key))
                else:  # a merge key's mappings: their keys are the mapping's own
                    pending.append((value_node, path))
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                pending.append((item, f"{path}.{index}" if path else str(index)))


def _check_unique_keys(root: Node, name: str) -> None:
    """Refuse a mapping, anywhere in the tree, that has a key twice (YAML forbids it)."""
    for node, _ in _nodes(root):
        if not isinstance(node, MappingNode):
            continue
        lines: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = (str(key_node.tag), str(key_node.value))
            if key in lines:
                raise ConfigurationError(
                    f"key {_key_text(key_node)} appears twice in one mapping of {name} "
                    f"(lines {lines[key]} and {_line(key_node)}); YAML keys are unique"
                )
            lines[key] = _line(key_node)


def _key_text(node: Node) -> str:
    if isinstance(node, ScalarNode):
        return repr(str(node.value))
    return "[...]" if isinstance(node, SequenceNode) else "{...}"


def _kind(node: Node) -> str:
    if isinstance(node, SequenceNode):
        return "a sequence"
    if isinstance(node, MappingNode):
        return "a mapping"
    return _KINDS.get(str(node.tag), f"tagged {node.tag}")


def _line(node: Node) -> int:
    line: int = node.start_mark.line
    return line + 1


def _items(node: MappingNode) -> Iterator[tuple[str, Node, Node]]:
    """A mapping node's (key text, key node, value node) triples, in order."""
    for key_node, value_node in node.value:
        if isinstance(key_node, ScalarNode):
            yield str(key_node.value), key_node, value_node


def checked_document(
    text: str, overrides: Mapping[str, object] | str | None, name: str, folder: Path | None
) -> tuple[MappingNode, _OverrideTree]:
    """The document's node tree and the overrides' tree, once every override fits the document.

    Raises:
        ConfigurationError: the document or the overrides are not valid YAML mappings, or a
            ``!ref`` / ``!copy`` names a key they do not have (see :func:`check_references`).
        OverrideError: an override names a key the document does not have (see
            :func:`check_overrides`).
    """
    root = compose(text, name)
    tree = override_tree(overrides)
    check_overrides(tree, root, (), name, folder)
    check_references(root, tree, text, overrides, name)
    return root, tree


def override_tree(overrides: Mapping[str, object] | str | None) -> _OverrideTree:
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        root = _compose_overrides(overrides)
        return _tree_from_node(root) if root is not None else {}
    if not isinstance(overrides, Mapping):
        raise ConfigurationError(
            "overrides must be a mapping or a YAML string holding one, got "
            f"{type(overrides).__qualname__} {overrides!r}"
        )
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
        key: _tree_from_node(value)
        if isinstance(value, MappingNode) and value.tag == _MAP_TAG
        else None
        for key, _, value in _items(node)
    }


def _tree_from_mapping(mapping: Mapping[str, object]) -> _OverrideTree:
    tree: _OverrideTree = {}
    for key, value in mapping.items():
        if _merges(value):
            tree[str(key)] = _tree_from_mapping(value)
        else:
            tree[str(key)] = None
    return tree


def _merges(value: object) -> TypeGuard[Mapping[str, object]]:
    """Whether an override value merges into the document's value: a mapping with no tag.

    A tagged mapping (``!new:torch.nn.Identity {}``) is a new object, so it replaces the value.
    """
    if not isinstance(value, Mapping):
        return False
    tag = getattr(getattr(value, "tag", None), "value", None)  # ruamel's round-trip mappings
    return tag is None or tag == _MAP_TAG


def apply_overrides(text: str, overrides: Mapping[str, object] | str | None) -> str:
    """The document's YAML text with the overrides applied: tags are kept and nothing runs.

    A mapping with no tag in the overrides merges into the document's mapping, key by key;
    any other value, a tagged mapping (``!new:torch.nn.Identity {}``) included, replaces the
    document's value whole. (HyperPyYAML's own override step would merge a tagged mapping into
    the old one, keeping the old tag.)

    Raises:
        ConfigurationError: the document or the overrides are not a YAML mapping.
    """
    if not overrides:
        return text
    yaml = YAML()  # round trip, as HyperPyYAML reads a document before it resolves references
    try:
        document = yaml.load(text)
        values = yaml.load(overrides) if isinstance(overrides, str) else overrides
    except YAMLError as error:
        raise ConfigurationError(
            f"the hyperparameters or the overrides are not valid YAML: {error}"
        ) from error
    if values is None:
        return text
    if not isinstance(document, MutableMapping) or not isinstance(values, Mapping):
        raise ConfigurationError(
            "overrides apply to a YAML mapping of hyperparameters and must be one themselves, "
            f"got {type(values).__name__} overrides for a {type(document).__name__} document"
        )
    _merge(document, values)
    out = io.StringIO()
    try:
        yaml.dump(document, out)
    except RepresenterError as error:
        found = _unwritable(yaml, values, ())
        # The value's repr, not ruamel's text for it, which differs between its versions.
        what = (
            f"override {format_key_path(found[0])!r}: cannot represent an object: {found[1]!r}"
            if found is not None
            else str(error)
        )
        raise ConfigurationError(
            f"{what}; override values must be plain YAML data (strings, numbers, "
            "booleans, None, lists, mappings): write str(value) for a path, say"
        ) from error
    return out.getvalue()


def _unwritable(yaml: YAML, value: object, path: KeyPath) -> tuple[KeyPath, object] | None:
    """The key path and value of the first override value YAML cannot write, if one is found."""
    if isinstance(value, Mapping):
        items: list[tuple[str | int, object]] = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        items = list(enumerate(value))
    else:
        try:
            yaml.dump([value], io.StringIO())
        except RepresenterError:
            return path, value
        return None
    for part, item in items:
        found = _unwritable(yaml, item, (*path, part))
        if found is not None:
            return found
    return None


def _merge(document: MutableMapping[object, object], overrides: Mapping[str, object]) -> None:
    for text, value in overrides.items():
        key = _document_key(document, text)
        current = document.get(key)
        if _merges(value) and isinstance(current, TaggedScalar) and _is_include(current.tag):
            # A bare `!include:file.yaml`: the keys set under it become the mapping that
            # hyperpyyaml hands to the included file as its overrides.
            keys = CommentedMap()
            keys.yaml_set_ctag(current.tag)
            _merge(keys, value)
            document[key] = keys
        elif _merges(value) and isinstance(current, MutableMapping):
            _merge(current, value)
        else:
            document[key] = value


def _is_include(tag: object) -> bool:
    """Whether a node's or a round-trip value's tag is an ``!include:``."""
    text = getattr(tag, "value", tag)  # ruamel's Tag objects, or the tag's text
    return isinstance(text, str) and text.startswith(_INCLUDE)


def _document_key(document: Mapping[object, object], text: str) -> object:
    """The document's key that an override key names: ``text``, or the key YAML reads from it.

    An override's keys are strings (``--weights.1`` gives ``"1"``): one names a number, bool or
    null key written as ``text`` rather than adding a second key beside it.
    """
    if text in document:
        return text
    try:
        typed: object = YAML(typ="safe").load(text)
    except YAMLError:
        return text
    kind = _scalar_kind(typed)
    if kind is not None:
        for key in document:
            if _scalar_kind(key) == kind and key == typed:
                return key
    return text


def _scalar_kind(value: object) -> str | None:
    """The kind of a scalar key: bool, number or null (``None`` for anything else).

    A round-trip document's keys are subclasses of those types.
    """
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else None


def _include_path(node: Node, folder: Path | None) -> Path | None:
    """The file an ``!include:`` node names, relative to ``folder``; ``None`` for other nodes."""
    tag = node.tag or ""
    if not tag.startswith(_INCLUDE):
        return None
    path = Path(tag.removeprefix(_INCLUDE))
    return path if folder is None else folder / path


def _cannot_open(path: Path | None) -> bool:
    """Whether ``path`` names a file that cannot be opened (missing, a folder, no permission)."""
    if path is None:
        return False
    try:
        path.open("rb").close()
    except OSError:
        return True
    return False


def _include_root(node: Node, folder: Path | None) -> tuple[MappingNode, str, Path | None] | None:
    """The composed document an ``!include:`` node names, or ``None`` if it cannot be read.

    An unreadable include is left for hyperpyyaml to report when it loads the file.
    """
    path = _include_path(node, folder)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigurationError(
            f"cannot read the file {path} that !include: names: it is not UTF-8 text "
            f"({error.reason} at byte {error.start})"
        ) from error
    except OSError:
        return None
    try:
        root = YAML(typ="rt").compose(text)
    except YAMLError:
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
    in_document: bool = True,
) -> None:
    """Raise :class:`OverrideError` for the first override ``node`` cannot take.

    ``in_document``: ``node`` is written in the document the overrides are applied to, not in a
    file it includes (whose text they cannot change).
    """
    own = _keys_as_read(node)
    more: dict[str, tuple[Node, Node]] = {}
    if included is not None:
        more = {key: (key_node, value) for key, key_node, value in _items(included[0])}
    for key, subtree in tree.items():
        key_path = (*path, key)
        dotted = format_key_path(key_path)
        if key in own:
            key_node, value = own[key]
            where, where_folder, written_here = source, folder, in_document
        elif key in more and included is not None:
            key_node, value = more[key]
            where, where_folder, written_here = included[1], included[2], False
        else:
            raise OverrideError(
                dotted,
                _unknown_key_message(key, path, [*own, *more]),
                source=source,
                line=parent_line,
            )
        if subtree is None or _holds_nothing(value):
            continue  # a whole value, or a mapping where the file has none to check it against
        if (written_here or isinstance(value, MappingNode)) and _cannot_open(
            _include_path(value, where_folder)
        ):
            # Keys under an include that cannot be read cannot be checked (each would be
            # "unknown"): the load reports the file itself (FileNotFoundError naming it). A
            # bare include in an included file is refused below whatever it names.
            continue
        if written_here and isinstance(value, ScalarNode) and _is_include(value.tag):
            # A bare `!include:`: the keys are checked against the included file alone (and
            # apply_overrides writes them under the tag). One in an included file stays a
            # scalar: the overrides cannot write there.
            value = MappingNode(value.tag, [], start_mark=value.start_mark)
        if not isinstance(value, MappingNode):
            reason = (
                f"{dotted!r} is a bare !include: in an included file, whose text an override "
                "cannot change to set keys under it; give it a whole new value, or write a "
                "mapping under its tag there"
                if _is_include(value.tag)
                else f"{dotted!r} is not a mapping, so an override cannot set keys under it; "
                "give it a whole new value instead"
            )
            raise OverrideError(
                dotted + "." + next(iter(subtree)) if subtree else dotted,
                reason,
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
            in_document=written_here,
        )


def _holds_nothing(node: Node) -> bool:
    """Whether ``node`` is ``null`` (or empty) or ``{}``: an override's mapping replaces it."""
    if isinstance(node, MappingNode):
        return not node.value and str(node.tag) == _MAP_TAG
    return isinstance(node, ScalarNode) and str(node.tag) == "tag:yaml.org,2002:null"


def _keys_as_read(node: MappingNode) -> dict[str, tuple[Node, Node]]:
    """A mapping's keys as YAML reads them: its own and those a ``<<`` merge key brings in.

    Its own keys win over merged ones, and of several merged mappings the earlier wins, as the
    YAML merge key is defined.
    """
    merged: dict[str, tuple[Node, Node]] = {}
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE_TAG:
            continue
        sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
        for source in sources:
            if isinstance(source, MappingNode):
                for key, entry in _keys_as_read(source).items():
                    merged.setdefault(key, entry)
    own = {key: (key_node, value) for key, key_node, value in _items(node)}
    own.pop("<<", None)
    return {**merged, **own}


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
            # Overrides reach through mappings only: the nearest key above a list item.
            settable: list[str] = []
            for part in path:
                if not isinstance(part, str):
                    break
                settable.append(part)
            raise PlaceholderError(
                format_key_path(path),
                source=source,
                line=line,
                override=".".join(settable) if settable else None,
            )


# How hyperpyyaml finds the references in a !ref or !copy value, and splits each one: the key
# path before the first ".", in brackets (``a[b][c]``), then an attribute read from its value.
_HYPERPYYAML_REFERENCE: Final = re.compile(r"<[^>]*>")


def check_references(
    root: MappingNode,
    tree: _OverrideTree,
    text: str,
    overrides: Mapping[str, object] | str | None,
    source: str,
) -> None:
    """Refuse a ``!ref`` or ``!copy`` that names a key the document does not have.

    hyperpyyaml would refuse it too, when it loads, but with a plain ``ValueError`` naming
    neither the key that holds the reference nor its line. Every reference of a value is
    checked (``!ref <a> * 2``, ``!ref <folder>/<name>``), written in the document (where no
    override replaces it) or in overrides given as YAML text, against the document with the
    overrides applied. A reference is followed through mappings only (it cannot name an item
    of a list): where it reaches another value, or an ``!include:`` (whose keys the included
    file gives), it is left for hyperpyyaml to resolve. References in included files name the
    included file's own keys and are left to hyperpyyaml as well.

    Raises:
        ConfigurationError: the message names the key that holds the reference, its file and
            line, the reference, the key missing and a close name, if one is.
    """
    referring = [
        (path, node, f"{source}:{_line(node)}")
        for path, node in _reference_nodes(root, ())
        if not _replaced(tree, path)
    ]
    if isinstance(overrides, str):
        given = _compose_overrides(overrides)
        if given is not None:
            referring += [
                (path, node, f"the overrides, line {_line(node)}")
                for path, node in _reference_nodes(given, ())
            ]
    if not referring:
        return
    target = root if not overrides else compose(apply_overrides(text, overrides), source)
    for path, node, where in referring:
        for found in _HYPERPYYAML_REFERENCE.findall(str(node.value)):
            problem = _reference_problem(found.strip("<>"), target)
            if problem is not None:
                raise ConfigurationError(
                    f"{format_key_path(path)!r} ({where}): {node.tag} {node.value}: {problem}"
                )


def _reference_nodes(node: Node, path: KeyPath) -> Iterator[tuple[KeyPath, ScalarNode]]:
    """Every ``!ref`` / ``!copy`` scalar under ``node`` (key path, node), in document order."""
    if isinstance(node, ScalarNode) and str(node.tag) in _REFERENCE_TAGS:
        yield path, node
    elif isinstance(node, MappingNode):
        for key, _, value in _items(node):
            yield from _reference_nodes(value, (*path, key))
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            yield from _reference_nodes(item, (*path, index))


def _reference_problem(reference: str, root: MappingNode) -> str | None:
    """What is wrong with ``reference`` (``a[b].c``) in ``root``, or ``None`` if nothing is found.

    The key path is walked as hyperpyyaml's ``deref`` walks it; ``None`` also where the walk
    reaches a value whose keys this check cannot see.
    """
    keys_text, dot, attribute = reference.partition(".")
    node: Node = root
    walked: list[str] = []
    for raw in keys_text.split("["):
        part = raw.strip("]")
        if isinstance(node, SequenceNode) and walked:
            # hyperpyyaml looks a part up with `in`, which tests a list's items, not its indices.
            return (
                f"{_reference_text(walked)!r} is a list, and a reference names keys of mappings "
                f"only, not items of a list (such as {part!r})"
            )
        if not isinstance(node, MappingNode) or _is_include(node.tag):
            return None
        known = _keys_as_read(node)
        if part not in known:
            where = f"{_reference_text(walked)!r} has no key" if walked else "no top-level key"
            close = [part.strip()] if part.strip() in known else []
            close = close or difflib.get_close_matches(part, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"{where} {part!r}{hint}"
        walked.append(part)
        node = known[part][1]
    plain_mapping = isinstance(node, MappingNode) and str(node.tag) == _MAP_TAG
    if dot and plain_mapping and not hasattr(dict, attribute):
        # <a.b> reads the attribute b of a's value: a plain mapping is a dict, which has none.
        keys = [*walked, *attribute.split(".")]
        return (
            f"<{reference}> reads the attribute {attribute!r} of {_reference_text(walked)!r}, "
            f"a mapping, which has no such attribute: to name its key write "
            f"<{_reference_text(keys)}>"
        )
    return None


def _reference_text(keys: list[str]) -> str:
    """A key path as a reference writes it: ``a[b][c]``."""
    return keys[0] + "".join(f"[{key}]" for key in keys[1:])


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


def building_key(traceback: TracebackType | None) -> KeyPath:
    """The key path of the value being built when an error left hyperpyyaml's construction.

    The constructors of ``ruamel.yaml`` and ``hyperpyyaml`` hold the node they are building in a
    local named ``node``; the nodes met from the outermost frame inwards are a chain of parents
    and children, and each step down is a mapping key or a sequence index. The path stops where
    the chain does (an empty path when no node was being built, e.g. an error in ``!ref``
    resolution).
    """
    chain: list[Node] = []
    while traceback is not None:
        node = traceback.tb_frame.f_locals.get("node")
        if isinstance(node, Node) and (not chain or node is not chain[-1]):
            chain.append(node)
        traceback = traceback.tb_next
    path: list[str | int] = []
    for parent, child in itertools.pairwise(chain):
        step = _step_to(parent, child)
        if step is None:
            break
        path.append(step)
    return tuple(path)


def _step_to(parent: Node, child: Node) -> str | int | None:
    """The key or index under which ``child`` sits directly in ``parent``, if it does."""
    if isinstance(parent, MappingNode):
        for key_node, value_node in parent.value:
            if value_node is child and isinstance(key_node, ScalarNode):
                return str(key_node.value)
    elif isinstance(parent, SequenceNode):
        for index, item in enumerate(parent.value):
            if item is child:
                return index
    return None
