"""``import typedbrain`` changes no torch setting, adds no logging handler, patches nothing."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Runs in a fresh interpreter: snapshots global state after importing torch, imports the
# module under test (and runs an optional extra statement, for the negative controls), then
# prints what differs as JSON.
PROBE = textwrap.dedent(
    """
    import json, logging, random, signal, sys, warnings
    import numpy as np
    import torch

    def settings():
        return {
            "default_dtype": str(torch.get_default_dtype()),
            "grad_enabled": torch.is_grad_enabled(),
            "num_threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "anomaly": torch.is_anomaly_enabled(),
            "autocast_cpu": torch.is_autocast_enabled("cpu"),
            "torch_rng": torch.get_rng_state().tolist(),
            "numpy_rng": str(np.random.get_state()[1][:8]),
            "python_rng": str(random.getstate()[1][:8]),
            "warning_filters": [str(f) for f in warnings.filters],
            "root_handlers": [repr(h) for h in logging.getLogger().handlers],
            "logger_handlers": {
                name: [repr(h) for h in logger.handlers]
                for name, logger in logging.Logger.manager.loggerDict.items()
                if isinstance(logger, logging.Logger) and logger.handlers
            },
            "root_level": logging.getLogger().level,
            "signal_handlers": [
                repr(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT)
            ],
        }

    def attributes():
        owners = {
            "torch": torch,
            "torch.Tensor": torch.Tensor,
            "torch.nn.Module": torch.nn.Module,
            "torch.nn.functional": torch.nn.functional,
            "torch.optim.Optimizer": torch.optim.Optimizer,
            "torch.utils.data.DataLoader": torch.utils.data.DataLoader,
            "torch.amp.GradScaler": torch.amp.GradScaler,
            "torch.distributed": torch.distributed,
            "logging": logging,
        }
        return {
            f"{owner}.{name}": id(value)
            for owner, obj in owners.items()
            for name, value in vars(obj).items()
        }

    before_settings, before_attributes = settings(), attributes()
    import MODULE
    EXTRA
    after_settings, after_attributes = settings(), attributes()
    changed = sorted(k for k in before_settings if before_settings[k] != after_settings[k])
    patched = sorted(
        k for k in before_attributes if after_attributes.get(k) != before_attributes[k]
    )
    typedbrain_logger = logging.getLogger("typedbrain")
    print(json.dumps({
        "changed": changed,
        "patched": patched,
        "typedbrain_logger": [
            typedbrain_logger.handlers != [],
            typedbrain_logger.level,
            typedbrain_logger.propagate,
        ],
    }))
    """
)


def probe(module: str, extra: str = "pass") -> tuple[dict[str, object], str]:
    code = PROBE.replace("MODULE", module).replace("EXTRA", extra)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    lines = result.stdout.strip().splitlines()
    report: dict[str, object] = json.loads(lines[-1])
    return report, "\n".join(lines[:-1]) + result.stderr


def test_importing_typedbrain_changes_nothing_global() -> None:
    report, output = probe("typedbrain")
    assert report["changed"] == []
    assert report["patched"] == []
    assert report["typedbrain_logger"] == [False, 0, True]
    assert output == ""  # nothing printed, no warning emitted


def test_importing_every_private_module_changes_nothing_global() -> None:
    package = Path(__file__).resolve().parent.parent / "typedbrain"
    names = sorted(info.name for info in pkgutil.iter_modules([str(package)]))
    assert {"_brain", "_checkpoint", "_sampler", "_signals"} <= set(names)
    # _yaml_tree imports ruamel.yaml, which adds warning filters; it is only imported when
    # load_hparams is first called (see the test below that import typedbrain leaves it out).
    names.remove("_yaml_tree")
    # _sharded_state imports torch.distributed.tensor, which imports sympy (a warning filter);
    # the checkpointer imports it only when it saves or loads under a process group.
    names.remove("_sharded_state")
    modules = ", ".join(f"typedbrain.{name}" for name in names)
    report, output = probe(modules)
    assert (report["changed"], report["patched"], output) == ([], [], "")


@pytest.mark.parametrize(
    ("extra", "field", "expected"),
    [
        ("torch.set_default_dtype(torch.float64)", "changed", ["default_dtype"]),
        (
            "logging.getLogger('typedbrain').addHandler(logging.StreamHandler())",
            "changed",
            ["logger_handlers"],
        ),
        (
            "torch.nn.Module.train = lambda self, mode=True: self",
            "patched",
            ["torch.nn.Module.train"],
        ),
        ("torch.manual_seed(1)", "changed", ["torch_rng"]),
        ("logging.basicConfig()", "changed", ["root_handlers"]),
        ("signal.signal(signal.SIGTERM, lambda *a: None)", "changed", ["signal_handlers"]),
    ],
)
def test_probe_detects_a_change_when_there_is_one(
    extra: str, field: str, expected: list[str]
) -> None:
    report, _ = probe("typedbrain", extra)
    assert report[field] == expected
    if "addHandler" in extra:
        assert report["typedbrain_logger"] == [True, 0, True]


def test_importing_typedbrain_does_not_import_yaml_or_plotting_libraries() -> None:
    report, output = probe(
        "typedbrain",
        "print(sorted(m for m in ('typedbrain._yaml_tree', 'ruamel.yaml', 'hyperpyyaml', "
        "'matplotlib', 'tensorboard', 'sympy', 'typedbrain._sharded_state') if m in sys.modules))",
    )
    assert output.strip() == "[]"
    assert report["changed"] == []
