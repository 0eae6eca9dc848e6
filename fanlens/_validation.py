"""Errors and input checks shared by every fanlens module.

One message format everywhere: the parameter, what was expected, and what came,
``"<param> must be <expected>. Got <value!r> instead."``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "FanlensError",
    "check_choice",
    "check_positive_int",
    "check_nonneg_float",
    "check_fraction",
    "check_shape",
    "check_seed",
    "all_finite",
    "MAX_SEED",
]

MAX_SEED = 2**63 - 1


class FanlensError(ValueError):
    """Base class of every error fanlens raises on bad input or an unusable model.

    It subclasses :class:`ValueError` so that callers catching ``ValueError``
    keep working; the CLI turns it into a one-line message and exit code 2.
    """


def _fmt(name: str, expected: str, value: Any) -> str:
    return f"{name} must be {expected}. Got {value!r} instead."


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise FanlensError(_fmt(name, f"one of {choices}", value))
    return value


def check_positive_int(name: str, value: Any, *, minimum: int = 1, maximum: int | None = None,
                       why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FanlensError(_fmt(name, f"an int >= {minimum}", value))
    if maximum is not None and value > maximum:
        raise FanlensError(_fmt(name, f"an int <= {maximum:,}" + (f" ({why})" if why else ""), value))
    return value


def check_nonneg_float(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FanlensError(_fmt(name, "a float >= 0", value)) from None
    if not v >= 0.0 or v != v or v == float("inf"):
        raise FanlensError(_fmt(name, "a finite float >= 0", value))
    return v


def check_fraction(name: str, value: Any, *, open_low: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FanlensError(_fmt(name, "a float in (0, 1)", value)) from None
    ok = (0.0 < v < 1.0) if open_low else (0.0 <= v < 1.0)
    if not ok:
        raise FanlensError(_fmt(name, "a float in (0, 1)", value))
    return v


def check_shape(name: str, x: torch.Tensor, dims: Sequence[str]) -> None:
    """Check that ``x`` has ``len(dims)`` dimensions; named dims document the layout.

    Dims given as digits must match exactly, e.g. ``["B", "3", "H", "W"]``.
    """
    if not isinstance(x, torch.Tensor):
        raise FanlensError(_fmt(name, f"a torch.Tensor of shape ({', '.join(dims)})", type(x).__name__))
    if x.ndim != len(dims):
        raise FanlensError(_fmt(name, f"a tensor of shape ({', '.join(dims)})", tuple(x.shape)))
    for d, size in zip(dims, x.shape):
        if d.isdigit() and int(d) != size:
            raise FanlensError(_fmt(name, f"a tensor of shape ({', '.join(dims)})", tuple(x.shape)))


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed is an int in ``[0, 2**63 - 1]`` (numpy's SeedSequence and torch both take it)."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or not 0 <= value.__index__() <= MAX_SEED:
        raise FanlensError(_fmt(name, "an int in [0, 2**63 - 1]", value))
    return int(value.__index__())


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite. One sum first (NaN and inf propagate through
    it; 20x cheaper than an elementwise test on large token tensors); only a non-finite sum,
    which finite values can also give by overflowing, is checked element by element."""
    if t.numel() == 0:
        return True
    if not t.is_floating_point() and not t.is_complex():
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
