"""Import-time checks of the packages fanlens stands on, each failure one line that says what to install."""

from __future__ import annotations

from importlib import metadata

__all__ = ["torchvision_mismatch", "check_torchvision"]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def torchvision_mismatch(error: BaseException) -> str:
    """The one-line message for a torchvision that does not match the installed torch (its C++
    operators fail to register: ``operator torchvision::nms does not exist``)."""
    torch_v = _version("torch")
    tv = _version("torchvision")
    base = torch_v.split("+")[0].split(".")
    pair = ""
    if len(base) >= 2 and base[0] == "2" and base[1].isascii() and base[1].isdigit():
        pair = f"torchvision=={0}.{int(base[1]) + 15}.* (the release built for torch {base[0]}.{base[1]})"
    fix = f"pip install '{pair.split(' ')[0]}'" if pair else "pip install --force-reinstall torch torchvision"
    return (f"torchvision {tv} does not match torch {torch_v} ({str(error).strip().splitlines()[0][:80]}); "
            f"install the matching pair: {fix}, or reinstall both with pip install --force-reinstall torch "
            f"torchvision.")


def check_torchvision() -> None:
    """Import torchvision (timm needs it) and turn a torch/torchvision mismatch into one ImportError line."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" in str(e) or "operator" in str(e):
            raise ImportError(torchvision_mismatch(e)) from None
        raise
