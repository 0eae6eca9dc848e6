"""Shared fixtures: seeds, tiny models, image folders, hook counting, figure cleanup."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fanlens  # noqa: F401  (registers models)

# the CLI's execution policy: the tests run with torch's thread count as found, not with one sampled from
# the machine's load (tests/test_execution.py covers the sampling)
os.environ.setdefault("FANLENS_THREADS", str(torch.get_num_threads()))

TINY = f"{Path(__file__).parent / 'tiny_models.py'}:tiny_vit"  # a factory spec for the CLI


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    np.random.seed(0)
    return 0


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def count_hooks(model: nn.Module) -> int:
    """Forward and forward-pre hooks on every module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def write_images(folder, n: int = 3, size=(48, 40), mode: str = "RGB", seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGB")
        if mode != "RGB":
            img = img.convert(mode)
        p = folder / f"img_{i:03d}.png"
        img.save(p)
        paths.append(p)
    return paths


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    write_images(d, 3)
    return d


@pytest.fixture
def tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3, num_classes=5).eval()


def write_png_header(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (all PIL reads before deciding to decode)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


class CheckpointAcc:
    """A minimal accumulator for ``fanlens._output.RunState``: a counter (saved as 3) and one array."""

    def __init__(self, total=None):
        self.n, self.total = 0, np.zeros(4) if total is None else np.asarray(total, dtype=float)

    def state(self):
        return {"n": 3}, {"total": self.total}

    def load_state(self, meta, arrays):
        self.n, self.total = meta["n"], arrays["total"]

