"""A real command killed mid-run, as a power cut or the OOM killer would: the tests of
resuming training, `train-export` and the score job start it and kill it at a chosen
moment, then check what a rerun makes of what it left."""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def kill_when(
    command: Sequence[str | Path],
    ready: Callable[[], bool],
    what: str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 900,
) -> None:
    """Start `command` in a process group of its own, wait until `ready()` holds, then
    SIGKILL the group (the command and anything it started) and reap it. Fails the test,
    naming `what` it waited for, when the command exits first or `timeout` seconds pass (a
    hang, not a speed limit)."""
    process = subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, f"exit {process.returncode} before {what}"
            assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it exited: nothing left to kill
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
