"""fanlens.robustness: errors and flip rates under corruptions, CE and mCE, labels, CLI, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fanlens
from fanlens import FanlensError, cli
from fanlens.robustness import ALEXNET_ERRORS, corruption_errors, load_labels, robustness


class StdClassifier(nn.Module):
    """Class 1 when the image's pixel spread is above a threshold, else class 0 (inputs are
    normalised with mean 0.5, std 0.5, so the spread is twice the pixels')."""

    def __init__(self) -> None:
        super().__init__()
        self.pretrained_cfg = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                   crop_pct=1.0, interpolation="bilinear")

    def forward(self, x):
        spread = x.flatten(2).std(2).mean(1)  # spatial spread per channel
        return torch.stack([torch.zeros_like(spread), spread - 0.05], 1)


def _flat_images(n=6):
    return torch.rand(n, 3, 1, 1).expand(n, 3, 32, 32).clone() * 0.6 + 0.2  # one colour each: spread 0


def test_flip_rate_and_error_have_known_values():
    x = _flat_images()
    r = robustness(StdClassifier(), x, corruptions="gaussian_noise,contrast", severities=(1, 5), progress=False)
    assert r.metric == "flip_rate" and r.n_images == 6
    np.testing.assert_array_equal(r.mean, [[1.0, 1.0], [0.0, 0.0]])  # noise spreads every image, contrast none
    np.testing.assert_array_equal(r.clean, [0.0, 0.0, 0.0, 0.0])
    assert math.isnan(r.robust_accuracy) and r.baseline == ""
    labels = [0, 0, 0, 1, 1, 1]  # half the labels say "spread": clean error 0.5
    e = robustness(StdClassifier(), x, labels=labels, corruptions="gaussian_noise,contrast", severities=(1, 5),
                   progress=False)
    assert e.metric == "top1_error" and e.clean[0] == 0.5
    np.testing.assert_array_equal(e.mean, [[0.5, 0.5], [0.5, 0.5]])
    assert e.robust_accuracy == 0.5
    assert e.value("contrast", 5) == 0.5


def test_corruption_errors_by_hand():
    mean = np.array([[0.2, 0.4], [0.5, 0.7]])
    kw = dict(corruptions="gaussian_noise,contrast", severities=(1, 5), progress=False)
    base = robustness(StdClassifier(), _flat_images(), labels=[0, 0, 0, 1, 1, 1], **kw)  # every error 0.5
    label, ce, rel, mce, rmce = corruption_errors(mean, 0.1, ("gaussian_noise", "contrast"), (1, 5), base)
    np.testing.assert_allclose(ce, [0.6 / 1.0, 1.2 / 1.0])
    assert mce == pytest.approx(0.9)
    assert np.isnan(rel).all() and math.isnan(rmce)  # the baseline loses nothing to the corruptions: undefined
    zero = robustness(StdClassifier(), _flat_images(), labels=[0] * 6, **kw)  # no error under contrast
    with pytest.raises(FanlensError, match=r"Got none under \['contrast'\] \(CE undefined\)"):
        corruption_errors(mean, 0.1, ("gaussian_noise", "contrast"), (1, 5), zero)
    # against AlexNet: all five severities, CE = sum of errors / (5 x AlexNet's mean error)
    m5 = np.full((2, 5), 0.5)
    label, ce, rel, mce, rmce = corruption_errors(m5, 0.2, ("fog", "speckle_noise"), (1, 2, 3, 4, 5), "alexnet")
    assert label == "alexnet" and ce[0] == pytest.approx(2.5 / (5 * ALEXNET_ERRORS["fog"]))
    assert math.isnan(ce[1])  # a held-out corruption has no AlexNet error
    assert mce == pytest.approx(ce[0])  # the mean over the benchmark corruptions present
    from fanlens.robustness import ALEXNET_CLEAN_ERROR

    assert rel[0] == pytest.approx((2.5 - 5 * 0.2) / (5 * ALEXNET_ERRORS["fog"] - 5 * ALEXNET_CLEAN_ERROR))
    with pytest.raises(FanlensError, match="needs all five severities"):
        corruption_errors(mean, 0.1, ("fog", "snow"), (1, 5), "alexnet")


def test_results_do_not_depend_on_the_batch_size_and_resume_exactly(tmp_path):
    model = fanlens.zoo.load("cnn")
    kw = dict(n_images=24, corruptions="shot_noise,glass_blur,fog", severities=(2, 4), progress=False)
    a = robustness(model, "synthetic", batch_size=24, **kw)
    b = robustness(model, "synthetic", batch_size=5, **kw)
    np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=1e-12)  # the same 0/1 per image; merge rounding only
    assert a.metric == "top1_error" and a.n_images == 24
    # stop after two batches, resume
    calls = {"n": 0}

    def stop(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2 * 7 + 1:  # 7 forward passes per batch
            raise RuntimeError("stop")

    h = model.model.register_forward_hook(stop)
    with pytest.raises(fanlens.FanlensError, match="forward pass failed .*: stop"):  # the model's error, in one line
        robustness(model, "synthetic", batch_size=5, state_dir=tmp_path / "st", checkpoint_every=1, **kw)
    h.remove()
    c = robustness(model, "synthetic", batch_size=5, state_dir=tmp_path / "st", resume=True, **kw)
    np.testing.assert_array_equal(c.mean, b.mean)
    np.testing.assert_array_equal(c.std, b.std)


def test_labels_from_folders_csv_and_class_index(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / cls / f"{cls}{i}.png")
    names = sorted(str(p) for p in tmp_path.rglob("*.png"))
    np.testing.assert_array_equal(load_labels("folders", names), [0, 0, 1, 1])
    np.testing.assert_array_equal(load_labels("folders", names, {"cat": 281, "dog": 207}), [281, 281, 207, 207])
    (tmp_path / "labels.csv").write_text("file,label\ncat0.png,3\ncat1.png,4\ndog0.png,dog\ndog1.png,5\n")
    np.testing.assert_array_equal(load_labels(tmp_path / "labels.csv", names, {"dog": 9}), [3, 4, 9, 5])
    with pytest.raises(FanlensError, match="labels must hold one class per image"):
        load_labels([1, 2], names)
    with pytest.raises(FanlensError, match="class_index must name every class folder"):
        load_labels("folders", names, {"cat": 1})
    with pytest.raises(FanlensError, match="has none for"):
        (tmp_path / "short.csv").write_text("cat0.png,1\n")
        load_labels(tmp_path / "short.csv", names)


@pytest.mark.parametrize("kwargs, match", [
    (dict(corruptions="fogg"), "corruptions must be one of"),
    (dict(severities=(0, 3)), "severities must be ints in 1..5"),
    (dict(severities="1,x"), "severities must be comma-separated"),
    (dict(corruptions="fog,fog"), "must not repeat"),
    (dict(baseline="alexnet"), "baseline needs top-1 errors"),
    (dict(labels=[7] * 4), "labels must be class indices below the model's 2 outputs"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(FanlensError, match=match):
        robustness(StdClassifier(), _flat_images(4), progress=False, **{"corruptions": "fog", **kwargs})


def test_cli_writes_the_table_and_heat_map(tmp_path, capsys):
    base = ["robustness", "--model", "zoo:cnn", "--images", "synthetic", "--n-images", "16", "--corruptions",
            "gaussian_noise,contrast", "--severities", "1,5", "--no-progress"]
    assert cli.main(base + ["--out", str(tmp_path / "cnn")]) == 0
    out = capsys.readouterr().out
    assert "zoo:cnn: top-1 error over 16 images" in out and "robust accuracy" in out
    names = sorted(p.name for p in (tmp_path / "cnn").iterdir() if not p.name.startswith("."))
    assert names == ["arrays.npz", "manifest.json", "results.csv", "robustness.png"]
    first = fanlens.load(tmp_path / "cnn")
    assert first.KIND == "robustness" and first.corruptions == ("gaussian_noise", "contrast")
    assert cli.main(base[:2] + ["zoo:fan"] + base[3:] + ["--out", str(tmp_path / "fan"), "--baseline",
                                                           str(tmp_path / "cnn")]) == 0
    fan = fanlens.load(tmp_path / "fan")
    assert fan.baseline == "zoo:cnn"
    np.testing.assert_allclose(fan.ce, fan.mean.sum(1) / first.mean.sum(1))
    assert "mCE" in capsys.readouterr().out
    assert cli.main(base + ["--out", str(tmp_path / "x"), "--baseline", "alexnet"]) == 2
    assert "needs all five severities" in capsys.readouterr().err


# --------------------------------------------------------------------------- the probe under corruptions
class Scale(nn.Module):
    """Blocks that scale their input: the relative change of every block is that of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Identity(), _Times(2.0))
        self.pretrained_cfg = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                   crop_pct=1.0, interpolation="bilinear")

    def forward(self, x):
        return self.blocks(x)


class _Times(nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


def test_probe_under_a_corruption_has_the_closed_form():
    from fanlens.corruptions import corrupt

    x = torch.rand(3, 3, 32, 32)
    r = fanlens.noise_probe(Scale(), x, corruption="fog,contrast@1", severity=[2, 4], blocks="blocks.*",
                            progress=False, seed=5)
    assert r.perturbations == ("fog@2", "fog@4", "contrast@1") and r.sigmas == ()
    norm = lambda t: (t - 0.5) / 0.25  # noqa: E731
    for k, (c, s) in enumerate((("fog", 2), ("fog", 4), ("contrast", 1))):
        xc = corrupt(x, c, s, seed=5, indices=[0, 1, 2])
        per_image = (norm(xc) - norm(x)).flatten(1).norm(dim=1) / norm(x).flatten(1).norm(dim=1)
        for li in range(2):  # both blocks: scaling does not change a relative change
            assert r.mean[li, k] == pytest.approx(float(per_image.mean()), rel=1e-5)
    rows = [row for row in r.rows() if row["statistic"] == "mean"]
    assert {(row["corruption"], row["severity"]) for row in rows} == {("fog", "2"), ("fog", "4"), ("contrast", "1")}
    np.testing.assert_array_equal(r.values("fog@4"), r.mean[:, 1])


def test_probe_corruption_errors_and_family_plot():
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(FanlensError, match="corruption goes with mode='additive'"):
        fanlens.noise_probe(Scale(), x, corruption="fog", mode="pure", blocks="blocks.*", progress=False)
    with pytest.raises(FanlensError, match="must not repeat"):
        fanlens.noise_probe(Scale(), x, corruption="fog,fog@3", blocks="blocks.*", progress=False)
    from fanlens.plotting import plot_probe_families

    names = "gaussian_noise,shot_noise,glass_blur,fog,contrast,pixelate"
    r = fanlens.noise_probe(Scale(), x, corruption=names, severity=3, blocks="blocks.*", progress=False)
    spec = fanlens.spectrum(Scale(), x, blocks="blocks.*", progress=False)
    ax = plot_probe_families(r, spec)
    assert [ln.get_label() for ln in ax.lines] == ["noise (2)", "blur (1)", "weather (1)", "digital (2)"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), r.mean[:, :2].mean(1))
    assert len(ax.figure.axes) == 2  # the count on the twin axis


def test_probe_from_the_same_forward_passes_equals_the_separate_runs():
    """robustness(probe_severity=s) gives the robustness grid and noise_probe(corruption=...,
    severity=s) exactly, forwarding the clean images and their severity-s copies once."""
    model = fanlens.zoo.load("vit")
    kw = dict(n_images=10, corruptions="gaussian_noise,contrast,fog", severities=(1, 3), progress=False,
              batch_size=4)
    images = []
    h = model.model.register_forward_pre_hook(lambda m, args: images.append(args[0].shape[0]))
    try:
        alone = robustness(model, "synthetic", **kw)
        n_alone = sum(images)
        images.clear()
        rob, probe = robustness(model, "synthetic", probe_severity=3, **kw)
        n_joint = sum(images)
    finally:
        h.remove()
    np.testing.assert_array_equal(rob.per_image, alone.per_image)
    np.testing.assert_array_equal(rob.mean, alone.mean)
    x, _y, _m = fanlens.synthetic.TASKS[fanlens.zoo.DEFAULT_TASK](10, seed=0, split="test").batch(range(10))
    images.clear()
    h = model.model.register_forward_pre_hook(lambda m, args: images.append(args[0].shape[0]))
    try:
        ref = fanlens.noise_probe(model, x, corruption="gaussian_noise,contrast,fog", severity=3, progress=False,
                                  batch_size=4)
    finally:
        h.remove()
    n_probe = sum(images)
    assert probe.perturbations == ref.perturbations == ("gaussian_noise@3", "contrast@3", "fog@3")
    np.testing.assert_allclose(probe.mean, ref.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(probe.per_image, ref.per_image, rtol=1e-6, atol=1e-9)
    # separately: 10 x (1 + 6) classified + 10 x (1 + 3) probed; together: 10 x (1 + 6), nothing twice
    assert (n_alone, n_probe, n_joint) == (70, 40, 70)
    assert probe.provenance.params == ref.provenance.params  # the same record as the separate probe
    assert rob.provenance.params["probe_severity"] == 3


def test_probe_severity_must_be_in_the_grid():
    with pytest.raises(FanlensError, match=r"probe_severity must be one of the severities \[1, 5\]"):
        robustness(StdClassifier(), _flat_images(), corruptions="fog", severities=(1, 5), probe_severity=3,
                   progress=False)


def test_a_shared_corruption_cache_corrupts_each_batch_once_and_changes_nothing(monkeypatch):
    """fanlens reproduce hands every zoo network's robustness grid one CorruptionCache: the second
    model reuses the first one's corrupted batches (no corrupt() call), with the same per-image
    results as without the cache; other pixels under the same indices are corrupted anew."""
    from fanlens import corruptions as cc
    from fanlens.lens import Lens
    from fanlens.robustness import CorruptionCache, robustness_part

    x, _y, _m = fanlens.synthetic.TASKS[fanlens.zoo.DEFAULT_TASK](6, seed=0, split="test").batch(range(6))
    calls = []
    real = cc.corrupt
    monkeypatch.setattr(cc, "corrupt", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    cache = CorruptionCache()
    kw = dict(seed=0, batch_size=3, corruptions="gaussian_noise,contrast", severities=(1, 3))
    for name in ("vit", "fan"):
        lens = Lens(fanlens.zoo.load(name), x, batch_size=3, progress=False, cache_bytes=0, cache_spill=False)
        per = []
        for shared in (None, cache):
            _part, step, _key, finish = robustness_part(lens.setup, corrupted=shared, **kw)
            for start in (0, 3):
                step(x[start : start + 3], list(range(start, start + 3)))
            per.append(finish().per_image)
        np.testing.assert_array_equal(per[0], per[1])
    # without the cache 2 models x 2 batches x 4 cells (16 calls); with it the first model's 8 only
    assert len(calls) == 24 and (cache.misses, cache.hits) == (8, 8)
    assert cache.bytes == 8 * 3 * 3 * x.shape[-2] * x.shape[-1] * 4
    _part, step, _key, _finish = robustness_part(lens.setup, corrupted=cache, **kw)
    step(x[:3] * 0.5, [0, 1, 2])  # the same indices, other pixels: a new fingerprint, corrupted again
    assert (cache.misses, cache.hits) == (12, 8) and len(calls) == 28
    small = CorruptionCache(max_bytes=0)  # nothing fits: corrupted every time, nothing held
    _part, step, _key, _finish = robustness_part(lens.setup, corrupted=small, **kw)
    step(x[:3], [0, 1, 2])
    step(x[:3], [0, 1, 2])
    assert (small.misses, small.hits, small.bytes) == (8, 0, 0)


@pytest.mark.parametrize("threads", [2, 3])
def test_the_grid_cells_run_on_worker_threads_with_the_same_bits(threads, monkeypatch):
    """The grid's cells are corrupted and forwarded on the caller's cores, one intra-op thread each
    (fanlens._threads.map_items): the per-image errors are those of the cells one after the other on one
    thread, the forwards ran on the worker threads, and the caller's thread count is left as it was."""
    import threading

    from fanlens import runner
    from fanlens.lens import Lens
    from fanlens.robustness import CorruptionCache, robustness_part

    x, _y, _m = fanlens.synthetic.TASKS[fanlens.zoo.DEFAULT_TASK](4, seed=0, split="test").batch(range(4))
    kw = dict(seed=0, batch_size=4, corruptions="gaussian_noise,motion_blur,jpeg_compression", severities=(2, 5))
    seen: list[tuple[str, int]] = []
    real = runner.call_model

    def spy(model, inp):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(model, inp)

    import sys

    monkeypatch.setattr(sys.modules["fanlens.robustness"], "call_model", spy)
    before = torch.get_num_threads()
    out = {}
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            seen.clear()
            lens = Lens(fanlens.zoo.load("vit"), x, batch_size=4, progress=False, cache_bytes=0, cache_spill=False)
            for cache in (None, CorruptionCache()):
                _part, step, _key, finish = robustness_part(lens.setup, corrupted=cache, **kw)
                step(x, [0, 1, 2, 3])
                out[(n, cache is None)] = finish().per_image
            assert torch.get_num_threads() == n
            assert len(seen) == 2 * (1 + 6)  # per grid: the clean forward, then the 6 cells
            clean, cells = seen[0::7], [t for i, t in enumerate(seen) if i % 7]
            assert all(k == 1 for _name, k in cells)
            assert {name.startswith("fanlens") for name, _k in cells} == ({False} if n == 1 else {True})
            assert all(name == threading.main_thread().name and k == n for name, k in clean)
    finally:
        torch.set_num_threads(before)
    ref = out[(1, True)]
    assert ref.shape == (4, 7) and set(np.unique(ref)) <= {0, 1}
    for got in out.values():
        np.testing.assert_array_equal(got, ref)
