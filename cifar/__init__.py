"""ResNet-18 trained from scratch on CIFAR-10 (data from ``vit.data``)."""
