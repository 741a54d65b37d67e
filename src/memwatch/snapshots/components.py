"""Loading the parts of a snapshot from diffusers folders: the UNet, the noise scheduler, the text parts.

Every loader checks the files first (:mod:`memwatch.snapshots.files`) and turns the many exception
types diffusers and transformers raise for a bad folder into one :class:`MemwatchError` line that
names the folder.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memwatch.errors import MemwatchError
from memwatch.snapshots.files import check_weight_files, model_weight_files, read_json

log = logging.getLogger("memwatch")

#: denoisers memwatch can probe (``_class_name`` in the model's config.json)
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
#: the noise scheduler of train_unconditional.py's defaults (--ddpm_num_steps 1000, linear betas,
#: epsilon); used for checkpoint folders when nothing says otherwise.
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Hide diffusers' loading bars and its warning about EMAModel's extra config keys (decay, optimization_step...)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(level)
        dlog.enable_progress_bar()


def load_unet(folder: Path, *, dtype: torch.dtype | None) -> tuple[nn.Module, list[Path]]:
    """A UNet from a diffusers model folder, after checking its files."""
    config = read_json(folder / "config.json")
    cls_name = config.get("_class_name")
    if cls_name not in UNET_CLASSES:
        raise MemwatchError(
            f"{folder / 'config.json'}: model class {cls_name!r} is not supported: memwatch probes {UNET_CLASSES}"
        )
    files = model_weight_files(folder)
    check_weight_files(folder, files)
    import diffusers

    cls = getattr(diffusers, cls_name)
    kwargs: dict[str, Any] = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        with quiet_diffusers():
            # local_files_only: a folder deleted meanwhile must not turn into a hub id to download
            model = cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except MemwatchError:
        raise
    except Exception as e:  # diffusers raises many types for a bad folder; one line for the user
        raise MemwatchError(f"{folder}: could not load {cls_name} ({type(e).__name__}: {first_line(e)})") from e
    return model.eval(), files


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def scheduler_from(value: Any, where: str) -> Any:
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
    return scheduler_from(read_json(config_file), str(config_file))


def default_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=DEFAULT_NUM_TRAIN_TIMESTEPS)


def component_spec(index: dict[str, Any], name: str) -> tuple[str, str] | None:
    spec = index.get(name)
    if isinstance(spec, list | tuple) and len(spec) == 2 and spec[0] and spec[1]:
        return str(spec[0]), str(spec[1])
    return None


def load_text_parts(
    root: Path, index: dict[str, Any], *, text_encoder_dir: Path | None, dtype: torch.dtype | None
) -> dict[str, Any]:
    """Tokenizer, text encoder (transformers) and VAE (diffusers) of a pipeline folder.

    Args:
        root: the pipeline folder.
        index: its ``model_index.json``.
        text_encoder_dir: load the text encoder from here instead (a fine-tuned one in a checkpoint).
        dtype: cast weights to this dtype (default: as saved).

    Returns:
        ``{"tokenizer", "text_encoder", "vae"}`` (``vae`` None for pixel-space pipelines), the
        :class:`~memwatch.models.parts.ModelParts` fields.
    """
    tok_spec, enc_spec = component_spec(index, "tokenizer"), component_spec(index, "text_encoder")
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
            "pip install 'memwatch[text]' (or load without text components)"
        ) from e
    tok_cls, enc_cls = getattr(transformers, tok_spec[1], None), getattr(transformers, enc_spec[1], None)
    if tok_cls is None or enc_cls is None:
        raise MemwatchError(f"{root / 'model_index.json'}: transformers has no {tok_spec[1]} / {enc_spec[1]}")
    enc_dir = text_encoder_dir or root / "text_encoder"
    try:
        tokenizer = tok_cls.from_pretrained(root / "tokenizer", local_files_only=True)
        kwargs: dict[str, Any] = {"torch_dtype": dtype} if dtype is not None else {}
        with _quiet_transformers(transformers):
            text_encoder = enc_cls.from_pretrained(enc_dir, local_files_only=True, **kwargs).eval()
    except Exception as e:
        raise MemwatchError(f"{enc_dir}: could not load the text encoder ({type(e).__name__}: {first_line(e)})") from e
    vae = None
    vae_spec = component_spec(index, "vae")
    if vae_spec is not None:
        import diffusers

        vae_cls = getattr(diffusers, vae_spec[1], None) if vae_spec[0] == "diffusers" else None
        if vae_cls is None:
            raise MemwatchError(f"{root / 'model_index.json'}: VAE class {vae_spec} is not supported")
        vae_files = model_weight_files(root / "vae")
        check_weight_files(root / "vae", vae_files)
        try:
            with quiet_diffusers():
                vae = vae_cls.from_pretrained(root / "vae", local_files_only=True, **kwargs).eval()
        except Exception as e:
            raise MemwatchError(f"{root / 'vae'}: could not load the VAE ({type(e).__name__}: {first_line(e)})") from e
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae}


@contextlib.contextmanager
def _quiet_transformers(transformers: Any) -> Iterator[None]:
    """No loading bars or info lines from transformers while memwatch loads a text encoder."""
    tlog = transformers.utils.logging
    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        tlog.enable_progress_bar()


def base_pipeline(base_model: str | Path | None, *, needed_for: Path) -> Path:
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
