"""Hypothesis strategies for typedbrain's value types, in one place."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import strategies as st

from typedbrain import RunOptions, TrainingProgress
from typedbrain._rng import NumpyRngState, PythonRngState, RngState
from typedbrain._state import RunState, SamplerState

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
    "fsdp": st.booleans(),
    "sync_batchnorm": st.booleans(),
    "stop_on_signals": st.booleans(),
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


_word = st.integers(min_value=0, max_value=2**32 - 1)
_words = st.lists(_word, max_size=8).map(tuple)
_finite = st.floats(allow_nan=False, allow_infinity=False)


def rng_state() -> st.SearchStrategy[RngState]:
    """Any ``RngState`` (short word lists: the round trip does not depend on their length)."""
    return st.builds(
        RngState,
        python=st.builds(
            PythonRngState,
            version=st.integers(0, 5),
            internal=_words,
            gauss_next=st.none() | _finite,
        ),
        numpy=st.builds(
            NumpyRngState,
            algorithm=st.just("MT19937"),
            key=_words,
            position=st.integers(0, 624),
            has_gauss=st.integers(0, 1),
            cached_gaussian=_finite,
        ),
        torch_cpu=st.lists(st.integers(0, 255), max_size=16).map(tuple),
        cuda=st.lists(st.lists(st.integers(0, 255), max_size=8).map(tuple), max_size=2).map(tuple),
        torch_version=st.sampled_from(["2.13.0+cpu", "2.3.1"]),
    )


def sampler_state() -> st.SearchStrategy[SamplerState]:
    """Any ``SamplerState``."""
    return st.builds(SamplerState, seed=st.integers(-(2**63), 2**63 - 1), epoch=_count)


_generator_states = st.lists(st.lists(st.integers(0, 255), max_size=8).map(tuple), max_size=2).map(
    tuple
)


def run_state() -> st.SearchStrategy[RunState]:
    """Any ``RunState``."""
    return st.builds(
        RunState,
        phase=st.sampled_from(["TRAIN", "VALID", "CHECKPOINT", "IDLE"]),
        epoch=st.none() | _small,
        mid_epoch=st.booleans(),
        valid_pending=st.booleans(),
        progress=training_progress(),
        skipped=_count,
        window=_count,
        rng=rng_state(),
        epoch_rng=st.none() | rng_state(),
        sampler=st.none() | sampler_state(),
        train_loader_seed=st.none() | st.integers(-(2**63), 2**63 - 1),
        valid_loader_seed=st.none() | st.integers(-(2**63), 2**63 - 1),
        batch_size=st.none() | _small,
        accumulation=st.none() | _small,
        counter=st.none() | st.text(max_size=8),
        loader_rng=_generator_states,
        epoch_loader_rng=st.none() | _generator_states,
        valid_loader_rng=_generator_states,
        num_workers=st.none() | _count,
        dataset_size=st.none() | _count,
    )
