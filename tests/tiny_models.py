"""Small model factories used by the CLI tests through ``--model tests/tiny_models.py:NAME``."""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
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


class _SlowViT(VisionTransformer):
    """tiny_vit's architecture with a pause in each forward pass, so that a test can stop a run half-way."""

    def forward(self, x):
        import os
        import time

        time.sleep(float(os.environ.get("FANLENS_TEST_DELAY", "0.05")))
        return super().forward(x)


def slow_vit() -> nn.Module:
    return _SlowViT(img_size=64, patch_size=16, embed_dim=192, depth=3, num_heads=3, num_classes=5)


class _FailOnRank(nn.Module):
    def forward(self, x):
        import os

        if os.environ.get("RANK") == os.environ.get("FANLENS_TEST_FAIL_RANK", "1"):
            raise RuntimeError("deliberate failure on this rank")
        return x


def fail_on_rank() -> nn.Module:
    """tiny_vit (slow) whose first block fails on the rank named by $FANLENS_TEST_FAIL_RANK (default 1)."""
    m = slow_vit()
    m.blocks[0] = nn.Sequential(_FailOnRank(), m.blocks[0])
    return m


class _NaN(nn.Module):
    def forward(self, x):
        return x * float("nan")


def nan_vit() -> nn.Module:
    """tiny_vit whose second block outputs NaN."""
    m = tiny_vit()
    m.blocks[1] = nn.Sequential(m.blocks[1], _NaN())
    return m
