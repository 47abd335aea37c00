"""Train the CIFAR ResNet-18 on CIFAR-10 with one optimizer: the paper's cifar experiment.

    python -m cifar.train --optimizer cadam --seed 1 [--config FILE] [--set key=value ...] [--out DIR]
    torchrun --nproc_per_node 4 -m cifar.train --optimizer cadam --seed 1

The CIFAR-10 recipe vit shares (``harness/image_classification.py``: CIFAR-10
loading, the epoch loop, per-epoch train and validation loss/accuracy) with cifar's
configs (``cifar/configs/paper.yaml``: 40 epochs, batch 64, fp32, no clipping) and
the ResNet-18 of ``cifar/model.py``. As the release's ``cifar/train.py`` (line 171),
the test set is evaluated once, on the final weights after the last epoch: the
``test`` record and the headline ``final.test.acc`` (``test_acc`` in
``summary.json``). ``train.keep_best: true`` also keeps the weights with the best
validation accuracy in ``best_model.pt`` (the release's ``best.pth``, lines 160-168)
and evaluates them on the test set at the end: a second number, the
``test_at_best_val`` record (``test_acc_best_val`` in ``summary.json``).
"""
from __future__ import annotations

import torch

from cifar.model import ResNetConfig, resnet18
from harness.errors import command
from harness.image_classification import BEHAVIOUR_OF_OLDER_RUNS, NUM_CLASSES, config_check, train  # noqa: F401

check_config = config_check(ResNetConfig)  # the model section by cifar's model config, and the data's


def build_model(model_cfg: dict) -> torch.nn.Module:
    """The CIFAR ResNet-18 (``model.width`` 64, the paper's; smaller only for smoke tests)."""
    return resnet18(num_classes=NUM_CLASSES, **model_cfg)


@command
def main(argv=None) -> int:
    return train("cifar", argv, build_model)


if __name__ == "__main__":
    raise SystemExit(main())
