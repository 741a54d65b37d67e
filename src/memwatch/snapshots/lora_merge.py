"""LoRA weights as the diffusers LoRA scripts save them, merged into the base UNet (and text encoder).

LoRA weights are merged into the base model's weights here (``W += scale * up @ down``) instead of
through ``peft``: it needs no extra package, and the merged model is what a probe should see (it
equals diffusers' ``load_lora_weights`` + ``fuse_lora``; the tests check it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from memwatch.errors import MemwatchError
from memwatch.snapshots.components import first_line
from memwatch.snapshots.files import check_safetensors

# Key forms written by the diffusers example scripts (after the "unet." / "text_encoder." prefix):
#   peft, as get_peft_model_state_dict returns it (train_text_to_image_lora's checkpoint hook):
#       <module>.lora_A.weight / <module>.lora_B.weight
#   convert_state_dict_to_diffusers (DreamBooth LoRA, final LoRA files): <module>.lora.down/up.weight,
#       text encoder: <module>.lora_linear_layer.down/up.weight
#   older save_attn_procs files: <attn>.processor.to_q_lora.down.weight, ...
#   optional per-module <module>.alpha (network alphas)
_LORA_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.[A-Za-z0-9_]+)?\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.[A-Za-z0-9_]+)?\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.lora(?:_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
]
_OLD_PROC = re.compile(r"^(?P<a>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<d>down|up)\.weight$")


def lora_modules(state_dict: Mapping[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Group LoRA tensors by target module: ``{module: {"down", "up"[, "alpha"]}}``, whichever key form
    the file uses (see above).

    Example:
        >>> t = torch.zeros(2, 4)
        >>> sorted(lora_modules({"a.to_q.lora_A.weight": t, "a.to_q.lora_B.weight": t.T}, "x"))
        ['a.to_q']
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        old = _OLD_PROC.match(key)
        if old:
            target = old["p"] + (".0" if old["p"] == "to_out" else "")
            out.setdefault(f"{old['a']}.{target}", {})[old["d"]] = value
            continue
        for pattern, part in _LORA_PATTERNS:
            m = pattern.match(key)
            if m:
                out.setdefault(m["m"], {})[part] = value
                break
        else:
            raise MemwatchError(
                f"{where}: LoRA key {key!r} is not in a format memwatch can merge "
                "(expected lora_A/lora_B or lora.down/lora.up weights from the diffusers scripts)"
            )
    for module, parts in out.items():
        if "down" not in parts or "up" not in parts:
            raise MemwatchError(f"{where}: LoRA weights for {module} lack their down or up matrix: re-save the LoRA")
    return out


def lora_scale_from_metadata(metadata: Mapping[str, str], prefix: str, where: str) -> float | None:
    """``lora_alpha / r`` from diffusers' ``lora_adapter_metadata`` (peft LoraConfig fields), if saved."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise MemwatchError(f"{where}: unreadable lora_adapter_metadata: re-save the LoRA") from e
    r, alpha = meta.get(f"{prefix}.r"), meta.get(f"{prefix}.lora_alpha")
    if r is None or alpha is None:
        return None
    if meta.get(f"{prefix}.rank_pattern") or meta.get(f"{prefix}.alpha_pattern"):
        raise MemwatchError(f"{where}: per-module LoRA ranks (rank_pattern/alpha_pattern) are not supported")
    if meta.get(f"{prefix}.use_dora"):
        raise MemwatchError(f"{where}: DoRA adapters are not supported: merge them into the model first")
    # peft: scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    return float(alpha) / (math.sqrt(float(r)) if meta.get(f"{prefix}.use_rslora") else float(r))


@torch.no_grad()
def merge_lora(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    scale: float | None = None,
    where: str = "LoRA",
) -> int:
    """Add LoRA updates into ``model``'s weights in place: ``W += s * up @ down``.

    ``s`` is ``alpha / rank`` when the file stores per-module ``alpha`` tensors, else ``scale``,
    else 1: the diffusers scripts train with ``LoraConfig(r=rank, lora_alpha=rank)``, and diffusers'
    own loader takes ``lora_alpha = r`` when no alpha is stored.

    Args:
        model: the module the LoRA was trained on (e.g. the base UNet).
        state_dict: LoRA tensors with the component prefix removed (see the key forms above).
        scale: ``lora_alpha / r`` from the file's metadata, if it has one.
        where: names the file in errors.

    Returns:
        The number of modules updated.

    Example:
        >>> q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
        >>> merge_lora(unet, {f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b})  # doctest: +SKIP
        1
    """
    groups = lora_effective(lora_modules(state_dict, where), scale)
    for name, (s, down, up) in groups.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise MemwatchError(
                f"{where}: LoRA targets {name!r}, which the base model does not have: "
                "set 'base_model' to the pipeline the LoRA was trained on"
            ) from e
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear | nn.Conv2d) or weight is None:
            raise MemwatchError(f"{where}: LoRA target {name!r} is a {type(module).__name__}, not a linear/conv layer")
        delta = up.float().flatten(1) @ down.float().flatten(1)  # (out, r) @ (r, in * kh * kw)
        if delta.numel() != weight.numel():
            raise MemwatchError(
                f"{where}: LoRA for {name!r} has shape {tuple(delta.shape)}, the layer {tuple(weight.shape)}: "
                "set 'base_model' to the pipeline the LoRA was trained on"
            )
        weight.add_((s * delta).reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))
    return len(groups)


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        metadata = check_safetensors(path)
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), metadata
        except Exception as e:
            raise MemwatchError(f"{path}: unreadable LoRA weights ({first_line(e)}): re-save them") from e
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, or a pickle that weights_only refuses
        raise MemwatchError(f"{path}: unreadable LoRA weights ({first_line(e)}): re-save them as safetensors") from e
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise MemwatchError(f"{path}: not a LoRA state dict: re-save it with save_lora_weights")
    return data, {}


def split_lora(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Per component ("unet", "text_encoder"); un-prefixed keys are old UNet-only files."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head in ("unet", "text_encoder") and rest:
            parts.setdefault(head, {})[rest] = value
        else:
            parts.setdefault("unet", {})[key] = value
    return parts


def lora_effective(
    modules: Mapping[str, Mapping[str, torch.Tensor]], scale: float | None
) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """module -> (scale, down, up) as :func:`merge_lora` applies them: a LoRA's content, whatever its key form.

    The scale is ``alpha / rank`` where the file stores ``alpha``, else ``scale`` (from metadata), else 1.

    Args:
        modules: from :func:`lora_modules`.
        scale: ``lora_alpha / r`` from the file's metadata, if any.

    Example:
        >>> t = torch.zeros(2, 4)
        >>> lora_effective({"a": {"down": t, "up": t.T, "alpha": torch.tensor(4.0)}}, None)["a"][0]
        2.0
    """
    out = {}
    for name, parts in modules.items():
        rank = parts["down"].shape[0]
        s = float(parts["alpha"]) / rank if "alpha" in parts else (1.0 if scale is None else scale)
        out[name] = (s, parts["down"], parts["up"])
    return out
