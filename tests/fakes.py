"""A recording stand-in for a checkpointer, to check what the brain asks of one."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from typedbrain import CheckpointInfo


class RecordingCheckpointer:
    """Implements ``CheckpointerLike`` by recording every call."""

    def __init__(self) -> None:
        self.recoverables: dict[str, object] = {}
        self.recoveries: list[dict[str, object]] = []
        self.saves: list[dict[str, object]] = []

    def add_recoverable(self, name: str, obj: object) -> None:
        self.recoverables[name] = obj

    def recover_if_possible(
        self,
        *,
        max_key: str | None = None,
        min_key: str | None = None,
        device: torch.device | str | None = None,
    ) -> object:
        self.recoveries.append({"max_key": max_key, "min_key": min_key, "device": device})
        return None

    def save_and_keep_only(
        self,
        *,
        meta: Mapping[str, object] | None = None,
        end_of_epoch: bool = True,
        num_to_keep: int = 1,
        ckpt_predicate: Callable[[CheckpointInfo], bool] | None = None,
    ) -> object:
        self.saves.append({"meta": meta, "end_of_epoch": end_of_epoch, "num_to_keep": num_to_keep})
        return None
