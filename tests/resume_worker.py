"""Runs the resume harness in its own process: ``python -m tests.resume_worker CONFIG FOLDER OUT``.

CONFIG is a JSON object of :class:`RunConfig` fields, FOLDER the checkpoint folder, OUT where
the final state is written (with ``torch.save``) when the run completes. The crash and signal
tests kill or signal this process and start it again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.resume_harness import RunConfig, final_state, run
from typedbrain._state import converter


def main(argv: list[str]) -> int:
    config_path, folder, out = argv
    config = converter.structure(json.loads(Path(config_path).read_text()), RunConfig)
    brain = run(config, Path(folder))
    torch.save(final_state(brain), out)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
