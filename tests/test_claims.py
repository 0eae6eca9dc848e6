"""fanlens.claims: statistics, bootstrap intervals and verdicts on hand-built results with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from fanlens import FanlensError, claims
from fanlens.capture import TokenLayout
from fanlens.grouping import GroupingScores
from fanlens.results import BlockInfo, ProbeResult, Provenance, SpectrumResult


def _blocks(L: int, layout: str = "NLC") -> tuple[BlockInfo, ...]:
    return tuple(BlockInfo(i, f"blocks.{i}", TokenLayout(layout, 0, (4, 4), 8)) for i in range(L))


def _prov(model: str, n: int, prefix: str = "img") -> Provenance:
    return Provenance(model, "test", "0" * 64, 0, {}, [f"{prefix}{i}" for i in range(n)])


def _evidence(label, count, pert, *, layout="NLC", prefix="img", sigmas=(0.1,), **kw) -> claims.Evidence:
    """Evidence from per-image arrays ``count`` and ``pert`` of shape (n_images, L)."""
    count, pert = np.asarray(count, float), np.asarray(pert, float)
    n, L = count.shape
    blocks = _blocks(L, layout)
    prov = _prov(label, n, prefix)
    spec = SpectrumResult(blocks, ("rel_threshold",), n, count.mean(0)[:, None], count.std(0)[:, None],
                          count.mean(0)[:, None], count.mean(0)[:, None], np.zeros((L, 4)), prov,
                          per_image=count[:, :, None])
    probe = ProbeResult(blocks, "additive", sigmas, "pixel", n, pert.mean(0)[:, None], pert.std(0)[:, None],
                        pert.mean(0)[:, None], pert.mean(0)[:, None], prov, per_image=pert[:, :, None])
    return claims.Evidence(label, spec, probe, **kw)


def _row(res, statistic, models=None):
    rows = [r for r in res.rows if r.statistic.startswith(statistic) and (models is None or r.models == models)]
    assert len(rows) == 1, [r.statistic for r in res.rows]
    return rows[0]


RNG = np.random.default_rng(0)
N, L = 48, 8


def _profile(values, noise=0.2, n=N, rng=RNG):
    return np.asarray(values, float)[None, :] + noise * rng.standard_normal((n, len(values)))


def test_spearman_matches_scipy_and_handles_constants():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((20, 9)), rng.standard_normal((20, 9))
    x[:, 3] = x[:, 4]  # ties
    got = claims.spearman(x, y)
    want = [spearmanr(a, b).statistic for a, b in zip(x, y)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.isnan(claims.spearman(np.ones(5), np.arange(5.0)))


def test_monotone_profiles_give_rho_one_and_hold():
    falling = np.linspace(12, 2, L)
    ev = _evidence("FAN", _profile(falling), _profile(falling / 10, noise=0.01))
    res = claims.check([ev], n_boot=300, seed=0)
    rho = _row(res, "c1_spearman")
    assert rho.value == pytest.approx(1.0) and rho.ci_low == pytest.approx(1.0) and rho.verdict == "holds"
    drop = _row(res, "c1_count_drop")
    mid = (np.linspace(0, 1, L) >= 0.3) & (np.linspace(0, 1, L) <= 0.7)
    assert drop.value == pytest.approx(float(np.mean(ev.spectrum.per_image[:, mid, 0].mean(1) - ev.spectrum.per_image[:, 0, 0])))
    assert drop.ci_high < 0 and drop.verdict == "holds"
    assert _row(res, "c1_perturbation_drop").verdict == "holds"
    # without masks C3 has no grouping score of its own (the count would repeat C1)
    assert _row(res, "c3_within_block").value is None
    assert _row(res, "c2_decay_ratio").value == pytest.approx(
        ev.probe.per_image[:, -1, 0].mean() / ev.probe.per_image[:, 0, 0].mean())


def test_opposite_profiles_are_contradicted():
    ev = _evidence("X", _profile(np.linspace(2, 12, L)), _profile(np.linspace(1.2, 0.2, L), noise=0.01))
    res = claims.check([ev], n_boot=300)
    rho = _row(res, "c1_spearman")
    assert rho.value == pytest.approx(-1.0) and rho.verdict == "contradicted"
    assert _row(res, "c1_count_drop").verdict == "contradicted"


def test_unrelated_profiles_are_inconclusive_with_an_interval_around_zero():
    rng = np.random.default_rng(3)
    # no structure over blocks: every block's values drawn from the same distribution
    ev = _evidence("R", 5 + rng.standard_normal((N, 12)), 0.5 + 0.1 * rng.standard_normal((N, 12)))
    res = claims.check([ev], n_boot=1000, seed=1)
    rho = _row(res, "c1_spearman")
    assert rho.ci_low < 0 < rho.ci_high and rho.verdict == "inconclusive"
    assert rho.ci_high - rho.ci_low > 0.5


def test_bootstrap_interval_of_a_mean_matches_the_normal_interval():
    rng = np.random.default_rng(4)
    n = 400
    count = np.zeros((n, 5))
    count[:, 2] = rng.normal(-1.0, 2.0, n)  # the mid block (depth 0.5) minus block 0: mean -1, sd 2
    ev = _evidence("M", count, _profile(np.linspace(1, 0.5, 5), n=n, rng=rng))
    drop = _row(claims.check([ev], n_boot=2000, seed=0), "c1_count_drop")
    half = 1.96 * count[:, 2].std(ddof=1) / np.sqrt(n)
    assert drop.value == pytest.approx(count[:, 2].mean())
    assert (drop.ci_high - drop.ci_low) / 2 == pytest.approx(half, rel=0.12)


def test_c2_transformer_against_cnn():
    flat, decaying = np.full(L, 1.0), np.linspace(1.0, 0.25, L)
    vit = _evidence("ViT", _profile(np.linspace(9, 3, L)), _profile(decaying, noise=0.02))
    cnn = _evidence("CNN", _profile(np.linspace(9, 3, L)), _profile(flat, noise=0.02), layout="NCHW")
    assert cnn.kind == "cnn" and vit.kind == "transformer"
    res = claims.check([vit, cnn], n_boot=300)
    diff = _row(res, "c2_ratio_difference")
    assert diff.models == "ViT - CNN"
    assert diff.value == pytest.approx(0.25 - 1.0, abs=0.03) and diff.verdict == "holds" and diff.note == ""
    assert _row(res, "c2_decay_ratio", "CNN").verdict == "inconclusive"
    assert _row(res, "c2_decay_ratio", "ViT").verdict == "holds"


def test_models_on_the_same_images_are_resampled_together():
    a = _evidence("A", _profile(np.linspace(9, 3, L)), _profile(np.linspace(1, 0.5, L)))
    b = _evidence("B", _profile(np.linspace(9, 3, L)), _profile(np.linspace(1, 0.5, L)))
    c = _evidence("C", _profile(np.linspace(9, 3, L)), _profile(np.linspace(1, 0.5, L)), prefix="other")
    rs = claims._Resampler([a, b, c], 50, 0)
    assert rs.weights[rs.key["A"]] is rs.weights[rs.key["B"]]
    assert rs.key["C"] != rs.key["A"]
    w = rs.weights[rs.key["A"]]
    assert w.shape == (51, N) and np.all(w[0] == 1) and np.all(w.sum(1) == N)


def test_c3_across_models_and_training_and_c4_heads():
    rng = np.random.default_rng(5)
    evs = []
    # better grouping (ARI) goes with a smaller last-block perturbation, over 4 models
    for k, (ari, last) in enumerate([(0.2, 0.9), (0.4, 0.7), (0.6, 0.5), (0.8, 0.3)]):
        pert = _profile(np.linspace(1.0, last, L), noise=0.01, rng=rng)
        ev = _evidence(f"M{k}", _profile(np.linspace(8, 4, L), rng=rng), pert, heads=[1, 2, 4, 8][k])
        scores = GroupingScores(ev.label, ev.spectrum.blocks, np.clip(ari + 0.02 * rng.standard_normal((L, N)), 0, 1),
                                np.zeros((L, N)))
        evs.append(claims.Evidence(ev.label, ev.spectrum, ev.probe, scores=scores, heads=ev.heads))
    # snapshots of one training run: grouping falls as robustness rises -> contradicted
    for step, (count_mean, last) in enumerate([(4, 0.9), (6, 0.7), (8, 0.5)]):
        evs.append(_evidence(f"S{step}", _profile(np.full(L, count_mean), rng=rng),
                             _profile(np.linspace(1.0, last, L), noise=0.01, rng=rng), series="vit", step=step * 100))
    res = claims.check(evs, n_boot=300)
    models = _row(res, "c3_models")
    assert "mean mask ARI" in models.statistic and models.n_units == 4
    assert models.value == pytest.approx(1.0) and models.verdict == "holds"
    train = _row(res, "c3_training[vit]")  # snapshots without masks: the count is no grouping score for C3
    assert train.value is None and train.note.startswith("not available: no object masks")
    heads = _row(res, "c4_heads")
    assert heads.value == pytest.approx(1.0) and heads.verdict == "holds" and heads.n_units == 4
    # snapshots enter only the training series
    assert not any(r.models.startswith("S") for r in res.rows if r.claim == "C1")


def test_undefined_statistics_are_inconclusive_never_nan(tmp_path):
    ev = _evidence("K", np.full((N, L), 3.0), _profile(np.linspace(1, 0.5, L)))
    res = claims.check([ev], n_boot=100)
    rho = _row(res, "c1_spearman")
    assert rho.value is None and rho.verdict == "inconclusive" and rho.note.startswith("undefined")
    text = res.to_csv()
    assert "nan" not in text.lower()
    files = res.save(tmp_path / "c")
    assert sorted(p.name for p in files) == ["claims.csv", "claims.json", "claims.md"]
    md = (tmp_path / "c" / "claims.md").read_text()
    assert "| C1 | c1_spearman | K | undefined |" in md


def test_bad_input_is_named():
    ev = _evidence("A", _profile(np.linspace(9, 3, L)), _profile(np.linspace(1, 0.5, L)))
    with pytest.raises(FanlensError, match="evidence must be a non-empty list"):
        claims.check([])
    with pytest.raises(FanlensError, match="labels must be distinct"):
        claims.check([ev, ev])
    with pytest.raises(FanlensError, match="sigma must be one of"):
        claims.check([ev], sigma=0.3)
    with pytest.raises(FanlensError, match="n_boot must be"):
        claims.check([ev], n_boot=0)
    old = claims.Evidence("old", ev.spectrum.__class__(**{**ev.spectrum.__dict__, "per_image": None}), ev.probe)
    with pytest.raises(FanlensError, match="no per-image values"):
        claims.check([old])


def test_the_same_seed_gives_the_same_table():
    ev = _evidence("A", _profile(np.linspace(9, 3, L)), _profile(np.linspace(1, 0.5, L)))
    assert claims.check([ev], n_boot=200, seed=7).to_csv() == claims.check([ev], n_boot=200, seed=7).to_csv()
    assert claims.check([ev], n_boot=200, seed=7).to_csv() != claims.check([ev], n_boot=200, seed=8).to_csv()


def test_c1_within_block_coupling_is_not_the_depth_trend():
    """Count and perturbation coupled image by image inside every block (+1), while their block means
    trend in opposite directions over depth (-1): the two C1 statistics tell them apart."""
    u = np.linspace(0.0, 1.0, N)[:, None]  # each image's own offset, shared by count and perturbation
    count = np.linspace(2, 9, L)[None, :] + u
    pert = np.linspace(1.0, 0.2, L)[None, :] + 0.05 * u
    res = claims.check([_evidence("M", count, pert)], n_boot=200)
    within, trend = _row(res, "c1_within_block"), _row(res, "c1_spearman")
    assert within.value == pytest.approx(1.0) and within.verdict == "holds" and within.scope == "images"
    assert trend.value == pytest.approx(-1.0) and "the C1 verdict rests on c1_within_block" in trend.note
    # shuffled within blocks: no coupling, an interval around 0
    rng = np.random.default_rng(1)
    shuffled = np.stack([rng.permutation(pert[:, j]) for j in range(L)], axis=1)
    within = _row(claims.check([_evidence("M", count, shuffled)], n_boot=300), "c1_within_block")
    assert abs(within.value) < 0.2 and within.ci_low < 0 < within.ci_high and within.verdict == "inconclusive"


def test_c3_without_masks_is_not_available_and_never_repeats_c1():
    ev = _evidence("M", _profile(np.linspace(8, 4, L)), _profile(np.linspace(1, 0.3, L)))
    res = claims.check([ev], n_boot=100)
    c3 = _row(res, "c3_within_block")
    assert c3.value is None and c3.verdict == "inconclusive" and c3.note == claims.C3_NOT_AVAILABLE
    assert "| C3 | c3_within_block | M | undefined |" in res.to_markdown()


def _null_rate(statistic: str, make, n_sims: int = 200, n_boot: int = 200) -> float:
    """The share of ``n_sims`` simulated nulls in which ``statistic`` says *holds*."""
    holds = 0
    for k in range(n_sims):
        res = claims.check(make(np.random.default_rng(1000 + k)), n_boot=n_boot, seed=k)
        holds += _row(res, statistic).verdict == "holds"
    return holds / n_sims


def test_null_control_false_holds_rate_of_the_image_level_statistics():
    """Count and perturbation drawn independently image by image (C1), and perturbation profiles
    with no decay from the first to the last block (C2): false *holds* in at most 5 % of 200 nulls."""
    n, L = 32, 6

    def c1_null(rng):
        count = np.linspace(8, 4, L)[None, :] + rng.standard_normal((n, L))
        pert = np.linspace(1.0, 0.4, L)[None, :] + 0.1 * rng.standard_normal((n, L))  # falls too, independently
        return [_evidence("M", count, pert)]

    def c2_null(rng):
        count = np.linspace(8, 4, L)[None, :] + rng.standard_normal((n, L))
        pert = 0.5 + 0.1 * rng.standard_normal((n, L))  # the same level in every block
        return [_evidence("M", count, pert)]

    c1 = _null_rate("c1_within_block", c1_null)
    c2 = _null_rate("c2_decay_ratio", c2_null)
    assert c1 <= 0.05 and c2 <= 0.05, (c1, c2)
    # the across-block trend is what depth alone produces: it "holds" in nearly every null
    assert _null_rate("c1_spearman", c1_null, n_sims=40) >= 0.9


def _arch_row(res, statistic, level="architecture"):
    rows = [r for r in res.rows if r.statistic.startswith(statistic) and r.level == level]
    assert len(rows) == 1, [(r.statistic, r.models, r.level) for r in res.rows if r.statistic.startswith(statistic)]
    return rows[0]


def _networks(arch, decay_ends, *, layout="NLC", n=N, seed=0):
    """One Evidence per network of ``arch``: perturbation profiles from 1 to each of ``decay_ends``."""
    rng = np.random.default_rng(seed)
    return [_evidence(f"{arch}@{j}", _profile(np.linspace(9, 3, L), n=n, rng=rng),
                      _profile(np.linspace(1.0, end, L), noise=0.02, n=n, rng=rng), layout=layout, architecture=arch)
            for j, end in enumerate(decay_ends)]


def test_networks_are_the_unit_an_architecture_row_pools_them_hierarchically():
    vits = _networks("ViT", (0.2, 0.3, 0.4))
    cnns = _networks("CNN", (0.9, 1.0, 1.1), layout="NCHW", seed=1)
    res = claims.check(vits + cnns, n_boot=400, seed=0)
    # per network: one row each; per architecture: the mean over its networks, n = networks x images
    nets = [r for r in res.rows if r.statistic.startswith("c2_decay_ratio") and r.level == "network"]
    assert [r.models for r in nets] == ["ViT@0", "ViT@1", "ViT@2", "CNN@0", "CNN@1", "CNN@2"]
    vit = [r for r in res.rows if r.statistic.startswith("c2_decay_ratio") and r.models == "ViT"][0]
    assert vit.n_networks == 3 and vit.n_images == N and vit.verdict == "holds"
    assert vit.value == pytest.approx(np.mean([r.value for r in nets[:3]]))
    # the interval carries the spread between networks (0.2-0.4), not only the images' (noise 0.02)
    assert vit.ci_high - vit.ci_low > 0.1 > max(r.ci_high - r.ci_low for r in nets[:3])
    diff = _arch_row(res, "c2_ratio_difference")
    assert diff.models == "ViT - CNN" and diff.n_networks == 6
    assert diff.value == pytest.approx(0.3 - 1.0, abs=0.02) and diff.verdict == "holds"
    assert "3 networks x 48 images" in res.to_markdown()
    assert res.parameters["models"][0]["architecture"] == "ViT"


def test_an_architecture_verdict_needs_every_network_on_its_side_and_three_networks():
    # two networks decay, the third grows: the pooled interval may exclude 1, the verdict may not
    mixed = _networks("ViT", (0.2, 0.25, 1.6))
    r = [r for r in claims.check(mixed, n_boot=300).rows if r.models == "ViT"
         and r.statistic.startswith("c2_decay_ratio")][0]
    assert r.verdict == "inconclusive" and ("networks disagree in sign" in r.note or r.ci_high > 1)
    assert [x.verdict for x in claims.check(mixed, n_boot=300).rows if x.models == "ViT@2"
            and x.statistic.startswith("c2_decay_ratio")] == ["contradicted"]
    # every network agrees but only two of them: inconclusive, with the reason
    two = _networks("ViT", (0.2, 0.25))
    r = [r for r in claims.check(two, n_boot=300).rows if r.models == "ViT"
         and r.statistic.startswith("c2_decay_ratio")][0]
    assert r.verdict == "inconclusive" and "needs at least 3" in r.note and "the interval alone says holds" in r.note
    # a network alone (no architecture) keeps its own verdict, as before
    alone = claims.check([_evidence("M", _profile(np.linspace(9, 3, L)), _profile(np.linspace(1, 0.2, L), 0.02))],
                         n_boot=200)
    assert _row(alone, "c2_decay_ratio").verdict == "holds" and _row(alone, "c2_decay_ratio").level == "model"


def test_sign_disagreement_is_named_even_when_the_interval_excludes_the_null():
    nets = _networks("ViT", (0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 1.05))
    r = [r for r in claims.check(nets, n_boot=300).rows if r.models == "ViT"
         and r.statistic.startswith("c2_decay_ratio")][0]
    assert r.ci_high < 1 and r.verdict == "inconclusive"
    assert "networks disagree in sign (ViT@9 1.05" in r.note


def test_below_the_documented_minima_a_verdict_is_inconclusive_with_the_reason():
    strong = dict(count=np.linspace(9, 3, 6), pert=np.linspace(1.0, 0.2, 6))
    rng = np.random.default_rng(3)
    few_images = _evidence("M", _profile(strong["count"], n=5, rng=rng), _profile(strong["pert"], 0.01, n=5, rng=rng))
    r = _row(claims.check([few_images], n_boot=300), "c2_decay_ratio")
    assert r.verdict == "inconclusive" and f"5 images (a verdict needs at least {claims.MIN_IMAGES})" in r.note
    assert "the interval alone says holds" in r.note and r.ci_high < 1
    two_blocks = _evidence("M", _profile(np.array([9.0, 3.0])), _profile(np.array([1.0, 0.2]), 0.01))
    r = _row(claims.check([two_blocks], n_boot=300), "c2_decay_ratio")
    assert r.verdict == "inconclusive" and "2 blocks (a verdict about a depth profile needs at least 3)" in r.note
    ok = _evidence("M", _profile(strong["count"]), _profile(strong["pert"], 0.01))
    r = _row(claims.check([ok], n_boot=1), "c2_decay_ratio")
    assert r.verdict == "inconclusive" and f"1 bootstrap resamples (a verdict needs at least {claims.MIN_RESAMPLES})" in r.note
    assert _row(claims.check([ok], n_boot=claims.MIN_RESAMPLES), "c2_decay_ratio").verdict == "holds"


def test_resampled_spearman_equals_spearman_on_the_drawn_samples():
    """The within-block statistic's rho per resample, from cumulative counts, is the Spearman rho of the
    drawn sample itself: ties in the data and from repeated draws get average ranks; a constant side is NaN."""
    rng = np.random.default_rng(3)
    w = claims.bootstrap_weights(12, 200, rng).astype(np.int64)
    idx = np.stack([np.repeat(np.arange(12), row) for row in w])  # the drawn images of each resample
    for x, y in ((rng.normal(size=12), rng.normal(size=12)),
                 (rng.integers(0, 3, 12).astype(float), rng.normal(size=12)),  # ties in the data
                 (np.arange(12.0), np.ones(12))):  # y constant: rho undefined
        got = claims.resampled_spearman(x, y, w)
        want = claims.spearman(x[idx], y[idx])
        assert np.array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=0, atol=1e-12)
    # by hand: values 1, 2, 3 drawn (2, 0, 1) times -> sample 1, 1, 3 with ranks 1.5, 1.5, 3
    ranks = claims._resampled_ranks(np.array([1.0, 2.0, 3.0]), np.array([[2.0, 0.0, 1.0]]))
    assert ranks[0, 0] == 1.5 and ranks[0, 2] == 3.0
    assert claims.resampled_spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0]), np.array([[2, 0, 1]]))[0] == -1.0
    assert np.isnan(claims.resampled_spearman(np.array([1.0, np.nan]), np.array([1.0, 2.0]), np.ones((3, 2)))).all()
