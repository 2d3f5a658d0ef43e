import io

import attrs
import torch

from typedbrain import Brain, OptimizerFactory, load_hparams, structure_hparams


@attrs.frozen
class Data:
    batch_size: int
    shuffle: bool = True


@attrs.frozen
class Hyper:
    lr: float
    model: torch.nn.Linear
    opt_class: OptimizerFactory
    data: Data


recipe = """
lr: 0.1
model: !new:torch.nn.Linear
    in_features: 4
    out_features: 2
opt_class: !name:torch.optim.SGD
    lr: !ref <lr>
data:
    batch_size: 8
precision: bf16
"""
hyper = structure_hparams(load_hparams(io.StringIO(recipe)), Hyper)
optimizer = hyper.opt_class(hyper.model.parameters())
assert hyper.data == Data(batch_size=8)
brain: Brain[torch.Tensor, torch.Tensor, Hyper] = Brain(
    modules={"model": hyper.model}, opt_class=hyper.opt_class, hparams=hyper
)
