"""The embedded default: small models trained by fanlens on its procedural shapes.

Three architectures of similar size (1.6-1.8 M parameters), 64 x 64 input, 8 classes
(:mod:`fanlens.synthetic`), trained with one budget (3,000 steps of 64 images):

- ``vit``: a timm VisionTransformer (patch 8, width 128, depth 8, 4 heads, global average
  pool) with FAN's convolutional stem as its patch embedding;
- ``fan``: fanlens' FAN (patch 8, width 128, depth 8, 4 heads, one class-attention block);
- ``cnn``: a timm ResNet-18 layout (BasicBlock 2-2-2-2, 24-192 channels).

and, for the claim that more heads give more robustness (C4), ``vit-h1``, ``vit-h2`` and
``vit-h8``: the ViT with 1, 2 and 8 heads, nothing else changed (:data:`HEADS`).

They are small models on small synthetic data, trained in minutes on a laptop CPU by
``fanlens train-zoo`` (:mod:`fanlens.zoo.training`, :func:`train`); they show the analysis
working offline, not the behaviour of the paper's ImageNet models. Weights ship in
``fanlens/zoo/weights`` as fp16 safetensors with a JSON card each (architecture, budget,
data seed, wall time, validation accuracy, accuracy at the training snapshots).
"""

from __future__ import annotations

import json
from pathlib import Path

from .._validation import FanlensError
from ..models._loading import (RANDOM_INIT, LoadedModel, file_sha256, load_state_dict_checked,
                               register_spec_prefix)
from ._arch import (ALL_NAMES, ARCHITECTURES, DEPTH, HEAD_VARIANTS, HEADS, PATCH, WEIGHTS_DIR, WIDTH, ZOO_DATA_CONFIG,
                    ZOO_NAMES, check_name, build)
from .training import train

__all__ = ["ZOO_NAMES", "HEADS", "HEAD_VARIANTS", "ALL_NAMES", "ARCHITECTURES", "WIDTH", "DEPTH", "PATCH", "WEIGHTS_DIR",
           "ZOO_DATA_CONFIG", "build", "load", "card", "available", "train"]


def _paths(name: str) -> tuple[Path, Path]:
    return WEIGHTS_DIR / f"{name}.safetensors", WEIGHTS_DIR / f"{name}.json"


def available() -> list[str]:
    """Zoo models whose trained weights are installed."""
    return [n for n in ALL_NAMES if all(p.is_file() for p in _paths(n))]


def card(name: str) -> dict:
    """The JSON card of a trained zoo model."""
    check_name(name)
    path = _paths(name)[1]
    if not path.is_file():
        raise FanlensError(f"zoo model {name!r} has no trained weights installed; run `fanlens train-zoo {name}`.")
    return json.loads(path.read_text())


def load(name: str, *, random_init: bool = False, seed: int = 0) -> LoadedModel:
    """A zoo model in eval mode: trained weights (offline, from the package) or its random-init twin.

    Args:
        name: ``"vit"``, ``"fan"`` or ``"cnn"``.
        random_init: the same architecture, randomly initialised with ``seed`` (the baseline).
    """
    model = build(name, seed=seed)
    if random_init:
        return LoadedModel(model, f"zoo:{name}", RANDOM_INIT, RANDOM_INIT)
    weights, _ = _paths(name)
    card(name)  # clear error when missing
    from safetensors.torch import load_file

    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    load_state_dict_checked(model, sd, repr(str(weights)))
    return LoadedModel(model.eval(), f"zoo:{name}", str(weights.name), file_sha256(weights))


register_spec_prefix("zoo:", load, build)
