"""The loop passes these hooks' arguments by name: SpeechBrain-style overrides type-check."""

from __future__ import annotations

from torch import Tensor

from typedbrain import Brain


class KeywordHooks(Brain[Tensor, Tensor]):
    def on_evaluate_start(self, max_key: str | None = None, min_key: str | None = None) -> None:
        super().on_evaluate_start(max_key=max_key, min_key=min_key)

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none=set_to_none)
