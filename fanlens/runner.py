"""The one home of what every analysis shares.

- resolving a model and its images (:func:`setup`: model spec or module, data config, input
  size, device, block selection checked before any image is read);
- streaming batches through the model under a :class:`~fanlens.capture.TokenCapture`
  (:func:`stream`; several analyses from the same forward passes with :func:`stream_parts`,
  each a :class:`Part`), with progress bars, sharding across processes (:func:`resolve_shard`),
  checks for non-finite block outputs, checkpoints and resume (:class:`RunState`);
- the noise of an image (:func:`make_noise`), provenance (:func:`make_provenance`);
- the output-folder writer (:class:`OutputFolder`) and atomic writes (:func:`write_atomic`),
  from :mod:`fanlens._output`.

Spectrum, probe, groups (:mod:`fanlens.analysis`) and attributions (:mod:`fanlens.attribution`)
are built on these; none of them reaches into another's private helpers.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ._heap import HeapTrim
from ._output import (RUN_MARKER, STATE_DIRNAME, Interrupted, OutputFolder, RunState, is_run_folder, package_dir,
                      signal_guard, state_dir, write_atomic)
from ._validation import FanlensError, all_finite, check_positive_int, check_seed
from ._cache import TokenCache
from .capture import BlockTokens, TokenCapture
from .data import DataConfig, ImageSet, data_config, resolve_images
from .distributed import check_peers, rank_and_world
from .models import LoadedModel, build_model
from ._stats import RunningStats
from .results import BlockInfo, Provenance

__all__ = [
    "RUN_MARKER",
    "STATE_DIRNAME",
    "Interrupted",
    "OutputFolder",
    "RunState",
    "is_run_folder",
    "package_dir",
    "signal_guard",
    "state_dir",
    "write_atomic",
    "Setup",
    "setup",
    "check_device",
    "fit_input_size",
    "resolve_shard",
    "progress_bar",
    "progress_iter",
    "n_batches",
    "run_forward",
    "uint8_images",
    "make_noise",
    "make_provenance",
    "nonfinite_message",
    "AccState",
    "run_batches",
    "stream",
    "Part",
    "stream_parts",
    "run_state",
    "state_key",
]

_log = logging.getLogger(__name__)


@dataclass
class Setup:
    lm: LoadedModel
    cfg: DataConfig
    images: ImageSet | None
    device: torch.device
    capture_kwargs: dict


def setup(
    model: Any,
    images: Any,
    *,
    pretrained: bool,
    checkpoint: Any,
    input_size: Any,
    device: Any,
    blocks: Any,
    num_prefix_tokens: int | None,
    layout: str | None,
    grid: Any,
    seed: int = 0,
    need_images: bool = True,
    check_blocks: bool = True,
) -> Setup:
    check_seed(seed)
    dev = check_device(device)
    if isinstance(model, LoadedModel):
        lm = model
    else:
        lm = build_model(model, pretrained=pretrained, checkpoint=checkpoint, seed=seed)
    strict = strict_input_size(lm.model)
    if (input_size is None and strict is not None and isinstance(images, torch.Tensor) and images.ndim == 4
            and tuple(images.shape[-2:]) != strict):
        # pixels given as a tensor are analysed at their size; a model whose patch embedding takes one size only
        # is resized to it when fanlens built it, else refused in one line (fit_input_size)
        input_size = tuple(int(v) for v in images.shape[-2:])
    cfg = data_config(lm.model, input_size=input_size)
    check_input_fits(cfg.input_size, lm.model)
    fit_input_size(lm.model, cfg.input_size, lm.owned)
    imgs = resolve_images(images, cfg) if need_images else None
    if imgs is not None and len(imgs) == 0:
        raise FanlensError("images must hold at least one image. Got none.")
    try:
        lm.model.to(dev).eval()
    except RuntimeError as e:
        raise FanlensError(f"device {str(dev)!r} cannot hold the model: {str(e).splitlines()[0]}") from None
    ck = dict(blocks=blocks, num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid)
    if check_blocks:  # validate the block selection before any image is read
        TokenCapture(lm.model, **ck)
    return Setup(lm, cfg, imgs, dev, ck)


MAX_INPUT_SIDE = 8192
"""The largest input side fanlens resizes to (a ViT-16 at 8,192² has 262,144 tokens per block; PIL refuses larger
resizes as decompression bombs)."""


def available_memory() -> int | None:
    """Bytes of memory available to new work (Linux ``MemAvailable``), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


ACTIVATION_FACTOR = 16
"""A forward pass is assumed to need at least this many times one image's pixels (a CNN's first stage has 64
channels at a quarter of the pixels: 16 x 3 channels' worth)."""


def check_input_fits(input_size: tuple[int, int], model: Any = None) -> None:
    """Refuse an input size that cannot be analysed here, before any work: above :data:`MAX_INPUT_SIDE`; one
    image whose forward pass needs more than the available memory (:data:`ACTIVATION_FACTOR` x its pixels);
    or, for a model with a patch embedding, one attention map of its tokens (N x N) larger than half of it."""
    h, w = (int(v) for v in input_size)
    if max(h, w) > MAX_INPUT_SIDE:
        raise FanlensError(f"input_size must be at most {MAX_INPUT_SIDE} pixels a side (fanlens.runner.MAX_INPUT_SIDE). "
                           f"Got {h} x {w} instead.")
    avail = available_memory()
    if avail is None:
        return
    need = 3 * h * w * 4 * ACTIVATION_FACTOR
    if need > avail:
        raise FanlensError(f"input_size {h} x {w} needs about {need / 2**30:.1f} GiB per image for a forward pass; "
                           f"{avail / 2**30:.1f} GiB are available here. Choose a smaller --input-size.")
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)[:2]
        n = max(h // max(int(ph), 1), 1) * max(w // max(int(pw), 1), 1)
        heads = int(getattr(getattr(getattr(model, "blocks", [None])[0] if hasattr(model, "blocks") else None,
                                    "attn", None), "num_heads", 1) or 1)
        att = n * n * 4 * heads
        if att * 2 > avail:
            raise FanlensError(f"input_size {h} x {w} gives {n:,} tokens per image: one block's attention maps "
                               f"({heads} heads of {n:,} x {n:,}) need {att / 2**30:.1f} GiB; {avail / 2**30:.1f} GiB "
                               f"are available here. Choose a smaller --input-size.")


def check_device(device: Any) -> torch.device:
    """A torch device that exists on this machine (a tensor can be made on it)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FanlensError(f"device must be a torch device such as 'cpu' or 'cuda'. Got {device!r} instead.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FanlensError(f"device must be available on this machine. Got {device!r}, but CUDA is not available.")
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as e:
        first = str(e).strip().split(". ")[0] if str(e).strip() else type(e).__name__
        raise FanlensError(f"device must be available on this machine. Got {device!r}: {first[:200]}.") from None
    return dev


def strict_input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The one input size a timm patch embedding takes (``strict_img_size``, no ``dynamic_img_size``), or None."""
    pe = getattr(model, "patch_embed", None)
    pe_size = getattr(pe, "img_size", None)
    if pe_size is None or not getattr(pe, "strict_img_size", False) or getattr(model, "dynamic_img_size", False):
        return None
    return tuple(int(v) for v in (pe_size if isinstance(pe_size, (tuple, list)) else (pe_size, pe_size)))


def fit_input_size(model: torch.nn.Module, size: tuple[int, int], owned: bool) -> None:
    """A timm model built for one input size (strict patch embedding) is resized to ``size`` when
    fanlens built it (``set_input_size`` resamples the position embedding); a model passed in is
    left alone and a clear error says what to do."""
    pe_size = strict_input_size(model)
    if pe_size is None:
        return
    if pe_size == tuple(size):
        return
    if owned and hasattr(model, "set_input_size"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm's interpolation helpers warn about torch internals
            try:
                model.set_input_size(img_size=tuple(size))
            except (RuntimeError, ValueError, AssertionError, TypeError) as e:
                raise FanlensError(
                    f"input_size {size[0]}x{size[1]} does not fit {type(model).__name__} (built for "
                    f"{pe_size[0]}x{pe_size[1]}): {str(e).splitlines()[0]}"
                ) from None
        _log.info("resized %s from %s to input size %s (timm set_input_size)", type(model).__name__, pe_size, size)
        return
    if hasattr(model, "set_input_size"):  # a module passed in: fanlens resizes only what it builds itself
        hint = (f"call model.set_input_size(img_size={tuple(size)}) first (timm resamples the position embedding), "
                f"or pass the model by name")
    else:  # no set_input_size (built by name or not): only a model built for the size runs at it
        hint = (f"build it with img_size={tuple(size)} (timm.create_model(name, img_size={tuple(size)})) and pass "
                f"the module, or analyse at {pe_size[0]}x{pe_size[1]}")
    raise FanlensError(
        f"input_size must be the {pe_size[0]}x{pe_size[1]} this model was built for. Got {size[0]}x{size[1]} instead; "
        f"to analyse at {size[0]}x{size[1]}, {hint}."
    )


def resolve_shard(shard: tuple[int, int] | None, n_items: int) -> tuple[int, int]:
    rank, world = rank_and_world() if shard is None else shard
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise FanlensError(f"shard must be (rank, world_size) with 0 <= rank < world_size. Got {shard!r} instead.")
    if n_items < world:
        raise FanlensError(f"every process needs at least one image: {n_items} images for {world} processes.")
    return rank, world


def progress_bar(iterable: Iterable, **kwargs):
    """tqdm's notebook bar where ipywidgets is installed, its text bar elsewhere (no warning)."""
    try:
        import ipywidgets  # noqa: F401

        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    return tqdm(iterable, **kwargs)


def progress_iter(iterable: Iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    return progress_bar(iterable, total=total, desc=desc, unit="batch", leave=False)


def n_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def run_forward(cap: TokenCapture, x: torch.Tensor) -> Any:
    """Run the model under the capture (its output, or ``None`` when stopped early); a failing
    forward becomes a FanlensError with the input shape."""
    return call_model(cap.run, x)


def class_logits(out: Any, what: str) -> torch.Tensor:
    """The model output read as class logits ``(batch, classes)``: a tensor, or the first element of a tuple or
    list (timm's distilled models in training mode, many research models); anything else is one FanlensError
    naming ``what`` needed the logits."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FanlensError(f"model must return class logits of shape (batch, classes) for {what}. Got {shape} instead.")
    return out


def call_model(model: Any, x: torch.Tensor) -> Any:
    """``model(x)``, where a failing forward pass becomes one FanlensError naming the input shape (the
    model's own exception chained), for every analysis that runs the model."""
    try:
        return model(x)
    except FanlensError:
        raise
    except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FanlensError(
            f"the model's forward pass failed on an input of shape {tuple(x.shape)}: {first}. "
            f"Check input_size and the model's expected input."
        ) from e


def uint8_images(pixels: torch.Tensor) -> np.ndarray:
    """Pixel batch ``(B, 3, H, W)`` in [0, 1] as ``(B, H, W, 3)`` uint8, for overlays in results."""
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """The N(0, 1) noise of image ``index`` for ``seed``: same for every model, batch size and device."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(tuple(shape), generator=g)


def make_provenance(s: Setup, seed: int, params: dict, images: list[str]) -> Provenance:
    params = dict(params)
    params["data_config"] = s.cfg.to_dict()
    params["device"] = str(s.device)
    return Provenance(
        model=s.lm.name,
        weights=s.lm.weights,
        weights_sha256=s.lm.weights_sha256,
        seed=int(seed),
        params=params,
        images=images,
    )


def nonfinite_message(bt, b: int, copies: Sequence[str] | None) -> str:
    bad = (~torch.isfinite(bt.tokens.flatten(1))).any(dim=1).nonzero().flatten().tolist()
    first = bad[0]
    where = ""
    if copies is not None and b:
        where = f" ({copies[first // b]})"
    return (
        f"block {bt.label!r} output non-finite values (NaN or inf) for {len(bad)} of {bt.tokens.shape[0]} inputs of "
        f"the batch{where}; fanlens never reports a non-finite value as a result. Check the model's weights and "
        f"the noise level."
    )


class AccState:
    """Checkpoint state shared by the streaming accumulators: block infos and Welford stats
    (subclasses name their lists of :class:`~fanlens._stats.RunningStats` in ``_stat_lists``)."""

    infos: list[BlockInfo]

    def _stat_lists(self) -> dict[str, list[RunningStats]]:  # pragma: no cover - overridden
        raise NotImplementedError

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        arrays = {}
        meta = {"infos": [b.to_dict() for b in self.infos], "n": {}}
        for name, lst in self._stat_lists().items():
            meta["n"][name] = [st.n for st in lst]
            for i, st in enumerate(lst):
                arrays[f"{name}.{i}.mean"] = st.mean
                arrays[f"{name}.{i}.m2"] = st.m2
                if st.keep:
                    arrays[f"{name}.{i}.indices"], arrays[f"{name}.{i}.values"] = st.per_image()
        return meta, arrays

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.infos = [BlockInfo.from_dict(b) for b in meta["infos"]]
        for name, ns in meta["n"].items():
            lst = []
            for i, n in enumerate(ns):
                mean, m2 = arrays[f"{name}.{i}.mean"], arrays[f"{name}.{i}.m2"]
                keep = f"{name}.{i}.indices" in arrays
                st = RunningStats(mean.shape, keep=keep)
                st.n, st.mean, st.m2 = int(n), mean.astype(np.float64), m2.astype(np.float64)
                if keep:
                    st.indices = [arrays[f"{name}.{i}.indices"].astype(np.int64)]
                    st.values = [arrays[f"{name}.{i}.values"].astype(np.float64)]
                lst.append(st)
            setattr(self, name, lst)


def run_batches(batches: Callable[[int], Iterable], total: int, desc: str, progress: bool,
                step: Callable[[torch.Tensor, list[int]], None], accs: Sequence,
                state: RunState | None = None) -> None:
    """The loop every streaming analysis runs: ``step(x, indices)`` per batch.

    ``batches(skip)`` yields the batches after the first ``skip`` (those a checkpoint holds).
    With an enabled ``state`` the accumulators ``accs`` (objects with ``state()`` and
    ``load_state()``) are restored, checkpointed every ``state.every`` batches and when
    SIGINT/SIGTERM arrives (then :class:`Interrupted` is raised after the current batch), and
    the checkpoint is removed at the end. After every batch a failure reported by another
    rank of the process group stops this one (:func:`fanlens.distributed.check_peers`).
    """
    done = state.restore(accs) if state is not None else 0
    checkpointing = state is not None and state.enabled
    it = batches(done)
    heap = HeapTrim()
    if progress:
        it = progress_bar(it, total=total, initial=done, desc=desc, unit="batch", leave=False)
    # closing(): the progress bar is gone before an error message is printed
    with signal_guard(checkpointing) as signals, contextlib.closing(it) if hasattr(it, "close") else \
            contextlib.nullcontext():
        for i, (x, idx) in enumerate(it):
            if i:
                heap.between_batches()  # the last batch's freed memory back to the system (fanlens._heap)
            step(x, idx)
            done += 1
            check_peers()
            if signals:
                state.save(accs, done)
                name = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}.get(signals[0], f"signal {signals[0]}")
                raise Interrupted(
                    signals[0],
                    f"interrupted by {name} after batch {done} of {total}; the checkpoint in "
                    f"{str(state.path.parent)!r} keeps the work done: run again with --resume (resume=True) to "
                    f"continue.",
                )
            if checkpointing and state.due(done):
                state.save(accs, done)
    if checkpointing:
        state.finish()


MAX_FORWARD_TOKEN_BYTES = 512 * 2**20
"""The captured tokens one forward pass may hold (every block's, of the clean images and all their copies). A
batch whose inputs would hold more goes through the model in parts of whole images (:func:`stream`): every
analysis reads each image with its own copies only, so the numbers are those of a smaller batch (which do not
depend on the batch size), and memory stays bounded when an analysis forwards many copies per image
(``reproduce``'s grid: 27 inputs per image). The embedded zoo's batches fit whole. Forwards of fewer than
:data:`MIN_INPUTS_TO_SPLIT` inputs go whole without a check (the batch size bounds them)."""

MIN_INPUTS_TO_SPLIT = 128
"""The inputs per forward (images x inputs per image) from which :func:`stream` measures a token's size (one
forward of a blank input, once per run) and splits a batch under :data:`MAX_FORWARD_TOKEN_BYTES`."""


def _token_bytes_per_input(cap: TokenCapture, s: Setup) -> int:
    """The bytes one model input's captured tokens take (all blocks), from one forward of a blank input."""
    h, w = s.cfg.input_size
    cap.clear()
    run_forward(cap, s.cfg.normalize(torch.zeros((1, 3, h, w), device=s.device)))
    n = sum(bt.tokens.numel() * bt.tokens.element_size() + bt.prefix.numel() * bt.prefix.element_size()
            for bt in cap.block_tokens())
    cap.clear()
    return int(n)


def _images_per_forward(b: int, inputs_per_image: int, bytes_per_input: int) -> int:
    """How many of a batch's ``b`` images one forward takes under :data:`MAX_FORWARD_TOKEN_BYTES` (at least 1)."""
    per_image = max(int(inputs_per_image), 1) * max(int(bytes_per_input), 1)
    return max(1, min(int(b), MAX_FORWARD_TOKEN_BYTES // per_image))


def stream(s: Setup, batches: Callable[[int], Iterable], total: int, desc: str, progress: bool,
           make_inputs: Callable[[torch.Tensor, list[int], bool], list[torch.Tensor]], accs: Sequence,
           state: RunState | None = None, copies: Sequence[str] | None = None,
           outputs: Callable[[Any, torch.Tensor, list[int]], None] | None = None,
           output_accs: Sequence = (), cache: TokenCache | None = None) -> None:
    """One forward pass per batch under the capture; each accumulator reads the block tokens
    (:func:`run_batches` does the looping, checkpoints and signals). ``copies`` names the parts
    of a batch (clean, sigma=...) for the message when a block outputs non-finite values.

    ``make_inputs(x, idx, clean)`` returns the model inputs of the batch, the clean images first
    when ``clean`` is true. With a ``cache`` (:class:`~fanlens._cache.TokenCache`), a batch whose
    clean tokens are cached is not forwarded clean again: only its copies go through the model
    (``make_inputs(..., clean=False)``), the cached tokens are put in front of theirs, and a batch
    with no copies is not forwarded at all. Clean rows that were forwarded are put into the cache.

    ``outputs(out, x, idx)``, when given, receives the model's output for the batch (the forward
    then runs to the end instead of stopping after the last block); forward passes it makes
    itself record no tokens. ``output_accs``: the accumulators it feeds, checkpointed with ``accs``.

    With more than one input per image (``copies``) and at least :data:`MIN_INPUTS_TO_SPLIT` inputs in a
    batch, a batch whose captured tokens would exceed :data:`MAX_FORWARD_TOKEN_BYTES` is forwarded (and read
    by the accumulators) in parts of whole images; the size of one input's tokens is measured once, on a
    blank input, before the first such batch."""
    n_blocks: list[int] = []
    per_input: list[int] = []  # captured bytes per model input (measured when copies can make a batch large)
    need_out = outputs is not None
    keep_out = cache is not None and cache.enabled

    with torch.inference_mode(), TokenCapture(s.lm.model, stop_early=not need_out, **s.capture_kwargs) as cap:
        def forward(inputs: list[torch.Tensor], run_to_end: bool, b: int,
                    names: Sequence[str] | None) -> tuple[Any, list]:
            cap.clear()
            cap.stop_early = not run_to_end
            out = run_forward(cap, inputs[0] if len(inputs) == 1 else torch.cat(inputs))
            bts = list(cap.block_tokens())
            cap.clear()
            if not n_blocks:
                n_blocks.append(len(bts))
            elif len(bts) != n_blocks[0]:
                raise FanlensError("the number of block calls changed between batches; fanlens needs a fixed forward.")
            for bt in bts:
                if not all_finite(bt.tokens):
                    raise FanlensError(nonfinite_message(bt, b, names))
            return out, bts

        def step(x: torch.Tensor, idx: list[int]) -> None:
            n_in = len(copies) if copies else 1
            if n_in > 1 and x.shape[0] > 1 and x.shape[0] * n_in >= MIN_INPUTS_TO_SPLIT:
                if not per_input:
                    per_input.append(_token_bytes_per_input(cap, s))
                k = _images_per_forward(x.shape[0], n_in, per_input[0])
                if k < x.shape[0]:
                    for lo in range(0, x.shape[0], k):
                        step_part(x[lo : lo + k], list(idx[lo : lo + k]))
                    return
            step_part(x, idx)

        def step_part(x: torch.Tensor, idx: list[int]) -> None:
            b = x.shape[0]
            hit = cache.get(idx, need_output=need_out, device=s.device) if cache is not None else None
            inputs = make_inputs(x, idx, hit is None)
            out, bts = None, []
            if inputs:
                # a clean pass that fills the cache runs to the end: the output is kept for later analyses
                names = copies if hit is None or copies is None else list(copies)[1:]
                out, bts = forward(inputs, need_out or (hit is None and keep_out), b, names)
            if hit is None:
                if cache is not None:
                    cache.put(idx, bts, out)
            else:
                if bts and len(bts) != len(hit.blocks):
                    raise FanlensError("the number of block calls changed between batches; fanlens needs a fixed "
                                       "forward.")
                bts = hit.blocks if not bts else [
                    BlockTokens(h.name, h.call, torch.cat([h.tokens, n.tokens]), torch.cat([h.prefix, n.prefix]),
                                n.layout) for h, n in zip(hit.blocks, bts)]
                if need_out:
                    out = hit.output if out is None else torch.cat([hit.output, class_logits(out, "predictions")])
            for acc in accs:
                acc.update(bts, b, idx)
            if outputs is not None:
                del bts
                with cap.paused():
                    outputs(out, x, idx)

        run_batches(batches, total, desc, progress, step, list(accs) + list(output_accs), state)


@dataclass
class Part:
    """One analysis' share of a joint forward pass (:func:`stream_parts`).

    Each batch goes through the model once as the clean images followed by every part's copies.
    ``make_copies(x, idx)`` gets the batch's pixels on the device and returns this part's copies,
    normalised for the model (one tensor per name in ``copies``). ``accs`` read the block tokens
    as :func:`stream` hands them (``update(bts, b, idx)``, the clean images in rows ``[0, b)``);
    an accumulator that reads copies has an attribute ``first_copy``, set to the position of this
    part's first copy in the batch (its copy ``j`` is in rows ``[(first_copy + j) b, (first_copy
    + j + 1) b)``). ``outputs(out, x, idx)`` receives the model's output for the clean images and
    this part's copies (in that order, ``(1 + len(copies)) b`` rows), and ``output_accs`` are
    the accumulators it feeds. ``n_images``: the part reads only the images of dataset index
    below it (a part without copies; the batches must hold them first); ``pixels``: a list that
    receives the uint8 pixels of the images the part reads, for analyses that draw them.
    """

    accs: Sequence = ()
    copies: Sequence[str] = ()
    make_copies: Callable[[torch.Tensor, list[int]], list[torch.Tensor]] | None = None
    outputs: Callable[[Any, torch.Tensor, list[int]], None] | None = None
    output_accs: Sequence = ()
    n_images: int | None = None
    pixels: list | None = None


class _FirstImages:
    """An accumulator that sees only the images of dataset index below ``n`` (see :class:`Part`)."""

    def __init__(self, acc: Any, n: int) -> None:
        self.acc, self.n = acc, n

    def update(self, bts: list, b: int, idx: Sequence[int]) -> None:
        m = _n_first(idx, self.n)
        if m:
            self.acc.update(bts, m, list(idx[:m]))


def _n_first(idx: Sequence[int], n: int | None) -> int:
    """How many of the batch's images have an index below ``n`` (they must lead the batch)."""
    if n is None:
        return len(idx)
    m = sum(1 for i in idx if int(i) < n)
    if any(int(i) >= n for i in idx[:m]):
        raise RuntimeError(f"a part limited to the first {n} images needs them at the start of the batch; "
                           f"got {list(idx)}.")
    return m


def stream_parts(s: Setup, parts: Sequence[Part], batches: Callable[[int], Iterable], total: int, desc: str,
                 progress: bool, state: RunState | None = None, cache: TokenCache | None = None) -> None:
    """Several analyses from the same forward passes: :func:`stream` with the batch made of the
    clean images and every part's copies, each part's accumulators and outputs callback given
    their own rows (see :class:`Part`). A model output that is a tuple or list (e.g. a training
    head pair) is read by its first element."""
    names = ["clean"]
    places = []
    for p in parts:
        if p.n_images is not None and (p.copies or p.outputs is not None):
            raise ValueError("a Part with n_images reads the clean tokens only (no copies, no outputs)")
        if bool(p.copies) != (p.make_copies is not None):
            raise ValueError("a Part has copies exactly when it has make_copies")
        places.append(len(names))
        for acc in p.accs:
            if hasattr(acc, "first_copy"):
                acc.first_copy = len(names)
        names += list(p.copies)
    accs = [acc if p.n_images is None else _FirstImages(acc, p.n_images) for p in parts for acc in p.accs]
    output_accs = [acc for p in parts for acc in p.output_accs]

    def make_inputs(x: torch.Tensor, idx: list[int], clean: bool) -> list[torch.Tensor]:
        for p in parts:
            if p.pixels is not None:
                m = _n_first(idx, p.n_images)
                if m:
                    p.pixels.append(uint8_images(x[:m]))
        xd = x.to(s.device)
        inputs = [s.cfg.normalize(xd)] if clean else []
        for p in parts:
            if p.make_copies is not None:
                copies = p.make_copies(xd, idx)
                if len(copies) != len(p.copies):
                    raise RuntimeError(f"a Part made {len(copies)} copies for its {len(p.copies)} names")
                inputs += list(copies)
        return inputs

    def outputs(out: Any, x: torch.Tensor, idx: list[int]) -> None:
        out = class_logits(out, "predictions")
        b = x.shape[0]
        for p, at in zip(parts, places):
            if p.outputs is not None:
                rows = out[:b] if not p.copies else torch.cat([out[:b], out[at * b : (at + len(p.copies)) * b]])
                p.outputs(rows, x, idx)

    stream(s, batches, total, desc, progress, make_inputs, accs, state, names,
           outputs=outputs if any(p.outputs is not None for p in parts) else None, output_accs=output_accs,
           cache=cache)


def run_state(state_dir: Any, key: dict, world: int, rank: int, every: int, resume: bool) -> RunState:
    check_positive_int("checkpoint_every", every)
    return RunState(state_dir, key, rank=rank, world=world, every=every, resume=resume)


def state_key(s: Setup, seed: int, params: dict) -> dict:
    return dict(params=params, model=s.lm.name, weights_sha256=s.lm.weights_sha256, seed=seed,
                data_config=s.cfg.to_dict(), images=list(s.images.names) if s.images is not None else None)
