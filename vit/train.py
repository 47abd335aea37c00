"""Train an image classifier on CIFAR-10 with one optimizer: the paper's vit experiment.

    python -m vit.train --optimizer ikfad --seed 0 [--config FILE] [--set key=value ...] [--out DIR]
    torchrun --nproc_per_node 4 -m vit.train --optimizer ikfad --seed 0

The protocol is ``vit/configs/paper.yaml`` (timm ViT-tiny, 50 epochs, batch 128,
fp32, no clipping) and the optimizer's hyperparameters default to
``vit/configs/best.yaml``. The run directory (default ``runs/vit/<optimizer>/seed<S>``)
gets ``config.yaml``, ``metrics.jsonl``, ``summary.json`` and ``checkpoint.pt``;
re-running the command resumes it, mid-epoch included.

The recipe (CIFAR-10 loading, the epoch loop, what is recorded) is
``harness/image_classification.py``, which cifar (``python -m cifar.train``, a
ResNet-18) shares with its own configs and model: every epoch ``train``, ``val`` and
``test`` records (loss and accuracy), ``best`` the lowest validation loss, the
headline ``final.test.acc``.
"""
from __future__ import annotations

import torch

from harness.errors import command
from harness.image_classification import BEHAVIOUR_OF_OLDER_RUNS, NUM_CLASSES, config_check, train  # noqa: F401
from vit.model import ViTConfig, build_vit

check_config = config_check(ViTConfig)  # the model section by vit's model config, and the data's


def build_model(model_cfg: dict) -> torch.nn.Module:
    """vit: timm's ViT configured by paper.yaml's ``model`` section."""
    return build_vit(num_classes=NUM_CLASSES, **model_cfg)


@command
def main(argv=None) -> int:
    return train("vit", argv, build_model)


if __name__ == "__main__":
    raise SystemExit(main())
