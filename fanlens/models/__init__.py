"""Model building and weight loading; importing this package registers FAN into timm."""

from . import fan, fan_swin
from ._loading import (
    RANDOM_INIT,
    LoadedModel,
    build_model,
    file_sha256,
    load_checkpoint,
    load_pretrained_from_cfg,
    load_state_dict_checked,
    load_state_dict_file,
    state_dict_sha256,
)
from .fan import FAN, hybrid_backbone
from .fan_swin import FANSwinTransformer

FAN_MODEL_NAMES = fan.FAN_VIT_NAMES + fan_swin.FAN_SWIN_NAMES

__all__ = [
    "FAN",
    "FANSwinTransformer",
    "FAN_MODEL_NAMES",
    "RANDOM_INIT",
    "LoadedModel",
    "build_model",
    "hybrid_backbone",
    "file_sha256",
    "load_checkpoint",
    "load_pretrained_from_cfg",
    "load_state_dict_checked",
    "load_state_dict_file",
    "state_dict_sha256",
]
