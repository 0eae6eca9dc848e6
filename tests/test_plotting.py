"""Figures hold the data they claim: lines, images, labels and values, from hand-built results."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from fanlens import FanlensError, plotting  # noqa: E402
from fanlens.attribution import AttributionResult, FlipResult  # noqa: E402
from fanlens.capture import TokenLayout  # noqa: E402
from fanlens.grouping import GroupingScores  # noqa: E402
from fanlens.results import BlockInfo, GroupsResult, ProbeResult, Provenance, SpectrumResult  # noqa: E402

L = 4


def _prov(model="m", images=("a", "b")):
    return Provenance(model, "w", "s", 0, {}, list(images))


def _blocks(n=L, grid=(2, 2)):
    return tuple(BlockInfo(i, f"blocks.{i}", TokenLayout("NLC", 0, grid, 8), grid) for i in range(n))


def _spectrum(counts, model="m"):
    c = np.asarray(counts, float)[:, None]
    return SpectrumResult(blocks=_blocks(len(c)), rules=("rel_threshold",), n_images=2, count_mean=c,
                          count_std=np.ones_like(c), count_ci_low=c - 1, count_ci_high=c + 1,
                          eig_mean=np.ones((len(c), 3)), provenance=_prov(model))


def _probe(values, sigmas=(0.1,), model="m"):
    v = np.asarray(values, float).reshape(-1, len(sigmas))
    return ProbeResult(blocks=_blocks(len(v)), mode="additive", sigmas=tuple(sigmas), space="pixel", n_images=2,
                       mean=v, std=np.zeros_like(v), ci_low=v - 0.01, ci_high=v + 0.01, provenance=_prov(model))


def _groups(n_blocks=L):
    labels = tuple(np.array([[[0, 1], [1, 1]], [[0, 0], [1, 1]]]) for _ in range(n_blocks))
    px = np.zeros((2, 4, 4, 3), np.uint8)
    return GroupsResult(blocks=_blocks(n_blocks), images=("a", "b"), labels=labels,
                        n_clusters=np.full((n_blocks, 2), 2), pixels=px, provenance=_prov())


def _attr(maps):
    return AttributionResult(blocks=(), method="ig", images=("a", "b"), maps=np.asarray(maps, np.float32),
                             targets=np.array([3, 1]), predicted=np.array([3, 1]), convergence=np.zeros(2),
                             pixels=np.zeros((2, 4, 4, 3), np.uint8), provenance=_prov())


def _flip(values, max_sigma=1.0):
    v = np.asarray(values, float)
    return FlipResult(blocks=(), images=tuple(f"i{k}" for k in range(len(v))), space="pixel", max_sigma=max_sigma,
                      step=0.01, min_sigma=v, predicted=np.zeros(len(v), np.int64),
                      flipped_to=np.where(np.isnan(v), -1, 1), provenance=_prov(images=[f"i{k}" for k in range(len(v))]))


# --------------------------------------------------------------------------- single results
def test_plot_spectrum_draws_the_counts_with_labels():
    ax = plotting.plot_spectrum(_spectrum([5, 4, 3, 2]), label="vit")
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_ydata(), [5, 4, 3, 2])
    np.testing.assert_array_equal(line.get_xdata(), np.arange(L))
    assert "significant eigenvalues" in ax.get_ylabel() and ax.get_xlabel() == "block"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["vit"]
    assert len(ax.collections) == 1  # the 95 % band


def test_plot_rules_draws_counts_and_dimensions_together():
    c = np.array([[5, 12.5, 3.2], [4, 10.0, 2.9], [3, 8.0, 2.5], [2, 6.5, 2.0]])
    res = SpectrumResult(blocks=_blocks(4), rules=("rel_threshold", "twonn", "rankme"), n_images=2, count_mean=c,
                         count_std=np.ones_like(c), count_ci_low=c - 1, count_ci_high=c + 1,
                         eig_mean=np.ones((4, 3)), provenance=_prov())
    ax = plotting.plot_rules(res)
    lines = ax.get_lines()
    assert len(lines) == 3 and len(ax.collections) == 3
    np.testing.assert_array_equal(lines[1].get_ydata(), c[:, 1])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["rel_threshold", "intrinsic dimension (TwoNN)",
                                                                    "RankMe"]
    assert plotting.plot_spectrum(res, rule="twonn").get_ylabel() == "intrinsic dimension (TwoNN)"
    with pytest.raises(FanlensError, match="rules must be among"):
        plotting.plot_rules(res, rules=("eigengap",))


def test_plot_probe_one_line_per_sigma_and_log_scale():
    pr = _probe([[0.1, 0.2], [0.05, 0.1], [0.02, 0.05], [0.01, 0.02]], sigmas=(0.1, 0.2))
    ax = plotting.plot_probe(pr, log=True)
    lines = ax.get_lines()
    assert len(lines) == 2
    np.testing.assert_allclose(lines[1].get_ydata(), [0.2, 0.1, 0.05, 0.02])
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sigma=0.1", "sigma=0.2"]
    assert to_hex(lines[0].get_color()) == plotting.PALETTE[0].lower()


def test_plot_groups_one_panel_per_block_plus_the_image():
    fig = plotting.plot_groups(_groups(), image=1)
    axes = fig.get_axes()
    assert len(axes) == L + 1
    assert axes[0].get_title() == "image"
    assert axes[1].get_title() == "blocks.0 (k=2)"
    overlay = axes[1].get_images()[1].get_array()
    np.testing.assert_array_equal(overlay, [[0, 0], [1, 1]])  # image 1's labels
    with pytest.raises(FanlensError, match="image must be in"):
        plotting.plot_groups(_groups(), image=5)


def test_plot_figure3ab_twin_axes_and_dashed_baseline():
    ax, right = plotting.plot_figure3ab(_spectrum([5, 4, 3, 2]), _probe([0.3, 0.2, 0.1, 0.05]),
                                        baseline_spectrum=_spectrum([6, 6, 6, 6]),
                                        baseline_probe=_probe([0.3, 0.3, 0.3, 0.3]))
    assert len(ax.get_lines()) == 2 and len(right.get_lines()) == 2
    assert ax.get_lines()[1].get_linestyle() == "--"
    np.testing.assert_allclose(right.get_lines()[0].get_ydata(), [0.3, 0.2, 0.1, 0.05])
    assert "relative perturbation (sigma=0.1)" == right.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["eigenvalue count", "eigenvalue count (random init)", "perturbation", "perturbation (random init)"]


def test_depth_comparison_normalises_by_the_first_block_on_relative_depth():
    ax = plotting.plot_depth_comparison({"a": _probe([0.4, 0.2, 0.1, 0.1]), "b": _probe([0.2, 0.2])}, sigma=0.1,
                                        baselines={"a": _probe([0.5, 0.5, 0.5, 0.5])})
    lines = ax.get_lines()
    assert len(lines) == 3
    np.testing.assert_allclose(lines[0].get_ydata(), [1, 0.5, 0.25, 0.25])
    np.testing.assert_allclose(lines[0].get_xdata(), [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(lines[2].get_xdata(), [0, 1])  # 2 blocks still span [0, 1]
    assert lines[1].get_linestyle() == "--" and ax.get_xlabel() == "relative depth"


def test_mask_scores_plot_values():
    sc = GroupingScores("m", _blocks(), ari=np.tile([[0.1], [0.2], [0.3], [0.4]], (1, 2)),
                        iou=np.tile([[0.5], [0.6], [0.7], [0.8]], (1, 2)))
    ax = plotting.plot_mask_scores({"m": sc}, metric="mask_ari")
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [0.1, 0.2, 0.3, 0.4])
    assert ax.get_ylabel() == "ARI with object mask"


def test_groups_grid_matches_colours_across_blocks():
    g = _groups(2)
    swapped = GroupsResult(blocks=g.blocks, images=g.images, labels=(g.labels[0], 1 - g.labels[1]),
                           n_clusters=g.n_clusters, pixels=g.pixels, provenance=g.provenance)
    fig = plotting.plot_groups_grid([("m", swapped)], images=[0])
    axes = fig.get_axes()
    assert len(axes) == 3
    a = axes[1].get_images()[1].get_array()
    b = axes[2].get_images()[1].get_array()
    np.testing.assert_array_equal(a, b)  # the swapped labels of block 1 are matched back
    assert axes[0].get_ylabel() == "m"


# --------------------------------------------------------------------------- captum figures
def test_attribution_groups_titles_carry_the_share_and_the_bottom_panel_the_curve():
    maps = np.zeros((2, 4, 4))
    maps[0, :2, :2] = 1.5
    maps[0, 3, 3] = 2.0  # image 0: 0.75 of the mass in the top-left group
    maps[1] = 1.0  # image 1: uniform, group {0} holds half the image
    fig = plotting.plot_attribution_groups(_groups(), _attr(maps), image=0)
    axes = fig.get_axes()
    assert len(axes) == 2 + L + 1
    assert axes[2].get_title() == "blocks.0\nshare 0.75"
    assert axes[1].get_title() == "ig, class 3"
    bottom = axes[-1]
    share, area = bottom.get_lines()
    np.testing.assert_allclose(share.get_ydata(), [(0.75 + 0.5) / 2] * L)
    np.testing.assert_allclose(area.get_ydata(), [(0.25 + 0.5) / 2] * L)
    assert area.get_linestyle() == ":"
    assert [t.get_text() for t in bottom.get_xticklabels()] == [f"blocks.{i}" for i in range(L)]


def test_plot_attribution_scales_to_a_percentile():
    maps = np.zeros((2, 4, 4))
    maps[0] = np.arange(16).reshape(4, 4)
    ax = plotting.plot_attribution(_attr(maps), image=0, percentile=100)
    shown = ax.get_images()[1].get_array()
    np.testing.assert_allclose(shown, maps[0] / 15)


def test_probe_flip_figure_shows_the_curve_and_the_flip_sigmas():
    pr = _probe([[0.05, 0.1], [0.04, 0.08], [0.03, 0.06], [0.02, 0.04]], sigmas=(0.1, 0.2))
    fl = _flip([0.2, 0.3, np.nan, 0.25])
    fig = plotting.plot_probe_flip(pr, fl)
    left, right = fig.get_axes()
    assert len(left.get_lines()) == 2
    flipped, never = right.collections[:2]
    assert flipped.get_offsets().shape == (3, 2)
    np.testing.assert_allclose(sorted(flipped.get_offsets()[:, 1]), [0.2, 0.25, 0.3])
    np.testing.assert_allclose(never.get_offsets()[:, 1], [1.0])
    hlines = [ln.get_ydata()[0] for ln in right.get_lines()]
    assert hlines == pytest.approx([0.275, 0.1, 0.2])  # median (unflipped counts as inf), then the sigmas
    assert "(3/4)" in right.get_title()
    assert fl.median == pytest.approx(0.275)


def test_probe_flip_rejects_mismatched_space():
    pr = _probe([0.1] * L)
    fl = FlipResult(blocks=(), images=("a",), space="normalized", max_sigma=1.0, step=0.1, min_sigma=np.array([0.2]),
                    predicted=np.array([0]), flipped_to=np.array([1]), provenance=_prov(images=["a"]))
    with pytest.raises(FanlensError, match="same space"):
        plotting.plot_probe_flip(pr, fl)


def test_plot_comparison_one_line_per_model_dashed_random_init():
    res = {"ViT": (_spectrum([5, 4, 3, 2]), _probe([0.3, 0.2, 0.1, 0.05])),
           "ViT (random init)": (_spectrum([6, 6, 6, 6]), _probe([0.3] * 4)),
           "New": (_spectrum([3, 3]), _probe([0.1, 0.1]))}
    fig = plotting.plot_comparison(res)
    left, right = fig.get_axes()
    assert len(left.get_lines()) == 3 and len(right.get_lines()) == 3
    assert left.get_lines()[1].get_linestyle() == "--"
    assert left.get_lines()[0].get_color() == left.get_lines()[1].get_color()  # same model, same colour
    np.testing.assert_allclose(left.get_lines()[2].get_xdata(), [0, 1])
    np.testing.assert_allclose(right.get_lines()[0].get_ydata(), [0.3, 0.2, 0.1, 0.05])
    assert len(left.collections) == 3 and len(right.collections) == 3  # one 95 % band per model
    assert right.get_ylabel() == "relative perturbation (sigma=0.1)"
    with pytest.raises(FanlensError, match="results"):
        plotting.plot_comparison({"x": _spectrum([1])})


def test_plotting_never_shows_and_draws_into_a_given_axes(monkeypatch):
    monkeypatch.setattr(plt, "show", lambda *a, **k: pytest.fail("plotting called show()"))
    fig, ax = plt.subplots()
    n = len(plt.get_fignums())
    out = plotting.plot_spectrum(_spectrum([1, 2, 3, 4]), ax=ax)
    assert out is ax and len(plt.get_fignums()) == n
    plotting.plot_probe(_probe([0.1] * L), ax=ax)
    assert len(ax.get_lines()) == 2


def test_plot_attention_shows_the_query_row_on_the_grid():
    attn = np.zeros((2, 6, 6))
    attn[0, 4] = np.arange(6)  # query (1, 1) of a 2x3 grid is token 4
    attn[1, 4] = np.arange(6)[::-1]
    ax = plotting.plot_attention(attn, np.zeros((20, 30, 3), np.uint8), grid=(2, 3), query=(1, 1))
    np.testing.assert_allclose(ax.get_images()[1].get_array(), np.full((2, 3), 2.5))  # mean over heads
    ax = plotting.plot_attention(attn, np.zeros((20, 30, 3), np.uint8), grid=(2, 3), query=(1, 1), head=0)
    np.testing.assert_allclose(ax.get_images()[1].get_array(), [[0, 1, 2], [3, 4, 5]])
    (box,) = ax.patches
    assert box.get_xy() == (10.0, 10.0) and box.get_width() == 10.0
    with pytest.raises(FanlensError, match="query must be"):
        plotting.plot_attention(attn, np.zeros((20, 30, 3)), grid=(2, 3), query=(2, 0))
    with pytest.raises(FanlensError, match="attn must be"):
        plotting.plot_attention(attn, np.zeros((20, 30, 3)), grid=(3, 3), query=(0, 0))


def test_groups_grid_titles_every_panel_when_models_have_different_blocks():
    g4, g2 = _groups(4), _groups(2)
    fig = plotting.plot_groups_grid([("a", g4), ("b", g4)], images=[0])
    titles = [ax.get_title() for ax in fig.get_axes()]
    assert titles[1:5] == [f"blocks.{i}" for i in range(4)] and titles[6:10] == [""] * 4  # same blocks: top row only
    cnn = GroupsResult(blocks=tuple(BlockInfo(i, f"layer{i + 1}", TokenLayout("NCHW", 0, (2, 2), 8), (2, 2))
                                    for i in range(2)),
                       images=g2.images, labels=g2.labels, n_clusters=g2.n_clusters, pixels=g2.pixels,
                       provenance=g2.provenance)
    fig = plotting.plot_groups_grid([("vit", g4), ("cnn", cnn)], images=[0])
    axes = fig.get_axes()
    assert len(axes) == 2 * 5
    assert [ax.get_title() for ax in axes[6:8]] == ["layer1", "layer2"]
    assert axes[8].get_images() == []  # the CNN row has two blocks: the rest stays empty


# ---------------------------------------------------------------- legibility checker
def test_text_problems_finds_crowded_ticks_clipping_and_a_legend_over_data():
    import matplotlib.pyplot as plt

    from fanlens.plotting import text_problems

    fig, ax = plt.subplots(figsize=(3, 2), layout="constrained")
    ax.plot([0, 1, 2], [0, 1, 0], label="line")
    ax.set_xticks([0, 1, 2], ["a very long tick label"] * 3)
    problems = text_problems(fig)
    assert any("x-tick 'a very long tick label' overlaps axes 0 x-tick" in p for p in problems)

    fig, ax = plt.subplots(figsize=(4, 3), layout="constrained")
    ax.plot(np.linspace(0, 1, 50), np.linspace(0, 1, 50), "o", label="points")
    ax.legend(loc="center")
    assert text_problems(fig) == ["axes 0 legend covers 6 data point(s)"] or any(
        "legend covers" in p for p in text_problems(fig))
    assert not any("legend covers" in p for p in text_problems(fig, data=False))

    fig, ax = plt.subplots(figsize=(4, 3), layout="constrained")
    ax.plot([0, 1], [0, 1])
    fig.text(0.98, 0.5, "text running off the right edge")
    assert any("is clipped by the figure's edge" in p for p in text_problems(fig))


def test_text_problems_passes_a_plain_figure():
    import matplotlib.pyplot as plt

    from fanlens.plotting import text_problems

    fig, ax = plt.subplots(figsize=(5, 3), layout="constrained")
    ax.plot([0, 1, 2], [0, 1, 0], label="one")
    ax.plot([0, 1, 2], [1, 0, 1], label="two")
    ax.set(title="title", xlabel="x", ylabel="y", ylim=(-0.2, 1.6))
    ax.legend(loc="upper center", ncols=2)
    assert text_problems(fig) == []


def test_text_problems_reports_a_constrained_layout_that_gave_up():
    import matplotlib.pyplot as plt

    from fanlens.plotting import text_problems

    fig, ax = plt.subplots(figsize=(2.5, 2), layout="constrained")
    ax.plot([0, 1], [0, 1], label="x" * 120)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    assert any(p.startswith("layout: constrained_layout not applied") for p in text_problems(fig))


def test_long_model_specs_wrap_in_legends_beside_the_axes():
    import matplotlib.pyplot as plt

    from fanlens.plotting import _legend_beside, text_problems

    fig, ax = plt.subplots(figsize=(4.2, 3.6), layout="constrained")
    spec = "/a/rather/deep/folder/of/a/user/tests/tiny_models.py:tiny_vit"
    ax.plot([0, 1], [0, 1], label=spec)
    ax.plot([0, 1], [1, 0], label=spec + " (random init)")
    labels = [t.get_text() for t in _legend_beside(ax).get_texts()]
    assert labels[0] == "/a/rather/deep/folder/of/a/\nuser/tests/tiny_models.py:\ntiny_vit"
    assert all(max(map(len, t.split("\n"))) <= 28 and t.count("\n") < 3 for t in labels)
    assert text_problems(fig) == []
