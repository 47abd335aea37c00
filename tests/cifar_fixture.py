"""The miniature CIFAR-10 of the tests: now ``harness.fake_cifar10`` (the preflight uses it too)."""
from harness.fake_cifar10 import LABEL_NAMES, UncheckedCIFAR10, make_fake_cifar10, read_raw

__all__ = ["LABEL_NAMES", "UncheckedCIFAR10", "make_fake_cifar10", "read_raw"]
