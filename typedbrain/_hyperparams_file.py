"""An experiment's ``hyperparams.yaml``: an earlier one whose values differ is kept, and named.

A job restarted with other overrides resumes from its checkpoint, whose optimizer and scheduler
state do not follow the recipe's new values: the folder keeps the earlier file beside the new
one, and a :class:`~typedbrain.ResumeWarning` names the keys that changed. An earlier file that
differs only in its comments (the header) is replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Final

from typedbrain._errors import ResumeWarning
from typedbrain._files import naming_file, open_regular, replace_file

if TYPE_CHECKING:
    from ruamel.yaml.nodes import Node

__all__ = ["save_hyperparams"]

logger = logging.getLogger(__name__)

_EARLIER_HYPERPARAMS: Final = re.compile(r"hyperparams\.([0-9]+)\.yaml")
# The most YAML nodes compared between an earlier hyperparams.yaml and the new one: aliases can
# make a small file stand for a huge tree.
_MAX_COMPARED_NODES: Final = 100_000
_RESUMED_STATE_NOTE: Final = (
    "A run resumed from a checkpoint keeps the checkpoint's optimizer, scheduler and other "
    "saved state: a learning rate or schedule changed in the recipe does not apply to them."
)


def save_hyperparams(target: Path, hyperparams: str) -> None:
    """Write ``hyperparams`` to ``target``, keeping an earlier file whose values differ.

    The earlier file goes to the next free ``hyperparams.<n>.yaml`` beside it when its values
    differ from the new ones, or cannot be compared (it is not a YAML mapping, or too large);
    one that differs only in its comments (the header) or layout is replaced. See
    :func:`~typedbrain.create_experiment_directory`, which calls this on the main process.

    Raises:
        OSError: a file cannot be read or written; the error names it. An earlier file that is
            a symbolic link is not followed (``ELOOP``).

    Warns:
        ResumeWarning: the earlier file holds other values than the new one, or they cannot be
            compared (the warning points at the caller of the caller: the recipe that called
            create_experiment_directory).
    """
    folder = target.parent
    # A path that is not valid UTF-8 (in the header) is written with backslash escapes.
    data = hyperparams.encode("utf-8", errors="backslashreplace")
    earlier = _read_earlier(target)
    changed: list[str] | None = []
    if earlier is not None and earlier[0] != data:
        changed = _changed_keys(earlier[0].decode("utf-8", errors="replace"), hyperparams)
    kept = None if earlier is None or changed == [] else _keep_earlier(folder, *earlier)
    try:
        replace_file(target, lambda stream: stream.write(data))
    except BaseException:
        if kept is not None:  # hyperparams.yaml still holds it
            with contextlib.suppress(OSError):
                kept.unlink()
        raise
    if kept is None:
        return
    what = (
        "the earlier file cannot be compared (it is not a YAML mapping, or too large)"
        if changed is None
        else "changed: " + ", ".join(changed)
    )
    logger.info("%s differs from the earlier one, kept as %s; %s", target, kept.name, what)
    warnings.warn(
        f"{target}: the hyperparameters differ from those an earlier start wrote there, kept "
        f"as {kept.name}; {what}. {_RESUMED_STATE_NOTE}",
        ResumeWarning,
        stacklevel=3,
    )


def _read_earlier(path: Path) -> tuple[bytes, int] | None:
    """The content and permission bits of the file ``path``; ``None`` if there is none.

    Raises:
        OSError: it cannot be read; a symbolic link at ``path`` is not followed (``ELOOP``).
    """
    try:
        with open_regular(path, follow_links=False) as stream:
            return stream.readall(), stat.S_IMODE(os.fstat(stream.fileno()).st_mode)
    except FileNotFoundError:
        return None


def _keep_earlier(folder: Path, content: bytes, mode: int) -> Path:
    """Write ``content`` to the next free ``hyperparams.<n>.yaml`` in ``folder``; its path.

    ``<n>`` is one more than the highest kept so far; the file is created exclusively, so no
    file (nor a link) at that name is ever overwritten or written through.
    """
    numbers = (_EARLIER_HYPERPARAMS.fullmatch(name) for name in os.listdir(folder))
    number = max((int(match.group(1)) for match in numbers if match), default=0) + 1
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        path = folder / f"hyperparams.{number}.yaml"
        try:
            descriptor = os.open(path, flags, 0o600)
        except FileExistsError:
            number += 1
            continue
        break
    try:
        with open(descriptor, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(content)
    except BaseException as error:
        with contextlib.suppress(OSError):
            path.unlink()
        if isinstance(error, OSError):
            raise naming_file(error, path) from error
        raise
    return path


def _changed_keys(earlier: str, new: str) -> list[str] | None:
    """The key paths whose values differ between two YAML texts (``model.hidden_size``).

    Keys added or removed count as changed; comments do not. Only the node trees are compared
    (tags, scalars as written): no tag is run. ``None`` when either text is not a YAML mapping
    or the two hold more than :data:`_MAX_COMPARED_NODES` nodes (counted as walked: a node an
    alias reaches twice counts twice).
    """
    # Imported here, as in _resolved_hyperparams: importing ruamel.yaml adds warning filters.
    from ruamel.yaml import YAML
    from ruamel.yaml.nodes import MappingNode

    try:
        roots = [YAML(typ="rt").compose(text) for text in (earlier, new)]
    except Exception:  # ruamel raises many unrelated types for text that is not YAML
        return None
    if not all(isinstance(root, MappingNode) for root in roots):
        return None
    budget = [_MAX_COMPARED_NODES]
    try:
        olds, news = (_flattened(root, budget) for root in roots)
    except _TooLargeError:
        return None
    differing = [
        path
        for path in [*olds, *(path for path in news if path not in olds)]
        if olds.get(path, _ABSENT) != news.get(path, _ABSENT)
    ]
    # A key whose mapping became something else is named, not each key under it as well.
    named: set[tuple[str, ...]] = set()
    changed = []
    for path in differing:
        if not any(path[:length] in named for length in range(len(path))):
            named.add(path)
            changed.append(".".join(path) or "(the top level)")
    return changed


class _TooLargeError(Exception):
    """The YAML trees compared hold more nodes than :data:`_MAX_COMPARED_NODES`."""


_ABSENT: Final = object()
"""The value of a key path one of the trees compared lacks."""


def _flattened(root: Node, budget: list[int]) -> dict[tuple[str, ...], object]:
    """The tree ``root`` as {key path: comparable value}, mappings walked into.

    A mapping's own entry is its tag; its keys' paths extend its path. Any other node's entry
    is its whole comparable form (see :func:`_node_value`). Every node walked, keys included,
    is charged to ``budget``.

    Raises:
        _TooLargeError: ``budget`` ran out.
    """
    from ruamel.yaml.nodes import MappingNode, ScalarNode

    flat: dict[tuple[str, ...], object] = {}
    pending: list[tuple[tuple[str, ...], Node]] = [((), root)]
    while pending:
        path, node = pending.pop()
        if not isinstance(node, MappingNode):
            flat[path] = _node_value(node, budget)
            continue
        _charge(budget)
        flat[path] = ("mapping", str(node.tag))
        children = []
        for key, value in node.value:
            name = str(key.value) if isinstance(key, ScalarNode) else repr(_node_value(key, budget))
            children.append(((*path, name), value))
        pending.extend(reversed(children))  # walked in the file's order
    return flat


def _charge(budget: list[int]) -> None:
    """Count one node against ``budget``.

    Raises:
        _TooLargeError: ``budget`` ran out.
    """
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLargeError


def _node_value(node: Node, budget: list[int]) -> object:
    """A comparable form of the tree ``node``: tags and scalars as written."""
    from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

    _charge(budget)
    if isinstance(node, ScalarNode):
        return (str(node.tag), str(node.value))
    if isinstance(node, SequenceNode):
        return (str(node.tag), tuple(_node_value(item, budget) for item in node.value))
    if isinstance(node, MappingNode):
        return (
            str(node.tag),
            tuple((_node_value(k, budget), _node_value(v, budget)) for k, v in node.value),
        )
    return (str(node.tag), repr(node.value))
