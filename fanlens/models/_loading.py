"""Building models from a spec string and loading weights without running pickled code."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .._validation import FanlensError, check_seed

__all__ = [
    "LoadedModel",
    "build_model",
    "load_state_dict_file",
    "load_checkpoint",
    "load_state_dict_checked",
    "load_pretrained_from_cfg",
    "file_sha256",
    "state_dict_sha256",
    "RANDOM_INIT",
    "SPEC_PREFIXES",
    "register_spec_prefix",
]

RANDOM_INIT = "random init"

SPEC_PREFIXES: dict[str, tuple[Callable[[str], "LoadedModel"], Callable[[str], nn.Module]]] = {}
"""Spec prefixes such as ``"zoo:"`` -> (load trained model by name, build architecture by name).
Filled by the packages that own the models (:mod:`fanlens.zoo` registers ``"zoo:"``), so that
model building does not import them."""


def register_spec_prefix(prefix: str, load: Callable[[str], "LoadedModel"], build: Callable[[str], nn.Module]) -> None:
    """Make ``build_model("PREFIX:name")`` call ``load(name)`` (or ``build(name)`` plus a checkpoint)."""
    if not prefix.endswith(":"):
        raise FanlensError(f"prefix must end with ':'. Got {prefix!r} instead.")
    SPEC_PREFIXES[prefix] = (load, build)
_STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_MAX_KEYS_SHOWN = 10


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with where its weights came from.

    Attributes:
        model: the module, in eval mode.
        name: the spec it was built from.
        weights: ``"random init"``, ``"pretrained"`` or the checkpoint path.
        weights_sha256: SHA-256 of the checkpoint file, of the pretrained state dict,
            or ``"random init"``.
        owned: fanlens built the module from a spec (it may adapt it, e.g. to an input
            size); ``False`` for a module the caller passed in, which is never changed.
    """

    model: nn.Module
    name: str
    weights: str
    weights_sha256: str
    owned: bool = True


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over the state dict's keys, dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never running pickled code.

    Torch files are read with ``weights_only=True``. A dict holding the weights under
    ``state_dict_ema``, ``model_ema``, ``state_dict`` or ``model`` is unwrapped, and
    ``module.`` prefixes (DataParallel / DDP) are stripped.
    """
    p = Path(path)
    if not p.is_file():
        raise FanlensError(f"checkpoint must be an existing file. Got {str(path)!r} instead.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(p))
        except Exception as e:  # safetensors raises its own error types
            raise FanlensError(f"checkpoint {str(p)!r} is not a readable safetensors file: {e}") from None
    else:
        with open(p, "rb") as f:
            head = f.read(8)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch zip archive, or a legacy pickle
            raise FanlensError(
                f"checkpoint must be a weights file (.safetensors, or a torch .pth/.pth.tar/.bin). Got "
                f"{str(p)!r}, which is neither (it starts with {head!r})."
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
                sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().split(". ")[0] if str(e).strip() else ""
            raise FanlensError(
                f"checkpoint {str(p)!r} cannot be loaded with weights_only=True (fanlens never runs "
                f"pickled code): {type(e).__name__}: {first[:300]}"
            ) from None
    if isinstance(sd, Mapping):
        for key in _STATE_KEYS:
            if key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FanlensError(
            f"checkpoint {str(p)!r} must hold a state dict (name -> tensor), directly or under one of "
            f"{_STATE_KEYS}. Got {type(sd).__name__} with keys {list(sd)[:_MAX_KEYS_SHOWN] if isinstance(sd, Mapping) else ''} instead."
        )
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_state_dict_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``sd`` into ``model`` strictly; a misfit names the missing, unexpected and mismatched keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys {missing[:_MAX_KEYS_SHOWN]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys {unexpected[:_MAX_KEYS_SHOWN]}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches {mismatched[:_MAX_KEYS_SHOWN]}")
        raise FanlensError(f"checkpoint {source} does not fit the model {type(model).__name__}: " + "; ".join(parts) + ".")
    model.load_state_dict(sd, strict=True)


def load_checkpoint(model: nn.Module, path: str | Path, *, filter_fn: Callable | None = None) -> None:
    """Load a checkpoint file into ``model`` strictly, with a clear error when it does not fit.

    ``filter_fn(state_dict, model)`` defaults to the ``checkpoint_filter_fn`` of the
    model's module when it has one (FAN's maps released checkpoints to its layout).
    """
    sd = load_state_dict_file(path)
    if filter_fn is None:
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    _load_filtered(model, sd, filter_fn, repr(str(path)))


def _load_filtered(model: nn.Module, sd: Mapping, filter_fn: Callable | None, source: str) -> None:
    """``filter_fn(sd, model)`` (a timm model's ``checkpoint_filter_fn``, written for its own released
    checkpoints), then the strict load. A filter that fails on another checkpoint (a KeyError on a key this
    model lacks, say) leaves it as it is: the strict load then accepts it only if every key and shape fits,
    and otherwise names what does not, with the filter's failure."""
    if filter_fn is None:
        load_state_dict_checked(model, sd, source)
        return
    try:
        filtered = filter_fn(sd, model)
    except Exception as e:  # noqa: BLE001 - any failure of third-party code; the strict load below decides
        failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    else:
        load_state_dict_checked(model, filtered, source)
        return
    try:
        load_state_dict_checked(model, sd, source)
    except FanlensError as e:
        raise FanlensError(f"{e} (The model's checkpoint filter failed on it too: {failed}.)") from None


def load_pretrained_from_cfg(model: nn.Module, variant: str, filter_fn: Callable | None = None) -> None:
    """Load the weights named by ``model.pretrained_cfg``: its ``file`` (a local path, e.g. from
    ``pretrained_cfg_overlay=dict(file=...)``) or else its ``url`` (downloaded by torch.hub and
    read with ``weights_only=True``)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    file, url = cfg.get("file"), cfg.get("url")
    if file:
        load_checkpoint(model, file, filter_fn=filter_fn)
        return
    if not url:
        raise FanlensError(
            f"{variant} has no released checkpoint to download; pass a local file with "
            f"pretrained_cfg_overlay=dict(file=PATH) or checkpoint=PATH (on the command line: --checkpoint FILE)."
        )
    sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, check_hash=False)
    for key in _STATE_KEYS:
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    _load_filtered(model, sd, filter_fn, repr(url))


HUB_PROBE_TIMEOUT_S = 3.0  # how long a pretrained download may wait for the weights' host to answer


def pretrained_unreachable(spec: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why timm's pretrained weights of ``spec`` cannot be had, or ``None`` when they can (a local
    file in its config, a copy in the Hugging Face cache, or a host that answers within
    ``timeout`` seconds). One short connection instead of the hub client's retries (about a
    minute offline)."""
    import os
    import socket
    from urllib.parse import urlparse

    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(spec)
    except Exception:  # noqa: BLE001 - timm's registry lookups raise several types; let create_model decide
        return None
    if cfg is None or getattr(cfg, "file", None):
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo = hub_id.split(":")[-1] if ":" in hub_id else hub_id
            for fname in ("model.safetensors", "pytorch_model.bin", getattr(cfg, "hf_hub_filename", None)):
                if fname and isinstance(try_to_load_from_cache(repo, fname), str):
                    return None
        except Exception:  # noqa: BLE001 - an old or missing hub client: let the download say
            return None
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            return "HF_HUB_OFFLINE is set and the weights are not in the Hugging Face cache"
        host = "huggingface.co"
    else:
        url = getattr(cfg, "url", None)
        host = urlparse(url).hostname if url else None
        if not host:
            return None
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        return f"{host} did not answer within {timeout:g} s ({type(e).__name__})"
    return None


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise FanlensError(f"model must be 'file.py:factory' or 'package.module:factory'. Got {spec!r} instead.")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise FanlensError(f"model file must exist. Got {target!r} instead.")
        mod_name = f"_fanlens_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        s = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(s)
        sys.modules[mod_name] = module
        try:
            s.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise FanlensError(f"model file {target!r} failed to import: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise FanlensError(f"model module {target!r} cannot be imported: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise FanlensError(f"model factory {attr!r} must be a callable in {target!r}. Got {type(fn).__name__} instead.")
    return fn


def build_model(
    spec: str | nn.Module,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> LoadedModel:
    """Build a model in eval mode from a spec.

    Args:
        spec: a timm model name (FAN names too, after ``import fanlens``),
            ``path/to/file.py:factory`` or ``package.module:factory`` returning an
            ``nn.Module``, ``zoo:NAME`` for the embedded models (trained weights, offline),
            or a module (kept as is).
        pretrained: load timm's pretrained weights (needs a download, or a local file
            through ``pretrained_cfg_overlay=dict(file=...)`` in ``kwargs``).
        checkpoint: a local weights file (``.safetensors``, ``.pth``, ``.pth.tar``), loaded strictly.
        seed: seeds the random initialisation of models built from a name or factory
            (under a forked RNG, so the caller's global RNG state is untouched), making
            random-init models reproducible. A module passed in is already initialised:
            seed the code that built it.
        kwargs: passed to ``timm.create_model`` or the factory.
    """
    seed = check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(spec, pretrained=pretrained, checkpoint=checkpoint, **kwargs)


def _build(spec: Any, *, pretrained: bool, checkpoint: Any, **kwargs: Any) -> LoadedModel:
    if isinstance(spec, nn.Module):
        model, name = spec, type(spec).__name__
    elif not isinstance(spec, str) or not spec:
        raise FanlensError(f"model must be a model name or an nn.Module. Got {spec!r} instead.")
    elif spec.split(":", 1)[0] + ":" in SPEC_PREFIXES:
        prefix, rest = spec.split(":", 1)
        load, build = SPEC_PREFIXES[prefix + ":"]
        if pretrained:
            raise FanlensError(f"pretrained applies to timm names; {spec!r} carries its own weights.")
        if checkpoint is None:
            return load(rest)
        model, name = build(rest), spec
    elif ":" in spec:
        factory = _import_factory(spec)
        try:
            model, name = factory(**kwargs), spec
        except FanlensError:
            raise
        except Exception as e:  # the user's code: any error becomes one line naming the factory
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise FanlensError(f"model factory {spec!r} raised {type(e).__name__}: {first}") from None
        if not isinstance(model, nn.Module):
            raise FanlensError(f"model factory {spec!r} must return an nn.Module. Got {type(model).__name__} instead.")
        if pretrained:
            raise FanlensError("pretrained applies to timm names only; pass checkpoint= for a factory model.")
    else:
        import timm

        name = spec
        if not timm.is_model(spec):
            close = difflib.get_close_matches(spec, timm.list_models(), n=5, cutoff=0.6)
            hint = f" Close names: {', '.join(close)}." if close else ""
            raise FanlensError(f"model must be a timm model name or 'file.py:factory'. Got {spec!r} instead.{hint}")
        if pretrained and "pretrained_cfg_overlay" not in kwargs:
            reason = pretrained_unreachable(spec)
            if reason:
                raise FanlensError(f"pretrained weights for {spec!r} cannot be downloaded: {reason}. Offline, pass a "
                                   f"local file: checkpoint=PATH (on the command line: --checkpoint FILE).")
        try:
            model = timm.create_model(spec, pretrained=pretrained, **kwargs)
        except (RuntimeError, OSError) as e:
            if pretrained:
                raise FanlensError(
                    f"pretrained weights for {spec!r} could not be loaded ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}). Offline, pass a local file: checkpoint=PATH "
                    f"(on the command line: --checkpoint FILE)."
                ) from None
            raise
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        weights, digest = str(checkpoint), file_sha256(checkpoint)
    elif isinstance(spec, nn.Module):
        weights, digest = "user module", state_dict_sha256(model)
    elif pretrained:
        weights, digest = "pretrained", state_dict_sha256(model)
    else:
        weights, digest = RANDOM_INIT, RANDOM_INIT
    model.eval()
    return LoadedModel(model, name, weights, digest, owned=not isinstance(spec, nn.Module))
