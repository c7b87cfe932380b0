"""What to score: the list of inputs, in a fixed order, so that a rerun cuts the same shards.

a folder        every entry under it but its sub-folders (hidden ones aside), sorted: a
                file that is not an image, and anything that is not a regular file (a
                FIFO, a socket, a device, a dangling link, a symlink loop, a link to a
                folder, which is not followed), is listed too and becomes an error row,
                not a silent gap; a sub-folder that cannot be listed stops the job
a glob          `photos/**/*.jpg` (quoted), what it matches but folders, sorted
a list          .parquet or .csv with a `path` column (--column): local paths (relative
                ones to the list's folder) or object store URIs (s3://...), in its order
CIFAR-100       a cifar-100-python folder or archive: the images of one split, read by
                training/data.py's restricted unpickler (their pixels, no file each)
"""

import csv
import glob
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from contract.files import NotRegularFile


class InputError(Exception):
    """The input cannot be listed: the job stops before it starts, with this message."""


@dataclass(frozen=True)
class Inputs:
    paths: list[str]  # one per image: a file, a URI, or `<archive>#<split>/<n>`
    pixels: np.ndarray | None  # uint8 [N, 32, 32, 3] when already decoded (CIFAR-100)
    kind: str  # folder, glob, list or cifar-100


def list_inputs(source: str, column: str = "path", split: str = "test") -> Inputs:
    path = Path(source)
    if glob.has_magic(source):
        files = sorted(p for p in glob.glob(source, recursive=True) if listed(p))
        return Inputs([os.path.abspath(p) for p in files], None, "glob")
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise InputError(f"{source}: {err.strerror}") from None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):  # a FIFO would hang the listing
        raise InputError(f"{source}: {NotRegularFile(source, mode).strerror}")
    if path.is_dir() and not is_cifar_folder(path):
        return Inputs(folder_files(path), None, "folder")
    if path.suffix.lower() in (".parquet", ".csv"):
        return Inputs(read_list(path, column), None, "list")
    if path.is_dir() or tarfile.is_tarfile(path):
        return cifar(path, split)
    raise InputError(
        f"{source}: not a folder, a glob, a .parquet or .csv list of paths, or a "
        "cifar-100-python folder or archive"
    )


def listed(path: str) -> bool:
    """Whether a folder's entry or a glob's match is an input: anything but a folder the
    listing goes into. A symlink to a folder is an input (an error row), not followed:
    links may loop."""
    return os.path.islink(path) or not os.path.isdir(path)


def folder_files(folder: Path) -> list[str]:
    def unlistable(err: OSError) -> None:
        raise InputError(f"{err.filename}: cannot be listed ({err.strerror})")

    files = []
    for root, dirs, names in os.walk(folder, onerror=unlistable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        entries = [os.path.join(root, n) for n in [*dirs, *names] if not n.startswith(".")]
        files += [entry for entry in entries if listed(entry)]
    return sorted(os.path.abspath(f) for f in files)


def read_list(path: Path, column: str) -> list[str]:
    try:
        values = list_values(path, column)
    except (OSError, ValueError, csv.Error, pa.ArrowException) as err:
        raise InputError(f"{path}: cannot be read as a list of paths ({err})") from None
    if any(not isinstance(v, str) or not v for v in values):
        raise InputError(f"{path}: column {column!r} has empty or non-text values")
    return [v if "://" in v else os.path.abspath(path.parent / v) for v in values]


def list_values(path: Path, column: str) -> list:
    if path.suffix.lower() == ".parquet":
        table = pq.read_table(path)
        if column not in table.column_names:
            raise InputError(f"{path} has no column {column!r}; it has {table.column_names}")
        return table[column].to_pylist()
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        if column not in (reader.fieldnames or []):
            raise InputError(f"{path} has no column {column!r} in its header row")
        return [row[column] for row in reader]


def is_cifar_folder(path: Path) -> bool:
    folder = path / "cifar-100-python" if (path / "cifar-100-python").is_dir() else path
    return (folder / "meta").is_file() and (folder / "test").is_file()


def cifar(path: Path, split: str) -> Inputs:
    from training.data import DataError, test_split

    if split != "test":
        raise InputError(f"only the test split of {path} can be scored, not {split!r}")
    try:
        images = test_split(path).images
    except DataError as err:
        raise InputError(str(err)) from None
    name = os.path.abspath(path)
    return Inputs([f"{name}#{split}/{i}" for i in range(len(images))], images, "cifar-100")
