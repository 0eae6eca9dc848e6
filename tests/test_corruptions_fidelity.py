"""fanlens.corruptions against the reference implementation (``imagecorruptions-imaug`` 1.1.5).

32 images: 16 crops of scikit-image's photos and 16 procedural shapes, at 224 x 224 (the size
ImageNet-C's parameters are written for), fed to both as the same uint8 pixels.

- Deterministic corruptions: PSNR of fanlens' output (truncated to uint8 as the reference's is)
  against the reference's, every image, every severity: >= 35 dB.
- Random corruptions: the residual (corrupted - clean) over all 32 images, per channel: the
  standard deviation within 5 % of the reference's, and the mean within 5 % of the larger of
  the reference's |mean| and its standard deviation (a residual whose mean is ~0 has no
  meaningful relative error). Fog's residual is dominated by one random fractal per image: its
  mean is compared by a two-sample z-test of the per-image means (|z| < 3), as the reference
  itself differs by up to 25 % between two seeds on 32 images. Frost and water spatter deviate
  by design (``fanlens.corruptions.DEVIATIONS``); their measured gaps are held to the bounds
  stated there so that a regression shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

ic = pytest.importorskip("imagecorruptions", reason="the reference (pip install --no-deps imagecorruptions-imaug"
                                                     "==1.1.5 opencv-python-headless numba) is not installed")

from fanlens import corruptions as C  # noqa: E402

SIZE = 224
FIVE_PERCENT = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur",
                "snow", "elastic_transform")
# measured gaps of the documented deviations (max over severities and channels), with a margin
DEVIATION_BOUNDS = {"frost": {"sd": 0.35, "mean": 0.30},
                    "spatter_water": {"sd": 0.35, "mean": 0.15}}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    from skimage import data

    from fanlens.synthetic import SyntheticShapes

    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.fromarray(getattr(data, n)()).convert("RGB")) for n in
              ("astronaut", "chelsea", "coffee", "rocket")]
    out = []
    for i in range(16):
        p = photos[i % 4]
        h, w = p.shape[:2]
        s = min(h, w) // 2 + int(rng.integers(0, min(h, w) // 2))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        out.append(np.asarray(Image.fromarray(p[y : y + s, x : x + s]).resize((SIZE, SIZE), Image.BICUBIC)))
    xb, _, _ = SyntheticShapes(16, seed=0, split="test").batch(range(16))
    for a in (xb.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8):
        out.append(np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.BICUBIC)))
    return np.stack(out)


def _ours(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255
    y = C.corrupt(x, name, severity).permute(0, 2, 3, 1).double().numpy() * 255
    return np.floor(y + 1e-4)  # the reference returns np.uint8(...): truncation


def _ref(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    np.random.seed(1000 * severity + C.NAMES.index(name))
    return np.stack([ic.corrupt(im, corruption_name=name, severity=severity) for im in images]).astype(np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


@pytest.mark.parametrize("name", [n for n in C.NAMES if n not in
                                  ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur",
                                   "motion_blur", "snow", "frost", "fog", "elastic_transform", "spatter")])
def test_deterministic_corruptions_match_the_reference(images, name):
    worst = []
    for s in C.SEVERITIES:
        ours, ref = _ours(images, name, s), _ref(images, name, s)
        psnr = [_psnr(o, r) for o, r in zip(ours, ref)]
        worst.append(min(psnr))
    print(f"{name}: worst PSNR per severity " + " ".join(f"{v:.1f}" for v in worst))
    assert min(worst) >= 35.0, worst


def _residual_gaps(images, name, s, select=slice(None)):
    clean = images.astype(np.float64)
    ro = (_ours(images, name, s) - clean)[select].reshape(-1, 3) / 255
    rr = (_ref(images, name, s) - clean)[select].reshape(-1, 3) / 255
    sd_r, sd_o = rr.std(0), ro.std(0)
    d_sd = np.abs(sd_o - sd_r) / sd_r
    d_mean = np.abs(ro.mean(0) - rr.mean(0)) / np.maximum(np.abs(rr.mean(0)), sd_r)
    return float(d_mean.max()), float(d_sd.max())


@pytest.mark.parametrize("name", FIVE_PERCENT)
def test_random_corruptions_match_the_reference_within_5_percent(images, name):
    for s in C.SEVERITIES:
        dm, dsd = _residual_gaps(images, name, s)
        print(f"{name} s{s}: mean gap {dm:.3f}, std gap {dsd:.3f}")
        assert dm <= 0.05 and dsd <= 0.05, (s, dm, dsd)


def test_spatter_mud_matches_and_water_deviates_within_its_bound(images):
    for s in (4, 5):  # mud: the reference's own recipe
        dm, dsd = _residual_gaps(images, "spatter", s)
        assert dm <= 0.05 and dsd <= 0.05, (s, dm, dsd)
    for s in (1, 2, 3):  # water: see DEVIATIONS
        dm, dsd = _residual_gaps(images, "spatter", s)
        assert dm <= DEVIATION_BOUNDS["spatter_water"]["mean"] and dsd <= DEVIATION_BOUNDS["spatter_water"]["sd"]


@pytest.mark.parametrize("name", ("frost",))
def test_documented_deviations_stay_within_their_bounds(images, name):
    assert name in C.DEVIATIONS
    for s in C.SEVERITIES:
        dm, dsd = _residual_gaps(images, name, s)
        print(f"{name} s{s}: mean gap {dm:.3f}, std gap {dsd:.3f}")
        assert dm <= DEVIATION_BOUNDS[name]["mean"] and dsd <= DEVIATION_BOUNDS[name]["sd"], (s, dm, dsd)


def test_fog_matches_the_reference_statistically(images):
    clean = images.astype(np.float64) / 255
    for s in C.SEVERITIES:
        o = (_ours(images, "fog", s) / 255 - clean).reshape(len(images), -1).mean(1)
        r = (_ref(images, "fog", s) / 255 - clean).reshape(len(images), -1).mean(1)
        z = (o.mean() - r.mean()) / np.sqrt(o.var(ddof=1) / len(o) + r.var(ddof=1) / len(r))
        print(f"fog s{s}: per-image residual mean {o.mean():.4f} vs {r.mean():.4f}, z = {z:.2f}")
        assert abs(z) < 3.0, (s, z)
