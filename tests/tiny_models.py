"""Small model factories used by the CLI tests through ``--model tests/tiny_models.py:NAME``."""

from __future__ import annotations

import timm
import torch
from torch import nn


def tiny_vit(**kwargs) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3, num_classes=5, **kwargs)


def tiny_cnn() -> nn.Module:
    return timm.create_model("resnet18", num_classes=5)


class _Fail(nn.Module):
    def forward(self, x):
        raise RuntimeError("deliberate failure inside a block")


class Broken(nn.Module):
    """Its second block raises during the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _Fail())

    def forward(self, x):
        return self.blocks(x)


def broken() -> nn.Module:
    return Broken()
