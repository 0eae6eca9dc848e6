"""fanlens.attention_maps: the softmax matrices of timm ViT/DeiT blocks, read with fused attention
on, equal to what timm computes with fused attention off."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import fanlens
from fanlens import FanlensError
from fanlens.data import data_config

from conftest import count_hooks


def _pixels(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _timm_reference(model, x):
    """timm's own attention with fused attention off: the softmax read at attn_drop."""
    seen = []
    handles = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone())))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
        for blk in model.blocks:
            blk.attn.fused_attn = True
    return torch.stack(seen, 1), out


VARIANTS = {
    "vit (cls)": dict(),
    "deit distilled (cls + dist)": dict(name="deit_tiny_distilled_patch16_224"),
    "registers (cls + 4 registers)": dict(reg_tokens=4),
    "qk-norm": dict(qk_norm=True),
    "no class token, 3 heads": dict(class_token=False, global_pool="avg"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_maps_equal_timm_non_fused_attention(variant):
    kw = dict(VARIANTS[variant])
    name = kw.pop("name", "vit_tiny_patch16_224")
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, depth=3, num_classes=5, **kw).eval()
    for blk in model.blocks:  # fused attention stays on in the model analysed
        blk.attn.fused_attn = True
    x = _pixels(3, seed=1)
    cfg = data_config(model)
    with torch.no_grad():
        before = model(cfg.normalize(x))
    res = fanlens.attention_maps(model, x, batch_size=2, progress=False)
    ref, out = _timm_reference(model, cfg.normalize(x))
    n_prefix = model.num_prefix_tokens
    assert res.num_prefix_tokens == n_prefix and res.grid == (4, 4)
    assert res.maps.shape == (3, 3, 3, 16 + n_prefix, 16 + n_prefix)  # images, blocks, heads, N, N
    assert float(np.abs(res.maps - ref.numpy()).max()) < 1e-5
    np.testing.assert_allclose(res.maps.sum(-1), 1.0, atol=1e-5)
    torch.testing.assert_close(out, before)  # the model's outputs untouched
    assert all(blk.attn.fused_attn for blk in model.blocks) and count_hooks(model) == 0
    patch = res.patch_to_patch()
    assert patch.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(patch, ref.numpy().mean(2)[..., n_prefix:, n_prefix:], atol=1e-5)
    if n_prefix:
        cls = res.cls_to_patch(head=1)
        np.testing.assert_allclose(cls, ref.numpy()[:, :, 1, 0, n_prefix:].reshape(3, 3, 4, 4), atol=1e-5)
        heat, what = res.overview(head=1)
        assert what == "CLS attention"
        np.testing.assert_array_equal(heat, cls)
    else:
        with pytest.raises(FanlensError, match="no prefix tokens"):
            res.cls_to_patch()
        heat, what = res.overview()
        assert what == "attention received"  # each patch: its column of the patch matrix, mean over queries
        np.testing.assert_allclose(heat, ref.numpy().mean(2).mean(2).reshape(3, 3, 4, 4), atol=1e-5)


def test_block_selection_n_images_and_errors(tiny_vit):
    x = _pixels(4)
    res = fanlens.attention_maps(tiny_vit, x, blocks="blocks.2", n_images=3, progress=False)
    assert res.blocks == ("blocks.2",) and res.maps.shape[:2] == (3, 1) and len(res.images) == 3
    assert res.pixels.shape == (3, 64, 64, 3) and res.pixels.dtype == np.uint8
    with pytest.raises(FanlensError, match="head must be an int in \\[0, 2\\]"):
        res.cls_to_patch(head=3)
    with pytest.raises(FanlensError, match="no timm-style attention"):
        fanlens.attention_maps(tiny_vit, x, blocks="blocks.0.mlp", progress=False)
    cnn = timm.create_model("resnet18", num_classes=3).eval()
    with pytest.raises(FanlensError, match="no timm-style attention"):
        fanlens.attention_maps(cnn, _pixels(1, 64), progress=False)
    with pytest.raises(FanlensError, match="n_images must be"):
        fanlens.attention_maps(tiny_vit, x, n_images=0, progress=False)
    assert count_hooks(tiny_vit) == 0


def test_plot_attention_maps_next_to_the_groups(tiny_vit):
    import matplotlib

    matplotlib.use("Agg")
    from fanlens import plotting

    x = _pixels(2, seed=3)
    res = fanlens.attention_maps(tiny_vit, x, progress=False)
    groups = fanlens.group_tokens(tiny_vit, x, n_clusters=2, progress=False)
    fig = plotting.plot_attention_maps(res, image=1, groups=groups)
    axes = fig.axes
    assert len(axes) == 2 * 4  # image + 3 blocks, two rows
    heat = axes[2].get_images()[1].get_array()
    np.testing.assert_allclose(heat, res.cls_to_patch()[1, 1], rtol=1e-6)
    np.testing.assert_array_equal(axes[6].get_images()[1].get_array(), groups.labels[1][1])
    assert "blocks.1" in axes[2].get_title() and "k=2" in axes[6].get_title()
    one = plotting.plot_attention_maps(res, blocks=[2], head=0)
    np.testing.assert_allclose(one.axes[1].get_images()[1].get_array(), res.cls_to_patch(head=0)[0, 2], rtol=1e-6)
    other = fanlens.group_tokens(tiny_vit, x, blocks="blocks.0", n_clusters=2, progress=False)
    with pytest.raises(FanlensError, match="groups must hold the blocks"):
        plotting.plot_attention_maps(res, groups=other)
    with pytest.raises(FanlensError, match="maps must be an AttentionMaps"):
        plotting.plot_attention_maps(groups)


def test_rotary_attention_is_refused_and_eva_without_it_equals_timm():
    """EVA rotates q and k by its rotary embedding after q_norm and k_norm: maps from those two would leave the
    rotation out, so they are refused; an EVA without the rotary embedding gives timm's own maps."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=3)
    with_rope = Eva(use_rot_pos_emb=True, **kw).eval()
    with pytest.raises(FanlensError, match=r"block 'blocks.0': its attention \(EvaAttention\) rotates q and k"):
        fanlens.attention_maps(with_rope, _pixels(1, 32), progress=False)
    plain = Eva(use_rot_pos_emb=False, **kw).eval()
    assert plain.rope is None
    x = _pixels(2, 32, seed=3)
    res = fanlens.attention_maps(plain, x, progress=False)
    ref, _out = _timm_reference(plain, data_config(plain).normalize(x))
    assert res.maps.shape == (2, 2, 3, 17, 17) and float(np.abs(res.maps - ref.numpy()).max()) < 1e-5
    assert count_hooks(with_rope) == 0 and count_hooks(plain) == 0


def test_pixels_of_another_size_than_a_strict_patch_embedding(tiny_vit):
    """tiny_vit (passed in) is built for 64 x 64: a 32 x 32 tensor is refused before any forward, in one line;
    a ViT fanlens builds by name is resized to the tensor's size."""
    with pytest.raises(FanlensError, match=r"input_size must be the 64x64 this model was built for\. Got 32x32"):
        fanlens.attention_maps(tiny_vit, _pixels(2, 32), progress=False)
    assert count_hooks(tiny_vit) == 0 and tuple(tiny_vit.patch_embed.img_size) == (64, 64)
    res = fanlens.attention_maps("vit_tiny_patch16_224", _pixels(2, 48), progress=False)
    assert res.grid == (3, 3) and res.maps.shape == (2, 12, 3, 10, 10)
