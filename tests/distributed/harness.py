"""Starting the ranks of a distributed test as separate processes, and never leaving one behind.

Each rank is ``python -m tests.distributed.worker SCENARIO`` with the environment torchrun would
give it. A thread per process collects its output (stdout and stderr together), so the test can
wait for the ``READY`` line and then bound how long the rest may take.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
STARTUP_SECONDS: Final = 90.0  # importing torch on two busy cores can take a while

# Variables a launcher sets; the test's own are removed so that they cannot leak in.
_LAUNCHER_VARIABLES: Final = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def base_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without launcher variables, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _LAUNCHER_VARIABLES and not key.startswith("TORCHELASTIC_")
    }
    # The repository first, then whatever this process was given (packages outside a venv).
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": path,
            # A rank found hanging is sent SIGABRT, on which it prints every thread's stack.
            "PYTHONFAULTHANDLER": "1",
        }
    )
    env.update(extra)
    return env


class Process:
    """A started process whose output lines are collected as they come."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str]) -> None:
        self.popen = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("READY"):
                self.ready.set()

    @property
    def output(self) -> str:
        """Everything the process printed so far."""
        return "\n".join(self.lines)

    def results(self) -> list[dict[str, object]]:
        """The ``RESULT`` objects it printed, in order."""
        found: list[dict[str, object]] = []
        for line in self.lines:
            if line.startswith("RESULT "):
                found.append(json.loads(line.removeprefix("RESULT ")))
        return found

    def wait(self, seconds: float) -> int | None:
        """Its exit status, or ``None`` if it is still running after ``seconds``."""
        try:
            status = self.popen.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(timeout=5)
        return status

    def dump_stacks(self) -> None:
        """Have it print its threads' Python stacks (faulthandler, on SIGABRT) if it still runs.

        The process ends there (SIGABRT's default action follows the dump); its output then
        holds where it was stuck.
        """
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGABRT)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                return
            self._reader.join(timeout=5)

    def kill(self) -> None:
        """Stop it with SIGKILL if it is still running."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)
        self._reader.join(timeout=5)


def wait_ready(processes: Sequence[Process], seconds: float = STARTUP_SECONDS) -> None:
    """Wait until every process printed ``READY``; fail with their output otherwise."""
    deadline = time.monotonic() + seconds
    for process in processes:
        if not process.ready.wait(timeout=max(0.0, deadline - time.monotonic())):
            outputs = "\n---\n".join(p.output for p in processes)
            raise AssertionError(f"a rank did not get its process group up:\n{outputs}")


@contextmanager
def ranks(
    scenario: str,
    scratch: Path,
    *,
    world_size: int = 2,
    extra: Mapping[str, str] | None = None,
) -> Iterator[list[Process]]:
    """Start ``world_size`` ranks of ``scenario``; kill whichever still runs on leaving."""
    port = free_port()
    processes: list[Process] = []
    try:
        for rank in range(world_size):
            env = base_environment(
                {
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(world_size),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                    "TB_SCRATCH": str(scratch),
                    **(extra or {}),
                }
            )
            command = [sys.executable, "-m", "tests.distributed.worker", scenario]
            processes.append(Process(command, env))
        yield processes
    finally:
        for process in processes:
            process.kill()


def finish(processes: Sequence[Process], seconds: float) -> list[int]:
    """Wait for every process to exit within ``seconds`` overall; their exit statuses."""
    deadline = time.monotonic() + seconds
    statuses: list[int] = []
    for process in processes:
        status = process.wait(max(0.0, deadline - time.monotonic()))
        if status is None:
            for each in processes:
                each.dump_stacks()
            outputs = "\n---\n".join(p.output for p in processes)
            raise AssertionError(f"a rank was still running after {seconds} s:\n{outputs}")
        statuses.append(status)
    return statuses
