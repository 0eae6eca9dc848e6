"""Checkpoints and --resume: a run stopped by a real signal continues to the exact uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fanlens
from fanlens import FanlensError
from fanlens.runner import STATE_DIRNAME

from conftest import CheckpointAcc, write_images

HERE = Path(__file__).parent
SLOW = f"{HERE / 'tiny_models.py'}:slow_vit"
N_IMAGES = 40


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume") / "imgs"
    write_images(d, N_IMAGES, size=(64, 64))
    return d


def _cli(command: str, images: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fanlens.cli", command, "--model", SLOW, "--images", str(images), "--out", str(out),
            "--batch-size", "1", "--checkpoint-every", "3", "--no-progress", "--no-figure", *extra]


def _checkpoint_batches(out: Path, command: str) -> int:
    f = out / STATE_DIRNAME / command / "rank0-of-1.npz"
    if not f.is_file():
        return 0
    try:
        with np.load(f) as z:
            return json.loads(bytes(z["__meta__"]).decode())["batches_done"]
    except (OSError, ValueError, KeyError):  # being replaced right now
        return 0


def _stop_after_checkpoint(cmd: list[str], out: Path, command: str, sig: int, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    while _checkpoint_batches(out, command) < 6:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() - t0 < 120, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _refusals(command, images, out, extra, env):
    # the same command without --resume refuses to start over on the checkpoint
    again = subprocess.run(_cli(command, images, out, *extra), capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "--resume" in again.stderr
    # with other parameters, resuming is refused
    other = extra[:-1] + ["0.5"] if extra else ["--rules", "eigengap"]
    changed = subprocess.run(_cli(command, images, out, *other, "--resume"), capture_output=True, text=True, env=env)
    assert changed.returncode == 2 and "resume must use the parameters and images" in changed.stderr, changed.stderr


@pytest.mark.parametrize("command, extra, sig", [
    ("probe", ["--sigmas", "0.1,0.3"], signal.SIGTERM),
    ("spectrum", [], signal.SIGINT),
    ("probe", ["--sigmas", "0.2"], signal.SIGKILL),
])
def test_stopped_run_resumes_to_the_uninterrupted_result(images, tmp_path, command, extra, sig):
    env = dict(os.environ, OMP_NUM_THREADS="1", FANLENS_TEST_DELAY="0.1")
    ref_env = dict(env, FANLENS_TEST_DELAY="0")
    ref = subprocess.run(_cli(command, images, tmp_path / "ref", *extra), capture_output=True, text=True, env=ref_env)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "run"
    stopped = _stop_after_checkpoint(_cli(command, images, out, *extra), out, command, sig, env)
    done = _checkpoint_batches(out, command)
    assert 6 <= done < N_IMAGES
    assert not (out / "results.csv").exists()  # nothing half-written
    if sig == signal.SIGKILL:
        assert stopped.returncode == -signal.SIGKILL
    else:
        assert stopped.returncode == 128 + sig, stopped.stderr
        last = stopped.stderr.strip().splitlines()[-1]
        assert last.startswith("fanlens: interrupted by SIG") and "--resume" in last

    if sig == signal.SIGTERM:
        _refusals(command, images, out, extra, env)

    resumed = subprocess.run(_cli(command, images, out, *extra, "--resume"), capture_output=True, text=True,
                             env=ref_env)
    assert resumed.returncode == 0, resumed.stderr
    assert not (out / STATE_DIRNAME).exists()  # the checkpoint goes once the results are in place
    a, b = fanlens.load(tmp_path / "ref"), fanlens.load(out)
    assert a.n_images == b.n_images == N_IMAGES
    names = ("mean", "std", "ci_low", "ci_high") if command == "probe" else ("count_mean", "count_std", "eig_mean")
    assert a.per_image.shape[0] == N_IMAGES
    for name in names + ("per_image",):  # exactly equal: same batches, same Welford merges
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (tmp_path / "ref" / "results.csv").read_text() == (out / "results.csv").read_text()


def test_api_resume_and_refusals(tmp_path):
    x = torch.rand(10, 3, 64, 64)
    from tiny_models import tiny_vit

    model = tiny_vit().eval()
    whole = fanlens.analyze(model, x, sigmas=(0.1,), batch_size=2, progress=False)
    state = tmp_path / "state"
    # a run that stops after 3 batches (a failure inside the loop), then resumes
    calls = {"n": 0}

    def fail_on_fourth(module, args, output):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("stop here")

    h = model.blocks[0].register_forward_hook(fail_on_fourth)
    with pytest.raises(FanlensError, match="forward pass failed"):
        fanlens.analyze(model, x, sigmas=(0.1,), batch_size=2, progress=False, state_dir=state, checkpoint_every=1)
    h.remove()
    with pytest.raises(FanlensError, match="holds the checkpoint of an earlier run"):
        fanlens.analyze(model, x, sigmas=(0.1,), batch_size=2, progress=False, state_dir=state)
    with pytest.raises(FanlensError, match="differs in: params"):
        fanlens.analyze(model, x, sigmas=(0.2,), batch_size=2, progress=False, state_dir=state, resume=True)
    with pytest.raises(FanlensError, match="differs in: images"):
        fanlens.analyze(model, x[:8], sigmas=(0.1,), batch_size=2, progress=False, state_dir=state, resume=True)
    spec, probe = fanlens.analyze(model, x, sigmas=(0.1,), batch_size=2, progress=False, state_dir=state,
                                  resume=True)
    np.testing.assert_array_equal(spec.count_mean, whole[0].count_mean)
    np.testing.assert_array_equal(probe.mean, whole[1].mean)
    np.testing.assert_array_equal(probe.std, whole[1].std)
    with pytest.raises(FanlensError, match="resume needs a state_dir"):
        fanlens.spectrum(model, x, resume=True, progress=False)
    with pytest.raises(FanlensError, match="checkpoint_every must be an int >= 1"):
        fanlens.spectrum(model, x, state_dir=tmp_path / "s2", checkpoint_every=0, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "zero", "flip_byte", "empty", "garbage", "counter", "array",
                                    "key", "drop_array", "encrypted_flag", "compression_method"])
def test_a_damaged_or_edited_checkpoint_is_refused_in_one_line(tmp_path, damage):
    import io
    import json

    from fanlens import FanlensError
    from fanlens._output import RunState

    key = {"model": "m", "images": ["a", "b"]}
    st = RunState(tmp_path, key)
    acc = CheckpointAcc()
    acc.total += [1, 2, 3, 4]
    st.save([acc], 5)
    path = tmp_path / "rank0-of-1.npz"
    data = path.read_bytes()
    if damage in ("counter", "array", "key", "drop_array"):  # edited with numpy: a well-formed npz
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(bytes(arrays["__meta__"]).decode())
        if damage == "counter":
            meta["batches_done"] = 9
        elif damage == "key":
            meta["key"]["images"] = ["a", "c"]
        elif damage == "array":
            arrays["0/total"] = arrays["0/total"] * 2
        else:
            del arrays["0/total"]
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path.write_bytes(buf.getvalue())
    elif damage in ("encrypted_flag", "compression_method"):  # found by the fuzz suite: zipfile's own errors
        central = data.index(b"PK\x01\x02")  # the first central-directory entry: flags at +8, method at +10
        at = central + (8 if damage == "encrypted_flag" else 10)
        path.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:])
    else:
        at = data.index(np.array([1.0, 2.0, 3.0, 4.0]).tobytes()) + 7  # inside the stored array
        path.write_bytes({"truncate": data[: len(data) // 2], "zero": bytes(len(data)), "empty": b"",
                          "garbage": b"PK\x03\x04" + b"x" * 200,
                          "flip_byte": data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]}[damage])
    with pytest.raises(FanlensError) as e:
        RunState(tmp_path, key, resume=True).restore([CheckpointAcc()])
    msg = str(e.value)
    assert "\n" not in msg and "to start over" in msg and ("does not verify" in msg or "cannot be read" in msg), msg
    # intact, it resumes where it stopped
    st2 = RunState(tmp_path / "ok", key)
    st2.save([acc], 5)
    fresh = CheckpointAcc()
    assert RunState(tmp_path / "ok", key, resume=True).restore([fresh]) == 5
    assert fresh.total.tolist() == [1, 2, 3, 4]
