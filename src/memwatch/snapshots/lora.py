"""``lora``: ``pytorch_lora_weights.safetensors`` (or ``.bin``), as the LoRA scripts' save hook writes it
inside ``checkpoint-<step>/`` and at the end of training. It needs the base pipeline the run started
from (setting ``base_model``); its UNet (and text encoder) weights are merged into the base's.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from memwatch.errors import MemwatchError
from memwatch.models.parts import ModelParts
from memwatch.snapshots.components import base_pipeline, load_unet
from memwatch.snapshots.files import check_safetensors, check_weight_files, combined_sha256, model_weight_files
from memwatch.snapshots.layout import Layout, Loaded, LoadOptions, text_parts_from
from memwatch.snapshots.lora_merge import (
    lora_effective,
    lora_modules,
    lora_scale_from_metadata,
    merge_lora,
    read_lora_file,
    split_lora,
)

LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")  # LORA_WEIGHT_NAME(_SAFE)


class LoraLayout(Layout):
    name = "lora"

    def matches(self, path: Path) -> bool:
        return any((path / f).is_file() for f in LORA_FILES)

    def denoiser_class(self, path: Path, weights: str) -> str | None:
        return "UNet2DConditionModel"  # only the text-to-image scripts write LoRA folders

    def complete(self, path: Path) -> bool:
        lora_file = _lora_file(path)
        if lora_file.suffix != ".safetensors":
            return True
        try:
            check_safetensors(lora_file)
        except MemwatchError:
            return False
        return True

    def weight_files(self, path: Path, options: LoadOptions) -> dict[str, Path]:
        if options.weights == "ema":
            raise MemwatchError(f"{path}: LoRA folders have no EMA weights (unet_ema/): use weights='raw'")
        base = base_pipeline(options.base_model, needed_for=path)
        unet_files = model_weight_files(base / "unet")
        check_weight_files(base / "unet", unet_files)
        files = {f"base_model/{f.relative_to(base)}": f for f in unet_files}
        lora_file = _lora_file(path)
        if lora_file.suffix == ".safetensors":
            check_safetensors(lora_file)
        files[lora_file.name] = lora_file
        return files

    def identity(self, path: Path, options: LoadOptions, file_sha256: Callable[[Path], str]) -> str:
        """The base UNet's files and the LoRA's content, not its bytes.

        train_text_to_image_lora.py saves checkpoints in peft's key form (``lora_A``/``lora_B``) and the
        final file in diffusers' (``lora.down``/``lora.up``): the same weights in other bytes. Hashing each
        module's name, scale and float32 matrices makes a final LoRA equal to the last checkpoint one snapshot.
        """
        files = self.weight_files(path, options)
        lora_file = files.pop(_lora_file(path).name)
        lora, metadata = read_lora_file(lora_file)
        digest = hashlib.sha256(b"memwatch-lora-v1\n")
        for component, state in sorted(split_lora(lora).items()):
            scale = lora_scale_from_metadata(metadata, component, str(lora_file))
            for module, (s, down, up) in sorted(lora_effective(lora_modules(state, str(lora_file)), scale).items()):
                digest.update(f"{component}.{module} {s!r} {tuple(down.shape)} {tuple(up.shape)}\n".encode())
                for t in (down, up):
                    digest.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
        hashes = {label: file_sha256(f) for label, f in files.items()}
        hashes["lora (canonical)"] = digest.hexdigest()
        return combined_sha256(hashes)

    def load(self, path: Path, options: LoadOptions) -> Loaded:
        files = self.weight_files(path, options)
        base = base_pipeline(options.base_model, needed_for=path)
        unet, _ = load_unet(base / "unet", dtype=options.dtype)
        lora_file = _lora_file(path)
        lora, metadata = read_lora_file(lora_file)
        groups = split_lora(lora)
        if "unet" in groups:
            scale = lora_scale_from_metadata(metadata, "unet", str(lora_file))
            merge_lora(unet, groups["unet"], scale=scale, where=str(lora_file))
        parts = dataclasses.replace(ModelParts(unet, None), **text_parts_from(base, options))
        if "text_encoder" in groups:
            if parts.text_encoder is None:
                raise MemwatchError(
                    f"{lora_file}: holds text-encoder LoRA weights, which need the text encoder: load with text "
                    "components (load_text=True, needs transformers)"
                )
            scale = lora_scale_from_metadata(metadata, "text_encoder", str(lora_file))
            merge_lora(parts.text_encoder, groups["text_encoder"], scale=scale, where=str(lora_file))
        return Loaded(parts, files, scheduler_from=base, base=base)


def _lora_file(path: Path) -> Path:
    return next(path / f for f in LORA_FILES if (path / f).is_file())
