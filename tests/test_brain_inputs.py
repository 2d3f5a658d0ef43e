"""The brain refuses bad constructor arguments, and bad optimizers, before any side effect."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import typedbrain._brain
from tests.helpers import Batch, RegressionBrain, call, examples, sgd
from typedbrain import Checkpointer, ConfigurationError, Phase, Stage
from typedbrain._launch import LaunchInfo

# Each refused argument, with what the message says about it.
REFUSED: list[tuple[str, Callable[[torch.nn.Module], dict[str, object]], str]] = [
    (
        "opt_class",
        lambda model: {"modules": {"model": model}, "opt_class": "adam"},
        "opt_class must be callable",
    ),
    (
        "checkpointer",
        lambda model: {"modules": {"model": model}, "checkpointer": "save/"},
        "checkpointer must be a Checkpointer",
    ),
    (
        "checkpointer class",
        lambda model: {"modules": {"model": model}, "checkpointer": Checkpointer},
        "not the class Checkpointer itself",
    ),
    (
        "module name",
        lambda model: {"modules": {"model": model, "enc.proj": torch.nn.Linear(2, 2)}},
        re.escape("modules['enc.proj'] cannot be named so"),
    ),
]


@pytest.mark.parametrize(("what", "arguments", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_refused_brain_leaves_the_modules_where_they_were(
    what: str,
    arguments: Callable[[torch.nn.Module], dict[str, object]],
    message: str,
) -> None:
    # On "meta" a module's weights are gone: a brain refused after moving it there loses them.
    model = torch.nn.Linear(4, 2)
    weight = model.weight.detach().clone()
    with pytest.raises(ConfigurationError, match=message):
        RegressionBrain(**arguments(model), run_opts={"device": "meta"})  # type: ignore[call-overload]  # the mistakes under test
    assert model.weight.device == torch.device("cpu"), what
    assert torch.equal(model.weight, weight)


@pytest.mark.parametrize(("what", "arguments", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_refused_brain_joins_no_process_group(
    what: str,
    arguments: Callable[[torch.nn.Module], dict[str, object]],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    joined: list[object] = []
    launch = LaunchInfo(rank=1, local_rank=1, world_size=2, master_addr="", master_port=0)
    monkeypatch.setattr(typedbrain._brain, "detect_launch", lambda: launch)
    monkeypatch.setattr(typedbrain._brain, "init_distributed", lambda **kw: joined.append(kw))
    with pytest.raises(ConfigurationError, match=message):
        RegressionBrain(**arguments(torch.nn.Linear(4, 2)), run_opts={"device": "cpu"})  # type: ignore[call-overload]  # the mistakes under test
    assert joined == [], what
    # The same patches let a good brain join: the refusal, not the patching, kept it out.
    RegressionBrain({"model": torch.nn.Linear(4, 2)}, run_opts={"device": "cpu"})
    assert len(joined) == 1


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("a.b", "refuses an empty name and a name with a '.' in it; use 'a_b', say"),
        ("", "refuses an empty name and a name with a '.' in it; use 'model', say"),
        ("keys", "has an attribute 'keys' of its own; rename the module"),
        ("training", "has an attribute 'training' of its own; rename the module"),
    ],
)
def test_a_module_name_modules_cannot_hold_is_refused_by_its_key(name: str, why: str) -> None:
    # Without the check, torch's ModuleDict raises a KeyError from inside the constructor.
    with pytest.raises(ConfigurationError) as caught:
        RegressionBrain({name: torch.nn.Linear(4, 2)})
    assert str(caught.value) == (
        f"modules must map names to torch modules: modules[{name!r}] cannot be named so, as "
        f"torch.nn.ModuleDict {why}"
    )
    with pytest.raises(ConfigurationError, match=f"modules\\[{name!r}\\] cannot be named so"):
        RegressionBrain([(name, torch.nn.Linear(4, 2))])  # type: ignore[call-overload]  # pairs are taken too


def test_a_checkpointer_class_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        RegressionBrain({"model": torch.nn.Linear(4, 2)}, checkpointer=Checkpointer)  # type: ignore[call-overload]  # the mistake under test
    assert str(caught.value) == (
        "checkpointer must be a Checkpointer (sb.Checkpointer(folder, recoverables)), not the "
        "class Checkpointer itself: build one and pass it"
    )
    brain = RegressionBrain(
        {"model": torch.nn.Linear(4, 2)}, checkpointer=Checkpointer(tmp_path / "ckpt")
    )
    assert brain.checkpointer is not None


def _no_optimizer(parameters: object) -> object:
    del parameters
    return 3


def test_an_opt_class_that_returns_no_optimizer_is_refused_before_training() -> None:
    # Without the check: AttributeError 'int' object has no attribute 'zero_grad', mid-fit.
    brain = RegressionBrain({"model": torch.nn.Linear(4, 2)}, opt_class=_no_optimizer)  # type: ignore[arg-type]  # the mistake under test
    with pytest.raises(ConfigurationError) as caught:
        brain.fit(range(1, 2), examples(4), progressbar=False)
    assert str(caught.value) == (
        "opt_class must return an optimizer (a torch.optim.Optimizer, built over the "
        "parameters it is given), but it returned int 3"
    )
    assert brain.optimizers_dict == {}
    assert brain.phase is Phase.FAILED


@pytest.mark.parametrize(
    ("modules", "which"),
    [
        (None, "it has no modules"),
        (
            {"act": torch.nn.ReLU(), "pool": torch.nn.Identity()},
            "its modules (act, pool) have none",
        ),
    ],
)
def test_an_opt_class_for_a_brain_without_parameters_says_so(
    modules: dict[str, torch.nn.Module] | None, which: str
) -> None:
    # Without the check: torch's "optimizer got an empty parameter list".
    brain = RegressionBrain(modules, opt_class=sgd())
    with pytest.raises(ConfigurationError) as caught:
        brain.fit(range(1, 2), examples(4), progressbar=False)
    assert str(caught.value) == (
        f"opt_class refused the brain's parameters: {which} (optimizer got an empty parameter "
        "list); pass the trainable modules to Brain(), or leave opt_class out"
    )


class _Wrapped:
    """An optimizer in all but its class: a wrapper that forwards to a torch optimizer."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        self.param_groups = inner.param_groups
        self.state = inner.state

    def step(self) -> None:
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, object]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.inner.load_state_dict(state)


def test_an_opt_class_may_return_an_optimizer_that_is_not_a_torch_subclass() -> None:
    model = torch.nn.Linear(4, 2)
    before = model.weight.detach().clone()
    brain = RegressionBrain(
        {"model": model},
        opt_class=lambda params: _Wrapped(torch.optim.SGD(params, lr=0.1)),  # type: ignore[arg-type, return-value]  # a duck-typed optimizer
    )
    brain.fit(range(1, 2), examples(4), progressbar=False)
    assert not torch.equal(model.weight, before)


def test_an_opt_class_that_optimizes_parameters_of_its_own_needs_none_from_the_modules() -> None:
    outside = torch.nn.Linear(4, 2)  # trained through a module the brain does not hold
    before = outside.weight.detach().clone()

    class Outside(RegressionBrain):
        def compute_forward(self, batch: Batch, stage: Stage) -> torch.Tensor:
            return call(outside, batch[0])

    brain = Outside(
        {"act": torch.nn.ReLU()}, opt_class=lambda _: torch.optim.SGD(outside.parameters(), lr=0.1)
    )
    brain.fit(range(1, 2), examples(4), progressbar=False)
    assert not torch.equal(outside.weight, before)
