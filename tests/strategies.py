"""Hypothesis strategies for typedbrain's value types, in one place."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import strategies as st

from typedbrain import RunOptions, TrainingProgress

_small = st.integers(min_value=1, max_value=1_000)
_count = st.integers(min_value=0, max_value=1_000)
_precision = st.sampled_from(["fp32", "fp16", "bf16"])
_keys = st.none() | st.lists(st.sampled_from(["model", "encoder", "head"]), max_size=3).map(tuple)

# One strategy per run option, each drawing only valid values.
RUN_OPTION_VALUES: Mapping[str, st.SearchStrategy[object]] = {
    "test_only": st.booleans(),
    "debug": st.booleans(),
    "debug_batches": _small,
    "debug_epochs": _small,
    "debug_persistently": st.booleans(),
    "device": st.sampled_from([None, "cpu", "cuda", "cuda:1", "meta"]),
    "data_parallel_backend": st.booleans(),
    "distributed_backend": st.sampled_from(["nccl", "gloo", "mpi"]),
    "distributed_launch": st.booleans(),
    "find_unused_parameters": st.booleans(),
    "jit": st.booleans(),
    "jit_module_keys": _keys,
    "compile": st.booleans(),
    "compile_module_keys": _keys,
    "compile_mode": st.sampled_from(
        ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
    ),
    "compile_using_fullgraph": st.booleans(),
    "compile_using_dynamic_shape_tracing": st.booleans(),
    "precision": _precision,
    "eval_precision": _precision,
    "max_grad_norm": st.floats(allow_nan=False, min_value=-10, max_value=1e6),
    "skip_nonfinite_grads": st.booleans(),
    "nonfinite_patience": _count,
    "noprogressbar": st.booleans(),
    "ckpt_interval_minutes": st.floats(min_value=0, max_value=1e4),
    "ckpt_interval_steps": _count,
    "grad_accumulation_factor": _small,
    "optimizer_step_limit": st.none() | _small,
    "tqdm_colored_bar": st.booleans(),
    "remove_vector_weight_decay": st.booleans(),
    "profile_training": st.booleans(),
    "profile_warmup": _count,
    "profile_steps": _small,
}


@st.composite
def run_option_mappings(draw: st.DrawFn) -> dict[str, object]:
    """A valid partial mapping of run options (never both checkpoint intervals)."""
    names = draw(st.sets(st.sampled_from(sorted(RunOptions.names()))))
    chosen = {name: draw(RUN_OPTION_VALUES[name]) for name in sorted(names)}
    if chosen.get("ckpt_interval_minutes", 0) and chosen.get("ckpt_interval_steps", 0):
        del chosen["ckpt_interval_steps"]
    return chosen


def training_progress() -> st.SearchStrategy[TrainingProgress]:
    """Any valid ``TrainingProgress``."""
    return st.builds(
        TrainingProgress,
        step=_count,
        optimizer_step=st.integers(min_value=0, max_value=2**62),
        avg_train_loss=st.floats(allow_nan=False, allow_infinity=False),
        averaged=_count,
        nonfinite_count=_count,
    )
