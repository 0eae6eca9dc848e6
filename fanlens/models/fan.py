"""Fully Attentional Networks (FAN), registered into timm.

Paper: "Understanding The Robustness in Vision Transformers", Zhou, Yu, Xie, Xiao,
Anandkumar, Feng and Alvarez, ICML 2022 (arXiv:2204.12451).

fanlens' own implementation, written from the paper and from the documented behaviour of
the official release (the facts in ``shared/fixtures/fan_reference/README.md``): the
state-dict layout of the released checkpoints (token mixing with separate ``q`` and
``kv``; channel processing ``mlp.{temperature, mlp_v, norm_v, q}``; class attention with
separate ``q``/``k``/``v``), and its numerics (norm eps, the Fourier positional encoding,
the sigmoid channel gate times a learned temperature, the DWConv residual, the
class-attention residual that doubles patch tokens, the ConvNeXt LayerNorm2d variance).
Two faults of the official code are fixed: the SE variant's forward runs (its blocks take
and return the grid), and attention maps are available through :meth:`FAN.attention_maps`.

``import fanlens`` registers every official variant, so ``timm.create_model(name)`` works.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .._validation import FanlensError
from ..capture import BlockSpec

__all__ = [
    "drop_path_rates", "FAN",
    "FANBlock",
    "TokenMixing",
    "ChannelProcessing",
    "ClassAttentionBlock",
    "ConvNeXtBackbone",
    "hybrid_backbone",
    "checkpoint_filter_fn",
    "FAN_VIT_NAMES",
]

_RELEASE = "https://github.com/zhoudaquan/fully_attentional_network_ckpt/releases/download/v1.0.0/"


# --------------------------------------------------------------------------- building blocks
def drop_path_rates(end: float, n: int) -> list[float]:
    """Stochastic-depth rates 0 .. end over n blocks (plain Python: works under the meta device)."""
    return [end * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def init_weights(m: nn.Module) -> None:
    """The official FAN initialisation of one module: truncated normal (std 0.02) for linear
    weights, zero biases, unit LayerNorm scales (applied with ``model.apply``)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map, as in the ConvNeXt used by FAN's hybrids.

    An NCHW-contiguous input goes through ``F.layer_norm`` (biased variance); any other
    memory layout through ``var_mean`` with the unbiased (N-1) variance. The stem's output
    is channels-last strided and convolutions keep that layout, so every norm after the
    stem takes the second path, exactly like the released models.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous():
            return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
                0, 3, 1, 2
            )
        var, mean = torch.var_mean(x, dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ConvMlp(nn.Module):
    """1x1-conv MLP of a ConvNeXt block: fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, ls_init_value: float = 1e-6, drop_path: float = 0.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.mlp = ConvMlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.mlp(self.norm(self.conv_dw(x)))
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(x) + shortcut


class ConvNeXtStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, depth: int, ls_init_value: float,
                 drop_path: Sequence[float]) -> None:
        super().__init__()
        if in_chs != out_chs or stride > 1:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs, eps=1e-6), nn.Conv2d(in_chs, out_chs, stride, stride))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_chs, ls_init_value, drop_path[j]) for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtBackbone(nn.Module):
    """The truncated ConvNeXt of FAN's hybrids: 4x4 stem and ``len(depths)`` stages, no head."""

    def __init__(self, depths: Sequence[int] = (3, 3), dims: Sequence[int] = (128, 256, 512, 1024),
                 in_chans: int = 3, patch_size: int = 4, ls_init_value: float = 1e-6,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if len(dims) < len(depths):
            raise FanlensError(f"dims must have at least len(depths)={len(depths)} entries. Got {list(dims)} instead.")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], patch_size, patch_size), LayerNorm2d(dims[0], eps=1e-6))
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        stages, prev, k = [], dims[0], 0
        for i, d in enumerate(depths):
            stages.append(ConvNeXtStage(prev, dims[i], 2 if i > 0 else 1, d, ls_init_value, dpr[k : k + d]))
            prev, k = dims[i], k + d
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.stride = patch_size * 2 ** (len(depths) - 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def hybrid_backbone(
    pretrained: bool = False,
    pretrained_strict: bool = False,
    depths: Sequence[int] = (3, 3),
    dims: Sequence[int] = (128, 256, 512, 1024),
    use_head: bool = False,
    in_chans: int = 3,
    **kwargs: Any,
) -> ConvNeXtBackbone:
    """The ConvNeXt backbone of a FAN hybrid (the official ``_create_hybrid_backbone`` arguments).

    ``pretrained=True`` copies the stem and the first stages of timm's ImageNet-22k
    ConvNeXt-B (``convnext_base.fb_in22k``, a download) into it; the released FAN hybrid
    checkpoints already contain their backbone, so this is only for training from it.
    """
    if use_head:
        raise FanlensError("use_head must be False: FAN hybrids use the ConvNeXt features without its head.")
    model = ConvNeXtBackbone(depths=depths, dims=dims, in_chans=in_chans, **kwargs)
    if pretrained:
        import timm

        src = timm.create_model("convnext_base.fb_in22k", pretrained=True).state_dict()
        own = model.state_dict()
        loaded = {}
        for k, v in own.items():
            if k in src and src[k].numel() == v.numel():
                loaded[k] = src[k].reshape(v.shape)
        missing = [k for k in own if k not in loaded]
        if pretrained_strict and missing:
            raise FanlensError(f"the ConvNeXt-B weights do not cover the backbone: missing {missing[:10]}.")
        model.load_state_dict(loaded, strict=False)
    return model


class ConvPatchEmbed(nn.Module):
    """Stride-2 3x3 conv + BatchNorm stages with GELU between them (patch 16: four, patch 8: three)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()

        def conv_bn(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(o))

        if patch_size == 16:
            chans = [in_chans, embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        elif patch_size == 8:
            chans = [in_chans, embed_dim // 4, embed_dim // 2, embed_dim]
        else:
            raise FanlensError(f"patch_size must be 8 or 16 for the convolutional patch embedding. Got {patch_size!r} instead.")
        layers: list[nn.Module] = []
        for i in range(len(chans) - 1):
            if i:
                layers.append(act_layer())
            layers.append(conv_bn(chans[i], chans[i + 1]))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class HybridEmbed(nn.Module):
    """ConvNeXt features, then a ``patch_size`` conv to tokens (total stride 16 for the released hybrids)."""

    def __init__(self, backbone: nn.Module, patch_size: int = 2, embed_dim: int = 384) -> None:
        super().__init__()
        self.backbone = backbone
        feature_dim = getattr(backbone, "num_features", None)
        if feature_dim is None:
            with torch.no_grad():
                was = backbone.training
                backbone.eval()
                feature_dim = backbone.forward_features(torch.zeros(1, 3, 224, 224)).shape[1]
                backbone.train(was)
        self.patch_size = patch_size
        self.proj = nn.Conv2d(feature_dim, embed_dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.backbone.forward_features(x)
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class PositionalEncodingFourier(nn.Module):
    """Fourier features of the (row, column) position, projected by a 1x1 conv (as in XCiT)."""

    def __init__(self, hidden_dim: int = 32, dim: int = 768, temperature: float = 10000.0) -> None:
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, 1)
        self.scale = 2 * math.pi
        self.temperature = temperature
        self.hidden_dim = hidden_dim

    def forward(self, b: int, h: int, w: int) -> torch.Tensor:
        dev = self.token_projection.weight.device
        y = torch.arange(1, h + 1, dtype=torch.float32, device=dev)[None, :, None].expand(b, h, w)
        x = torch.arange(1, w + 1, dtype=torch.float32, device=dev)[None, None, :].expand(b, h, w)
        eps = 1e-6
        y = y / (y[:, -1:, :] + eps) * self.scale
        x = x / (x[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.hidden_dim, dtype=torch.float32, device=dev)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos_x = x[..., None] / dim_t
        pos_y = y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        return self.token_projection(pos.to(self.token_projection.weight.dtype))


class DWConv(nn.Module):
    """Depthwise 3x3 (bias) -> GELU -> BatchNorm -> depthwise 3x3 (bias), on tokens as a grid."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        p = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=p, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=p, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, h, w)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(b, c, n).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> (gamma * DWConv(h) [+ h]) -> fc2; no activation around fc1/fc2 (as released).

    ``dw_residual=False`` is the FAN-Swin variant, whose DWConv residual is absent.
    """

    def __init__(self, in_features: int, hidden_features: int, dw_residual: bool = True, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.gamma = nn.Parameter(torch.ones(hidden_features))
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)
        self.dw_residual = dw_residual

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.fc1(x)
        y = self.drop(self.gamma * self.dwconv(x, h, w))
        x = y + x if self.dw_residual else y
        return self.drop(self.fc2(x))


class SqueezeExcite(nn.Module):
    def __init__(self, dim: int, rd_ratio: float = 0.25) -> None:
        super().__init__()
        rd = round(dim * rd_ratio)
        self.conv_reduce = nn.Conv2d(dim, rd, 1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class SEMlp(Mlp):
    """:class:`Mlp` followed by squeeze-excite over the token grid (the SE variant's channel MLP)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__(in_features, hidden_features, dw_residual=True, drop=drop)
        self.se = SqueezeExcite(in_features)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, _ = x.shape
        x = super().forward(x, h, w)
        c = x.shape[-1]
        return self.se(x.transpose(1, 2).reshape(b, c, h, w)).reshape(b, c, n).transpose(1, 2)


class TokenMixing(nn.Module):
    """Multi-head self-attention with separate ``q`` and ``kv`` projections."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise FanlensError(f"num_heads must divide dim={dim}. Got {num_heads} instead.")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention ``(B, heads, N, N)`` and the values ``(B, heads, N, d)``."""
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        kv = self.kv(x).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = (q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1)
        return attn, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        attn, v = self.attention(x)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class ChannelProcessing(nn.Module):
    """Efficient channel attention: a sigmoid gate per channel from a token prototype, times a temperature.

    q = Linear(x), k = x, both softmaxed over tokens; k averaged over the head channels
    gives one prototype per head; ``gate = sigmoid(q^T k) * temperature`` (one value per
    channel) multiplies ``v = norm_v(mlp_v(x))``, broadcast over tokens.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, mlp_hidden_dim: int | None = None,
                 attn_drop: float = 0.0, drop: float = 0.0, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 dw_residual: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise FanlensError(f"num_heads must divide dim={dim}. Got {num_heads} instead.")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.mlp_v = Mlp(dim, mlp_hidden_dim or dim, dw_residual=dw_residual, drop=drop)
        self.norm_v = norm_layer(dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The channel gate ``(B, heads, d, 1)``."""
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        k = x.reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        q = q.softmax(-2).transpose(-1, -2)
        k = k.softmax(-2).mean(-1, keepdim=True)
        return torch.sigmoid(q @ k) * self.temperature

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        attn = self.attn_drop(self.gate(x))
        v = self.norm_v(self.mlp_v(x, h, w)).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        return (attn * v.transpose(-1, -2)).permute(0, 3, 1, 2).reshape(b, n, c)


class OverlapPatchEmbed(nn.Module):
    """3x3 stride-2 conv between blocks of different widths, then LayerNorm (eps 1e-5)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        b, n, c = x.shape
        x = self.proj(x.transpose(1, 2).reshape(b, c, h, w))
        h, w = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class FANBlock(nn.Module):
    """Token mixing then channel processing, each with a learned layer scale; optional downsample.

    ``forward(x, h, w)`` returns ``(x, h, w)``: the grid after the block's downsample.
    With ``se_mlp=True`` the channel MLP is the squeeze-excite :class:`SEMlp` (the SE variant).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 eta: float = 1.0, downsample: nn.Module | None = None, c_head_num: int | None = None,
                 se_mlp: bool = False) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = TokenMixing(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        if se_mlp:
            self.mlp = SEMlp(dim, hidden, drop=drop)
        else:
            self.mlp = ChannelProcessing(dim, c_head_num or num_heads, qkv_bias, hidden, attn_drop, drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.downsample = downsample

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), h, w))
        if self.downsample is not None:
            x, h, w = self.downsample(x, h, w)
        return x, h, w


class ClassAttn(nn.Module):
    """Attention of the CLS token (query) over all tokens (keys, values)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x[:, 0]).reshape(b, 1, h, c // h).permute(0, 2, 1, 3) * self.scale
        k = self.k(x).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        attn = self.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1))
        x_cls = (attn @ v).transpose(1, 2).reshape(b, 1, c)
        return self.proj_drop(self.proj(x_cls))


class ClassMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ClassAttentionBlock(nn.Module):
    """Class-attention block; tokens ``(B, 1 + N, C)`` with the CLS token first.

    As released: patch tokens receive ``+ gamma1 * norm1(x)``, ``tokens_norm`` decides
    whether norm2 applies to all tokens or to the CLS token only, and the final residual
    adds the patch tokens to themselves.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, norm_layer: Callable[..., nn.Module] = nn.LayerNorm, eta: float = 1.0,
                 tokens_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttn(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = norm_layer(dim)
        self.mlp = ClassMlp(dim, int(dim * mlp_ratio), drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.tokens_norm = tokens_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = self.norm1(x)
        x = x + self.gamma1 * torch.cat([self.attn(xn), xn[:, 1:]], dim=1)
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat([self.norm2(x[:, 0:1]), x[:, 1:]], dim=1)
        cls_token = self.gamma2 * self.mlp(x[:, 0:1])
        return x + torch.cat([cls_token, x[:, 1:]], dim=1)


# --------------------------------------------------------------------------- model
def _to_list(v: Any, n: int, name: str) -> list:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise FanlensError(f"{name} must have depth={n} entries. Got {len(v)} instead.")
        return list(v)
    return [v] * n


class FAN(nn.Module):
    """Fully Attentional Network (ViT and ConvNeXt-hybrid variants).

    Accepts the official constructor arguments; ``sharpen_attn``, ``sr_ratio`` and
    ``use_checkpoint`` are accepted and have no effect (as in the released code).

    Blocks: ``blocks.i`` (FAN blocks, no prefix token, grid from the input; a block whose
    width changes downsamples by 2) and ``cls_attn_blocks.j`` (class attention, the CLS
    token first). fanlens analyses ``blocks.*`` by default; pass
    ``blocks="blocks.*,cls_attn_blocks.*"`` to include the class-attention blocks.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        sharpen_attn: bool = False,
        channel_dims: Sequence[int] | None = None,
        num_heads: int | Sequence[int] = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        sr_ratio: Sequence[int] | None = None,
        backbone: nn.Module | None = None,
        use_checkpoint: bool = False,
        act_layer: Callable[[], nn.Module] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        se_mlp: bool = False,
        cls_attn_layers: int = 2,
        use_pos_embed: bool = True,
        eta: float = 1.0,
        tokens_norm: bool = False,
        c_head_num: Sequence[int] | None = None,
        hybrid_patch_size: int = 2,
        head_init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        num_heads = _to_list(num_heads, depth, "num_heads")
        channel_dims = _to_list(embed_dim, depth, "channel_dims") if channel_dims is None else list(channel_dims)
        if len(channel_dims) != depth:
            raise FanlensError(f"channel_dims must have depth={depth} entries. Got {len(channel_dims)} instead.")
        if se_mlp and len(set(channel_dims)) > 1:
            raise FanlensError("se_mlp=True does not support channel_dims that change width (no downsample path).")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU
        self.num_classes = num_classes
        self.img_size = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)
        if backbone is None:
            self.patch_embed = ConvPatchEmbed(patch_size, in_chans, embed_dim, act_layer)
        else:
            self.patch_embed = HybridEmbed(backbone, hybrid_patch_size, embed_dim)
        self.use_pos_embed = use_pos_embed
        if use_pos_embed:
            self.pos_embed = PositionalEncodingFourier(dim=embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate] * depth
        blocks = []
        for i in range(depth):
            down = None
            if i < depth - 1 and channel_dims[i] != channel_dims[i + 1]:
                down = OverlapPatchEmbed(channel_dims[i], channel_dims[i + 1])
            blocks.append(
                FANBlock(channel_dims[i], num_heads[i], mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i],
                         norm_layer, eta, down, c_head_num[i] if c_head_num is not None else None, se_mlp)
            )
        self.blocks = nn.ModuleList(blocks)
        self.num_features = self.embed_dim = channel_dims[-1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, channel_dims[-1]))
        self.cls_attn_blocks = nn.ModuleList(
            [
                ClassAttentionBlock(channel_dims[-1], num_heads[-1], mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                    norm_layer, eta, tokens_norm)
                for _ in range(cls_attn_layers)
            ]
        )
        self.norm = norm_layer(channel_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def fanlens_blocks(self) -> list[BlockSpec]:
        """Blocks for :class:`fanlens.TokenCapture`: FAN blocks (default) and class-attention blocks."""
        specs = [BlockSpec(f"blocks.{i}", "NLC", 0) for i in range(len(self.blocks))]
        specs += [BlockSpec(f"cls_attn_blocks.{j}", "NLC", 1, default=False) for j in range(len(self.cls_attn_blocks))]
        return specs

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Patch embedding plus positional encoding: tokens ``(B, N, C)`` and the grid."""
        b = x.shape[0]
        x, (h, w) = self.patch_embed(x)
        if self.use_pos_embed:
            x = x + self.pos_embed(b, h, w).reshape(b, -1, x.shape[1]).permute(0, 2, 1)
        return self.pos_drop(x), h, w

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after every block and class-attention block, normalised: ``(B, 1 + N, C)``."""
        x, h, w = self.forward_tokens(x)
        for blk in self.blocks:
            x, h, w = blk(x, h, w)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.cls_attn_blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, indices: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """Token-mixing attention ``(B, heads, N, N)`` of the FAN blocks ``indices`` (default: all).

        Runs the forward pass up to the last requested block; ``N`` is that block's grid
        (row-major), so a map can be reshaped to ``(B, heads, H, W, H, W)``.
        """
        n = len(self.blocks)
        idx = list(range(n)) if indices is None else [i + n if i < 0 else i for i in indices]
        for i in idx:
            if not 0 <= i < n:
                raise FanlensError(f"indices must be block indices in [0, {n - 1}]. Got {indices!r} instead.")
        want = set(idx)
        out: dict[int, torch.Tensor] = {}
        t, h, w = self.forward_tokens(x)
        for i, blk in enumerate(self.blocks):
            if i in want:
                out[i] = blk.attn.attention(blk.norm1(t))[0]
            if len(out) == len(want):
                break
            t, h, w = blk(t, h, w)
        return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map released FAN checkpoints to this layout.

    Strips ``module.``, renames ``pos_embeder.`` to ``pos_embed.``, and splits a fused
    class-attention ``qkv`` into ``q``, ``k`` and ``v`` (in that order).
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        k = k.replace("pos_embeder.", "pos_embed.")
        if k.startswith("cls_attn_blocks.") and ".attn.qkv." in k:
            for name, part in zip(("q", "k", "v"), v.chunk(3, dim=0)):
                out[k.replace(".attn.qkv.", f".attn.{name}.")] = part.contiguous()
            continue
        out[k] = v
    return out


# --------------------------------------------------------------------------- registration
def _cfg(file: str = "", **kwargs: Any) -> dict:
    return {
        "url": _RELEASE + file if file else "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj.0.0",
        "classifier": "head",
        "license": "nvidia-source-code",
        **kwargs,
    }


# Release files of the official repository; variants without a released checkpoint have an
# empty url and load only from a local file.
default_cfgs = generate_default_cfgs(
    {
        "fan_tiny_12_p16_224": _cfg("fan_vit_tiny.pth.tar"),
        "fan_small_12_p16_224_se_attn": _cfg(),
        "fan_small_12_p16_224": _cfg("fan_vit_small.pth.tar"),
        "fan_base_18_p16_224": _cfg("fan_vit_base.pth.tar"),
        "fan_large_24_p16_224": _cfg(),
        "fan_tiny_8_p4_hybrid": _cfg("fan_hybrid_tiny.pth.tar", first_conv="patch_embed.backbone.stem.0"),
        "fan_small_12_p4_hybrid": _cfg("fan_hybrid_small.pth.tar", first_conv="patch_embed.backbone.stem.0"),
        "fan_base_16_p4_hybrid": _cfg("fan_hybrid_base.pth.tar", first_conv="patch_embed.backbone.stem.0"),
        "fan_large_16_p4_hybrid": _cfg("fan_hybrid_large_in22k_1k.pth.tar", first_conv="patch_embed.backbone.stem.0"),
        "fan_Xlarge_16_p4_hybrid": _cfg(first_conv="patch_embed.backbone.stem.0"),
    }
)


def _create_fan(variant: str, pretrained: bool = False, **kwargs: Any) -> FAN:
    from ._loading import load_pretrained_from_cfg

    model = build_model_with_cfg(FAN, variant, pretrained=False, **kwargs)
    if pretrained:
        load_pretrained_from_cfg(model, variant, checkpoint_filter_fn)
    return model


def _hybrid(depths: Sequence[int], **kwargs: Any) -> dict:
    return dict(backbone=hybrid_backbone(depths=depths, dims=(128, 256, 512, 1024), use_head=False), **kwargs)


@register_model
def fan_tiny_12_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=4, eta=1.0, tokens_norm=True, sr_ratio=[1] * 12)
    return _create_fan("fan_tiny_12_p16_224", pretrained, **dict(args, **kwargs))


@register_model
def fan_small_12_p16_224_se_attn(pretrained: bool = False, **kwargs: Any) -> FAN:
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=8, eta=1.0, tokens_norm=True, se_mlp=True,
                sr_ratio=[1] * 12)
    return _create_fan("fan_small_12_p16_224_se_attn", pretrained, **dict(args, **kwargs))


@register_model
def fan_small_12_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=8, eta=1.0, tokens_norm=True, sr_ratio=[1] * 12)
    return _create_fan("fan_small_12_p16_224", pretrained, **dict(args, **kwargs))


@register_model
def fan_base_18_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    args = dict(patch_size=16, embed_dim=448, depth=18, num_heads=8, eta=1.0, tokens_norm=True, sr_ratio=[1] * 18)
    return _create_fan("fan_base_18_p16_224", pretrained, **dict(args, **kwargs))


@register_model
def fan_large_24_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    args = dict(patch_size=16, embed_dim=480, depth=24, num_heads=10, eta=1.0, tokens_norm=True, sr_ratio=[1] * 24)
    return _create_fan("fan_large_24_p16_224", pretrained, **dict(args, **kwargs))


@register_model
def fan_tiny_8_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    args = dict(patch_size=16, embed_dim=192, depth=8, num_heads=8, eta=1.0, tokens_norm=True, sr_ratio=[1] * 9)
    return _create_fan("fan_tiny_8_p4_hybrid", pretrained, **dict(_hybrid((3, 3), **args), **kwargs))


@register_model
def fan_small_12_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    # the released configuration has 10 blocks despite the name
    args = dict(patch_size=16, embed_dim=384, depth=10, channel_dims=[384] * 10, num_heads=8, eta=1.0,
                tokens_norm=True, sr_ratio=[1] * 10)
    return _create_fan("fan_small_12_p4_hybrid", pretrained, **dict(_hybrid((3, 3), **args), **kwargs))


@register_model
def fan_base_16_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    args = dict(patch_size=16, embed_dim=448, depth=16, num_heads=8, eta=1.0, tokens_norm=True, sr_ratio=[1] * 16)
    return _create_fan("fan_base_16_p4_hybrid", pretrained, **dict(_hybrid((3, 3), **args), **kwargs))


@register_model
def fan_large_16_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    # the released configuration has 22 blocks despite the name
    args = dict(patch_size=16, embed_dim=480, depth=22, num_heads=10, eta=1.0, tokens_norm=True, sr_ratio=[1] * 22,
                head_init_scale=0.001)
    return _create_fan("fan_large_16_p4_hybrid", pretrained, **dict(_hybrid((3, 5), **args), **kwargs))


@register_model
def fan_Xlarge_16_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    # 20 blocks at 528 channels, then 3 at 768; block 19 downsamples (7x7 grid at 224)
    depth = 23
    args = dict(patch_size=16, embed_dim=528, depth=depth, channel_dims=[528] * 20 + [768] * 3,
                num_heads=[11] * 20 + [16] * 3, eta=1.0, tokens_norm=True, sr_ratio=[1] * depth)
    return _create_fan("fan_Xlarge_16_p4_hybrid", pretrained, **dict(_hybrid((3, 7), **args), **kwargs))


FAN_VIT_NAMES = tuple(default_cfgs)
