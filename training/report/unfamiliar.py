"""Other images, for the report's familiarity section: `python -m training report
--unfamiliar PATH`, where PATH is

    a folder of image files of any size (searched recursively, in name order), each made
    32x32 exactly as the service makes an upload sent with resize=true: contract/images.py's
    decoding (first frame, RGB, alpha on white, centre crop, Lanczos); files it cannot
    read (a README, a damaged JPEG) are counted as skipped, not fatal;
    or a cifar-100-python folder or archive: its test images, read like the training data.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from contract.errors import InvalidImage, UploadTooLarge
from contract.images import bound_metadata, decode, open_image
from training import data as cifar
from training.errors import DataError, ReportError

# Pixels one file may decode to (after a JPEG's reduced-scale draft): Pillow's own
# decompression-bomb limit, far above any photo; the service's per-request limit is lower.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class ImageSet:
    name: str  # what the report calls the set: the folder's or the archive's name
    source: str  # the path it was read from
    kind: str  # "image files" or "CIFAR-100 test split"
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    skipped: int  # files that are not images the service could read


def load(path: Path) -> ImageSet:
    """The images at `path`; ReportError if there are none."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"--unfamiliar {path}: no such file or folder")
    if is_cifar(path):
        try:
            images = cifar.test_split(path).images
        except DataError as err:
            raise ReportError(f"--unfamiliar {path}: {err}") from None
        found = ImageSet(path.name, str(path), "CIFAR-100 test split", images, 0)
    elif path.is_dir():
        images, skipped = image_files(path)
        found = ImageSet(path.name, str(path), "image files", images, skipped)
    else:
        raise ReportError(
            f"--unfamiliar {path}: neither a folder of images nor a cifar-100-python archive"
        )
    if not len(found.images):
        raise ReportError(f"--unfamiliar {path}: no image in it could be read")
    return found


def is_cifar(path: Path) -> bool:
    """A cifar-100-python folder (or its parent), or any file: an archive is tried as one."""
    if path.is_file():
        return True
    folder = path / cifar.FOLDER_NAME if (path / cifar.FOLDER_NAME).is_dir() else path
    return all((folder / name).is_file() for name in ("train", "test", "meta"))


def image_files(folder: Path) -> tuple[np.ndarray, int]:
    """Every file under `folder` the service would accept with resize=true, as uint8
    [N, 32, 32, 3] in path order, and how many files were skipped."""
    bound_metadata()  # the service's caps on what a PNG's text may inflate to
    images, skipped = [], 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            images.append(decode(open_image(path.read_bytes(), True, MAX_PIXELS)))
        except (InvalidImage, UploadTooLarge, OSError):
            skipped += 1
    stacked = np.stack(images) if images else np.zeros((0, 32, 32, 3), dtype=np.uint8)
    return stacked, skipped
