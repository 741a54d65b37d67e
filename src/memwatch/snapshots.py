"""Load a model snapshot from a folder: a diffusers pipeline, a model folder, or a training checkpoint.

The front-ends (``memwatch probe``, ``memwatch watch``) get a folder and need "the UNet to probe,
its noise scheduler, and (for text-to-image models) its text encoder and VAE". This module
recognises the folder by what it holds and loads it:

=============  ==========================================================================================
layout         what identifies it (as written by diffusers and its example training scripts)
=============  ==========================================================================================
``pipeline``   ``model_index.json`` (``DiffusionPipeline.save_pretrained``): ``unet/``, ``scheduler/``, and
               for Stable Diffusion ``vae/``, ``text_encoder/``, ``tokenizer/``.
``lora``       ``pytorch_lora_weights.safetensors`` (or ``.bin``): ``save_lora_weights`` in the LoRA
               scripts' save hook (inside ``checkpoint-<step>/``) and at the end of training. Needs a base
               pipeline folder (setting ``base_model``) to apply to.
``checkpoint`` ``unet/`` and/or ``unet_ema/`` without ``model_index.json``: ``accelerator.save_state`` with
               the full fine-tune scripts' save hook (``model.save_pretrained(.../unet)``,
               ``EMAModel.save_pretrained(.../unet_ema)``; DreamBooth may add ``text_encoder/``).
``model``      ``config.json`` + ``diffusion_pytorch_model.safetensors`` (``ModelMixin.save_pretrained``).
=============  ==========================================================================================

The step comes from the folder name ``checkpoint-<step>`` (exactly the names the scripts write;
``checkpoint-final-notes`` is not a checkpoint). Nothing is unpickled: weights are read from
safetensors (checked for truncation before loading), ``.bin`` files only with
``torch.load(weights_only=True)``, and accelerate's pickles (``random_states_0.pkl``,
``optimizer.bin``, ``scheduler.bin``, which is the *learning-rate* scheduler) are never opened.

LoRA weights are merged into the base UNet's weights here (``W += scale * up @ down``) instead of
through ``peft``: it needs no extra package, and the merged model is what a probe should see.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memwatch.checkpoints import CHECKPOINT_RE
from memwatch.errors import MemwatchError
from memwatch.hashing import sha256_file

log = logging.getLogger("memwatch")

LAYOUTS = ("pipeline", "model", "checkpoint", "lora", "unknown")
WEIGHT_CHOICES = ("raw", "ema")
#: denoisers memwatch can probe (``_class_name`` in the model's config.json)
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")

MODEL_STEM = "diffusion_pytorch_model"  # diffusers' SAFETENSORS_WEIGHTS_NAME / WEIGHTS_NAME stem
LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")  # LORA_WEIGHT_NAME(_SAFE)
#: written by accelerate's save_accelerator_state after the save hook, the models, the optimizer and
#: the LR scheduler: the "this checkpoint is complete" signal for checkpoint-<step> folders.
RNG_STATE_FILE = "random_states_0.pkl"
#: the noise scheduler of train_unconditional.py's defaults (--ddpm_num_steps 1000, linear betas,
#: epsilon); used for checkpoint folders when neither ``scheduler`` nor ``base_model`` says otherwise.
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
# A safetensors header is a small JSON object; anything claiming more is a corrupt file, not a header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class TextComponents:
    """What turns prompts into UNet conditioning and latents into images.

    Attributes:
        tokenizer: a ``transformers`` tokenizer (``CLIPTokenizer``); called as
            ``tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt")``.
        text_encoder: maps ``input_ids`` to hidden states: ``text_encoder(input_ids)[0]`` is
            ``(B, L, cross_attention_dim)``.
        vae: ``AutoencoderKL`` decoding latents to images, or None for pixel-space models.
    """

    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module | None = None


@dataclass
class Snapshot:
    """A loaded model snapshot and how it was identified.

    Attributes:
        step: training step from a ``checkpoint-<step>`` folder name, else None.
        path: the folder loaded.
        kind: ``"pipeline"``, ``"model"``, ``"checkpoint"`` or ``"lora"``.
        unet: the denoiser (``UNet2DModel`` or ``UNet2DConditionModel``), in eval mode.
        scheduler: its training noise scheduler.
        weights_sha256: sha256 of the weights probed: the file's own hash when one file was read,
            else the sha256 of ``"<sha256>  <label>\\n"`` lines sorted by label (the layout of
            ``sha256sum`` output) over :attr:`weights_files`.
        weights_files: label -> sha256 of every weights file that makes up the denoiser: the UNet's
            file(s), the LoRA file, and a text encoder trained alongside (DreamBooth's
            ``text_encoder/`` in a checkpoint). Labels are paths relative to the snapshot folder,
            or ``base_model/<path>`` for files of the base pipeline. The fixed VAE, tokenizer and
            base text encoder are not hashed.
        weights: ``"raw"`` or ``"ema"``.
        text: tokenizer, text encoder and VAE for text-to-image models, else None.
        base_model: the base pipeline folder a LoRA or checkpoint was combined with.
        notes: things the user should know (e.g. a default scheduler was assumed).
    """

    step: int | None
    path: Path
    kind: str
    unet: nn.Module
    scheduler: Any
    weights_sha256: str
    weights_files: dict[str, str] = field(default_factory=dict)
    weights: str = "raw"
    text: TextComponents | None = None
    base_model: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def conditional(self) -> bool:
        """Whether the UNet takes text conditioning (``UNet2DConditionModel``)."""
        return _is_conditional(self.unet)


# --------------------------------------------------------------------------- detection


def step_from_name(path: str | Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else None.

    Example:
        >>> step_from_name("out/checkpoint-1500"), step_from_name("out/checkpoint-final-notes")
        (1500, None)
    """
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def detect_layout(path: str | Path) -> str:
    """Which kind of snapshot folder ``path`` is, from the files it holds.

    Args:
        path: a folder.

    Returns:
        One of ``"pipeline"``, ``"lora"``, ``"checkpoint"``, ``"model"``, ``"unknown"`` (not a
        folder, or nothing recognisable in it). A ``checkpoint-<step>`` folder whose save has only
        just begun (nothing recognisable yet) is ``"checkpoint"``.

    Example:
        >>> detect_layout("runs/sd/checkpoint-500")  # doctest: +SKIP
        'lora'
    """
    p = Path(path)
    if not p.is_dir():
        return "unknown"
    if (p / "model_index.json").is_file():
        return "pipeline"
    if any((p / f).is_file() for f in LORA_FILES):
        return "lora"
    if (p / "unet").is_dir() or (p / "unet_ema").is_dir():
        return "checkpoint"
    if (p / "config.json").is_file():
        return "model"
    if CHECKPOINT_RE.match(p.name):
        return "checkpoint"
    return "unknown"


def denoiser_class(path: str | Path, weights: str = "raw") -> str | None:
    """The denoiser class a snapshot folder holds, read from its JSON files without loading weights.

    Front-ends use it to decide which probes a snapshot needs (text-to-image probes for
    ``UNet2DConditionModel``) before paying for a load.

    Args:
        path: a snapshot folder.
        weights: ``"raw"`` or ``"ema"`` (which of a checkpoint's ``unet/`` / ``unet_ema/`` to read).

    Returns:
        ``_class_name`` of the UNet (``"UNet2DConditionModel"`` for LoRA folders, which only the
        text-to-image scripts write), or None when the folder does not say (yet).

    Example:
        >>> denoiser_class("runs/sd/checkpoint-500")  # doctest: +SKIP
        'UNet2DConditionModel'
    """
    p = Path(path)
    layout = detect_layout(p)
    try:
        if layout == "lora":
            return "UNet2DConditionModel"
        if layout == "pipeline":
            spec = _component_spec(_read_json(p / "model_index.json"), "unet")
            return spec[1] if spec else None
        if layout == "checkpoint":
            p = p / ("unet_ema" if weights == "ema" else "unet")
        if layout in ("checkpoint", "model"):
            name = _read_json(p / "config.json").get("_class_name")
            return str(name) if name else None
    except MemwatchError:
        return None
    return None


# --------------------------------------------------------------------------- weights files


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


def _check_weight_files(folder: Path, files: list[Path]) -> None:
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


# --------------------------------------------------------------------------- loading components


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Hide diffusers' warning about EMAModel's extra config keys (decay, optimization_step...)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise MemwatchError(f"{path}: missing: the folder is incomplete") from e
    except (OSError, ValueError) as e:
        raise MemwatchError(f"{path}: unreadable JSON ({e}): re-save the model") from e
    if not isinstance(data, dict):
        raise MemwatchError(f"{path}: expected a JSON object: re-save the model")
    return data


def _load_unet(folder: Path, *, dtype: torch.dtype | None) -> tuple[nn.Module, list[Path]]:
    """A UNet from a diffusers model folder, after checking its files."""
    config = _read_json(folder / "config.json")
    cls_name = config.get("_class_name")
    if cls_name not in UNET_CLASSES:
        raise MemwatchError(
            f"{folder / 'config.json'}: model class {cls_name!r} is not supported: memwatch probes {UNET_CLASSES}"
        )
    files = model_weight_files(folder)
    _check_weight_files(folder, files)
    import diffusers

    cls = getattr(diffusers, cls_name)
    kwargs: dict[str, Any] = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        with _quiet_diffusers():
            model = cls.from_pretrained(folder, **kwargs)
    except MemwatchError:
        raise
    except Exception as e:  # diffusers raises many types for a bad folder; one line for the user
        raise MemwatchError(f"{folder}: could not load {cls_name} ({type(e).__name__}: {_first_line(e)})") from e
    return model.eval(), files


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_conditional(unet: nn.Module) -> bool:
    return type(unet).__name__ == "UNet2DConditionModel"


def _scheduler_from(value: Any, where: str) -> Any:
    """A noise scheduler from an instance, a config mapping, or a folder (scheduler/ or pipeline)."""
    import diffusers

    if value is None:
        return None
    if hasattr(value, "config") and hasattr(value, "set_timesteps"):
        return value
    if isinstance(value, Mapping):
        name = value.get("_class_name", "DDPMScheduler")
        cls = getattr(diffusers, str(name), None)
        if cls is None or not hasattr(cls, "set_timesteps"):
            raise MemwatchError(f"{where}: unknown scheduler class {name!r}: use a diffusers scheduler")
        return cls.from_config(dict(value))
    folder = Path(value)
    if (folder / "model_index.json").is_file():
        folder = folder / "scheduler"
    config_file = folder / "scheduler_config.json"
    if not config_file.is_file():
        raise MemwatchError(
            f"{where}: {folder} has no scheduler_config.json: point at a pipeline folder or its scheduler/ subfolder"
        )
    return _scheduler_from(_read_json(config_file), str(config_file))


def _default_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=DEFAULT_NUM_TRAIN_TIMESTEPS)


def _component_spec(index: dict[str, Any], name: str) -> tuple[str, str] | None:
    spec = index.get(name)
    if isinstance(spec, list | tuple) and len(spec) == 2 and spec[0] and spec[1]:
        return str(spec[0]), str(spec[1])
    return None


def _load_text(
    root: Path, index: dict[str, Any], *, text_encoder_dir: Path | None, dtype: torch.dtype | None
) -> TextComponents:
    """Tokenizer, text encoder (transformers) and VAE (diffusers) of a pipeline folder."""
    tok_spec, enc_spec = _component_spec(index, "tokenizer"), _component_spec(index, "text_encoder")
    if tok_spec is None or enc_spec is None:
        raise MemwatchError(
            f"{root / 'model_index.json'}: the pipeline has no tokenizer/text_encoder: "
            "a text-conditioned UNet needs a Stable Diffusion pipeline folder"
        )
    for lib, name in (tok_spec, enc_spec):
        if lib != "transformers":
            raise MemwatchError(f"{root / 'model_index.json'}: text component {lib}.{name} is not supported")
    try:
        import transformers
    except ImportError as e:
        raise MemwatchError(
            f"{root}: loading its text encoder ({enc_spec[1]}) needs the 'transformers' package: "
            "pip install transformers (or load without text components)"
        ) from e
    tok_cls, enc_cls = getattr(transformers, tok_spec[1], None), getattr(transformers, enc_spec[1], None)
    if tok_cls is None or enc_cls is None:
        raise MemwatchError(f"{root / 'model_index.json'}: transformers has no {tok_spec[1]} / {enc_spec[1]}")
    enc_dir = text_encoder_dir or root / "text_encoder"
    try:
        tokenizer = tok_cls.from_pretrained(root / "tokenizer")
        kwargs: dict[str, Any] = {"torch_dtype": dtype} if dtype is not None else {}
        text_encoder = enc_cls.from_pretrained(enc_dir, **kwargs).eval()
    except Exception as e:
        raise MemwatchError(f"{enc_dir}: could not load the text encoder ({type(e).__name__}: {_first_line(e)})") from e
    vae = None
    vae_spec = _component_spec(index, "vae")
    if vae_spec is not None:
        import diffusers

        vae_cls = getattr(diffusers, vae_spec[1], None) if vae_spec[0] == "diffusers" else None
        if vae_cls is None:
            raise MemwatchError(f"{root / 'model_index.json'}: VAE class {vae_spec} is not supported")
        vae_files = model_weight_files(root / "vae")
        _check_weight_files(root / "vae", vae_files)
        try:
            vae = vae_cls.from_pretrained(root / "vae", **kwargs).eval()
        except Exception as e:
            raise MemwatchError(f"{root / 'vae'}: could not load the VAE ({type(e).__name__}: {_first_line(e)})") from e
    return TextComponents(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae)


def _base_pipeline(base_model: str | Path | None, *, needed_for: Path) -> Path:
    if base_model is None:
        raise MemwatchError(
            f"{needed_for}: LoRA weights need the pipeline they were trained on: "
            "set 'base_model' to its local folder (the one passed as --pretrained_model_name_or_path)"
        )
    base = Path(base_model).expanduser()
    if not base.is_dir():
        raise MemwatchError(
            f"base_model {str(base_model)!r} is not a local folder: download the pipeline and set 'base_model' "
            "to its folder"
        )
    if not (base / "model_index.json").is_file():
        raise MemwatchError(
            f"base_model {base}: no model_index.json: set 'base_model' to a diffusers pipeline folder "
            "(with unet/, scheduler/ ...)"
        )
    return base


# --------------------------------------------------------------------------- LoRA


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


def _lora_modules(state_dict: Mapping[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Group LoRA tensors by target module: ``{module: {"down", "up"[, "alpha"]}}``."""
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


def _lora_scale_from_metadata(metadata: Mapping[str, str], prefix: str, where: str) -> float | None:
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
    groups = _lora_modules(state_dict, where)
    for name, parts in groups.items():
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
        down, up = parts["down"].float(), parts["up"].float()
        rank = down.shape[0]
        s = float(parts["alpha"]) / rank if "alpha" in parts else (1.0 if scale is None else scale)
        delta = up.flatten(1) @ down.flatten(1)  # (out, r) @ (r, in * kh * kw)
        if delta.numel() != weight.numel():
            raise MemwatchError(
                f"{where}: LoRA for {name!r} has shape {tuple(delta.shape)}, the layer {tuple(weight.shape)}: "
                "set 'base_model' to the pipeline the LoRA was trained on"
            )
        weight.add_((s * delta).reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))
    return len(groups)


def _read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        metadata = check_safetensors(path)
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), metadata
        except Exception as e:
            raise MemwatchError(f"{path}: unreadable LoRA weights ({_first_line(e)}): re-save them") from e
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, or a pickle that weights_only refuses
        raise MemwatchError(f"{path}: unreadable LoRA weights ({_first_line(e)}): re-save them as safetensors") from e
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise MemwatchError(f"{path}: not a LoRA state dict: re-save it with save_lora_weights")
    return data, {}


def _split_lora(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Per component ("unet", "text_encoder"); un-prefixed keys are old UNet-only files."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head in ("unet", "text_encoder") and rest:
            parts.setdefault(head, {})[rest] = value
        else:
            parts.setdefault("unet", {})[key] = value
    return parts


# --------------------------------------------------------------------------- public loader


def load_snapshot(
    path: str | Path,
    *,
    weights: str = "raw",
    base_model: str | Path | None = None,
    scheduler: Any = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    load_text: bool = True,
) -> Snapshot:
    """Load the snapshot in ``path`` (see the module docstring for the layouts).

    Args:
        path: a pipeline, model, LoRA or ``checkpoint-<step>`` folder.
        weights: ``"raw"`` (the trained weights, ``unet/``) or ``"ema"`` (``unet_ema/``, written by
            the full fine-tune scripts with ``--use_ema``; only checkpoint folders have it: a final
            pipeline already holds the EMA weights when EMA was on).
        base_model: local folder of the pipeline the run started from. Required for LoRA; for
            checkpoint and model folders it supplies the noise scheduler and, for text-to-image
            UNets, the tokenizer, text encoder and VAE.
        scheduler: the noise scheduler to use instead (instance, config mapping, or a folder with
            ``scheduler_config.json`` or a pipeline folder). Otherwise: the pipeline's, then the
            base model's, then ``DDPMScheduler(1000)`` with a note.
        device: where the models are put.
        dtype: cast weights to this dtype (default: as saved).
        load_text: load tokenizer / text encoder / VAE for text-conditioned UNets (needs
            ``transformers``). Off: :attr:`Snapshot.text` is None.

    Returns:
        The :class:`Snapshot`, models in eval mode on ``device``.

    Raises:
        MemwatchError: unknown layout, no or corrupt weights, EMA asked but absent, LoRA without
            ``base_model``, a base model folder that is missing.

    Example:
        >>> snap = load_snapshot("runs/ddpm/checkpoint-1000", weights="ema")  # doctest: +SKIP
        >>> snap.step, snap.kind, snap.weights_sha256[:8]  # doctest: +SKIP
        (1000, 'checkpoint', '3f2a9c10')
    """
    path = Path(path).expanduser()
    if weights not in WEIGHT_CHOICES:
        raise MemwatchError(f"weights={weights!r}: use one of {WEIGHT_CHOICES}")
    if not path.is_dir():
        raise MemwatchError(f"{path}: no such folder: point at a pipeline, model or checkpoint-<step> folder")
    layout = detect_layout(path)
    if layout == "unknown":
        raise MemwatchError(
            f"{path}: not a diffusers pipeline (model_index.json), model folder (config.json + "
            f"{MODEL_STEM}.safetensors), LoRA ({LORA_FILES[0]}) or checkpoint-<step> folder (unet/)"
        )
    notes: list[str] = []
    text: TextComponents | None = None
    files: dict[str, Path] = {}
    base: Path | None = None
    sched = _scheduler_from(scheduler, "scheduler")

    if layout == "pipeline":
        index = _read_json(path / "model_index.json")
        spec = _component_spec(index, "unet")
        if spec is None or spec[1] not in UNET_CLASSES:
            raise MemwatchError(
                f"{path / 'model_index.json'}: no unet of {UNET_CLASSES}: this pipeline is not supported"
            )
        _no_ema(weights, path, "a pipeline folder holds one set of weights (the EMA ones when --use_ema was on)")
        unet, unet_files = _load_unet(path / "unet", dtype=dtype)
        files.update({str(f.relative_to(path)): f for f in unet_files})
        if sched is None:
            sched = _scheduler_from(path, str(path))
        if _is_conditional(unet) and load_text:
            text = _load_text(path, index, text_encoder_dir=None, dtype=dtype)
    elif layout == "lora":
        if weights == "ema":
            raise MemwatchError(f"{path}: LoRA folders have no EMA weights (unet_ema/): use weights='raw'")
        base = _base_pipeline(base_model, needed_for=path)
        index = _read_json(base / "model_index.json")
        unet, unet_files = _load_unet(base / "unet", dtype=dtype)
        files.update({f"base_model/{f.relative_to(base)}": f for f in unet_files})
        lora_file = next(path / f for f in LORA_FILES if (path / f).is_file())
        files[lora_file.name] = lora_file
        lora, metadata = _read_lora_file(lora_file)
        parts = _split_lora(lora)
        if "unet" in parts:
            merge_lora(
                unet,
                parts["unet"],
                scale=_lora_scale_from_metadata(metadata, "unet", str(lora_file)),
                where=str(lora_file),
            )
        if sched is None:
            sched = _scheduler_from(base, str(base))
        if load_text:
            text = _load_text(base, index, text_encoder_dir=None, dtype=dtype)
        if "text_encoder" in parts:
            if text is None:
                raise MemwatchError(
                    f"{lora_file}: holds text-encoder LoRA weights, which need the text encoder: load with text "
                    "components (load_text=True, needs transformers)"
                )
            scale = _lora_scale_from_metadata(metadata, "text_encoder", str(lora_file))
            merge_lora(text.text_encoder, parts["text_encoder"], scale=scale, where=str(lora_file))
    else:  # checkpoint or model
        if layout == "checkpoint":
            sub = "unet_ema" if weights == "ema" else "unet"
            folder = path / sub
            if not folder.is_dir():
                if weights == "ema":
                    raise MemwatchError(f"{path}: no unet_ema/ (the run did not use --use_ema): use weights='raw'")
                raise MemwatchError(
                    f"{path}: no unet/ weights (found: {_listing(path)}): the save is incomplete, or the "
                    "script saved no diffusers model"
                )
        else:
            _no_ema(weights, path, "a model folder holds one set of weights")
            folder = path
        unet, unet_files = _load_unet(folder, dtype=dtype)
        files.update({str(f.relative_to(path)): f for f in unet_files})
        trained_enc = path / "text_encoder"  # DreamBooth --train_text_encoder saves it beside unet/
        if layout == "checkpoint" and trained_enc.is_dir():
            files.update({f"text_encoder/{f.name}": f for f in sorted(trained_enc.glob("*.safetensors"))})
        if base_model is not None:
            base = _base_pipeline(base_model, needed_for=path)
            if sched is None:
                sched = _scheduler_from(base, str(base))
        if sched is None:
            sched = _default_scheduler()
            notes.append(
                f"{path}: no noise scheduler saved with a checkpoint; assumed DDPMScheduler("
                f"num_train_timesteps={DEFAULT_NUM_TRAIN_TIMESTEPS}) (train_unconditional.py's default): "
                "set 'base_model' or 'scheduler' if training used another"
                + (" (Stable Diffusion uses scaled_linear betas)" if _is_conditional(unet) else "")
            )
        if _is_conditional(unet) and load_text:
            if base is None:
                notes.append(f"{path}: text-conditioned UNet without 'base_model': no text encoder/VAE loaded")
            else:
                enc_dir = trained_enc if layout == "checkpoint" and trained_enc.is_dir() else None
                text = _load_text(base, _read_json(base / "model_index.json"), text_encoder_dir=enc_dir, dtype=dtype)

    for note in notes:
        log.info(note)
    hashes = {label: sha256_file(f) for label, f in files.items()}
    unet.to(device)
    if text is not None:
        text.text_encoder.to(device)
        if text.vae is not None:
            text.vae.to(device)
    return Snapshot(
        step=step_from_name(path),
        path=path,
        kind=layout,
        unet=unet,
        scheduler=sched,
        weights_sha256=combined_sha256(hashes),
        weights_files=hashes,
        weights=weights,
        text=text,
        base_model=base,
        notes=notes,
    )


def _no_ema(weights: str, path: Path, why: str) -> None:
    if weights == "ema":
        raise MemwatchError(f"{path}: no unet_ema/ ({why}): use weights='raw'")


def _listing(path: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "") if names else "nothing"


# --------------------------------------------------------------------------- completeness


def _model_folder_complete(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    files = model_weight_files(folder)
    if not files:
        return False
    try:
        _check_weight_files(folder, files)
    except MemwatchError:
        return False
    return True


def _pipeline_component_complete(folder: Path) -> bool:
    """A pipeline component folder: a scheduler, a model (config + whole weights), or config files only."""
    if not folder.is_dir():
        return False
    if (folder / "scheduler_config.json").is_file():
        return True
    if not (folder / "config.json").is_file():
        # tokenizers and feature extractors are only small config/vocabulary files
        return any(folder.iterdir())
    files = model_weight_files(folder) or _transformers_weight_files(folder)
    try:
        _check_weight_files(folder, files)
    except MemwatchError:
        return False
    return True


def _transformers_weight_files(folder: Path) -> list[Path]:
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


def snapshot_complete(path: str | Path) -> bool:
    """Whether every file the snapshot's save writes is present and whole.

    ``checkpoint-<step>`` folders: ``random_states_0.pkl`` (accelerate writes it after the save
    hook's weights, the optimizer and the LR scheduler) plus the weights: ``unet/`` (and
    ``unet_ema/`` if begun) or the LoRA file, each whole. Pipelines: every component listed in
    ``model_index.json`` (which ``save_pretrained`` writes *first*). Model folders: config and whole
    weights. A front-end should also wait for a quiet period: a file may still be growing.

    Args:
        path: the snapshot folder.

    Example:
        >>> snapshot_complete("runs/sd/checkpoint-500")  # doctest: +SKIP
        True
    """
    path = Path(path)
    layout = detect_layout(path)
    if layout == "unknown":
        return False
    if CHECKPOINT_RE.match(path.name) and not (path / RNG_STATE_FILE).is_file():
        return False
    if layout == "pipeline":
        try:
            index = _read_json(path / "model_index.json")
        except MemwatchError:
            return False
        for name in index:
            spec = _component_spec(index, name)
            if spec is not None and not _pipeline_component_complete(path / name):
                return False
        return True
    if layout == "lora":
        lora_file = next(path / f for f in LORA_FILES if (path / f).is_file())
        if lora_file.suffix != ".safetensors":
            return True
        try:
            check_safetensors(lora_file)
        except MemwatchError:
            return False
        return True
    if layout == "checkpoint":
        subs = [path / s for s in ("unet", "unet_ema") if (path / s).exists()]
        return bool(subs) and all(_model_folder_complete(s) for s in subs)
    return _model_folder_complete(path)
