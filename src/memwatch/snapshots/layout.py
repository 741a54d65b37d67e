"""What every snapshot layout provides, and the options loading takes.

A *layout* is one way diffusers and its example scripts lay a model snapshot out in a folder
(a pipeline, a model folder, an accelerate checkpoint, a LoRA). Each is one class in one module of
this package: it recognises its folders, says which denoiser a folder holds without loading it,
says when a save is complete, and loads the parts. :mod:`memwatch.snapshots` tries them in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from memwatch.models.parts import ModelParts


@dataclass
class LoadOptions:
    """How to load a snapshot (see :func:`memwatch.snapshots.load_snapshot`)."""

    weights: str = "raw"
    base_model: str | Path | None = None
    dtype: torch.dtype | None = None
    load_text: bool = True


@dataclass
class Loaded:
    """What a layout loaded.

    Attributes:
        parts: the model parts; ``scheduler`` is None (:func:`memwatch.snapshots.load_snapshot` sets it).
        files: label -> file of every weights file that makes up the denoiser.
        scheduler_from: the pipeline folder whose ``scheduler/`` is the snapshot's own, if it has one.
        base: the base pipeline folder used, if any.
        notes: things the user should know.
    """

    parts: ModelParts
    files: dict[str, Path]
    scheduler_from: Path | None = None
    base: Path | None = None
    notes: list[str] = field(default_factory=list)


class Layout:
    """Base class of snapshot layouts (see the module docstring)."""

    name: ClassVar[str] = ""

    def matches(self, path: Path) -> bool:
        """Whether ``path`` (a folder) is laid out this way, from the files it holds."""
        raise NotImplementedError

    def denoiser_class(self, path: Path, weights: str) -> str | None:
        """``_class_name`` of the folder's UNet read from JSON (no weights loaded); None if it does not say."""
        raise NotImplementedError

    def complete(self, path: Path) -> bool:
        """Whether every file the save writes is present and whole."""
        raise NotImplementedError

    def weight_files(self, path: Path, options: LoadOptions) -> dict[str, Path]:
        """label -> file of every weights file that makes up the denoiser, found without loading anything
        (their hashes identify the snapshot). Labels are relative to ``path``, or ``base_model/...``.

        Raises:
            MemwatchError: the weights the options ask for are not there.
        """
        raise NotImplementedError

    def identity(self, path: Path, options: LoadOptions, file_sha256: Callable[[Path], str]) -> str:
        """The sha256 that identifies the snapshot's weights: by default over its weights files' hashes
        (:func:`memwatch.snapshots.files.combined_sha256`). A layout whose files can hold the same weights
        in different bytes overrides it with a canonical hash.

        Args:
            path: the folder.
            options: which weights.
            file_sha256: hashes one file (a front-end may pass a cached one).
        """
        from memwatch.snapshots.files import combined_sha256

        return combined_sha256({label: file_sha256(f) for label, f in self.weight_files(path, options).items()})

    def load(self, path: Path, options: LoadOptions) -> Loaded:
        """Load the parts, checking every weights file first."""
        raise NotImplementedError


def listing(path: Path, limit: int = 8) -> str:
    """The first names in a folder, for error messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "") if names else "nothing"


def text_parts_from(base: Path, options: LoadOptions, text_encoder_dir: Path | None = None) -> dict[str, Any]:
    """Tokenizer, text encoder and VAE of the base pipeline (empty unless ``load_text``)."""
    from memwatch.snapshots.components import load_text_parts
    from memwatch.snapshots.files import read_json

    if not options.load_text:
        return {}
    return load_text_parts(
        base, read_json(base / "model_index.json"), text_encoder_dir=text_encoder_dir, dtype=options.dtype
    )
