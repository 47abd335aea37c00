"""CIFAR-10 for the image experiments (vit and cifar; the recipe is ``image_classification.py``).

Splits (the same for every run seed):

- ``train``: 45,000 images of the official training set, with augmentation
  RandomCrop(32, padding=4) + RandomHorizontalFlip, then ToTensor + Normalize;
- ``val``: the other 5,000 images of the official training set, ToTensor + Normalize
  only (the released ViT code augmented its validation subset; we do not);
- ``test``: the official 10,000-image test set, ToTensor + Normalize only.

The train/validation split is a permutation of the training indices drawn from
``torch.Generator().manual_seed(42)``: the first ``n - n_val`` indices are train, the
rest validation, exactly what ``torch.utils.data.random_split(trainset, [45000, 5000],
generator=torch.Generator().manual_seed(42))`` gives. It uses a private generator, so
it neither depends on nor advances the global (run-seed) RNG.

Every item is ``(image, label)``: a float32 tensor of shape (3, 32, 32), normalised
per channel as ``(pixel / 255 - mean[c]) / std[c]``, and an ``int`` class in 0..9.
``normalize="fixed"`` uses the constants ``MEAN``/``STD`` below (the released vit code's);
``normalize="computed"`` computes them from the files, as the released cifar code does:
the mean and (population) standard deviation of each channel over every pixel of all the
official training images (50,000 on the real data, validation images included), pixels
in [0, 1]: std about (0.2470, 0.2435, 0.2616) against the fixed 0.2023/0.1994/0.2010.
The random augmentations draw from torch's global RNG, so a caller that seeds
``torch`` around ``dataset[i]`` gets the same crop and flip every time.
"""
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR10

from .cpu import available_cpus
from .errors import UsageError

# Per-channel statistics of the CIFAR-10 training images (RGB, pixels in [0, 1]): the
# values the released vit code uses (the widely copied 0.2023/0.1994/0.2010 std, not the
# exact per-pixel std; the released cifar code computes them, std about 0.2470/0.2435/0.2616).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)

SPLIT_SEED = 42
# Official sizes: 50,000 training images of which 5,000 are held out for validation.
OFFICIAL_TRAIN_SIZE = 50_000
OFFICIAL_VAL_SIZE = 5_000

# The dataset class that reads the files. Tests substitute a subclass that skips
# torchvision's md5 check (their generated files cannot match the official checksums).
DATASET_CLASS = CIFAR10

NORMALIZE = ("fixed", "computed")


def train_transform(mean=MEAN, std=STD):
    """Training images: RandomCrop(32, padding=4) + RandomHorizontalFlip, then ToTensor + Normalize."""
    return transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def eval_transform(mean=MEAN, std=STD):
    """Validation and test images: ToTensor + Normalize only."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def channel_stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``images`` (uint8, shape (N, 32, 32, 3), as
    torchvision's ``CIFAR10.data``) with pixels scaled to [0, 1], computed in float64."""
    x = torch.as_tensor(images).to(torch.float64).div_(255).reshape(-1, 3)
    return tuple(x.mean(0).tolist()), tuple(x.std(0, correction=0).tolist())


class TransformedSubset(Dataset):
    """The items ``base[indices[i]]`` with ``transform`` applied to the image.

    ``base`` must return untransformed ``(PIL image, label)`` pairs: train and
    validation share one underlying CIFAR10 training set but need different
    transforms, so the transform lives here rather than on ``base``.
    """

    def __init__(self, base, indices, transform):
        self.base = base
        self.indices = list(indices)
        self.transform = transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.base[self.indices[i]]
        return self.transform(image), int(label)


def val_size(n_train_total):
    """Validation images held out of ``n_train_total`` training images: 5,000 of 50,000,
    scaled proportionally (rounded) for smaller (test) datasets."""
    return round(n_train_total * OFFICIAL_VAL_SIZE / OFFICIAL_TRAIN_SIZE)


def train_val_indices(n_train_total):
    """Split ``range(n_train_total)`` into (train indices, validation indices).

    A permutation from ``torch.Generator().manual_seed(42)``, first ``n - val_size(n)``
    entries train and the rest validation (the order ``random_split`` uses). The
    global torch RNG is neither read nor advanced.
    """
    n_val = val_size(n_train_total)
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(n_train_total, generator=generator).tolist()
    n_train = n_train_total - n_val
    return perm[:n_train], perm[n_train:]


def _require_files(root, dataset_cls, download):
    """Raise UsageError unless the dataset files are on disk (or will be downloaded)."""
    folder = Path(root) / dataset_cls.base_folder
    names = [name for name, _ in dataset_cls.train_list + dataset_cls.test_list]
    names.append(dataset_cls.meta["filename"])
    missing = [name for name in names if not (folder / name).is_file()]
    if missing and not download:
        raise UsageError(
            f"CIFAR-10 not found in {folder} (missing {', '.join(missing)}); "
            f"add --set data.download=true to download it (~170 MB) into {root}, "
            f"or set data.root to where cifar-10-batches-py/ is"
        )


def _load(dataset_cls, root, train, download):
    """``dataset_cls(root, train=train, download=download)`` with no transform, turning
    torchvision's failures into one-line UsageErrors."""
    try:
        return dataset_cls(root, train=train, download=download)
    except RuntimeError as err:  # torchvision: files present but fail the md5 check
        raise UsageError(
            f"CIFAR-10 files in {Path(root) / dataset_cls.base_folder} are corrupted ({err}); "
            f"delete that folder and rerun with --set data.download=true"
        ) from None
    except OSError as err:  # no network, proxy, disk full, ...
        if not download:
            raise
        raise UsageError(
            f"could not download CIFAR-10 into {root} ({err}); download {dataset_cls.url} "
            f"by hand and extract it into {root}"
        ) from None


def cifar10_splits(root="data/cifar10", download=False, dataset_cls=None, normalize="fixed"):
    """The train/val/test datasets of CIFAR-10 under ``root``.

    Args:
        root: folder holding (or to receive) ``cifar-10-batches-py/``.
        download: fetch the official archive into ``root`` if it is not there.
            Under multi-process training let one process download first.
        dataset_cls: the torchvision-style class that reads the files; ``None``
            means the module-level ``DATASET_CLASS`` (torchvision's ``CIFAR10``).
        normalize: ``"fixed"`` (the constants ``MEAN``/``STD``) or ``"computed"``
            (``channel_stats`` of all the official training images).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` of ``TransformedSubset``s with
        45,000 / 5,000 / 10,000 items on the official data.

    Raises:
        UsageError: the files are missing and ``download`` is false, they are
            corrupted, or the download failed.
    """
    if normalize not in NORMALIZE:
        raise UsageError(f"data.normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    dataset_cls = DATASET_CLASS if dataset_cls is None else dataset_cls
    root = os.fspath(root)
    _require_files(root, dataset_cls, download)
    trainset = _load(dataset_cls, root, train=True, download=download)
    testset = _load(dataset_cls, root, train=False, download=False)
    train_idx, val_idx = train_val_indices(len(trainset))
    stats = channel_stats(trainset.data) if normalize == "computed" else (MEAN, STD)
    return {
        "train": TransformedSubset(trainset, train_idx, train_transform(*stats)),
        "val": TransformedSubset(trainset, val_idx, eval_transform(*stats)),
        "test": TransformedSubset(testset, range(len(testset)), eval_transform(*stats)),
    }


def loader_kwargs(device):
    """DataLoader keyword arguments for ``device`` (a ``torch.device`` or string).

    On CUDA: up to 4 worker processes per training process (the CPUs this process
    may use, shared among the processes torchrun starts on the node), pinned
    memory, and workers kept alive across epochs. On CPU: load in the main process,
    which keeps runs single-process and tests fast.
    """
    if torch.device(device).type != "cuda":
        return {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    cpus = available_cpus()
    procs_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = min(4, max(1, cpus // procs_per_node))
    return {"num_workers": workers, "pin_memory": True, "persistent_workers": True}
