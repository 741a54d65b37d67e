"""Load a model snapshot from a folder: a diffusers pipeline, a model folder, a training checkpoint or a LoRA.

The front-ends (``memwatch probe``, ``memwatch watch``) get a folder and need "the UNet to probe,
its noise scheduler, and (for text-to-image models) its text encoder and VAE". A layout detector
recognises the folder by what it holds, and one loader per layout loads it:

=============  ==========================================================================================
layout         module and what identifies it (as written by diffusers and its example training scripts)
=============  ==========================================================================================
``pipeline``   :mod:`~memwatch.snapshots.pipeline`: ``model_index.json`` (``DiffusionPipeline.save_pretrained``)
``lora``       :mod:`~memwatch.snapshots.lora`: ``pytorch_lora_weights.safetensors`` (or ``.bin``); needs
               ``base_model``
``checkpoint`` :mod:`~memwatch.snapshots.checkpoint`: ``unet/`` and/or ``unet_ema/`` (``accelerator.save_state``
               with the full fine-tune scripts' save hook)
``model``      :mod:`~memwatch.snapshots.model`: ``config.json`` + ``diffusion_pytorch_model.safetensors``
=============  ==========================================================================================

A new layout is one module with a :class:`~memwatch.snapshots.layout.Layout` subclass, listed in
:data:`LAYOUTS`. The step comes from the folder name ``checkpoint-<step>`` (exactly the names the
scripts write; ``checkpoint-final-notes`` is not a checkpoint). Nothing is unpickled: weights are
read from safetensors (checked for truncation before loading), ``.bin`` files only with
``torch.load(weights_only=True)``, and accelerate's pickles (``random_states_0.pkl``,
``optimizer.bin``, ``scheduler.bin``, which is the *learning-rate* scheduler) are never opened.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memwatch.errors import MemwatchError
from memwatch.hashing import sha256_file
from memwatch.models.parts import ModelParts, is_text_conditioned
from memwatch.snapshots.checkpoint import RNG_STATE_FILE, CheckpointLayout
from memwatch.snapshots.checkpoints import CHECKPOINT_RE
from memwatch.snapshots.components import DEFAULT_NUM_TRAIN_TIMESTEPS, default_scheduler, scheduler_from
from memwatch.snapshots.files import MODEL_STEM, check_safetensors, combined_sha256, model_weight_files
from memwatch.snapshots.layout import Layout, LoadOptions
from memwatch.snapshots.lora import LORA_FILES, LoraLayout
from memwatch.snapshots.lora_merge import merge_lora
from memwatch.snapshots.model import ModelLayout
from memwatch.snapshots.pipeline import PipelineLayout

log = logging.getLogger("memwatch")

#: The layouts, in the order they are tried (the first whose files match wins).
LAYOUTS: tuple[Layout, ...] = (PipelineLayout(), LoraLayout(), CheckpointLayout(), ModelLayout())
WEIGHT_CHOICES = ("raw", "ema")


@dataclass
class Snapshot:
    """A loaded model snapshot and how it was identified.

    Attributes:
        step: training step from a ``checkpoint-<step>`` folder name, else None.
        path: the folder loaded.
        layout: ``"pipeline"``, ``"model"``, ``"checkpoint"`` or ``"lora"``.
        parts: the model (:class:`~memwatch.models.parts.ModelParts`), in eval mode.
        weights_sha256: sha256 of the weights probed: the file's own hash when one file was read,
            else the sha256 of ``"<sha256>  <label>\\n"`` lines sorted by label (the layout of
            ``sha256sum`` output) over :attr:`weights_files`.
        weights_files: label -> sha256 of every weights file that makes up the denoiser: the UNet's
            file(s), the LoRA file, and a text encoder trained alongside (DreamBooth's
            ``text_encoder/`` in a checkpoint). Labels are paths relative to the snapshot folder,
            or ``base_model/<path>`` for files of the base pipeline. The fixed VAE, tokenizer and
            base text encoder are not hashed.
        weights: ``"raw"`` or ``"ema"``.
        base_model: the base pipeline folder a LoRA or checkpoint was combined with.
        notes: things the user should know (e.g. a default scheduler was assumed).
        scheduler_source: where the noise scheduler came from (see :func:`load_snapshot`).
    """

    step: int | None
    path: Path
    layout: str
    parts: ModelParts
    weights_sha256: str
    weights_files: dict[str, str] = field(default_factory=dict)
    weights: str = "raw"
    base_model: Path | None = None
    notes: list[str] = field(default_factory=list)
    scheduler_source: str = ""

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser (``parts.unet``)."""
        return self.parts.unet

    @property
    def scheduler(self) -> Any:
        """The noise scheduler (``parts.scheduler``)."""
        return self.parts.scheduler

    @property
    def scheduler_guessed(self) -> bool:
        """Whether no scheduler was found and the default was assumed."""
        return self.scheduler_source == GUESSED

    def info(self) -> dict[str, Any]:
        """How the snapshot was loaded, for the store: its noise scheduler, where that came from, notes."""
        config = self.parts.scheduler.config
        return {
            "layout": self.layout,
            "scheduler": {
                "class": type(self.parts.scheduler).__name__,
                **{k: config.get(k) for k in ("num_train_timesteps", "prediction_type", "beta_schedule")},
            },
            "scheduler_source": self.scheduler_source,
            "scheduler_guessed": self.scheduler_guessed,
            "notes": list(self.notes),
        }


def step_from_name(path: str | Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else None.

    Example:
        >>> step_from_name("out/checkpoint-1500"), step_from_name("out/checkpoint-final-notes")
        (1500, None)
    """
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def _layout_of(path: Path) -> Layout | None:
    if not path.is_dir():
        return None
    for layout in LAYOUTS:
        if layout.matches(path):
            return layout
    if CHECKPOINT_RE.match(path.name):  # a checkpoint whose save has only just begun
        return next(lay for lay in LAYOUTS if lay.name == "checkpoint")
    return None


def detect_layout(path: str | Path) -> str:
    """Which kind of snapshot folder ``path`` is, from the files it holds.

    Returns:
        A layout name (see :data:`LAYOUTS`), or ``"unknown"`` (not a folder, or nothing recognisable
        in it). A ``checkpoint-<step>`` folder whose save has only just begun is ``"checkpoint"``.

    Example:
        >>> detect_layout("no/such/folder")
        'unknown'
    """
    layout = _layout_of(Path(path))
    return layout.name if layout else "unknown"


def denoiser_class(path: str | Path, weights: str = "raw") -> str | None:
    """The denoiser class a snapshot folder holds, read from its JSON files without loading weights.

    Front-ends use it to decide which probes a snapshot needs (text-to-image probes for
    ``UNet2DConditionModel``) before paying for a load.

    Returns:
        ``_class_name`` of the UNet, or None when the folder does not say (yet).

    Example:
        >>> denoiser_class("runs/sd/checkpoint-500")  # doctest: +SKIP
        'UNet2DConditionModel'
    """
    layout = _layout_of(Path(path))
    if layout is None:
        return None
    try:
        return layout.denoiser_class(Path(path), weights)
    except MemwatchError:
        return None


def snapshot_complete(path: str | Path) -> bool:
    """Whether every file the snapshot's save writes is present and whole.

    ``checkpoint-<step>`` folders also need ``random_states_0.pkl`` (accelerate writes it after
    the save hook's weights, the optimizer and the LR scheduler). A front-end should also wait for
    a quiet period: a file may still be growing.

    Example:
        >>> snapshot_complete("runs/sd/checkpoint-500")  # doctest: +SKIP
        True
    """
    path = Path(path)
    layout = _layout_of(path)
    if layout is None:
        return False
    if CHECKPOINT_RE.match(path.name) and not (path / RNG_STATE_FILE).is_file():
        return False
    return layout.complete(path)


def snapshot_sha256(
    path: str | Path,
    *,
    weights: str = "raw",
    base_model: str | Path | None = None,
    file_sha256: Callable[[Path], str] = sha256_file,
) -> str:
    """The sha256 that identifies a snapshot's weights, without loading them.

    Over the sha256 of every weights file that makes up the denoiser
    (:func:`memwatch.snapshots.files.combined_sha256`); a LoRA is hashed by its content, so the same
    LoRA saved in two key forms is one snapshot. A front-end tells weights it has measured before by
    this hash without paying for a load; :attr:`Snapshot.weights_sha256` is the same value.

    Args:
        path: a pipeline, model, LoRA or ``checkpoint-<step>`` folder.
        weights: ``"raw"`` or ``"ema"``, as for :func:`load_snapshot`.
        base_model: the base pipeline (LoRA folders).
        file_sha256: hashes one file; a front-end passes one that caches by size and mtime.

    Raises:
        MemwatchError: not a snapshot folder, or its weights are missing or incomplete.
        FileNotFoundError: a file vanished while it was read (rotation).

    Example:
        >>> snapshot_sha256("runs/ddpm/checkpoint-500")[:8]  # doctest: +SKIP
        '3f2a9c10'
    """
    path = Path(path).expanduser()
    layout = _layout_of(path)
    if layout is None:
        raise MemwatchError(f"{path}: not a snapshot folder (no pipeline, model, LoRA or checkpoint files)")
    return layout.identity(path, LoadOptions(weights=weights, base_model=base_model), file_sha256)


def load_snapshot(
    path: str | Path,
    *,
    weights: str = "raw",
    base_model: str | Path | None = None,
    scheduler: Any = None,
    run_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    load_text: bool = True,
) -> Snapshot:
    """Load the snapshot in ``path`` (see the module docstring for the layouts).

    The noise scheduler is the run's training schedule, taken from the first of: ``scheduler``
    (given), the snapshot's own pipeline (``scheduler/``), ``run_dir/scheduler/`` (the training
    output folder: train_unconditional.py saves its pipeline there from the first epoch on), the
    base model's, and otherwise a guessed ``DDPMScheduler(1000)`` with a note
    (:attr:`Snapshot.scheduler_source` says which).

    Args:
        path: a pipeline, model, LoRA or ``checkpoint-<step>`` folder.
        weights: ``"raw"`` (the trained weights, ``unet/``) or ``"ema"`` (``unet_ema/`` of a checkpoint).
            A pipeline or model folder holds one set of weights and is loaded as it is for either
            (the scripts save the EMA weights there when EMA was on).
        base_model: local folder of the pipeline the run started from. Required for LoRA; for
            checkpoint and model folders it supplies the noise scheduler and, for text-to-image
            UNets, the tokenizer, text encoder and VAE.
        scheduler: the noise scheduler to use (instance, config mapping, or a folder with
            ``scheduler_config.json`` or a pipeline folder).
        run_dir: the training output folder the snapshot belongs to.
        device: where the models are put.
        dtype: cast weights to this dtype (default: as saved).
        load_text: load tokenizer / text encoder / VAE for text-conditioned UNets (needs
            ``transformers``).

    Returns:
        The :class:`Snapshot`, models in eval mode on ``device``.

    Raises:
        MemwatchError: unknown layout, no or corrupt weights, EMA asked but absent, LoRA without
            ``base_model``, a base model folder that is missing.

    Example:
        >>> snap = load_snapshot("runs/ddpm/checkpoint-1000", weights="ema")  # doctest: +SKIP
        >>> snap.step, snap.layout, snap.weights_sha256[:8]  # doctest: +SKIP
        (1000, 'checkpoint', '3f2a9c10')
    """
    path = Path(path).expanduser()
    if weights not in WEIGHT_CHOICES:
        raise MemwatchError(f"weights={weights!r}: use one of {WEIGHT_CHOICES}")
    if not path.is_dir():
        raise MemwatchError(f"{path}: no such folder: point at a pipeline, model or checkpoint-<step> folder")
    layout = _layout_of(path)
    if layout is None:
        raise MemwatchError(
            f"{path}: not a diffusers pipeline (model_index.json), model folder (config.json + "
            f"{MODEL_STEM}.safetensors), LoRA ({LORA_FILES[0]}) or checkpoint-<step> folder (unet/)"
        )
    loaded = layout.load(path, LoadOptions(weights=weights, base_model=base_model, dtype=dtype, load_text=load_text))
    notes = list(loaded.notes)
    sched, source = _scheduler(scheduler, loaded, layout.name, run_dir)
    if sched is None:
        sched, source = default_scheduler(), GUESSED
        conditional = is_text_conditioned(loaded.parts.unet)
        notes.append(
            f"{path}: no noise scheduler found for this run; assumed DDPMScheduler("
            f"num_train_timesteps={DEFAULT_NUM_TRAIN_TIMESTEPS}) (train_unconditional.py's default): "
            "set 'scheduler' or 'base_model' in the config if training used another"
            + (" (Stable Diffusion uses scaled_linear betas)" if conditional else "")
        )
    for note in notes:
        log.info(note)
    hashes = {label: sha256_file(f) for label, f in loaded.files.items()}
    by_file = {f: hashes[label] for label, f in loaded.files.items()}
    options = LoadOptions(weights=weights, base_model=base_model)
    identity = layout.identity(path, options, lambda f: by_file.get(f) or sha256_file(f))
    parts = dataclasses.replace(loaded.parts, scheduler=sched)
    for module in parts.modules():
        module.to(device)
    return Snapshot(
        step=step_from_name(path),
        path=path,
        layout=layout.name,
        parts=parts,
        weights_sha256=identity,
        weights_files=hashes,
        weights=weights,
        base_model=loaded.base,
        notes=notes,
        scheduler_source=source,
    )


#: :attr:`Snapshot.scheduler_source` when no scheduler was found and the default was assumed
GUESSED = "guessed: DDPMScheduler(1000), train_unconditional.py's default"


def _scheduler(given: Any, loaded: Any, layout: str, run_dir: str | Path | None) -> tuple[Any, str]:
    """The run's noise scheduler and where it came from, in the documented order (None if nowhere)."""
    if given is not None:
        return scheduler_from(given, "scheduler"), "given (config 'scheduler')"
    if layout == "pipeline" and loaded.scheduler_from is not None:
        return scheduler_from(loaded.scheduler_from, str(loaded.scheduler_from)), "the pipeline's own scheduler/"
    if run_dir is not None and (Path(run_dir) / "scheduler" / "scheduler_config.json").is_file():
        folder = Path(run_dir) / "scheduler"
        return scheduler_from(folder, str(folder)), f"the run's {folder}/ (saved by the training script)"
    if loaded.scheduler_from is not None:
        return scheduler_from(loaded.scheduler_from, str(loaded.scheduler_from)), "base_model's scheduler/"
    return None, ""


__all__ = [
    "LAYOUTS",
    "LORA_FILES",
    "MODEL_STEM",
    "RNG_STATE_FILE",
    "Snapshot",
    "check_safetensors",
    "combined_sha256",
    "snapshot_sha256",
    "denoiser_class",
    "detect_layout",
    "load_snapshot",
    "merge_lora",
    "model_weight_files",
    "snapshot_complete",
    "step_from_name",
]
