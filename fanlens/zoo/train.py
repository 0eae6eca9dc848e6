"""Training of the zoo models on the procedural shapes: reproducible from a seed.

``fanlens train-zoo NAME`` (or :func:`train`) renders a fixed training pool of
:class:`~fanlens.synthetic.SyntheticShapes`, trains with AdamW, a linear warm-up and a
cosine schedule, label smoothing and random flips, in float32 (bf16 autocast is slower on
CPUs without bf16 matrix units), then evaluates on the validation split and writes
``NAME.safetensors`` (fp16) and ``NAME.json`` (the card) into a folder of the caller's
choosing, through the output-folder writer (:class:`fanlens.runner.OutputFolder`). The
weights shipped inside the package are replaced only with ``into_package=True`` (CLI
``fanlens train-zoo --into-package``), a maintainer option.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._validation import FanlensError, check_positive_int, check_seed
from ..runner import OutputFolder
from ..synthetic import SHAPE_CLASSES, SyntheticShapes
from . import ARCHITECTURES, WEIGHTS_DIR, ZOO_DATA_CONFIG, _check_name, build

__all__ = ["RECIPES", "TrainedModel", "train", "train_model", "write_trained", "evaluate"]

_log = logging.getLogger(__name__)

# steps sized so that each model trains in under 20 minutes on 2 CPU cores (measured:
# about 1.1 s per step for the ViT, 1.3 s for the FAN, 0.4 s for the CNN)
RECIPES: dict[str, dict[str, Any]] = {
    "vit": dict(steps=950, lr=1e-3, weight_decay=0.05, warmup=60),
    "fan": dict(steps=780, lr=1e-3, weight_decay=0.05, warmup=60),
    "cnn": dict(steps=2400, lr=2e-3, weight_decay=0.05, warmup=60),
}
DEFAULT_BATCH = 64
DEFAULT_POOL = 12000
DEFAULT_VAL = 1000
LABEL_SMOOTHING = 0.1


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
    """A trained zoo model in memory: its card and its files (name -> bytes)."""

    name: str
    card: dict
    files: dict


def train(
    name: str,
    *,
    out_dir: str | Path,
    overwrite: bool = False,
    into_package: bool = False,
    **kwargs: Any,
) -> dict:
    """Train zoo model ``name`` and write ``NAME.safetensors`` and ``NAME.json`` into ``out_dir``.

    ``out_dir`` must be new or empty unless ``overwrite=True``; it is checked before training.
    ``into_package=True`` (maintainers) writes into the package's weights folder instead and
    excludes ``out_dir``. Other keyword arguments as in :func:`train_model`. Returns the card.
    """
    out = _output_folder(out_dir, overwrite=overwrite, into_package=into_package)
    trained = train_model(name, **kwargs)
    write_trained(out, [trained])
    return trained.card


def _output_folder(out_dir: Any, *, overwrite: bool, into_package: bool) -> OutputFolder:
    if into_package:
        if out_dir is not None:
            raise FanlensError(f"out_dir and into_package exclude each other. Got out_dir={str(out_dir)!r} instead.")
        return OutputFolder(WEIGHTS_DIR, overwrite=True, command="train-zoo", allow_package=True, marker=False)
    return OutputFolder(out_dir, overwrite=overwrite, command="train-zoo", param="out_dir")


def write_trained(out: OutputFolder, models: list[TrainedModel]) -> list[Path]:
    """Write the trained models' files into ``out`` as one unit; returns the paths."""
    with out.staging() as tmp:
        for m in models:
            for fname, data in m.files.items():
                (tmp / fname).write_bytes(data)
    for m in models:
        _log.info("wrote %s into %s", m.name, out.path)
    return out.written


def train_model(
    name: str,
    *,
    seed: int = 0,
    data_seed: int = 0,
    steps: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    pool: int = DEFAULT_POOL,
    val_size: int = DEFAULT_VAL,
    progress: bool = True,
) -> TrainedModel:
    """Train zoo model ``name`` in memory (nothing is written); see :func:`train` to write it."""
    _check_name(name)
    check_seed(seed)
    check_seed(data_seed, "data_seed")
    recipe = dict(RECIPES[name])
    if steps is not None:
        recipe["steps"] = check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    check_positive_int("pool", pool)
    check_positive_int("val_size", val_size)
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    model = build(name, seed=seed).train()
    xs, ys = _render(SyntheticShapes(pool, seed=data_seed, split="train"), progress, f"render train ({name})")
    xv, yv = _render(SyntheticShapes(val_size, seed=data_seed, split="val"), progress, "render val")
    t_data = time.perf_counter() - t_start

    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe["lr"],
    )
    total, warm = recipe["steps"], recipe["warmup"]

    def lr_at(step: int) -> float:
        if step < warm:
            return recipe["lr"] * (step + 1) / warm
        return recipe["lr"] * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    g = torch.Generator().manual_seed(seed)
    it = range(total)
    bar = None
    if progress:
        from ..runner import progress_bar

        bar = progress_bar(it, desc=f"train {name}", unit="step")
        it = bar
    losses = []
    t_train = time.perf_counter()
    for step in it:
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
        if bar is not None and step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    t_train = time.perf_counter() - t_train
    val_acc = evaluate(model, xv, yv)
    wall = time.perf_counter() - t_start

    import timm

    from .._version import __version__

    sd = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import save

    card = {
        "name": name,
        "architecture": ARCHITECTURES[name][1],
        "num_params": sum(p.numel() for p in model.parameters()),
        "data": {
            "dataset": "fanlens.synthetic.SyntheticShapes",
            "classes": list(SHAPE_CLASSES),
            "data_seed": data_seed,
            "train_pool": pool,
            "val_size": val_size,
            "image_size": 64,
            "normalization": {"mean": list(ZOO_DATA_CONFIG["mean"]), "std": list(ZOO_DATA_CONFIG["std"])},
            "augmentation": "random horizontal and vertical flips",
        },
        "training": {
            "seed": seed,
            "steps": total,
            "batch_size": batch_size,
            "optimizer": "AdamW",
            "schedule": f"linear warm-up {warm} steps, cosine to 0",
            "label_smoothing": LABEL_SMOOTHING,
            "grad_clip": 1.0,
            "precision": "float32 (weights stored as fp16)",
            **{k: v for k, v in recipe.items() if k not in ("steps", "warmup")},
            "final_train_loss": float(np.mean(losses[-50:])),
        },
        "validation_accuracy": val_acc,
        "wall_time_s": round(wall, 1),
        "train_time_s": round(t_train, 1),
        "data_time_s": round(t_data, 1),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "processor": platform.machine()},
        "versions": {"fanlens": __version__, "torch": torch.__version__, "timm": timm.__version__},
    }
    files = {
        f"{name}.safetensors": save(sd, metadata={"name": name, "format": "pt"}),
        f"{name}.json": (json.dumps(card, indent=2) + "\n").encode(),
    }
    _log.info("trained %s: val acc %.3f in %.0f s", name, val_acc, wall)
    return TrainedModel(name, card, files)
