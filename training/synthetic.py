"""A small CIFAR-100 look-alike in the official `cifar-100-python` pickle format.

Each class is a fixed random 4x4 colour pattern blown up to 32x32, plus noise: different
enough between classes that a CNN can learn them in a few epochs, so tests can tell a
training loop that learns from one that does not. Superclasses group five classes each,
in a shuffled order so that no code can get away with assuming fine // 5.
"""

import pickle
import tarfile
from pathlib import Path

import numpy as np

CLASS_NAMES = [f"class_{i:02d}" for i in range(100)]
SUPERCLASS_NAMES = [f"superclass_{i:02d}" for i in range(20)]
FINE_TO_COARSE = np.random.default_rng(7).permutation(np.repeat(np.arange(20), 5)).tolist()


def make_images(labels: np.ndarray, seed: int, noise: float = 24.0) -> np.ndarray:
    """uint8 [N, 32, 32, 3] images of the given classes."""
    templates = np.random.default_rng(1234).integers(0, 256, size=(100, 4, 4, 3))
    big = templates.repeat(8, axis=1).repeat(8, axis=2).astype(np.float32)
    rng = np.random.default_rng(seed)
    images = big[labels] + rng.normal(0, noise, size=(len(labels), 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8)


def write_cifar100(root: Path, train_per_class: int = 20, test_per_class: int = 5) -> Path:
    """Write root/cifar-100-python/{train,test,meta}; return that folder."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_class, seed in (("train", train_per_class, 1), ("test", test_per_class, 2)):
        labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(100), per_class))
        images = make_images(labels, seed)
        content = {
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))],
            b"batch_label": f"{name} batch".encode(),
            b"fine_labels": labels.tolist(),
            b"coarse_labels": [FINE_TO_COARSE[label] for label in labels],
            # N x 3072: each image's R plane, then G, then B, each row-major.
            b"data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1),
        }
        (folder / name).write_bytes(pickle.dumps(content))
    meta = {
        b"fine_label_names": [n.encode() for n in CLASS_NAMES],
        b"coarse_label_names": [n.encode() for n in SUPERCLASS_NAMES],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return folder


def write_tarball(folder: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    return path
