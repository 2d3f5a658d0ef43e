import attrs
import torch
from torch import Tensor

import typedbrain as tb

Batch = tuple[Tensor, Tensor]


@attrs.frozen
class Hyper:
    lr: float


class Regressor(tb.Brain[Batch, Tensor, Hyper]):
    def compute_forward(self, batch: Batch, stage: tb.Stage) -> Tensor:
        predictions: Tensor = self.modules["model"](batch[0])
        return predictions

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: tb.Stage) -> Tensor:
        return torch.nn.functional.mse_loss(predictions, batch[1])


hyper = Hyper(lr=0.05)
brain = Regressor(
    modules={"model": torch.nn.Linear(4, 1)},
    opt_class=lambda params: torch.optim.SGD(params, lr=hyper.lr),
    hparams=hyper,
    run_opts={"grad_accumulation_factor": 2, "precision": "bf16"},
)
data = [(torch.randn(4), torch.randn(1)) for _ in range(64)]
brain.fit(tb.EpochCounter(limit=5), data, data[:16], train_loader_kwargs={"batch_size": 8})
test_loss = brain.evaluate(data[:16])
