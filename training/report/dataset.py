"""What the dataset itself looks like, the same for every model: images per class, mean
colours, and test images with a twin in the training set."""

import numpy as np

from training.data import Cifar100
from training.report import measures

NEAR_DUPLICATE_MAX_RMS = 8.0  # root mean square pixel difference (0-255) for "near"
OLD_HASH_BITS = 2  # the former test: 64-bit difference hashes within this many bits


def describe_dataset(data: Cifar100) -> dict:
    """What the dataset itself looks like; the same for every model."""
    test = data.test
    # The official training file is our train split plus the held-out validation images.
    train_images = np.concatenate([data.train.images, data.val.images])
    train_fine = np.concatenate([data.train.fine, data.val.fine])
    twins = measures.find_duplicates(test.images, train_images, NEAR_DUPLICATE_MAX_RMS)
    test_hashes, train_hashes = measures.dhash(test.images), measures.dhash(train_images)
    old = sum(
        bool((np.bitwise_count(train_hashes ^ h) <= OLD_HASH_BITS).any()) for h in test_hashes
    )
    labelled = [
        {
            **pair,
            "test_label": data.class_names[test.fine[pair["test"]]],
            "train_label": data.class_names[train_fine[pair["train"]]],
        }
        for pair in twins["exact"] + twins["near"]
    ]
    return {
        "train_images_per_class": np.bincount(train_fine, minlength=100).tolist(),
        "test_images_per_class": np.bincount(test.fine, minlength=100).tolist(),
        "mean_colour_per_class": [
            [round(float(v), 1) for v in test.images[test.fine == c].mean(axis=(0, 1, 2))]
            for c in range(100)
        ],
        "test_with_exact_duplicate_in_train": len(twins["exact"]),
        "test_with_near_duplicate_in_train": len(twins["near"]),
        "near_duplicate_max_rms": NEAR_DUPLICATE_MAX_RMS,
        "pixel_max": 255,
        "duplicate_pairs": labelled,
        "duplicate_pairs_with_other_label": sum(
            p["test_label"] != p["train_label"] for p in labelled
        ),
        "old_hash_test_matches": int(old),
        "old_hash_max_bits": OLD_HASH_BITS,
    }
