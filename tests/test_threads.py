"""The one-thread policy for small work: used inside the analyses, never left behind."""

from __future__ import annotations

import pytest
import torch

import fanlens
from fanlens._threads import one_thread


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_inside_and_restored_after_errors(two_threads):
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError):
        with one_thread():
            raise ValueError("inside")
    assert torch.get_num_threads() == 2


def test_analyses_run_their_statistics_on_one_thread_and_restore_the_setting(two_threads, tiny_vit, monkeypatch):
    import fanlens.spectral as sp

    seen = []
    real = sp.count_significant

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(sp, "count_significant", spy)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    spec, probe = fanlens.analyze(tiny_vit, x, sigmas=(0.1,), rules=("rel_threshold",), progress=False)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    fanlens.group_tokens(tiny_vit, x, n_clusters=2, progress=False)
    assert torch.get_num_threads() == 2
    # the numbers do not depend on the policy: the same counts with the statistics on 2 threads
    import fanlens.analysis as an
    import contextlib

    monkeypatch.setattr(an, "one_thread", contextlib.nullcontext)
    spec2, probe2 = fanlens.analyze(tiny_vit, x, sigmas=(0.1,), rules=("rel_threshold",), progress=False)
    assert (spec2.count_mean == spec.count_mean).all()
    torch.testing.assert_close(torch.from_numpy(probe2.mean), torch.from_numpy(probe.mean), rtol=1e-5, atol=1e-7)
