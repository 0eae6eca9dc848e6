"""Training on the procedural tasks: the zoo models, and any model of the user's, reproducibly.

``fanlens train-zoo NAME`` (or :func:`fanlens.zoo.train`) renders a fixed training pool of
:class:`~fanlens.synthetic.SyntheticShapes`, trains with AdamW, a linear warm-up and a
cosine schedule, label smoothing and random flips, in float32 (bf16 autocast is slower on
CPUs without bf16 matrix units), then evaluates on the validation split. Every zoo model
gets the same budget (:data:`STEPS` steps of :data:`DEFAULT_BATCH` images); only the
learning rate is the architecture's own (:data:`RECIPES`).

The zoo's networks also follow two rules: the task's stop rule (``TASKS[task]["stop_at"]``) and
the extension rule (:data:`EXTENSION_STEPS`: a network whose planned steps end without the stop
rule trains one more cycle from its weights, ``warm_start``).

With ``snapshots`` the weights are also kept at fractions of the steps (0 is the
initialisation), each with its validation accuracy, for the analysis of how grouping and
robustness emerge during training (``fanlens training-dynamics``).

Files go through the output-folder writer (:class:`fanlens.runner.OutputFolder`):
``NAME.safetensors`` (fp16), ``NAME.json`` (the card) and ``NAME-snapshots/step-SSSSSS.safetensors``.
The weights shipped inside the package are replaced only with ``into_package=True`` (CLI
``fanlens train-zoo --into-package``), a maintainer option.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from torch import nn

from .._validation import FanlensError, check_nonneg_float, check_positive_int, check_seed
from ..runner import OutputFolder
from ..synthetic import TASKS as DATASETS
from ..synthetic import SyntheticShapes
from ._arch import DEFAULT_TASK, TASKS, ZOO_DATA_CONFIG, architecture, build, check_name, check_task, data_config, network_name

__all__ = ["output_folder", "RECIPES", "STEPS", "DEFAULT_SNAPSHOTS", "TrainedModel", "train", "train_model", "write_trained",
           "evaluate", "parse_snapshots"]

_log = logging.getLogger(__name__)

# One budget for every zoo model: STEPS steps of DEFAULT_BATCH images (measured on 2 CPU cores:
# about 0.25 s per step for the ViT, 0.4 s for the FAN, 0.11 s for the CNN).
STEPS = 3000
RECIPES: dict[str, dict[str, Any]] = {
    "vit": dict(lr=1e-3, weight_decay=0.05, warmup=100),
    "fan": dict(lr=1e-3, weight_decay=0.05, warmup=100),
    "cnn": dict(lr=2e-3, weight_decay=0.05, warmup=100),
}
DEFAULT_RECIPE = dict(lr=1e-3, weight_decay=0.05, warmup=100)  # the heads variants and the user's models
DEFAULT_SNAPSHOTS = (0.0, 0.05, 0.2, 0.5, 1.0)
DEFAULT_BATCH = 64
DEFAULT_POOL = 12000
MAX_POOL = 500_000
DEFAULT_VAL = 1000
LABEL_SMOOTHING = 0.1
CHECK_EVERY = 50
"""With ``stop_at``: steps between validation checks (the first check comes after the warm-up)."""
EXTENSION_STEPS = 1000
"""The zoo's extension rule (written down before any network was trained under it): a network whose
:data:`STEPS` planned steps end without the task's stop rule trains one more cosine cycle of this many steps
(a warm restart: its weights, a fresh AdamW, the same warm-up, learning rate and stop rule, a new data order;
``warm_start``). It applies to every such network alike, whatever its accuracy."""


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(ZOO_DATA_CONFIG["mean"])[:, None, None]
    std = torch.tensor(ZOO_DATA_CONFIG["std"])[:, None, None]
    return (x - mean) / std


def _render(ds: SyntheticShapes, progress: bool, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs = torch.empty((len(ds), 3, ds.size, ds.size), dtype=torch.uint8)
    ys = torch.empty(len(ds), dtype=torch.long)
    it = range(len(ds))
    if progress:
        from ..runner import progress_bar

        it = progress_bar(it, desc=desc, unit="img", leave=False)
    for i in it:
        x, y, _ = ds[i]
        xs[i] = (x * 255).round().to(torch.uint8)
        ys[i] = y
    return xs, ys


@torch.no_grad()
def evaluate(model: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy of ``model`` on uint8 pixels ``xs`` and labels ``ys``."""
    model.eval()
    correct = 0
    for i in range(0, len(xs), batch_size):
        logits = model(_normalize(xs[i : i + batch_size].float() / 255))
        correct += int((logits.argmax(-1) == ys[i : i + batch_size]).sum())
    return correct / len(xs)


@dataclass(frozen=True)
class TrainedModel:
    """A trained model in memory: the module (eval mode), its card and its files (name -> bytes)."""

    name: str
    card: dict
    files: dict
    model: nn.Module | None = None


def train(
    model: str | nn.Module,
    *,
    budget_s: float | None = None,
    steps: int | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    into_package: bool = False,
    **kwargs: Any,
) -> TrainedModel:
    """Train a zoo model (by name) or a model of your own on a procedural task (:mod:`fanlens.synthetic`).

    Args:
        model: a zoo name (``"vit"``, ``"fan"``, ``"cnn"``, ``"vit-h1"``, ...) or an
            ``nn.Module`` taking ``(B, 3, 64, 64)`` images (normalised with mean and std 0.5)
            and returning one logit per class of the task (10 for ``textures``, the default; 8 for
            ``shapes``); a module is trained in place.
        budget_s: train for about this many seconds (the step count is fixed after the first
            steps from their measured speed and recorded in the card; the numbers then depend
            on the machine's speed, use ``steps`` for a reproducible run).
        steps: optimisation steps (default: :data:`STEPS`); excludes ``budget_s``.
        out_dir: also write the weights and the card there (new or empty unless ``overwrite``).
        into_package: maintainers: write into the package's weights folder instead.
        kwargs: as in :func:`train_model` (``seed``, ``snapshots``, ``lr``, ...).

    Returns:
        :class:`TrainedModel` (``.model`` in eval mode, ``.card`` with the validation accuracy).
    """
    out = None
    if out_dir is not None or into_package:
        out = output_folder(out_dir, overwrite=overwrite, into_package=into_package,
                            task=kwargs.get("task", DEFAULT_TASK))
    trained = train_model(model, budget_s=budget_s, steps=steps, **kwargs)
    if out is not None:
        write_trained(out, [trained])
    return trained


def output_folder(out_dir: Any, *, overwrite: bool, into_package: bool, task: str = DEFAULT_TASK) -> OutputFolder:
    if into_package:
        if out_dir is not None:
            raise FanlensError(f"out_dir and into_package exclude each other. Got out_dir={str(out_dir)!r} instead.")
        folder = TASKS[check_task(task)]["weights"]
        folder.mkdir(parents=True, exist_ok=True)
        return OutputFolder(folder, overwrite=True, command="train-zoo", allow_package=True, marker=False)
    return OutputFolder(out_dir, overwrite=overwrite, command="train-zoo", param="out_dir")


def write_trained(out: OutputFolder, models: list[TrainedModel]) -> list[Path]:
    """Write the trained models' files into ``out`` as one unit; returns the paths."""
    with out.staging() as tmp:
        for m in models:
            for fname, data in m.files.items():
                (tmp / fname).parent.mkdir(parents=True, exist_ok=True)
                (tmp / fname).write_bytes(data)
    for m in models:
        _log.info("wrote %s into %s", m.name, out.path)
    return out.written


def parse_snapshots(snapshots: Any, param: str = "snapshots") -> tuple[float, ...]:
    """Fractions of the training steps in [0, 1], sorted, from a sequence or a comma-separated
    string of percentages (``"0,5,20,50,100"``)."""
    if snapshots is None or (not isinstance(snapshots, str) and len(snapshots) == 0):
        return ()
    if isinstance(snapshots, str):
        try:
            vals = [float(v) / 100 for v in snapshots.split(",") if v.strip()]
        except ValueError:
            raise FanlensError(f"{param} must be comma-separated percentages such as 0,5,20,50,100. Got "
                               f"{snapshots!r} instead.") from None
    else:
        try:
            vals = [float(v) for v in snapshots]
        except (TypeError, ValueError):
            raise FanlensError(f"{param} must be fractions of the steps in [0, 1]. Got {snapshots!r} instead.") from None
    if not vals or any(not (0.0 <= v <= 1.0) or not math.isfinite(v) for v in vals):
        raise FanlensError(f"{param} must be fractions of the steps in [0, 1] (percentages 0-100 on the command "
                           f"line). Got {snapshots!r} instead.")
    return tuple(sorted(set(vals)))


def _state_bytes(model: nn.Module, name: str, extra: dict | None = None) -> bytes:
    from safetensors.torch import save

    sd = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
          for k, v in model.state_dict().items()}
    return save(sd, metadata={"name": name, "format": "pt", **{k: str(v) for k, v in (extra or {}).items()}})


_CYCLE_KEYS = ("training", "validation_accuracy", "wall_time_s", "cpu_time_s", "train_time_s", "seconds_per_step",
               "machine", "versions")


def _cycle_summary(card: dict) -> dict:
    return {k: card.get(k) for k in _CYCLE_KEYS}


def _warm_start(model: nn.Module, path: Any, *, name: str, seed: int, task: str, data_seed: int) -> tuple[list, dict]:
    """Load an earlier cycle's weights into ``model``; returns (the earlier cycles' summaries, the file record)."""
    from ..models._loading import file_sha256, load_state_dict_checked, load_state_dict_file

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise FanlensError(f"warm_start must be an existing .safetensors file of an earlier cycle. Got {str(path)!r} "
                           "instead.")
    card_path = path.with_suffix(".json")
    try:
        prev = json.loads(card_path.read_text())
    except (OSError, ValueError) as e:
        raise FanlensError(f"warm_start needs the earlier cycle's card beside its weights; {str(card_path)!r} could "
                           f"not be read ({type(e).__name__}).") from None
    if not isinstance(prev, dict) or not isinstance(prev.get("training"), dict):
        raise FanlensError(f"warm_start: {str(card_path)!r} is not a fanlens training card.")
    got = (prev.get("name"), prev["training"].get("seed"), (prev.get("data") or {}).get("task"),
           (prev.get("data") or {}).get("data_seed"))
    if got != (name, seed, task, data_seed):
        raise FanlensError(f"warm_start must be an earlier cycle of the same network (name, seed, task, data seed "
                           f"{(name, seed, task, data_seed)}). Got {got} from {str(card_path)!r} instead.")
    try:
        # safetensors only (checked above); the fp16 values are copied into the model's float32 parameters
        load_state_dict_checked(model, load_state_dict_file(path), repr(str(path)))
    except FanlensError as e:
        raise FanlensError(f"warm_start: {e}") from None
    earlier = list(prev.get("earlier_cycles") or []) + [_cycle_summary(prev)]
    return earlier, {"file": path.name, "sha256": file_sha256(path), "steps_before": sum(
        c["training"]["steps"] for c in earlier)}


def _check_module(model: nn.Module, x: torch.Tensor, classes: Sequence[str], task: str) -> None:
    with torch.no_grad():
        try:
            out = model.eval()(_normalize(x[:2].float() / 255))
        except Exception as e:  # the user's module: one line naming what failed
            raise FanlensError(f"model must take (B, 3, 64, 64) images; its forward raised "
                               f"{type(e).__name__}: {e}") from None
    if not isinstance(out, torch.Tensor) or out.shape != (2, len(classes)):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FanlensError(f"model must return {len(classes)} logits per image for the {task} task. Got "
                           f"output {shape} for 2 images instead.")


def train_model(
    model: str | nn.Module,
    *,
    seed: int = 0,
    data_seed: int = 0,
    task: str = DEFAULT_TASK,
    steps: int | None = None,
    budget_s: float | None = None,
    batch_size: int = DEFAULT_BATCH,
    pool: int = DEFAULT_POOL,
    val_size: int = DEFAULT_VAL,
    snapshots: Any = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    warmup: int | None = None,
    stop_at: float | None = None,
    warm_start: str | Path | None = None,
    progress: bool = True,
) -> TrainedModel:
    """Train in memory (nothing is written); see :func:`train` for the arguments and to write files.

    ``snapshots``: fractions of the steps (e.g. :data:`DEFAULT_SNAPSHOTS`) at which the weights
    and the validation accuracy are kept (0: before the first step; 1: the final weights).
    ``lr``, ``weight_decay``, ``warmup`` override the recipe. ``task``: ``"shapes"`` or ``"textures"``
    (:mod:`fanlens.synthetic`); ``seed`` seeds the initialisation and the data order, and a zoo
    network's files are named by it (``vit@1``; seed 0 is plain ``vit``).

    ``stop_at``: a validation accuracy in (0, 1]; every :data:`CHECK_EVERY` steps after the warm-up the
    model is evaluated on the validation split and training ends at the first check at or above it
    (the schedule stays the one planned for ``steps``, so a stopped network is exactly the first steps
    of the full run). The zoo's tasks name their rule (``TASKS[task]["stop_at"]``: 0.92 for textures,
    where the CNN and the FAN otherwise end at 99 %); the card records the step it stopped at.
    Excludes ``snapshots`` (their fractions refer to the planned steps).

    ``warm_start``: the ``.safetensors`` of an earlier cycle of this same network, with its card
    (``NAME.json``) beside it: training starts from those weights (stored in fp16) with a fresh
    optimiser and a new schedule of ``steps`` (a warm restart), and a data order of its own (seeded
    by the seed and the cycle number, so the batches are not the first cycle's again). The card
    keeps the earlier cycles under ``earlier_cycles`` and the sums under ``total_*``; the file's
    SHA-256 is recorded. Loading never executes pickled code (safetensors).
    """
    check_task(task)
    if isinstance(model, str):
        name = check_name(model)
        recipe = dict(RECIPES.get(name, DEFAULT_RECIPE))
        arch = architecture(name, task)[1]
    elif isinstance(model, nn.Module):
        name = type(model).__name__
        recipe = dict(DEFAULT_RECIPE)
        arch = {"cls": f"{type(model).__module__}.{type(model).__qualname__}"}
    else:
        raise FanlensError(f"model must be a zoo name or an nn.Module. Got {type(model).__name__} instead.")
    check_seed(seed)
    check_seed(data_seed, "data_seed")
    if steps is not None and budget_s is not None:
        raise FanlensError("steps and budget_s exclude each other; pass one.")
    if budget_s is not None:
        check_nonneg_float("budget_s", budget_s)
        if not budget_s > 0:
            raise FanlensError(f"budget_s must be a positive number of seconds. Got {budget_s!r} instead.")
    total = STEPS if steps is None else check_positive_int("steps", steps, maximum=10_000_000)
    for key, val in (("lr", lr), ("weight_decay", weight_decay)):
        if val is not None:
            recipe[key] = check_nonneg_float(key, val)
    if warmup is not None:
        recipe["warmup"] = check_positive_int("warmup", warmup, minimum=0)
    check_positive_int("batch_size", batch_size)
    check_positive_int("pool", pool, maximum=MAX_POOL, why="rendered images are kept in memory, 12 KiB each")
    check_positive_int("val_size", val_size, maximum=MAX_POOL, why="rendered images are kept in memory, 12 KiB each")
    fractions = parse_snapshots(snapshots)
    if stop_at is not None:
        stop_at = check_nonneg_float("stop_at", stop_at)
        if not 0 < stop_at <= 1:
            raise FanlensError(f"stop_at must be a validation accuracy in (0, 1]. Got {stop_at!r} instead.")
        if fractions:
            raise FanlensError("stop_at and snapshots exclude each other: snapshots are fractions of the planned "
                               "steps, which a stopped run does not reach.")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    dataset = DATASETS[task]
    if isinstance(model, str):
        model = build(name, seed=seed, task=task)
        name = network_name(name, seed)
    earlier, cycle, warm_from = [], 0, None
    if warm_start is not None:
        earlier, warm_from = _warm_start(model, warm_start, name=name, seed=seed, task=task, data_seed=data_seed)
        cycle = len(earlier)
    xs, ys = _render(dataset(pool, seed=data_seed, split="train"), progress, f"render train ({name})")
    xv, yv = _render(dataset(val_size, seed=data_seed, split="val"), progress, "render val")
    if not isinstance(model, str):
        _check_module(model, xv, dataset.classes, task)
    if getattr(model, "pretrained_cfg", None) is None:
        model.pretrained_cfg = data_config(task)
    model.train()
    t_data = time.perf_counter() - t_start

    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe["lr"],
    )
    warm = recipe["warmup"]
    timed = min(10, total)  # with a budget, the step count is fixed after these steps

    def lr_at(step: int) -> float:
        if step < warm:
            return recipe["lr"] * (step + 1) / warm
        return recipe["lr"] * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    def snapshot_steps() -> dict[int, float]:
        return {min(total, max(int(round(f * total)), timed if f > 0 and budget_s is not None else 0)): f
                for f in fractions}

    snaps: list[dict] = []
    files: dict[str, bytes] = {}

    def take_snapshot(step: int, frac: float) -> None:
        acc = evaluate(model, xv, yv)
        model.train()
        fname = f"{name}-snapshots/step-{step:06d}.safetensors"
        files[fname] = _state_bytes(model, name, {"step": step})
        snaps.append({"fraction": frac, "step": step, "validation_accuracy": acc, "file": fname})

    # cycle 0: the seed itself (the shipped networks' data order); a later cycle: a stream of its own
    g = torch.Generator().manual_seed(seed if cycle == 0 else
                                      int(np.random.SeedSequence([seed, cycle]).generate_state(1)[0]))
    bar = None
    if progress:
        from ..runner import progress_bar

        bar = progress_bar(None, total=total, desc=f"train {name}", unit="step")
    losses = []
    t_train = time.perf_counter()
    at = snapshot_steps()
    step = 0
    stopped = None  # (step, validation accuracy) where stop_at ended the run
    while step < total:
        if step in at:
            take_snapshot(step, at.pop(step))
        idx = torch.randint(len(xs), (batch_size,), generator=g)
        x = xs[idx].float() / 255
        flip_h = torch.rand(batch_size, generator=g) < 0.5
        flip_v = torch.rand(batch_size, generator=g) < 0.5
        x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
        x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = F.cross_entropy(model(_normalize(x)), ys[idx], label_smoothing=LABEL_SMOOTHING)
        if not torch.isfinite(loss):
            raise FanlensError(f"training {name} diverged at step {step} (loss {loss.item()}).")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if budget_s is not None and step == timed:
            per_step = (time.perf_counter() - t_train) / step
            total = max(step, int((budget_s - (time.perf_counter() - t_start)) / per_step) + step)
            at = {k: v for k, v in snapshot_steps().items() if v > 0}  # fraction 0 was taken at step 0
            if bar is not None:
                bar.total = total
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if stop_at is not None and step >= warm and step % CHECK_EVERY == 0 and step < total:
            acc = evaluate(model, xv, yv)
            model.train()
            if acc >= stop_at:
                stopped = (step, acc)
                break
    if bar is not None:
        bar.close()
    t_train = time.perf_counter() - t_train
    val_acc = evaluate(model, xv, yv)
    for st, frac in sorted(at.items()):  # the final weights (fraction 1)
        snaps.append({"fraction": frac, "step": st, "validation_accuracy": val_acc,
                      "file": f"{name}-snapshots/step-{st:06d}.safetensors"})
        files[snaps[-1]["file"]] = _state_bytes(model, name, {"step": st})
    wall = time.perf_counter() - t_start

    import timm

    from .._version import __version__

    card = {
        "name": name,
        "architecture": arch,
        "num_params": sum(p.numel() for p in model.parameters()),
        "data": {
            "task": task,
            "dataset": f"fanlens.synthetic.{dataset.__name__}",
            "classes": list(dataset.classes),
            "data_seed": data_seed,
            "train_pool": pool,
            "val_size": val_size,
            "image_size": 64,
            "normalization": {"mean": list(ZOO_DATA_CONFIG["mean"]), "std": list(ZOO_DATA_CONFIG["std"])},
            "augmentation": "random horizontal and vertical flips",
        },
        "training": {
            "seed": seed,
            "seed_use": "initialisation (torch.manual_seed before the model is built) and data order (batch "
                        "indices and flips)",
            "steps": step,
            "planned_steps": total,
            "budget": f"{total} steps x {batch_size} images" + (f" (from budget_s={budget_s:g})" if budget_s else ""),
            "stop_rule": (None if stop_at is None else
                          f"stop at the first validation check (every {CHECK_EVERY} steps after the warm-up) with "
                          f"accuracy >= {stop_at:g}"),
            "stopped_at_step": None if stopped is None else stopped[0],
            "batch_size": batch_size,
            "optimizer": "AdamW",
            "schedule": f"linear warm-up {warm} steps, cosine to 0 over {total} steps",
            "label_smoothing": LABEL_SMOOTHING,
            "grad_clip": 1.0,
            "precision": "float32 (weights stored as fp16)",
            "lr": recipe["lr"],
            "weight_decay": recipe["weight_decay"],
            "final_train_loss": float(np.mean(losses[-50:])) if losses else None,
        },
        "validation_accuracy": val_acc,
        "snapshots": sorted(snaps, key=lambda s: s["step"]),
        "wall_time_s": round(wall, 1),
        # CPU seconds of the process, all threads: unlike the wall time, not inflated while the process
        # was stopped or waited for the cores
        "cpu_time_s": round(time.process_time() - cpu_start, 1),
        "train_time_s": round(t_train, 1),
        "data_time_s": round(t_data, 1),
        "seconds_per_step": round(t_train / max(step, 1), 4),
        "machine": {"device": "cpu", "cpus": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "versions": {"fanlens": __version__, "torch": torch.__version__, "timm": timm.__version__},
    }
    if warm_from is not None:
        card["training"].update(cycle=cycle, warm_start=warm_from, data_order_seed=f"SeedSequence([{seed}, {cycle}])",
                                schedule=f"warm restart from cycle {cycle - 1}'s weights (fresh AdamW): linear "
                                         f"warm-up {warm} steps, cosine to 0 over {total} steps")
        card["earlier_cycles"] = earlier
        cycles = earlier + [_cycle_summary(card)]
        card["total_steps"] = sum(c["training"]["steps"] for c in cycles)
        card["total_wall_time_s"] = round(sum(c["wall_time_s"] for c in cycles), 1)
        cpus = [c.get("cpu_time_s") for c in cycles]
        card["total_cpu_time_s"] = None if None in cpus else round(sum(cpus), 1)
    files[f"{name}.safetensors"] = _state_bytes(model, name)
    files[f"{name}.json"] = (json.dumps(card, indent=2) + "\n").encode()
    _log.info("trained %s: val acc %.3f in %.0f s", name, val_acc, wall)
    return TrainedModel(name, card, files, model.eval())
