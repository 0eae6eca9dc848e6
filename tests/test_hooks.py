"""No entry point leaves a hook behind, on success or on failure (captum's hook-removal test idea)."""

from __future__ import annotations

import pytest
import torch

import fanlens
from fanlens import FanlensError, TokenCapture, cli

from conftest import TINY, count_hooks
from tiny_models import broken, tiny_vit

X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

CALLS = {
    "spectrum": lambda m, **kw: fanlens.spectrum(m, X, progress=False, **kw),
    "probe": lambda m, **kw: fanlens.noise_probe(m, X, sigmas=(0.0, 0.1), progress=False, **kw),
    "probe_pure": lambda m, **kw: fanlens.noise_probe(m, mode="pure", n_noise=2, input_size=64, progress=False, **kw),
    "groups": lambda m, **kw: fanlens.group_tokens(m, X, n_clusters=2, progress=False, **kw),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_success_leaves_no_hooks(name):
    m = tiny_vit().eval()
    CALLS[name](m)
    assert count_hooks(m) == 0


@pytest.mark.parametrize("name", sorted(CALLS))
def test_forward_failure_leaves_no_hooks(name):
    m = broken().eval()
    with pytest.raises(FanlensError, match="deliberate failure"):
        CALLS[name](m, blocks="blocks.*")
    assert count_hooks(m) == 0


def test_analysis_failure_after_capture_leaves_no_hooks():
    m = tiny_vit().eval()
    with pytest.raises(FanlensError, match="n_clusters"):
        fanlens.group_tokens(m, X, n_clusters=100, progress=False)
    assert count_hooks(m) == 0


def test_capture_exception_inside_with_block_leaves_no_hooks():
    m = tiny_vit().eval()
    with pytest.raises(KeyError):
        with TokenCapture(m) as cap:
            cap.run(X)
            raise KeyError("user code failed")
    assert count_hooks(m) == 0


@pytest.mark.parametrize("command, extra, rc", [
    ("spectrum", [], 0), ("probe", ["--sigmas", "0,0.1"], 0), ("groups", ["--n-clusters", "2"], 0),
    ("groups", ["--n-clusters", "99"], 2), ("probe", ["--blocks", "nothing.*"], 2),
])
def test_cli_leaves_no_hooks(monkeypatch, tmp_path, image_dir, command, extra, rc):
    built = []
    real = fanlens.models.build_model

    def spy(*a, **kw):
        lm = real(*a, **kw)
        built.append(lm.model)
        return lm

    monkeypatch.setattr(fanlens.models, "build_model", spy)
    code = cli.main([command, "--model", TINY, "--images", str(image_dir),
                     "--out", str(tmp_path / "o"), "--no-progress", "--no-figure", *extra])
    assert code == rc
    assert built and all(count_hooks(m) == 0 for m in built)


def test_reproduce_leaves_no_hooks(monkeypatch, tmp_path, image_dir):
    from fanlens import pipeline

    built = []
    real = pipeline.build_model

    def spy(*a, **kw):
        lm = real(*a, **kw)
        built.append(lm.model)
        return lm

    monkeypatch.setattr(pipeline, "build_model", spy)
    pipeline.reproduce([TINY], images=image_dir, out=tmp_path / "r", sigmas=(0.1,), progress=False)
    assert len(built) == 1 and all(count_hooks(m) == 0 for m in built)  # no weights: no random-init twin
    with pytest.raises(FanlensError):
        pipeline.reproduce([TINY.replace(":tiny_vit", ":broken")], images=image_dir, out=tmp_path / "b",
                           progress=False)
    assert len(built) == 2 and count_hooks(built[-1]) == 0
