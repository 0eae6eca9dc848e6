"""The embedded default: small models trained by fanlens on its procedural shapes.

Three architectures of similar size (1.6-1.8 M parameters), 64 x 64 input, 8 classes
(:mod:`fanlens.synthetic`), trained with one budget (3,000 steps of 64 images):

- ``vit``: a timm VisionTransformer (patch 8, width 128, depth 8, 4 heads, global average
  pool) with FAN's convolutional stem as its patch embedding;
- ``fan``: fanlens' FAN (patch 8, width 128, depth 8, 4 heads, one class-attention block);
- ``cnn``: a timm ResNet-18 layout (BasicBlock 2-2-2-2, 24-192 channels).

and, for the claim that more heads give more robustness (C4), ``vit-h1``, ``vit-h2`` and
``vit-h8``: the ViT with 1, 2 and 8 heads, nothing else changed (:data:`HEADS`).

They are small models on small synthetic data, trained in minutes on a laptop CPU by
``fanlens train-zoo`` (:mod:`fanlens.zoo.training`, :func:`train`); they show the analysis
working offline, not the behaviour of the paper's ImageNet models. Weights ship in
``fanlens/zoo/weights`` as fp16 safetensors with a JSON card each (architecture, budget,
data seed, wall time, validation accuracy, accuracy at the training snapshots).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .._validation import FanlensError
from ..models._loading import (RANDOM_INIT, LoadedModel, file_sha256, load_state_dict_checked,
                               register_spec_prefix)

__all__ = ["ZOO_NAMES", "HEADS", "HEAD_VARIANTS", "ALL_NAMES", "WEIGHTS_DIR", "ZOO_DATA_CONFIG", "build", "load",
           "card", "available", "train"]

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


def _check_name(name: str) -> str:
    if name not in ALL_NAMES:
        raise FanlensError(f"zoo model must be one of {ALL_NAMES}. Got {name!r} instead.")
    return name


def build(name: str, *, seed: int = 0) -> nn.Module:
    """A randomly initialised zoo architecture (seeded, the caller's RNG untouched), eval mode."""
    _check_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = ARCHITECTURES[name][0]()
    model.pretrained_cfg = dict(ZOO_DATA_CONFIG, architecture=f"zoo:{name}")
    return model.eval()


def _paths(name: str) -> tuple[Path, Path]:
    return WEIGHTS_DIR / f"{name}.safetensors", WEIGHTS_DIR / f"{name}.json"


def available() -> list[str]:
    """Zoo models whose trained weights are installed."""
    return [n for n in ALL_NAMES if all(p.is_file() for p in _paths(n))]


def card(name: str) -> dict:
    """The JSON card of a trained zoo model."""
    _check_name(name)
    path = _paths(name)[1]
    if not path.is_file():
        raise FanlensError(f"zoo model {name!r} has no trained weights installed; run `fanlens train-zoo {name}`.")
    return json.loads(path.read_text())


def load(name: str, *, random_init: bool = False, seed: int = 0) -> LoadedModel:
    """A zoo model in eval mode: trained weights (offline, from the package) or its random-init twin.

    Args:
        name: ``"vit"``, ``"fan"`` or ``"cnn"``.
        random_init: the same architecture, randomly initialised with ``seed`` (the baseline).
    """
    model = build(name, seed=seed)
    if random_init:
        return LoadedModel(model, f"zoo:{name}", RANDOM_INIT, RANDOM_INIT)
    weights, _ = _paths(name)
    card(name)  # clear error when missing
    from safetensors.torch import load_file

    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    load_state_dict_checked(model, sd, repr(str(weights)))
    return LoadedModel(model.eval(), f"zoo:{name}", str(weights.name), file_sha256(weights))


register_spec_prefix("zoo:", load, build)

from .training import train  # noqa: E402  (the public entry point: fanlens.zoo.train(model, budget_s=...))
