"""`fanlens reproduce`: the real-model path on random-init models and a temporary folder,
and the zoo path on a few held-out procedural images."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import fanlens
from fanlens import FanlensError, cli, zoo
from fanlens.pipeline import RANDOM_SUFFIX, reproduce

from conftest import TINY

FIGS_REAL = {"figure3ab_{}.png", "figure4_{}.png"}


def _weights_file(tmp_path, spec: str, seed: int):
    """A checkpoint of ``spec``'s architecture (a seeded initialisation), as a user's local file."""
    from safetensors.torch import save_file

    model = fanlens.build_model(spec, seed=seed).model
    path = tmp_path / f"weights-{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture
def legible(monkeypatch):
    """Every figure reproduce saves is checked with plotting.text_problems: ``{file: problems}``."""
    import fanlens.pipeline as pipeline
    from fanlens.plotting import text_problems

    problems = {}
    real_save = pipeline._save_fig

    def checked_save(fig, path):
        found = text_problems(fig)
        if found:
            problems[path.name] = found
        real_save(fig, path)

    monkeypatch.setattr(pipeline, "_save_fig", checked_save)
    return problems


def test_real_model_path_with_checkpoints_and_their_random_init_twins(tmp_path, image_dir, capsys, legible):
    out = tmp_path / "figs"
    ck = [_weights_file(tmp_path, TINY, 11), _weights_file(tmp_path, "resnet18", 12)]
    code = cli.main(["reproduce", "--model", TINY, "--model", "resnet18", "--checkpoint", ck[0], "--checkpoint",
                     ck[1], "--images", str(image_dir), "--out", str(out), "--sigmas", "0,0.1", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    names = {p.name for p in out.iterdir()}
    assert {"figure3ab_resnet18.png", "figure4_resnet18.png", "figure3c.png", "results.csv", "manifest.json"} <= names
    assert "figure4_mask_agreement.png" not in names  # real images carry no masks
    assert sum(n.startswith("figure3ab_") for n in names) == 2
    rows = list(csv.DictReader(open(out / "results.csv")))
    models = {r["model"] for r in rows}
    assert models == {TINY, TINY + RANDOM_SUFFIX, "resnet18", "resnet18" + RANDOM_SUFFIX}
    zero = [float(r["value"]) for r in rows if r["metric"] == "relative_perturbation" and r["sigma"] == "0"
            and r["statistic"] == "mean"]
    assert zero and all(v == 0.0 for v in zero)
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "reproduce" and len(man["runs"]) == 4
    assert man["parameters"]["sigmas"] == [0.0, 0.1]
    for f in sorted(out.glob("*.png")):
        assert f"wrote {f}" in captured.out
    # the claims of real models: no masks, so C3 uses the count; C2 compares the ViT with the ResNet
    table = list(csv.DictReader(open(out / "claims.csv")))
    stats = {(r["statistic"], r["models"]) for r in table}
    assert ("c2_ratio_difference (transformer - CNN)", f"{TINY} - resnet18") in stats
    assert ("c3_within_block", "resnet18") in stats  # no masks: C3 is reported as not available
    assert all(r["value"] == "" and r["note"].startswith("not available") for r in table if r["claim"] == "C3")
    assert all(r["n_images"] == str(len(list(image_dir.iterdir()))) for r in table)
    assert "| C1 | c1_within_block |" in captured.out  # the headline table over the grid is printed too
    assert {"sigma", "space", "measure", "rule"} <= set(table[0])  # one row per claim, model and grid cell
    assert {r["measure"] for r in table} == {"additive", "additive+layernorm", "pure_vs_clean"}
    assert (out / "report.html").is_file() and len(list((out / "viewer").iterdir())) == 4
    assert legible == {}  # long model specs (file paths) wrap or shorten: no clipped or overlapping text


def test_checkpoint_count_must_match_models(tmp_path, image_dir):
    with pytest.raises(FanlensError, match="once per model"):
        reproduce(["resnet18", "resnet18"], checkpoints=["a.pth"], images=image_dir, out=tmp_path)


def test_zoo_images_are_rejected_as_images_argument(tmp_path):
    with pytest.raises(FanlensError, match="images applies to real models"):
        reproduce(None, images="samples", out=tmp_path)


@pytest.mark.skipif(not set(zoo.ZOO_NAMES) <= set(zoo.available()) or not set(zoo.HEAD_VARIANTS) & set(zoo.available()),
                    reason="zoo weights not installed")
def test_zoo_path_writes_every_figure(tmp_path, monkeypatch):
    import fanlens.pipeline as pipeline
    from fanlens import grid
    from fanlens.plotting import text_problems

    problems, drawn = {}, []
    real_save = pipeline._save_fig

    def checked_save(fig, path):  # every figure of reproduce: no clipped or overlapping text
        drawn.append(path.name)
        found = text_problems(fig)
        if found:
            problems[path.name] = found
        real_save(fig, path)

    monkeypatch.setattr(pipeline, "_save_fig", checked_save)
    # the seed-0 network of each architecture: the figures and files do not depend on the count (the networks
    # as one unit: test_zoo_networks_of_one_architecture_are_one_unit), and the suite stays within its time
    seed0 = zoo.networks
    monkeypatch.setattr(zoo, "networks", lambda name, task=zoo.DEFAULT_TASK: [k for k in seed0(name, task) if k == 0])
    res = reproduce(None, out=tmp_path, n_images=6, sigmas=(0.1, 0.2), progress=False)
    assert len(drawn) == 14, drawn
    assert problems == {}
    names = {p.name for p in res.written}
    expected = {f"figure3ab_{n}.png" for n in ("vit", "fan", "cnn")} | {f"figure4_{n}.png" for n in ("vit", "fan", "cnn")}
    expected |= {"claims_default.md", "claims_grid.png", "claims_headline.csv"}  # the specification grid
    expected |= {"figure3c.png", "figure3c_pure_noise.png", "figure4_mask_agreement.png", "results.csv", "manifest.json", "robustness.png",
                 "corruption_families.png", "heads.png", "claims.csv", "claims.md", "claims.json", "claims.png",
                 "report.html", "viewer"}  # viewer/: the groups and colours of each run's Figure 4 images
    assert names == expected
    viewer = sorted(p.name for p in (tmp_path / "viewer").iterdir())
    assert viewer == ["00_ViT", "01_ViT_random_init", "02_FAN", "03_FAN_random_init", "04_CNN", "05_CNN_random_init"]
    assert {p.name for p in (tmp_path / "viewer" / "02_FAN").iterdir()} == {"arrays.npz", "results.csv",
                                                                          "manifest.json", "colours.npz"}
    page = (tmp_path / "report.html").read_text()
    assert all(f"<figcaption>{n}</figcaption>" in page for n in expected if n.endswith(".png")) and "C4" in page
    # the claim table: every claim, verdicts from the closed set, n = the images, no undefined number as a value
    table = list(csv.DictReader(open(tmp_path / "claims.csv")))
    assert {r["claim"] for r in table} == {"C1", "C2", "C3", "C4"}
    assert {r["verdict"] for r in table} <= {"holds", "contradicted", "inconclusive"}
    assert all(r["n_images"] == "6" for r in table)
    assert all(r["value"] not in ("nan", "inf") for r in table)
    # accuracy under each cell's noise, from the same pass: the cells where a model is at chance say so
    at_chance = {(r["sigma"], r["space"]) for r in table if "at chance accuracy at this sigma" in r["note"]}
    assert ("1", "pixel") in at_chance and ("0.05", "pixel") not in at_chance
    assert all(0 <= v <= 1 for r in res.runs if r.trained for v in r.noise_accuracy.values())
    assert res.runs[0].noise_accuracy[("pixel", 0.05)] >= res.runs[0].noise_accuracy[("pixel", 1.0)]
    # the damage-matched level: each trained model at the sigma where its own accuracy halves, probed there
    for r in [r for r in res.runs if r.trained] + res.heads_runs:
        for space, d in r.damage.items():
            curve = {sg: r.noise_accuracy[(space, sg)] for sg in pipeline.GRID_SIGMAS}
            assert d["sigma"] == grid.damage_matched_sigma(curve, r.clean_accuracy)
            below = [sg for sg in pipeline.GRID_SIGMAS if curve[sg] <= r.clean_accuracy / 2]
            assert 0 < d["sigma"] <= below[0]
            for measure in ("additive", "additive+layernorm"):
                assert r.damage_probes[(space, measure)].sigmas == (d["sigma"],)
    assert "pixel" in res.runs[0].damage
    matched = [r for r in table if r["sigma"] == grid.DAMAGE_MATCHED]
    assert {(r["space"], r["measure"]) for r in matched} == {(sp, m) for sp in ("pixel", "normalized")
                                                            for m in ("additive", "additive+layernorm")}
    assert all(r["note"].split("; ")[-1].startswith("damage-matched: ") or "damage-matched: " in r["note"]
               for r in matched)
    assert f"{res.runs[0].label} sigma {res.runs[0].damage['pixel']['sigma']:g} (accuracy" in " ".join(r["note"] for r in matched)
    heads = [r for r in table if r["claim"] == "C4"]
    installed = sorted(zoo.HEADS[n] for n in zoo.HEAD_VARIANTS if n in zoo.available())  # [1, 2, 8] when all are
    assert heads and all(r["n_units"] == str(len(installed) + 1) for r in heads)  # and vit (4 heads)
    assert [r.heads for r in res.heads_runs] == installed and res.runs[0].heads == 4 and res.network_runs == []
    assert res.claims.parameters["n_boot"] == 1000 and "| C1 |" in (tmp_path / "claims.md").read_text()
    assert len(res.runs) == 6 and [r.trained for r in res.runs] == [True, False] * 3
    # robustness of the trained models only, CE against the zoo CNN (1 for the CNN where defined)
    assert [r.robustness is not None for r in res.runs] == [True, False] * 3
    cnn = res.runs[4].robustness
    assert cnn.metric == "top1_error" and cnn.baseline == "zoo:cnn" and cnn.mean.shape == (15, 5)
    assert np.all(cnn.ce[np.isfinite(cnn.ce)] == 1.0)
    vit = res.runs[0].robustness
    defined = np.isfinite(vit.ce)
    np.testing.assert_allclose(vit.ce[defined], vit.mean.sum(1)[defined] / cnn.mean.sum(1)[defined])
    assert res.runs[2].corruption_probe.perturbations[0] == "gaussian_noise@3"
    for r in res.runs:
        assert r.scores is not None and r.scores.iou.shape == (len(r.groups.blocks), 6)
        assert np.all((r.scores.iou >= 0) & (r.scores.iou <= 1))
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {"significant_eigenvalues", "relative_perturbation", "mask_ari", "mask_best_iou", "clean_top1_error",
            "top1_error", "corruption_error", "robust_accuracy"} <= {r["metric"] for r in rows}
    assert all(r["value"] not in ("nan", "inf", "-inf") for r in rows)


def test_compare_equals_analyze_per_model_and_tabulates(image_dir):
    import numpy as np
    import timm

    import fanlens

    models = {"ViT": TINY, "CNN (random init)": timm.create_model("resnet18", num_classes=3)}
    cmp = fanlens.compare(models, str(image_dir), sigmas=(0.1,), n_clusters=2, group_images=2, progress=False)
    assert list(cmp.results) == list(models) and list(cmp.groups) == list(models)
    spec, probe = fanlens.analyze(fanlens.build_model(TINY), str(image_dir), sigmas=(0.1,), progress=False)
    np.testing.assert_allclose(cmp.results["ViT"][0].count(), spec.count())
    np.testing.assert_allclose(cmp.results["ViT"][1].values(0.1), probe.values(0.1), rtol=1e-5)
    assert len(cmp.groups["ViT"].images) == 2
    rows = cmp.rows()
    assert {r["model"] for r in rows} == set(models)
    assert cmp.to_csv().splitlines()[0].startswith("model,block_index")
    fig = cmp.plot()
    assert len(fig.get_axes()[0].get_lines()) == 2
    with pytest.raises(fanlens.FanlensError, match="models must map"):
        fanlens.compare({})


def test_training_dynamics_reads_train_zoo_snapshots(tmp_path, capsys):
    from fanlens.zoo import train

    train("cnn", steps=4, pool=32, val_size=16, snapshots=(0, 0.5, 1.0), out_dir=tmp_path / "run", progress=False)
    out = tmp_path / "dyn"
    code = cli.main(["training-dynamics", str(tmp_path / "run"), "--out", str(out), "--n-images", "4",
                     "--sigmas", "0.1", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert {p.name for p in out.iterdir()} >= {"training_cnn.png", "results.csv", "claims.csv", "claims.md",
                                                "manifest.json"}
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["model"] for r in rows} == {f"zoo:cnn@step-{s}" for s in (0, 2, 4)}
    card = json.loads((tmp_path / "run" / "cnn.json").read_text())
    val = {r["model"]: float(r["value"]) for r in rows if r["metric"] == "validation_accuracy"}
    assert val == {f"zoo:cnn@step-{s['step']}": pytest.approx(s["validation_accuracy"]) for s in card["snapshots"]}
    assert {"significant_eigenvalues", "relative_perturbation", "mask_ari", "top1_error"} <= {r["metric"] for r in rows}
    table = list(csv.DictReader(open(out / "claims.csv")))
    assert table and all(r["statistic"].startswith("c3_training[cnn]") and r["n_units"] == "3" for r in table)
    man = json.loads((out / "manifest.json").read_text())
    assert [r["step"] for r in man["runs"]] == [0, 2, 4]
    # a folder that train-zoo did not write is refused before any work
    code = cli.main(["training-dynamics", str(out), "--out", str(tmp_path / "x"), "--no-progress"])
    assert code == 2 and "snapshots must name a folder written by" in capsys.readouterr().err


def test_reproduce_decodes_each_image_once_per_run(image_dir, tmp_path, monkeypatch):
    """A real model and its random-init twin share the preprocessing: every analysis of both
    reads the images decoded once (file names kept in the provenance)."""
    import fanlens.data as data
    import fanlens.pipeline as pipeline

    decoded = []
    real = data._pil_to_pixels
    monkeypatch.setattr(data, "_pil_to_pixels", lambda img, tf: decoded.append(1) or real(img, tf))
    ck = [_weights_file(tmp_path, TINY, 5)]  # weights: the model and its random-init twin read the images
    res = reproduce([TINY], checkpoints=ck, images=image_dir, out=tmp_path / "r", sigmas=(0.1,), progress=False)
    n = len(list(image_dir.iterdir()))
    assert len(decoded) == n == res.runs[0].spectrum.n_images
    assert all(name.endswith(".png") for name in res.runs[0].spectrum.provenance.images)
    # too large to keep: every analysis reads them again (and the numbers are the same)
    decoded.clear()
    monkeypatch.setattr(pipeline, "DECODE_LIMIT_BYTES", 1)
    again = reproduce([TINY], checkpoints=ck, images=image_dir, out=tmp_path / "s", sigmas=(0.1,), progress=False)
    assert len(decoded) > n
    np.testing.assert_array_equal(again.runs[0].spectrum.per_image, res.runs[0].spectrum.per_image)


def test_an_image_set_resolved_for_another_preprocessing_is_refused(image_dir):
    import torch

    from fanlens.data import DataConfig, resolve_images

    a = DataConfig((32, 32), (0.5,) * 3, (0.5,) * 3)
    b = DataConfig((48, 48), (0.5,) * 3, (0.5,) * 3)
    s = resolve_images(image_dir, a).decoded(2**30)
    assert s.in_memory and resolve_images(s, a) is s
    assert s.decoded(2**30) is s
    x, idx = next(s.batches(8))
    assert x.shape[1:] == (3, 32, 32) and idx == list(range(len(s)))
    assert isinstance(x, torch.Tensor)
    with pytest.raises(FanlensError, match="images must be resolved for this model's preprocessing"):
        resolve_images(s, b)


def _hashing_hook(model, seen: list):
    """A forward pre-hook that records a hash of every input image the model receives."""
    import hashlib

    def hook(_m, args):
        x = args[0].detach().contiguous().cpu().numpy()
        seen.extend(hashlib.sha256(img.tobytes()).hexdigest() for img in x)

    return model.register_forward_pre_hook(hook)


def test_one_pass_per_model_equals_the_separate_analyses_and_forwards_nothing_twice():
    """reproduce's per-model pass gives what analyze, group_tokens, spectral_colouring and
    robustness(probe_severity) give alone, and no image reaches the model twice."""
    import fanlens
    from fanlens.grouping import mask_scores
    from fanlens.pipeline import FIGURE4_CLUSTERS, MASK_CLUSTERS, _run_one, _zoo_images
    from fanlens.robustness import robustness

    n, sig, sevs, bs = 6, (0.05, 0.1), (1, 3), 4
    x, masks, _names, y = _zoo_images(n, 0)
    lm = zoo.load("vit")
    seen: list = []
    h = _hashing_hook(lm.model, seen)
    try:
        run = _run_one(lm, "ViT", "ViT", True, x, masks, sig, 0, "cpu", bs, False, labels=y, severities=sevs)
    finally:
        h.remove()
    # clean + 5 noisy (the grid's sigmas, 0.05 and 0.1 among them) + 5 normalised-space copies + 1 pure N(0, 1)
    # input + 15 probe copies (severity 3) in the pass, then the 15 severity-1 copies: 6 x 42; then the
    # damage-matched pass: the clean images again (known waste: 1 forward per image) and one copy per space
    from collections import Counter

    from fanlens.pipeline import GRID_SIGMAS

    assert set(run.damage) == {"pixel", "normalized"}
    assert len(seen) == n * (1 + len(GRID_SIGMAS) + len(GRID_SIGMAS) + 1 + 15 + 15 + 3)
    twice = [k for k, c in Counter(seen).items() if c > 1]
    # only the clean images, once more, and the noisy copies of a space whose damage-matched level falls on one of
    # the grid's sigmas (an accuracy of exactly half at that level: the same draws, forwarded again)
    on_grid = sum(run.damage[sp]["sigma"] in GRID_SIGMAS for sp in run.damage)
    assert len(twice) == n * (1 + on_grid) and all(c <= 2 for c in Counter(seen).values())
    kw = dict(seed=0, batch_size=bs, progress=False)
    spec, probe, groups = fanlens.analyze(lm, x, sigmas=sig, groups=MASK_CLUSTERS, **kw)
    np.testing.assert_array_equal(run.spectrum.per_image, spec.per_image)
    assert run.probe.sigmas == GRID_SIGMAS
    cols = [run.probe.sigmas.index(v) for v in sig]
    np.testing.assert_allclose(run.probe.per_image[:, :, cols], probe.per_image, rtol=1e-5, atol=1e-8)
    # the grid's other probes equal the probe run alone with their settings
    for (space, measure), res in run.grid_probes.items():
        alone = fanlens.noise_probe(lm, x, sigmas=GRID_SIGMAS, space=space, token_norm=measure != "additive", **kw)
        np.testing.assert_allclose(res.per_image, alone.per_image, rtol=1e-5, atol=1e-7)
    pure = fanlens.noise_probe(lm, x, mode="pure_vs_clean", **kw)
    np.testing.assert_allclose(run.pure_probe.per_image, pure.per_image, rtol=1e-5)
    for a, b in zip(run.scores.ari, mask_scores(groups, masks).ari):
        np.testing.assert_allclose(a, b)
    vis = fanlens.group_tokens(lm, x[:3], n_clusters=FIGURE4_CLUSTERS, **kw)
    assert run.groups.images == vis.images and len(run.groups.images) == 3
    for a, b in zip(run.groups.labels, vis.labels):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(run.groups.pixels, vis.pixels)
    colours = fanlens.spectral_colouring(lm, x[:3], **kw)
    for a, b in zip(run.colours.colours, colours.colours):
        np.testing.assert_allclose(a, b, atol=1e-4)
    rob, cprobe = robustness(lm, x, labels=y, severities=sevs, probe_severity=3, **kw)
    np.testing.assert_array_equal(run.robustness.per_image, rob.per_image)
    np.testing.assert_allclose(run.corruption_probe.per_image, cprobe.per_image, rtol=1e-5, atol=1e-8)
    assert run.robustness.provenance.params == rob.provenance.params
    assert run.corruption_probe.provenance.params == cprobe.provenance.params
    assert run.spectrum.provenance.params == spec.provenance.params
    # a random-init twin: no robustness, the figure parts alone; a heads run: no figure parts
    twin = _run_one(zoo.load("vit", random_init=True, seed=0), "t", "ViT", False, x, masks, sig, 0, "cpu", bs,
                    False, labels=y, severities=sevs)
    assert twin.robustness is None and twin.corruption_probe is None and len(twin.groups.images) == 3
    bare = _run_one(lm, "ViT", "ViT", True, x, None, sig, 0, "cpu", bs, False, labels=y, severities=sevs,
                    figures=False)
    assert bare.groups is None and bare.colours is None and bare.corruption_probe is None
    np.testing.assert_array_equal(bare.robustness.per_image, rob.per_image)


def test_stream_parts_refuses_parts_it_cannot_place():
    """A part limited to the first images reads clean tokens only; its images must lead the batches."""
    import torch

    from fanlens import runner
    from fanlens.analysis import groups_part

    x = torch.rand(4, 3, 64, 64)
    s = runner.setup(zoo.load("vit"), x, pretrained=False, checkpoint=None, input_size=None, device="cpu",
                     blocks=None, num_prefix_tokens=None, layout=None, grid=None)
    bad = runner.Part(copies=["c"], make_copies=lambda x, idx: [x], n_images=2)
    with pytest.raises(ValueError, match="n_images reads the clean tokens only"):
        runner.stream_parts(s, [bad], lambda skip: s.images.batches(2), 2, "t", False)
    with pytest.raises(ValueError, match="copies exactly when it has make_copies"):
        runner.stream_parts(s, [runner.Part(copies=["c"])], lambda skip: s.images.batches(2), 2, "t", False)
    part, _finish = groups_part(s, n_clusters=2, seed=0, batch_size=2, n_images=2)
    backwards = lambda skip: iter([(x[[2, 1]], [2, 1]), (x[[0, 3]], [0, 3])])  # noqa: E731
    with pytest.raises(RuntimeError, match="needs them at the start of the batch"):
        runner.stream_parts(s, [part], backwards, 2, "t", False)


def test_a_model_without_weights_is_not_its_own_twin(tmp_path, image_dir, capsys):
    """No --pretrained, no --checkpoint: analysed once, as a random-init model, and left out of the claims."""
    out = tmp_path / "r"
    code = cli.main(["reproduce", "--model", TINY, "--images", str(image_dir), "--out", str(out), "--sigmas",
                     "0.1", "--no-progress", "--skip", "robustness"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["model"] for r in rows} == {TINY + RANDOM_SUFFIX}
    man = json.loads((out / "manifest.json").read_text())
    assert len(man["runs"]) == 1 and "no twin, no claims" in man["runs"][0]["caveat"]
    assert man["runs"][0]["trained"] is False and man["claims"] is None
    assert not (out / "claims.csv").exists() and "no claims are checked" in captured.err


def test_reproduce_skips_parts_and_takes_the_first_images(tmp_path, image_dir, legible):
    ck = _weights_file(tmp_path, TINY, 3)
    res = reproduce([TINY], checkpoints=[ck], images=image_dir, out=tmp_path / "r", sigmas=(0.1,), progress=False,
                    n_images=2, skip="groups,robustness")
    assert [r.label for r in res.runs] == [TINY, TINY + RANDOM_SUFFIX]
    for r in res.runs:
        assert r.spectrum.n_images == 2 and r.probe.n_images == 2
        assert r.groups is None and r.robustness is None and r.corruption_probe is None and r.colours is None
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert "figure3c.png" in names and not any(n.startswith(("figure4", "robustness")) for n in names)
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["parameters"]["skipped"] == ["groups", "robustness"]
    assert legible == {}  # one sigma panel with long model specs in its legend
    with pytest.raises(FanlensError, match=r"skip must name parts among \('groups', 'robustness'\). Got 'spectrum'"):
        reproduce([TINY], images=image_dir, out=tmp_path / "s", skip="spectrum")


def test_zoo_networks_of_one_architecture_are_one_unit(tmp_path, monkeypatch):
    """Three networks (seeds) per architecture: the claims pool them (architecture rows, hierarchical
    intervals), list each network's own values, and the headline names the architectures."""
    from fanlens.zoo.training import train, write_trained

    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("vit", "cnn"):
        for k in (0, 1, 2):
            t = train(name, seed=k, steps=2, pool=32, val_size=16, progress=False)
            for fname, data in t.files.items():
                (weights / fname).write_bytes(data)
    monkeypatch.setitem(zoo.TASKS[zoo.DEFAULT_TASK], "weights", weights)
    monkeypatch.setattr(zoo, "ZOO_NAMES", ("vit", "cnn"))
    monkeypatch.setattr(zoo, "HEAD_VARIANTS", ())
    assert zoo.networks("vit") == [0, 1, 2] and zoo.available() == ["vit", "cnn"]
    res = reproduce(None, out=tmp_path / "out", n_images=4, sigmas=(0.1,), progress=False,
                    skip="groups,robustness")
    assert [r.label for r in res.network_runs] == ["zoo:vit@1", "zoo:vit@2", "zoo:cnn@1", "zoo:cnn@2"]
    assert [r.label for r in res.runs] == ["zoo:vit", "zoo:vit@random-init", "zoo:cnn", "zoo:cnn@random-init"]
    assert {r.architecture for r in res.network_runs} == {"ViT", "CNN"} and res.runs[1].architecture is None
    default = list(csv.DictReader(open(tmp_path / "out" / "claims_default.md".replace(".md", ".csv").replace(
        "claims_default", "claims"))))
    rows = [r for r in res.claims.rows if r.statistic.startswith("c2_decay_ratio")]
    nets = {r.models: r.value for r in rows if r.level == "network"}
    assert set(nets) == {"zoo:vit", "zoo:vit@1", "zoo:vit@2", "zoo:cnn", "zoo:cnn@1", "zoo:cnn@2"}
    vit = [r for r in rows if r.models == "ViT"][0]
    assert vit.level == "architecture" and vit.n_networks == 3
    assert vit.value == pytest.approx(np.mean([nets["zoo:vit"], nets["zoo:vit@1"], nets["zoo:vit@2"]]))
    diff = [r for r in res.claims.rows if r.statistic.startswith("c2_ratio_difference")]
    assert [(d.models, d.n_networks) for d in diff] == [("ViT - CNN", 6)]
    # the grid's headline is about the architectures; claims.csv keeps every network's row per cell
    heads = {(h.statistic, h.models) for h in res.grid.headline}
    assert ("c1_within_block", "ViT") in heads and not any("@" in m for _s, m in heads)
    assert {"zoo:vit@2", "ViT"} <= {r["models"] for r in default}
    assert {r["level"] for r in default} == {"network", "architecture"}
    md = (tmp_path / "out" / "claims.md").read_text()
    assert "| C1 | c1_within_block | ViT |" in md
    assert "3 networks x 4 images" in (tmp_path / "out" / "claims_default.md").read_text()
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [r["label"] for r in man["network_runs"]] == ["zoo:vit@1", "zoo:vit@2", "zoo:cnn@1", "zoo:cnn@2"]
