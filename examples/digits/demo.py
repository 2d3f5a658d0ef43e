"""The demo ``make demo`` runs: train the digits recipe, stop it part way, resume it, inspect it.

1. Start ``train.py`` on ``hparams.yaml`` and send it SIGTERM once it has finished a few
   epochs: it finishes its batch, saves an intra-epoch checkpoint and exits with status 143.
2. Start it again: it resumes from that checkpoint, trains to the end (or until early stopping)
   and tests the checkpoint with the lowest validation error.
3. List and verify the checkpoints with ``typedbrain checkpoints``.
4. Plot the training log with ``typedbrain plot``.

Everything goes to ``results/digits-demo`` (removed first, so the demo starts from scratch).
Exit status 0 when every step did what it should.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

HERE: Final = Path(__file__).resolve().parent
OUTPUT: Final = Path("results/digits-demo")
STOP_AFTER_EPOCHS: Final = 3
TRAIN: Final = [
    sys.executable,
    str(HERE / "train.py"),
    str(HERE / "hparams.yaml"),
    "--output_folder",
    str(OUTPUT),
    "--noprogressbar",
]


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def epochs_logged() -> int:
    log = OUTPUT / "train_log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def interrupted_run() -> bool:
    """Start training and stop it with SIGTERM after a few epochs; whether it stopped cleanly."""
    say(f"training, to be stopped with SIGTERM after {STOP_AFTER_EPOCHS} epochs")
    process = subprocess.Popen(TRAIN)
    deadline = time.monotonic() + 300
    while epochs_logged() < STOP_AFTER_EPOCHS and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the training run made no progress in 5 minutes")
        time.sleep(0.01)
    if process.poll() is not None:
        print(f"the run ended (status {process.returncode}) before it could be stopped")
        return False
    process.send_signal(signal.SIGTERM)
    status = process.wait()
    print(f"stopped: exit status {status} (128 + SIGTERM = 143 means it saved and left)")
    return status == 128 + signal.SIGTERM


def main() -> int:
    shutil.rmtree(OUTPUT, ignore_errors=True)
    stopped = interrupted_run()
    say("training again: it resumes from the checkpoint it saved, then tests the best one")
    finished = subprocess.run(TRAIN, check=False).returncode
    say("the checkpoints, verified (typedbrain checkpoints)")
    command = [sys.executable, "-m", "typedbrain"]
    save = OUTPUT / "save"
    listed = subprocess.run(
        [*command, "checkpoints", str(save), "--verify", "--min-key", "error"], check=False
    ).returncode
    say("the training log, plotted (typedbrain plot)")
    plot = OUTPUT / "loss.png"
    plotted = subprocess.run(
        [*command, "plot", str(OUTPUT / "train_log.jsonl"), "--out", str(plot)], check=False
    ).returncode
    say(f"experiment folder: {OUTPUT} (hyperparams.yaml, log.txt, env.json, train logs, save/)")
    return 0 if stopped and finished == 0 and listed == 0 and plotted == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
