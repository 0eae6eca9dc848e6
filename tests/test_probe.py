"""Noise probe: exact zeros, closed forms on linear models, seeding and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fanlens
from fanlens import FanlensError, make_noise


class Linear2(nn.Module):
    """Two bias-free 1x1 convolutions: features are linear in the input."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.blocks = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.Conv2d(6, 4, 1, bias=False))
        with torch.no_grad():
            for m in self.blocks:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))

    def forward(self, x):
        return self.blocks(x)


class Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * x


def _pixels(n=3, h=8, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def test_sigma_zero_gives_exactly_zero(tiny_vit):
    x = _pixels(2, 64, 64)
    r = fanlens.noise_probe(tiny_vit, x, sigmas=(0.0, 0.2), progress=False)
    assert r.values(0.0).tolist() == [0.0] * 3
    assert (r.values(0.2) > 0).all()
    assert r.sigmas == (0.0, 0.2) and r.mean.shape == (3, 2)


def test_sigma_zero_needs_no_forward_pass(tiny_vit):
    x = _pixels(3, 64, 64)
    seen = []
    h = tiny_vit.patch_embed.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        r = fanlens.noise_probe(tiny_vit, x, sigmas=(0.0, 0.1, 0.5), batch_size=3, progress=False)
        assert seen == [3 * 3]  # clean + two noisy copies; none for sigma = 0
        seen.clear()
        spec, both = fanlens.analyze(tiny_vit, x, sigmas=(0.1, 0.0), batch_size=3, progress=False)
        assert seen == [3 * 2]
        seen.clear()
        fanlens.noise_probe(tiny_vit, x, sigmas=(0.0,), batch_size=3, progress=False)
        assert seen == [3]
    finally:
        h.remove()
    ref = fanlens.noise_probe(tiny_vit, x, sigmas=(0.1, 0.5), batch_size=3, progress=False)
    np.testing.assert_array_equal(r.values(0.0), 0.0)
    np.testing.assert_allclose(r.mean[:, 1:], ref.mean, rtol=1e-6)
    np.testing.assert_allclose(both.values(0.1), ref.values(0.1), rtol=1e-6)
    np.testing.assert_array_equal(both.values(0.0), 0.0)


@pytest.mark.parametrize("space", ["normalized", "pixel"])
def test_linear_model_closed_form(space):
    m = Linear2().eval()
    x = _pixels()
    sigmas = (0.05, 0.3)
    r = fanlens.noise_probe(m, x, sigmas=sigmas, space=space, blocks="blocks.*", seed=5, progress=False)
    cfg = fanlens.data.data_config(m)
    mean = torch.tensor(cfg.mean)[:, None, None]
    std = torch.tensor(cfg.std)[:, None, None]
    xn = (x - mean) / std
    expected = np.zeros((2, 2, 3))
    with torch.no_grad():
        for i in range(3):
            eps = make_noise(5, i, x.shape[1:])
            if space == "pixel":
                eps = eps / std  # mean cancels, std scales
            f_x, f_e = xn[i : i + 1], eps[None]
            for li, blk in enumerate(m.blocks):
                f_x, f_e = blk(f_x), blk(f_e)
                for si, s in enumerate(sigmas):
                    expected[li, si, i] = s * f_e.norm() / f_x.norm()  # delta = sigma ||f(eps)|| / ||f(x)||
    np.testing.assert_allclose(r.mean, expected.mean(-1), rtol=1e-5)
    np.testing.assert_allclose(r.std, expected.std(-1, ddof=1), rtol=1e-4)
    # linearity: delta scales with sigma exactly
    np.testing.assert_allclose(r.mean[:, 1] / r.mean[:, 0], 6.0, rtol=1e-5)


def test_pure_mode_scaling_blocks():
    m = nn.Sequential(Scale(2.0), Scale(3.0), Scale(0.5)).eval()
    r = fanlens.noise_probe(m, mode="pure", n_noise=5, blocks=["0", "1", "2"], input_size=8, progress=False)
    assert r.mode == "pure" and r.n_images == 5
    np.testing.assert_allclose(r.mean[:, 0], [1.0, 3.0, 1.5], rtol=1e-6)
    np.testing.assert_allclose(r.std[:, 0], 0.0, atol=1e-6)


def test_noise_is_paired_by_seed_and_index():
    a = make_noise(3, 7, (3, 4, 4))
    assert torch.equal(a, make_noise(3, 7, (3, 4, 4)))
    assert not torch.equal(a, make_noise(3, 8, (3, 4, 4)))
    assert not torch.equal(a, make_noise(4, 7, (3, 4, 4)))
    assert abs(make_noise(0, 0, (200_000,)).std().item() - 1.0) < 0.01


def test_batch_size_does_not_change_results(tiny_vit):
    x = _pixels(5, 64, 64)
    r1 = fanlens.noise_probe(tiny_vit, x, sigmas=0.1, batch_size=1, progress=False)
    r3 = fanlens.noise_probe(tiny_vit, x, sigmas=0.1, batch_size=3, progress=False)
    np.testing.assert_allclose(r1.mean, r3.mean, rtol=1e-5)
    np.testing.assert_allclose(r1.std, r3.std, rtol=1e-4)


def test_ci_is_normal_interval_of_the_mean():
    m = Linear2().eval()
    r = fanlens.noise_probe(m, _pixels(4), sigmas=0.1, blocks="blocks.*", progress=False)
    half = 1.959963984540054 * r.std / np.sqrt(4)
    np.testing.assert_allclose(r.ci_high - r.mean, half, rtol=1e-9)
    np.testing.assert_allclose(r.mean - r.ci_low, half, rtol=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigmas=(-0.1,)), "sigmas must be a finite float >= 0"),
        (dict(sigmas="0.1,abc"), "comma-separated numbers"),
        (dict(sigmas=()), "at least one"),
        (dict(sigmas=(0.1, 0.1)), "distinct"),
        (dict(mode="mixed"), "mode must be one of"),
        (dict(space="latent"), "space must be one of"),
    ],
)
def test_bad_arguments(tiny_vit, kwargs, match):
    with pytest.raises(FanlensError, match=match):
        fanlens.noise_probe(tiny_vit, _pixels(1, 64, 64), progress=False, **kwargs)


class _Patches(torch.nn.Module):
    """(B, 3, 16, 16) -> (B, 16, 48) tokens: the 4 x 4 patches as they are."""

    def forward(self, x):
        b = x.shape[0]
        return x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(b, 16, 48)


class _Half(torch.nn.Module):
    def forward(self, t):
        return 0.5 * t


class _PatchModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(_Patches(), _Half())

    def forward(self, x):
        return self.blocks(x).mean(1)


def test_pure_vs_clean_divides_the_noise_norm_by_the_image_norm_at_the_same_block():
    from fanlens import Lens
    from fanlens.runner import make_noise

    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    lens = Lens(_PatchModel(), x, blocks="blocks.*", num_prefix_tokens=0, batch_size=2, seed=3, progress=False)
    res = lens.probe(mode="pure_vs_clean")
    xn = lens.setup.cfg.normalize(x)
    eps = torch.stack([make_noise(3, i, (3, 16, 16)) for i in range(5)])
    expected = (_Patches()(eps).norm(dim=-1).mean(1) / _Patches()(xn).norm(dim=-1).mean(1)).numpy()
    assert res.metric == "noise_to_clean_norm" and res.per_image.shape == (5, 2, 1)
    np.testing.assert_allclose(res.per_image[:, 0, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(res.per_image[:, 1, 0], expected, rtol=1e-5)  # halving both leaves the ratio
    # the same through the module function (no cache: clean and noise in one batch)
    ref = fanlens.noise_probe(_PatchModel(), x, mode="pure_vs_clean", blocks="blocks.*", num_prefix_tokens=0,
                              batch_size=2, seed=3, progress=False)
    np.testing.assert_allclose(ref.per_image, res.per_image, rtol=1e-6)
    with pytest.raises(FanlensError, match="token_norm goes with mode='additive'"):
        lens.probe(mode="pure_vs_clean", token_norm=True)


def test_token_norm_applies_a_per_token_layernorm_before_the_additive_measure():
    from fanlens import Lens
    from fanlens.runner import make_noise

    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    lens = Lens(_PatchModel(), x, blocks="blocks.*", num_prefix_tokens=0, batch_size=4, seed=0, progress=False)
    res = lens.probe(sigmas=(0.2,), token_norm=True)
    eps = torch.stack([make_noise(0, i, (3, 16, 16)) for i in range(4)])
    ln = lambda t: torch.nn.functional.layer_norm(t, t.shape[-1:])  # noqa: E731
    clean, noisy = ln(_Patches()(lens.setup.cfg.normalize(x))), ln(_Patches()(lens.setup.cfg.normalize(x + 0.2 * eps)))
    expected = ((noisy - clean).flatten(1).norm(dim=1) / clean.flatten(1).norm(dim=1)).numpy()
    np.testing.assert_allclose(res.per_image[:, 0, 0], expected, rtol=1e-4)
    assert res.provenance.params["token_norm"].startswith("per-token LayerNorm")
    plain = lens.probe(sigmas=(0.2,))
    assert plain.provenance.params["token_norm"] is None
    assert not np.allclose(plain.per_image, res.per_image)


def test_a_batch_whose_tokens_exceed_the_forward_limit_goes_through_in_parts_with_the_same_numbers(
        tiny_vit, monkeypatch):
    """With many copies per image (4 noise levels: 5 inputs per image), a batch of at least
    runner.MIN_INPUTS_TO_SPLIT inputs whose captured tokens would exceed runner.MAX_FORWARD_TOKEN_BYTES is
    forwarded in parts of whole images: here 2 images (10 inputs) per forward instead of 6 (30), after one
    blank input that measures a token's size; the perturbations are those of the whole batch, and no hook is
    left behind. Below the input count nothing is measured (the whole run above: one forward of 30)."""
    from conftest import count_hooks

    from fanlens import runner

    x = _pixels(6, 64, 64)
    sigmas = (0.05, 0.1, 0.2, 0.5)
    seen: list[int] = []
    handle = tiny_vit.register_forward_pre_hook(lambda m, a: seen.append(int(a[0].shape[0])))
    try:
        whole = fanlens.noise_probe(tiny_vit, x, sigmas=sigmas, batch_size=6, progress=False)
        assert seen == [30]
        seen.clear()
        s = runner.setup(tiny_vit, None, pretrained=False, checkpoint=None, input_size=64, device="cpu", blocks=None,
                         num_prefix_tokens=None, layout=None, grid=None, need_images=False)
        from fanlens.capture import TokenCapture

        with TokenCapture(s.lm.model, **s.capture_kwargs) as cap:
            per_input = runner._token_bytes_per_input(cap, s)
        assert seen == [1]
        blocks = len(whole.blocks)
        assert per_input == blocks * 17 * 192 * 4  # 16 patch tokens and a class token of width 192, float32, per block
        assert runner._images_per_forward(6, 5, per_input) == 6  # at the default limit the batch fits whole
        seen.clear()
        monkeypatch.setattr(runner, "MAX_FORWARD_TOKEN_BYTES", per_input * 5 * 2 + per_input)  # 2 images fit, not 3
        monkeypatch.setattr(runner, "MIN_INPUTS_TO_SPLIT", 30)  # a batch of 6 x 5 inputs is checked
        before = count_hooks(tiny_vit)
        parts = fanlens.noise_probe(tiny_vit, x, sigmas=sigmas, batch_size=6, progress=False)
        assert count_hooks(tiny_vit) == before
    finally:
        handle.remove()
    assert seen == [1, 10, 10, 10]
    np.testing.assert_allclose(parts.mean, whole.mean, rtol=1e-5)
    np.testing.assert_allclose(parts.std, whole.std, rtol=1e-4)
    np.testing.assert_allclose(parts.per_image, whole.per_image, rtol=1e-5)
