"""Robustness the way the paper measures it: ImageNet-C corruptions, error per corruption and
severity, Corruption Error (CE) and mCE.

:func:`robustness` streams the images once; each batch is classified clean and under every
(corruption, severity) of the grid (:mod:`fanlens.corruptions`, random parts drawn from the
seed and each image's index). Per image and cell it records 0 or 1: a top-1 error where labels
are known, otherwise whether the prediction differs from the clean image's (the flip rate, no
labels needed). Aggregates are streaming (Welford), resumable and sharded like
:func:`fanlens.spectrum`.

Corruption Error (Hendrycks & Dietterich, 2019): ``CE_c = sum_s E_{c,s} / sum_s E^base_{c,s}``;
relative CE: ``sum_s (E_{c,s} - E_clean) / sum_s (E^base_{c,s} - E^base_clean)``; mCE and
relative mCE are their means over the 15 benchmark corruptions present. The baseline is
``"alexnet"`` for ImageNet-1k classifiers (the published AlexNet errors, :data:`ALEXNET_ERRORS`,
all five severities needed) or an earlier :class:`~fanlens.results.RobustnessResult` on the same
grid (for example the zoo CNN).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import corruptions as cc
from ._stats import RunningStats
from ._threads import map_items
from ._validation import FanlensError, check_choice, check_positive_int
from .data import DEFAULT_BATCH_SIZE
from .distributed import merge_stats
from .results import ProbeResult, RobustnessResult
from .runner import (AccState, Part, Setup, call_model, class_logits, make_provenance, n_batches, resolve_shard, run_batches, run_state, setup,
                     state_key, stream_parts)

_log = logging.getLogger(__name__)

__all__ = ["ALEXNET_ERRORS", "ALEXNET_CLEAN_ERROR", "CorruptionCache", "robustness", "robustness_part", "check_baseline", "corruption_errors", "load_labels"]

# Mean top-1 error of AlexNet over severities 1-5 per ImageNet-C corruption, as published with the
# benchmark (Hendrycks & Dietterich, ICLR 2019; the normalisation of every mCE since).
ALEXNET_ERRORS = dict(zip(cc.BENCHMARK, (
    0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360,
    0.866816, 0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500,
)))
# AlexNet's clean ImageNet-1k top-1 error: torchvision's published acc@1 of 56.522 %.
ALEXNET_CLEAN_ERROR = 1.0 - 0.56522


class CorruptionCache:
    """Corrupted batches shared by several models' robustness grids over the same images: each cell's
    batch is corrupted once (``fanlens reproduce`` runs every zoo network on the same held-out images).

    Keyed by the corruption, the severity, the seed, the images' dataset indices and a hash of their
    pixels (BLAKE2b of the bytes, so models that read the images at another size or preprocessing get
    their own entries). Holds at most ``max_bytes`` of corrupted pixels; batches past that are corrupted
    again each time, not stored. The stored tensors are never written to (the grid only normalises
    them into new tensors)."""

    def __init__(self, max_bytes: int = 768 * 2**20) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._store: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def fingerprint(x: torch.Tensor) -> tuple:
        import hashlib

        data = x.detach().to("cpu").contiguous()
        digest = hashlib.blake2b(data.numpy().tobytes() if data.dtype != torch.bfloat16 else
                                 data.view(torch.int16).numpy().tobytes(), digest_size=16).hexdigest()
        return tuple(data.shape), str(data.dtype), digest

    def corrupt(self, x: torch.Tensor, print_: tuple, name: str, severity: int, seed: int,
                idx: Sequence[int]) -> torch.Tensor:
        key = (name, int(severity), int(seed), tuple(int(i) for i in idx), print_)
        with self._lock:  # the grid's cells are corrupted on several threads at once
            got = self._store.get(key)
            if got is not None:
                self.hits += 1
                return got
            self.misses += 1
        got = cc.corrupt(x, name, severity, seed=seed, indices=idx)
        size = got.element_size() * got.numel()
        with self._lock:
            if key not in self._store and self.bytes + size <= self.max_bytes:
                self._store[key] = got
                self.bytes += size
        return got


class _RobustAcc(AccState):
    """Per image: clean 0/1, then one 0/1 per (corruption, severity); one RunningStats."""

    def __init__(self, n_cells: int) -> None:
        self.infos = []
        self.stats = [RunningStats((n_cells + 1,), keep=True)]

    def _stat_lists(self):
        return {"stats": self.stats}


def load_labels(labels: Any, names: Sequence[str], class_index: Any = None) -> np.ndarray | None:
    """Labels for the image names of a run.

    ``labels``: ``None`` (no labels: flip rate); a sequence or tensor of class indices (one per
    image); ``"folders"`` (each image's parent folder is its class: ``class_index`` maps folder
    names to the model's class indices, as a dict or a JSON file; default the sorted folder
    names numbered 0, 1, ...); or a CSV file with ``file,label`` rows (``label`` an int, or a
    folder-style name mapped by ``class_index``), matched to the images by path or file name.
    """
    if labels is None:
        return None
    dupes = sorted({n for n in names if list(names).count(n) > 1}) if len(set(names)) != len(names) else []
    if dupes:
        _log.warning("the same image appears more than once (%s): each copy counts as an image", ", ".join(
            map(str, dupes[:3])) + (" ..." if len(dupes) > 3 else ""))
    out = _load_labels(labels, names, class_index)
    if out is not None and out.size and int(out.min()) < 0:
        bad = [str(names[i]) for i in np.flatnonzero(out < 0)[:3]]
        raise FanlensError(f"labels must be class indices >= 0. Got {int(out.min())} (for {', '.join(bad)}) instead.")
    return out


def _load_labels(labels: Any, names: Sequence[str], class_index: Any) -> np.ndarray | None:
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    mapping = _class_index(class_index)
    if isinstance(labels, (list, tuple)):
        if len(labels) != len(names):
            raise FanlensError(f"labels must hold one class per image ({len(names)}). Got {len(labels)} instead.")
        out = [_to_class(v, mapping, "labels") for v in labels]
        return np.asarray(out, dtype=np.int64)
    if isinstance(labels, str) and labels == "folders":
        folders = [Path(n).parent.name for n in names]
        if mapping is None:  # every class folder of the root, with images or not, so that indices do not shift
            roots = {Path(n).parent.parent for n in names}
            classes = set(folders)
            for root in roots:
                with contextlib.suppress(OSError):
                    classes |= {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
            empty = sorted(classes - set(folders))
            if empty:
                _log.warning("class folders without images: %s (numbered all the same, so that the other classes "
                             "keep their indices)", ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
            mapping = {f: i for i, f in enumerate(sorted(classes))}
        missing = sorted(set(folders) - set(mapping))
        if missing:
            raise FanlensError(f"class_index must name every class folder. Got none for {missing[:5]}.")
        return np.asarray([mapping[f] for f in folders], dtype=np.int64)
    if isinstance(labels, (str, os.PathLike)) and Path(labels).is_file():
        table: dict[str, Any] = {}
        repeated = []
        try:
            with open(labels, newline="") as f:
                for row in csv.reader(f):
                    if len(row) < 2 or row[0].strip().lower() in ("file", "filename", "path", "image"):
                        continue
                    key, val = row[0].strip(), row[1].strip()
                    if key in table and table[key] != val:
                        raise FanlensError(f"labels {str(labels)!r} gives {key!r} two classes ({table[key]!r} and "
                                           f"{val!r}); one row per image.")
                    if key in table:
                        repeated.append(key)
                    table[key] = val
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise FanlensError(f"labels must be a readable CSV file (file,label). Got {str(labels)!r}: {e}") from None
        if repeated:
            _log.warning("labels %s repeats rows for %s (the same class each time)", labels,
                         ", ".join(repeated[:3]) + (" ..." if len(repeated) > 3 else ""))
        out = []
        for n in names:
            key = n if n in table else Path(n).name
            if key not in table:
                raise FanlensError(f"labels must give a class for every image. {str(labels)!r} has none for {n!r}.")
            out.append(_to_class(table[key], mapping, "labels"))
        return np.asarray(out, dtype=np.int64)
    raise FanlensError(
        f"labels must be None, a list of class indices, 'folders' or a CSV file (file,label). Got {labels!r} instead."
    )


def _class_index(class_index: Any) -> dict[str, int] | None:
    if class_index is None:
        return None
    if isinstance(class_index, (str, os.PathLike)):
        try:
            class_index = json.loads(Path(class_index).read_text())
        except (OSError, ValueError) as e:
            raise FanlensError(f"class_index must be a JSON file mapping class names to indices. Got "
                               f"{str(class_index)!r}: {e}") from None
    if not isinstance(class_index, dict) or not all(isinstance(v, int) for v in class_index.values()):
        raise FanlensError(f"class_index must map class names to int indices. Got {class_index!r} instead.")
    return {str(k): int(v) for k, v in class_index.items()}


def _to_class(v: Any, mapping: dict | None, name: str) -> int:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, str):
        if mapping is not None and v in mapping:
            return mapping[v]
        try:
            return int(v)
        except ValueError:
            pass
    raise FanlensError(f"{name} must be class indices (or names in class_index). Got {v!r} instead.")


def _grid(corruptions: Any, severities: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if corruptions is None or corruptions == "all":
        corrs = cc.NAMES if corruptions == "all" else cc.BENCHMARK
    elif isinstance(corruptions, str):
        corrs = tuple(c.strip() for c in corruptions.split(",") if c.strip())
    else:
        corrs = tuple(corruptions)
    if not corrs:
        raise FanlensError("corruptions must name at least one corruption. Got none.")
    for c in corrs:
        check_choice("corruptions", c, cc.NAMES)
    if isinstance(severities, str):
        try:
            severities = [int(v) for v in severities.split(",") if v.strip()]
        except ValueError:
            raise FanlensError(f"severities must be comma-separated ints in 1..5. Got {severities!r} instead.") from None
    sevs = tuple(int(s) if isinstance(s, (int, np.integer)) and not isinstance(s, bool) else s for s in severities)
    if not sevs or any(s not in cc.SEVERITIES for s in sevs):
        raise FanlensError(f"severities must be ints in 1..5. Got {severities!r} instead.")
    if len(set(corrs)) != len(corrs) or len(set(sevs)) != len(sevs):
        raise FanlensError(f"corruptions and severities must not repeat. Got {corrs!r} and {sevs!r} instead.")
    return corrs, sevs


def corruption_errors(mean: np.ndarray, clean: float, corruptions: Sequence[str], severities: Sequence[int],
                      baseline: Any, *, skip_undefined: bool = False) -> tuple[str, np.ndarray, np.ndarray, float, float]:
    """CE and relative CE per corruption, mCE and relative mCE, against ``baseline``
    (``"alexnet"`` or a :class:`RobustnessResult` of top-1 errors on the same grid).

    A corruption under which the baseline makes no error has no CE: an error, or with
    ``skip_undefined=True`` a NaN CE left out of the mCE (the mCE is then over the others)."""
    c_n = len(corruptions)
    nan = np.full(c_n, np.nan)
    if baseline is None:
        return "", nan, nan.copy(), math.nan, math.nan
    if isinstance(baseline, str) and baseline == "alexnet":
        if tuple(severities) != cc.SEVERITIES:
            raise FanlensError(f"baseline 'alexnet' needs all five severities (its errors are their mean). Got "
                               f"{tuple(severities)} instead.")
        base_sum = np.array([5 * ALEXNET_ERRORS.get(c, np.nan) for c in corruptions])
        base_clean, label = ALEXNET_CLEAN_ERROR, "alexnet"
    elif isinstance(baseline, RobustnessResult):
        if baseline.metric != "top1_error":
            raise FanlensError("baseline must hold top-1 errors (a run with labels). Got a flip-rate result instead.")
        if tuple(baseline.severities) != tuple(severities) or not set(corruptions) <= set(baseline.corruptions):
            raise FanlensError(
                f"baseline must cover the same corruptions and severities. Got {baseline.corruptions} x "
                f"{baseline.severities} for {tuple(corruptions)} x {tuple(severities)}."
            )
        rows = [baseline.corruptions.index(c) for c in corruptions]
        base_sum = np.asarray(baseline.mean)[rows].sum(1)
        base_clean, label = float(baseline.clean[0]), baseline.model
    else:
        raise FanlensError(f"baseline must be None, 'alexnet' or a RobustnessResult. Got {baseline!r} instead.")
    n_s = len(severities)
    known = np.isfinite(base_sum)
    zero = [c for c, b, k in zip(corruptions, base_sum, known) if k and b <= 0]
    if zero and not skip_undefined:
        raise FanlensError(f"baseline must make errors under every corruption to normalise by. Got none under "
                           f"{zero} (CE undefined); choose another baseline.")
    base_rel = base_sum - n_s * base_clean
    with np.errstate(divide="ignore", invalid="ignore"):
        known = known & (base_sum > 0)
        ce = np.where(known, mean.sum(1) / base_sum, np.nan)
        # relative CE is undefined (NaN, left out of the tables) where the baseline loses nothing to the corruption
        rel = np.where(known & (base_rel > 0), (mean.sum(1) - n_s * clean) / base_rel, np.nan)
    bench = [i for i, c in enumerate(corruptions) if c in cc.BENCHMARK and np.isfinite(ce[i])]
    mce = float(np.mean(ce[bench])) if bench else math.nan
    rmce = float(np.mean(rel[bench])) if bench and np.isfinite(rel[bench]).all() else math.nan
    return label, ce, rel, mce, rmce


def robustness(
    model: Any,
    images: Any = "samples",
    *,
    corruptions: Sequence[str] | str | None = None,
    severities: Sequence[int] | str = cc.SEVERITIES,
    labels: Any = None,
    class_index: Any = None,
    baseline: Any = None,
    n_images: int = 512,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pretrained: bool = False,
    checkpoint: str | None = None,
    input_size: int | Sequence[int] | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    state_dir: str | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    probe_severity: int | None = None,
) -> RobustnessResult | tuple[RobustnessResult, ProbeResult]:
    """Top-1 error (or flip rate) of ``model`` under ImageNet-C corruptions, with CE and mCE.

    Args:
        model: a module or a spec, as in :func:`fanlens.spectrum`.
        images: as in :func:`fanlens.spectrum`, or ``"synthetic"``: ``n_images`` held-out images of
            the zoo's procedural task (:data:`fanlens.zoo.DEFAULT_TASK`) with their labels.
        corruptions: names from :data:`fanlens.corruptions.NAMES`, comma-separated or a list;
            ``None`` for the 15 benchmark corruptions, ``"all"`` for the 19.
        severities: ints in 1..5 (default all five).
        labels, class_index: see :func:`load_labels`; without labels the metric is the flip rate.
        baseline: ``"alexnet"``, an earlier :class:`~fanlens.results.RobustnessResult` (or the folder
            it was saved in), or ``None`` (no CE).
        seed: the corruptions' random draws (with each image's index); also seeds a model built
            from a spec.
        shard, state_dir, checkpoint_every, resume: as in :func:`fanlens.spectrum`.
        probe_severity: also run the probe under corruptions (``fanlens.noise_probe(model,
            images, corruption=corruptions, severity=probe_severity)``, default blocks) from the
            same forward passes: the clean images and their copies at this severity go through
            the model once, under the token capture, and are classified from that pass.

    Returns:
        :class:`~fanlens.results.RobustnessResult`, or ``(RobustnessResult, ProbeResult)`` with
        ``probe_severity``.
    """
    corrs, sevs = _grid(corruptions, severities)
    check_positive_int("batch_size", batch_size)
    if probe_severity is not None and (isinstance(probe_severity, bool) or probe_severity not in sevs):
        raise FanlensError(f"probe_severity must be one of the severities {list(sevs)} (its corrupted copies are "
                           f"classified and probed in one pass). Got {probe_severity!r} instead.")
    baseline = check_baseline(baseline)
    if isinstance(images, str) and images == "synthetic":
        from .synthetic import TASKS
        from .zoo import DEFAULT_TASK

        check_positive_int("n_images", n_images, maximum=100_000, why="procedural images are rendered into memory")
        if labels is not None:
            raise FanlensError("labels must be left out with images='synthetic' (the procedural images carry their own).")
        x, y, _ = TASKS[DEFAULT_TASK](n_images, seed=seed, split="test").batch(range(n_images))
        images, labels = x, y
    from .lens import Lens

    lens = Lens.one_shot(model, images, batch_size=batch_size, device=device, seed=seed, pretrained=pretrained,
                         checkpoint=checkpoint, input_size=input_size, progress=progress, shard=shard,
                         state_dir=state_dir, checkpoint_every=checkpoint_every, resume=resume,
                         check_blocks=probe_severity is not None)
    return lens.robustness(corruptions=corrs, severities=sevs, labels=labels, class_index=class_index,
                           baseline=baseline, probe_severity=probe_severity)


def check_baseline(baseline: Any) -> Any:
    """``baseline`` as :func:`robustness` takes it, with a saved run's folder loaded: ``None``,
    ``"alexnet"`` or a :class:`~fanlens.results.RobustnessResult`."""
    if isinstance(baseline, (str, os.PathLike)) and str(baseline) != "alexnet":
        from .results import load

        try:
            baseline = load(baseline)
        except FanlensError as e:
            raise FanlensError(f"baseline must be 'alexnet' or the folder of an earlier robustness run. Got "
                               f"{str(baseline)!r}: {e}") from None
        if not isinstance(baseline, RobustnessResult):
            raise FanlensError(f"baseline must be the folder of a robustness run. Got a {baseline.KIND} result.")
    return baseline


def robustness_part(s: Setup, *, seed: int, batch_size: int, processes: int = 1,
                    corruptions: Sequence[str] | str | None = None, severities: Sequence[int] | str = cc.SEVERITIES,
                    labels: Any = None, class_index: Any = None, baseline: Any = None,
                    probe_severity: int | None = None, corrupted: CorruptionCache | None = None):
    """:func:`robustness` for ``s`` made by :func:`fanlens.runner.setup` (``baseline`` already a
    result or ``"alexnet"``), as a share of a pass: ``(part, step, state key, finish)``.

    ``part`` (for :func:`fanlens.runner.stream_parts`) classifies the clean images from the
    pass's outputs, adds the probe's corrupted copies at ``probe_severity`` and classifies them
    from the same outputs; every other cell is corrupted and forwarded by the part itself,
    without the capture. ``step(x, idx)`` does all of it alone (for :func:`fanlens.runner.
    run_batches`, no capture). ``finish()`` returns what :func:`robustness` returns. ``corrupted``: a
    :class:`CorruptionCache` shared with other models' grids over the same images (the same pixels).
    """
    corrs, sevs = _grid(corruptions, severities)
    y_all = load_labels(labels, s.images.names, class_index)
    metric = "top1_error" if y_all is not None else "flip_rate"
    if baseline is not None:  # checked before any work
        if metric != "top1_error":
            raise FanlensError("baseline needs top-1 errors: give labels (or images='synthetic').")
        corruption_errors(np.full((len(corrs), len(sevs)), 0.5), 0.5, corrs, sevs, baseline)
    cells = [(c, v) for c in corrs for v in sevs]
    acc = _RobustAcc(len(cells))
    params = dict(analysis="robustness", metric=metric, corruptions=list(corrs), severities=list(sevs),
                  batch_size=batch_size, processes=processes, labels=None if labels is None else (
                      labels if isinstance(labels, str) else "given"), class_index=class_index if not isinstance(
                      class_index, dict) else "given",
                  corruption_draws="SeedSequence([seed, image_index, 2, corruption_index])",
                  ci="normal 95% interval of the mean over images", probe_severity=probe_severity)
    model_ = s.lm.model

    def predictions(out: Any, idx) -> torch.Tensor:
        out = class_logits(out, "robustness")
        if not bool(torch.isfinite(out).all()):
            raise FanlensError(f"the model's output holds non-finite values (NaN or inf) for images {list(idx)}.")
        if y_all is not None and out.shape[-1] <= int(y_all.max()):
            raise FanlensError(f"labels must be class indices below the model's {out.shape[-1]} outputs. Got "
                               f"{int(y_all.max())} instead.")
        return out.argmax(-1).cpu()

    def step(x: torch.Tensor, idx: list[int], known: dict | None = None) -> None:
        """Classify the batch clean and in every cell; ``known``: the outputs already computed
        (``None`` for the clean images, ``(corruption, severity)`` for a cell)."""
        known = known or {}
        with torch.inference_mode():
            def predict(key, make):
                out = known.get(key)
                return predictions(out if out is not None else call_model(model_, s.cfg.normalize(make().to(s.device))), idx)

            clean = predict(None, lambda: x)
            ref = torch.from_numpy(y_all[idx]) if y_all is not None else clean
            print_ = corrupted.fingerprint(x) if corrupted is not None and any(k not in known for k in cells) else None

            def errors(cell: tuple[str, int]) -> torch.Tensor:
                c, v = cell
                make = ((lambda: cc.corrupt(x, c, v, seed=seed, indices=idx)) if print_ is None else
                        (lambda: corrupted.corrupt(x, print_, c, v, seed, idx)))
                return (predict(cell, make) != ref).double()

            # the cells' corruptions and forwards on the caller's cores, one intra-op thread each
            # (fanlens._threads.map_items: the same bits as one after the other on torch's pool)
            cols = [(clean != ref).double()] + map_items(errors, cells, s.device)
        acc.stats[0].update(torch.stack(cols, 1).numpy(), idx)

    probe_cells = [(c, probe_severity) for c in corrs] if probe_severity is not None else []
    if probe_cells:
        from .analysis import corruption_probe_part

        part, probe_params = corruption_probe_part(s, probe_cells, seed, batch_size=batch_size, processes=processes)
    else:
        part, probe_params = Part(), None

    def classify(out: torch.Tensor, x: torch.Tensor, idx: list[int]) -> None:
        b = x.shape[0]
        known = {None: out[:b]}
        known.update({cell: out[(j + 1) * b : (j + 2) * b] for j, cell in enumerate(probe_cells)})
        step(x, idx, known)

    part.outputs, part.output_accs = classify, [acc]

    def finish():
        merged = merge_stats(acc.stats)[0]
        summ = merged.summary()
        per_image = merged.per_image()[1].astype(np.uint8)  # 0/1: clean, then every (corruption, severity)
        shape = (len(corrs), len(sevs))
        grid = {k: np.asarray(getattr(summ, k))[1:].reshape(shape) for k in ("mean", "std", "ci_low", "ci_high")}
        clean = np.array([float(getattr(summ, k)[0]) for k in ("mean", "std", "ci_low", "ci_high")])
        label, ce, rel, mce, rmce = corruption_errors(grid["mean"], float(clean[0]), corrs, sevs, baseline)
        result = RobustnessResult(
            blocks=(), metric=metric, corruptions=corrs, severities=sevs, n_images=summ.n, **grid, clean=clean,
            baseline=label, ce=ce, relative_ce=rel, mce=mce, relative_mce=rmce,
            provenance=make_provenance(s, seed, dict(params, baseline=label), s.images.names),
            per_image=per_image,
        )
        if not probe_cells:
            return result
        return result, part.accs[0].result(make_provenance(s, seed, probe_params, s.images.names), "pixel")

    return part, step, state_key(s, seed, params), finish
