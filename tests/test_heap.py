"""Free heap pages go back to the system between batches, within a time budget, changing nothing."""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest
import torch

import fanlens
import fanlens._heap as heap


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def fake_trim(monkeypatch):
    """A clock the test moves and a malloc_trim that costs `cost` seconds of it."""
    clock = _Clock()
    calls = []
    state = {"cost": 0.1}

    def trim(pad: int) -> int:
        calls.append((clock.t, pad))
        clock.t += state["cost"]
        return 1

    monkeypatch.setattr(heap, "_now", clock)
    monkeypatch.setattr(heap, "_MALLOC_TRIM", trim)
    monkeypatch.delenv("FANLENS_HEAP_TRIM", raising=False)
    return clock, calls, state


def test_trims_at_the_first_chance_then_only_when_the_budget_allows(fake_trim):
    clock, calls, state = fake_trim
    h = heap.HeapTrim(budget=0.02)  # a trim of 0.1 s may come once per 5 s
    clock.t += 1.0
    h.between_batches()
    assert [c[1] for c in calls] == [0] and h.calls == 1
    for _ in range(4):  # 4 s of batches after it: not yet
        clock.t += 1.0
        h.between_batches()
    assert h.calls == 1
    clock.t += 1.0  # 5 s since the last trim ended
    h.between_batches()
    assert h.calls == 2
    state["cost"] = 0.01  # a cheaper trim (after 5 s again) ...
    clock.t += 5.0
    h.between_batches()
    assert h.calls == 3
    clock.t += 0.49  # ... lets the next one come 0.5 s after it
    h.between_batches()
    assert h.calls == 3
    clock.t += 0.02
    h.between_batches()
    assert h.calls == 4
    # between the first and the last trim, the trims before the last took 2 % of the time at most
    assert (0.1 + 0.1 + 0.01) / (calls[-1][0] - calls[0][0]) <= 0.02 + 1e-9


def test_switched_off_by_the_environment_or_where_the_c_library_has_no_trim(fake_trim, monkeypatch):
    clock, calls, _ = fake_trim
    monkeypatch.setenv("FANLENS_HEAP_TRIM", "0")
    h = heap.HeapTrim()
    assert not h.enabled and not heap.trim_available()
    h.between_batches()
    monkeypatch.delenv("FANLENS_HEAP_TRIM")
    monkeypatch.setattr(heap, "_MALLOC_TRIM", None)
    h = heap.HeapTrim()
    h.between_batches()
    assert calls == [] and h.calls == 0


@pytest.mark.parametrize("value", ["off", "false", "", "2"])
def test_refuses_a_switch_value_other_than_0_or_1(value, monkeypatch, tmp_path, image_dir, capsys):
    """``FANLENS_HEAP_TRIM=off`` must not leave the trim on unnoticed."""
    from fanlens import cli

    from conftest import TINY

    monkeypatch.setenv("FANLENS_HEAP_TRIM", value)
    with pytest.raises(fanlens.FanlensError, match=r"FANLENS_HEAP_TRIM must be one of \('0', '1'\)"):
        heap.HeapTrim()
    code = cli.main(["spectrum", "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "o"),
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("fanlens: error:")] == [
        f"fanlens: error: FANLENS_HEAP_TRIM must be one of ('0', '1'). Got {value!r} instead."]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("budget", [0, -0.1, 1.5])
def test_refuses_a_budget_outside_zero_to_one(budget):
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\], got"):
        heap.HeapTrim(budget=budget)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_finds_glibc_malloc_trim_on_linux():
    try:
        ctypes.CDLL(None).gnu_get_libc_version
    except AttributeError:
        pytest.skip("not glibc")
    assert heap._MALLOC_TRIM is not None
    assert heap._MALLOC_TRIM(0) in (0, 1)


def test_every_streamed_batch_may_trim_and_the_numbers_stay_the_same(tiny_vit, fake_trim, monkeypatch):
    clock, calls, state = fake_trim
    state["cost"] = 0.0  # free trims: after every batch
    x = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    spec, probe = fanlens.analyze(tiny_vit, x, sigmas=(0.1,), batch_size=2, progress=False)
    assert len(calls) == 2  # between the 3 batches
    monkeypatch.setenv("FANLENS_HEAP_TRIM", "0")
    spec2, probe2 = fanlens.analyze(tiny_vit, x, sigmas=(0.1,), batch_size=2, progress=False)
    assert len(calls) == 2
    np.testing.assert_array_equal(spec2.count_mean, spec.count_mean)
    np.testing.assert_array_equal(probe2.mean, probe.mean)
