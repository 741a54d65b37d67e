"""Stable hashes for files, bytes and configs (sha256 everywhere, so reports can cite them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks.

    Example:
        >>> sha256_file("model.safetensors")  # doctest: +SKIP
        '9f86d0...'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal configs serialise to equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any) -> str:
    """Short (16 hex) sha256 of the canonical JSON of ``obj``; used as a cache and result key.

    Example:
        >>> config_hash({"b": 1, "a": 2}) == config_hash({"a": 2, "b": 1})
        True
    """
    return sha256_bytes(canonical_json(obj).encode())[:16]


def run_identity_hash(folder: str, reference: str | None, holdout: str | None) -> str:
    """The identity of a training run: its folder's name and its data's manifests, nothing of its settings
    (see :mod:`memwatch.core.run_identity`).

    Example:
        >>> a = run_identity_hash("ddpm", "a", None)
        >>> a == run_identity_hash("ddpm", "a", None) != run_identity_hash("ddpm", "b", None)
        True
    """
    return config_hash({"folder": folder, "reference": reference, "holdout": holdout})


def state_sha256(module: Any) -> str:
    """Hex sha256 of a live module's weights: every tensor of its ``state_dict``, with name, dtype and shape.

    Identifies a snapshot probed inside training the way a file's sha256 identifies a saved one (the two
    are different hashes of the same weights). Tensors are hashed one at a time, on the CPU.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> b.load_state_dict(a.state_dict())
        <All keys matched successfully>
        >>> state_sha256(a) == state_sha256(b)
        True
    """
    import torch

    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        # the raw bytes, whatever the dtype (numpy has no bfloat16)
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
