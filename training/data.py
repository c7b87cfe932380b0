"""CIFAR-100 in its official python format, from a verified download or a local copy.

The archive holds `cifar-100-python/{train,test,meta}`: pickles of dicts with b'data'
(uint8, N x 3072: the R, G and B planes of each image, row-major), b'fine_labels',
b'coarse_labels', and in meta b'fine_label_names' and b'coarse_label_names'.

Pickles can run code when loaded. A download is unpickled only once its md5 matched the
official one, and every file, downloaded or passed with --data-dir, goes through an
unpickler that builds only what the official files hold (dicts, lists, bytes, numbers and
NumPy arrays) and refuses anything else before it runs.
"""

import difflib
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from training.atomic import umask
from training.errors import DataError, RecipeError

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
FOLDER_NAME = "cifar-100-python"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "cifar100"
VAL_SPLIT_SEED = 0  # fixed, so every run selects checkpoints on the same images


# The only globals a CIFAR-100 pickle may name: what NumPy's arrays, dtypes and scalars
# pickle as, under NumPy 1 (`numpy.core`, the official files) and NumPy 2 (`numpy._core`).
ALLOWED_GLOBALS = {
    (module, name)
    for package in ("numpy.core", "numpy._core")
    for module, name in (
        (f"{package}.multiarray", "_reconstruct"),
        (f"{package}.multiarray", "scalar"),
        (f"{package}.numeric", "_frombuffer"),
    )
} | {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2: str -> bytes, no more
}


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    fine: np.ndarray  # int64 [N], 0..99
    coarse: np.ndarray  # int64 [N], 0..19

    def __len__(self) -> int:
        return len(self.fine)

    def take(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.fine[index], self.coarse[index])


@dataclass(frozen=True)
class Cifar100:
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    superclass_names: list[str]
    fine_to_coarse: list[int]
    source: str  # where it was read from, for logs and model cards


def load(
    data_dir: Path | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    val_size: int = 5000,
) -> Cifar100:
    """Read CIFAR-100 from `data_dir` (folder or .tar.gz), or download it once into `cache_dir`."""
    source = Path(data_dir) if data_dir is not None else download(Path(cache_dir))
    files = _read_files(source)
    meta = files["meta"]
    class_names = _names(meta, b"fine_label_names", 100, "meta")
    superclass_names = _names(meta, b"coarse_label_names", 20, "meta")
    train = _split(files["train"], "train")
    test = _split(files["test"], "test")
    fine_to_coarse = _fine_to_coarse(train)
    train, val = split_validation(train, val_size)
    return Cifar100(train, val, test, class_names, superclass_names, fine_to_coarse, str(source))


def test_split(source: Path) -> Split:
    """The test split of a cifar-100-python folder or archive, read like `load` reads it
    (the same restricted unpickler), without the validation split or the names."""
    return _split(_read_files(Path(source))["test"], f"{source}:test")


def held_out_indices(data: Cifar100, names: tuple[str, ...] | list[str]) -> list[int]:
    """The class indices of `names`; RecipeError for a name the dataset does not have, or
    for names that would leave no class to train on."""
    index = {name: i for i, name in enumerate(data.class_names)}
    unknown = [name for name in names if name not in index]
    if unknown:
        hints = [
            f"{name!r} (did you mean {', '.join(close)}?)"
            if (close := difflib.get_close_matches(name, data.class_names, n=2))
            else repr(name)
            for name in unknown
        ]
        raise RecipeError(f"held-out classes not in the dataset: {', '.join(hints)}")
    indices = sorted(index[name] for name in names)
    if not np.isin(data.train.fine, indices, invert=True).any():
        raise RecipeError("held-out classes cover every class with training images: none left")
    return indices


def without_classes(data: Cifar100, names: tuple[str, ...] | list[str]) -> Cifar100:
    """`data` with the classes `names` gone from the training and validation splits. The
    test split keeps them (their images are scored apart: see evaluate.py), and the
    validation images of the other classes are the ones a run without held-out classes
    selects checkpoints on."""
    if not names:
        return data
    indices = held_out_indices(data, names)

    def keep(split: Split) -> Split:
        return split.take(np.flatnonzero(np.isin(split.fine, indices, invert=True)))

    return replace(data, train=keep(data.train), val=keep(data.val))


def download(cache_dir: Path) -> Path:
    """The official archive in `cache_dir`, downloaded and md5-verified once."""
    archive = cache_dir / ARCHIVE_NAME
    if archive.exists():
        if md5sum(archive) == MD5:
            return archive
        raise DataError(f"{archive} does not have the official md5 {MD5}; delete it to re-download")
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"Downloading CIFAR-100 from {URL} to {archive}", flush=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".download-")
    os.fchmod(fd, 0o666 & ~umask())  # readable like any downloaded file, not mkstemp's 0600
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(URL, timeout=60) as response,
            tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B",
                 unit_scale=True, desc="CIFAR-100") as progress,
        ):  # fmt: skip
            while chunk := response.read(1 << 20):
                out.write(chunk)
                progress.update(len(chunk))
        if (actual := md5sum(Path(tmp))) != MD5:
            raise DataError(f"downloaded archive has md5 {actual}, expected {MD5}; not using it")
        os.replace(tmp, archive)
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise DataError(
            f"cannot download CIFAR-100 ({err}). Without network, pass --data-dir (or set "
            f"CIFAR100_DIR) to an extracted {FOLDER_NAME} folder or to {ARCHIVE_NAME}"
        ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return archive


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def split_validation(
    train: Split, val_size: int, seed: int = VAL_SPLIT_SEED
) -> tuple[Split, Split]:
    """Hold out `val_size` training images, the same share of every class (the largest
    remainders get the rounding), so a class's training count shrinks by that share."""
    classes, counts = np.unique(train.fine, return_counts=True)
    if not 0 < val_size < len(train):
        raise DataError(f"validation size must be between 1 and {len(train) - 1}, got {val_size}")
    exact = counts * val_size / len(train)
    per_class = np.floor(exact).astype(int)
    # Stable sort: equal remainders (a balanced set) round up the lowest labels first.
    per_class[np.argsort(-(exact - per_class), kind="stable")[: val_size - per_class.sum()]] += 1
    order = np.random.default_rng(seed).permutation(len(train))
    held_out = []
    for label, size in zip(classes, per_class, strict=True):
        members = order[train.fine[order] == label]
        held_out.append(members[:size])
    val_index = np.sort(np.concatenate(held_out))
    keep = np.ones(len(train), dtype=bool)
    keep[val_index] = False
    return train.take(np.flatnonzero(keep)), train.take(val_index)


def _read_files(source: Path) -> dict[str, dict]:
    if not source.exists():
        raise DataError(f"{source} does not exist")
    if source.is_dir():
        folder = source / FOLDER_NAME if (source / FOLDER_NAME).is_dir() else source
        files = {}
        for name in ("train", "test", "meta"):
            if not (folder / name).is_file():
                raise DataError(f"{folder} is not a {FOLDER_NAME} folder: no file {name!r}")
            with (folder / name).open("rb") as f:
                files[name] = _unpickle(f, folder / name)
        return files
    try:
        with tarfile.open(source, "r:*") as tar:
            files = {}
            for name in ("train", "test", "meta"):
                try:
                    member = tar.extractfile(f"{FOLDER_NAME}/{name}")
                except KeyError:
                    member = None
                if member is None:
                    raise DataError(f"{source} has no {FOLDER_NAME}/{name}")
                files[name] = _unpickle(member, f"{source}:{name}")
            return files
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(
            f"{source} is neither a {FOLDER_NAME} folder nor a readable archive: {err}"
        ) from None


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that constructs only NumPy arrays, dtypes and scalars besides the
    built-in containers and numbers: a pickle naming anything else (a function to call,
    a class to build) is refused before that object exists."""

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, which a CIFAR-100 file never holds "
            "(refused: unpickling it could run code)"
        )


def restricted_load(f: BinaryIO):
    # encoding="bytes": the official files are Python 2 pickles, their str become bytes.
    return RestrictedUnpickler(f, encoding="bytes").load()


def _unpickle(f: BinaryIO, where: object) -> dict:
    try:
        content = restricted_load(f)
    except Exception as err:  # a bad pickle can raise almost anything
        raise DataError(f"{where} is not a CIFAR-100 pickle: {err}") from None
    if not isinstance(content, dict):
        raise DataError(f"{where} is not a CIFAR-100 pickle: holds {type(content).__name__}")
    return content


def _names(meta: dict, key: bytes, count: int, where: str) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != count:
        raise DataError(f"{where} should hold {count} names under {key!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _split(content: dict, where: str) -> Split:
    for key in (b"data", b"fine_labels", b"coarse_labels"):
        if key not in content:
            raise DataError(f"{where} is not a CIFAR-100 pickle: missing {key!r}")
    data = np.asarray(content[b"data"])
    fine = np.asarray(content[b"fine_labels"], dtype=np.int64)
    coarse = np.asarray(content[b"coarse_labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: b'data' should be uint8 N x 3072, got {data.dtype} {data.shape}")
    if not len(data) == len(fine) == len(coarse):
        raise DataError(f"{where}: {len(data)} images but {len(fine)}/{len(coarse)} labels")
    if fine.min(initial=0) < 0 or fine.max(initial=0) > 99:
        raise DataError(f"{where}: fine labels outside 0..99")
    if coarse.min(initial=0) < 0 or coarse.max(initial=0) > 19:
        raise DataError(f"{where}: coarse labels outside 0..19")
    # Planes to pixels: N x (R plane, G plane, B plane) -> N x 32 x 32 x RGB.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), fine, coarse)


def _fine_to_coarse(train: Split) -> list[int]:
    mapping = [-1] * 100
    for fine, coarse in set(zip(train.fine.tolist(), train.coarse.tolist(), strict=True)):
        if mapping[fine] not in (-1, coarse):
            raise DataError(f"fine class {fine} appears under two superclasses")
        mapping[fine] = coarse
    if -1 in mapping:
        raise DataError(f"the training set has no image of class {mapping.index(-1)}")
    return mapping
