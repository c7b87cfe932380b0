"""training/processes.py: the project's commands in processes of their own, as gpu-check,
the bench and the tests run them; and tests/interrupt.py, which kills one mid-run."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.interrupt import kill_when
from training.processes import STDERR_TAIL, ProcessFailed, run_python

CHECKOUT = Path(__file__).resolve().parent.parent  # the folder holding tests/ and training/


def test_runs_this_interpreter_from_the_checkout_whatever_the_callers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = run_python(
        "-c", "import os, sys, training; print(os.getcwd(), sys.executable, training.__file__)"
    )
    cwd, python, package = done.stdout.split()
    assert Path(cwd) == CHECKOUT
    assert python == sys.executable
    assert Path(package) == CHECKOUT / "training" / "__init__.py"


def test_a_failure_carries_the_command_its_exit_and_the_end_of_its_stderr():
    script = "import sys; print('so far'); sys.stderr.write('x' * 9000 + 'the cause'); sys.exit(3)"
    with pytest.raises(ProcessFailed) as failed:
        run_python("-c", script, "an-argument")
    error = failed.value
    assert isinstance(error, subprocess.CalledProcessError)
    assert error.returncode == 3 and error.stdout == "so far\n"
    message = str(error)
    assert message.startswith(f"python -c {script} an-argument failed (exit 3):\n")
    tail = message.split("\n", 1)[1]
    assert tail == "x" * (STDERR_TAIL - len("the cause")) + "the cause"  # not all 9,000


def test_without_check_the_caller_reads_the_exit():
    done = run_python("-c", "import sys; sys.stderr.write('no'); sys.exit(2)", check=False)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", "no")


def test_a_process_past_its_timeout_is_stopped():
    with pytest.raises(subprocess.TimeoutExpired):
        run_python("-c", "import time; time.sleep(60)", timeout=0.5)


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever inherited it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_kill_when_kills_the_command_and_what_it_started(tmp_path):
    started = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen(['sleep', '60']); "
        f"open({str(started)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    kill_when(
        [sys.executable, "-c", script],
        lambda: bool(started.exists() and started.read_text()),
        "the child",
    )
    child = int(started.read_text())
    deadline = time.monotonic() + 10
    while not dead(child):
        assert time.monotonic() < deadline, "the command's child outlived it"
        time.sleep(0.05)


def test_kill_when_fails_when_the_command_exits_first():
    with pytest.raises(AssertionError, match="exit 3 before the moment"):
        kill_when(
            [sys.executable, "-c", "raise SystemExit(3)"], lambda: False, "the moment", timeout=30
        )
