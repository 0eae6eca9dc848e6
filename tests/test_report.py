"""fanlens.report: one self-contained HTML page per output folder, checked as text and in a real
(headless) Chromium: no console errors, the block viewer steps, a screenshot that shows the page."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

import fanlens
from fanlens import FanlensError

from conftest import write_images


@pytest.fixture
def groups_folder(tmp_path, tiny_vit):
    """A groups run with spectral colours, as `fanlens groups --colour spectral` writes it."""
    paths = write_images(tmp_path / "imgs", 3, size=(64, 64))
    out = tmp_path / "run"
    res = fanlens.group_tokens(tiny_vit, paths, n_clusters=2, progress=False)
    res.save(out)
    fanlens.spectral_colouring(tiny_vit, paths, progress=False).save_npz(out / "colours.npz")
    spec = fanlens.spectrum(tiny_vit, paths, rules=("rel_threshold", "twonn"), progress=False)
    spec.save(tmp_path / "spec")
    return out, res


def _esc(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def _viewer_data(page: str) -> list:
    m = re.search(r"<script id='viewer-data' type='application/json'>(.*?)</script>", page, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def test_report_is_self_contained_with_viewer_tables_and_provenance(groups_folder, tmp_path):
    out, res = groups_folder
    path = fanlens.report(out)
    assert path == out / "report.html"
    page = path.read_text()
    # nothing fetched from elsewhere: no http(s) or protocol-relative sources, links or imports
    assert not re.search(r"(src|href)\s*=\s*['\"](https?:|//)", page) and "@import" not in page
    assert "<script src" not in page and "<link" not in page
    data = _viewer_data(page)
    assert len(data) == 1 and data[0]["blocks"] == ["blocks.0", "blocks.1", "blocks.2"]
    assert len(data[0]["images"]) == 3 and data[0]["images"][0]["k"] == [2, 2, 2]
    # each image is stored once, at its own size (64 px; shown 4x larger), and every block's groups as an
    # 8-bit palette PNG at the token grid's size whose pixels are the group labels
    from PIL import Image
    import io

    def decode(uri):
        assert uri.startswith("data:image/png;base64,")
        return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))

    assert (data[0]["width"], data[0]["height"]) == (256, 256)
    assert decode(data[0]["images"][0]["image"]).size == (64, 64)
    frame = decode(data[0]["images"][0]["groups"][1])
    labels = np.asarray(res.labels[1][0])
    assert frame.mode == "P" and frame.size == (labels.shape[1], labels.shape[0])
    np.testing.assert_array_equal(np.asarray(frame), labels % 8)
    assert len(data[0]["images"][2]["colours"]) == 3
    assert decode(data[0]["images"][2]["colours"][0]).size == (labels.shape[1], labels.shape[0])
    assert res.provenance.weights_sha256 is None or res.provenance.weights_sha256[:16] in page
    assert "fanlens report: groups" in page and _esc(res.provenance.model) in page
    # per-block table of a spectrum folder: the mean count of block 0 as in its results.csv
    spec_page = fanlens.report(tmp_path / "spec").read_text()
    rows = [r for r in csv.DictReader(open(tmp_path / "spec" / "results.csv"))
            if r["statistic"] == "mean" and r["block_index"] == "0" and r["rule"] == "twonn"]
    assert f"<td>{float(rows[0]['value']):.4g}</td>" in spec_page and ": dimension</h3>" in spec_page
    assert "id='viewer'" not in spec_page  # no groups there: no viewer


def test_report_refuses_overwrite_package_and_non_folders(groups_folder, tmp_path):
    out, _ = groups_folder
    fanlens.report(out)
    before = (out / "report.html").read_bytes()
    with pytest.raises(FanlensError, match="exists; pass overwrite"):
        fanlens.report(out)
    assert (out / "report.html").read_bytes() == before
    fanlens.report(out, overwrite=True, max_images=1)
    assert len(_viewer_data((out / "report.html").read_text())[0]["images"]) == 1
    with pytest.raises(FanlensError, match="fanlens output folder"):
        fanlens.report(tmp_path / "imgs")
    from fanlens._output import package_dir

    with pytest.raises(FanlensError, match="outside the installed fanlens package"):
        fanlens.report(out, out=package_dir() / "report.html")
    with pytest.raises(FanlensError, match="max_images must be"):
        fanlens.report(out, overwrite=True, max_images=0)


def test_report_cli(groups_folder, capsys):
    from fanlens import cli

    out, _ = groups_folder
    assert cli.main(["report", str(out)]) == 0
    assert f"wrote {out / 'report.html'}" in capsys.readouterr().out
    assert cli.main(["report", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


# --------------------------------------------------------------------------- in a real browser
def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_report_in_headless_chromium(groups_folder, tmp_path):
    browser = _browser()
    if browser is None:
        reason = ("no Chromium on this machine (.ci/install_browser installs Debian's chromium where apt-get "
                  "and root are available)")
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    out, _ = groups_folder
    page = fanlens.report(out)
    data = _viewer_data(page.read_text())
    url = page.resolve().as_uri()
    # the check itself catches console output: a page that logs an error and throws
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); throw new Error('kaboom');</script></body></html>")
    assert len(_console_lines(_chromium(browser, "--dump-dom", bad.as_uri()).stderr)) == 2
    # loads without console messages; stepping with the viewer's 'next' button changes the block shown
    first = _chromium(browser, "--dump-dom", url)
    assert first.returncode == 0 and _console_lines(first.stderr) == []
    assert "block 1 / 3: blocks.0" in first.stdout and 'data-viewer-block="0"' in first.stdout
    stepped = _chromium(browser, "--dump-dom", url + "#next=2")
    assert _console_lines(stepped.stderr) == []
    assert "block 3 / 3: blocks.2" in stepped.stdout and 'data-viewer-block="2"' in stepped.stdout
    shown = re.search(r'id="viewer-groups"[^>]*src="([^"]+)"|src="([^"]+)"[^>]*id="viewer-groups"', stepped.stdout)
    assert shown and (shown.group(1) or shown.group(2)) == data[0]["images"][0]["groups"][2]
    beyond = _chromium(browser, "--dump-dom", url + "#next=7")  # clamps at the last block
    assert 'data-viewer-block="2"' in beyond.stdout
    # a screenshot: not blank, the title drawn at the top, the viewer's coloured frames below it
    shot = tmp_path / "report.png"
    res = _chromium(browser, "--window-size=1200,900", f"--screenshot={shot}", url)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    px = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert px.shape[:2] == (900, 1200)
    assert px.std() > 20  # not a blank page
    assert "<title>fanlens report: groups" in first.stdout
    top = px[:120]
    assert (top.mean(-1) < 90).sum() > 500  # the dark heading text near the top
    sat = px.max(-1) - px.min(-1)
    assert (sat[150:700] > 80).sum() > 2000  # the coloured groups frame of the viewer
    print(f"screenshot: {shot}")


def test_report_title_lists_every_model_and_images_go_by_their_file_names(tmp_path):
    import json

    from fanlens.reporting import build_html, display_name

    assert display_name("/data/photos/cat_001.jpg") == "cat_001.jpg"
    assert display_name("C:\\data\\dog.png") == "dog.png"
    assert display_name("tensor[3]") == "batch[3]"
    assert display_name("synthetic:test:0:7") == "synthetic:test:0:7"
    man = {"kind": "reproduce", "runs": [{"label": "zoo:vit"}, {"label": "zoo:vit@random-init"}],
           "heads_runs": [{"label": "zoo:vit-h1"}, {"label": "zoo:vit-h8"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    title = build_html(tmp_path).split("</h1>")[0]
    assert all(m in title for m in ("zoo:vit,", "zoo:vit@random-init", "zoo:vit-h1", "zoo:vit-h8"))


def test_report_embeds_only_regular_files_of_the_run(groups_folder, tmp_path):
    """A link named *.png pointing anywhere, or a FIFO named *.png, is never read into the page."""
    import os
    import threading

    out, _res = groups_folder
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET-CONTENT-1234")
    (out / "leak.png").symlink_to(secret)
    (out / "sub").mkdir()
    (out / "sub" / "also.png").symlink_to(secret)
    os.mkfifo(out / "fifo.png")
    (out / "viewer").symlink_to(tmp_path / "spec", target_is_directory=True)  # a linked folder: not read
    done = []
    t = threading.Thread(target=lambda: done.append(fanlens.report(out)), daemon=True)
    t.start()
    t.join(60)
    assert done, "report hung on a FIFO named *.png"
    page = done[0].read_text()
    leaked = base64.b64encode(secret.read_bytes()).decode()
    assert leaked[:16] not in page and "leak.png" not in page and "fifo.png" not in page and "also.png" not in page
    # the run's own files are there
    assert len(_viewer_data(page)) == 1


def test_outside_strings_cannot_change_the_page_structure(tmp_path, tiny_vit):
    from fanlens.reporting import _script_json

    names = ["a<!--<script>x.png", "b&amp;<b>.png", "c\u2028'\"`.png"]
    paths = write_images(tmp_path / "imgs", 3, size=(64, 64))
    renamed = []
    for p, n in zip(paths, names):
        q = p.with_name(n)
        p.rename(q)
        renamed.append(str(q))
    out = tmp_path / "run"
    fanlens.group_tokens(tiny_vit, renamed, n_clusters=2, progress=False).save(out)
    page = fanlens.report(out).read_text()
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data block and the viewer's code
    assert "<!--" not in page
    assert [im["name"] for im in _viewer_data(page)[0]["images"]] == names
    for hostile in ("</script><script>alert(1)</script>", "<!--", "]]>", "\u2028"):
        s = _script_json({"name": hostile})
        assert "<" not in s and ">" not in s and json.loads(s)["name"] == hostile


def test_report_never_writes_over_its_own_inputs(groups_folder, tmp_path, capsys):
    from fanlens import cli

    out, _res = groups_folder
    before = (out / "manifest.json").read_bytes()
    for target in ("manifest.json", "arrays.npz", "results.csv"):
        with pytest.raises(FanlensError, match="must not replace a file of the folder it reports on"):
            fanlens.report(out, out=out / target, overwrite=True)
        assert cli.main(["report", str(out), "--out", str(out / target), "--overwrite"]) == 2
        assert "must not replace a file of the folder" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before
    link = tmp_path / "link.html"
    link.symlink_to(tmp_path / "elsewhere.html")
    with pytest.raises(FanlensError, match="or a link"):
        fanlens.report(out, out=link, overwrite=True)
    with pytest.raises(FanlensError, match="must be a file path, not a folder"):
        fanlens.report(out, out=tmp_path, overwrite=True)
    assert fanlens.report(out, out=out / "report.html").is_file()  # its own report: allowed
    assert fanlens.report(out, overwrite=True).is_file()


def test_report_stores_figures_at_the_size_shown_and_the_claims_grid_compactly(tmp_path):
    """A figure wider than the page's column is stored at the column's width (WebP where smaller);
    the headline verdicts are a table, and every row of claims.csv is in the page as compact data
    (columns once) behind a collapsed table, exactly as in the file."""
    import io

    from PIL import Image

    from fanlens.reporting import SHOWN_WIDTH

    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "reproduce"}))
    rng = np.random.default_rng(0)
    wide = np.full((300, 2 * SHOWN_WIDTH, 3), 255, np.uint8)
    wide[100:200, :, :] = rng.integers(0, 255, (1, 2 * SHOWN_WIDTH, 3), dtype=np.uint8)  # a striped plot
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(wide[:, :400]).save(tmp_path / "narrow.png")
    cols = ["sigma", "claim", "models", "value", "verdict", "note"]
    rows = [[str(0.05 * (i + 1)), f"C{i % 4 + 1}", "zoo:vit", f"{rng.normal():.6f}", ("holds", "contradicted")[i % 2],
             "a <b>note</b> & more" if i == 3 else ""] for i in range(30)]
    with open(tmp_path / "claims.csv", "w", newline="") as f:
        csv.writer(f).writerows([cols] + rows)
    with open(tmp_path / "claims_headline.csv", "w", newline="") as f:
        csv.writer(f).writerows([["claim", "models", "verdict"], ["C1", "zoo:vit", "depends on the specification"]])
    page = fanlens.report(tmp_path).read_text()
    uris = dict(re.findall(r"<img alt='([^']+)' loading='lazy' decoding='async' src='([^']+)'>", page))
    assert set(uris) == {"wide.png", "narrow.png"}
    sizes = {}
    for name, uri in uris.items():
        mime, b64 = uri[len("data:"):].split(";base64,")
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        sizes[name] = img.size
        assert mime == f"image/{img.format.lower()}"
    assert sizes == {"wide.png": (SHOWN_WIDTH, 150), "narrow.png": (400, 300)}
    assert "<td class='depends on the specification'><span class='t'>depends on the specification</span></td>" in page
    import gzip

    m = re.search(r"<script id='claims-data' type='application/gzip'>(.*?)</script>", page, re.S)
    data = json.loads(gzip.decompress(base64.b64decode(m.group(1))))
    assert data["columns"] == cols and data["rows"] == rows
    assert "<details id='claims-all'>" in page and "(30 rows" in page
    assert "<b>note</b>" not in page  # outside strings stay data


def test_claims_grid_table_is_built_in_chromium_when_opened(tmp_path):
    """The collapsed table of every claims.csv row is built by the page from its gzip data when it is
    opened (here by the '#claims-open' hash): every row, the numbers to 4 significant digits, the
    verdicts coloured, no console messages."""
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium on this machine")
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "reproduce"}))
    rows = [[f"C{i % 4 + 1}", f"{i * 0.123456:.6f}", ("holds", "contradicted")[i % 2]] for i in range(25)]
    with open(tmp_path / "claims.csv", "w", newline="") as f:
        csv.writer(f).writerows([["claim", "value", "verdict"]] + rows)
    url = fanlens.report(tmp_path).resolve().as_uri()
    closed = _chromium(browser, "--virtual-time-budget=5000", "--dump-dom", url)
    assert "<table class=\"claims\">" not in closed.stdout  # nothing built until opened
    opened = _chromium(browser, "--virtual-time-budget=5000", "--dump-dom", url + "#claims-open")
    assert _console_lines(opened.stderr) == []
    table = re.search(r'<table class="claims">(.*?)</table>', opened.stdout, re.S).group(1)
    cells = re.findall(r"<tr>(.*?)</tr>", table)
    assert len(cells) == 26
    assert cells[3] == '<td>C3</td><td>0.2469</td><td class="holds">holds</td>'  # row 3: i = 2
