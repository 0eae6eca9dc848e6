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


def test_nested_one_thread_keeps_the_callers_count(two_threads):
    from fanlens._threads import _CALLER_THREADS

    with one_thread():
        with one_thread():
            assert torch.get_num_threads() == 1
            assert _CALLER_THREADS.get() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and _CALLER_THREADS.get() is None


def test_workers_never_change_the_process_wide_thread_count(two_threads, monkeypatch):
    """torch.set_num_threads is process-wide (and sets MKL's count with it): only the calling thread may
    change it, never a worker while another is inside a decomposition. The spectrum (split over workers, each
    running eigvalsh, itself a split_rows: nested, so it runs inline) and a corruption (for_chunks) call it
    from the main thread only, once down and once back, and the workers see one thread each."""
    import threading

    import fanlens.spectral as sp
    from fanlens import corruptions as C

    calls: list[tuple[str, int]] = []
    real = torch.set_num_threads

    def spy(n: int) -> None:
        calls.append((threading.current_thread().name, int(n)))
        real(n)

    monkeypatch.setattr(torch, "set_num_threads", spy)
    inside: list[int] = []
    real_eig = sp._eigvalsh_descending

    def eig(m):
        inside.append(torch.get_num_threads())
        return real_eig(m)

    monkeypatch.setattr(sp, "_eigvalsh_descending", eig)
    a = sp.affinity(torch.randn(12, 40, 16, generator=torch.Generator().manual_seed(0)))
    sp.spectrum(a)
    C.corrupt(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), "gaussian_blur", 2)
    main = threading.main_thread().name
    assert calls == [(main, 1), (main, 2), (main, 1), (main, 2)]
    assert inside and set(inside) == {1}


@pytest.mark.parametrize("threads,chunk_matrices", [(1, None), (2, None), (3, None), (1, 3), (2, 2)])
def test_split_work_gives_identical_results_on_every_thread_count(threads, chunk_matrices, monkeypatch):
    """Decompositions, threshold counts and clustering are computed matrix by matrix: splitting
    the batch over worker threads, or in chunks of a few matrices, changes no bit of the results."""
    import threading

    import fanlens._threads as th
    import fanlens.spectral as sp

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(7, 4, 24, generator=g)
    lab = torch.randint(0, 4, (7, 50), generator=g)
    x = torch.gather(centres, 1, lab[..., None].expand(-1, -1, 24)) + 0.7 * torch.randn(7, 50, 24, generator=g)
    a = sp.affinity(x)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref_ev = sp.eigvalsh(a)
        ref_spec = sp.spectrum(a)
        ref_cnt = sp.threshold_count(a, "rel_threshold")
        ref_lab, ref_k = sp.spectral_clustering(a, None, seed=3, indices=list(range(10, 17)))
        ref_dim = [sp.dimension(x, r) for r in sp.DIMENSION_RULES]
        torch.set_num_threads(threads)
        workers = []
        real = th._pool

        def spy(n):
            workers.append(n)
            return real(n)

        monkeypatch.setattr(th, "_pool", spy)
        names, sizes = [], []
        real_eigvalsh = sp._eigvalsh_descending
        monkeypatch.setattr(sp, "_eigvalsh_descending",
                            lambda m: names.append(threading.current_thread().name) or sizes.append(len(m))
                            or real_eigvalsh(m))
        if chunk_matrices:  # a chunk bound of that many affinities (float32)
            monkeypatch.setattr(th, "CHUNK_BYTES", chunk_matrices * 50 * 50 * 4)
        assert torch.equal(sp.eigvalsh(a), ref_ev)
        spec = sp.spectrum(a)
        assert torch.equal(spec.affinity, ref_spec.affinity) and torch.equal(spec.normalized, ref_spec.normalized)
        assert torch.equal(sp.threshold_count(a, "rel_threshold"), ref_cnt)
        lab2, k2 = sp.spectral_clustering(a, None, seed=3, indices=list(range(10, 17)))
        assert torch.equal(lab2, ref_lab) and torch.equal(k2, ref_k)
        for r, ref in zip(sp.DIMENSION_RULES, ref_dim):
            assert torch.equal(sp.dimension(x, r), ref), r
        assert torch.get_num_threads() == threads  # the caller's setting, untouched
        sizes.clear()
        sp.eigvalsh(a)
        assert sum(sizes) == 7
        if chunk_matrices:
            assert max(sizes) <= chunk_matrices and len(sizes) == -(-7 // chunk_matrices)
        else:
            assert len(sizes) == threads
    finally:
        torch.set_num_threads(before)
    if threads == 1:
        assert workers == [] and all(n == threading.current_thread().name for n in names)
    else:
        assert workers and set(workers) == {threads}
        assert any(n.startswith("fanlens") for n in names)  # chunks ran on the worker threads


def test_split_work_passes_errors_through(two_threads):
    from fanlens._threads import split_rows

    def boom(x):
        raise ValueError("inside a worker")

    with pytest.raises(ValueError, match="inside a worker"):
        split_rows(boom, torch.zeros(4, 2))
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_split_work_in_a_forked_child_does_not_wait_on_the_parents_threads(two_threads):
    """A child forked after the worker threads exist has none of them: it makes its own."""
    import multiprocessing as mp

    import fanlens.spectral as sp

    a = sp.affinity(torch.rand(6, 20, 8, generator=torch.Generator().manual_seed(0)))
    ref = sp.eigvalsh(a)  # the parent's workers now exist
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_child_eigvalsh, (a,)).get(timeout=60)
    assert torch.equal(got, ref)


def _child_eigvalsh(a):
    import fanlens.spectral as sp

    torch.set_num_threads(2)
    return sp.eigvalsh(a)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_map_items_keeps_the_order_and_runs_nested_work_inline(threads):
    """map_items returns fn's outputs in the items' order, computed on worker threads with one intra-op
    thread each when the caller has several (the same bits as one after the other), runs the split work
    nested in fn on its own worker (no second pool), passes errors through and restores the caller's count."""
    import threading

    import fanlens.spectral as sp
    from fanlens._threads import map_items

    g = torch.Generator().manual_seed(0)
    mats = [sp.affinity(torch.randn(3, 30, 8, generator=g)) for _ in range(5)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ref = [sp.eigvalsh(m) for m in mats]
    torch.set_num_threads(threads)
    seen: list[tuple[str, int]] = []
    try:
        def fn(m):
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return sp.eigvalsh(m)  # a split_rows inside: inline on this worker

        got = map_items(fn, mats)
        assert len(got) == 5 and all(torch.equal(a, b) for a, b in zip(got, ref))
        assert all(k == 1 for _name, k in seen)
        assert {n.startswith("fanlens") for n, _k in seen} == ({False} if threads == 1 else {True})
        assert torch.get_num_threads() == threads
        assert map_items(fn, []) == []

        def boom(i):
            if i == 3:
                raise ValueError("item 3")
            return i

        with pytest.raises(ValueError, match="item 3"):
            map_items(boom, range(6))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
