"""The hostile-input catalogue: bad or odd images, models, options, checkpoints, output folders and
resumes, each run through the ``fanlens`` CLI in its own process.

Every case must end with exit code 2, exactly one ``fanlens: error: ...`` line on stderr (no
traceback, nothing else), the line naming the parameter at fault, and the output folder
byte-identical to before (each case starts from a folder holding an earlier run's results).

The cases run two at a time (the machine has two cores), each in a process forked from one that
has imported fanlens (``cli_forkserver.py``), in a module fixture that starts only the selected
cases; each case is one parametrised test.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fanlens

from conftest import write_images, write_png_header

HERE = Path(__file__).parent
TINY = f"{HERE / 'tiny_models.py'}:tiny_vit"
NAN = f"{HERE / 'tiny_models.py'}:nan_vit"
BROKEN = f"{HERE / 'tiny_models.py'}:broken"
CNN = f"{HERE / 'tiny_models.py'}:tiny_cnn"
PACKAGE = Path(fanlens.__file__).resolve().parent


@dataclass
class Case:
    """``argv`` after ``fanlens``; ``{W}`` is the workspace, ``{OUT}`` the case's output folder."""

    name: str
    argv: list[str]
    param: str  # must appear in the error line
    out: bool = True  # append --out {OUT}
    overwrite: bool = True  # append --overwrite (the earlier files must survive a failing overwrite too)
    state: bool = False  # the output folder also holds an interrupted run's checkpoint
    progress: bool = True  # append --no-progress (the report command has no progress to switch off)
    extra: dict = field(default_factory=dict)


def _cases() -> list[Case]:
    I = ["--images", "{W}/imgs"]
    P = ["probe", "--model", TINY, *I]
    S = ["spectrum", "--model", TINY, *I]
    G = ["groups", "--model", TINY, *I]
    R = ["robustness", "--model", "zoo:cnn", "--images", "synthetic", "--n-images", "8", "--corruptions", "fog",
         "--severities", "1,2"]
    return [
        # ---- images
        Case("images: missing path", ["probe", "--model", TINY, "--images", "{W}/nope"], "images"),
        Case("images: empty folder", ["probe", "--model", TINY, "--images", "{W}/empty"], "images"),
        Case("images: folder without images", ["probe", "--model", TINY, "--images", "{W}/texts"], "images"),
        Case("images: text file named .png", ["probe", "--model", TINY, "--images", "{W}/bad/fake.png"], "image"),
        Case("images: zero-byte file", ["probe", "--model", TINY, "--images", "{W}/bad/empty.png"], "image"),
        Case("images: truncated PNG", ["probe", "--model", TINY, "--images", "{W}/bad/truncated.png"], "image"),
        Case("images: grayscale", ["probe", "--model", TINY, "--images", "{W}/bad/gray.png"], "image"),
        Case("images: RGBA", ["probe", "--model", TINY, "--images", "{W}/bad/rgba.png"], "image"),
        Case("images: 16-bit", ["probe", "--model", TINY, "--images", "{W}/bad/deep.png"], "image"),
        Case("images: decompression bomb", ["probe", "--model", TINY, "--images", "{W}/bad/bomb.png"],
             "MAX_IMAGE_PIXELS"),
        Case("images: a .txt file named directly", ["probe", "--model", TINY, "--images", "{W}/texts/a.txt"], "image"),
        Case("images: one bad file among good", ["probe", "--model", TINY, "--images", "{W}/imgs",
                                                 "{W}/bad/fake.png"], "image"),
        Case("images: inside the output folder", ["probe", "--model", TINY, "--images", "{OUT}"], "images"),
        # ---- models
        Case("model: unknown timm name", ["probe", "--model", "vit_tiny_patch16_22", *I], "model"),
        Case("model: factory file missing", ["probe", "--model", "{W}/nofile.py:make", *I], "model"),
        Case("model: factory name missing", ["probe", "--model", f"{HERE / 'tiny_models.py'}:nothing", *I], "model"),
        Case("model: factory returns no module", ["probe", "--model", "{W}/factories.py:not_a_module", *I], "model"),
        Case("model: factory raises", ["probe", "--model", "{W}/factories.py:raises", *I], "model"),
        Case("model: NaN block, spectrum", ["spectrum", "--model", NAN, *I], "blocks.1"),
        Case("model: NaN block, probe", ["probe", "--model", NAN, *I], "blocks.1"),
        Case("model: NaN block, groups", ["groups", "--model", NAN, *I], "blocks.1"),
        Case("model: forward fails", ["probe", "--model", BROKEN, *I, "--blocks", "blocks.*"], "forward"),
        Case("model: unknown family without --blocks", ["probe", "--model", BROKEN, *I], "blocks"),
        Case("model: --blocks matches nothing", [*P, "--blocks", "decoder.*"], "blocks"),
        Case("model: --num-prefix-tokens too large", [*P, "--num-prefix-tokens", "1000"], "num_prefix_tokens"),
        Case("model: --num-prefix-tokens wrong", [*S, "--num-prefix-tokens", "3"], "num_prefix_tokens"),
        Case("model: --layout NHWC on a ResNet", ["spectrum", "--model", CNN, *I, "--layout", "NHWC"], "layout"),
        Case("model: --layout NLC on a ResNet", ["spectrum", "--model", CNN, *I, "--layout", "NLC"], "NLC"),
        Case("model: --pretrained with a factory", [*P, "--pretrained"], "pretrained"),
        Case("model: --pretrained with --checkpoint", [*P, "--pretrained", "--checkpoint", "{W}/ck/fits.pth"],
             "--checkpoint"),
        Case("model: missing --model", ["probe", *I], "--model"),
        # ---- options
        Case("option: --seed -1, probe", [*P, "--seed", "-1"], "--seed"),
        Case("option: --seed -1, spectrum", [*S, "--seed", "-1"], "--seed"),
        Case("option: --seed -1, reproduce", ["reproduce", "--seed", "-1"], "seed"),
        Case("option: --seed 1e23", [*P, "--seed", "1e23"], "--seed"),
        Case("option: --seed 2**70", [*P, "--seed", str(2**70)], "--seed"),
        Case("option: --device mps", [*P, "--device", "mps"], "device"),
        Case("option: --device bogus", [*P, "--device", "gpu0"], "device"),
        Case("option: --device cuda:9", [*P, "--device", "cuda:9"], "device"),
        Case("option: --input-size 64 64 64", [*P, "--input-size", "64", "64", "64"], "--input-size"),
        Case("option: --input-size 0", [*P, "--input-size", "0"], "--input-size"),
        Case("option: --input-size -5 5", [*P, "--input-size", "-5", "5"], "--input-size"),
        Case("option: --input-size 8 8 on a ResNet", ["spectrum", "--model", CNN, *I, "--input-size", "8", "8"],
             "input_size"),
        Case("option: --mode bogus", [*P, "--mode", "bogus"], "--mode"),
        Case("option: --sigmas 1e30", [*P, "--sigmas", "0.1,1e30"], "sigma=1e+30"),
        Case("option: --sigmas abc", [*P, "--sigmas", "abc"], "sigmas"),
        Case("option: --sigmas -0.1", [*P, "--sigmas=-0.1"], "sigmas"),
        Case("option: --sigmas nan", [*P, "--sigmas", "nan"], "sigmas"),
        Case("option: --sigmas inf", [*P, "--sigmas", "inf"], "sigmas"),
        Case("option: --sigmas repeated", [*P, "--sigmas", "0.1,0.1"], "sigmas"),
        Case("option: --sigmas empty", [*P, "--sigmas", ","], "sigmas"),
        Case("option: --batch-size 0", [*P, "--batch-size", "0"], "batch_size"),
        Case("option: --batch-size -3", [*S, "--batch-size", "-3"], "batch_size"),
        Case("option: --rules bogus", [*S, "--rules", "bogus"], "rules"),
        Case("option: --threshold out of range", [*S, "--threshold", "rel_threshold=2"], "threshold"),
        Case("option: --threshold without =", [*S, "--threshold", "rel_threshold"], "--threshold"),
        Case("option: --threshold unknown rule", [*S, "--threshold", "eigengap=0.1"], "thresholds"),
        Case("option: --token-budget 1", [*S, "--token-budget", "1"], "token_budget"),
        Case("option: --knn 0", [*S, "--affinity", "knn", "--knn", "0"], "knn"),
        Case("option: --affinity bogus", [*S, "--affinity", "bogus"], "--affinity"),
        Case("option: --n-clusters 0", [*G, "--n-clusters", "0"], "n_clusters"),
        Case("option: --n-clusters abc", [*G, "--n-clusters", "abc"], "--n-clusters"),
        Case("option: --colour unknown", [*G, "--colour", "rainbow"], "--colour"),
        Case("option: --attention on a ResNet", ["groups", "--model", CNN, *I, "--attention"], "attention"),
        Case("option: --n-clusters above the tokens", [*G, "--n-clusters", "10000"], "n_clusters"),
        Case("option: --flip with --mode pure", [*P, "--mode", "pure", "--flip"], "--flip"),
        Case("option: --n-noise 0", [*P, "--mode", "pure", "--n-noise", "0"], "n_noise"),
        Case("option: --attribution-block without gradcam", [*G, "--attribution-block", "blocks.0"],
             "--attribution-block"),
        Case("option: unknown option", [*P, "--bogus-option", "1"], "--bogus-option"),
        Case("option: --checkpoint-every 0", [*P, "--checkpoint-every", "0"], "checkpoint_every"),
        # ---- checkpoints (weights)
        Case("checkpoint: text file", [*P, "--checkpoint", "{W}/ck/text.pth"], "checkpoint"),
        Case("checkpoint: missing file", [*P, "--checkpoint", "{W}/ck/missing.pth"], "checkpoint"),
        Case("checkpoint: truncated safetensors", [*P, "--checkpoint", "{W}/ck/truncated.safetensors"],
             "checkpoint"),
        Case("checkpoint: does not fit the model", [*P, "--checkpoint", "{W}/ck/misfit.pth"], "checkpoint"),
        Case("checkpoint: pickled code", [*P, "--checkpoint", "{W}/ck/code.pth"], "checkpoint"),
        Case("checkpoint: a list, not a state dict", [*P, "--checkpoint", "{W}/ck/list.pth.tar"], "checkpoint"),
        Case("checkpoint: empty file", [*P, "--checkpoint", "{W}/ck/empty.pth"], "checkpoint"),
        # ---- output folders
        Case("out: empty string", [*P, "--out", ""], "--out", out=False, overwrite=False),
        Case("out: an existing file", [*P, "--out", "{W}/afile"], "out", out=False),
        Case("out: below a file", [*P, "--out", "{W}/afile/sub"], "out", out=False),
        Case("out: not writable (/proc)", [*P, "--out", "/proc/fanlens-out"], "out", out=False),
        Case("out: inside the package", [*P, "--out", str(PACKAGE / "results")], "out", out=False),
        Case("out: holds an earlier run", P, "out", overwrite=False),
        Case("out: --resume on a finished run", [*P, "--resume"], "out", overwrite=False),
        Case("out: holds an interrupted run", P, "--resume", overwrite=False, state=True),
        Case("out: resume with other sigmas", [*P, "--sigmas", "0.3", "--resume"], "resume", overwrite=False,
             state=True),
        Case("out: resume with other images", ["probe", "--model", TINY, "--images", "{W}/imgs2", "--resume"],
             "resume", overwrite=False, state=True),
        # ---- corruptions: the probe and robustness
        Case("probe: --corruption unknown", [*P, "--corruption", "fogg"], "corruption"),
        Case("probe: --severity 9", [*P, "--corruption", "fog", "--severity", "9"], "severity"),
        Case("probe: --corruption with --flip", [*P, "--corruption", "fog", "--flip"], "--flip"),
        Case("probe: --corruption with --mode pure", [*P, "--corruption", "fog", "--mode", "pure"], "corruption"),
        Case("probe: --corruption in normalised space", [*P, "--corruption", "fog", "--space", "normalized"],
             "corruption"),
        Case("robustness: unknown corruption", [*R, "--corruptions", "fogg"], "corruptions"),
        Case("robustness: --severities 0", [*R, "--severities", "0,2"], "severities"),
        Case("robustness: alexnet with two severities", [*R, "--baseline", "alexnet"], "severities"),
        Case("robustness: baseline without labels", ["robustness", "--model", TINY, *I, "--corruptions", "fog",
                                                      "--baseline", "alexnet"], "baseline"),
        Case("robustness: baseline folder missing", [*R, "--baseline", "{W}/nope"], "baseline"),
        Case("robustness: baseline of another kind", [*R, "--baseline", "{W}/earlier_run"], "baseline"),
        Case("robustness: labels CSV missing", ["robustness", "--model", TINY, *I, "--corruptions", "fog",
                                                "--labels", "{W}/nope.csv"], "labels"),
        Case("robustness: labels CSV without an image", ["robustness", "--model", TINY, *I, "--corruptions", "fog",
                                                         "--labels", "{W}/short.csv"], "labels"),
        Case("robustness: class index not JSON", ["robustness", "--model", TINY, "--images", "{W}/classes",
                                                  "--labels", "folders", "--class-index", "{W}/afile",
                                                  "--corruptions", "fog"], "class_index"),
        Case("robustness: labels above the classes", ["robustness", "--model", TINY, "--images", "{W}/classes",
                                                      "--labels", "folders", "--class-index", "{W}/big_index.json",
                                                      "--corruptions", "fog"], "labels"),
        Case("robustness: --n-images 0", [*R, "--n-images", "0"], "n_images"),
        # ---- reproduce and train-zoo
        Case("reproduce: --images without --model", ["reproduce", "--images", "{W}/imgs"], "images"),
        Case("reproduce: --checkpoint count", ["reproduce", "--model", TINY, "--model", TINY, "--checkpoint",
                                               "{W}/ck/fits.pth"], "checkpoint"),
        Case("reproduce: --n-images 0", ["reproduce", "--n-images", "0"], "n_images"),
        Case("reproduce: --sigmas bogus", ["reproduce", "--sigmas", "x"], "sigmas"),
        Case("train-zoo: --steps 0", ["train-zoo", "cnn", "--steps", "0"], "steps"),
        Case("train-zoo: unknown name", ["train-zoo", "resnet"], "names"),
        Case("train-zoo: --into-package with --out", ["train-zoo", "cnn", "--into-package"], "--into-package"),
        Case("train-zoo: --seed -1", ["train-zoo", "cnn", "--seed", "-1"], "--seed"),
        Case("train-zoo: --snapshots not numbers", ["train-zoo", "cnn", "--snapshots", "a,b"], "--snapshots"),
        Case("train-zoo: --snapshots above 100", ["train-zoo", "cnn", "--snapshots", "0,150"], "--snapshots"),
        Case("train-zoo: --warm-start with two names", ["train-zoo", "cnn", "vit", "--warm-start",
                                                        "{W}/ck/truncated.safetensors"], "--warm-start"),
        Case("train-zoo: --warm-start not safetensors", ["train-zoo", "cnn", "--warm-start", "{W}/ck/fits.pth"],
             "warm_start"),
        Case("train-zoo: --warm-start without its card", ["train-zoo", "cnn", "--warm-start",
                                                          "{W}/ck/truncated.safetensors"], "warm_start"),
        Case("training-dynamics: a folder without cards", ["training-dynamics", "{W}/imgs"], "snapshots"),
        Case("training-dynamics: no such folder", ["training-dynamics", "{W}/nope"], "snapshots"),
        Case("training-dynamics: --n-images 0", ["training-dynamics", "{W}/imgs", "--n-images", "0"], "n_images"),
        # ---- report (reads an output folder; writes one HTML file)
        Case("report: not an output folder", ["report", "{W}/imgs"], "directory", out=False, progress=False),
        Case("report: no such folder", ["report", "{W}/nope"], "directory", out=False, progress=False),
        Case("report: --max-images 0", ["report", "{OUT}", "--max-images", "0"], "max_images", out=False,
             progress=False),
        Case("report: --max-images not a number", ["report", "{OUT}", "--max-images", "x"], "--max-images",
             out=False, progress=False),
        Case("report: into the package", ["report", "{OUT}", "--out", str(PACKAGE / "report.html")], "out",
             out=False, progress=False),
        Case("report: over an existing file", ["report", "{OUT}", "--out", "{W}/imgs/img_000.png"], "overwrite",
             out=False, progress=False),
        Case("spectrum: --n-eig -1", [*S, "--n-eig", "-1"], "n_eig"),
        # ---- met while building the Lens and reproduce's limits
        Case("reproduce: --skip an unknown part", ["reproduce", "--model", TINY, *I, "--skip", "spectrum"], "skip"),
        Case("reproduce: --skip with a typo", ["reproduce", "--model", TINY, *I, "--skip", "groups,robustnes"], "skip"),
        Case("reproduce: --n-images 0 on real images", ["reproduce", "--model", TINY, *I, "--n-images", "0"],
             "n_images"),
        Case("reproduce: --n-images -3 on the zoo", ["reproduce", "--n-images", "-3"], "n_images"),
        Case("spectrum: --n-images 0", [*S, "--n-images", "0"], "n_images"),
        Case("probe: --n-images not a number", [*P, "--n-images", "many"], "--n-images"),
        Case("train-zoo: into the package by --out", ["train-zoo", "cnn", "--out", str(PACKAGE / "zoo" / "weights")],
             "out", out=False),
        # ---- round three: threads, absurd sizes, whole-number levels, a report over its own inputs
        Case("threads: 0", [*P, "--threads", "0"], "--threads"),
        Case("threads: not a number", [*S, "--threads", "abc"], "--threads"),
        Case("threads: 1e9", [*G, "--threads", "1e9"], "--threads"),
        Case("threads: -1", [*P, "--threads", "-1"], "--threads"),
        Case("threads: above the limit", ["reproduce", "--threads", "99999"], "--threads"),
        Case("size: --n-noise 10**12", [*P, "--mode", "pure", "--n-noise", str(10**12)], "n_noise"),
        Case("size: --input-size 100000", [*P, "--input-size", "100000"], "input_size"),
        Case("size: reproduce --n-images 10**12", ["reproduce", "--n-images", str(10**12)], "n_images"),
        Case("size: train-zoo --steps 10**12", ["train-zoo", "cnn", "--steps", str(10**12)], "steps"),
        Case("size: train-zoo --pool 10**12", ["train-zoo", "cnn", "--pool", str(10**12)], "pool"),
        Case("size: --n-eig 10**12", [*S, "--n-eig", str(10**12)], "n_eig"),
        Case("size: --n-clusters 10**12", [*G, "--n-clusters", str(10**12)], "n_clusters"),
        Case("size: robustness --n-images 10**12", [*R, "--n-images", str(10**12)], "n_images"),
        Case("size: training-dynamics --n-images 10**12", ["training-dynamics", "{W}/imgs", "--n-images",
                                                           str(10**12)], "n_images"),
        Case("option: --ig-steps 0", [*G, "--attribution", "ig", "--ig-steps", "0"], "n_steps"),
        Case("option: --checkpoint-every -1", [*S, "--checkpoint-every", "-1"], "checkpoint_every"),
        Case("option: --sigmas 1e400 (inf)", [*P, "--sigmas", "1e400"], "sigmas"),
        Case("probe: --severity 2.5 (not truncated)", [*P, "--corruption", "fog", "--severity", "2.5"], "severity"),
        Case("probe: --severity empty", [*P, "--corruption", "fog", "--severity", ""], "severity"),
        Case("robustness: --severities 2.5", [*R, "--severities", "2.5"], "severities"),
        Case("report: --out is the run's own manifest", ["report", "{OUT}", "--out", "{OUT}/manifest.json"], "out",
             out=False, progress=False),
        Case("report: --out is the run's own arrays", ["report", "{OUT}", "--out", "{OUT}/arrays.npz"], "out",
             out=False, progress=False),
    ]


CASES = _cases()


# --------------------------------------------------------------------------- the workspace
class _Code:
    def __reduce__(self):
        return (os.system, ("echo pickled code ran",))


def _workspace(w: Path) -> None:
    write_images(w / "imgs", 3, size=(64, 64))
    write_images(w / "imgs2", 4, size=(64, 64), seed=1)
    (w / "empty").mkdir()
    (w / "texts").mkdir()
    (w / "texts" / "a.txt").write_text("not an image")
    bad = w / "bad"
    bad.mkdir()
    (bad / "fake.png").write_text("this is text")
    (bad / "empty.png").write_bytes(b"")
    good = w / "imgs" / "img_000.png"
    (bad / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), "L").save(bad / "gray.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA").save(bad / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)).save(bad / "deep.png")
    write_png_header(bad / "bomb.png", 30000, 30000)
    (w / "factories.py").write_text(
        "def not_a_module():\n    return 42\n\ndef raises():\n    raise RuntimeError('factory failed')\n")
    (w / "afile").write_text("a file, not a folder")
    (w / "short.csv").write_text("file,label\nimg_000.png,1\n")
    for cls in ("cat", "dog"):
        write_images(w / "classes" / cls, 2, size=(64, 64))
    (w / "big_index.json").write_text('{"cat": 0, "dog": 99}')
    ck = w / "ck"
    ck.mkdir()
    (ck / "text.pth").write_text("hello, not weights\n")
    (ck / "empty.pth").write_bytes(b"")
    import timm
    from safetensors.torch import save_file

    sd = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3, num_classes=5).state_dict()
    torch.save(sd, ck / "fits.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(ck / "full.safetensors"))
    data = (ck / "full.safetensors").read_bytes()
    (ck / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    torch.save({"head.weight": torch.zeros(3, 3)}, ck / "misfit.pth")
    with open(ck / "code.pth", "wb") as f:
        pickle.dump({"x": _Code()}, f)
    torch.save([torch.zeros(2)], ck / "list.pth.tar")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("hostile")
    _workspace(w)
    ref = w / "earlier_run"
    proc = subprocess.run([sys.executable, "-m", "fanlens.cli", "probe", "--model", TINY, "--images", str(w / "imgs"),
                           "--out", str(ref), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # an interrupted probe run: only its checkpoint (two of three batches done) in the folder
    from fanlens.models import build_model

    lm = build_model(TINY)
    calls = {"n": 0}

    def stop_at_third(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("stopped")

    hook = lm.model.blocks[0].register_forward_hook(stop_at_third)
    with pytest.raises(fanlens.FanlensError):
        fanlens.noise_probe(lm, w / "imgs", sigmas=(0.1,), batch_size=1, checkpoint_every=1, progress=False,
                            state_dir=w / "interrupted_run" / ".fanlens-state" / "probe")
    hook.remove()
    assert (w / "interrupted_run" / ".fanlens-state" / "probe" / "rank0-of-1.npz").is_file()
    return w


def _fill(arg: str, w: Path, out: Path) -> str:
    return arg.replace("{W}", str(w)).replace("{OUT}", str(out))


def _digest(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _case_dir(case: Case, w: Path) -> Path:
    return w / "cases" / case.name.replace(" ", "_").replace(":", "").replace("/", "_")


@pytest.fixture(scope="module")
def results(request, workspace) -> dict:
    """Every selected case, two at a time, each in its own process forked from one that has
    imported fanlens (``cli_forkserver.py``: a fresh interpreter per case would spend most of
    the catalogue's time importing torch and timm)."""
    selected = {item.callspec.params["case"].name for item in request.session.items
                if item.originalname == "test_hostile_input" and hasattr(item, "callspec")}
    todo = [c for c in CASES if c.name in selected]
    runs = []
    for case in todo:
        out = _case_dir(case, workspace)
        shutil.copytree(workspace / ("interrupted_run" if case.state else "earlier_run"), out)
        argv = [_fill(a, workspace, out) for a in case.argv] + (["--no-progress"] if case.progress else [])
        if case.out:
            argv += ["--out", str(out)] + (["--overwrite"] if case.overwrite else [])
        runs.append(dict(argv=argv, stdout=str(out) + ".stdout", stderr=str(out) + ".stderr", before=_digest(out)))
    proc = subprocess.run([sys.executable, str(HERE / "cli_forkserver.py"), "2"], capture_output=True, text=True,
                          timeout=1800, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          input=json.dumps([{k: r[k] for k in ("argv", "stdout", "stderr")} for r in runs]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout)
    done = {}
    for case, r, code in zip(todo, runs, codes):
        done[case.name] = {"code": code, "stdout": Path(r["stdout"]).read_text(), "stderr": Path(r["stderr"]).read_text(),
                           "before": r["before"], "after": _digest(_case_dir(case, workspace)), "argv": r["argv"]}
    return done


def test_catalogue_size():
    assert len(CASES) >= 150
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, results):
    r = results[case.name]
    err = r["stderr"]
    assert r["code"] == 2, f"{r['argv']}\nexit {r['code']}\n{err[-2000:]}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("fanlens: error: "), lines[0]
    assert "Traceback" not in err
    assert case.param in lines[0], lines[0]
    assert r["after"] == r["before"]  # earlier files byte-identical, no leftovers
    assert "pickled code ran" not in r["stdout"]


def test_non_regular_files_named_like_images_are_skipped_or_refused(tmp_path, caplog):
    """A FIFO (or socket) named *.png in an image folder is skipped with a warning, never opened (it would
    block); named explicitly it is refused in one line. A multi-frame image says that its first frame is used."""
    import logging
    import os
    import socket

    from PIL import Image

    from fanlens import FanlensError
    from fanlens.data import DataConfig, resolve_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "a.png")
    os.mkfifo(folder / "b.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "c.png"))
    cfg = DataConfig((32, 32), (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0, "center")
    with caplog.at_level(logging.WARNING, logger="fanlens.data"):
        ims = resolve_images(str(folder), cfg)
    assert [os.path.basename(n) for n in ims.names] == ["a.png"]
    assert sum("not a regular file" in r.message for r in caplog.records) == 2
    for bad in (folder / "b.png", [str(folder / "a.png"), str(folder / "c.png")]):
        with pytest.raises(FanlensError, match="regular image file"):
            resolve_images(str(bad) if not isinstance(bad, list) else bad, cfg)
    sock.close()
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fanlens.data"):
        resolve_images(str(tmp_path / "anim.gif"), cfg)
    assert any("has 3 frames (pages); fanlens analyses the first one only" in r.message for r in caplog.records)


def test_labels_that_would_give_a_quiet_wrong_number(tmp_path, caplog):
    """Negative labels, two classes for one image, repeated rows, the same image twice and an empty
    class folder: each an error or an explicit warning."""
    import logging

    from fanlens import FanlensError
    from fanlens.robustness import load_labels

    names = [str(tmp_path / c / f"{c}{i}.png") for c in ("cat", "eel") for i in range(2)]
    with pytest.raises(FanlensError, match=r"labels must be class indices >= 0. Got -1"):
        load_labels([0, -1, 2, 3], names)
    csvf = tmp_path / "labels.csv"
    csvf.write_text("file,label\ncat0.png,1\ncat0.png,2\n")
    with pytest.raises(FanlensError, match="gives 'cat0.png' two classes"):
        load_labels(str(csvf), names)
    csvf.write_text("file,label\ncat0.png,1\ncat0.png,1\ncat1.png,1\neel0.png,0\neel1.png,0\n")
    with caplog.at_level(logging.WARNING, logger="fanlens.robustness"):
        assert load_labels(str(csvf), names).tolist() == [1, 1, 0, 0]
    assert any("repeats rows for cat0.png" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fanlens.robustness"):
        load_labels([0, 0, 1], names[:2] + names[:1])
    assert any("the same image appears more than once" in r.message for r in caplog.records)
    # class folders: an empty one keeps its index, so that the others do not shift
    for c in ("ant", "bee", "cat"):
        (tmp_path / "root" / c).mkdir(parents=True)
    files = [str(tmp_path / "root" / "ant" / "a.png"), str(tmp_path / "root" / "cat" / "c.png")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fanlens.robustness"):
        assert load_labels("folders", files).tolist() == [0, 2]
    assert any("class folders without images: bee" in r.message for r in caplog.records)


def test_corruptions_state_their_minimum_size_and_never_return_nan():
    import torch

    from fanlens import FanlensError
    from fanlens import corruptions as cc

    for name in cc.NAMES:
        for shape in ((1, 3, 1, 1), (1, 3, 1, 64), (2, 3, 64, 1)):
            with pytest.raises(FanlensError, match=rf"at least {cc.MIN_SIDE} x {cc.MIN_SIDE} pixels for '{name}'"):
                cc.corrupt(torch.rand(*shape), name, 3)
        for shape in ((1, 3, 2, 2), (1, 3, 3, 200), (1, 3, 200, 3)):
            y = cc.corrupt(torch.rand(*shape), name, 5, seed=1)
            assert y.shape == shape and bool(torch.isfinite(y).all()), (name, shape)
        empty = cc.corrupt(torch.rand(0, 3, 32, 32), name, 2)
        assert empty.shape == (0, 3, 32, 32)
    for bad in (1.5, "3", True):
        with pytest.raises(FanlensError, match="indices must be ints"):
            cc.corrupt(torch.rand(1, 3, 8, 8), "gaussian_noise", 3, indices=[bad])
    with pytest.raises(FanlensError, match="severity must be an int in 1..5. Got 2.7"):
        cc.corrupt(torch.rand(1, 3, 8, 8), "gaussian_noise", 2.7)


def test_a_terminal_without_unicode_and_a_reader_that_leaves_end_quietly(tmp_path):
    """PYTHONIOENCODING=ascii must not crash a run that succeeded (accented names, sigma); `fanlens ... |
    head -1` ends with the broken-pipe exit (141) and no trace."""
    import os
    import subprocess
    import sys

    from PIL import Image

    from conftest import TINY

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, n in enumerate(("café.png", "naïve_σ.png")):
        Image.new("RGB", (48, 48), (40 * i, 90, 200)).save(folder / n)
    out = tmp_path / "résultat_σ"
    env = dict(os.environ, PYTHONIOENCODING="ascii", LANG="C", LC_ALL="C")
    p = subprocess.run([sys.executable, "-m", "fanlens.cli", "spectrum", "--model", TINY, "--images", str(folder),
                        "--out", str(out), "--no-progress"], env=env, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode("ascii", "replace")
    assert b"Traceback" not in p.stderr and b"wrote " in p.stdout and b"r\\xe9sultat" in p.stdout
    proc = subprocess.Popen([sys.executable, "-m", "fanlens.cli", "spectrum", "--model", TINY, "--images",
                             str(folder), "--out", str(tmp_path / "again"), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()


def test_absurd_sizes_are_refused_before_any_work(monkeypatch):
    import fanlens
    from fanlens import FanlensError, runner
    from fanlens.analysis import MAX_N_NOISE

    with pytest.raises(FanlensError, match=r"n_noise must be at most 1,000,000 .*Got 1000000000"):
        fanlens.noise_probe("zoo:vit", mode="pure", n_noise=10**9, progress=False)
    assert MAX_N_NOISE == 1_000_000
    with pytest.raises(FanlensError, match=r"input_size must be at most 8192 pixels a side.*Got 100000 x 100000"):
        fanlens.spectrum("zoo:vit", "samples", input_size=100_000, progress=False)
    monkeypatch.setattr(runner, "available_memory", lambda: 8 * 2**30)  # 8 GiB free
    # 2048 x 2048 through a patch-8 ViT: 65,536 tokens, 4 heads of 65,536^2 floats = 64 GiB per block
    with pytest.raises(FanlensError, match=r"65,536 tokens per image: one block's attention maps \(4 heads of "
                                           r"65,536 x 65,536\) need 64.0 GiB; 8.0 GiB are available"):
        fanlens.spectrum("zoo:vit", "samples", input_size=2048, progress=False)
    # a CNN has no attention map: its forward pass is bounded by the pixels (16 x 3 x 4 bytes each)
    with pytest.raises(FanlensError, match=r"input_size 8000 x 8000 needs about 11.4 GiB per image"):
        fanlens.spectrum("zoo:cnn", "samples", input_size=8000, progress=False)
