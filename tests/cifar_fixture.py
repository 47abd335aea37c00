"""The miniature CIFAR-10 of the tests: ``harness.fake_cifar10`` (the preflight uses it too), and
``read_raw``, the tests' independent reader of the files it writes (plain pickle: the tests read
back only the files they just generated, so it stays out of the package)."""
import pickle
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10

from harness.fake_cifar10 import LABEL_NAMES, UncheckedCIFAR10, make_fake_cifar10

__all__ = ["LABEL_NAMES", "UncheckedCIFAR10", "make_fake_cifar10", "read_raw"]


def read_raw(root, train):
    """The uint8 images (N, 32, 32, 3) and labels of the files ``make_fake_cifar10`` wrote,
    read with plain pickle, in the order torchvision concatenates them."""
    folder = Path(root) / CIFAR10.base_folder
    names = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        images.append(entry[b"data"])
        labels.extend(entry[b"labels"])
    images = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels
