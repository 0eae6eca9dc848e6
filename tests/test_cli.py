"""The command line: outputs, one-line errors with exit code 2, files kept intact."""

from __future__ import annotations

import csv
import json
from pathlib import Path
import subprocess
import sys

import pytest

from fanlens import cli

from conftest import TINY, write_images



def run(args, capsys):
    code = cli.main(list(args) + ["--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_spectrum_writes_results_and_figure(tmp_path, image_dir, capsys):
    code, out, err = run(["spectrum", "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "o"),
                          "--rules", "rel_threshold,eigengap", "--threshold", "rel_threshold=0.1"], capsys)
    assert code == 0, err
    for f in ("results.csv", "manifest.json", "arrays.npz", "spectrum.png"):
        assert (tmp_path / "o" / f).is_file()
        assert f"wrote {tmp_path / 'o' / f}" in out
    rows = list(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert {r["rule"] for r in rows} == {"rel_threshold", "eigengap"}
    assert {r["block"] for r in rows} == {"blocks.0", "blocks.1", "blocks.2"}
    assert all(r["n"] == "3" for r in rows)
    import json

    params = json.loads((tmp_path / "o" / "manifest.json").read_text())["provenance"]["params"]
    assert params["thresholds"]["rel_threshold"] == 0.1


def test_spectrum_with_dimension_measures(tmp_path, image_dir, capsys):
    code, out, err = run(["spectrum", "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "o"),
                          "--rules", "twonn,rel_threshold,rankme"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert {(r["metric"], r["rule"]) for r in rows} == {("dimension", "twonn"), ("significant_eigenvalues",
                                                                                 "rel_threshold"),
                                                       ("dimension", "rankme")}
    rankme = [float(r["value"]) for r in rows if r["rule"] == "rankme" and r["statistic"] == "mean"]
    assert len(rankme) == 3 and all(1.0 <= v <= 16 for v in rankme)  # between 1 and min(N, C)
    code, _, err = run(["spectrum", "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "x"),
                        "--rules", "twonn,dimension"], capsys)
    assert code != 0 and "rules must be one of" in err and "rankme" in err


def test_groups_with_attention(tmp_path, image_dir, capsys):
    code, out, err = run(["groups", "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "g"),
                          "--n-clusters", "2", "--attention"], capsys)
    assert code == 0, err
    assert (tmp_path / "g" / "attention.png").is_file() and f"wrote {tmp_path / 'g' / 'attention.png'}" in out
    rows = list(csv.DictReader(open(tmp_path / "g" / "attention_cls.csv")))
    assert len(rows) == 3 * 3 * 16  # images x blocks x patches (4 x 4)
    per = {}
    for r in rows:
        per.setdefault((r["image"], r["block"]), []).append(float(r["value"]))
    # the CLS row over the patches: a share of one softmax row (the rest goes to the CLS token)
    assert all(0.0 < sum(v) <= 1.0 + 1e-5 for v in per.values())


def test_probe_and_groups(tmp_path, image_dir, capsys):
    code, _, err = run(["probe", "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "p"),
                        "--sigmas", "0,0.1,0.5"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "p" / "results.csv")))
    zero = [float(r["value"]) for r in rows if r["sigma"] == "0" and r["statistic"] == "mean"]
    assert zero == [0.0, 0.0, 0.0]
    code, _, err = run(["groups", "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "g"),
                        "--n-clusters", "auto"], capsys)
    assert code == 0, err
    assert (tmp_path / "g" / "groups.png").stat().st_size > 1000


def test_individual_files_as_images(tmp_path, capsys):
    paths = write_images(tmp_path / "a", 2)
    code, _, err = run(["probe", "--model", TINY, "--images", *map(str, paths), "--out", str(tmp_path / "o"),
                        "--no-figure"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert rows[0]["n"] == "2"


def _bad_cases(tmp_path):
    gray = tmp_path / "gray"
    write_images(gray, 1, mode="L")
    rgba = tmp_path / "rgba"
    write_images(rgba, 1, mode="RGBA")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    empty = tmp_path / "empty"
    empty.mkdir()
    good = tmp_path / "good"
    write_images(good, 2)
    return {
        "unknown model": (["probe", "--model", "vit_tiny_patch16_2244", "--images", str(good)], "Close names"),
        "no images": (["probe", "--model", TINY, "--images", str(empty)], "holds none"),
        "missing path": (["probe", "--model", TINY, "--images", str(tmp_path / "nope")], "does not exist"),
        "corrupt": (["probe", "--model", TINY, "--images", str(corrupt)], "cannot be read"),
        "grayscale": (["probe", "--model", TINY, "--images", str(gray)], "mode 'L'"),
        "rgba": (["probe", "--model", TINY, "--images", str(rgba)], "mode 'RGBA'"),
        "negative sigma": (["probe", "--model", TINY, "--images", str(good), "--sigmas", "0.1,-0.5"], ">= 0"),
        "k too large": (["groups", "--model", TINY, "--images", str(good), "--n-clusters", "17"], "16 tokens"),
        "pattern": (["spectrum", "--model", TINY, "--images", str(good), "--blocks", "layers.*"], "matches nothing"),
        "bad factory": (["spectrum", "--model", TINY.replace(":tiny_vit", ":nope"), "--images", str(good)], "factory"),
        "bad checkpoint": (["spectrum", "--model", TINY, "--checkpoint", str(tmp_path / "x.pth"),
                            "--images", str(good)], "checkpoint"),
    }


@pytest.mark.parametrize("case", [
    "unknown model", "no images", "missing path", "corrupt", "grayscale", "rgba", "negative sigma", "k too large",
    "pattern", "bad factory", "bad checkpoint",
])
def test_bad_input_is_one_line_exit_2_and_keeps_files(tmp_path, capsys, case):
    out_dir = tmp_path / "out"
    good = tmp_path / "seed_imgs"
    write_images(good, 2)
    code, _, err = run(["probe", "--model", TINY, "--images", str(good), "--out", str(out_dir), "--no-figure"], capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    args, match = _bad_cases(tmp_path)[case]
    code, out, err = run(args + ["--out", str(out_dir), "--overwrite"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fanlens: error: ")
    assert match in lines[0]
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


def test_console_script_exit_code_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fanlens.cli", "probe", "--model", TINY, "--images", str(tmp_path / "missing"),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fanlens: error: images must be")
    assert "Traceback" not in proc.stderr


def test_groups_with_attribution_writes_the_share_per_block(tmp_path, image_dir, capsys):
    import numpy as np

    import fanlens
    from fanlens.attribution import attribution_share

    out = tmp_path / "g"
    code, stdout, err = run(["groups", "--model", TINY, "--images", str(image_dir), "--out", str(out),
                             "--n-clusters", "2", "--attribution", "gradcam", "--attribution-block", "blocks.1"], capsys)
    assert code == 0, err
    for f in ("groups_attribution.png", "attribution_share.csv", "attribution/manifest.json", "groups.png"):
        assert (out / f).is_file()
    groups, attr = fanlens.load(out), fanlens.load(out / "attribution")
    assert attr.method == "gradcam" and attr.blocks[0].name == "blocks.1"
    expected = attribution_share(groups, attr).summary("attribution_share")["mean"]
    rows = [r for r in csv.DictReader(open(out / "attribution_share.csv"))
            if r["metric"] == "attribution_share_gradcam" and r["statistic"] == "mean"]
    assert [r["block"] for r in rows] == ["blocks.0", "blocks.1", "blocks.2"]
    np.testing.assert_allclose([float(r["value"]) for r in rows], expected, rtol=1e-6)
    assert f"share {expected[0]:.3f}" in stdout


def test_probe_flip_matches_the_api(tmp_path, image_dir, capsys):
    import numpy as np

    import fanlens
    from fanlens.attribution import min_flip_sigma
    from fanlens.models import build_model

    out = tmp_path / "p"
    code, stdout, err = run(["probe", "--model", TINY, "--images", str(image_dir), "--out", str(out), "--sigmas",
                             "0.1,0.2", "--flip", "--flip-max-sigma", "2", "--flip-step", "0.05", "--seed", "2"], capsys)
    assert code == 0, err
    assert (out / "probe_flip.png").is_file()
    flip = fanlens.load(out / "flip")
    api = min_flip_sigma(build_model(TINY, seed=2), str(image_dir), max_sigma=2, step=0.05, seed=2, progress=False)
    np.testing.assert_array_equal(flip.min_sigma, api.min_sigma)
    assert flip.step == 0.05 and flip.provenance.seed == 2
    assert f"median {api.median:.4g}" in stdout


@pytest.mark.parametrize("args, match", [
    (["probe", "--mode", "pure", "--flip"], "--flip goes with --mode additive"),
    (["groups", "--attribution-block", "blocks.0"], "--attribution-block goes with --attribution gradcam"),
    (["groups", "--attribution", "gradcam", "--attribution-block", "blocks.*"], "exactly one block"),
])
def test_captum_option_errors(tmp_path, image_dir, capsys, args, match):
    code, _, err = run([args[0], "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "x"),
                        *args[1:]], capsys)
    assert code == 2
    assert match in err and err.startswith("fanlens: error:")
    assert not (tmp_path / "x").exists()  # nothing written on failure


def test_groups_with_spectral_colours(tmp_path, image_dir, capsys):
    import numpy as np

    code, out, err = run(["groups", "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "g"),
                          "--n-clusters", "2", "--colour", "spectral"], capsys)
    assert code == 0, err
    assert (tmp_path / "g" / "colours.png").is_file() and f"wrote {tmp_path / 'g' / 'colours.npz'}" in out
    with np.load(tmp_path / "g" / "colours.npz") as z:
        assert sorted(z.files) == ["colours_0", "colours_1", "colours_2"]
        assert z["colours_0"].shape == (3, 4, 4, 3) and 0 <= z["colours_0"].min() and z["colours_0"].max() <= 1
    with pytest.raises(SystemExit) as exc:
        run(["groups", "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "h"),
             "--colour", "rainbow"], capsys)
    assert exc.value.code == 2 and "--colour" in capsys.readouterr().err


def test_n_images_takes_the_first_images_of_a_folder(tmp_path, image_dir):
    out = tmp_path / "s"
    assert cli.main(["spectrum", "--model", TINY, "--images", str(image_dir), "--n-images", "2", "--out", str(out),
                     "--no-progress", "--no-figure"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["n_images"] == 2
    assert [Path(p).name for p in man["provenance"]["images"]] == ["img_000.png", "img_001.png"]
