"""The notebooks: committed without outputs, executed end to end, each saving its main figure."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from fanlens import zoo

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
MAIN_FIGURES = {
    "01_reproduce_figure3.ipynb": ["notebook01_figure3.png", "notebook01_claims.png"],
    "02_grouped_tokens.ipynb": ["notebook02_figure4.png", "notebook02_attribution.png"],
    "03_explore_a_new_architecture.ipynb": ["notebook03_comparison.png"],
    "04_a_new_architecture_through_a_lens.ipynb": ["notebook04_lens.png"],
}


def test_the_notebooks_are_there():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(MAIN_FIGURES)


@pytest.mark.parametrize("name", sorted(MAIN_FIGURES))
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def _stderr(nb) -> list[str]:
    return [o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "stream" and o.name == "stderr"]


def _stdout(nb) -> str:
    return "".join(o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


@pytest.mark.parametrize("name", sorted(MAIN_FIGURES))
def test_notebook_runs_offline_and_saves_its_main_figure(name, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("FANLENS_FIGURES", str(tmp_path))
    monkeypatch.setenv("FANLENS_NOTEBOOK_BUDGET_S", "15")  # notebook 03 trains 120 s for a reader, 15 s here
    monkeypatch.setenv("FANLENS_NOTEBOOK_IMAGES", "32")  # 01-03 analyse 64 images for a reader, 32 here
    monkeypatch.setenv("FANLENS_NOTEBOOK_IG_STEPS", "50")  # 02's integrated gradients: 200 steps for a reader
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()  # a failing cell raises
    assert _stderr(nb) == []  # no warnings, no progress noise
    for fig in MAIN_FIGURES[name]:
        with Image.open(tmp_path / fig) as im:
            assert im.format == "PNG" and im.width >= 600 and im.height >= 300
            px = np.asarray(im.convert("L"), dtype=float)
        assert px.std() > 10  # drawn, not blank
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= len(MAIN_FIGURES[name])  # figures are shown inline too
    out = _stdout(nb)
    assert re.search(r"notebook ran in \d+\.\d s", out)
    if name.startswith("01"):
        # the table of counts: six models, six or eight blocks each
        rows = [l for l in out.splitlines() if re.match(r"^(ViT|FAN|CNN)( \(random init\))?\s+\d", l)]
        assert len(rows) == 6
        assert re.search(r"FAN: median smallest flipping sigma \d\.\d{3} \(\d+/32", out)
        # the claim table is shown, and its verdicts add up to its rows
        md = "".join(o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if "text/markdown" in o.get("data", {}))
        assert "| C1 | c1_spearman | ViT |" in md and "| C2 | c2_ratio_difference (transformer - CNN) | FAN - CNN |" in md
        counts = re.search(r"\{'holds': (\d+), 'contradicted': (\d+), 'inconclusive': (\d+)\}", out)
        assert sum(map(int, counts.groups())) == md.count("\n| C")
    if name.startswith("02"):
        share = re.search(r"share of IG mass in the best group: ([\d. ]+)", out).group(1).split()
        assert len(share) == zoo.DEPTH and all(0 < float(v) <= 1 for v in share)  # one value per FAN block
    if name.startswith("03"):
        assert re.search(r"ViT \+ channel attention\s+counts", out)
        steps = int(re.search(r"trained (\d+) steps in \d+ s: validation accuracy", out).group(1))
        assert steps >= 10  # trained, not a random initialisation
    if name.startswith("04"):
        # three analyses through one Lens: each of the 32 images forwarded clean once
        assert "clean images forwarded: 32 for 32 images and three analyses" in out
        assert "tokens of block 'blocks.5': (32, 64, 96)" in out
        assert re.search(r"\d+ images, (\d+) forwarded clean", out)
        n, fwd = map(int, re.search(r"(\d+) images, (\d+) forwarded clean", out).groups())
        assert n == fwd
        html = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if "text/html" in o.get("data", {})]
        assert sum("SpectrumResult" in h and "<table>" in h for h in html) == 1  # the result shown itself
