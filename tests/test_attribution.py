"""captum bridge: attributions with closed-form answers, the share per group, the flip sigma."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fanlens
from fanlens import FanlensError
from fanlens.attribution import AttributionResult, attribute, attribution_share, min_flip_sigma
from fanlens.capture import TokenLayout
from fanlens.results import BlockInfo, GroupsResult, Provenance

from conftest import count_hooks

MEAN, STD = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)


def _cfg(model: nn.Module, size: int, mean=MEAN, std=STD) -> nn.Module:
    model.pretrained_cfg = dict(input_size=(3, size, size), mean=mean, std=std)
    return model.eval()


class Linear(nn.Module):
    def __init__(self, size: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * size * size, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class TokenNet(nn.Module):
    """Patch embedding, a CLS token, one block, mean of the patch tokens, linear head."""

    def __init__(self, patch: int = 4, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(nn.Linear(dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        t = self.blocks(t)
        return self.head(t[:, 1:].mean(1))


class ConvNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Conv2d(3, 5, 4, stride=4))
        self.head = nn.Linear(5, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- Integrated Gradients
@pytest.mark.parametrize("baseline", ["black", "mean"])
def test_ig_on_a_linear_model_is_input_minus_baseline_times_weight(baseline):
    torch.manual_seed(0)
    model = _cfg(Linear(), 8)
    x = _pixels(3, 8)
    res = attribute(model, x, method="ig", baseline=baseline, n_steps=8, progress=False)
    with torch.no_grad():
        pred = model((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]).argmax(1)
    assert res.predicted.tolist() == pred.tolist() == res.targets.tolist()
    w = model.fc.weight.detach().view(4, 3, 8, 8) / torch.tensor(STD)[None, :, None, None]
    x0 = torch.zeros_like(x) if baseline == "black" else torch.tensor(MEAN)[None, :, None, None].expand_as(x)
    expected = ((x - x0) * w[pred]).abs().sum(1).numpy()
    assert res.maps.shape == (3, 8, 8)
    np.testing.assert_allclose(res.maps, expected, rtol=1e-4, atol=1e-6)
    assert np.all(res.convergence < 1e-4)  # the path integral of a linear function is exact
    assert res.blocks == () and res.method == "ig"


def test_ig_target_overrides_the_prediction():
    torch.manual_seed(1)
    model = _cfg(Linear(), 8)
    x = _pixels(2, 8)
    res = attribute(model, x, target=2, n_steps=4, progress=False)
    assert res.targets.tolist() == [2, 2]
    w = model.fc.weight.detach().view(4, 3, 8, 8)[2] / torch.tensor(STD)[:, None, None]
    np.testing.assert_allclose(res.maps, (x * w).abs().sum(1).numpy(), rtol=1e-4, atol=1e-6)
    per_image = attribute(model, x, target=[0, 3], n_steps=4, progress=False)
    assert per_image.targets.tolist() == [0, 3]


# --------------------------------------------------------------------------- Grad-CAM
def test_gradcam_on_nlc_tokens_with_a_cls_token_matches_the_closed_form():
    torch.manual_seed(0)
    model = _cfg(TokenNet(), 16)
    x = _pixels(2, 16)
    hooks = count_hooks(model)
    res = attribute(model, x, method="gradcam", block="blocks.0", num_prefix_tokens=1, progress=False)
    assert count_hooks(model) == hooks
    # y_t = w_t . mean_i(A_i) + b  =>  alpha_c = w_tc / N,  cam_i = relu(w_t . A_i) / N
    xn = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        t = model.patch_embed(xn).flatten(2).transpose(1, 2)
        t = model.blocks(torch.cat([model.cls.expand(2, -1, -1), t], 1))[:, 1:]  # (2, 16, 6)
        pred = model(xn).argmax(1)
        cam = torch.relu((t * model.head.weight[pred][:, None, :]).sum(-1)) / t.shape[1]
    expected = cam.view(2, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2).numpy()
    np.testing.assert_allclose(res.maps, expected, rtol=1e-4, atol=1e-7)
    assert res.blocks[0].name == "blocks.0" and res.blocks[0].layout.num_prefix_tokens == 1
    assert res.blocks[0].layout.grid == (4, 4)
    assert np.isnan(res.convergence).all()
    with torch.no_grad():  # the model runs unchanged afterwards
        torch.testing.assert_close(model(xn).argmax(1), pred)


def test_gradcam_on_a_feature_map_matches_the_closed_form():
    torch.manual_seed(0)
    model = _cfg(ConvNet(), 12)
    x = _pixels(2, 12, seed=3)
    res = attribute(model, x, method="gradcam", block="blocks.0", target=1, progress=False)
    xn = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        a = model.blocks(xn)  # (2, 5, 3, 3)
        cam = torch.relu((a * model.head.weight[1][None, :, None, None]).sum(1)) / 9
    expected = cam.repeat_interleave(4, 1).repeat_interleave(4, 2).numpy()
    np.testing.assert_allclose(res.maps, expected, rtol=1e-4, atol=1e-7)
    assert res.blocks[0].layout.layout == "NCHW"


def test_gradcam_default_block_is_the_last_family_block(tiny_vit):
    res = attribute(tiny_vit, "samples", method="gradcam", progress=False)
    assert res.blocks[0].name == "blocks.2"
    assert res.maps.shape == (6, 64, 64) and (res.maps >= 0).all()
    # one value per 16 x 16 patch: the map is constant inside every patch
    m = res.maps.reshape(6, 4, 16, 4, 16)
    assert np.allclose(m, m[:, :, :1, :, :1])


# --------------------------------------------------------------------------- share per group
def _groups(labels: np.ndarray, names) -> GroupsResult:
    g = labels.shape[-2:]
    prov = Provenance("m", "w", "s", 0, {}, list(names))
    blocks = (BlockInfo(0, "b0", TokenLayout("NLC", 0, g, 4), g), BlockInfo(1, "b1", TokenLayout("NLC", 0, g, 4), g))
    return GroupsResult(blocks=blocks, images=tuple(names), labels=(labels, np.zeros_like(labels)),
                        n_clusters=np.array([[2] * len(names), [1] * len(names)]),
                        pixels=np.zeros((len(names), 4, 4, 3), np.uint8), provenance=prov)


def _attr(maps: np.ndarray, names) -> AttributionResult:
    n = len(names)
    return AttributionResult(blocks=(), method="ig", images=tuple(names), maps=maps.astype(np.float32),
                             targets=np.zeros(n, np.int64), predicted=np.zeros(n, np.int64),
                             convergence=np.zeros(n), pixels=np.zeros((n, 4, 4, 3), np.uint8),
                             provenance=Provenance("m", "w", "s", 0, {}, list(names)))


def test_share_is_the_mass_of_the_best_group_and_area_its_size():
    names = ("a", "b")
    labels = np.array([[[0, 1], [1, 1]], [[0, 1], [1, 1]]])  # group 0: top-left quarter
    maps = np.zeros((2, 4, 4))
    maps[0, :2, :2] = 1.5  # 6 in the top-left quarter
    maps[0, 3, 3] = 2.0  # 2 elsewhere
    share = attribution_share(_groups(labels, names), _attr(maps, names))
    assert share.share[0, 0] == pytest.approx(0.75)
    assert share.area[0, 0] == pytest.approx(0.25)
    assert share.group[0, 0] == 0
    assert share.share[1, 0] == pytest.approx(1.0) and share.area[1, 0] == pytest.approx(1.0)  # one group
    assert np.isnan(share.share[:, 1]).all()  # no mass at all
    s = share.summary("attribution_share")
    assert s["n"] == 1 and s["mean"][0] == pytest.approx(0.75)
    metrics = {r["metric"] for r in share.rows()}
    assert metrics == {"attribution_share_ig", "attribution_group_area_ig"}


def test_share_rejects_different_images():
    labels = np.zeros((2, 2, 2), int)
    with pytest.raises(FanlensError, match="same images"):
        attribution_share(_groups(labels, ("a", "b")), _attr(np.ones((2, 4, 4)), ("a", "c")))
    with pytest.raises(FanlensError, match="groups must be a GroupsResult"):
        attribution_share("x", _attr(np.ones((2, 4, 4)), ("a", "c")))


# --------------------------------------------------------------------------- smallest flipping sigma
class TwoClass(nn.Module):
    """logit_0 = v . x + b, logit_1 = 0 (identity normalisation)."""

    def __init__(self, v: torch.Tensor, b: float) -> None:
        super().__init__()
        self.v = nn.Parameter(v.flatten().clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        l0 = x.flatten(1) @ self.v + self.b
        return torch.stack([l0, torch.zeros_like(l0)], 1)


@pytest.mark.parametrize("sigma_star", [0.237, 0.053, 0.611])
def test_min_flip_sigma_finds_the_first_grid_value_past_the_closed_form(sigma_star):
    x = _pixels(1, 8, seed=5)
    eps = fanlens.make_noise(0, 0, (3, 8, 8))  # the probe's noise of image 0
    v = -eps / eps.norm()
    # logit gap d(sigma) = v.x + b - sigma |eps|: the prediction flips just past sigma_star
    b = sigma_star * eps.norm() - (v * x[0]).sum()
    model = _cfg(TwoClass(v, b), 8, mean=(0.0,) * 3, std=(1.0,) * 3)
    res = min_flip_sigma(model, x, max_sigma=1.0, step=0.01, progress=False)
    assert res.predicted.tolist() == [0]
    assert res.min_sigma[0] == pytest.approx(np.ceil(sigma_star / 0.01) * 0.01, abs=1e-9)
    assert res.flipped_to.tolist() == [1]
    assert res.n_flipped == 1 and res.median == pytest.approx(res.min_sigma[0])
    short = min_flip_sigma(model, x, max_sigma=sigma_star - 0.02, step=0.01, progress=False)
    assert np.isnan(short.min_sigma[0]) and short.flipped_to.tolist() == [-1] and short.median == np.inf


def test_min_flip_sigma_never_flips_when_noise_helps_the_prediction():
    x = _pixels(2, 8, seed=6)
    eps = fanlens.make_noise(0, 0, (3, 8, 8))
    model = _cfg(TwoClass(eps / eps.norm(), 0.3), 8, mean=(0.0,) * 3, std=(1.0,) * 3)
    res = min_flip_sigma(model, x[:1], max_sigma=0.5, step=0.05, progress=False)
    assert res.predicted.tolist() == [0] and np.isnan(res.min_sigma).all()


def test_flip_uses_the_noise_of_each_image_index():
    # image 1 of a batch is perturbed by make_noise(seed, 1): build the model around that noise
    x = _pixels(2, 8, seed=7)
    eps1 = fanlens.make_noise(3, 1, (3, 8, 8))
    v = -eps1 / eps1.norm()
    b = 0.417 * eps1.norm() - (v * x[1]).sum()
    model = _cfg(TwoClass(v, b), 8, mean=(0.0,) * 3, std=(1.0,) * 3)
    res = min_flip_sigma(model, x, seed=3, max_sigma=1.0, step=0.01, progress=False)
    assert res.min_sigma[1] == pytest.approx(0.42, abs=1e-9)


# --------------------------------------------------------------------------- round trip and errors
def test_results_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = _cfg(Linear(), 8)
    x = _pixels(2, 8)
    a = attribute(model, x, n_steps=4, progress=False)
    a.save(tmp_path / "a")
    b = fanlens.load(tmp_path / "a")
    assert isinstance(b, AttributionResult) and b.method == "ig"
    np.testing.assert_array_equal(a.maps, b.maps)
    assert b.provenance.params["n_steps"] == 4
    f = min_flip_sigma(model, x, max_sigma=0.3, step=0.1, progress=False)
    f.save(tmp_path / "f")
    g = fanlens.load(tmp_path / "f")
    np.testing.assert_array_equal(f.min_sigma, g.min_sigma)
    assert g.step == 0.1 and g.space == "pixel"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="lime"), "method must be one of"),
        (dict(baseline="white"), "baseline must be one of"),
        (dict(n_steps=1), "n_steps"),
        (dict(target=1.5), "target must be a class index"),
        (dict(target=[0, 1, 2]), "target must hold one class per image"),
        (dict(block="fc"), "block applies to method='gradcam'"),
        (dict(target=9), "target must be a valid class index"),
    ],
)
def test_attribute_errors_name_the_parameter(kwargs, match):
    model = _cfg(Linear(), 8)
    with pytest.raises(FanlensError, match=match):
        attribute(model, _pixels(2, 8), progress=False, **kwargs)


def test_gradcam_errors(tiny_vit):
    with pytest.raises(FanlensError, match="exactly one block"):
        attribute(tiny_vit, "samples", method="gradcam", block="blocks.*", progress=False)
    with pytest.raises(FanlensError, match="block must name the Grad-CAM block"):
        attribute(_cfg(Linear(), 8), _pixels(1, 8), method="gradcam", progress=False)


def test_non_logit_output_is_rejected():
    model = _cfg(nn.Sequential(nn.Conv2d(3, 2, 1)), 8)
    with pytest.raises(FanlensError, match=r"class logits of shape \(batch, classes\)"):
        attribute(model, _pixels(1, 8), progress=False)


@pytest.mark.parametrize("kwargs, match", [(dict(step=0), "step must be a positive"),
                                           (dict(max_sigma=0.01, step=0.01), "max_sigma must be at least"),
                                           (dict(space="latent"), "space must be one of")])
def test_flip_errors(kwargs, match):
    with pytest.raises(FanlensError, match=match):
        min_flip_sigma(_cfg(Linear(), 8), _pixels(1, 8), progress=False, **kwargs)


def test_ig_warns_when_the_path_integral_is_inexact(caplog):
    torch.manual_seed(0)
    model = _cfg(nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.Tanh(), nn.Linear(16, 3)), 8)
    x = _pixels(4, 8) * 8  # steep tanh: a 2-step integral is far off
    with caplog.at_level("WARNING", logger="fanlens.attribution"):
        res = attribute(model, x.clamp(0, 1), n_steps=2, progress=False)
    bad = int((res.convergence > 0.1).sum())
    assert bad > 0
    assert f"on {bad} of 4 images" in caplog.text and "raise n_steps" in caplog.text
