"""ViT-tiny (timm) trained from scratch on CIFAR-10 (data: ``harness.cifar10``; the
recipe it shares with the ``cifar`` ResNet-18 experiment: ``harness.image_classification``)."""
