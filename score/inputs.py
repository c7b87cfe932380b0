"""What to score: the list of inputs, in a fixed order, so that a rerun cuts the same shards.

a folder        every regular file under it (hidden ones aside), sorted: a file that is
                not an image is listed too and becomes an error row, not a silent gap
a glob          `photos/**/*.jpg` (quoted), the files it matches, sorted
a list          .parquet or .csv with a `path` column (--column): local paths (relative
                ones to the list's folder) or object store URIs (s3://...), in its order
CIFAR-100       a cifar-100-python folder or archive: the images of one split, read by
                training/data.py's restricted unpickler (their pixels, no file each)
"""

import csv
import glob
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


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
        files = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
        return Inputs([os.path.abspath(p) for p in files], None, "glob")
    if not path.exists():
        raise InputError(f"{source} does not exist")
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


def folder_files(folder: Path) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(root, n) for n in names if not n.startswith(".")]
    return sorted(os.path.abspath(f) for f in files if os.path.isfile(f))


def read_list(path: Path, column: str) -> list[str]:
    if path.suffix.lower() == ".parquet":
        table = pq.read_table(path)
        if column not in table.column_names:
            raise InputError(f"{path} has no column {column!r}; it has {table.column_names}")
        values = table[column].to_pylist()
    else:
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            if column not in (reader.fieldnames or []):
                raise InputError(f"{path} has no column {column!r} in its header row")
            values = [row[column] for row in reader]
    if any(not isinstance(v, str) or not v for v in values):
        raise InputError(f"{path}: column {column!r} has empty or non-text values")
    return [v if "://" in v else os.path.abspath(path.parent / v) for v in values]


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
