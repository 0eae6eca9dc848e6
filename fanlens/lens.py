"""A session with one model and one set of images: capture once, ask many questions.

``lens = fanlens.Lens(model, images, batch_size=32, device="cpu")`` resolves the model and the
images once and validates the options shared by every analysis once (:class:`LensOptions`). Its
methods run the analyses with only their own parameters::

    lens = fanlens.Lens("vit_small_patch16_224", "photos/", input_size=224)
    spec = lens.spectrum(rules=("threshold", "eigengap"))
    probe = lens.probe(sigmas=(0.05, 0.1, 0.2))      # forwards the noisy copies only
    groups = lens.groups(k=4, n_images=3)            # forwards nothing
    lens.tokens("blocks.5")                          # the cached clean tokens of one block

The clean tokens of every image and block are captured the first time an analysis needs them
and kept in a :class:`~fanlens._cache.TokenCache`: up to ``cache_bytes`` in memory, beyond that
in a private temporary folder (``cache_spill=True``, the default) or not kept (``False``: those
images are forwarded again when needed). A later analysis forwards only what is new: the noisy
or corrupted copies of the probe and robustness; the spectrum, the groups, the spectral colours
and :meth:`Lens.tokens` forward nothing once the images are cached. Attention maps are the one
exception: the attention weights are not block outputs, so :meth:`Lens.attention` runs its own
forward pass.

The module functions (:func:`fanlens.spectrum`, :func:`fanlens.noise_probe`, ...) build a one-shot
``Lens`` without a cache and call the same method: there is one way of doing each analysis.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from . import analysis, spectral as sp
from ._cache import DEFAULT_CACHE_BYTES, TokenCache
from ._validation import FanlensError, check_positive_int, check_seed
from .capture import BlockTokens
from .data import DEFAULT_BATCH_SIZE, parse_input_size
from .models import LoadedModel
from .runner import Part, Setup, check_device, n_batches, resolve_shard, run_batches, run_state, setup, stream_parts

__all__ = ["Lens", "LensOptions", "DEFAULT_CACHE_BYTES"]

DEFAULT_CHECKPOINT_EVERY = analysis.DEFAULT_CHECKPOINT_EVERY


@dataclass(frozen=True)
class LensOptions:
    """The options every analysis of a :class:`Lens` shares, validated once (recorded in each
    result's provenance as ``params["lens_options"]``).

    Attributes:
        blocks: block names / glob patterns; ``None`` for the model family's blocks.
        batch_size: images per forward batch (copies travel with their images).
        device: where the model runs.
        seed: seeds the noise, the corruptions, k-means and a model built from a spec.
        pretrained, checkpoint: weights of a model given by name (see :func:`fanlens.build_model`).
        input_size: ``int`` or ``(H, W)``; default: the model's data config.
        num_prefix_tokens, layout, grid: override what fanlens derives from the model.
        progress: progress bars.
        shard: ``(rank, world_size)``; default from ``torch.distributed`` when initialised.
        state_dir: checkpoints of each analysis in ``state_dir/<analysis>`` (resumable runs).
        checkpoint_every: batches between checkpoints.
        resume: continue the analyses whose checkpoints are in ``state_dir``.
        cache_bytes: bytes of clean tokens kept in memory (0 keeps none in memory).
        cache_spill: beyond ``cache_bytes``, keep tokens in a temporary folder (``True``) or
            forward those images again when needed (``False``).
    """

    blocks: str | tuple[str, ...] | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "cpu"
    seed: int = 0
    pretrained: bool = False
    checkpoint: str | None = None
    input_size: tuple[int, int] | None = None
    num_prefix_tokens: int | None = None
    layout: str | None = None
    grid: tuple[int, int] | None = None
    progress: bool = True
    shard: tuple[int, int] | None = None
    state_dir: str | None = None
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    resume: bool = False
    cache_bytes: int = DEFAULT_CACHE_BYTES
    cache_spill: bool = True

    def __post_init__(self) -> None:
        put = object.__setattr__
        if self.blocks is not None and not isinstance(self.blocks, str):
            put(self, "blocks", tuple(self.blocks))
        check_positive_int("batch_size", self.batch_size)
        put(self, "device", str(check_device(self.device)))
        check_seed(self.seed)
        if self.input_size is not None:
            put(self, "input_size", parse_input_size(self.input_size))
        if self.grid is not None:
            put(self, "grid", tuple(self.grid))
        if self.num_prefix_tokens is not None:
            check_positive_int("num_prefix_tokens", self.num_prefix_tokens, minimum=0)
        check_positive_int("checkpoint_every", self.checkpoint_every)
        check_positive_int("cache_bytes", self.cache_bytes, minimum=0)
        for name in ("pretrained", "progress", "resume", "cache_spill"):
            if not isinstance(getattr(self, name), bool):
                raise FanlensError(f"{name} must be True or False. Got {getattr(self, name)!r} instead.")
        if self.state_dir is not None:
            put(self, "state_dir", os.fspath(self.state_dir))
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            raise FanlensError(f"checkpoint must be a file path. Got {type(self.checkpoint).__name__} instead.")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["checkpoint"] = None if self.checkpoint is None else os.fspath(self.checkpoint)
        return d

    def recorded(self) -> dict:
        """The options that shape the numbers (what a result's provenance records): all but the
        progress bars, the cache and the checkpointing, which change how, not what, is computed."""
        d = self.to_dict()
        for k in ("progress", "cache_bytes", "cache_spill", "state_dir", "checkpoint_every", "resume"):
            d.pop(k)
        return d


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LensOptions))


class Lens:
    """One model, one set of images, one :class:`LensOptions`: every analysis as a method.

    Args:
        model: a module, a :class:`~fanlens.models.LoadedModel` or a spec (timm name, FAN name,
            ``zoo:vit``, ``file.py:factory``, ``module:factory``).
        images: a pixel tensor ``(B, 3, H, W)`` in [0, 1], a folder, files, ``"samples"`` or a
            DataLoader; ``None`` for a lens that only runs the pure-noise probe.
        **options: the fields of :class:`LensOptions`.

    Results of the last call of each analysis are kept in :attr:`results` (for :meth:`report`).
    """

    def __init__(self, model: Any, images: Any = "samples", *, _check_blocks: bool = True, **options: Any) -> None:
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise FanlensError(f"Lens options must be among {list(_OPTION_NAMES)}. Got {unknown} instead; an "
                               f"analysis' own parameters go to its method (e.g. lens.spectrum(rules=...)).")
        self.options = LensOptions(**options)
        self._flat_state = False
        o = self.options
        self._setup: Setup = setup(model, images, pretrained=o.pretrained, checkpoint=o.checkpoint,
                                   input_size=o.input_size, device=o.device, blocks=o.blocks,
                                   num_prefix_tokens=o.num_prefix_tokens, layout=o.layout, grid=o.grid, seed=o.seed,
                                   need_images=images is not None, check_blocks=_check_blocks)
        self.cache = TokenCache(o.cache_bytes, spill=o.cache_spill)
        self.results: dict[str, Any] = {}

    @classmethod
    def one_shot(cls, model: Any, images: Any, *, check_blocks: bool = True, **options: Any) -> "Lens":
        """A lens for one analysis (the module functions): no cache, and ``state_dir`` is the
        checkpoint folder itself rather than the parent of one folder per analysis.
        ``check_blocks=False`` for an analysis that reads no tokens (robustness alone)."""
        lens = cls(model, images, _check_blocks=check_blocks, cache_bytes=0, cache_spill=False, **options)
        lens._flat_state = True
        return lens

    # ------------------------------------------------------------------ what it holds
    @property
    def model(self) -> torch.nn.Module:
        return self._setup.lm.model

    @property
    def loaded(self) -> LoadedModel:
        return self._setup.lm

    @property
    def images(self):
        """The resolved :class:`~fanlens.data.ImageSet` (``None`` for a pure-noise lens)."""
        return self._setup.images

    def __repr__(self) -> str:
        n = len(self.images) if self.images is not None else 0
        return (f"Lens(model={self.loaded.name!r}, images={n}, batch_size={self.options.batch_size}, "
                f"device={self.options.device!r}, cache={self.cache!r})")

    def close(self) -> None:
        """Drop the cached tokens (and their temporary folder)."""
        self.cache.close()

    def __enter__(self) -> "Lens":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # ------------------------------------------------------------------ the runner
    def _images_needed(self, what: str):
        if self.images is None:
            raise FanlensError(f"{what} needs images; this Lens was made with images=None (pure-noise probe only).")
        return self.images

    def _shard(self, n: int) -> tuple[int, int]:
        return resolve_shard(self.options.shard, n)

    def _common(self, what: str) -> dict:
        o = self.options
        _rank, world = self._shard(len(self._images_needed(what)))
        return dict(seed=o.seed, batch_size=o.batch_size, processes=world, blocks=o.blocks,
                    num_prefix_tokens=o.num_prefix_tokens, layout=o.layout, grid=o.grid)

    def _state(self, name: str, key: dict | None, world: int, rank: int):
        o = self.options
        folder = None
        if o.state_dir is not None and key is not None:
            folder = o.state_dir if self._flat_state else os.path.join(o.state_dir, name)
        elif o.resume:
            raise FanlensError("resume needs a state_dir (the folder of the checkpoints). Got none.")
        return run_state(folder, key or {}, world, rank, o.checkpoint_every, o.resume)

    def _stream(self, parts: Sequence[Part], desc: str, *, key: dict | None, name: str,
                n_images: int | None = None) -> None:
        """Stream the images (this process's shard; the first ``n_images`` with ``n_images``)
        through the parts, with the cache; checkpointed when ``key`` is given."""
        o, imgs = self.options, self._images_needed(desc)
        if n_images is not None:
            n = min(n_images, len(imgs))
            batches = lambda skip: imgs.batches(o.batch_size, start=skip * o.batch_size, stop=n)  # noqa: E731
            total = n_batches(n, o.batch_size)
            state = None
        else:
            rank, world = self._shard(len(imgs))
            bs = o.batch_size
            batches = lambda skip: imgs.batches(bs, start=rank + skip * bs * world, step=world)  # noqa: E731
            total = n_batches(len(range(rank, len(imgs), world)), bs)
            state = self._state(name, key, world, rank)
        stream_parts(self._setup, parts, batches, total, desc, o.progress, state, cache=self.cache)

    @property
    def setup(self) -> Setup:
        """The resolved model, data config, images and device (what the ``*_part`` builders of
        :mod:`fanlens.analysis`, :mod:`fanlens.robustness` and :mod:`fanlens.colouring` take)."""
        return self._setup

    def run(self, parts: Sequence[Part], desc: str = "analyses") -> None:
        """Several analyses from one pass over every image (:func:`fanlens.runner.stream_parts`
        with this lens' batches and cache); each part's ``finish()`` then gives its result, and
        :meth:`record` keeps it for the report."""
        self._stream(parts, desc, key=None, name="run")

    def record(self, name: str, result: Any) -> Any:
        """Keep ``result`` (of a part run by :meth:`run`) as this lens' ``name`` result, with the
        lens options in its provenance; returns it."""
        return self._keep(name, result)

    def _keep(self, name: str, result: Any) -> Any:
        """Record the lens options in the provenance of ``result`` and keep it for the report."""
        for r in result if isinstance(result, tuple) else (result,):
            prov = getattr(r, "provenance", None)
            if prov is not None:
                prov.params["lens_options"] = self.options.recorded()
        self.results[name] = result
        return result

    # ------------------------------------------------------------------ analyses
    def spectrum(self, *, rules: Sequence[str] = sp.RULES, thresholds: dict[str, float] | None = None,
                 affinity: str = sp.DEFAULT_AFFINITY, center: bool = True, knn: int = sp.DEFAULT_KNN,
                 max_k: int = sp.DEFAULT_MAX_GAP_K, token_budget: int = analysis.DEFAULT_TOKEN_BUDGET,
                 include_prefix: bool = False, n_eig: int = analysis.DEFAULT_N_EIG,
                 eig_dtype: torch.dtype | None = None):
        """Significant-eigenvalue counts per block (see :func:`fanlens.spectrum` for the
        parameters). Forwards only the images not yet cached."""
        part, key, finish = analysis.spectrum_part(
            self._setup, rules=rules, thresholds=thresholds, affinity=affinity, center=center, knn=knn, max_k=max_k,
            token_budget=token_budget, include_prefix=include_prefix, n_eig=n_eig, eig_dtype=eig_dtype,
            **self._common("spectrum"))
        self._stream([part], "spectrum", key=key, name="spectrum")
        return self._keep("spectrum", finish())

    def probe(self, *, sigmas: Sequence[float] | float | str = analysis.DEFAULT_SIGMAS, mode: str = "additive",
              space: str = "pixel", n_noise: int = analysis.DEFAULT_N_NOISE,
              corruption: str | Sequence[str] | None = None, severity: int | Sequence[int] = 3,
              token_norm: bool = False):
        """The noise probe (see :func:`fanlens.noise_probe`): only the noisy (or corrupted) copies
        are forwarded when the clean tokens are cached; ``mode="pure"`` forwards pure noise alone,
        ``mode="pure_vs_clean"`` one pure N(0, 1) input per image, divided by the image's clean
        tokens at the same block (cached)."""
        from ._validation import check_choice

        check_choice("mode", mode, analysis.PROBE_MODES)
        check_choice("space", space, analysis.NOISE_SPACES)
        if corruption is not None and mode != "additive":
            raise FanlensError(f"corruption goes with mode='additive' (a corrupted copy of each image). Got "
                               f"mode={mode!r}.")
        o = self.options
        if mode == "pure":
            if token_norm:
                raise FanlensError("token_norm goes with mode='additive' (a LayerNorm makes every token norm the "
                                   "same). Got mode='pure'.")
            shard = resolve_shard(o.shard, check_positive_int("n_noise", n_noise))
            key, run = analysis.pure_noise_probe(
                self._setup, n_noise=n_noise, seed=o.seed, batch_size=o.batch_size, shard=shard, progress=o.progress,
                blocks=o.blocks, num_prefix_tokens=o.num_prefix_tokens, layout=o.layout, grid=o.grid)
            return self._keep("probe", run(self._state("probe", key, shard[1], shard[0])))
        analysis.parse_sigmas(sigmas)
        part, key, finish = analysis.probe_part(self._setup, sigmas=sigmas, space=space, mode=mode,
                                                token_norm=token_norm, corruption=corruption, severity=severity,
                                                **self._common("probe"))
        self._stream([part], "probe (additive)", key=key, name="probe")
        return self._keep("probe", finish())

    def analyze(self, *, sigmas: Sequence[float] | float | str = analysis.DEFAULT_SIGMAS, space: str = "pixel",
                groups: int | str | None = None, n_init: int = 4, **spectral: Any):
        """:meth:`spectrum` and the additive :meth:`probe` (and with ``groups``, :meth:`groups`
        of every image) from the same forward passes; see :func:`fanlens.analyze`."""
        sig = analysis.parse_sigmas(sigmas)
        bad = sorted(set(spectral) - {"rules", "thresholds", "affinity", "center", "knn", "max_k", "token_budget",
                                      "include_prefix", "n_eig", "eig_dtype"})
        if bad:
            raise FanlensError(f"analyze takes the spectrum's parameters. Got unknown {bad} instead.")
        common = self._common("analyze")
        if groups is not None and (self.options.state_dir is not None or common["processes"] > 1):
            raise FanlensError("groups are neither checkpointed nor gathered across processes: call analyze(groups=...) "
                               "without state_dir in one process, or group_tokens separately.")
        part, key, finish = analysis.analyze_part(self._setup, sigmas=sig, space=space, groups=groups, n_init=n_init,
                                                  **spectral, **common)
        self._stream([part], "analyze", key=key, name="analyze")
        out = finish()
        self._keep("spectrum", out[0])
        self._keep("probe", out[1])
        if len(out) > 2:
            self._keep("groups", out[2])
        return out

    def groups(self, *, k: int | None = 4, n_images: int | None = None, affinity: str = sp.DEFAULT_AFFINITY,
               center: bool = True, knn: int = sp.DEFAULT_KNN, max_k: int = sp.DEFAULT_MAX_GAP_K,
               token_budget: int = analysis.DEFAULT_TOKEN_BUDGET, n_init: int = 4):
        """Spectral clusters of the tokens of every block per image (see
        :func:`fanlens.group_tokens`; ``k`` is its ``n_clusters``, ``None`` for the eigengap)."""
        o = self.options
        part, finish = analysis.groups_part(
            self._setup, n_clusters=k, affinity=affinity, center=center, knn=knn, max_k=max_k,
            token_budget=token_budget, n_init=n_init, seed=o.seed, n_images=n_images, batch_size=o.batch_size,
            blocks=o.blocks, num_prefix_tokens=o.num_prefix_tokens, layout=o.layout, grid=o.grid)
        self._stream([part], "groups", key=None, name="groups", n_images=self._n_all(n_images))
        return self._keep("groups", finish())

    def colours(self, *, n_images: int | None = None, affinity: str = sp.DEFAULT_AFFINITY, center: bool = True,
                knn: int = sp.DEFAULT_KNN, token_budget: int = analysis.DEFAULT_TOKEN_BUDGET,
                landmarks: int = sp.DEFAULT_LANDMARKS):
        """Spectral colours of the tokens (see :func:`fanlens.spectral_colouring`)."""
        from .colouring import colouring_part

        o = self.options
        part, finish = colouring_part(self._setup, n_images=n_images, affinity=affinity, center=center, knn=knn,
                                      token_budget=token_budget, landmarks=landmarks, batch_size=o.batch_size,
                                      seed=o.seed, blocks=o.blocks, num_prefix_tokens=o.num_prefix_tokens,
                                      layout=o.layout, grid=o.grid)
        self._stream([part], "colours", key=None, name="colours", n_images=self._n_all(n_images))
        return self._keep("colours", finish())

    def attention(self, *, n_images: int | None = None):
        """Attention maps of the lens' blocks (timm attention blocks; see
        :func:`fanlens.attention_maps`). Its own forward pass: attention weights are not block
        outputs and are not cached."""
        from .attention import attention_maps

        o = self.options
        res = attention_maps(self.loaded, self._images_needed("attention"), blocks=o.blocks, n_images=n_images,
                             batch_size=o.batch_size, device=o.device, seed=o.seed, input_size=o.input_size,
                             num_prefix_tokens=o.num_prefix_tokens, progress=o.progress)
        return self._keep("attention", res)

    def robustness(self, *, corruptions: Sequence[str] | str | None = None, severities: Any = (1, 2, 3, 4, 5),
                   labels: Any = None, class_index: Any = None, baseline: Any = None,
                   probe_severity: int | None = None):
        """Top-1 error (or flip rate) under ImageNet-C corruptions (see :func:`fanlens.robustness`).
        The clean predictions come from the cache when a clean pass ran to the end."""
        from .robustness import check_baseline, robustness_part

        imgs = self._images_needed("robustness")
        common = self._common("robustness")
        baseline = check_baseline(baseline)
        part, step, key, finish = robustness_part(self._setup, corruptions=corruptions, severities=severities,
                                                  labels=labels, class_index=class_index, baseline=baseline,
                                                  probe_severity=probe_severity, seed=common["seed"],
                                                  batch_size=common["batch_size"], processes=common["processes"])
        if probe_severity is not None:
            self._stream([part], "robustness + probe", key=key, name="robustness")
        else:  # no tokens needed: the clean outputs come from the cache where they are there
            o = self.options
            rank, world = self._shard(len(imgs))
            dev = self._setup.device

            def cached_step(x: torch.Tensor, idx: list[int]) -> None:
                hit = self.cache.get(idx, need_output=True, device=dev)
                step(x, idx, {None: hit.output} if hit is not None else None)

            run_batches(lambda skip: imgs.batches(o.batch_size, start=rank + skip * o.batch_size * world, step=world),
                        n_batches(len(range(rank, len(imgs), world)), o.batch_size), "robustness", o.progress,
                        cached_step, part.output_accs, self._state("robustness", key, world, rank))
        return self._keep("robustness", finish())

    def claims(self, *, sigma: float | None = None, rule: str | None = None, n_boot: int = 2000,
               masks: Any = None, others: Sequence["Lens"] = ()):
        """The paper's claims that this model (and ``others``, lenses of other models on the same
        images) allows, from the spectrum and probe of the lens (computed with their defaults
        when not yet run). ``masks``: ``(n, H, W)`` object masks of the images for C3."""
        from . import claims as cl

        ev = [lens._evidence(masks) for lens in (self, *others)]
        return self._keep("claims", cl.check(ev, sigma=sigma, rule=rule, n_boot=n_boot, seed=self.options.seed))

    def _evidence(self, masks: Any):
        from . import claims as cl
        from .grouping import mask_scores

        if "spectrum" not in self.results or "probe" not in self.results:
            self.analyze(groups=2 if masks is not None else None)
        scores = None
        if masks is not None:
            groups = self.results.get("groups")
            if groups is None or len(groups.images) != len(self.images):
                groups = self.groups(k=2)
            scores = mask_scores(groups, masks)
        rob = self.results.get("robustness")
        return cl.Evidence(self.loaded.name, self.results["spectrum"], self.results["probe"], scores=scores,
                           robustness=rob)

    def tokens(self, block: str | int) -> BlockTokens:
        """The clean tokens of ``block`` (its name, ``name#call``, or its index) for every image of
        the lens (this process's share), captured once and served from the cache."""
        if not self.cache.enabled:
            raise FanlensError("tokens needs the token cache; this Lens was made with cache_bytes=0 and "
                               "cache_spill=False.")
        imgs = self._images_needed("tokens")
        rank, world = self._shard(len(imgs))
        idx = list(range(rank, len(imgs), world))
        if any(i not in self.cache for i in idx):
            self._stream([Part()], "tokens", key=None, name="tokens")
        got = self.cache.get(idx, device=self._setup.device)
        if got is None:  # entries dropped beyond the budget (cache_spill=False)
            raise FanlensError(f"the clean tokens of {len(imgs)} images do not fit cache_bytes="
                               f"{self.options.cache_bytes} with cache_spill=False; raise cache_bytes or allow spilling.")
        labels = [bt.label for bt in got.blocks]
        if isinstance(block, int) and not isinstance(block, bool):
            if not -len(labels) <= block < len(labels):
                raise FanlensError(f"block must be an index below {len(labels)} or one of {labels}. Got {block!r} "
                                   f"instead.")
            return got.blocks[block]
        if block not in labels:
            raise FanlensError(f"block must be one of {labels} (or an index). Got {block!r} instead.")
        return got.blocks[labels.index(block)]

    def _n_all(self, n_images: int | None) -> int:
        imgs = self._images_needed("groups")
        if n_images is not None:
            check_positive_int("n_images", n_images)
        return len(imgs) if n_images is None else min(n_images, len(imgs))

    # ------------------------------------------------------------------ files
    def report(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write every result of this lens (``results.csv``, one figure per analysis,
        ``manifest.json``) into the folder ``path`` and its ``report.html``; returns the page's path."""
        from .reporting import REPORT_NAME, report
        from .execution import record as execution_record
        from .results import rows_to_csv, save_png, versions
        from .runner import OutputFolder

        if not self.results:
            raise FanlensError("report needs at least one analysis run on this Lens (e.g. lens.spectrum()).")
        out = OutputFolder(path, overwrite=overwrite, command="lens", param="path")
        rows = []
        for res in self.results.values():
            if hasattr(res, "rows") and not hasattr(res, "verdicts"):
                rows += [dict(r, model=self.loaded.name) for r in res.rows()]
        with out.staging() as tmp:
            (tmp / "results.csv").write_text(rows_to_csv(rows))
            for name, res in self.results.items():
                fig = _figure_of(res)
                if fig is not None:
                    save_png(fig, tmp / f"{name}.png")
            if "claims" in self.results:
                self.results["claims"].write_files(tmp)
            manifest = dict(kind="lens", runs=[dict(label=self.loaded.name)], versions=versions(),
                            execution=execution_record(),
                            provenance=dict(model=self.loaded.name, weights=self.loaded.weights,
                                            weights_sha256=self.loaded.weights_sha256,
                                            lens_options=self.options.to_dict()),
                            analyses=sorted(self.results))
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        page = Path(path) / REPORT_NAME
        report(path, out=page, overwrite=True)
        return page


def _figure_of(res: Any):
    """The default figure of a result (``None`` where there is none), for reports and notebooks."""
    figure = getattr(res, "default_figure", None)
    return figure() if callable(figure) else None
