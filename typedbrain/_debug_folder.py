"""Debug runs checkpoint into a throwaway folder, so they neither read nor change the real one.

In debug mode (the ``debug`` run option) without ``debug_persistently``, the brain points its
:class:`~typedbrain.Checkpointer` at a new, empty folder created beside the real one (a hidden
``.<name>-debug-XXXXXXXX`` sibling, on the same file system so every process of a distributed
run sees it). The folder is removed when the checkpointer is garbage-collected (it holds the
brain's run state, so not before the brain) or when the process exits.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path

from typedbrain._checkpoint import Checkpointer
from typedbrain._distributed import broadcast_object, if_main_process
from typedbrain._errors import CheckpointError
from typedbrain._warn import warn

__all__ = ["redirect_for_debug"]

logger = logging.getLogger("typedbrain")

_real_folders: weakref.WeakKeyDictionary[Checkpointer, Path] = weakref.WeakKeyDictionary()
"""The folder each redirected checkpointer pointed at before debug mode redirected it."""


def redirect_for_debug(checkpointer: object) -> Path | None:
    """Point ``checkpointer`` at a new temporary folder, removed when it is garbage-collected.

    Under ``torch.distributed`` it is collective: the main process creates the folder and every
    process gets its path.

    Args:
        checkpointer: the brain's checkpointer.

    Raises:
        CheckpointError: the folder could not be created (on every process).

    Returns:
        The temporary folder, or ``None`` when ``checkpointer`` is not a typedbrain
        :class:`~typedbrain.Checkpointer` (then a warning says that its checkpoints go where it
        says, as in any run).
    """
    if not isinstance(checkpointer, Checkpointer):
        warn(
            f"debug mode cannot send the checkpoints of a {type(checkpointer).__name__} to a "
            "temporary folder (only typedbrain's Checkpointer can be redirected): they go where "
            "it puts them, as in any run; set debug_persistently=True to silence this",
            UserWarning,
        )
        return None
    # A checkpointer redirected before (by another brain) gets a new folder beside its real one.
    real = _real_folders.get(checkpointer, checkpointer.checkpoints_dir)
    _real_folders[checkpointer] = real
    created: str | None = None
    failure: str | None = None
    if if_main_process():
        try:
            real.parent.mkdir(parents=True, exist_ok=True)
            created = tempfile.mkdtemp(prefix=f".{real.name}-debug-", dir=real.parent)
        except OSError as error:
            failure = str(error)
        else:
            weakref.finalize(checkpointer, shutil.rmtree, created, ignore_errors=True)
    # The main process's outcome reaches every process, so none waits for a folder never made.
    shared, failure = broadcast_object((created, failure))
    if shared is None:
        raise CheckpointError(
            f"debug mode could not create a temporary checkpoint folder beside {real}: "
            f"{failure} (set debug_persistently=True to use {real} itself)"
        )
    folder = Path(shared)
    checkpointer.checkpoints_dir = folder
    logger.info(
        "debug mode: checkpoints go to %s (removed at the end) instead of %s; set "
        "debug_persistently=True to keep them in the real folder",
        folder,
        real,
    )
    return folder
