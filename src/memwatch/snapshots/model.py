"""``model``: a folder ``ModelMixin.save_pretrained`` wrote: ``config.json`` and the weights."""

from __future__ import annotations

from pathlib import Path

from memwatch.model_parts import ModelParts
from memwatch.snapshots.checkpoint import from_base
from memwatch.snapshots.components import load_unet
from memwatch.snapshots.files import model_folder_complete, read_json
from memwatch.snapshots.layout import Layout, Loaded, LoadOptions, no_ema


class ModelLayout(Layout):
    name = "model"

    def matches(self, path: Path) -> bool:
        return (path / "config.json").is_file()

    def denoiser_class(self, path: Path, weights: str) -> str | None:
        name = read_json(path / "config.json").get("_class_name")
        return str(name) if name else None

    def complete(self, path: Path) -> bool:
        return model_folder_complete(path)

    def load(self, path: Path, options: LoadOptions) -> Loaded:
        no_ema(options.weights, path, "a model folder holds one set of weights")
        unet, unet_files = load_unet(path, dtype=options.dtype)
        return from_base(path, ModelParts(unet, None), {str(f.relative_to(path)): f for f in unet_files}, options)
