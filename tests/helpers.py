"""Small typed brains and data shared by the tests."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.utils.data import DataLoader, Dataset, IterableDataset

import typedbrain as tb
from typedbrain import Brain, LoaderKwargs, Stage
from typedbrain._manifest import DIGEST_KEY, MANIFEST_NAME, manifest_digest

Batch = Sequence[Tensor]
"""(inputs, targets), as the default collate function builds it."""

PROJECT = Path(__file__).resolve().parent.parent
"""The project's root folder."""


def python_blocks(page: str) -> list[str]:
    """The code of the ```python blocks of the Markdown file ``page`` (from the root), in order."""
    text = (PROJECT / page).read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def call(module: torch.nn.Module, inputs: Tensor) -> Tensor:
    """Call a module whose output is one tensor, with the type checked."""
    output = module(inputs)
    assert isinstance(output, Tensor)
    return output


class RegressionBrain(Brain[Batch, Tensor]):
    """A linear regression brain: ``modules["model"]`` maps inputs to targets, MSE loss."""

    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        return call(self.modules["model"], batch[0].to(self.device))

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        return torch.nn.functional.mse_loss(predictions, batch[1].to(self.device))


def examples(count: int, *, features: int = 4, outputs: int = 2, seed: int = 0) -> list[Batch]:
    """``count`` (input, target) examples from a fixed linear function plus noise."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(features, outputs, generator=generator)
    items: list[Batch] = []
    for _ in range(count):
        x = torch.randn(features, generator=generator)
        y = x @ weight + 0.01 * torch.randn(outputs, generator=generator)
        items.append((x, y))
    return items


def batches(count: int, size: int, *, seed: int = 0) -> list[Batch]:
    """``count`` ready-made batches of ``size`` examples each."""
    items = examples(count * size, seed=seed)
    return [
        (
            torch.stack([x for x, _ in items[i * size : (i + 1) * size]]),
            torch.stack([y for _, y in items[i * size : (i + 1) * size]]),
        )
        for i in range(count)
    ]


class ReadyBatches(Dataset[Batch]):
    """Ready-made batches as a map-style dataset (item ``i`` is batch ``i``)."""

    def __init__(self, ready: Sequence[Batch]) -> None:
        self._ready = list(ready)

    def __getitem__(self, index: int) -> Batch:
        return self._ready[index]

    def __len__(self) -> int:
        return len(self._ready)


def ready_loader(ready: Sequence[Batch]) -> DataLoader[object]:
    """A DataLoader that yields the given batches as they are, in order."""
    return DataLoader(ReadyBatches(ready), batch_size=None, collate_fn=_identity)


def _identity(batch: object) -> object:
    return batch


class UnsizedBatches(IterableDataset[Batch]):
    """Ready-made batches from an iterable dataset, which has no length."""

    def __init__(self, ready: Sequence[Batch]) -> None:
        self._ready = list(ready)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._ready)


def unsized_loader(ready: Sequence[Batch]) -> DataLoader[object]:
    """A DataLoader over ``ready`` whose length cannot be known in advance."""
    return DataLoader(UnsizedBatches(ready), batch_size=None, collate_fn=_identity)


def sgd(lr: float = 0.1) -> tb.OptimizerFactory:
    """An optimizer factory for plain SGD."""

    def factory(params: ParamsT) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr)

    return factory


def regression_brain(
    *,
    run_opts: tb.RunOptionsDict | None = None,
    lr: float = 0.1,
    seed: int = 0,
    checkpointer: tb.CheckpointerLike | None = None,
) -> RegressionBrain:
    """A fresh regression brain on a seeded ``Linear(4, 2)``."""
    torch.manual_seed(seed)
    return RegressionBrain(
        modules={"model": torch.nn.Linear(4, 2)},
        opt_class=sgd(lr),
        run_opts={"noprogressbar": True, **(run_opts or {})},
        checkpointer=checkpointer,
    )


def parameters_of(brain: Brain[Batch, Tensor]) -> Mapping[str, Tensor]:
    """A detached copy of every parameter of the brain's modules."""
    return {name: p.detach().clone() for name, p in brain.modules.named_parameters()}


LOADER: LoaderKwargs = {"batch_size": 4}


def rewrite_manifest(folder: Path, edit: Callable[[dict[str, object]], None]) -> None:
    """Change a committed manifest with ``edit`` and sign it again with its own SHA-256.

    What a writer with a bug (or a person) would commit: the manifest's own check passes, so
    what is checked next is what the test is about.
    """
    manifest = folder / MANIFEST_NAME
    data = json.loads(manifest.read_text(encoding="utf-8"))
    edit(data)
    data[DIGEST_KEY] = manifest_digest(data)
    manifest.write_text(json.dumps(data), encoding="utf-8")


def refuse_opening(monkeypatch: pytest.MonkeyPatch, target: Path, error: OSError) -> None:
    """Opening ``target`` raises ``error``; every other file opens.

    typedbrain opens what it reads from a checkpoint with ``os.open`` (refusing FIFOs and
    devices before it reads), so that is where a refusal of the OS is played.
    """
    real_open = os.open

    def opening(path: object, flags: int, *args: int, **kwargs: int | None) -> int:
        if isinstance(path, str | os.PathLike) and Path(path) == target:
            raise error
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]  # as given

    monkeypatch.setattr(os, "open", opening)
