"""``parse_arguments`` unpacks as SpeechBrain's triple, each name keeping its own type."""

from __future__ import annotations

import sys

import typedbrain as sb


def recipe() -> None:
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    name: str = hparams_file  # E: assignment
    suffix = overrides.suffix  # E: attr-defined
    limit = run_opts["max_grad_nrom"]  # E: typeddict-item
    del name, suffix, limit
