"""The project's own commands in processes of their own: `python -m MODULE ...` or
`python -c CODE ...` with this interpreter, from the repository root (so this checkout's
packages are the ones imported, whatever folder the caller runs in), output captured as
text. gpu-check runs training through it; the bench and the tests run the score job and
their probes through it.

Standard library only: `make gpu-check` imports training.gpu_check, and so this, with a
bare Python before it installs anything.
"""

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STDERR_TAIL = 4000  # characters of a failed process's stderr its error carries


class ProcessFailed(subprocess.CalledProcessError):
    """A process exited non-zero: the command and the end of what it wrote to stderr."""

    def __str__(self) -> str:
        shown = " ".join(["python", *self.cmd[1:]])
        return f"{shown} failed (exit {self.returncode}):\n{self.stderr[-STDERR_TAIL:]}"


def run_python(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`python ARGS` (args begin with "-m", MODULE or "-c", CODE) until it exits.

    With check, a non-zero exit raises ProcessFailed (its stdout and stderr on it);
    without, the caller reads the returncode. subprocess.TimeoutExpired after `timeout`
    seconds, the process killed."""
    done = subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise ProcessFailed(done.returncode, done.args, done.stdout, done.stderr)
    return done
