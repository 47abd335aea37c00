"""A miniature CIFAR-10 on disk, in the official python-pickle layout (smoke runs, tests, preflight).

``make_fake_cifar10(root)`` writes ``root/cifar-10-batches-py/`` with
``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``, each a
pickled dict like the official files: ``b'data'`` a uint8 array of shape (N, 3072)
(1024 red, then 1024 green, then 1024 blue values of a row-major 32x32 image),
``b'labels'`` a list of ints in 0..9, ``b'batch_label'`` and ``b'filenames'``; the meta
file holds ``b'label_names'``. The official files are Python 2 pickles (protocol 2):
their strings are Python 2 ``str``, which load as ``bytes`` under
``pickle.load(f, encoding="bytes")`` (the dataset page's recipe) and as ``str`` under
``encoding="latin1"`` (torchvision's). We write the strings the same way, so both
loaders see what they would see on the official files.

torchvision md5-checks every file against the official checksums, which generated
files cannot match: ``UncheckedCIFAR10`` is torchvision's ``CIFAR10`` with the
checksums removed (``check_integrity(path, None)`` only checks that the file exists),
so everything else, including the parsing, is the real class. Use it with
``harness.cifar10.DATASET_CLASS = UncheckedCIFAR10`` (``unchecked_cifar10()`` does it for a
``with`` block) or ``cifar10_splits(root, dataset_cls=UncheckedCIFAR10)``.
"""
import contextlib
import io
import pickle
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class UncheckedCIFAR10(CIFAR10):
    """torchvision's CIFAR10 without the md5 checks (files must still exist)."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _Py2Str(bytes):
    """Bytes to be pickled as a Python 2 ``str`` (what every string in the official files is)."""


class _Py2Pickler(pickle._Pickler):
    """The pure-Python pickler, writing ``_Py2Str`` with the Python 2 string opcodes.

    Python 3 pickles ``bytes`` at protocol 2 as a call to ``_codecs.encode``, which
    always loads as ``bytes``; a Python 2 ``str`` is a (SHORT_)BINSTRING, which
    ``pickle.load`` decodes with its ``encoding`` argument.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2str


def _dump_py2(obj, path):
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    Path(path).write_bytes(buffer.getvalue())


def _s(text):
    return _Py2Str(text.encode("latin1"))


def _write_batch(path, batch_label, images, labels):
    filenames = [f"fake_{batch_label.replace(' ', '_')}_{i:05d}.png" for i in range(len(labels))]
    entry = {
        _s("batch_label"): _s(batch_label),
        _s("labels"): [int(y) for y in labels],
        _s("data"): images,
        _s("filenames"): [_s(name) for name in filenames],
    }
    _dump_py2(entry, path)


def make_fake_cifar10(root, n_train=500, n_test=100, seed=0):
    """Write a random CIFAR-10 with ``n_train`` training and ``n_test`` test images.

    Pixels are uniform in 0..255 and labels uniform in 0..9 (numpy generator
    ``seed``); the training images are spread over the five data batches as evenly
    as possible. Returns ``root`` (a ``Path``).
    """
    root = Path(root)
    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_images = rng.integers(0, 256, size=(n_train, 3072), dtype=np.uint8)
    train_labels = rng.integers(0, 10, size=n_train)
    for k, chunk in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _write_batch(
            folder / f"data_batch_{k}", f"training batch {k} of 5", train_images[chunk], train_labels[chunk]
        )
    test_images = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=n_test)
    _write_batch(folder / "test_batch", "testing batch 1 of 1", test_images, test_labels)
    meta = {
        _s("num_cases_per_batch"): -(-n_train // 5),
        _s("label_names"): [_s(name) for name in LABEL_NAMES],
        _s("num_vis"): 3072,
    }
    _dump_py2(meta, folder / "batches.meta")
    return root


@contextlib.contextmanager
def unchecked_cifar10():
    """Within the block, ``harness.cifar10`` reads CIFAR-10 with ``UncheckedCIFAR10``."""
    import harness.cifar10

    before = harness.cifar10.DATASET_CLASS
    harness.cifar10.DATASET_CLASS = UncheckedCIFAR10
    try:
        yield
    finally:
        harness.cifar10.DATASET_CLASS = before
