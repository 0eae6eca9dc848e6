"""The execution policy: cores, load, thread counts, applied and restored, recorded in the provenance."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fanlens import execution
from fanlens._validation import FanlensError
from fanlens.cli import main

from conftest import TINY


def _write(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


def test_the_cgroup_quota_caps_the_cores(tmp_path, monkeypatch):
    # cgroup v2: the process's own group
    _write(tmp_path, "proc/self/cgroup", "0::/user.slice/job\n")
    _write(tmp_path, "sys/fs/cgroup/user.slice/job/cpu.max", "150000 100000\n")
    assert execution._cgroup_quota(tmp_path) == 1.5
    _write(tmp_path, "sys/fs/cgroup/user.slice/job/cpu.max", "max 100000\n")
    assert execution._cgroup_quota(tmp_path) is None
    # cgroup v1
    v1 = tmp_path / "v1"
    _write(v1, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "300000\n")
    _write(v1, "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    assert execution._cgroup_quota(v1) == 3.0
    _write(v1, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n")
    assert execution._cgroup_quota(v1) is None
    assert execution._cgroup_quota(tmp_path / "nothing") is None
    # affinity 8 CPUs, quota 2.5 cores: 2 (rounded down); quota 0.3: still 1
    monkeypatch.setattr(execution, "_affinity", lambda: set(range(8)))
    for quota, cores in ((2.5, 2), (0.3, 1), (None, 8), (16.0, 8)):
        monkeypatch.setattr(execution, "_cgroup_quota", lambda q=quota: q)
        assert execution.available_cores() == cores


def _spinner(nice: int, new_session: bool = False) -> subprocess.Popen:
    code = f"import os, time\nos.nice({nice})\nt = time.time()\nwhile time.time() - t < 20: pass\n"
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=new_session)


_AUTOGROUPS = execution._autogroups_on() and execution._autogroup("self") is not None
CASES = [(0, False, True), (19, False, False)]
if _AUTOGROUPS:  # a niced process of another session competes as its own group: nice does not make it yield
    CASES.append((19, True, True))


@pytest.mark.parametrize("nice, new_session, counted", CASES)
def test_the_load_counts_other_processes_at_our_priority_and_not_niced_ones(nice, new_session, counted):
    base = execution.busy_elsewhere(0.3)
    assert base is not None and 0 <= base <= execution.available_cores()
    p = _spinner(nice, new_session)
    try:
        time.sleep(0.3)  # started and spinning
        load = execution.busy_elsewhere(0.5)
    finally:
        p.kill()
        p.wait()
    if counted:  # one spinning process: about one core more (it shares the machine with the rest)
        assert load - base >= 0.5, (base, load)
    else:
        assert load - base <= 0.3, (base, load)


@pytest.mark.parametrize("load, cores, per_node, threads", [
    (0.0, 2, 1, 2), (0.05, 2, 1, 2), (1.0, 2, 1, 1), (1.8, 2, 1, 1), (2.0, 2, 1, 1),
    (0.4, 8, 1, 8), (3.0, 8, 1, 5), (0.0, 8, 4, 2), (7.9, 8, 4, 1), (None, 4, 1, 4),
])
def test_auto_threads_are_the_free_cores(monkeypatch, load, cores, per_node, threads):
    monkeypatch.delenv(execution.ENV_THREADS, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
    monkeypatch.setattr(execution, "available_cores", lambda: cores)
    monkeypatch.setattr(execution, "busy_elsewhere", lambda seconds: load)
    pol = execution.decide()
    assert (pol.threads, pol.source, pol.cores, pol.load, pol.processes_per_node) == (
        threads, "auto", cores, load, per_node)
    assert pol.interop_threads == 1 and pol.loader_workers == 0


def test_threads_set_by_the_user_win_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setattr(execution, "busy_elsewhere", lambda seconds: pytest.fail("sampled although set"))
    monkeypatch.setenv(execution.ENV_THREADS, "3")
    assert (execution.decide().threads, execution.decide().source) == (3, "FANLENS_THREADS")
    assert (execution.decide(1, param="--threads").threads, execution.decide("1", param="--threads").source) == (
        1, "--threads")
    monkeypatch.setenv(execution.ENV_THREADS, "auto")
    monkeypatch.setattr(execution, "busy_elsewhere", lambda seconds: 0.0)
    assert execution.decide().source == "auto"
    for bad in (0, -1, "abc", "1.5", 1.5, True, execution.MAX_THREADS + 1, ""):
        with pytest.raises(FanlensError, match=r"--threads must be a whole number of threads from 1 to 1024, "
                                               r"or 'auto'\. Got"):
            execution.decide(bad, param="--threads") if bad != "" else execution.parse_threads(bad, "--threads")
    monkeypatch.setenv(execution.ENV_THREADS, "many")
    with pytest.raises(FanlensError, match="FANLENS_THREADS must be a whole number .* Got 'many'"):
        execution.decide()


def test_the_policy_is_applied_to_torch_and_blas_and_restored():
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    blas_before = [i["num_threads"] for i in threadpool_info()]
    with execution.policy(1) as pol:
        assert torch.get_num_threads() == 1 and pol.threads == 1
        assert all(i["num_threads"] == 1 for i in threadpool_info())
        assert execution.record()["threads"] == 1 and execution.record()["source"] == "threads"
    assert torch.get_num_threads() == before
    assert [i["num_threads"] for i in threadpool_info()] == blas_before
    assert execution.record()["source"] == "caller" and execution.record()["threads"] == before


def test_results_record_the_policy_they_ran_under(image_dir, tmp_path, capsys, monkeypatch):
    import fanlens

    with execution.policy(1):
        res = fanlens.spectrum(TINY, image_dir, progress=False)
    assert res.provenance.execution["threads"] == 1 and res.provenance.execution["source"] == "threads"
    res.save(tmp_path / "r")
    assert fanlens.load(tmp_path / "r").provenance.execution == res.provenance.execution
    # the command line: auto (sampled) when neither --threads nor FANLENS_THREADS is set
    monkeypatch.delenv(execution.ENV_THREADS)
    assert main(["spectrum", "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "o" / "manifest.json").read_text())["provenance"]["execution"]
    assert rec["source"] == "auto" and rec["load"] is not None and 1 <= rec["threads"] <= rec["cores"]
    assert torch.get_num_threads() == int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    assert main(["spectrum", "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "o2"),
                 "--threads", "0"]) == 2
    assert "--threads must be a whole number of threads from 1 to 1024, or 'auto'. Got '0'" in capsys.readouterr().err


def test_the_command_sleeps_while_waiting_and_the_library_leaves_the_environment_alone(image_dir, tmp_path,
                                                                                        monkeypatch, capsys):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", execution.ENV_THREADS)}
    r = subprocess.run([sys.executable, "-m", "fanlens.cli", "spectrum", "--model", TINY, "--images", str(image_dir),
                        "--out", str(tmp_path / "o"), "--threads", "1", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "o" / "manifest.json").read_text())["provenance"]["execution"]
    assert rec["omp_wait_policy"] == "PASSIVE" and rec["threads"] == 1 and rec["source"] == "--threads"
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert rec["memory"] == ("glibc: keeps up to 512 MiB freed, heap blocks up to 32 MiB" if glibc else "default")
    r = subprocess.run([sys.executable, "-c", "import os, fanlens; print(os.environ.get('OMP_WAIT_POLICY'), "
                        "fanlens.execution.record()['memory'])"], env=env, capture_output=True, text=True, timeout=300)
    assert r.stdout.split() == ["None", "default"], r.stderr  # the library leaves the allocator alone
    # FANLENS_KEEP_FREED_MEMORY=0: the command (argv[0] "fanlens") keeps glibc's defaults
    r = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['fanlens']; import fanlens; "
                        "print(fanlens.execution.record()['memory'])"],
                       env={**env, execution.ENV_KEEP_FREED: "0"}, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "default", r.stderr
    monkeypatch.setenv(execution.ENV_KEEP_FREED, "yes")  # any other value: one line, before any work
    assert main(["spectrum", "--model", TINY, "--images", str(image_dir), "--out", str(tmp_path / "k"),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fanlens: error: FANLENS_KEEP_FREED_MEMORY must be one of ('0', '1'). Got 'yes' instead."]
    assert not (tmp_path / "k").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_freed_memory_is_reused_instead_of_faulted_in_again():
    """After keep_freed_memory(), a freed 8 MB block comes back without new page faults (minor faults
    counted by the kernel: without it, 20 such blocks cost about 4,000 faults here, as glibc maps and
    zeroes blocks afresh; with it, none)."""
    code = ("import resource, torch, sys; from fanlens import execution\n"
            "def faults():\n"
            "    torch.empty(2 << 20).fill_(1.0)\n"  # warm: the block exists and is freed
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    for _ in range(20): torch.empty(2 << 20).fill_(1.0)\n"
            "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
            "a = faults(); ok = execution.keep_freed_memory(); b = faults()\n"
            "print(a, ok, b, execution.record()['memory'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    a, ok, b, *memory = r.stdout.split()
    assert ok == "True" and " ".join(memory).startswith("glibc: keeps up to 512 MiB"), r.stderr
    assert int(a) > 1000 and int(b) < 100, (a, b)
