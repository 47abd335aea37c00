"""The paper's ViT-tiny for 32x32 CIFAR-10 images: timm's ``VisionTransformer``.

Patch size 4 turns a 32x32 image into 8x8 = 64 patches, plus a class token: a
sequence of 65 tokens of width 192 through 9 pre-norm transformer blocks with 3
heads (64 dims each) and GELU MLPs of width 4 x 192 = 768 (timm's default
``mlp_ratio=4``, with qkv biases, a learned position embedding for all 65 tokens
and a final LayerNorm: this is what gives the paper's ~4.0M, exactly 4,028,170
parameters with 10 classes: 9 blocks x 444,864 + patch embedding 9,408 + class
token 192 + position embedding 12,480 + final norm 384 + head 1,930). The class
token's final state feeds a linear head.

``drop_rate`` is timm's head dropout: in timm >= 0.9 (the paper used timm 1.0) it is
applied only to the pooled features before the classifier; the position, attention,
projection and path dropouts keep timm's default of 0 (the release's ``drop_rate=0.1``,
its ``vit/model.py``, is this one argument).
"""
from dataclasses import dataclass

from timm.models.vision_transformer import VisionTransformer

from harness.config import check_count, check_multiple, check_probability


@dataclass(frozen=True)
class ViTConfig:
    """The ``model`` section of vit's configs (the paper's ViT-tiny by default); a value no
    model can use is a one-line UsageError naming its key when the config is made."""

    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 9
    num_heads: int = 3
    drop_rate: float = 0.1

    def __post_init__(self):
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            check_count(f"model.{name}", getattr(self, name))
        check_multiple("model.embed_dim", self.embed_dim, "model.num_heads", self.num_heads)
        check_multiple("model.img_size", self.img_size, "model.patch_size", self.patch_size)
        check_probability("model.drop_rate", self.drop_rate)


def build_vit(num_classes=10, **model):
    """ViT-tiny as in the paper (``model``: ``ViTConfig``'s fields, its defaults where left out):
    maps (B, 3, img_size, img_size) images to (B, num_classes) logits."""
    cfg = ViTConfig(**model)
    return VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=3,
        num_classes=num_classes,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=4.0,
        drop_rate=cfg.drop_rate,
    )
