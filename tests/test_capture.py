"""Token capture: block discovery, layouts, repeated calls, early stop, hook removal."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from fanlens import FanlensError, TokenCapture, find_blocks
from fanlens.capture import infer_grid, match_modules

from conftest import count_hooks


def _capture(model, x, **kw):
    with torch.no_grad(), TokenCapture(model, **kw) as cap:
        cap.run(x)
        return list(cap.block_tokens()), cap


@pytest.mark.parametrize(
    "kwargs, prefix",
    [
        (dict(), 1),  # CLS
        (dict(reg_tokens=4), 5),  # CLS + registers
        (dict(reg_tokens=4, class_token=False, global_pool="avg"), 4),  # registers only
        (dict(class_token=False, global_pool="avg"), 0),
    ],
)
def test_vit_prefix_tokens(kwargs, prefix):
    m = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=3, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    bts, cap = _capture(m, x)
    assert [b.name for b in bts] == ["blocks.0", "blocks.1"]
    for bt in bts:
        raw = cap.raw(bt.name)[0]
        assert bt.layout.num_prefix_tokens == prefix
        assert bt.layout.grid == (4, 4)
        assert bt.tokens.shape == (2, 16, 192)
        assert bt.prefix.shape == (2, prefix, 192)
        torch.testing.assert_close(bt.tokens, raw[:, prefix:], rtol=0, atol=0)


def test_deit_distilled_has_two_prefix_tokens():
    m = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=2, num_classes=3).eval()
    bts, _ = _capture(m, torch.randn(1, 3, 64, 64))
    assert {b.layout.num_prefix_tokens for b in bts} == {2}
    assert bts[0].tokens.shape == (1, 16, 192)


def test_vit_non_square_grid_in_raster_order():
    m = timm.create_model("vit_tiny_patch16_224", img_size=(64, 96), depth=1, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad(), TokenCapture(m, blocks="patch_embed", num_prefix_tokens=0) as cap:
        cap.run(x)
        (pe,) = list(cap.block_tokens())
    assert pe.layout.grid == (4, 6)
    # token (r, c) must come from the patch at rows 16r.., cols 16c..
    direct = m.patch_embed.proj(x)  # (1, C, 4, 6)
    torch.testing.assert_close(pe.grid_tokens(), direct, rtol=1e-5, atol=1e-5)
    bts, _ = _capture(m, x)
    assert bts[0].layout.grid == (4, 6) and bts[0].tokens.shape == (1, 24, 192)


def test_swin_nhwc_layout():
    m = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=64, window_size=4, depths=(1, 1, 2, 1), embed_dim=24,
        num_heads=(1, 2, 3, 4), num_classes=3,
    ).eval()
    bts, cap = _capture(m, torch.randn(2, 3, 64, 64))
    assert [b.name for b in bts] == ["layers.0.blocks.0", "layers.1.blocks.0", "layers.2.blocks.0",
                                     "layers.2.blocks.1", "layers.3.blocks.0"]
    assert [b.layout.grid for b in bts] == [(16, 16), (8, 8), (4, 4), (4, 4), (2, 2)]
    assert {b.layout.layout for b in bts} == {"NHWC"}
    raw = cap.raw("layers.1.blocks.0")[0]  # (B, H, W, C)
    torch.testing.assert_close(bts[1].tokens[:, 8 * 3 + 5], raw[:, 3, 5], rtol=0, atol=0)


def test_convnext_nchw_layout():
    m = timm.create_model("convnext_atto", num_classes=3).eval()
    bts, cap = _capture(m, torch.randn(1, 3, 64, 96))
    assert len(bts) == sum(len(s.blocks) for s in m.stages)
    assert bts[0].layout.grid == (16, 24) and bts[-1].layout.grid == (2, 3)
    raw = cap.raw(bts[0].name)[0]
    assert bts[0].tokens.shape == (1, 16 * 24, raw.shape[1])
    torch.testing.assert_close(bts[0].tokens[:, 24 * 2 + 7], raw[:, :, 2, 7], rtol=0, atol=0)


@pytest.mark.parametrize("lib", ["timm", "torchvision"])
def test_resnet_stage_blocks(lib):
    if lib == "timm":
        m = timm.create_model("resnet18", num_classes=3).eval()
    else:
        m = torchvision.models.resnet18(num_classes=3).eval()
    bts, _ = _capture(m, torch.randn(1, 3, 64, 64))
    assert [b.name for b in bts] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert [b.layout.grid for b in bts] == [(16, 16)] * 2 + [(8, 8)] * 2 + [(4, 4)] * 2 + [(2, 2)] * 2
    assert [b.layout.channels for b in bts][::2] == [64, 128, 256, 512]


def test_wrong_prefix_count_is_a_clear_error():
    m = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1, num_classes=3).eval()
    with pytest.raises(FanlensError, match="num_prefix_tokens"):
        _capture(m, torch.randn(1, 3, 64, 64), num_prefix_tokens=0)  # 17 tokens do not form a grid
    assert count_hooks(m) == 0


def test_infer_grid_follows_input_shape():
    assert infer_grid(196, (224, 224)) == (14, 14)
    assert infer_grid(280, (224, 320)) == (14, 20)
    assert infer_grid(6 * 4, (96, 64)) == (6, 4)
    assert infer_grid(2 * 3, (64, 96)) == (2, 3)
    assert infer_grid(15 * 15, (232, 232)) == (15, 15)  # ceil padding
    with pytest.raises(FanlensError, match="do not form a grid"):
        infer_grid(197, (224, 224))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.block(self.block(self.stem(x)))


def test_module_called_twice_is_recorded_twice():
    m = _Twice().eval()
    x = torch.randn(1, 3, 8, 8)
    bts, cap = _capture(m, x, blocks="block")
    assert [b.label for b in bts] == ["block", "block#1"]
    with torch.no_grad():
        once = m.block(m.stem(x))
        twice = m.block(once)
    torch.testing.assert_close(bts[0].grid_tokens(), once)
    torch.testing.assert_close(bts[1].grid_tokens(), twice)


def test_stop_early_skips_the_rest_of_the_forward(tiny_vit):
    calls = []
    h = tiny_vit.head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), TokenCapture(tiny_vit, stop_early=True) as cap:
            out = cap.run(torch.randn(1, 3, 64, 64))
            assert out is None
            assert len(list(cap.block_tokens())) == 3
    finally:
        h.remove()
    assert calls == []
    assert count_hooks(tiny_vit) == 0


def test_hooks_removed_when_forward_raises(tiny_vit):
    with pytest.raises(AssertionError, match="Input height"):
        with TokenCapture(tiny_vit) as cap:
            cap.run(torch.randn(1, 3, 65, 64))  # wrong size: timm raises
    assert count_hooks(tiny_vit) == 0


def test_stored_tensors_are_detached_and_cast(tiny_vit):
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    with TokenCapture(tiny_vit, dtype=torch.float64, device="cpu") as cap:
        cap.run(x)
        bt = next(cap.block_tokens())
    assert not bt.tokens.requires_grad
    assert bt.tokens.dtype == torch.float64


def test_glob_patterns_match_segments(tiny_vit):
    assert match_modules(tiny_vit, "blocks.*") == ["blocks.0", "blocks.1", "blocks.2"]
    assert "blocks.0.attn.qkv" in match_modules(tiny_vit, "blocks.**.qkv") or \
        "blocks.0.attn.qkv" in match_modules(tiny_vit, "**.qkv")
    assert match_modules(tiny_vit, "blocks.1") == ["blocks.1"]
    specs = find_blocks(tiny_vit, "blocks.1,blocks.2")
    assert [s.name for s in specs] == ["blocks.1", "blocks.2"] and specs[0].num_prefix_tokens == 1


def test_pattern_matching_nothing_lists_candidates(tiny_vit):
    with pytest.raises(FanlensError, match=r"matches nothing; candidates: blocks\.\*"):
        TokenCapture(tiny_vit, blocks="layers.*")


def test_unknown_model_family_needs_blocks():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with pytest.raises(FanlensError, match="blocks must be given"):
        TokenCapture(m)
    bts, _ = _capture(m, torch.randn(1, 3, 8, 6), blocks=["0", "2"])
    assert [b.layout.grid for b in bts] == [(8, 6), (8, 6)]


def test_blocks_where_timm_puts_them_are_found_without_a_family_rule():
    """A top-level ``blocks`` of one class (BEiT, MLP-Mixer), or a ``blocks`` in every stage (MetaFormer): the
    same blocks and tokens as naming them, the layout read from each output."""
    from timm.models.beit import Beit
    from timm.models.metaformer import MetaFormer
    from timm.models.mlp_mixer import MlpMixer

    beit = Beit(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=3).eval()
    bts, _ = _capture(beit, torch.randn(2, 3, 32, 32))
    assert [b.name for b in bts] == ["blocks.0", "blocks.1", "blocks.2"]
    assert bts[0].layout.layout == "NLC" and bts[0].layout.num_prefix_tokens == 1 and bts[0].layout.grid == (4, 4)
    named, _ = _capture(beit, torch.randn(2, 3, 32, 32), blocks="blocks.*")
    assert [b.name for b in named] == [b.name for b in bts]

    mixer = MlpMixer(num_blocks=2, embed_dim=16, img_size=32, patch_size=8, num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    bts, cap = _capture(mixer, x)
    assert [b.name for b in bts] == ["blocks.0", "blocks.1"]
    assert bts[1].layout.num_prefix_tokens == 0 and bts[1].tokens.shape == (1, 16, 16)
    torch.testing.assert_close(bts[1].tokens, cap.raw("blocks.1")[0], rtol=0, atol=0)

    meta = MetaFormer(depths=(1, 1, 2, 1), dims=(8, 12, 16, 20), num_classes=3).eval()
    bts, cap = _capture(meta, torch.randn(1, 3, 64, 96))
    assert [b.name for b in bts] == ["stages.0.blocks.0", "stages.1.blocks.0", "stages.2.blocks.0",
                                     "stages.2.blocks.1", "stages.3.blocks.0"]
    assert [b.layout.grid for b in bts] == [(16, 24), (8, 12), (4, 6), (4, 6), (2, 3)]
    raw = cap.raw("stages.0.blocks.0")[0]
    torch.testing.assert_close(bts[0].tokens[:, 24 * 3 + 5], raw[:, :, 3, 5], rtol=0, atol=0)  # NCHW, raster order
    assert count_hooks(meta) == 0


def test_models_whose_default_blocks_would_be_wrong_still_need_them():
    """Hiera keeps its tokens in mask-unit order (no raster grid); blocks of two kinds or nested containers
    (MetaFormer-like stages that are not uniform) are not guessed."""
    from timm.models.hiera import Hiera

    hiera = Hiera(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), img_size=(64, 64), num_classes=3)
    with pytest.raises(FanlensError, match=r"blocks must be given for a model of type Hiera"):
        TokenCapture(hiera)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
            self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 1))])

        def forward(self, x):
            return self.blocks(x)

    with pytest.raises(FanlensError, match="blocks must be given"):
        TokenCapture(Mixed())


def test_blocks_that_never_run_are_named_after_a_forward():
    """A model whose ``blocks`` (found by default) are not called by its forward: after a forward pass the error
    names them; before any forward it says to run one."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)])
            self.net = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.net(x).mean((2, 3))

    m = Unused()
    with TokenCapture(m) as cap:
        with pytest.raises(FanlensError, match="no block output was recorded: run a forward pass"):
            list(cap.block_tokens())
        cap.run(torch.rand(1, 3, 8, 8))
        with pytest.raises(FanlensError, match=r"blocks \['blocks.0', 'blocks.1'\] did not run in the forward pass"):
            list(cap.block_tokens())
    assert count_hooks(m) == 0
