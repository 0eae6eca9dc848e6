"""The embedded default: small models trained by fanlens on its procedural textured objects.

Three architectures of similar size (1.6-1.8 M parameters), 64 x 64 input:

- ``vit``: a timm VisionTransformer (patch 8, width 128, depth 8, 4 heads, global average
  pool) with FAN's convolutional stem as its patch embedding;
- ``fan``: fanlens' FAN (patch 8, width 128, depth 8, 4 heads, one class-attention block);
- ``cnn``: a timm ResNet-18 layout (BasicBlock 2-2-2-2, 24-192 channels; on the textures task
  without the max-pool, so the last stage has 4 x 4 tokens, and without zero-initialised residual
  branches, so a random-init block is not the identity);

and, for the claim that more heads give more robustness (C4), ``vit-h1``, ``vit-h2`` and
``vit-h8``: the ViT with 1, 2 and 8 heads, nothing else changed (:data:`HEADS`).

Each architecture has three networks (:data:`SEEDS`: the seed sets the initialisation and the
data order): ``zoo:vit`` is seed 0, ``zoo:vit@1`` and ``zoo:vit@2`` the others. The task is
:data:`DEFAULT_TASK` (``"textures"``: 10 classes of objects that differ from the background in
texture, not brightness; :mod:`fanlens.synthetic`); ``zoo:shapes/vit`` names the earlier
bright-shapes task, whose weights no longer ship (``fanlens train-zoo vit --task shapes`` trains
them). Training: 3,000 steps of 64 images planned, ended at the first validation check at or
above 92 % (:data:`TASKS`), so that no network sits at the ceiling; a network the rule did not end
trained one more cycle of 1,000 steps from its weights (the extension rule,
:data:`fanlens.zoo.training.EXTENSION_STEPS`; its card lists both cycles).

They are small models on small synthetic data, trained on a laptop CPU by ``fanlens train-zoo``
(:mod:`fanlens.zoo.training`, :func:`train`); they show the analysis working offline, not the
behaviour of the paper's ImageNet models. Weights ship in ``fanlens/zoo/weights/textures`` as
fp16 safetensors with a JSON card each (architecture, budget, seed, data seed, wall and CPU
time, machine, validation accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._validation import FanlensError
from ..models._loading import (RANDOM_INIT, LoadedModel, file_sha256, load_state_dict_checked,
                               register_spec_prefix)
from ._arch import (ALL_NAMES, ARCHITECTURES, DEFAULT_TASK, DEPTH, HEAD_VARIANTS, HEADS, PATCH, SEEDS, TASKS,
                    WEIGHTS_DIR, WIDTH, ZOO_DATA_CONFIG, ZOO_NAMES, architecture, check_name, build, data_config,
                    network_name, parse_network)
from .training import train

__all__ = ["ZOO_NAMES", "HEADS", "HEAD_VARIANTS", "ALL_NAMES", "ARCHITECTURES", "WIDTH", "DEPTH", "PATCH", "WEIGHTS_DIR",
           "ZOO_DATA_CONFIG", "TASKS", "DEFAULT_TASK", "SEEDS", "build", "load", "card", "available", "networks",
           "train", "architecture", "data_config", "network_name", "parse_network"]


def _paths(name: str, seed: int = 0, task: str = DEFAULT_TASK) -> tuple[Path, Path]:
    folder, base = TASKS[task]["weights"], network_name(name, seed)
    return folder / f"{base}.safetensors", folder / f"{base}.json"


def available(task: str = DEFAULT_TASK) -> list[str]:
    """Zoo architectures whose seed-0 network of ``task`` is installed."""
    return [n for n in ALL_NAMES if all(p.is_file() for p in _paths(n, 0, task))]


def networks(name: str, task: str = DEFAULT_TASK) -> list[int]:
    """The training seeds of the installed networks of one architecture (``vit`` -> ``[0, 1, 2]``)."""
    check_name(name)
    folder = TASKS[task]["weights"]
    seeds = [0] if all(p.is_file() for p in _paths(name, 0, task)) else []
    for f in sorted(folder.glob(f"{name}@*.safetensors")):
        tail = f.stem[len(name) + 1:]
        if tail.isascii() and tail.isdigit() and f.with_suffix(".json").is_file():
            seeds.append(int(tail))
    return sorted(seeds)


def card(name: str) -> dict:
    """The JSON card of a trained zoo network (``"vit"``, ``"vit@1"``, ``"textures/vit@1"``)."""
    task, arch, seed = parse_network(name)
    path = _paths(arch, seed, task)[1]
    if not path.is_file():
        raise FanlensError(f"zoo model {name!r} has no trained weights installed; run `fanlens train-zoo {arch}"
                           f"{'' if task == DEFAULT_TASK else ' --task ' + task}"
                           f"{' --seed ' + str(seed) if seed else ''}`.")
    return json.loads(path.read_text())


def load(name: str, *, random_init: bool = False, seed: int | None = None) -> LoadedModel:
    """A zoo network in eval mode: trained weights (offline, from the package) or its random-init twin.

    Args:
        name: ``"vit"``, ``"fan"``, ``"cnn"``, a heads variant (``"vit-h1"``), optionally with the
            network's training seed (``"vit@1"``; no suffix is seed 0) and a task (``"textures/vit@1"``;
            default :data:`DEFAULT_TASK`).
        random_init: the same architecture, randomly initialised: with ``seed`` when given, else
            exactly the network's own initial weights (its training seed).
    """
    task, arch, net_seed = parse_network(name)
    label = f"zoo:{name}"
    if random_init:
        model = build(arch, seed=net_seed if seed is None else seed, task=task)
        return LoadedModel(model, label, RANDOM_INIT, RANDOM_INIT)
    model = build(arch, seed=net_seed, task=task)
    weights, _ = _paths(arch, net_seed, task)
    card(name)  # clear error when missing
    from safetensors.torch import load_file

    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    load_state_dict_checked(model, sd, repr(str(weights)))
    return LoadedModel(model.eval(), label, str(weights.name), file_sha256(weights))


def _build_spec(name: str, *, seed: int = 0) -> Any:
    task, arch, _ = parse_network(name)
    return build(arch, seed=seed, task=task)


register_spec_prefix("zoo:", load, _build_spec)
