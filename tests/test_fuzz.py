"""Property-based fuzzing of the command line (hypothesis): whatever the arguments, file names or image
files, a command ends with exit 0 and finite results, or exit 2 and one error line — never a traceback,
a hang or a file outside its ``--out``.

Properties: generated option values for every subcommand, file names, image files, and damaged
checkpoints (bytes flipped, cut, inserted; metadata or arrays edited into well-formed files).

Profiles: ``ci`` (the default: a bounded, derandomised example budget that keeps the suite inside CI's
time) and ``long`` (``FANLENS_FUZZ_PROFILE=long pytest tests/test_fuzz.py -s``: 300 examples per
property, or ``FANLENS_FUZZ_EXAMPLES=N``). Each property prints how many examples it ran.
"""

from __future__ import annotations

import argparse
import math
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fanlens import cli

from conftest import CheckpointAcc, TINY

settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=int(os.environ.get("FANLENS_FUZZ_EXAMPLES", "300")), deadline=None,
                          database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("FANLENS_FUZZ_PROFILE", "ci"))

HOSTILE = st.one_of(
    st.sampled_from(["", "-1", "0", "1", "2", "nan", "inf", "-inf", "1e9", "1e400", "0.5", "3.7", "a,b", ",,", "0,0",
                     "1,2,3", "..", "../..", "<script>", "%s%n", "\u03c3", "\u00e9\u00e8", "zoo:vit", "zoo:nope",
                     "all", "none", "-", "--", "5,0", "999999999999999999999", "\u00b2", "\uff13", "\u0663"]),
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30),
)
COUNTS: dict[str, int] = {}


def _two_images(root: Path) -> Path:
    """A folder of two small PNGs under ``root``."""
    from PIL import Image

    imgs = root / "imgs"
    imgs.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (60 * i, 120, 200)).save(imgs / f"im{i}.png")
    return imgs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    imgs = _two_images(root)
    run = root / "run"
    assert cli.main(["spectrum", "--model", TINY, "--images", str(imgs), "--out", str(run), "--no-progress"]) == 0
    return root, imgs, run


def _base(cmd: str, imgs: Path, run: Path, out: Path) -> list[str]:
    common = ["--model", TINY, "--images", str(imgs), "--out", str(out), "--no-progress"]
    return {
        "spectrum": ["spectrum", *common, "--no-figure"],
        "probe": ["probe", *common, "--no-figure", "--sigmas", "0.1"],
        "groups": ["groups", *common, "--no-figure", "--n-clusters", "2"],
        "robustness": ["robustness", *common, "--no-figure", "--corruptions", "gaussian_noise", "--severities", "1"],
        "reproduce": ["reproduce", *common, "--skip", "groups,robustness", "--sigmas", "0.1"],
        "report": ["report", str(run), "--out", str(out / "r.html")],
        "train-zoo": ["train-zoo", "cnn", "--steps", "1", "--pool", "8", "--val-size", "4", "--out", str(out),
                      "--no-progress"],
        "training-dynamics": ["training-dynamics", str(imgs), "--out", str(out), "--no-progress"],
    }[cmd]


def _options(cmd: str) -> list[tuple[str, bool]]:
    """(option, takes a value) of a subcommand, from the parser itself."""
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    out = []
    for a in sub._actions:
        for o in a.option_strings:
            if o.startswith("--") and o not in ("--help", "--out", "--into-package"):
                out.append((o, a.nargs != 0))
    return out


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    if os.environ.get("FANLENS_FUZZ_LOG"):
        with open(os.environ["FANLENS_FUZZ_LOG"], "a") as f:
            f.write(repr(argv) + "\n")
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    got = capsys.readouterr()
    return code, got.out, got.err


def _check(code: int, out: str, err: str, argv: list[str]) -> None:
    assert code in (0, 2), (argv, code, err[-500:])
    assert "Traceback" not in err, (argv, err[-800:])
    if code == 2:
        errors = [ln for ln in err.splitlines() if ": error:" in ln]
        assert len(errors) == 1, (argv, err[-800:])
    else:  # no non-finite value printed as a result
        assert not {t.lower().strip(",;") for t in out.split()} & {"nan", "inf", "-inf"}, (argv, out)


def _no_stray_files(root: Path, before: set[str]) -> None:
    now = {p.name for p in root.iterdir()}
    assert now - before <= {p for p in now if p.startswith("out-")}, now - before


LONG_WHEN_LARGE = {"--steps", "--pool", "--val-size", "--n-images", "--n-noise", "--ig-steps", "--batch-size",
                   "--max-images", "--n-eig", "--token-budget", "--knn", "--n-clusters", "--checkpoint-every"}
COMMANDS = ["spectrum", "probe", "groups", "robustness", "reproduce", "report", "train-zoo", "training-dynamics"]


@given(data=st.data())
def test_generated_arguments_end_in_exit_0_or_one_error_line(workspace, capsys, data, monkeypatch):
    root, imgs, run = workspace
    monkeypatch.chdir(root)
    before = {p.name for p in root.iterdir()}
    cmd = data.draw(st.sampled_from(COMMANDS), label="command")
    opt, takes = data.draw(st.sampled_from(_options(cmd)), label="option")
    value = data.draw(HOSTILE, label="value") if takes else None
    if opt in LONG_WHEN_LARGE and value is not None and value.strip().lstrip("+").isascii() and value.strip().lstrip("+").isdigit() and int(value) > 64:
        value = "1000000000000"  # a legitimately long run is not what this property is about: absurd, or small
    out = root / f"out-{uuid.uuid4().hex[:8]}"
    argv = _base(cmd, imgs, run, out) + ([opt, value] if takes else [opt])
    code, o, e = _run(argv, capsys)
    _check(code, o, e, argv)
    _no_stray_files(root, before)
    COUNTS["arguments"] = COUNTS.get("arguments", 0) + 1


NAME_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00")


@given(name=st.text(NAME_CHARS, min_size=1, max_size=120).filter(lambda s: s not in (".", "..")))
def test_generated_file_names_are_analysed_or_refused_in_one_line(tmp_path_factory, capsys, name):
    from PIL import Image

    root = tmp_path_factory.mktemp("names")
    folder = root / "imgs"
    folder.mkdir()
    fname = (name + ".png")[-250:]
    try:
        Image.new("RGB", (40, 40), (10, 200, 30)).save(folder / fname)
    except (OSError, ValueError):  # a name the file system itself refuses
        return
    argv = ["spectrum", "--model", TINY, "--images", str(folder), "--out", str(root / "out"), "--no-progress"]
    code, o, e = _run(argv, capsys)
    _check(code, o, e, argv)
    if code == 0:
        report = cli.main(["report", str(root / "out")])
        capsys.readouterr()
        assert report == 0
        page = (root / "out" / "report.html").read_text()
        assert page.count("<script") == 1 + int("id='viewer-data'" in page)  # no name opens a script
    COUNTS["file names"] = COUNTS.get("file names", 0) + 1


@given(size=st.tuples(st.integers(1, 70), st.integers(1, 70)), mode=st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK",
                                                                                        "I;16", "1", "F"]),
       fmt=st.sampled_from(["PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP"]), cut=st.sampled_from([None, 0.5, 0.1, 0.0]),
       frames=st.integers(1, 3))
def test_generated_image_files_are_analysed_or_refused_in_one_line(tmp_path_factory, capsys, size, mode, fmt, cut,
                                                                    frames):
    from PIL import Image

    root = tmp_path_factory.mktemp("files")
    folder = root / "imgs"
    folder.mkdir()
    path = folder / f"x.{fmt.lower()}"
    ims = [Image.new(mode, size) for _ in range(frames)]
    try:
        if frames > 1 and fmt in ("GIF", "TIFF", "WEBP", "PNG"):
            ims[0].save(path, format=fmt, save_all=True, append_images=ims[1:])
        else:
            ims[0].save(path, format=fmt)
    except (OSError, ValueError, KeyError):  # PIL cannot write this mode in this format
        return
    if cut is not None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])
    argv = ["probe", "--model", TINY, "--images", str(folder), "--out", str(root / "out"), "--sigmas", "0.1",
            "--no-progress"]
    code, o, e = _run(argv, capsys)
    _check(code, o, e, argv)
    if code == 0:
        import csv

        rows = list(csv.DictReader(open(root / "out" / "results.csv")))
        assert rows and all(math.isfinite(float(r["value"])) for r in rows if r["value"] not in ("",))
    COUNTS["image files"] = COUNTS.get("image files", 0) + 1



JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                           | st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(
                               max_size=5), c, max_size=3), max_leaves=6)


BYTE_DAMAGE = ("flip", "cut", "insert", "append")


def _damage_bytes(data, raw: bytes, kind: str) -> bytes:
    """``raw`` with bytes flipped (up to 8 positions), cut short, or bytes inserted or appended."""
    if kind == "flip":
        b = bytearray(raw)
        for at, v in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), min_size=1,
                                        max_size=8), label="edits"):
            b[at] = v
        return bytes(b)
    if kind == "cut":
        return raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")]
    at = data.draw(st.integers(0, len(raw)), label="at") if kind == "insert" else len(raw)
    return raw[:at] + data.draw(st.binary(min_size=1, max_size=64), label="bytes") + raw[at:]


@given(data=st.data())
def test_generated_checkpoint_damage_is_refused_in_one_line_or_changes_nothing(tmp_path_factory, data):
    """A checkpoint damaged in any way (bytes flipped, cut, inserted or appended; its metadata or
    arrays edited into a well-formed file) either resumes exactly what was saved (the damage did not
    touch what the digest covers) or is refused with one FanlensError line that says how to start
    over: never another exception, never other numbers."""
    import io
    import json

    from fanlens import FanlensError
    from fanlens._output import RunState

    root = tmp_path_factory.mktemp("ckpt")
    key = {"model": "m", "images": ["a", "b"], "params": {"sigmas": [0.1]}}
    RunState(root, key).save([CheckpointAcc([1.0, 2.0, 3.0, 4.0])], 5)
    path = root / "rank0-of-1.npz"
    raw = path.read_bytes()
    kind = data.draw(st.sampled_from(["flip", "cut", "insert", "append", "meta", "array"]), label="damage")
    if kind in BYTE_DAMAGE:
        damaged = _damage_bytes(data, raw, kind)
    else:  # edited with numpy: a well-formed npz whose content differs
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(bytes(arrays["__meta__"]).decode())
        if kind == "meta":
            field = data.draw(st.sampled_from(sorted(meta)), label="field")
            meta[field] = data.draw(JSON_VALUES, label="value")
        else:
            name = data.draw(st.sampled_from(sorted(k for k in arrays if k != "__meta__")), label="array")
            arrays[name] = np.asarray(data.draw(st.lists(st.floats(allow_nan=True), max_size=6), label="values"))
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        damaged = buf.getvalue()
    path.write_bytes(damaged)
    acc = CheckpointAcc()
    try:
        done = RunState(root, key, resume=True).restore([acc])
    except FanlensError as e:
        msg = str(e)
        assert "\n" not in msg and "to start over" in msg, msg
    else:  # accepted: exactly what was saved
        assert done == 5 and acc.n == 3 and acc.total.tolist() == [1.0, 2.0, 3.0, 4.0], (kind, done, acc.total)
    COUNTS["checkpoint damage"] = COUNTS.get("checkpoint damage", 0) + 1


@pytest.fixture(scope="module")
def groups_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    imgs = _two_images(root)
    run = root / "run"
    assert cli.main(["groups", "--model", TINY, "--images", str(imgs), "--out", str(run), "--n-clusters", "2",
                     "--colour", "spectral", "--no-progress", "--no-figure"]) == 0
    assert (run / "arrays.npz").is_file() and (run / "colours.npz").is_file()
    return run


@given(data=st.data())
def test_generated_damage_to_a_runs_arrays_is_reported_or_refused_in_one_line(groups_run, tmp_path_factory, capsys,
                                                                                data):
    """A run folder whose arrays.npz or colours.npz was damaged: ``fanlens report`` writes the page
    (colours fall back to the default palette, with a warning) or ends in one error line."""
    import shutil
    import warnings

    target = data.draw(st.sampled_from(["arrays.npz", "colours.npz"]), label="file")
    run = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(groups_run, run)
    (run / ".fanlens.lock").unlink(missing_ok=True)
    path = run / target
    path.write_bytes(_damage_bytes(data, path.read_bytes(), data.draw(st.sampled_from(BYTE_DAMAGE), label="damage")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, o, e = _run(["report", str(run)], capsys)
    _check(code, o, e, ["report", str(run), target])
    COUNTS["damaged run files"] = COUNTS.get("damaged run files", 0) + 1


@pytest.mark.parametrize("target,damage,code", [("colours.npz", "cut", 0), ("colours.npz", "method", 0),
                                               ("arrays.npz", "method", 2), ("arrays.npz", "cut", 2)])
def test_damaged_run_files_found_by_the_fuzz_suite(groups_run, tmp_path, capsys, target, damage, code):
    """The cases the property found: a damaged colours.npz (zipfile's NotImplementedError, a cut file)
    used to end the report in a traceback; now the maps take the default colours, with a warning. A
    damaged arrays.npz ends in one error line."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(groups_run, run)
    path = run / target
    raw = path.read_bytes()
    if damage == "cut":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # the first central-directory entry's compression method
        at = raw.index(b"PK\x01\x02") + 10
        path.write_bytes(raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:])
    if code == 0:
        with pytest.warns(UserWarning, match="colours.npz' cannot be read .*default colours"):
            got, o, e = _run(["report", str(run)], capsys)
        assert got == 0 and (run / "report.html").stat().st_size > 1000, e
    else:
        got, o, e = _run(["report", str(run)], capsys)
        assert got == 2 and "holds a damaged result" in e and len(e.strip().splitlines()) == 1, e


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning", "ignore:Truncated File Read:UserWarning")
@pytest.mark.parametrize("size,frames,cut", [((1, 1), 2, 0.5), ((9, 7), 3, 0.5), ((1, 1), 2, 0.3)])
def test_damaged_multi_page_tiffs_found_by_the_fuzz_suite(tmp_path, capsys, size, frames, cut):
    """A cut multi-page TIFF made Pillow raise TypeError('Missing dimensions') (from a KeyError) while
    counting its pages: a traceback until image files caught every error Pillow's parsers raise."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    ims = [Image.new("RGB", size) for _ in range(frames)]
    ims[0].save(folder / "x.tiff", format="TIFF", save_all=True, append_images=ims[1:])
    data = (folder / "x.tiff").read_bytes()
    (folder / "x.tiff").write_bytes(data[: int(len(data) * cut)])
    code, o, e = _run(["probe", "--model", TINY, "--images", str(folder), "--out", str(tmp_path / "out"),
                       "--sigmas", "0.1", "--no-progress"], capsys)
    assert code == 2 and "x.tiff' cannot be read" in e and "Traceback" not in e, e


def test_fuzz_counts_are_reported():
    """Prints how many examples each property ran (run with -s)."""
    print("fuzz examples run:", COUNTS)
    assert all(v > 0 for v in COUNTS.values())
