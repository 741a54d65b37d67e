"""Reading model weights files from users safely: safetensors first, never an unrestricted unpickle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from memwatch.errors import MemwatchError

SAFETENSORS_SUFFIXES = (".safetensors",)


def read_state_dict(path: str | Path, *, what: str, setting: str, model: str = "the model") -> dict[str, Any]:
    """Load a state dict from ``path``: safetensors, else ``torch.load(weights_only=True)``.

    A training checkpoint's ``{"state_dict": ...}`` wrapper and a DataParallel ``module.`` prefix are
    removed. Errors name the file, what it should hold and the setting that points at it.

    Args:
        path: the weights file.
        what: how messages name the file (e.g. ``"CLIP weights"``).
        setting: the config setting or option that names the file (e.g. ``"embedder.pretrained"``).
        model: how messages name the model whose state dict to save.

    Example:
        >>> sd = read_state_dict("w.safetensors", what="matcher weights", setting="identity.weights")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader error: the file is unusable, say which and what to do
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MemwatchError(
            f"cannot read {what} file {path} ({first_line}): save {model}'s state_dict with safetensors "
            f"(or torch.save of a plain state_dict) and point {setting} at it"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # training checkpoints wrap the weights
    if not isinstance(state, dict) or not state:
        raise MemwatchError(f"{what} file {path} holds no state dict: save model.state_dict() to it")
    if all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}  # saved from DataParallel/DDP
    return state
