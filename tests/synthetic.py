"""The tests' small dataset: training/synthetic.py writes it (`make gpu-check` uses it too,
from the training image, where tests/ is not installed); the tests import it from here."""

from training.synthetic import (
    CLASS_NAMES,
    FINE_TO_COARSE,
    SUPERCLASS_NAMES,
    make_images,
    write_cifar100,
    write_tarball,
)

__all__ = [
    "CLASS_NAMES",
    "FINE_TO_COARSE",
    "SUPERCLASS_NAMES",
    "make_images",
    "write_cifar100",
    "write_tarball",
]
