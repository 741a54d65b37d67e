"""``checkpoint``: an ``accelerator.save_state`` folder of the full fine-tune scripts.

Their save hook writes ``unet/`` (``model.save_pretrained``) and, with ``--use_ema``, ``unet_ema/``
(``EMAModel.save_pretrained``); DreamBooth with ``--train_text_encoder`` adds ``text_encoder/``.
accelerate writes ``random_states_0.pkl`` after the hook, the optimizer and the LR scheduler: the
"this checkpoint is complete" signal. Its pickles are never opened. The noise scheduler and, for
text-to-image UNets, the tokenizer, text encoder and VAE come from ``base_model``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from memwatch.errors import MemwatchError
from memwatch.models.parts import ModelParts, is_text_conditioned
from memwatch.snapshots.components import base_pipeline, load_unet
from memwatch.snapshots.files import check_weight_files, model_folder_complete, model_weight_files, read_json
from memwatch.snapshots.layout import Layout, Loaded, LoadOptions, listing, text_parts_from

#: written by accelerate's save_accelerator_state after the save hook, the models, the optimizer and
#: the LR scheduler: the "this checkpoint is complete" signal for checkpoint-<step> folders.
RNG_STATE_FILE = "random_states_0.pkl"
SUBFOLDERS = {"raw": "unet", "ema": "unet_ema"}


class CheckpointLayout(Layout):
    name = "checkpoint"

    def matches(self, path: Path) -> bool:
        return any((path / sub).is_dir() for sub in SUBFOLDERS.values())

    def denoiser_class(self, path: Path, weights: str) -> str | None:
        name = read_json(path / SUBFOLDERS[weights] / "config.json").get("_class_name")
        return str(name) if name else None

    def complete(self, path: Path) -> bool:
        subs = [path / s for s in SUBFOLDERS.values() if (path / s).exists()]
        return bool(subs) and all(model_folder_complete(s) for s in subs)

    def weight_files(self, path: Path, options: LoadOptions) -> dict[str, Path]:
        folder = path / SUBFOLDERS[options.weights]
        if not folder.is_dir():
            if options.weights == "ema":
                raise MemwatchError(f"{path}: no unet_ema/ (the run did not use --use_ema): use weights='raw'")
            raise MemwatchError(
                f"{path}: no unet/ weights (found: {listing(path)}): the save is incomplete, or the "
                "script saved no diffusers model"
            )
        unet_files = model_weight_files(folder)
        check_weight_files(folder, unet_files)
        files = {str(f.relative_to(path)): f for f in unet_files}
        trained_enc = path / "text_encoder"  # DreamBooth --train_text_encoder saves it beside unet/
        if trained_enc.is_dir():
            files.update({f"text_encoder/{f.name}": f for f in sorted(trained_enc.glob("*.safetensors"))})
        return files

    def load(self, path: Path, options: LoadOptions) -> Loaded:
        files = self.weight_files(path, options)
        unet, _ = load_unet(path / SUBFOLDERS[options.weights], dtype=options.dtype)
        trained_enc = path / "text_encoder"
        return from_base(path, ModelParts(unet, None), files, options, trained_enc if trained_enc.is_dir() else None)


def from_base(
    path: Path, parts: ModelParts, files: dict[str, Path], options: LoadOptions, text_encoder_dir: Path | None = None
) -> Loaded:
    """A bare UNet completed from ``base_model`` (its scheduler and, text-to-image, its text parts)."""
    base = base_pipeline(options.base_model, needed_for=path) if options.base_model is not None else None
    notes = []
    if is_text_conditioned(parts.unet) and options.load_text:
        if base is None:
            notes.append(f"{path}: text-conditioned UNet without 'base_model': no text encoder/VAE loaded")
        else:
            parts = dataclasses.replace(parts, **text_parts_from(base, options, text_encoder_dir))
    return Loaded(parts, files, scheduler_from=base, base=base, notes=notes)
