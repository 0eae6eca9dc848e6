"""Controls with known answers: a network built so that every claim holds, and nulls under which a
verdict of *holds* must be rare (at most 5 % of 200 simulated nulls per claim)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fanlens import claims, controls
from fanlens.grid import HEADLINE_STATISTICS

from test_claims import _evidence

N_IMAGES = 96


@pytest.fixture(scope="module")
def positive():
    x, masks = controls.control_images(N_IMAGES, seed=0)
    nets = {f"M{h}": controls.merging_network(heads=h) for h in (1, 2, 3)}
    nets["Static"] = controls.static_network()
    ev = controls.evidence(nets, x, masks, sigmas=(0.05,), heads={"M1": 1, "M2": 2, "M3": 3})
    return ev, claims.check(ev, n_boot=500, seed=0)


def test_a_merging_block_contracts_deviations_from_the_region_mean_by_the_known_factor():
    torch.manual_seed(0)
    block = controls.MergingBlock(0.25)
    region = torch.full((1, 64, 48), 0.4)
    noise = 0.005 * torch.randn(1, 64, 48)
    out = block(region + noise)
    dev_in = noise - noise.mean(1, keepdim=True)
    dev_out = out - out.mean(1, keepdim=True)
    # one region, tokens far closer than the temperature: attention is the region average
    assert float(dev_out.norm() / dev_in.norm()) == pytest.approx(0.75, abs=0.01)
    torch.testing.assert_close(out.mean(1), (region + noise).mean(1))  # the region mean stays
    net = controls.merging_network(heads=2)
    assert net.blocks[0].strength == pytest.approx(1 - 0.75**2)
    with pytest.raises(claims.FanlensError, match="strength must be in"):
        controls.MergingBlock(1.0)


def test_every_claim_holds_on_the_positive_control(positive):
    ev, res = positive
    merging = {"M1", "M2", "M3"}
    headline = [s for stats in HEADLINE_STATISTICS.values() for s in stats if s != "c3_training"]
    verdicts = {}
    for r in res.rows:
        fam = r.statistic.split(" ")[0]
        names = {m.split(" (")[0] for m in r.models.replace(" - ", ", ").split(", ")}
        if fam in headline and names & merging:
            verdicts[(fam, r.models)] = r.verdict
    assert {f for f, _m in verdicts} == set(headline) | {"c1_within_block"}
    assert set(verdicts.values()) == {"holds"}, {k: v for k, v in verdicts.items() if v != "holds"}
    for stat in ("c1_count_drop", "c1_perturbation_drop"):
        assert all(r.verdict == "holds" for r in res.rows if r.statistic == stat and r.models in merging)
    # the comparator keeps its perturbation: ratio exactly 1, so its own C2 cannot hold
    static = [r for r in res.rows if r.statistic.startswith("c2_decay_ratio") and r.models == "Static"][0]
    assert static.value == pytest.approx(1.0) and static.verdict == "inconclusive"
    # the decay follows the merge strength: the one-head network decays least
    ratios = {r.models: r.value for r in res.rows if r.statistic.startswith("c2_decay_ratio")}
    assert ratios["M1"] > ratios["M2"] and ratios["M1"] < 1


def _rates(make, statistics: dict[str, tuple[str, str | None]], n_sims: int = 200, n_boot: int = 200) -> dict[str, float]:
    """The rate of *holds* over ``n_sims`` nulls for each of ``statistics`` (name: (statistic prefix,
    models or None)), all read from the same checks: one ``claims.check`` per null."""
    holds = dict.fromkeys(statistics, 0)
    for k in range(n_sims):
        res = claims.check(make(np.random.default_rng(5000 + k)), n_boot=n_boot, seed=k)
        for name, (statistic, models) in statistics.items():
            rows = [r for r in res.rows if r.statistic.startswith(statistic) and (models is None or r.models == models)]
            assert len(rows) == 1, [(r.statistic, r.models) for r in rows]
            holds[name] += rows[0].verdict == "holds"
    return {name: h / n_sims for name, h in holds.items()}


def _rate(make, statistic: str, models: str | None = None, n_sims: int = 200, n_boot: int = 200) -> float:
    return _rates(make, {statistic: (statistic, models)}, n_sims=n_sims, n_boot=n_boot)[statistic]


def _arrays(e: claims.Evidence):
    count = e.spectrum.per_image[:, :, 0]
    pert = e.probe.per_image[:, :, 0]
    ari = np.asarray(e.scores.ari, dtype=float).T
    return count, pert, ari


def _with_scores(label, count, pert, ari, **kw):
    from fanlens.grouping import GroupingScores

    ev = _evidence(label, count, pert, **kw)
    scores = GroupingScores(label, ev.spectrum.blocks, ari.T, np.clip(ari.T, 0, 1))
    return claims.Evidence(ev.label, ev.spectrum, ev.probe, scores=scores, heads=ev.heads,
                           architecture=ev.architecture)


def test_null_controls_from_the_positive_control_rarely_hold(positive):
    """The positive control's own measurements with the link that each claim is about broken: the
    perturbation (or the mask ARI) shuffled across images inside each block, or each image's blocks
    in a random order (no decay). False *holds* at most 5 % of 200 nulls per claim."""
    ev, _res = positive
    m2 = next(e for e in ev if e.label == "M2")
    static = next(e for e in ev if e.label == "Static")
    count, pert, ari = _arrays(m2)
    n, L = count.shape

    def shuffled_within_blocks(a, rng):
        return np.stack([rng.permutation(a[:, j]) for j in range(L)], axis=1)

    def shuffled_blocks(a, rng):
        return np.stack([a[i, rng.permutation(L)] for i in range(n)])

    rates = {
        "c1_within_block": _rate(lambda rng: [_evidence("M", count, shuffled_within_blocks(pert, rng))],
                                 "c1_within_block"),
        "c3_within_block": _rate(lambda rng: [_with_scores("M", count, pert, shuffled_within_blocks(ari, rng))],
                                 "c3_within_block"),
        "c2_decay_ratio": _rate(lambda rng: [_evidence("M", count, shuffled_blocks(pert, rng))], "c2_decay_ratio"),
        "c2_ratio_difference": _rate(lambda rng: [
            _evidence("M", count, shuffled_blocks(pert, rng)),
            _evidence("S", count, shuffled_blocks(pert, rng), layout="NCHW")], "c2_ratio_difference"),
    }
    print("false holds over 200 nulls:", rates)
    assert all(v <= 0.05 for v in rates.values()), rates
    assert static.kind == "cnn"


def test_null_control_across_architectures_with_networks_as_the_unit():
    """Three networks per architecture whose robustness does not depend on the architecture (C4: heads
    1, 2, 4, 8; C3 across models; C2's difference): hierarchical intervals and the sign agreement of every
    replicate keep false *holds* at most 5 % of 200 nulls. One network per architecture would not."""
    n, L = 24, 4
    heads = (1, 2, 4, 8)

    def zoo(rng, per_arch=3):
        evs = []
        for a, h in enumerate(heads):
            for k in range(per_arch):
                level = 0.5 + 0.1 * rng.standard_normal()  # each network its own level: seed variance
                pert = level * np.linspace(1.0, 0.6, L)[None, :] + 0.02 * rng.standard_normal((n, L))
                count = np.linspace(8, 4, L)[None, :] + rng.standard_normal((n, L))
                ari = np.clip(0.5 + 0.1 * rng.standard_normal() + 0.05 * rng.standard_normal((n, L)), 0, 1)
                evs.append(_with_scores(f"h{h}@{k}", count, pert, ari, heads=h,
                                        architecture=f"h{h}" if per_arch > 1 else None,
                                        layout="NCHW" if a == 0 else "NLC"))
        return evs

    rates = _rates(zoo, {"c4": ("c4_heads (heads vs -last-block perturbation)", None),
                         "c3": ("c3_models (mean mask ARI vs -last-block perturbation)", None),
                         "c2": ("c2_ratio_difference", "h2 - h1")})  # the three claims of each null zoo
    c4, c3, c2 = rates["c4"], rates["c3"], rates["c2"]
    one = _rate(lambda rng: zoo(rng, per_arch=1), "c4_heads (heads vs -last-block perturbation)", n_sims=100)
    print("false holds over 200 nulls (networks as the unit):", {"c4_heads": c4, "c3_models": c3,
                                                                "c2_ratio_difference": c2}, "one network each:", one)
    assert c4 <= 0.05 and c3 <= 0.05 and c2 <= 0.05, (c4, c3, c2)
    assert one > 0.05  # the image bootstrap of single networks is blind to seed variance
