"""Running probes on a live model without disturbing its training.

A probe borrows the model the trainer is optimising. It must leave the model exactly as it found
it: same ``training`` flag on every submodule (dropout, batch-norm statistics), no autograd graph
kept alive, no gradients touched. :func:`eval_mode` does that; :func:`unwrap_model` reaches the
plain module behind DDP / ``torch.compile`` wrappers, so a probe that runs on one process only
never enters a wrapper's collective calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Put ``modules`` in eval mode under ``torch.no_grad()``; restore every flag afterwards.

    Each module's and each submodule's previous ``training`` flag is recorded and restored one by
    one (not via ``module.train(flag)``, which would overwrite submodules that the caller had set
    differently, e.g. a frozen, eval-mode text encoder inside a trained wrapper). Restoration also
    happens when the body raises. ``None`` entries are skipped, so optional modules can be passed.
    ``requires_grad`` flags are never changed.

    Args:
        modules: torch modules to switch to eval mode for the duration of the block.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
        >>> with eval_mode(net):
        ...     net.training, torch.is_grad_enabled()
        (False, False)
        >>> net.training
        True
    """
    saved = [(sub, sub.training) for module in modules if module is not None for sub in module.modules()]
    try:
        for module in modules:
            if module is not None:
                module.eval()
        with torch.no_grad():
            yield
    finally:
        for sub, flag in saved:
            sub.training = flag


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain module behind DDP / DataParallel / ``torch.compile`` wrappers.

    Probes call the unwrapped module: DDP's forward may broadcast buffers (a collective that hangs
    when only some processes probe), and a compiled module would recompile for eval mode and the
    probe's batch sizes.

    Args:
        model: a module, possibly wrapped (several times).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(lin)) is lin
        True
    """
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore every random stream a training loop may draw from: Python, NumPy, torch CPU and CUDA.

    Probes seed their own generators and should not draw from the global ones, but model code or
    libraries they call might; restoring the states makes a seeded run with probes follow exactly
    the trajectory it would have followed without them.

    Example:
        >>> a = torch.get_rng_state()
        >>> with preserved_rng():
        ...     _ = torch.rand(3)
        >>> torch.equal(a, torch.get_rng_state())
        True
    """
    import random

    import numpy as np

    py_state, np_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class ema_weights:
    """Context manager yielding the module to probe: the raw weights, or the EMA weights swapped in.

    Args:
        model: the module being trained (wrapped or not).
        ema: a diffusers ``EMAModel`` (its weights are copied in and restored afterwards) or an EMA
            copy of the model (used as is); may be None when ``which`` is ``"raw"``.
        which: ``"raw"`` or ``"ema"``.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with ema_weights(net, None, "raw") as probed:
        ...     probed is net
        True
    """

    def __init__(self, model: nn.Module, ema: object, which: str):
        self.model, self.ema, self.which = unwrap_model(model), ema, which
        self._swapped = False

    def __enter__(self) -> nn.Module:
        from memwatch.errors import MemwatchError

        if self.which != "ema":
            return self.model
        if self.ema is None:
            raise MemwatchError("config 'weights: ema' but no EMA model was passed (ema=...): pass the EMA model")
        if isinstance(self.ema, nn.Module):
            return unwrap_model(self.ema)
        params = list(self.model.parameters())
        self.ema.store(params)  # type: ignore[attr-defined]
        self.ema.copy_to(params)  # type: ignore[attr-defined]
        self._swapped = True
        return self.model

    def __exit__(self, *exc: object) -> None:
        if self._swapped:
            self.ema.restore(list(self.model.parameters()))  # type: ignore[attr-defined]
