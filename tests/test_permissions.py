"""Files other processes must read are readable: what `export`, `export-triton` and
`report` write gets the mode a plain `open()` would give (0666 less the umask), not
mkstemp's 0600, atomic writes included. The service image runs as its own uid and reads
models and reports written by the training container's user (docker-compose.yml)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import VAL_SIZE


def modes(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode)
        for path in folder.rglob("*")
        if path.is_file()
    }


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield 0o644
    os.umask(previous)


def test_exported_models_are_readable_by_others(models_dir):
    found = modes(models_dir)
    assert found and all(mode & 0o044 == 0o044 for mode in found.values()), found


def test_triton_repository_and_report_files_get_the_umasks_mode(
    workspace, cifar_tarball, tmp_path, umask_022
):
    run = [sys.executable, "-m", "training"]
    subprocess.run([*run, "export-triton", "--models-dir", str(workspace / "models"),
                    "--out", str(tmp_path / "repo")], check=True, timeout=300)  # fmt: skip
    subprocess.run([*run, "report", "--model", "cifar100-712868", "--models-dir",
                    str(workspace / "models"), "--reports-dir", str(tmp_path / "reports"),
                    "--data-dir", str(cifar_tarball), "--val-size", str(VAL_SIZE)],
                   check=True, timeout=900)  # fmt: skip
    for folder in (tmp_path / "repo", tmp_path / "reports"):
        found = modes(folder)
        assert found and set(found.values()) == {umask_022}, found
