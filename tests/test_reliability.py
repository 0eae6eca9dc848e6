"""Reliability as a tested property: nothing lost, nothing silently wrong, the same numbers
whatever the batch size or thread count. Each test here failed before its fix."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fanlens
from fanlens import FanlensError, cli, spectral as sp, zoo
from fanlens.data import data_config, resolve_images
from fanlens.runner import RUN_MARKER, OutputFolder

from conftest import TINY, write_images, write_png_header
from tiny_models import tiny_vit


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# --------------------------------------------------------------------------- 1. the shipped weights
def test_train_zoo_never_writes_into_the_package(tmp_path, capsys, monkeypatch):
    before = _digest(zoo.WEIGHTS_DIR)
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["train-zoo", "cnn", "--steps", "1", "--pool", "32", "--val-size", "16", "--no-progress"],
                          capsys)
    assert code == 0, err
    assert _digest(zoo.WEIGHTS_DIR) == before
    written = tmp_path / "fanlens_out" / "train-zoo"  # the default: a folder of the caller's, never the package
    assert sorted(p.name for p in written.iterdir()) == [RUN_MARKER, "cnn.json", "cnn.safetensors"]
    assert json.loads((written / "cnn.json").read_text())["training"]["steps"] == 1
    # the package folder is refused as --out, and --into-package excludes --out
    code, _, err = _run(["train-zoo", "cnn", "--steps", "1", "--out", zoo.WEIGHTS_DIR], capsys)
    assert code == 2 and "outside the installed fanlens package" in err
    code, _, err = _run(["train-zoo", "cnn", "--into-package", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "--into-package and --out exclude each other" in err
    from fanlens.zoo.training import train

    with pytest.raises(FanlensError, match="outside the installed fanlens package"):
        train("cnn", out_dir=zoo.WEIGHTS_DIR, steps=1, pool=32, val_size=16, progress=False)
    assert _digest(zoo.WEIGHTS_DIR) == before


# --------------------------------------------------------------------------- 2. runs keep earlier results
def test_runs_keep_earlier_results(tmp_path, capsys, image_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--model", TINY, "--images", image_dir, "--no-progress"]
    assert _run(["spectrum", *base], capsys)[0] == 0
    spec = _digest(tmp_path / "fanlens_out" / "spectrum")
    assert _run(["probe", *base], capsys)[0] == 0  # its own default folder
    assert _digest(tmp_path / "fanlens_out" / "spectrum") == spec
    # into the same folder: refused, nothing changed
    code, _, err = _run(["probe", *base, "--out", "fanlens_out/spectrum"], capsys)
    assert code == 2 and "--overwrite" in err and "results.csv" in err
    assert _digest(tmp_path / "fanlens_out" / "spectrum") == spec
    # asked to overwrite: the earlier run's files go as a set (no stale spectrum.png), other files stay
    (tmp_path / "fanlens_out" / "spectrum" / "my_notes.txt").write_text("mine")
    assert _run(["probe", *base, "--out", "fanlens_out/spectrum", "--overwrite"], capsys)[0] == 0
    names = sorted(p.name for p in (tmp_path / "fanlens_out" / "spectrum").iterdir())
    assert names == [RUN_MARKER, "arrays.npz", "manifest.json", "my_notes.txt", "probe.png", "results.csv"]
    assert fanlens.load(tmp_path / "fanlens_out" / "spectrum").KIND == "probe"
    # the API's save follows the same rule
    res = fanlens.load(tmp_path / "fanlens_out" / "probe")
    with pytest.raises(FanlensError, match="new or empty folder"):
        res.save(tmp_path / "fanlens_out" / "probe")
    res.save(tmp_path / "fanlens_out" / "probe", overwrite=True)


# --------------------------------------------------------------------------- 3. write failures
def test_unwritable_out_fails_before_any_analysis(tmp_path, capsys):
    marker = tmp_path / "model_was_built"
    factory = tmp_path / "factory.py"
    factory.write_text(
        "import pathlib, timm\n"
        f"def make():\n    pathlib.Path({str(marker)!r}).write_text('built')\n"
        "    return timm.create_model('vit_tiny_patch16_224', img_size=64, depth=2, num_classes=3)\n"
    )
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "sub", "/proc/fanlens-cannot-write-here"):
        code, _, err = _run(["spectrum", "--model", f"{factory}:make", "--out", out, "--no-progress"], capsys)
        assert code == 2 and err.startswith("fanlens: error: out must be a folder fanlens can write to"), err
        assert len(err.strip().splitlines()) == 1
    assert not marker.exists()  # checked before the model was even built


def test_a_failed_write_leaves_the_earlier_set_untouched(tmp_path, monkeypatch, image_dir):
    from fanlens import _output

    res = fanlens.spectrum(TINY, image_dir, progress=False)
    out = tmp_path / "out"
    res.save(out)
    (out / "spectrum.png").write_bytes(b"old figure")
    before = _digest(out)
    new = fanlens.noise_probe(TINY, image_dir, progress=False)
    real = _output.write_atomic
    calls = {"n": 0}

    def full_disk(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr("fanlens.results.write_atomic", full_disk)
    with pytest.raises(FanlensError, match=r"could not be written \(\[Errno 28\] No space left on device\); the folder keeps"):
        new.save(out, overwrite=True)
    assert _digest(out) == before  # the old set, whole; no mix, no staging leftovers
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [RUN_MARKER]
    # a failure while moving the new set in puts the old one back
    monkeypatch.setattr("fanlens.results.write_atomic", real)
    moves = {"n": 0}
    real_replace = os.replace

    def flaky_replace(a, b):
        moves["n"] += 1
        if moves["n"] == 6:
            raise OSError(errno.EIO, "I/O error")
        real_replace(a, b)

    monkeypatch.setattr(_output.os, "replace", flaky_replace)
    with pytest.raises(FanlensError, match="I/O error"):
        new.save(out, overwrite=True)
    monkeypatch.setattr(_output.os, "replace", real_replace)
    assert _digest(out) == before


# --------------------------------------------------------------------------- 4. non-finite values
def test_non_finite_values_are_refused_naming_the_block(tmp_path):
    nan = f"{Path(__file__).parent / 'tiny_models.py'}:nan_vit"
    x = torch.rand(2, 3, 64, 64)
    for fn in (fanlens.spectrum, fanlens.noise_probe, fanlens.group_tokens, fanlens.analyze):
        with pytest.raises(FanlensError, match=r"block 'blocks.1' output non-finite values"):
            fn(nan, x, progress=False)
    with pytest.raises(FanlensError, match=r"block 'blocks.0' output non-finite values .*\(sigma=1e\+30\)"):
        fanlens.noise_probe(TINY, x, sigmas=(0.1, 1e30), progress=False)
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(FanlensError, match=r"images must hold finite pixel values. Got 1 NaN"):
        fanlens.noise_probe(TINY, bad, progress=False)


def test_pixels_outside_0_1_are_refused():
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(FanlensError, match=r"pixel values in \[0, 1\] \(divide 0..255 values by 255\)"):
        fanlens.spectrum(TINY, x * 255, progress=False)
    with pytest.raises(FanlensError, match="pass pixels before normalisation"):
        fanlens.spectrum(TINY, (x - 0.5) / 0.25, progress=False)
    fanlens.spectrum(TINY, x.clamp(0, 1), progress=False)  # in range: fine


# --------------------------------------------------------------------------- 5. labels independent of the batch
def test_group_labels_do_not_depend_on_the_batch_size(tmp_path):
    x = torch.rand(9, 3, 64, 64)
    model = tiny_vit().eval()
    runs = [fanlens.group_tokens(model, x, n_clusters=4, batch_size=bs, progress=False) for bs in (1, 4, 9)]
    for r in runs[1:]:
        for a, b in zip(runs[0].labels, r.labels):
            np.testing.assert_array_equal(a, b)
    # an image's labels are a function of (seed, its index): the same when it travels with others
    auto = [fanlens.group_tokens(model, x, n_clusters=None, batch_size=bs, progress=False) for bs in (1, 9)]
    np.testing.assert_array_equal(auto[0].n_clusters, auto[1].n_clusters)
    for a, b in zip(auto[0].labels, auto[1].labels):
        np.testing.assert_array_equal(a, b)


def test_kmeans_rows_are_independent_of_their_batch():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(6, 40, 3, generator=g)
    whole = sp.kmeans(pts, 4, seed=3, indices=range(10, 16))
    for i in range(6):
        alone = sp.kmeans(pts[i : i + 1], 4, seed=3, indices=[10 + i])
        np.testing.assert_array_equal(alone[0].numpy(), whole[i].numpy())


# --------------------------------------------------------------------------- 6. thread count
def test_counts_and_labels_do_not_depend_on_the_thread_count():
    x = torch.rand(6, 3, 64, 64)
    model = timm_resnet()
    old = torch.get_num_threads()
    out = {}
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            spec = fanlens.spectrum(model, x, blocks="layer1.0,layer3.1", progress=False)
            grp = fanlens.group_tokens(model, x, blocks="layer1.0,layer3.1", n_clusters=3, progress=False)
            out[t] = (spec, grp)
    finally:
        torch.set_num_threads(old)
    (s1, g1), (s2, g2) = out[1], out[2]
    integer_rules = [i for i, r in enumerate(s1.rules) if r in ("rel_threshold", "norm_threshold", "eigengap")]
    np.testing.assert_array_equal(s1.count_mean[:, integer_rules], s2.count_mean[:, integer_rules])
    np.testing.assert_allclose(s1.count_mean, s2.count_mean, rtol=1e-5)  # effective rank etc.: float rounding
    for a, b in zip(g1.labels, g2.labels):
        np.testing.assert_array_equal(a, b)


def timm_resnet():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=3).eval()


# --------------------------------------------------------------------------- 7. odd sizes and layouts
def test_input_size_forms(tmp_path):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=3)
    assert data_config(model, input_size=48).input_size == (48, 48)
    assert data_config(model, input_size=[48]).input_size == (48, 48)
    assert data_config(model, input_size=(48, 32)).input_size == (48, 32)
    for bad in ((64, 64, 64), (0,), (-3, 5), "64", (64.5, 64)):
        with pytest.raises(FanlensError, match="input_size must be one positive int N"):
            data_config(model, input_size=bad)
    # a timm ViT by name is resized for the user; a module passed in is not touched
    r = fanlens.spectrum("vit_tiny_patch16_224", torch.rand(1, 3, 96, 64), input_size=(96, 64), blocks="blocks.0",
                         progress=False)
    assert r.blocks[0].layout.grid == (6, 4)
    with pytest.raises(FanlensError, match=r"call model.set_input_size\(img_size=\(96, 64\)\) first"):
        fanlens.spectrum(model, torch.rand(1, 3, 96, 64), input_size=(96, 64), progress=False)
    assert tuple(model.patch_embed.img_size) == (64, 64)
    # a model timm cannot resize (no set_input_size), passed in or built by name: the advice is to build it
    # for the size, not to pass it by name
    from fanlens.runner import fit_input_size

    fixed = torch.nn.Module()
    fixed.patch_embed = torch.nn.Module()
    fixed.patch_embed.img_size, fixed.patch_embed.strict_img_size = (64, 64), True
    for owned in (True, False):
        with pytest.raises(FanlensError, match=r"build it with img_size=\(96, 64\) \(timm.create_model\(name, "
                                               r"img_size=\(96, 64\)\)\) and pass the module, or analyse at 64x64\.$"):
            fit_input_size(fixed, (96, 64), owned)


def test_one_token_blocks_and_wrong_layouts_are_refused():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(FanlensError, match=r"block 'layer2.0' has 1 token \(1x1 grid\)"):
        fanlens.spectrum(timm_resnet(), x, input_size=8, progress=False)
    with pytest.raises(FanlensError, match=r"block 'layer1.0': read as NHWC, .* Check layout \(is it NCHW\?\)"):
        fanlens.spectrum(timm_resnet(), torch.rand(2, 3, 64, 64), input_size=64, layout="NHWC", progress=False)


# --------------------------------------------------------------------------- images
def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white in the stored pixels
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the file is shown 20 wide and 40 high, white on top
    im.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    cfg = data_config(tiny_vit(), input_size=(40, 20))
    cfg = type(cfg)(input_size=(40, 20), mean=cfg.mean, std=cfg.std, crop_pct=1.0)
    x = next(resolve_images(tmp_path / "phone.jpg", cfg).batches(1))[0][0]
    assert x.shape == (3, 40, 20)
    assert x[:, :18].mean() > 0.9 and x[:, 22:].mean() < 0.1  # upright: white on top, black below


def test_huge_images_get_a_fanlens_message(tmp_path, recwarn):
    write_png_header(tmp_path / "big.png", 20000, 20000)
    with pytest.raises(FanlensError, match=r"must have at most fanlens.data.MAX_IMAGE_PIXELS = 200,000,000 pixels. "
                                           r"Got 20000 x 20000 = 400,000,000"):
        fanlens.spectrum(TINY, tmp_path / "big.png", progress=False)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_the_runs_own_output_is_never_read_as_input(tmp_path, capsys, monkeypatch):
    write_images(tmp_path, 3, size=(64, 64))
    monkeypatch.chdir(tmp_path)
    argv = ["probe", "--model", TINY, "--images", ".", "--no-progress"]
    assert _run(argv, capsys)[0] == 0
    code, _, err = _run(argv + ["--overwrite"], capsys)  # the figure of the first run is not an input
    assert code == 0, err
    assert fanlens.load(tmp_path / "fanlens_out" / "probe").n_images == 3
    code, _, err = _run(["probe", "--model", TINY, "--images", "fanlens_out/probe", "--out", "fanlens_out/probe",
                         "--overwrite", "--no-progress"], capsys)
    assert code == 2 and "images must lie outside the output folder" in err


# --------------------------------------------------------------------------- results files
def test_damaged_results_give_clear_errors(tmp_path):
    res = fanlens.spectrum(TINY, torch.rand(2, 3, 64, 64), progress=False)
    res.save(tmp_path / "r")
    man = tmp_path / "r" / "manifest.json"
    man.write_text(man.read_text()[:100])
    with pytest.raises(FanlensError, match="not valid JSON"):
        fanlens.load(tmp_path / "r")
    res.save(tmp_path / "s")
    (tmp_path / "s" / "arrays.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(FanlensError, match="holds a damaged result"):
        fanlens.load(tmp_path / "s")


def test_output_folder_rules():
    with pytest.raises(FanlensError, match="out must name a folder. Got ''"):
        OutputFolder("")
    with pytest.raises(FanlensError, match="outside the installed fanlens package"):
        OutputFolder(Path(fanlens.__file__).parent / "results_here")


def test_seeds_and_devices_are_checked():
    for bad in (-1, 2**64, 1.5, "3"):
        with pytest.raises(FanlensError, match=r"seed must be an int in \[0, 2\*\*63 - 1\]"):
            fanlens.noise_probe(TINY, torch.rand(1, 3, 64, 64), seed=bad, progress=False)
    for dev in ("mps", "tpu", "cuda:7" if not torch.cuda.is_available() else "cuda:99"):
        with pytest.raises(FanlensError, match="device must be"):
            fanlens.spectrum(TINY, torch.rand(1, 3, 64, 64), device=dev, progress=False)


def test_console_script_exit_code_and_one_line(tmp_path):
    """The installed entry point itself (not cli.main) gives exit 2 and one line."""
    proc = subprocess.run([sys.executable, "-m", "fanlens.cli", "probe", "--model", TINY, "--seed", "-1",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fanlens: error: --seed must be an int in [0, 2**63 - 1]. Got -1 instead."]


def test_captum_analyses_refuse_non_finite_outputs():
    nan = f"{Path(__file__).parent / 'tiny_models.py'}:nan_vit"
    x = torch.rand(2, 3, 64, 64)
    for method in ("ig", "gradcam"):
        with pytest.raises(FanlensError, match=r"the model's output holds non-finite values .* for images \[0, 1\]"):
            fanlens.attribute(nan, x, method=method, n_steps=4, progress=False)
    with pytest.raises(FanlensError, match=r"the model's output holds non-finite values .* for images \[0\]"):
        fanlens.min_flip_sigma(nan, x, max_sigma=0.1, step=0.05, progress=False)


def test_a_second_run_into_the_same_folder_stops_and_the_first_keeps_its_files(tmp_path, capsys):
    """Two runs into one --out at the same time: the second ends with exit 2 naming the folder and
    the holder's pid; the first run's files are complete. A dead holder leaves no stale lock."""
    import subprocess
    import sys
    import textwrap

    from fanlens._output import LOCK_NAME, OutputFolder

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from fanlens._output import OutputFolder
        f = OutputFolder({str(out)!r}, command="first")
        print("locked", flush=True)
        time.sleep(4)
        with f.staging() as tmp:
            (tmp / "first.txt").write_text("complete")
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(FanlensError, match=rf"is in use by another fanlens run \(pid {holder.pid}\)"):
        OutputFolder(out, overwrite=True, command="second")
    code = cli.main(["spectrum", "--model", "zoo:vit", "--images", "samples", "--out", str(out), "--overwrite",
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: out {str(out)!r} is in use by another fanlens run (pid {holder.pid})" in err
    assert holder.wait(30) == 0
    assert (out / "first.txt").read_text() == "complete"
    # the holder is gone: its lock went with it
    f = OutputFolder(out, overwrite=True, command="third")
    with f.staging() as tmp:
        (tmp / "third.txt").write_text("x")
    assert not (out / LOCK_NAME).exists() and f._lock_fd is None
    killed = subprocess.Popen([sys.executable, "-c", f"from fanlens._output import OutputFolder; import os; "
                                                    f"f = OutputFolder({str(out)!r}, overwrite=True); os._exit(9)"])
    assert killed.wait(30) == 9
    OutputFolder(out, overwrite=True).release()  # no stale lock after a process that died holding it


def test_a_forward_that_fails_is_one_error_line_in_every_analysis():
    """A model that raises inside its forward pass: each analysis that runs it says so in one FanlensError naming
    the input shape (the model's own exception chained), never a bare traceback."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import broken

    x = torch.rand(2, 3, 16, 16)
    calls = {
        "spectrum": lambda m: fanlens.spectrum(m, x, blocks="blocks.*", progress=False),
        "robustness": lambda m: fanlens.robustness(m, x, corruptions="gaussian_noise", severities=(1,), labels=[0, 1],
                                                   progress=False),
        "attribute": lambda m: fanlens.attribute(m, x, n_steps=2, progress=False),
        "min_flip_sigma": lambda m: fanlens.min_flip_sigma(m, x, progress=False),
    }
    for name, call in calls.items():
        with pytest.raises(FanlensError, match=r"the model's forward pass failed on an input of shape \(\d+, 3, 16, 16\): "
                                               r"deliberate failure inside a block") as err:
            call(broken())
        assert isinstance(err.value.__cause__, RuntimeError), name


def test_an_output_that_is_not_class_logits_is_named_in_one_line():
    """A model that returns a dict (or tokens): each analysis that reads predictions says it needs (batch, classes)
    logits and what it got; the token analyses do not need them."""
    import timm

    class DictOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = timm.create_model("resnet18", num_classes=3)

        def forward(self, x):
            return {"logits": self.m(x)}

    x = torch.rand(2, 3, 32, 32)
    for call, what in ((lambda m: fanlens.robustness(m, x, corruptions="gaussian_noise", severities=(1,), labels=[0, 1],
                                                     progress=False), "robustness"),
                       (lambda m: fanlens.attribute(m, x, n_steps=2, progress=False), "attributions"),
                       (lambda m: fanlens.Lens(m, x, blocks="m.layer1.*", progress=False).robustness(
                           corruptions="gaussian_noise", severities=(1,), labels=[0, 1]), "robustness")):
        with pytest.raises(FanlensError, match=rf"model must return class logits of shape \(batch, classes\) for {what}\. "
                                               r"Got dict instead\."):
            call(DictOut())
    r = fanlens.noise_probe(DictOut(), x, sigmas=(0.1,), blocks="m.layer1.*", progress=False)
    assert r.mean.shape[0] == 2 and np.isfinite(r.mean).all()
