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
TASKS = {
    "shapes": dict(num_classes=8, weights=WEIGHTS_DIR, cnn_maxpool=True, dataset="SyntheticShapes", stop_at=None),
    "textures": dict(num_classes=10, weights=WEIGHTS_DIR / "textures", cnn_maxpool=False,
                     dataset="SyntheticTextures", stop_at=0.92),
}
"""The zoo's tasks (:mod:`fanlens.synthetic`): classes, where the weights live, whether the CNN keeps
timm's max-pool (the textures task drops it: stride 16, so the last stage is 4 x 4 = 16 tokens at 64 x 64),
and the zoo networks' stopping rule (``stop_at``: training ends at the first validation check at or above
this accuracy, so that no network sits at the ceiling; see :func:`fanlens.zoo.training.train_model`)."""
DEFAULT_TASK = "textures"
"""The task of the zoo that ``zoo:NAME`` and ``fanlens reproduce`` use."""
SEEDS = (0, 1, 2)
"""The training seeds of the zoo networks (init and data order): ``NAME`` is seed 0, ``NAME@1``, ``NAME@2``."""
ZOO_DATA_CONFIG = {
    "input_size": (3, 64, 64),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
    "crop_mode": "center",
    "interpolation": "bilinear",
    "num_classes": 8,
}


def check_task(task: str) -> str:
    if task not in TASKS:
        raise FanlensError(f"task must be one of {tuple(TASKS)}. Got {task!r} instead.")
    return task


def data_config(task: str = DEFAULT_TASK) -> dict:
    """The preprocessing config of the zoo models of ``task``."""
    return dict(ZOO_DATA_CONFIG, num_classes=TASKS[check_task(task)]["num_classes"])


def network_name(name: str, seed: int = 0) -> str:
    """The file and spec name of a zoo network: ``vit`` for seed 0, ``vit@1`` for seed 1."""
    return name if int(seed) == 0 else f"{name}@{int(seed)}"


def parse_network(spec: str) -> tuple[str, str, int]:
    """``"vit"``, ``"vit@2"``, ``"textures/vit@1"`` -> ``(task, name, seed)`` (task defaults to
    :data:`DEFAULT_TASK`, seed to 0)."""
    if not isinstance(spec, str):
        raise FanlensError(f"zoo model must be a name such as 'vit', 'vit@1' or 'textures/vit@1'. Got {spec!r}.")
    task, sep, rest = spec.rpartition("/")
    task = task if sep else DEFAULT_TASK
    name, at, seed_s = rest.partition("@")
    check_task(task)
    check_name(name)
    if at and not (seed_s.isdigit() and seed_s.isascii()):
        raise FanlensError(f"zoo model seed must be a non-negative integer after '@' (e.g. 'vit@1'). Got {spec!r} "
                           f"instead.")
    return task, name, int(seed_s) if at else 0


def _conv_stem_embed(**kwargs: Any) -> nn.Module:
    """timm's PatchEmbed with FAN's convolutional stem as its projection (three stride-2 3x3
    conv + BatchNorm stages, GELU between): the zoo ViT and FAN differ in their blocks only."""
    from timm.layers import PatchEmbed

    from ..models.fan import ConvPatchEmbed

    embed = PatchEmbed(**kwargs)
    embed.proj = ConvPatchEmbed(kwargs["patch_size"], kwargs.get("in_chans", 3), kwargs["embed_dim"]).proj
    return embed


def _vit(heads: int = 4, num_classes: int = 8) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=64, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=heads,
                             num_classes=num_classes, class_token=False, global_pool="avg",
                             embed_layer=_conv_stem_embed)


def _fan(num_classes: int = 8) -> nn.Module:
    from ..models.fan import FAN

    return FAN(img_size=64, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=4, mlp_ratio=3.0,
               num_classes=num_classes, tokens_norm=True, cls_attn_layers=1)


def _cnn(num_classes: int = 8, maxpool: bool = True) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    # zero_init_last=False: timm zeroes the last BatchNorm of every residual block by default, which makes a
    # randomly initialised block the identity (the random-init twin's curves would be steps)
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, channels=(24, 48, 96, 192),
                   zero_init_last=False)
    if not maxpool:
        model.maxpool = nn.Identity()
    return model


def _vit_card(heads: int, num_classes: int) -> dict[str, Any]:
    return dict(cls="timm VisionTransformer", img_size=64, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                num_heads=heads, mlp_ratio=4.0, num_classes=num_classes, class_token=False, global_pool="avg",
                patch_embed="convolutional stem (fanlens.models.fan.ConvPatchEmbed layout)")


def architecture(name: str, task: str = DEFAULT_TASK) -> tuple[Callable[[], nn.Module], dict[str, Any]]:
    """``(constructor, card entry)`` of a zoo architecture for ``task``."""
    check_name(name)
    k = TASKS[check_task(task)]["num_classes"]
    if name in HEADS:
        h = HEADS[name]
        return (lambda: _vit(h, k)), _vit_card(h, k)
    if name == "fan":
        return (lambda: _fan(k)), dict(cls="fanlens.models.fan.FAN", img_size=64, patch_size=PATCH, embed_dim=WIDTH,
                                      depth=DEPTH, num_heads=4, mlp_ratio=3.0, num_classes=k, tokens_norm=True,
                                      cls_attn_layers=1, patch_embed="convolutional stem")
    pool = TASKS[task]["cnn_maxpool"]
    stem = ("timm's default: 7x7 conv with 64 channels, stride 2, max-pool (last stage 2 x 2 at 64 x 64)" if pool
            else "timm's 7x7 conv with 64 channels, stride 2, no max-pool (stride 16: last stage 4 x 4 = 16 tokens "
                 "at 64 x 64)")
    return (lambda: _cnn(k, pool)), dict(cls="timm ResNet", block="BasicBlock", layers=[2, 2, 2, 2],
                                         channels=[24, 48, 96, 192], stem=stem, num_classes=k,
                                         zero_init_last=False)


def check_name(name: str) -> str:
    if name not in ALL_NAMES:
        raise FanlensError(f"zoo model must be one of {ALL_NAMES}. Got {name!r} instead.")
    return name


def build(name: str, *, seed: int = 0, task: str = DEFAULT_TASK) -> nn.Module:
    """A randomly initialised zoo architecture for ``task`` (seeded, the caller's RNG untouched), eval
    mode. Every block is initialised non-trivially (no zero-initialised residual branch)."""
    ctor = architecture(name, task)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = ctor()
    model.pretrained_cfg = dict(data_config(task), architecture=f"zoo:{name}")
    return model.eval()


ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    name: architecture(name, DEFAULT_TASK) for name in (*HEADS, "fan", "cnn")}
"""The architectures of the :data:`DEFAULT_TASK` zoo (:func:`architecture` for another task)."""
