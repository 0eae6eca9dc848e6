"""Result objects: frozen dataclasses that save, load and become tidy tables.

``result.save(dir)`` writes three files as one unit through the output-folder writer
(:class:`fanlens.runner.OutputFolder`: a new or empty folder unless ``overwrite=True``;
the files are staged aside and moved into place together, so a failing run never leaves a
half-written file or a mix of old and new files):

- ``results.csv``: tidy long form, one row per (model, block, metric, rule or sigma,
  statistic), columns :data:`CSV_COLUMNS`;
- ``manifest.json``: the kind of result, block layouts and the provenance (model,
  weights SHA-256 or "random init", versions, seed, every analysis parameter, images);
- ``arrays.npz``: the numeric arrays, so that :func:`load` restores the object exactly.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import platform
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from ._validation import FanlensError
from .capture import TokenLayout
from ._output import NPZ_READ_ERRORS, OutputFolder, write_atomic

__all__ = [
    "CSV_COLUMNS",
    "STATISTICS",
    "BlockInfo",
    "Provenance",
    "SpectrumResult",
    "ProbeResult",
    "GroupsResult",
    "AttributionResult",
    "FlipResult",
    "RobustnessResult",
    "load",
    "versions",
    "write_atomic",
    "rows_to_csv",
    "save_png",
]

CSV_COLUMNS = ("model", "block_index", "block", "depth", "metric", "rule", "sigma", "image", "statistic", "value", "n",
               "corruption", "severity")
STATISTICS = ("mean", "std", "ci_low", "ci_high")
FORMAT_VERSION = 1
HTML_MAX_ROWS = 16  # rows of a result's table in Jupyter (first and last halves)
HTML_MAX_COLUMNS = 8


def _execution_record() -> dict:
    from .execution import record

    return record()


def versions() -> dict[str, str]:
    """Versions of fanlens and the packages that shape its numbers."""
    import numpy
    import scipy
    import timm
    import torch

    from ._version import __version__

    return {
        "fanlens": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }


def rows_to_csv(rows, columns: Sequence[str] = CSV_COLUMNS) -> str:
    """Tidy rows (dicts keyed by ``columns``, default :data:`CSV_COLUMNS`; missing keys empty) as CSV text."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _finite_or_empty(r.get(k, "")) for k in columns})
    return buf.getvalue()


def _finite_or_empty(v: Any) -> Any:
    """An undefined number (NaN, inf: e.g. the spread of one image) is written as an empty cell, never as a
    value."""
    if isinstance(v, float) and not math.isfinite(v):
        return ""
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return ""
    return v


def save_png(fig, path: str | Path, *, dpi: int = 130, close: bool = True) -> None:
    """Render a matplotlib figure to PNG and write it atomically; close the figure unless
    ``close=False`` (in Jupyter, to still show it)."""
    import matplotlib.pyplot as plt

    from matplotlib.layout_engine import ConstrainedLayoutEngine

    buf = io.BytesIO()
    # a constrained layout already fits every label (twin axes and outside legends included):
    # saved as it is, the figure is drawn once; other figures need the tight bounding box,
    # which costs a second draw
    tight = {} if isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine) else dict(bbox_inches="tight",
                                                                                          pad_inches=0.05)
    try:
        fig.savefig(buf, format="png", dpi=dpi, **tight)
    finally:
        if close:
            plt.close(fig)
    write_atomic(path, buf.getvalue())


@dataclass(frozen=True)
class BlockInfo:
    """One analysed block.

    Attributes:
        index: position in the analysed block list (0-based).
        name: module name, with ``#k`` for the k-th repeated call of a module.
        layout: token layout of the block output.
        analysed_grid: grid after pooling to the token budget (spectral analysis only).
    """

    index: int
    name: str
    layout: TokenLayout
    analysed_grid: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "layout": self.layout.to_dict(),
            "analysed_grid": list(self.analysed_grid) if self.analysed_grid else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BlockInfo":
        g = d.get("analysed_grid")
        return cls(int(d["index"]), d["name"], TokenLayout.from_dict(d["layout"]), tuple(g) if g else None)


@dataclass(frozen=True)
class Provenance:
    """Where a result came from: enough to reproduce it."""

    model: str
    weights: str
    weights_sha256: str
    seed: int
    params: dict
    images: list[str]
    versions: dict = field(default_factory=versions)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    execution: dict = field(default_factory=_execution_record)
    """The thread counts the result was computed with (:mod:`fanlens.execution`)."""

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "seed": self.seed,
            "params": self.params,
            "images": list(self.images),
            "versions": self.versions,
            "created": self.created,
            "execution": self.execution,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Provenance":
        return cls(
            d["model"], d["weights"], d["weights_sha256"], int(d["seed"]), d["params"], list(d["images"]),
            d["versions"], d["created"], dict(d.get("execution") or {}),
        )


class _ResultIO:
    """Shared save/load machinery; subclasses list their array fields in ``_ARRAYS``."""

    KIND: ClassVar[str] = ""
    _ARRAYS: ClassVar[tuple[str, ...]] = ()

    blocks: tuple[BlockInfo, ...]
    provenance: Provenance

    @property
    def model(self) -> str:
        return self.provenance.model

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def depth(self) -> np.ndarray:
        """Relative depth of each block in [0, 1] (first block 0, last 1)."""
        n = len(self.blocks)
        return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(n)

    def _extra_manifest(self) -> dict:
        return {}

    def _array_dict(self) -> dict[str, np.ndarray]:
        out = {k: np.asarray(getattr(self, k)) for k in self._ARRAYS}
        if getattr(self, "per_image", None) is not None:
            out["per_image"] = np.asarray(self.per_image)
        return out

    def rows(self) -> list[dict]:  # pragma: no cover - overridden
        raise NotImplementedError

    # ------------------------------------------------------------------ display
    _FIGURE: ClassVar[str | None] = None  # the plotting function of the default figure

    def default_figure(self):
        """This result's standard figure (a matplotlib ``Figure``; ``None`` for kinds without one).
        The caller owns it (``plt.close(fig)`` when done)."""
        if self._FIGURE is None:
            return None
        from . import plotting

        obj = getattr(plotting, self._FIGURE)(self)
        return obj if hasattr(obj, "savefig") else obj.figure

    def summary_table(self, max_rows: int = HTML_MAX_ROWS) -> tuple[list[str], list[list[str]]]:
        """``(header, rows)``: the mean of every per-block statistic (one row per block, one
        column per rule / sigma / perturbation), for display; long tables keep their first and
        last rows."""
        table: dict[str, dict[str, str]] = {}
        cols: list[str] = []
        for r in self.rows():
            if r.get("statistic") not in ("mean", "value"):
                continue
            row = str(r.get("block") or r.get("corruption") or r.get("metric"))
            col = str(r.get("rule") or (f"sigma={r['sigma']}" if r.get("sigma") else "") or
                      (f"severity {r['severity']}" if r.get("severity") not in (None, "") else "") or r["metric"])
            if r.get("image"):
                col = str(r["image"])
            if col not in cols:
                cols.append(col)
            v = r["value"]
            try:
                v = f"{float(v):.4g}"
            except (TypeError, ValueError):
                v = str(v)
            table.setdefault(row, {})[col] = v
        names = list(table)
        if len(names) > max_rows:
            half = max_rows // 2
            names = names[:half] + ["…"] + names[-half:]
        cols = cols[:HTML_MAX_COLUMNS]
        return (["", *cols], [[n, *(table.get(n, {}).get(c, "") for c in cols)] for n in names])

    def _repr_html_(self) -> str:
        """Jupyter: the model, the image count, a small table of the means and the figure."""
        import base64
        import html as _html

        header, body = self.summary_table()
        e = lambda v: _html.escape(str(v), quote=True)  # noqa: E731
        n = getattr(self, "n_images", None)
        title = f"<b>{e(type(self).__name__)}</b> of <code>{e(self.model)}</code>" + (
            f", {e(n)} images" if n is not None else "")
        head = "".join(f"<th>{e(h)}</th>" for h in header)
        rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body)
        img = ""
        fig = self.default_figure()
        if fig is not None:
            import matplotlib.pyplot as plt

            buf = io.BytesIO()
            try:
                fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
            finally:
                plt.close(fig)
            img = f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>"
        return (f"<div>{title}<br/><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{img}"
                f"</div>")

    def to_csv(self) -> str:
        return rows_to_csv(self.rows())

    def manifest(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.KIND,
            "blocks": [b.to_dict() for b in self.blocks],
            "provenance": self.provenance.to_dict(),
            **self._extra_manifest(),
        }

    def write_files(self, directory: str | Path) -> list[Path]:
        """Write ``results.csv``, ``manifest.json`` and ``arrays.npz`` into ``directory`` as they are
        (the writer of a run's staging folder; users call :meth:`save`)."""
        d = Path(directory)
        buf = io.BytesIO()
        np.savez(buf, **self._array_dict())
        csv_bytes = self.to_csv().encode()
        man = json.dumps(self.manifest(), indent=2, sort_keys=False).encode()
        written = []
        for name, data in (("arrays.npz", buf.getvalue()), ("results.csv", csv_bytes), ("manifest.json", man)):
            write_atomic(d / name, data)
            written.append(d / name)
        return written

    def save(self, directory: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Write ``results.csv``, ``manifest.json`` and ``arrays.npz`` into ``directory`` as one unit.

        ``directory`` must be new or empty unless ``overwrite=True``, which replaces the files of
        the earlier result there (see :class:`fanlens.runner.OutputFolder`).
        """
        out = OutputFolder(directory, overwrite=overwrite, command=self.KIND, param="directory")
        with out.staging() as tmp:
            self.write_files(tmp)
        return out.written

    @classmethod
    def _from_parts(cls, manifest: dict, arrays: dict[str, np.ndarray]):
        blocks = tuple(BlockInfo.from_dict(b) for b in manifest["blocks"])
        prov = Provenance.from_dict(manifest["provenance"])
        kwargs = {k: arrays[k] for k in cls._ARRAYS}
        if "per_image" in arrays and "per_image" in {f.name for f in fields(cls)}:
            kwargs["per_image"] = arrays["per_image"]
        extra = {f.name: manifest[f.name] for f in fields(cls) if f.name in manifest and f.name not in ("blocks", "provenance")}
        for k, v in extra.items():
            if isinstance(v, list):
                extra[k] = tuple(v)
        return cls(blocks=blocks, provenance=prov, **extra, **kwargs)


def _stat_rows(model, blocks, depth, metric, stats: dict[str, np.ndarray], n, *, rules=None, sigmas=None):
    rows = []
    for li, b in enumerate(blocks):
        cols = rules if rules is not None else sigmas
        for ci, c in enumerate(cols):
            for s in STATISTICS:
                rows.append(
                    {
                        "model": model,
                        "block_index": b.index,
                        "block": b.name,
                        "depth": f"{depth[li]:.6g}",
                        "metric": metric,
                        "rule": c if rules is not None else "",
                        "sigma": f"{c:g}" if sigmas is not None else "",
                        "statistic": s,
                        "value": f"{float(stats[s][li, ci]):.8g}",
                        "n": n,
                    }
                )
    return rows


@dataclass(frozen=True)
class SpectrumResult(_ResultIO):
    """Significant-eigenvalue counts per block.

    Attributes:
        blocks: analysed blocks.
        rules: the counting rules, columns of the count arrays.
        n_images: images aggregated.
        count_mean, count_std, count_ci_low, count_ci_high: ``(L, R)`` per block and rule.
        eig_mean: ``(L, K)`` mean of the top-K eigenvalues of the affinity, each image's
            spectrum divided by its largest eigenvalue (NaN where a block has fewer than K tokens).
        provenance: see :class:`Provenance`.
        per_image: ``(n_images, L, R)`` the count of every image (dataset order), block and rule
            (what :mod:`fanlens.claims` resamples); ``None`` in results saved before it existed.
    """

    KIND: ClassVar[str] = "spectrum"
    _FIGURE: ClassVar[str | None] = "plot_rules"
    _ARRAYS: ClassVar[tuple[str, ...]] = ("count_mean", "count_std", "count_ci_low", "count_ci_high", "eig_mean")

    blocks: tuple[BlockInfo, ...]
    rules: tuple[str, ...]
    n_images: int
    count_mean: np.ndarray
    count_std: np.ndarray
    count_ci_low: np.ndarray
    count_ci_high: np.ndarray
    eig_mean: np.ndarray
    provenance: Provenance
    per_image: np.ndarray | None = None

    def _extra_manifest(self) -> dict:
        return {"rules": list(self.rules), "n_images": self.n_images}

    def count(self, rule: str | None = None, statistic: str = "mean") -> np.ndarray:
        """Per-block count under ``rule`` (default: the result's first rule)."""
        rule = self.rules[0] if rule is None else rule
        if rule not in self.rules:
            raise FanlensError(f"rule must be one of {self.rules}. Got {rule!r} instead.")
        if statistic not in STATISTICS:
            raise FanlensError(f"statistic must be one of {STATISTICS}. Got {statistic!r} instead.")
        return np.asarray(getattr(self, f"count_{statistic}"))[:, self.rules.index(rule)]

    def rows(self) -> list[dict]:
        stats = {s: getattr(self, f"count_{s}") for s in STATISTICS}
        rows = _stat_rows(self.model, self.blocks, self.depth, "significant_eigenvalues", stats, self.n_images,
                          rules=self.rules)
        for r in rows:  # TwoNN and RankMe are dimensions, not eigenvalue counts
            if r["rule"] in ("twonn", "rankme"):
                r["metric"] = "dimension"
        return rows


@dataclass(frozen=True)
class ProbeResult(_ResultIO):
    """Per-block response to noise.

    ``mode="additive"``: ``delta_l(sigma) = ||f_l(x + sigma eps) - f_l(x)|| / ||f_l(x)||``
    over patch tokens, one column per sigma; with ``perturbations`` (ImageNet-C corruptions,
    labels ``"fog@3"``) the same measure with ``c(x)`` in place of ``x + sigma eps``, one column
    per corruption and severity. ``mode="pure"``: the mean token norm of ``f_l(eps)`` for pure
    N(0, 1) inputs divided by the first block's, one column. ``mode="pure_vs_clean"``: the mean token
    norm of ``f_l(eps_i)`` for a pure N(0, 1) input divided by that of the clean image ``f_l(x_i)`` at
    the same block, one column (the paper's Figure 3 input, compared with real features).

    Attributes:
        blocks: analysed blocks.
        mode: ``"additive"``, ``"pure"`` or ``"pure_vs_clean"``.
        sigmas: noise levels (``(1.0,)`` in pure mode, ``()`` for corruptions).
        space: ``"pixel"`` or ``"normalized"``: where the noise was added.
        n_images: images (or noise samples) aggregated.
        mean, std, ci_low, ci_high: ``(L, S)``.
        provenance: see :class:`Provenance`.
        perturbations: ``("fog@3", ...)`` the corruption columns, or ``()`` for Gaussian noise.
        per_image: ``(n_images, L, S)`` the value of every image (dataset order; noise sample in
            pure mode), block and column; ``None`` in results saved before it existed.
    """

    KIND: ClassVar[str] = "probe"
    _FIGURE: ClassVar[str | None] = "plot_probe"
    _ARRAYS: ClassVar[tuple[str, ...]] = ("mean", "std", "ci_low", "ci_high")

    blocks: tuple[BlockInfo, ...]
    mode: str
    sigmas: tuple[float, ...]
    space: str
    n_images: int
    mean: np.ndarray
    std: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    provenance: Provenance
    perturbations: tuple[str, ...] = ()
    per_image: np.ndarray | None = None

    @property
    def metric(self) -> str:
        return {"additive": "relative_perturbation", "pure": "relative_feature_norm"}.get(self.mode,
                                                                                         "noise_to_clean_norm")

    @property
    def columns(self) -> tuple:
        """The column labels: sigmas, or the corruption labels (``"fog@3"``)."""
        return self.perturbations if self.perturbations else self.sigmas

    def _extra_manifest(self) -> dict:
        return {"mode": self.mode, "sigmas": list(self.sigmas), "space": self.space, "n_images": self.n_images,
                "perturbations": list(self.perturbations)}

    def values(self, sigma: float | str | None = None, statistic: str = "mean") -> np.ndarray:
        """Per-block values at ``sigma`` (default: the largest), or at a corruption label such as
        ``"fog@3"`` (default: the last column) for a corruption probe."""
        if statistic not in STATISTICS:
            raise FanlensError(f"statistic must be one of {STATISTICS}. Got {statistic!r} instead.")
        if self.perturbations:
            key = self.perturbations[-1] if sigma is None else sigma
            if key not in self.perturbations:
                raise FanlensError(f"sigma must be one of the corruption columns {self.perturbations}. Got "
                                   f"{sigma!r} instead.")
            return np.asarray(getattr(self, statistic))[:, self.perturbations.index(key)]
        sig = max(self.sigmas) if sigma is None else float(sigma)
        if sig not in self.sigmas:
            raise FanlensError(f"sigma must be one of {self.sigmas}. Got {sigma!r} instead.")
        return np.asarray(getattr(self, statistic))[:, self.sigmas.index(sig)]

    def rows(self) -> list[dict]:
        stats = {s: getattr(self, s) for s in STATISTICS}
        if not self.perturbations:
            return _stat_rows(self.model, self.blocks, self.depth, self.metric, stats, self.n_images,
                              sigmas=self.sigmas)
        rows = _stat_rows(self.model, self.blocks, self.depth, self.metric, stats, self.n_images,
                          rules=self.perturbations)
        for r in rows:  # the label goes to its own columns
            c, _, sev = r.pop("rule").rpartition("@")
            r.update(rule="", corruption=c, severity=sev)
        return rows


@dataclass(frozen=True)
class GroupsResult(_ResultIO):
    """Spectral clusters of the patch tokens of each block, per image.

    Attributes:
        blocks: analysed blocks (``analysed_grid`` is the grid of the label maps).
        images: image names.
        labels: one ``(n_images, h, w)`` int array per block.
        n_clusters: ``(L, n_images)`` clusters used per block and image.
        pixels: ``(n_images, H, W, 3)`` uint8 input images, for overlays.
        provenance: see :class:`Provenance`.
    """

    KIND: ClassVar[str] = "groups"
    _FIGURE: ClassVar[str | None] = "plot_groups"

    blocks: tuple[BlockInfo, ...]
    images: tuple[str, ...]
    labels: tuple[np.ndarray, ...]
    n_clusters: np.ndarray
    pixels: np.ndarray
    provenance: Provenance

    def _extra_manifest(self) -> dict:
        return {"images": list(self.images)}

    def _array_dict(self) -> dict[str, np.ndarray]:
        d = {f"labels_{i}": np.asarray(l) for i, l in enumerate(self.labels)}
        d["n_clusters"] = np.asarray(self.n_clusters)
        d["pixels"] = np.asarray(self.pixels)
        return d

    @classmethod
    def _from_parts(cls, manifest: dict, arrays: dict[str, np.ndarray]):
        blocks = tuple(BlockInfo.from_dict(b) for b in manifest["blocks"])
        return cls(
            blocks=blocks,
            images=tuple(manifest["images"]),
            labels=tuple(arrays[f"labels_{i}"] for i in range(len(blocks))),
            n_clusters=arrays["n_clusters"],
            pixels=arrays["pixels"],
            provenance=Provenance.from_dict(manifest["provenance"]),
        )

    def rows(self) -> list[dict]:
        rows = []
        for li, b in enumerate(self.blocks):
            for ii, img in enumerate(self.images):
                rows.append(
                    {
                        "model": self.model,
                        "block_index": b.index,
                        "block": b.name,
                        "depth": f"{self.depth[li]:.6g}",
                        "metric": "n_clusters",
                        "image": img,
                        "statistic": "value",
                        "value": int(self.n_clusters[li, ii]),
                        "n": 1,
                    }
                )
        return rows


@dataclass(frozen=True)
class AttributionResult(_ResultIO):
    """Attribution maps, one per image, at input resolution.

    Attributes:
        blocks: ``(the Grad-CAM block,)`` for ``method="gradcam"``, ``()`` for IG.
        method: ``"ig"`` or ``"gradcam"``.
        images: image names.
        maps: ``(n_images, H, W)`` non-negative attribution mass per pixel: IG sums the
            absolute attribution over colour channels; Grad-CAM is the ReLU'd class
            activation map of the block's token grid, each token's value spread over its
            pixels (nearest), so that every token keeps its own value.
        targets: ``(n_images,)`` the class attributed.
        predicted: ``(n_images,)`` the model's predicted class on the clean image.
        convergence: ``(n_images,)`` IG only: ``|sum(attr) - (f(x) - f(x0))| / |f(x) - f(x0)|``
            for the target logit (the completeness error of the path integral; NaN for Grad-CAM).
        pixels: ``(n_images, H, W, 3)`` uint8 input images.
        provenance: see :class:`~fanlens.results.Provenance`.
    """

    KIND: ClassVar[str] = "attribution"
    _ARRAYS: ClassVar[tuple[str, ...]] = ("maps", "targets", "predicted", "convergence", "pixels")

    blocks: tuple[BlockInfo, ...]
    method: str
    images: tuple[str, ...]
    maps: np.ndarray
    targets: np.ndarray
    predicted: np.ndarray
    convergence: np.ndarray
    pixels: np.ndarray
    provenance: Provenance

    def _extra_manifest(self) -> dict:
        return {"method": self.method, "images": list(self.images)}

    def rows(self) -> list[dict]:
        rows = []
        block = self.blocks[0].name if self.blocks else ""
        for i, img in enumerate(self.images):
            base = {"model": self.model, "block": block, "image": img, "statistic": "value", "n": 1}
            rows.append({**base, "metric": f"attribution_{self.method}_target", "value": int(self.targets[i])})
            if self.method == "ig":
                rows.append({**base, "metric": "ig_completeness_error", "value": f"{float(self.convergence[i]):.6g}"})
        return rows


@dataclass(frozen=True)
class FlipResult(_ResultIO):
    """The smallest noise level that changes the prediction, per image.

    Attributes:
        blocks: ``()`` (a whole-model quantity).
        images: image names.
        space: ``"pixel"`` or ``"normalized"``: where the noise is added (as in the probe).
        max_sigma, step: the search grid ``step, 2 step, ...`` up to ``max_sigma``.
        min_sigma: ``(n_images,)`` the first grid value that flips the prediction; NaN when
            none up to ``max_sigma`` does.
        predicted: ``(n_images,)`` the clean prediction.
        flipped_to: ``(n_images,)`` the prediction at ``min_sigma`` (-1 when not flipped).
        provenance: see :class:`~fanlens.results.Provenance`.
    """

    KIND: ClassVar[str] = "flip"
    _ARRAYS: ClassVar[tuple[str, ...]] = ("min_sigma", "predicted", "flipped_to")

    blocks: tuple[BlockInfo, ...]
    images: tuple[str, ...]
    space: str
    max_sigma: float
    step: float
    min_sigma: np.ndarray
    predicted: np.ndarray
    flipped_to: np.ndarray
    provenance: Provenance

    def _extra_manifest(self) -> dict:
        return {"images": list(self.images), "space": self.space, "max_sigma": self.max_sigma, "step": self.step}

    @property
    def n_flipped(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.min_sigma)))

    @property
    def median(self) -> float:
        """Median over images, counting an image never flipped as above ``max_sigma``
        (``inf`` when half or more never flip)."""
        v = np.where(np.isnan(self.min_sigma), np.inf, self.min_sigma)
        return float(np.median(v)) if v.size else math.nan

    def rows(self) -> list[dict]:
        rows = []
        for i, img in enumerate(self.images):
            v = self.min_sigma[i]
            rows.append({"model": self.model, "metric": "min_flip_sigma", "image": img, "statistic": "value",
                         "value": "" if np.isnan(v) else f"{float(v):.6g}", "n": 1})
        n = len(self.images)
        rows.append({"model": self.model, "metric": "min_flip_sigma", "statistic": "median", "value": f"{self.median:.6g}", "n": n})
        rows.append({"model": self.model, "metric": "flipped_fraction", "statistic": "value",
                     "value": f"{self.n_flipped / max(n, 1):.6g}", "n": n})
        return rows


@dataclass(frozen=True)
class RobustnessResult(_ResultIO):
    """Top-1 error (labels known) or prediction flip rate (no labels) per corruption and severity.

    Attributes:
        blocks: ``()`` (a whole-model quantity).
        metric: ``"top1_error"`` or ``"flip_rate"`` (the share of images whose prediction differs
            from the clean image's).
        corruptions, severities: the grid, rows and columns of the arrays.
        n_images: images aggregated.
        mean, std, ci_low, ci_high: ``(C, S)`` over images (each image counts 0 or 1).
        clean: ``(4,)`` mean, std, ci_low, ci_high of the clean error (0 for the flip rate).
        baseline: what the Corruption Errors are normalised by (``"alexnet"``, a model label, or "").
        ce, relative_ce: ``(C,)`` Corruption Error and relative CE per corruption (NaN without a baseline).
        mce, relative_mce: their means over the ImageNet-C benchmark corruptions present (NaN without).
        provenance: see :class:`Provenance`.
        per_image: ``(n_images, 1 + C * S)`` uint8, 1 where the image is wrong (or flipped): clean,
            then every corruption (rows) and severity (columns) in order; ``None`` in older results.
    """

    KIND: ClassVar[str] = "robustness"
    _FIGURE: ClassVar[str | None] = "plot_robustness"
    _ARRAYS: ClassVar[tuple[str, ...]] = ("mean", "std", "ci_low", "ci_high", "clean", "ce", "relative_ce")

    blocks: tuple[BlockInfo, ...]
    metric: str
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    n_images: int
    mean: np.ndarray
    std: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    clean: np.ndarray
    baseline: str
    ce: np.ndarray
    relative_ce: np.ndarray
    mce: float
    relative_mce: float
    provenance: Provenance
    per_image: np.ndarray | None = None

    def _extra_manifest(self) -> dict:
        return {"metric": self.metric, "corruptions": list(self.corruptions), "severities": list(self.severities),
                "n_images": self.n_images, "baseline": self.baseline, "mce": _json_float(self.mce),
                "relative_mce": _json_float(self.relative_mce)}

    @classmethod
    def _from_parts(cls, manifest: dict, arrays: dict[str, np.ndarray]):
        man = dict(manifest)
        for k in ("mce", "relative_mce"):
            man[k] = float("nan") if man.get(k) is None else float(man[k])
        return super()._from_parts(man, arrays)

    @property
    def robust_accuracy(self) -> float:
        """1 - the mean error over every corruption and severity (top-1 error only; NaN otherwise)."""
        return float(1.0 - np.mean(self.mean)) if self.metric == "top1_error" else float("nan")

    def value(self, corruption: str, severity: int, statistic: str = "mean") -> float:
        if corruption not in self.corruptions:
            raise FanlensError(f"corruption must be one of {self.corruptions}. Got {corruption!r} instead.")
        if severity not in self.severities:
            raise FanlensError(f"severity must be one of {self.severities}. Got {severity!r} instead.")
        if statistic not in STATISTICS:
            raise FanlensError(f"statistic must be one of {STATISTICS}. Got {statistic!r} instead.")
        return float(getattr(self, statistic)[self.corruptions.index(corruption), self.severities.index(severity)])

    def rows(self) -> list[dict]:
        rows = []
        base = {"model": self.model, "n": self.n_images}
        for si, st in enumerate(STATISTICS):
            rows.append({**base, "metric": f"clean_{self.metric}", "statistic": st, "value": f"{float(self.clean[si]):.6g}"})
        for ci, c in enumerate(self.corruptions):
            for vi, sev in enumerate(self.severities):
                for st in STATISTICS:
                    rows.append({**base, "metric": self.metric, "corruption": c, "severity": sev, "statistic": st,
                                 "value": f"{float(getattr(self, st)[ci, vi]):.6g}"})
            if self.baseline:
                for metric, v in (("corruption_error", self.ce[ci]), ("relative_corruption_error",
                                                                       self.relative_ce[ci])):
                    if math.isfinite(float(v)):  # undefined values (no baseline error) are left out
                        rows.append({**base, "metric": metric, "corruption": c, "statistic": f"vs {self.baseline}",
                                     "value": f"{float(v):.6g}"})
        if self.baseline:
            for metric, v in (("mCE", self.mce), ("relative_mCE", self.relative_mce)):
                if math.isfinite(float(v)):
                    rows.append({**base, "metric": metric, "statistic": f"vs {self.baseline}", "value": f"{v:.6g}"})
        if self.metric == "top1_error":
            rows.append({**base, "metric": "robust_accuracy", "statistic": "mean", "value": f"{self.robust_accuracy:.6g}"})
        return rows


def _json_float(v: float):
    return None if not math.isfinite(float(v)) else float(v)


_KINDS = {c.KIND: c for c in (SpectrumResult, ProbeResult, GroupsResult, AttributionResult, FlipResult,
                              RobustnessResult)}


def load(directory: str | Path):
    """Restore a result written by ``save`` (spectrum, probe, groups, attribution or flip)."""
    d = Path(directory)
    man_path, arr_path = d / "manifest.json", d / "arrays.npz"
    if not man_path.is_file() or not arr_path.is_file():
        raise FanlensError(f"directory must hold manifest.json and arrays.npz from result.save(). Got {str(d)!r} instead.")
    try:
        manifest = json.loads(man_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FanlensError(f"directory must hold a readable manifest.json. Got {str(man_path)!r}, which is not valid "
                           f"JSON ({e}).") from None
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    kinds = _KINDS
    if kind not in kinds:
        raise FanlensError(f"manifest kind must be one of {tuple(kinds)}. Got {kind!r} instead.")
    try:
        with np.load(arr_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return kinds[kind]._from_parts(manifest, arrays)
    except (*NPZ_READ_ERRORS, TypeError) as e:
        raise FanlensError(f"directory {str(d)!r} holds a damaged result ({type(e).__name__}: {e}).") from None
