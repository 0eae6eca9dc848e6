"""The claims over a grid of specifications: headline verdicts with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from fanlens import claims, grid
from fanlens.grid import Cell, GridRow

SIGMAS = ("0.05", "0.1", "0.2", "0.5", "1")


def _row(verdict: str, value: float | None = 0.5, statistic: str = "c1_within_block", claim: str = "C1",
         models: str = "M") -> claims.ClaimRow:
    return claims.ClaimRow(claim, statistic, "images", models, value, None if value is None else value - 0.1,
                           None if value is None else value + 0.1, 0.0, "> 0", verdict, 64, 8)


def _cells(verdicts_by_sigma: dict[str, str], rules=("rel_threshold", "eigengap")) -> list[GridRow]:
    return [GridRow(Cell(s, space, "additive", rule), _row(v, 0.4 if v == "holds" else -0.4 if v == "contradicted"
                                                           else 0.0))
            for s, v in verdicts_by_sigma.items() for space in ("pixel", "normalized") for rule in rules]


def test_a_claim_that_holds_in_every_cell_holds():
    (h,) = grid.headline(_cells({s: "holds" for s in SIGMAS}))
    assert (h.verdict, h.cells, h.holds, h.contradicted) == ("holds", 20, 20, 0) and h.flips_with == ""


def test_ninety_percent_with_no_opposite_still_holds_but_one_opposite_cell_breaks_it():
    rows = _cells({s: "holds" for s in SIGMAS})
    rows[0] = GridRow(rows[0].cell, _row("inconclusive", 0.0))
    rows[1] = GridRow(rows[1].cell, _row("inconclusive", 0.0))  # 18 of 20 = 90 %
    assert grid.headline(rows)[0].verdict == "holds"
    rows[2] = GridRow(rows[2].cell, _row("inconclusive", 0.0))  # 17 of 20
    assert grid.headline(rows)[0].verdict == "depends on the specification"
    rows = _cells({s: "holds" for s in SIGMAS})
    rows[5] = GridRow(rows[5].cell, _row("contradicted", -0.4))  # 19 of 20 hold, one significantly the other way
    assert grid.headline(rows)[0].verdict == "depends on the specification"


def test_the_dimension_that_flips_a_verdict_is_named():
    rows = _cells({"0.05": "holds", "0.1": "holds", "0.2": "inconclusive", "0.5": "contradicted",
                   "1": "contradicted"})
    (h,) = grid.headline(rows)
    assert h.verdict == "depends on the specification"
    assert h.flips_with == "sigma: holds at 0.05, 0.1; contradicted at 0.5, 1; inconclusive at 0.2"
    assert (h.holds, h.contradicted, h.inconclusive) == (8, 8, 4) and h.median_value == pytest.approx(0.0)


def test_a_dimension_that_only_thins_a_verdict_is_named_with_its_shares():
    """Holds in most cells at every sigma, in all of them at 0.05 and in 60 % at 1: the most frequent
    verdict is the same everywhere, so the text gives the shares instead of 'holds at' every value; a tie
    between holds and inconclusive is labelled inconclusive."""
    rows = _cells({s: "holds" for s in SIGMAS}, rules=("rel_threshold", "eigengap", "effective_rank", "r4", "r5"))
    left = {"1": 4, "0.5": 2}  # sigma 1: 4 of its 10 cells inconclusive; sigma 0.5: 2 of 10
    for i, r in enumerate(rows):
        if left.get(r.cell.sigma, 0) > 0:
            rows[i] = GridRow(r.cell, _row("inconclusive", 0.0))
            left[r.cell.sigma] -= 1
    (h,) = grid.headline(rows)
    assert (h.verdict, h.holds, h.inconclusive) == ("depends on the specification", 44, 6)
    assert h.flips_with == "sigma: holds in most cells at every value, from 60% of the cells at 1 to 100% at 0.05"
    i = next(i for i, r in enumerate(rows) if r.cell.sigma == "1" and r.row.verdict == "holds")
    rows[i] = GridRow(rows[i].cell, _row("inconclusive", 0.0))  # sigma 1: 5 holds, 5 inconclusive
    assert grid.headline(rows)[0].flips_with == "sigma: holds at 0.05, 0.1, 0.2, 0.5; inconclusive at 1"


def test_no_significant_cell_is_inconclusive_and_no_defined_cell_is_not_available():
    assert grid.headline(_cells({s: "inconclusive" for s in SIGMAS}))[0].verdict == "inconclusive"
    rows = [GridRow(Cell(s, "pixel", "additive", "rel_threshold"), _row("inconclusive", None, "c3_within_block", "C3"))
            for s in SIGMAS]
    (h,) = grid.headline(rows)
    assert h.verdict == "not available" and h.cells == 0


def test_descriptive_statistics_get_no_headline():
    rows = _cells({s: "holds" for s in SIGMAS})
    rows += [GridRow(r.cell, _row("contradicted", -0.5, "c1_spearman")) for r in rows]
    heads = grid.headline(rows)
    assert [h.statistic for h in heads] == ["c1_within_block"] and heads[0].verdict == "holds"


def test_evaluate_writes_one_row_per_cell_and_claim_with_the_dimensions(tmp_path):
    from test_claims import _evidence, _profile

    L = 8
    ev = _evidence("M", _profile(np.linspace(8, 4, L)), _profile(np.linspace(1, 0.3, L)))
    cells = [(Cell("0.1", space, "additive", "rel_threshold"), [ev], dict(sigma=0.1))
             for space in ("pixel", "normalized")]
    res = grid.evaluate(cells, n_boot=50, seed=0, notes=lambda c, r: "at chance" if c.space == "normalized" else "")
    assert len(res.rows) == 2 * len(claims.check([ev], n_boot=50).rows)
    assert {r.cell.space for r in res.rows} == {"pixel", "normalized"}
    assert all(r.row.note.endswith("at chance") for r in res.rows if r.cell.space == "normalized")
    res.write_files(tmp_path)
    header = (tmp_path / "claims.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["sigma", "space", "measure", "rule"]
    assert "| C1 | c1_within_block | M |" in (tmp_path / "claims.md").read_text()


def test_damage_matched_sigma_interpolates_in_log_sigma_where_accuracy_halves():
    acc = {0.05: 0.9, 0.1: 0.8, 0.2: 0.4, 0.5: 0.1}
    # clean 0.9 -> target 0.45, crossed between 0.1 (0.8) and 0.2 (0.4): 0.1 * 2 ** ((0.8 - 0.45) / 0.4)
    assert grid.damage_matched_sigma(acc, 0.9) == pytest.approx(float(f"{0.1 * 2 ** 0.875:.3g}"))
    assert grid.damage_matched_sigma(acc, 0.9) == 0.183
    # crossed before the smallest level: linear from (0, clean)
    assert grid.damage_matched_sigma({0.05: 0.3, 0.1: 0.1}, 0.9) == pytest.approx(0.05 * 0.75)
    # exactly on a level; the first crossing counts, not a later recovery
    assert grid.damage_matched_sigma({0.1: 0.45, 1.0: 0.1}, 0.9) == 0.1
    assert grid.damage_matched_sigma({0.1: 0.2, 0.2: 0.9, 0.4: 0.1}, 1.0) == pytest.approx(0.1 * 5 / 8)
    # never halved, or nothing to halve
    assert grid.damage_matched_sigma({0.1: 0.9, 1.0: 0.5}, 0.9) is None
    assert grid.damage_matched_sigma({0.1: 0.0}, 0.0) is None
    with pytest.raises(claims.FanlensError, match="accuracy must map positive noise levels"):
        grid.damage_matched_sigma({0.0: 0.5}, 0.9)
    with pytest.raises(claims.FanlensError, match="fraction must be in"):
        grid.damage_matched_sigma({0.1: 0.5}, 0.9, fraction=1.5)


def test_each_model_at_its_own_noise_level():
    from test_claims import _evidence, _profile

    flat, decaying = np.full(8, 1.0), np.linspace(1.0, 0.25, 8)
    vit = _evidence("ViT", _profile(np.linspace(9, 3, 8)), _profile(decaying, noise=0.02), sigmas=(0.137,))
    cnn = _evidence("CNN", _profile(np.linspace(9, 3, 8)), _profile(flat, noise=0.02), layout="NCHW", sigmas=(0.42,))
    with pytest.raises(claims.FanlensError, match="sigma must be one of the probe's sigmas"):
        claims.check([vit, cnn], n_boot=50)  # the first model's level is not the second's
    res = claims.check([vit, cnn], sigma=claims.EACH_SIGMA, n_boot=200)
    diff = [r for r in res.rows if r.statistic.startswith("c2_ratio_difference")][0]
    assert diff.value == pytest.approx(0.25 - 1.0, abs=0.03) and res.parameters["sigma"] == "each"
    two = _evidence("two", _profile(np.linspace(9, 3, 8)), _profile(flat), sigmas=(0.1, 0.2))
    with pytest.raises(claims.FanlensError, match="one noise level each"):
        claims.check([two], sigma=claims.EACH_SIGMA, n_boot=10)
    with pytest.raises(claims.FanlensError, match="sigma must be a noise level, None or 'each'"):
        claims.check([vit], sigma="own", n_boot=10)
