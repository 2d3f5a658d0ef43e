"""Which process this is, and running work on the main process only."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["barrier", "get_rank", "if_main_process", "is_distributed", "run_on_main"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is up in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank: from the process group, else ``$RANK``, else 0."""
    if is_distributed():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def if_main_process() -> bool:
    """Whether this is the main process (rank 0), the one that writes files and shows bars."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process of the group; does nothing without a process group."""
    if is_distributed():
        dist.barrier()


def run_on_main(
    func: Callable[..., object],
    args: Sequence[object] | None = None,
    kwargs: Mapping[str, object] | None = None,
    post_func: Callable[..., object] | None = None,
    post_args: Sequence[object] | None = None,
    post_kwargs: Mapping[str, object] | None = None,
    run_post_on_main: bool = False,
) -> None:
    """Run ``func`` on the main process, then ``post_func`` on the others, with barriers.

    The usual use is preparing data once (download, manifest) and then loading it everywhere::

        run_on_main(prepare_data, kwargs={"folder": folder})

    Args:
        func: run on the main process only; the other processes wait at a barrier.
        args: positional arguments of ``func``.
        kwargs: keyword arguments of ``func``.
        post_func: run after ``func`` on the other processes (and on the main one as well when
            ``run_post_on_main`` is true), followed by a second barrier.
        post_args: positional arguments of ``post_func``.
        post_kwargs: keyword arguments of ``post_func``.
        run_post_on_main: also run ``post_func`` on the main process.
    """
    if if_main_process():
        func(*(args or ()), **(kwargs or {}))
    barrier()
    if post_func is None:
        return
    if run_post_on_main or not if_main_process():
        post_func(*(post_args or ()), **(post_kwargs or {}))
    barrier()


def default_device() -> str:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"
