"""One self-contained HTML page from a fanlens output folder.

``report(directory)`` reads what a run wrote (``manifest.json``, ``results.csv``, the figures,
``claims.csv`` of ``reproduce``, the group labels of a ``groups`` run or of the ``viewer/``
folder that ``reproduce`` writes, and ``colours.npz`` where present) and writes
``report.html``: the figures, one table per model and metric with the per-block means, the
claim table, the provenance, and a block-by-block viewer (buttons and a slider) that steps
through an image's token groups and spectral colours. Everything is embedded (images as
``data:`` URIs, inline CSS and script): no network access, no external scripts, fonts or
images; the file opens from disk and can be sent as it is.
"""

from __future__ import annotations

import base64
import csv
import gzip
import html
import io
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ._output import NPZ_READ_ERRORS, write_atomic
from ._validation import FanlensError

__all__ = ["report", "REPORT_NAME", "display_name"]

REPORT_NAME = "report.html"
MAX_VIEWER_IMAGES = 8
_PALETTE = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (213, 94, 0), (204, 121, 167), (86, 180, 233),
            (240, 228, 66), (0, 0, 0))


def report(directory: str | Path, *, out: str | Path | None = None, overwrite: bool = False,
           max_images: int = MAX_VIEWER_IMAGES) -> Path:
    """Write ``report.html`` for the fanlens output folder ``directory``.

    Args:
        directory: a folder written by fanlens (``spectrum``, ``probe``, ``groups``,
            ``robustness``, ``reproduce``, ...): it holds ``manifest.json``.
        out: the file to write (default ``directory/report.html``).
        overwrite: replace an existing report; without it an existing file is refused.
        max_images: images per model in the block viewer.

    Returns:
        The path written.
    """
    d = Path(directory)
    if not (d / "manifest.json").is_file():
        raise FanlensError(f"directory must be a fanlens output folder (with manifest.json). Got {str(d)!r} instead.")
    if not _readable(d / "manifest.json", d):
        raise FanlensError(f"directory {str(d)!r}: manifest.json must be a regular file inside the folder (not a "
                           f"link or a special file).")
    target = Path(out) if out is not None else d / REPORT_NAME
    from ._output import inside, package_dir

    if inside(target.resolve(), package_dir()):
        raise FanlensError(f"out must be outside the installed fanlens package. Got {str(target)!r} instead.")
    if target.is_dir():
        raise FanlensError(f"out must be a file path, not a folder. Got {str(target)!r} instead.")
    own = target.resolve()
    if (os.path.lexists(target) and inside(own, d.resolve()) and own != (d / REPORT_NAME).resolve()) or \
            target.is_symlink():
        raise FanlensError(f"out must not replace a file of the folder it reports on (or a link): {str(target)!r}. "
                           f"A command never writes over its own inputs; choose another path.")
    if target.exists() and not overwrite:
        raise FanlensError(f"{str(target)!r} exists; pass overwrite=True (--overwrite) to replace it.")
    if not isinstance(max_images, int) or isinstance(max_images, bool) or max_images < 1:
        raise FanlensError(f"max_images must be a positive int. Got {max_images!r} instead.")
    write_atomic(target, build_html(d, max_images=max_images, label=d.resolve().name).encode("utf-8"))
    return target


# --------------------------------------------------------------------------- content
def build_html(d: Path, *, max_images: int = MAX_VIEWER_IMAGES, label: str | None = None) -> str:
    """The report page for folder ``d`` as a string (``label``: the folder name to show)."""
    manifest = _read_json(d / "manifest.json")
    kind = str(manifest.get("kind", "result"))
    models = _models(manifest)
    title = f"fanlens report: {kind}" + (f" — {', '.join(models)}" if models else "")
    where = f"folder <code>{_e(label)}</code>; " if label else ""
    parts = [f"<h1 id='title'>{_e(title)}</h1>",
             f"<p class='sub'>{where}results of fanlens {_e(_version(manifest))}</p>"]
    nav = []
    sections = (("viewer", "Block viewer", lambda: _viewer_section(d, max_images)),
                ("claims", "Claims", lambda: _claims_section(d)),
                ("figures", "Figures", lambda: _figures_section(d)),
                ("tables", "Per-block tables", lambda: _tables_section(d)),
                ("provenance", "Provenance", lambda: _provenance_section(manifest)))
    for key, name, section in sections:  # a section with nothing to show is left out
        content = section()
        if content:
            nav.append((key, name))
            parts.append(content)
    links = " · ".join(f"<a href='#{k}'>{_e(v)}</a>" for k, v in nav)
    body = f"<nav>{links}</nav>" + "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>{body}\n"
            f"<script>{_JS}</script></body></html>\n")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FanlensError(f"{str(path)!r} must be readable JSON ({e}).") from None
    if not isinstance(data, dict):
        raise FanlensError(f"{str(path)!r} must hold a JSON object. Got {type(data).__name__} instead.")
    return data


def _models(manifest: dict) -> list[str]:
    if isinstance(manifest.get("runs"), list):
        runs = manifest["runs"] + (manifest["heads_runs"] if isinstance(manifest.get("heads_runs"), list) else [])
        return [str(r.get("label")) for r in runs if isinstance(r, dict)]
    prov = manifest.get("provenance")
    return [str(prov["model"])] if isinstance(prov, dict) and "model" in prov else []


def _version(manifest: dict) -> str:
    for v in (manifest.get("versions"), (manifest.get("provenance") or {}).get("versions")):
        if isinstance(v, dict) and "fanlens" in v:
            return str(v["fanlens"])
    return "?"


def _readable(p: Path, root: Path) -> bool:
    """``p`` is a regular file (not a link, FIFO, socket or device: nothing is opened to find out) whose
    real path lies inside ``root``: the only files a report reads and embeds."""
    from ._output import inside

    try:
        if not stat.S_ISREG(os.lstat(p).st_mode):
            return False
        return inside(p.resolve(), root.resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def _script_json(data: Any) -> str:
    """JSON for an inline ``<script type='application/json'>``: ``<``, ``>`` and ``&`` as ``\\u`` escapes,
    so that no string from the outside world (file or model names) can end the block or open a comment."""
    return (json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


SHOWN_WIDTH = 1200
"""The widest a figure is shown on the page (its column): wider figures are stored at this width."""


def _figure_uri(path: Path) -> str:
    """A figure as it is shown: at most :data:`SHOWN_WIDTH` pixels wide, as WebP (the smaller of
    lossless and quality 90), or the PNG as it is where Pillow cannot write WebP or the file is no
    image Pillow reads."""
    from PIL import Image

    raw = path.read_bytes()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            img = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError):  # not an image Pillow decodes: as it is
        return _png_uri(raw)
    if img.width > SHOWN_WIDTH:
        img = img.resize((SHOWN_WIDTH, max(1, round(img.height * SHOWN_WIDTH / img.width))), Image.LANCZOS)
    best, mime = raw, "image/png"
    for kw in ({"lossless": True}, {"quality": 90}):
        buf = io.BytesIO()
        try:
            img.save(buf, format="WEBP", method=4, **kw)
        except (OSError, KeyError, ValueError):  # Pillow built without WebP
            break
        if len(buf.getvalue()) < len(best):
            best, mime = buf.getvalue(), "image/webp"
    return _uri(best, mime)


def _figures_section(d: Path) -> str:
    pngs = sorted(d.glob("*.png")) + sorted(p for p in d.glob("*/*.png") if p.parent.name != "viewer")
    pngs = [p for p in pngs if _readable(p, d)]  # no link to a file elsewhere, no FIFO named *.png
    if not pngs:
        return ""
    items = []
    for p in pngs:
        rel = p.relative_to(d).as_posix()
        items.append(f"<figure><img alt='{_e(rel)}' loading='lazy' decoding='async' src='{_figure_uri(p)}'>"
                     f"<figcaption>{_e(rel)}</figcaption></figure>")
    return "<section id='figures'><h2>Figures</h2>" + "".join(items) + "</section>"


def _fmt(v: str) -> str:
    try:
        x = float(v)
    except ValueError:
        return f"<span class='t'>{_e(v)}</span>"
    return f"{x:.4g}"


def _tables_section(d: Path) -> str:
    """Per model and metric: one row per series (rule, sigma, corruption), one column per block,
    the mean over images."""
    path = d / "results.csv"
    if not _readable(path, d):
        return ""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    tables: dict[tuple[str, str], dict[str, dict[int, str]]] = {}
    blocks: dict[tuple[str, str], dict[int, str]] = {}
    scalars: list[dict] = []
    for r in rows:
        if r.get("statistic") != "mean" or r.get("image"):
            continue
        if r.get("block_index", "") == "":
            scalars.append(r)
            continue
        key = (r.get("model", ""), r.get("metric", ""))
        series = r.get("rule") or (f"sigma={r['sigma']}" if r.get("sigma") else "")
        if r.get("corruption"):
            series = f"{r['corruption']} s{r.get('severity', '')}"
        try:
            bi = int(r["block_index"])
        except (TypeError, ValueError):
            continue  # not a row fanlens wrote
        tables.setdefault(key, {}).setdefault(series or "value", {})[bi] = r["value"]
        blocks.setdefault(key, {})[bi] = r.get("block", str(bi))
    out = ["<section id='tables'><h2>Per-block tables</h2><p>Mean over images per block (the CSV holds "
           "standard deviations, 95 % intervals and image counts).</p>"]
    for (model, metric), series in tables.items():
        cols = sorted(blocks[(model, metric)])
        head = "".join(f"<th>{_e(blocks[(model, metric)][c])}</th>" for c in cols)
        body = "".join(f"<tr><th>{_e(s)}</th>" + "".join(f"<td>{_fmt(v.get(c, ''))}</td>" for c in cols) + "</tr>"
                       for s, v in series.items())
        table = f"<div class='scroll'><table><tr><th></th>{head}</tr>{body}</table></div>"
        if len(series) > LONG_TABLE:
            table = f"<details><summary>{len(series)} rows</summary>{table}</details>"
        out.append(f"<h3>{_e(model)}: {_e(metric)}</h3>{table}")
    if scalars:
        body = "".join(f"<tr><td>{_e(r.get('model', ''))}</td><td>{_e(r.get('metric', ''))}</td>"
                       f"<td>{_e(r.get('corruption') or r.get('rule') or '')}</td><td>{_e(r.get('severity', ''))}</td>"
                       f"<td>{_fmt(r['value'])}</td></tr>" for r in scalars)
        table = ("<div class='scroll'><table><tr><th>model</th><th>metric</th><th>series</th><th>severity</th>"
                 f"<th>mean</th></tr>{body}</table></div>")
        if len(scalars) > LONG_TABLE:
            table = f"<details><summary>{len(scalars)} rows</summary>{table}</details>"
        out.append(f"<h3>Whole-model values</h3>{table}")
    out.append("</section>")
    return "".join(out) if tables or scalars else ""


LONG_TABLE = 12
"""Tables with more rows than this are collapsed (a click opens them)."""


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return list(csv.DictReader(f))


def _html_table(rows: list[dict], cls: str = "") -> str:
    cols = list(rows[0].keys())
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(
        f"<td class='{_e(r.get(c) or '') if c == 'verdict' else ''}'>{_fmt(r.get(c) or '')}</td>"
        for c in cols) + "</tr>" for r in rows)
    return f"<div class='scroll'><table class='{cls}'><tr>{head}</tr>{body}</table></div>"


def _claims_section(d: Path) -> str:
    """The headline verdicts (``claims_headline.csv``) as a table; every row of ``claims.csv`` (one per
    claim, model and grid cell: thousands) in a collapsed table the page builds when it is opened,
    from compact data (the columns once, then each row's values; gzip, base64, unpacked by the
    browser's ``DecompressionStream``)."""
    path = d / "claims.csv"
    if not _readable(path, d):
        return ""
    rows = _csv_rows(path)
    if not rows:
        return ""
    out = ["<section id='claims'><h2>Claims</h2>"]
    headline = d / "claims_headline.csv"
    head_rows = _csv_rows(headline) if _readable(headline, d) else []
    if head_rows:
        out.append("<p>Headline verdicts over the specification grid (<code>claims_headline.csv</code>):</p>"
                   + _html_table(head_rows, "claims"))
    if len(rows) <= LONG_TABLE and not head_rows:
        out.append(_html_table(rows, "claims"))
    else:
        cols = list(rows[0].keys())
        compact = json.dumps({"columns": cols, "rows": [[r.get(c) or "" for c in cols] for r in rows]},
                             separators=(",", ":")).encode("utf-8")
        # gzip (mtime 0: the same bytes every time) in base64: no character of it can end the block
        payload = base64.b64encode(gzip.compress(compact, mtime=0)).decode("ascii")
        out.append(f"<details id='claims-all'><summary>every row of <code>claims.csv</code> ({len(rows)} rows: claim "
                   f"&times; model &times; grid cell)</summary><div class='scroll' id='claims-all-table'></div></details>"
                   f"<script id='claims-data' type='application/gzip'>{payload}</script>")
    out.append("</section>")
    return "".join(out)


def _short_json(v: Any, limit: int = 12) -> Any:
    if isinstance(v, dict):
        return {k: _short_json(x, limit) for k, x in v.items()}
    if isinstance(v, list) and len(v) > limit:
        return [_short_json(x, limit) for x in v[:limit]] + [f"... ({len(v)} in all)"]
    if isinstance(v, list):
        return [_short_json(x, limit) for x in v]
    return v


def _provenance_section(manifest: dict) -> str:
    prov = manifest.get("provenance") if isinstance(manifest.get("provenance"), dict) else None
    summary = []
    if prov:
        for k in ("model", "weights", "weights_sha256", "seed", "created"):
            if k in prov:
                summary.append(f"<tr><th>{_e(k)}</th><td><code>{_e(prov[k])}</code></td></tr>")
        for k, v in (prov.get("versions") or {}).items():
            summary.append(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>")
    else:
        for r in manifest.get("runs", []) if isinstance(manifest.get("runs"), list) else []:
            p = (r.get("spectrum") or {}).get("provenance", {}) if isinstance(r, dict) else {}
            summary.append(f"<tr><th>{_e(r.get('label'))}</th><td>weights <code>{_e(p.get('weights'))}</code>, "
                           f"sha256 <code>{_e(str(p.get('weights_sha256'))[:16])}</code></td></tr>")
        for k, v in (manifest.get("versions") or {}).items():
            summary.append(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>")
    full = json.dumps(_short_json(manifest), indent=1, default=str)
    return (f"<section id='provenance'><h2>Provenance</h2><table>{''.join(summary)}</table>"
            f"<details><summary>manifest.json (long lists shortened)</summary><pre>{_e(full)}</pre></details>"
            f"</section>")


# --------------------------------------------------------------------------- block viewer
def _viewer_sources(d: Path) -> list[Path]:
    """Folders holding a groups result: ``d`` itself, or ``d/viewer/*`` (reproduce)."""
    out = []
    for folder in [d] + sorted(p for p in (d / "viewer").glob("*") if p.is_dir()):
        man = folder / "manifest.json"
        if _readable(man, d) and _readable(folder / "arrays.npz", d):
            try:
                if json.loads(man.read_text()).get("kind") == "groups":
                    out.append(folder)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
    return out


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _image_png(pixels: np.ndarray) -> str:
    """An image ``(H, W, 3)`` uint8 as PNG, at its own size (the page scales it up)."""
    from PIL import Image

    return _png_uri(_png_bytes(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))))


def _labels_png(labels: np.ndarray, palette: np.ndarray) -> str:
    """A token grid of group labels ``(h, w)`` as an 8-bit palette PNG at the grid's size."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(np.asarray(labels) % len(palette), dtype=np.uint8), mode="P")
    img.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    return _png_uri(_png_bytes(img))


def _colours_png(colours: np.ndarray) -> str:
    """Spectral colours of a token grid ``(h, w, 3)`` in [0, 1] as an RGB PNG at the grid's size."""
    from PIL import Image

    return _png_uri(_png_bytes(Image.fromarray((np.asarray(colours) * 255).round().clip(0, 255).astype(np.uint8))))


def display_name(name: str) -> str:
    """An image's name as a reader knows it: a file's name without its folders, ``batch[i]`` for
    row ``i`` of a pixel tensor, anything else as it is."""
    name = str(name)
    if name.startswith("tensor[") and name.endswith("]"):
        return "batch" + name[len("tensor"):]
    if "/" in name or "\\" in name:
        return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return name


def _viewer_section(d: Path, max_images: int) -> str:
    from .results import load

    sources = _viewer_sources(d)
    if not sources:
        return ""
    pal = np.array(_PALETTE, dtype=np.uint8)
    data = []
    for folder in sources:
        g = load(folder)
        colours = None
        if _readable(folder / "colours.npz", d):
            try:
                with np.load(folder / "colours.npz", allow_pickle=False) as z:
                    colours = [z[f"colours_{i}"] for i in range(len(g.blocks)) if f"colours_{i}" in z.files]
            except NPZ_READ_ERRORS as e:
                warnings.warn(f"{str(folder / 'colours.npz')!r} cannot be read ({type(e).__name__}): the group maps "
                              f"are shown in the default colours", stacklevel=2)
                colours = []
            if len(colours) != len(g.blocks):
                colours = None
        n = min(len(g.images), max_images)
        side = max(g.pixels.shape[1:3])
        scale = max(1, 256 // max(side, 1))
        # each image once, at its own size; the groups and colours once per block, at the token grid's
        # size (palette PNGs for the groups): the page lays them over the image, scaled up without
        # smoothing, at the opacity the frames had when they were blended here (0.55 and 0.8)
        model = {"model": g.provenance.model, "blocks": [b.name for b in g.blocks], "images": [],
                 "width": int(g.pixels.shape[2]) * scale, "height": int(g.pixels.shape[1]) * scale}
        for i in range(n):
            entry = {"name": display_name(g.images[i]), "k": [int(g.n_clusters[li, i]) for li in range(len(g.blocks))],
                     "image": _image_png(g.pixels[i]),
                     "groups": [_labels_png(g.labels[li][i], pal) for li in range(len(g.blocks))]}
            if colours is not None and i < colours[0].shape[0]:
                entry["colours"] = [_colours_png(colours[li][i]) for li in range(len(g.blocks))]
            model["images"].append(entry)
        data.append(model)
    payload = _script_json(data)
    return (
        "<section id='viewer'><h2>Block viewer</h2>"
        "<p>Token groups (spectral clustering) and, where computed, spectral colours of one image, block by "
        "block. Buttons, the slider or the arrow keys step through the blocks.</p>"
        "<div class='controls'><label>model <select id='viewer-model'></select></label> "
        "<label>image <select id='viewer-image'></select></label> "
        "<button id='viewer-prev' type='button'>&#9664; previous</button> "
        "<input id='viewer-slider' type='range' min='0' max='0' value='0'> "
        "<button id='viewer-next' type='button'>next &#9654;</button> "
        "<span id='viewer-block'></span></div>"
        "<div class='panels'><figure><div class='stack'><img class='viewer-base' alt='image'>"
        "<img id='viewer-groups' class='layer' style='opacity:.55' alt='groups'></div>"
        "<figcaption id='viewer-k'>groups</figcaption></figure><figure id='viewer-colours-fig'><div class='stack'>"
        "<img class='viewer-base' alt='image'><img id='viewer-colours' class='layer' style='opacity:.8' "
        "alt='spectral colours'></div><figcaption>spectral colours</figcaption></figure></div>"
        f"<script id='viewer-data' type='application/json'>{payload}</script></section>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;padding:0 1.2em 3em;
color:#222;background:#fff}
h1{font-size:1.5em;margin:.8em 0 .2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1em;margin:1.2em 0 .3em}.sub{color:#555;margin-top:0}nav{position:sticky;top:0;background:#fff;
padding:.5em 0;border-bottom:1px solid #eee;z-index:1}a{color:#0072B2}
table{border-collapse:collapse;font-size:.82em}th,td{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f4f4f4}td:has(.t){text-align:left}td:first-child,th:first-child{text-align:left}.scroll{overflow-x:auto}
td.holds{background:#d9f0e3}td.contradicted{background:#f8dcd3}td.inconclusive{background:#eee}
figure{display:inline-block;margin:.5em;vertical-align:top;text-align:center}
#figures img{max-width:100%;border:1px solid #eee}figcaption{font-size:.8em;color:#555}
.controls{margin:.5em 0}.controls>*{margin-right:.4em}#viewer-block{font-weight:bold}
.stack{position:relative;display:inline-block;border:1px solid #ccc;max-width:45vw;line-height:0}
.stack img{display:block;image-rendering:pixelated;max-width:100%}
.stack .layer{position:absolute;left:0;top:0;width:100%;height:100%}
details>summary{cursor:pointer;color:#0072B2;margin:.4em 0}pre{font-size:.75em;overflow-x:auto}
"""

_JS = r"""
(function () {
  var holder = document.getElementById('claims-all'), src = document.getElementById('claims-data');
  if (!holder || !src) { return; }
  function build(d) {
    var box = document.getElementById('claims-all-table'), t = document.createElement('table'), tr = t.insertRow();
    t.className = 'claims';
    d.columns.forEach(function (c) { var th = document.createElement('th'); th.textContent = c; tr.appendChild(th); });
    var vi = d.columns.indexOf('verdict');
    d.rows.forEach(function (r) {
      var row = t.insertRow();
      r.forEach(function (v, j) {
        var td = row.insertCell(), x = Number(v);
        td.textContent = (v !== '' && isFinite(x)) ? String(Number(x.toPrecision(4))) : v;
        if (j === vi) { td.className = v; }
      });
    });
    box.appendChild(t);
  }
  var started = false;
  holder.addEventListener('toggle', function () {
    if (!holder.open || started) { return; }
    started = true;
    var bin = atob(src.textContent.trim()), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) { bytes[i] = bin.charCodeAt(i); }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
    new Response(stream).text().then(function (text) { build(JSON.parse(text)); });
  });
  if (/claims-open/.test(location.hash)) { holder.open = true; }
})();
(function () {
  var el = document.getElementById('viewer-data');
  if (!el) { return; }
  var data = JSON.parse(el.textContent);
  var mSel = document.getElementById('viewer-model'), iSel = document.getElementById('viewer-image');
  var slider = document.getElementById('viewer-slider');
  var state = {m: 0, i: 0, b: 0};
  function fill(sel, names) {
    sel.innerHTML = '';
    names.forEach(function (n, j) { var o = document.createElement('option'); o.value = j; o.textContent = n;
      sel.appendChild(o); });
  }
  function show() {
    var m = data[state.m], im = m.images[state.i], n = m.blocks.length;
    state.b = Math.max(0, Math.min(n - 1, state.b));
    slider.max = n - 1; slider.value = state.b;
    document.getElementById('viewer-block').textContent = 'block ' + (state.b + 1) + ' / ' + n + ': ' + m.blocks[state.b];
    Array.prototype.forEach.call(document.querySelectorAll('.viewer-base'), function (b) {
      if (b.getAttribute('src') !== im.image) { b.src = im.image; }
      b.style.width = m.width + 'px'; b.style.aspectRatio = m.width + ' / ' + m.height;
    });
    document.getElementById('viewer-groups').src = im.groups[state.b];
    document.getElementById('viewer-k').textContent = 'groups (k = ' + im.k[state.b] + ')';
    var cf = document.getElementById('viewer-colours-fig');
    if (im.colours) { cf.style.display = ''; document.getElementById('viewer-colours').src = im.colours[state.b]; }
    else { cf.style.display = 'none'; }
    document.body.setAttribute('data-viewer-block', String(state.b));
  }
  function step(d) { state.b += d; show(); }
  fill(mSel, data.map(function (m) { return m.model; }));
  function images() { fill(iSel, data[state.m].images.map(function (x) { return x.name; })); }
  images();
  mSel.addEventListener('change', function () { state.m = +mSel.value; state.i = 0; images(); show(); });
  iSel.addEventListener('change', function () { state.i = +iSel.value; show(); });
  document.getElementById('viewer-prev').addEventListener('click', function () { step(-1); });
  document.getElementById('viewer-next').addEventListener('click', function () { step(1); });
  slider.addEventListener('input', function () { state.b = +slider.value; show(); });
  document.addEventListener('keydown', function (e) {
    if (e.key === 'ArrowRight') { step(1); } else if (e.key === 'ArrowLeft') { step(-1); }
  });
  show();
  // '#next=N' presses the next button N times after loading (used by the browser test)
  var m = /next=(\d+)/.exec(location.hash);
  if (m) { for (var k = 0; k < +m[1]; k++) { document.getElementById('viewer-next').click(); } }
})();
"""
