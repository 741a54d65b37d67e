"""``model``: a folder ``ModelMixin.save_pretrained`` wrote: ``config.json`` and the weights."""

from __future__ import annotations

from pathlib import Path

from memwatch.models.parts import ModelParts
from memwatch.snapshots.checkpoint import from_base
from memwatch.snapshots.components import load_unet
from memwatch.snapshots.files import check_weight_files, model_folder_complete, model_weight_files, read_json
from memwatch.snapshots.layout import Layout, Loaded, LoadOptions


class ModelLayout(Layout):
    name = "model"

    def matches(self, path: Path) -> bool:
        return (path / "config.json").is_file()

    def denoiser_class(self, path: Path, weights: str) -> str | None:
        name = read_json(path / "config.json").get("_class_name")
        return str(name) if name else None

    def complete(self, path: Path) -> bool:
        return model_folder_complete(path)

    def weight_files(self, path: Path, options: LoadOptions) -> dict[str, Path]:
        # One set of weights, whatever `weights` says (the EMA ones if the run saved those here).
        files = model_weight_files(path)
        check_weight_files(path, files)
        return {str(f.relative_to(path)): f for f in files}

    def load(self, path: Path, options: LoadOptions) -> Loaded:
        files = self.weight_files(path, options)
        unet, _ = load_unet(path, dtype=options.dtype)
        return from_base(path, ModelParts(unet, None), files, options)
