"""Weights files of diffusers folders: which files, whether they are whole, and one hash for them.

Nothing is unpickled here: safetensors headers are parsed as JSON and checked against the file's
size, so a file still being written, cut short by a full disk or overwritten by something else
fails with a message naming it instead of deep inside a loader.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memwatch.errors import MemwatchError

MODEL_STEM = "diffusion_pytorch_model"  # diffusers' SAFETENSORS_WEIGHTS_NAME / WEIGHTS_NAME stem
# A safetensors header is a small JSON object; anything claiming more is a corrupt file, not a header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def check_safetensors(path: str | Path) -> dict[str, str]:
    """Check that a safetensors file is whole (header parses, data fills the file exactly).

    A file still being written, cut short by a full disk, or overwritten by something else fails
    here with a message naming it, instead of deep inside a loader.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The file's ``__metadata__`` (string -> string; empty if none).

    Example:
        >>> check_safetensors("unet/diffusion_pytorch_model.safetensors")  # doctest: +SKIP
        {'format': 'pt'}
    """
    path = Path(path)
    fix = "re-save it, or remove the folder if training was interrupted while saving"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise MemwatchError(f"{path}: truncated safetensors file ({size} bytes, no header): {fix}")
            n = int.from_bytes(raw_len, "little")
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise MemwatchError(f"{path}: truncated or corrupt safetensors file (bad header length): {fix}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise MemwatchError(f"{path}: cannot read weights file ({e.strerror}): check the path and permissions") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MemwatchError(f"{path}: corrupt safetensors header: {fix}") from e
    if not isinstance(header, dict):
        raise MemwatchError(f"{path}: corrupt safetensors header: {fix}")
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise MemwatchError(f"{path}: corrupt safetensors header: {fix}") from e
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        raise MemwatchError(
            f"{path}: truncated or corrupt safetensors file ({size} bytes, header describes {expected}): {fix}"
        )
    return dict(header.get("__metadata__") or {})


def model_weight_files(folder: str | Path) -> list[Path]:
    """The weights file(s) of a diffusers model folder: safetensors first, then ``.bin``.

    Sharded weights (``diffusion_pytorch_model.safetensors.index.json``) give every shard.

    Args:
        folder: a model folder (with ``config.json``).

    Returns:
        The files, or an empty list when the folder has none.

    Example:
        >>> model_weight_files("ckpt/unet")  # doctest: +SKIP
        [PosixPath('ckpt/unet/diffusion_pytorch_model.safetensors')]
    """
    folder = Path(folder)
    for ext in ("safetensors", "bin"):
        single = folder / f"{MODEL_STEM}.{ext}"
        if single.is_file():
            return [single]
        index = folder / f"{MODEL_STEM}.{ext}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise MemwatchError(f"{index}: unreadable shard index: re-save the model") from e
            return [folder / s for s in shards]
    return []


def check_weight_files(folder: Path, files: list[Path]) -> None:
    if not files:
        raise MemwatchError(
            f"{folder}: no weights ({MODEL_STEM}.safetensors or .bin): "
            "point at a folder the training script has finished saving"
        )
    for f in files:
        if not f.is_file():
            raise MemwatchError(f"{f}: weights shard is missing: the save is incomplete or the folder was damaged")
        if f.suffix == ".safetensors":
            check_safetensors(f)


def combined_sha256(files: Mapping[str, str]) -> str:
    """One sha256 for a set of files: the file's own when there is one, else over sorted lines.

    Args:
        files: label -> sha256 of the file.

    Example:
        >>> combined_sha256({"a.safetensors": "ab"})
        'ab'
    """
    if not files:
        raise MemwatchError("no weights files were read: nothing to hash")
    if len(files) == 1:
        return next(iter(files.values()))
    lines = "".join(f"{sha}  {label}\n" for label, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise MemwatchError(f"{path}: missing: the folder is incomplete") from e
    except (OSError, ValueError) as e:
        raise MemwatchError(f"{path}: unreadable JSON ({e}): re-save the model") from e
    if not isinstance(data, dict):
        raise MemwatchError(f"{path}: expected a JSON object: re-save the model")
    return data


def model_folder_complete(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    files = model_weight_files(folder)
    if not files:
        return False
    try:
        check_weight_files(folder, files)
    except MemwatchError:
        return False
    return True


def transformers_weight_files(folder: Path) -> list[Path]:
    """``model.safetensors`` (or its shards) / ``pytorch_model.bin``, as transformers saves them."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", None)):
        if (folder / single).is_file():
            return [folder / single]
        if index and (folder / index).is_file():
            try:
                return [
                    folder / s for s in sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
                ]
            except (OSError, ValueError, KeyError, AttributeError):
                return []
    return []
