"""Images in, pixel batches out.

fanlens works in **pixel space**: every batch is a float tensor ``(B, 3, H, W)`` with
values in [0, 1], already resized and cropped to the model's input size. The model's
normalisation (mean/std) is applied later by the analyses, so that noise can be added
either in pixel space or in the normalised input space.

Accepted ``images``:

- a tensor ``(B, 3, H, W)`` or ``(3, H, W)`` of pixel values in [0, 1] (used as is);
- a folder (its image files, sorted by name), a file, or a list of files;
- ``"samples"``: the natural photos that ship inside scikit-image and scikit-learn;
- a :class:`torch.utils.data.DataLoader` (or any iterable) of pixel tensors or
  ``(tensor, ...)`` tuples.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ._validation import FanlensError, all_finite, check_positive_int

__all__ = [
    "IMAGE_EXTENSIONS",
    "SAMPLE_NAMES",
    "DataConfig",
    "ImageSet",
    "data_config",
    "resolve_images",
    "load_sample",
]

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
SAMPLE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "china", "flower")
_SKIMAGE_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket")
_SKLEARN_SAMPLES = ("china", "flower")
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing of a model: input size and normalisation (from timm when known)."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }


def data_config(
    model: nn.Module,
    *,
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DataConfig:
    """The model's preprocessing from its timm data config, with optional overrides.

    Models without a timm config get timm's defaults (224 x 224, ImageNet mean/std). A
    model whose patch embedding accepts one input size only (timm ViT built with
    ``img_size=...``) gets that size.
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = tuple(cfg["input_size"][-2:])
    # timm keeps the pretrained config's size when a model is built with another img_size;
    # a patch embedding that only accepts one size knows the right one.
    pe = getattr(model, "patch_embed", None)
    pe_size = getattr(pe, "img_size", None)
    if pe_size is not None and getattr(pe, "strict_img_size", False) and not getattr(pe, "dynamic_img_pad", False):
        size = tuple(int(v) for v in (pe_size if isinstance(pe_size, (tuple, list)) else (pe_size, pe_size)))
    if input_size is not None:
        size = parse_input_size(input_size)
    m = tuple(float(v) for v in (mean if mean is not None else cfg["mean"]))
    s_ = tuple(float(v) for v in (std if std is not None else cfg["std"]))
    if len(m) != 3 or len(s_) != 3 or any(v <= 0 for v in s_):
        raise FanlensError(f"mean and std must hold 3 values (std > 0). Got mean={m!r}, std={s_!r} instead.")
    return DataConfig(
        input_size=(int(size[0]), int(size[1])),
        mean=m,
        std=s_,
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct") or 0.875),
        crop_mode=str(cfg.get("crop_mode") or "center"),
    )


def parse_input_size(input_size: Any, name: str = "input_size") -> tuple[int, int]:
    """``N`` (square) or ``(H, W)`` as a pair of positive ints; anything else is an error."""
    vals = (input_size,) if isinstance(input_size, (int, np.integer)) and not isinstance(input_size, bool) else input_size
    try:
        vals = tuple(vals)
    except TypeError:
        raise FanlensError(f"{name} must be an int N or a pair (H, W). Got {input_size!r} instead.") from None
    if len(vals) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                                      for v in vals):
        raise FanlensError(f"{name} must be one positive int N (N x N) or two (H W). Got {input_size!r} instead.")
    return (int(vals[0]), int(vals[-1]))


def load_sample(name: str) -> np.ndarray:
    """One of :data:`SAMPLE_NAMES` as an ``(H, W, 3)`` uint8 array (ships with the dependencies)."""
    if name in _SKIMAGE_SAMPLES:
        from skimage import data as skdata

        return getattr(skdata, name)()
    if name in _SKLEARN_SAMPLES:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    raise FanlensError(f"sample must be one of {SAMPLE_NAMES}. Got {name!r} instead.")


@dataclass
class ImageSet:
    """A resolved image source that streams pixel batches.

    Attributes:
        names: one name per image (file path, sample name, or ``tensor[i]``).
        config: the preprocessing.
    """

    names: list[str]
    config: DataConfig
    _loader: Callable[[int], torch.Tensor] | None = field(default=None, repr=False)
    _tensor: torch.Tensor | None = field(default=None, repr=False)
    _iterable: Iterable | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def batches(self, batch_size: int = DEFAULT_BATCH_SIZE, *, start: int = 0, stop: int | None = None,
                step: int = 1) -> Iterator[tuple[torch.Tensor, list[int]]]:
        """Yield ``(pixels (B, 3, H, W), global indices)``; ``start/stop/step`` select a shard."""
        check_positive_int("batch_size", batch_size)
        idx = list(range(len(self.names)))[start:stop:step]
        if self._iterable is not None:
            yield from self._iter_loader(batch_size, set(idx))
            return
        for i in range(0, len(idx), batch_size):
            chunk = idx[i : i + batch_size]
            if self._tensor is not None:
                yield self._tensor[chunk], chunk
            else:
                yield torch.stack([self._loader(j) for j in chunk]), chunk

    @property
    def in_memory(self) -> bool:
        """Whether the pixels are held in memory (a tensor) rather than decoded per batch."""
        return self._tensor is not None

    def decoded(self, max_bytes: int) -> "ImageSet":
        """The same images decoded once and held in memory (names kept), for a run that reads
        them several times; ``self`` when already in memory or when they would take more than
        ``max_bytes`` as float32 pixels."""
        if self.in_memory:
            return self
        h, w = self.config.input_size
        if len(self) * 3 * h * w * 4 > max_bytes:
            return self
        x = torch.cat([b for b, _ in self.batches(DEFAULT_BATCH_SIZE)])
        return ImageSet(list(self.names), self.config, _tensor=x)

    def first(self, n: int | None) -> "ImageSet":
        """The first ``n`` images (all of them with ``None`` or ``n >= len(self)``), in order."""
        if n is None or n >= len(self):
            return self
        check_positive_int("n_images", n)
        if self._tensor is not None:
            return ImageSet(self.names[:n], self.config, _tensor=self._tensor[:n])
        if self._loader is not None:
            return ImageSet(self.names[:n], self.config, _loader=self._loader)
        return ImageSet(self.names[:n], self.config, _iterable=self._iterable)

    def _iter_loader(self, batch_size: int, keep: set[int]):
        pos = 0
        buf, ids = [], []
        for item in self._iterable:
            x = item[0] if isinstance(item, (tuple, list)) else item
            x = _check_pixel_tensor(x, "a DataLoader batch")
            for row in x:
                if pos in keep:
                    buf.append(row)
                    ids.append(pos)
                pos += 1
                if len(buf) == batch_size:
                    yield torch.stack(buf), ids
                    buf, ids = [], []
        if buf:
            yield torch.stack(buf), ids


def _check_pixel_tensor(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise FanlensError(f"{what} must be a torch.Tensor of pixels. Got {type(x).__name__} instead.")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise FanlensError(f"{what} must have shape (B, 3, H, W). Got {tuple(x.shape)} instead.")
    if not x.is_floating_point():
        raise FanlensError(f"{what} must hold float pixels in [0, 1]. Got dtype {x.dtype} instead.")
    check_pixels(x, what)
    return x


PIXEL_TOLERANCE = 1e-3


def check_pixels(x: torch.Tensor, what: str = "images") -> tuple[float, float] | None:
    """Pixels must be finite and in [0, 1] (a tolerance of 1e-3 for resampling overshoot).

    Values in 0..255 or already normalised values would silently give other numbers. Returns the
    smallest and largest value (``None`` for an empty tensor)."""
    if x.numel() == 0:
        return None
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)  # the same values in memory order: aminmax would copy a strided input first
    lo, hi = (float(v) for v in torch.aminmax(x))  # one pass: NaN and inf propagate into the extremes
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(x)).sum())
        raise FanlensError(f"{what} must hold finite pixel values. Got {bad} NaN or infinite value(s) instead.")
    if lo < -PIXEL_TOLERANCE or hi > 1 + PIXEL_TOLERANCE:
        hint = " (divide 0..255 values by 255)" if hi > 1 + PIXEL_TOLERANCE and hi <= 255 and lo >= 0 else (
            " (pass pixels before normalisation: fanlens applies the model's mean/std itself)" if lo < 0 else "")
        raise FanlensError(f"{what} must hold pixel values in [0, 1]{hint}. Got values in [{lo:.4g}, {hi:.4g}] instead.")
    return lo, hi


MAX_IMAGE_PIXELS = 200_000_000
"""Largest image (width x height) fanlens decodes: 200 megapixels, about 600 MB as RGB.
Larger files (or decompression bombs) are refused with a message instead of PIL's warning;
set ``fanlens.data.MAX_IMAGE_PIXELS`` to change it."""


def _regular_file(p: Path) -> bool:
    """A regular file (or a link to one), found without opening it (a FIFO would block)."""
    try:
        return stat.S_ISREG(os.stat(p).st_mode)
    except (OSError, ValueError):
        return False


def _list_folder(folder: Path) -> list[Path]:
    """Image files under ``folder``, sorted; output folders of fanlens runs and hidden folders are skipped."""
    from ._output import RUN_MARKER

    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (Path(root) / d / RUN_MARKER).is_file())
        if RUN_MARKER in names and Path(root) != folder:
            continue
        for n in names:
            if Path(n).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            f = Path(root) / n
            if _regular_file(f):
                files.append(f)
            else:  # a FIFO, socket or device named like an image would block or fail when opened
                _log.warning("skipping %s: not a regular file (fanlens opens regular image files only)", f)
    files.sort()
    if not files:
        raise FanlensError(
            f"images must be a folder holding image files ({', '.join(IMAGE_EXTENSIONS)}). "
            f"Got {str(folder)!r}, which holds none."
        )
    return files


def _open_image(path: Path):
    """``PIL.Image.open`` with fanlens' own size limit instead of PIL's DecompressionBombWarning."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # the check below replaces PIL's
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise FanlensError(
            f"image {str(path)!r} must have at most fanlens.data.MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,} pixels. "
            f"Got {w} x {h} = {w * h:,} instead (downscale it, or raise the limit if the file is trusted)."
        )
    return im


IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, EOFError, ZeroDivisionError,
                     OverflowError, MemoryError, struct.error)
"""What Pillow raises on a damaged file (besides ``UnidentifiedImageError``, an OSError): its parsers
read header fields as they come, so a cut or edited file can end in any of these (a truncated
two-page TIFF: ``TypeError('Missing dimensions')`` from a KeyError, found by the fuzz suite)."""


def _check_image_file(path: Path) -> None:
    try:
        with _open_image(path) as im:
            mode = im.mode
            frames = int(getattr(im, "n_frames", 1) or 1)
            im.verify()
    except FanlensError:
        raise
    except IMAGE_READ_ERRORS as e:  # UnidentifiedImageError is an OSError
        raise FanlensError(f"image {str(path)!r} cannot be read: {type(e).__name__}: {e}") from None
    if frames > 1:
        _log.warning("image %s has %d frames (pages); fanlens analyses the first one only", path, frames)
    if mode not in ("RGB", "P") and not (mode == "CMYK" or mode.startswith("YCbCr")):
        raise FanlensError(
            f"image {str(path)!r} must be an RGB image. Got mode {mode!r} instead "
            f"(convert grayscale or RGBA images to RGB first)."
        )


def _pil_to_pixels(img, transform) -> torch.Tensor:
    x = transform(img)
    if x.dtype == torch.uint8:  # timm's eval transform without Normalize keeps uint8
        x = x.float().div_(255.0)
    return x


def resolve_images(
    images: Any,
    config: DataConfig,
) -> ImageSet:
    """Turn any accepted ``images`` value into an :class:`ImageSet` (see the module doc)."""
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(
        input_size=config.input_size,
        interpolation=config.interpolation,
        crop_pct=config.crop_pct,
        crop_mode=config.crop_mode,
        mean=config.mean,
        std=config.std,
        normalize=False,
    )

    if isinstance(images, ImageSet):  # resolved (and perhaps decoded) before: used as it is
        if images.config != config:
            raise FanlensError(f"images must be resolved for this model's preprocessing {config}. Got an ImageSet "
                               f"resolved for {images.config} instead.")
        return images
    if isinstance(images, torch.Tensor):
        x = _check_pixel_tensor(images, "images")
        return ImageSet([f"tensor[{i}]" for i in range(x.shape[0])], config, _tensor=x)

    if isinstance(images, str) and images == "samples":
        names = list(SAMPLE_NAMES)

        def load(i: int) -> torch.Tensor:
            return _pil_to_pixels(Image.fromarray(load_sample(names[i])).convert("RGB"), transform)

        return ImageSet([f"sample:{n}" for n in names], config, _loader=load)

    if isinstance(images, (str, os.PathLike)):
        p = Path(images)
        if p.is_dir():
            files = _list_folder(p)
        elif p.is_file():
            files = [p]
        elif os.path.lexists(p):
            raise FanlensError(f"images must be a folder or a regular image file. Got {str(images)!r}, which is "
                               f"neither (a FIFO, socket, device or broken link).")
        else:
            raise FanlensError(
                f"images must be a folder, an image file, a tensor or 'samples'. Got {str(images)!r}, "
                f"which does not exist."
            )
    elif isinstance(images, (list, tuple)) and images and all(isinstance(i, (str, os.PathLike)) for i in images):
        files = []
        for i in images:
            p = Path(i)
            if p.is_dir():
                files.extend(_list_folder(p))
            elif p.is_file():
                files.append(p)
            elif os.path.lexists(p):
                raise FanlensError(f"images must name regular image files. Got {str(i)!r}, which is not one (a "
                                   f"FIFO, socket, device or broken link).")
            else:
                raise FanlensError(f"images must name existing files. Got {str(i)!r}, which does not exist.")
    elif isinstance(images, Iterable) and not isinstance(images, (str, bytes, list, tuple)):
        n = _count_iterable(images)
        return ImageSet([f"batch_item[{i}]" for i in range(n)], config, _iterable=images)
    else:
        raise FanlensError(
            "images must be a tensor (B, 3, H, W), a folder, files, 'samples' or a DataLoader. "
            f"Got {type(images).__name__} instead."
        )
    for f in files:
        _check_image_file(f)

    def load_file(i: int) -> torch.Tensor:
        from PIL import ImageOps

        try:
            with _open_image(files[i]) as im:
                img = ImageOps.exif_transpose(im).convert("RGB")  # a phone photo is seen upright
        except IMAGE_READ_ERRORS as e:
            raise FanlensError(f"image {str(files[i])!r} cannot be read: {type(e).__name__}: {e}") from None
        return _pil_to_pixels(img, transform)

    return ImageSet([str(f) for f in files], config, _loader=load_file)


def _count_iterable(it: Iterable) -> int:
    ds = getattr(it, "dataset", None)
    if ds is not None and hasattr(ds, "__len__") and getattr(it, "drop_last", False) is False:
        return len(ds)
    n = 0
    for item in it:
        x = item[0] if isinstance(item, (tuple, list)) else item
        n += _check_pixel_tensor(x, "a DataLoader batch").shape[0]
    if n == 0:
        raise FanlensError("images must hold at least one image. Got an empty iterable instead.")
    return n
