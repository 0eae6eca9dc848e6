"""torchrun with 2 CPU processes (gloo): sharded images, exactly reduced statistics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fanlens
from fanlens._stats import RunningStats
from fanlens.distributed import merge_stats

from conftest import TINY, write_images


def test_running_stats_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(11, 3))
    whole = RunningStats((3,))
    whole.update(v)
    a, b = RunningStats((3,)), RunningStats((3,))
    a.update(v[::2])
    b.update(v[1::2])
    a.merge(b)
    np.testing.assert_allclose(a.mean, v.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.summary().std, v.std(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(whole.m2, a.m2, rtol=1e-12)
    assert merge_stats([whole])[0] is whole  # one process: identity
    # kept per-image values come back in dataset-index order, whatever the order of arrival
    k1, k2 = RunningStats((3,), keep=True), RunningStats((3,), keep=True)
    k1.update(v[1::2], list(range(1, 11, 2)))
    k2.update(v[::2], list(range(0, 11, 2)))
    k1.merge(k2)
    idx, vals = k1.per_image()
    np.testing.assert_array_equal(idx, np.arange(11))
    np.testing.assert_array_equal(vals, v)
    with pytest.raises(ValueError, match="indices must give one dataset index per image"):
        k1.update(v[:2])


@pytest.mark.parametrize("command, extra", [("probe", ["--sigmas", "0,0.1,0.5"]), ("spectrum", [])])
def test_torchrun_two_processes_equals_single_process(tmp_path, command, extra):
    images = tmp_path / "imgs"
    write_images(images, 5, size=(64, 64))  # 3 + 2 images on the two ranks
    out = tmp_path / "dist"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fanlens.cli",
         command, "--model", TINY, "--images", str(images), "--out", str(out), "--no-progress", "--no-figure",
         "--batch-size", "2", *extra],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_res = fanlens.load(out)
    if command == "probe":
        single = fanlens.noise_probe(TINY, images, sigmas=(0, 0.1, 0.5), progress=False)
        pairs = [(dist_res.mean, single.mean), (dist_res.std, single.std), (dist_res.ci_low, single.ci_low)]
    else:
        single = fanlens.spectrum(TINY, images, progress=False)
        pairs = [(dist_res.count_mean, single.count_mean), (dist_res.count_std, single.count_std),
                 (dist_res.eig_mean, single.eig_mean)]
    assert dist_res.n_images == single.n_images == 5
    assert dist_res.provenance.params["processes"] == 2 and single.provenance.params["processes"] == 1
    pairs.append((dist_res.per_image, single.per_image))  # every image's value, in dataset order
    assert dist_res.per_image.shape[0] == 5
    for got, want in pairs:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_an_error_on_one_rank_ends_every_rank_promptly_with_the_same_line(tmp_path):
    images = tmp_path / "imgs"
    write_images(images, 24, size=(64, 64))  # 12 batches of one image per rank
    model = f"{Path(__file__).parent / 'tiny_models.py'}:fail_on_rank"
    env = dict(os.environ, OMP_NUM_THREADS="1", FANLENS_TEST_DELAY="0.5", FANLENS_TEST_FAIL_RANK="1")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fanlens.cli",
         "probe", "--model", model, "--images", str(images), "--out", str(tmp_path / "out"), "--no-progress",
         "--no-figure", "--batch-size", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    wall = time.monotonic() - t0
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fanlens: error:")]
    assert len(lines) == 2, proc.stderr[-3000:]  # one per rank
    assert lines[0] == lines[1]
    assert lines[0].startswith("fanlens: error: rank 1: the model's forward pass failed")
    # no traceback from fanlens' processes (torchrun's launcher prints its own summary of the failed ranks)
    assert not any('File "' in ln and "fanlens" in ln for ln in proc.stderr.splitlines()), proc.stderr[-3000:]
    # rank 0 stopped after its current batch instead of running its 12 batches (6 s) or waiting in a collective
    startup = _torchrun_startup(tmp_path, env)
    assert wall - startup < 4.0, (wall, startup)


def _torchrun_startup(tmp_path: Path, env: dict) -> float:
    """Wall time of a torchrun launch of fanlens that fails at once on both ranks (imports, rendezvous)."""
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fanlens.cli",
         "probe", "--model", "no_such_model_xyz", "--out", str(tmp_path / "out2"), "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    return time.monotonic() - t0


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE must be an integer. Got 'abc' instead."),
    ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE must be at least 1. Got '0' instead."),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "environment variable RANK must be below WORLD_SIZE (2). Got 5 instead."),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "environment variable RANK must be at least 0. Got '-1' instead."),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "but MASTER_ADDR is not set: launch with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"},
     "environment variable MASTER_PORT must be an integer"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29571",
      "FANLENS_RENDEZVOUS_TIMEOUT": "soon"}, "FANLENS_RENDEZVOUS_TIMEOUT must be a positive number of seconds"),
])
def test_a_broken_launcher_environment_is_one_line(monkeypatch, env, message):
    from fanlens import FanlensError
    from fanlens.distributed import init_from_env

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FANLENS_RENDEZVOUS_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(FanlensError) as e:
        init_from_env("cpu")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_peers_that_never_arrive_end_the_run_within_the_rendezvous_timeout(tmp_path):
    """WORLD_SIZE=2 with one process: exit 2 and one line after FANLENS_RENDEZVOUS_TIMEOUT, no output folder."""
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29573",
               FANLENS_RENDEZVOUS_TIMEOUT="2")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "fanlens.cli", "spectrum", "--model", TINY, "--images", "samples", "--out",
                        str(tmp_path / "out"), "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "could not be joined within 2 s" in lines[0] and "1/2 clients joined" in lines[0]
    assert took < 60 and not (tmp_path / "out").exists()
