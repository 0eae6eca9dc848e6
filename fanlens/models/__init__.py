"""Model building and weight loading (FAN registration lives in ``fanlens.models.fan``)."""

from ._loading import (
    RANDOM_INIT,
    LoadedModel,
    build_model,
    file_sha256,
    load_checkpoint,
    load_state_dict_file,
    state_dict_sha256,
)

__all__ = [
    "RANDOM_INIT",
    "LoadedModel",
    "build_model",
    "file_sha256",
    "load_checkpoint",
    "load_state_dict_file",
    "state_dict_sha256",
]
