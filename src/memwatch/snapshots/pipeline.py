"""``pipeline``: a folder ``DiffusionPipeline.save_pretrained`` wrote (``model_index.json``).

It holds ``unet/``, ``scheduler/`` and, for Stable Diffusion, ``vae/``, ``text_encoder/`` and
``tokenizer/``. It holds one set of weights: with ``--use_ema`` the scripts save the EMA weights here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from memwatch.errors import MemwatchError
from memwatch.models.parts import ModelParts, is_text_conditioned
from memwatch.snapshots.components import UNET_CLASSES, component_spec, load_text_parts, load_unet
from memwatch.snapshots.files import check_weight_files, model_weight_files, read_json, transformers_weight_files
from memwatch.snapshots.layout import Layout, Loaded, LoadOptions


class PipelineLayout(Layout):
    name = "pipeline"

    def matches(self, path: Path) -> bool:
        return (path / "model_index.json").is_file()

    def denoiser_class(self, path: Path, weights: str) -> str | None:
        spec = component_spec(read_json(path / "model_index.json"), "unet")
        return spec[1] if spec else None

    def complete(self, path: Path) -> bool:
        # save_pretrained writes model_index.json first: every component it lists must be there and whole.
        try:
            index = read_json(path / "model_index.json")
        except MemwatchError:
            return False
        return all(component_spec(index, name) is None or _component_complete(path / name) for name in index)

    def weight_files(self, path: Path, options: LoadOptions) -> dict[str, Path]:
        # One set of weights, whatever `weights` says: with --use_ema the scripts save the EMA weights here.
        index = read_json(path / "model_index.json")
        spec = component_spec(index, "unet")
        if spec is None or spec[1] not in UNET_CLASSES:
            raise MemwatchError(
                f"{path / 'model_index.json'}: no unet of {UNET_CLASSES}: this pipeline is not supported"
            )
        files = model_weight_files(path / "unet")
        check_weight_files(path / "unet", files)
        return {str(f.relative_to(path)): f for f in files}

    def load(self, path: Path, options: LoadOptions) -> Loaded:
        files = self.weight_files(path, options)
        index = read_json(path / "model_index.json")
        unet, _ = load_unet(path / "unet", dtype=options.dtype)
        parts = ModelParts(unet, None)
        if is_text_conditioned(unet) and options.load_text:
            parts = dataclasses.replace(
                parts, **load_text_parts(path, index, text_encoder_dir=None, dtype=options.dtype)
            )
        return Loaded(parts, files, scheduler_from=path)


def _component_complete(folder: Path) -> bool:
    """A pipeline component folder: a scheduler, a model (config + whole weights), or config files only."""
    if not folder.is_dir():
        return False
    if (folder / "scheduler_config.json").is_file():
        return True
    if not (folder / "config.json").is_file():
        # tokenizers and feature extractors are only small config/vocabulary files
        return any(folder.iterdir())
    files = model_weight_files(folder) or transformers_weight_files(folder)
    try:
        check_weight_files(folder, files)
    except MemwatchError:
        return False
    return True
