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
from timm.models.vision_transformer import VisionTransformer


def build_vit(num_classes=10, img_size=32, patch_size=4, embed_dim=192, depth=9, num_heads=3, drop_rate=0.1):
    """ViT-tiny as in the paper: maps (B, 3, img_size, img_size) images to (B, num_classes) logits."""
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=3,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        drop_rate=drop_rate,
    )
