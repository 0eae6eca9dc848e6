"""fanlens: look inside vision models the way the FAN paper does.

Per block: how many groups the tokens form (significant eigenvalues of the token
affinity), how much input noise still moves the features, and what the groups look
like. Works on timm models, fanlens' FAN, and any ``nn.Module``.
"""

from ._version import __version__
from . import execution as _execution

_execution.prepare_command_line()  # the `fanlens` command: OpenMP's wait policy, which it reads once, as torch loads


import warnings as _warnings

# timm imports huggingface_hub, which imports tqdm.auto: inside Jupyter without ipywidgets that
# warns "IProgress not found". fanlens draws text bars there instead (runner.progress_bar).
from ._deps import check_torchvision as _check_torchvision

_check_torchvision()  # a torch/torchvision mismatch is one line, not timm's 20-line traceback

with _warnings.catch_warnings():
    _warnings.filterwarnings("ignore", message="IProgress not found")
    import timm as _timm  # noqa: F401

from ._validation import FanlensError
from . import corruptions, execution, zoo  # zoo registers the "zoo:" model specs
from .analysis import analyze, group_tokens, make_noise, noise_probe, spectrum
from .attention import AttentionMaps, attention_maps
from .colouring import SpectralColours, spectral_colouring
from .reporting import report
from .attribution import AttributionShare, attribute, attribution_share, min_flip_sigma
from .capture import BlockTokens, TokenCapture, TokenLayout, find_blocks
from .models import build_model, load_checkpoint
from .pipeline import Comparison, compare
from .results import AttributionResult, FlipResult, GroupsResult, ProbeResult, RobustnessResult, SpectrumResult, load
from .robustness import robustness
from .lens import Lens, LensOptions

__all__ = [
    "__version__",
    "FanlensError",
    "Lens",
    "LensOptions",
    "TokenCapture",
    "TokenLayout",
    "BlockTokens",
    "find_blocks",
    "spectrum",
    "noise_probe",
    "analyze",
    "group_tokens",
    "make_noise",
    "attention_maps",
    "spectral_colouring",
    "report",
    "SpectralColours",
    "AttentionMaps",
    "attribute",
    "attribution_share",
    "min_flip_sigma",
    "AttributionResult",
    "AttributionShare",
    "FlipResult",
    "build_model",
    "compare",
    "Comparison",
    "load_checkpoint",
    "SpectrumResult",
    "ProbeResult",
    "GroupsResult",
    "load",
    "robustness",
    "RobustnessResult",
    "corruptions",
    "execution",
]
