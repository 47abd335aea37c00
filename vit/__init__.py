"""ViT-tiny (timm) trained from scratch on CIFAR-10; ``vit.data`` is also the CIFAR-10
data module of the ``cifar`` (ResNet-18) experiment."""
