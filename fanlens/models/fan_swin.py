"""FAN-Swin: Swin Transformer stages whose MLP is FAN's channel processing, registered into timm.

Paper: "Understanding The Robustness in Vision Transformers", Zhou et al., ICML 2022;
Swin: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", Liu et al., ICCV 2021.

Layout of the released FAN-Swin models: the original Swin (fixed input resolution, the
relative-position index and the shifted-window mask stored as buffers, patch merging at the
end of a stage), stages 0-2 with :class:`~fanlens.models.fan.ChannelProcessing` as MLP (its
DWConv residual absent, as released) and stage 3 with a plain MLP; LayerNorm eps 1e-5; no
absolute position embedding. No FAN-Swin checkpoint was released: weights load from a local
file only.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .._validation import FanlensError
from ..capture import BlockSpec
from .fan import ChannelProcessing, ClassMlp, drop_path_rates, init_weights

__all__ = ["FANSwinTransformer", "FAN_SWIN_NAMES"]


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, ws, ws, C)``."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """``(B * nW, ws, ws, C)`` -> ``(B, H, W, C)``."""
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


class WindowAttention(nn.Module):
    """Window self-attention with a learned relative-position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        ws = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) * (2 * ws - 1), num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws - 1
        rel[:, :, 1] += ws - 1
        rel[:, :, 0] *= 2 * ws - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class PlainMlp(ClassMlp):
    """fc1 -> GELU -> fc2 (stage 3 of FAN-Swin), called with the grid like the FAN MLPs."""

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return super().forward(x)


class SwinFANBlock(nn.Module):
    """Shifted-window attention, then FAN channel processing (or a plain MLP); tokens ``(B, H*W, C)``."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, mlp_type: str = "FAN") -> None:
        super().__init__()
        self.input_resolution = input_resolution
        if min(input_resolution) <= window_size:
            shift_size, window_size = 0, min(input_resolution)
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        if mlp_type == "FAN":
            self.mlp = ChannelProcessing(dim, num_heads, qkv_bias, hidden, attn_drop, drop, nn.LayerNorm,
                                         dw_residual=False)
        elif mlp_type == "Mlp":
            self.mlp = PlainMlp(dim, hidden, drop)
        else:
            raise FanlensError(f"mlp_type must be 'FAN' or 'Mlp'. Got {mlp_type!r} instead.")
        self.register_buffer("attn_mask", self._mask() if self.shift_size > 0 else None)

    def _mask(self) -> torch.Tensor:
        h, w = self.input_resolution
        ws, s = self.window_size, self.shift_size
        img = torch.zeros(1, h, w, 1)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img[:, hs, wsl, :] = cnt
                cnt += 1
        mw = window_partition(img, ws).view(-1, ws * ws)
        mask = mw[:, None, :] - mw[:, :, None]
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        if n != h * w:
            raise FanlensError(
                f"FAN-Swin blocks have a fixed resolution {h}x{w}; got {n} tokens (use the model's img_size)."
            )
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        win = window_partition(x, self.window_size).view(-1, self.window_size * self.window_size, c)
        win = self.attn(win, mask=self.attn_mask).view(-1, self.window_size, self.window_size, c)
        x = window_reverse(win, self.window_size, h, w)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat -> LayerNorm(4C) -> Linear(4C -> 2C, no bias)."""

    def __init__(self, input_resolution: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float, drop_path: Sequence[float],
                 downsample: bool, mlp_type: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                SwinFANBlock(dim, input_resolution, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2,
                             mlp_ratio, qkv_bias, drop, attn_drop, drop_path[j], mlp_type)
                for j in range(depth)
            ]
        )
        self.downsample = PatchMerging(input_resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class FANSwinTransformer(nn.Module):
    """Swin Transformer with FAN channel processing (the official ``SwinTransformer`` arguments)."""

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, mlp_type: Sequence[str] = ("FAN", "FAN", "FAN", "Mlp"),
                 **kwargs: Any) -> None:
        super().__init__()
        unknown = set(kwargs) - {"norm_layer", "ape", "patch_norm", "use_checkpoint", "weight_init", "qk_scale"}
        if unknown or kwargs.get("ape"):
            raise FanlensError(f"FANSwinTransformer got unsupported arguments {sorted(unknown) or ['ape=True']}.")
        img = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)
        self.img_size = img
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        res = (img[0] // patch_size, img[1] // patch_size)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        layers, k = [], 0
        for i, d in enumerate(depths):
            r = (res[0] // 2**i, res[1] // 2**i)
            layers.append(
                BasicLayer(embed_dim * 2**i, r, d, num_heads[i], window_size, mlp_ratio, qkv_bias, drop_rate,
                           attn_drop_rate, dpr[k : k + d], i < len(depths) - 1, mlp_type[i])
            )
            k += d
        self.layers = nn.ModuleList(layers)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    def fanlens_blocks(self) -> list[BlockSpec]:
        return [BlockSpec(f"layers.{i}.blocks.{j}", "NLC", 0) for i, l in enumerate(self.layers)
                for j in range(len(l.blocks))]

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "fan_swin_tiny_patch4_window7_224": _cfg(),
        "fan_swin_small_patch4_window7_224": _cfg(),
        "fan_swin_base_patch4_window7_224": _cfg(),
        "fan_swin_large_patch4_window7_224": _cfg(),
    }
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Strip ``module.`` prefixes; the released layout is otherwise this one."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _create(variant: str, pretrained: bool, **kwargs: Any) -> FANSwinTransformer:
    from ._loading import load_pretrained_from_cfg

    model = build_model_with_cfg(FANSwinTransformer, variant, pretrained=False, **kwargs)
    if pretrained:
        load_pretrained_from_cfg(model, variant, checkpoint_filter_fn)
    return model


_FAN = ("FAN", "FAN", "FAN", "Mlp")


@register_model
def fan_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FANSwinTransformer:
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), mlp_type=_FAN)
    return _create("fan_swin_tiny_patch4_window7_224", pretrained, **dict(args, **kwargs))


@register_model
def fan_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FANSwinTransformer:
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), mlp_type=_FAN)
    return _create("fan_swin_small_patch4_window7_224", pretrained, **dict(args, **kwargs))


@register_model
def fan_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FANSwinTransformer:
    args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                mlp_type=_FAN)
    return _create("fan_swin_base_patch4_window7_224", pretrained, **dict(args, **kwargs))


@register_model
def fan_swin_large_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FANSwinTransformer:
    args = dict(patch_size=4, window_size=7, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                mlp_type=_FAN)
    return _create("fan_swin_large_patch4_window7_224", pretrained, **dict(args, **kwargs))


FAN_SWIN_NAMES = tuple(default_cfgs)
