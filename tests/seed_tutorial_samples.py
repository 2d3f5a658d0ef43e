"""The code samples of the seed tutorial, verbatim, with ``import typedbrain as sb``.

Each sample is copied unchanged between ``# --- sample N`` markers; where the tutorial shows a
fragment of a method, the fragment sits unchanged inside the smallest function that gives it the
names it uses. The samples are untyped, as a SpeechBrain user writes them; mypy.ini exempts this
one module from type checking, and tests/test_seed_tutorial.py runs every sample.
"""

import torch
from torch.utils.data import DataLoader

import typedbrain as sb
from typedbrain import Stage

# --- sample 1: minimal implementation (with its usage lines wrapped in a function) ----------
class SimpleBrain(sb.Brain):
    def compute_forward(self, batch, stage):
        return self.modules.model(batch["input"])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.l1_loss(predictions, batch["target"])


def sample_1_usage():
    # Usage
    model = torch.nn.Linear(in_features=10, out_features=10)
    brain = SimpleBrain({"model": model}, opt_class=lambda x: torch.optim.SGD(x, 0.1))
    data = [{"input": torch.rand(10, 10), "target": torch.rand(10, 10)}]
    brain.fit(range(10), data)
    return brain, model


# --- sample 2: the optimizer in YAML ----------------------------------------------------------
SAMPLE_2_YAML = """\
optimizer: !name:torch.optim.Adam
    lr: 0.1
"""


# --- sample 3: hyperparameters ------------------------------------------------------------------
class SimpleBrainWithHparams(sb.Brain):  # the tutorial names it SimpleBrain again
    def compute_objectives(self, predictions, batch, stage):
        term1 = torch.nn.functional.l1_loss(predictions, batch["target1"])
        term2 = torch.nn.functional.mse_loss(predictions, batch["target2"])
        return self.hparams.weight1 * term1 + self.hparams.weight2 * term2

hparams = {"weight1": 0.7, "weight2": 0.3}


# --- sample 4: converting datasets to DataLoaders (a fragment of fit) ---------------------------
def sample_4_fragment(self, train_set, train_loader_kwargs):
    # Converts datasets to DataLoader format
    if not isinstance(train_set, DataLoader):
        train_set = self.make_dataloader(
            train_set, stage=sb.Stage.TRAIN, **train_loader_kwargs
        )
    return train_set


# --- sample 5: on_fit_start -----------------------------------------------------------------------
class OnFitStartBrain(SimpleBrain):
    def on_fit_start(self):
        self._compile_jit()
        self._wrap_distributed()
        self.init_optimizers()
        if self.checkpointer is not None:
            self.checkpointer.recover_if_possible(device=torch.device(self.device))


# --- sample 6: fit_batch ----------------------------------------------------------------------------
class FitBatchBrain(SimpleBrain):
    def fit_batch(self, batch):
        outputs = self.compute_forward(batch, Stage.TRAIN)
        loss = self.compute_objectives(outputs, batch, Stage.TRAIN)
        loss.backward()
        if self.check_gradients(loss):
            self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach().cpu()


# --- sample 7: the validation loop (a fragment of fit) ----------------------------------------------
def sample_7_fragment(self, valid_set, avg_valid_loss):
    with torch.no_grad():
        for batch in valid_set:
            loss = self.evaluate_batch(batch, stage=Stage.VALID)
            avg_valid_loss = self.update_average(loss, avg_valid_loss)
    return avg_valid_loss
