"""The zoo's architectures and data config (shared by :mod:`fanlens.zoo` and its training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .._validation import FanlensError

ZOO_NAMES = ("vit", "fan", "cnn")
HEADS = {"vit-h1": 1, "vit-h2": 2, "vit": 4, "vit-h8": 8}
"""The ViTs that differ only in their number of heads (claim C4); ``vit`` is the 4-head one."""
HEAD_VARIANTS = tuple(n for n in HEADS if n not in ZOO_NAMES)
ALL_NAMES = ZOO_NAMES + HEAD_VARIANTS
WIDTH, DEPTH, PATCH = 128, 8, 8
WEIGHTS_DIR = Path(__file__).parent / "weights"
ZOO_DATA_CONFIG = {
    "input_size": (3, 64, 64),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
    "crop_mode": "center",
    "interpolation": "bilinear",
    "num_classes": 8,
}


def _conv_stem_embed(**kwargs: Any) -> nn.Module:
    """timm's PatchEmbed with FAN's convolutional stem as its projection (three stride-2 3x3
    conv + BatchNorm stages, GELU between): the zoo ViT and FAN differ in their blocks only."""
    from timm.layers import PatchEmbed

    from ..models.fan import ConvPatchEmbed

    embed = PatchEmbed(**kwargs)
    embed.proj = ConvPatchEmbed(kwargs["patch_size"], kwargs.get("in_chans", 3), kwargs["embed_dim"]).proj
    return embed


def _vit(heads: int = 4) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=64, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=heads,
                             num_classes=8, class_token=False, global_pool="avg", embed_layer=_conv_stem_embed)


def _fan() -> nn.Module:
    from ..models.fan import FAN

    return FAN(img_size=64, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=4, mlp_ratio=3.0,
               num_classes=8, tokens_norm=True, cls_attn_layers=1)


def _cnn() -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=8, channels=(24, 48, 96, 192))


def _vit_card(heads: int) -> dict[str, Any]:
    return dict(cls="timm VisionTransformer", img_size=64, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                num_heads=heads, mlp_ratio=4.0, num_classes=8, class_token=False, global_pool="avg",
                patch_embed="convolutional stem (fanlens.models.fan.ConvPatchEmbed layout)")


ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    **{name: ((lambda h=h: _vit(h)), _vit_card(h)) for name, h in HEADS.items()},
    "fan": (_fan, dict(cls="fanlens.models.fan.FAN", img_size=64, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                       num_heads=4, mlp_ratio=3.0, num_classes=8, tokens_norm=True, cls_attn_layers=1,
                       patch_embed="convolutional stem")),
    "cnn": (_cnn, dict(cls="timm ResNet", block="BasicBlock", layers=[2, 2, 2, 2], channels=[24, 48, 96, 192],
                       stem="timm's default: 7x7 conv with 64 channels, stride 2, max-pool", num_classes=8)),
}


def check_name(name: str) -> str:
    if name not in ALL_NAMES:
        raise FanlensError(f"zoo model must be one of {ALL_NAMES}. Got {name!r} instead.")
    return name


def build(name: str, *, seed: int = 0) -> nn.Module:
    """A randomly initialised zoo architecture (seeded, the caller's RNG untouched), eval mode."""
    check_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = ARCHITECTURES[name][0]()
    model.pretrained_cfg = dict(ZOO_DATA_CONFIG, architecture=f"zoo:{name}")
    return model.eval()
