"""Procedural shapes: determinism, masks, the brightness contract, known shape areas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fanlens import FanlensError
from fanlens.synthetic import SHAPE_CLASSES, SyntheticShapes, _shape_mask


def test_items_are_pure_functions_of_seed_split_index():
    a = SyntheticShapes(10, seed=3, split="val")
    b = SyntheticShapes(500, seed=3, split="val")
    for i in (0, 7):
        xa, ya, ma = a[i]
        xb, yb, mb = b[i]
        assert torch.equal(xa, xb) and ya == yb and torch.equal(ma, mb)
    assert not torch.equal(a[0][0], SyntheticShapes(10, seed=3, split="test")[0][0])
    assert not torch.equal(a[0][0], SyntheticShapes(10, seed=4, split="val")[0][0])


def test_shapes_dtypes_and_ranges():
    x, y, m = SyntheticShapes(4, seed=0).batch(range(4))
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert m.shape == (4, 64, 64) and m.dtype == torch.bool
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y.dtype == torch.long and set(y.tolist()) <= set(range(8))


def test_every_class_occurs_and_objects_are_brighter():
    ds = SyntheticShapes(400, seed=1, split="test")
    labels = []
    for i in range(len(ds)):
        x, y, m = ds[i]
        labels.append(y)
        lum = x.mean(0)
        area = m.float().mean().item()
        assert 0.03 < area < 0.6
        assert lum[m].mean() > lum[~m].mean() + 0.1
    counts = np.bincount(labels, minlength=len(SHAPE_CLASSES))
    assert (counts > 20).all()


@pytest.mark.parametrize("name, area", [
    ("disk", math.pi / 4),
    ("square", 0.78**2),
    ("ring", math.pi * (1 - 0.55**2) / 4),
    ("hexagon", 3 * math.sqrt(3) / 2 / 4),
    ("triangle", 3 * math.sqrt(3) / 4 / 4),
])
def test_shape_masks_have_their_area(name, area):
    g = np.linspace(-1, 1, 801)
    u, v = np.meshgrid(g, g)
    frac = _shape_mask(SHAPE_CLASSES.index(name), u, v).mean()
    assert frac == pytest.approx(area, rel=0.01)


def test_bad_arguments():
    with pytest.raises(FanlensError, match="split must be one of"):
        SyntheticShapes(3, split="holdout")
    with pytest.raises(FanlensError, match="index must be in"):
        SyntheticShapes(3)[3]


def test_textures_task_cannot_be_solved_by_brightness():
    from fanlens.synthetic import TASKS, TEXTURE_CLASSES, SyntheticTextures

    assert TASKS["textures"] is SyntheticTextures and len(TEXTURE_CLASSES) == 10
    ds = SyntheticTextures(120, seed=0, split="test")
    x, y, m = ds.batch(range(120))
    assert x.shape == (120, 3, 64, 64) and ds.num_classes == 10 and set(y.tolist()) == set(range(10))
    grey = x.mean(1)
    inside, outside = float(grey[m].mean()), float(grey[~m].mean())
    assert abs(inside - outside) < 0.01  # the same mean intensity inside and outside the objects
    # per image, the object's texture has more local contrast than the background: that is the cue
    hp = (grey[:, 1:, :] - grey[:, :-1, :]).abs()
    mm = m[:, 1:, :] & m[:, :-1, :]
    assert float(hp[mm].mean()) > 2 * float(hp[~(m[:, 1:, :] | m[:, :-1, :])].mean())
    assert all(0 < int(m[i].sum()) < 64 * 64 // 2 for i in range(120))
    again = SyntheticTextures(120, seed=0, split="test").batch([7])[0]
    assert torch.equal(again[0], x[7])  # a pure function of (seed, split, index)
    assert not torch.equal(SyntheticTextures(8, seed=0, split="val").batch([7])[0][0], x[7])
