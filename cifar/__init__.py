"""ResNet-18 trained from scratch on CIFAR-10 (data: ``harness.cifar10``; the recipe it shares with vit: ``harness.image_classification``)."""
