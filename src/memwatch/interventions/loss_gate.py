"""A per-example loss gate: skip or discount examples the model already reproduces too well.

A memorized example's denoising loss falls far below what the model achieves at the same noise level on the
rest of the data. Following the anti-gradient control of IET-AGC (Liu et al., "Iterative Ensemble Training
with Anti-Gradient Control for Mitigating Memorization in Diffusion Models", ECCV 2024), the gate keeps a
running mean of the loss per timestep bucket and gives an example whose loss falls below ``ratio`` times its
bucket's mean the weight ``weight`` (0: its gradient is skipped). The loop multiplies the weights into its
per-example loss::

    losses = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    loss = (losses * gate(losses, timesteps, ids=batch_ids)).mean()

The gate is per process (each keeps its own means from its own examples). The first gated step and then the
gated images every ``record_every`` steps (and at :meth:`LossGate.close`) are recorded as interventions; a
failure returns weights of 1 (training goes on unchanged) and is recorded once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from memwatch.errors import failure_reason

log = logging.getLogger("memwatch")


class LossGate:
    """Weights for a batch's per-example losses: ``weight`` where the loss is far below its timestep's mean.

    Args:
        monitor: the run's ``MemorizationMonitor`` (or its session), to record what was gated; None: unrecorded.
        num_train_timesteps: the noise scheduler's ``num_train_timesteps``.
        buckets: timestep buckets, each with its own running mean.
        ratio: an example is gated when its loss < ratio x its bucket's running mean.
        weight: a gated example's weight (0 skips its gradient).
        momentum: the running mean's exponential decay per example seen.
        warmup: examples a bucket must have seen before it gates.
        record_every: steps between the records of what was gated.

    Example:
        >>> gate = LossGate(num_train_timesteps=1000, warmup=2)
        >>> w = gate(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([10, 20, 30]))
        >>> gate(torch.tensor([1.0, 0.1]), torch.tensor([15, 25])).tolist()
        [1.0, 0.0]
    """

    def __init__(
        self,
        monitor: Any = None,
        *,
        num_train_timesteps: int = 1000,
        buckets: int = 10,
        ratio: float = 0.5,
        weight: float = 0.0,
        momentum: float = 0.99,
        warmup: int = 50,
        record_every: int = 100,
    ) -> None:
        if not 0 < ratio < 1 or not 0 <= weight < 1 or not 0 < momentum < 1 or buckets < 1:
            raise ValueError(
                f"LossGate: ratio={ratio} must lie in (0, 1), weight={weight} in [0, 1), momentum={momentum} in "
                f"(0, 1) and buckets={buckets} >= 1"
            )
        self.session = getattr(monitor, "session", monitor)
        self.num_train_timesteps, self.buckets = num_train_timesteps, buckets
        self.ratio, self.weight, self.momentum, self.warmup = ratio, weight, momentum, warmup
        self.record_every = record_every
        self._mean = torch.zeros(buckets, dtype=torch.float64)  # bias-corrected below (as Adam's moments)
        self._seen = torch.zeros(buckets, dtype=torch.long)
        self.gated = 0  # examples gated so far
        self.examples = 0  # examples seen so far
        self._pending: Counter[str] = Counter()  # gated images since the last record
        self._last_record: int | None = None
        self._failed = False
        self._calls = 0

    def __call__(
        self, losses: torch.Tensor, timesteps: torch.Tensor, ids: Sequence[str] | None = None, step: int | None = None
    ) -> torch.Tensor:
        """The batch's weights (1 or ``weight``), on the losses' device and dtype, without gradient.

        Args:
            losses: per-example losses, shape (B,).
            timesteps: each example's training timestep, shape (B,).
            ids: each example's training image id (for the record).
            step: the training step (for the record; default: a count of calls).
        """
        self._calls += 1
        step = self._calls if step is None else int(step)
        try:
            return self._gate(losses, timesteps, ids, step)
        except Exception as e:
            if not self._failed:
                self._failed = True
                log.warning("memwatch: the loss gate failed (every weight is 1 from now): %s", failure_reason(e))
                self._record(step, [], error=failure_reason(e))
            return torch.ones_like(losses.detach()) if isinstance(losses, torch.Tensor) else torch.ones(1)

    def _gate(
        self, losses: torch.Tensor, timesteps: torch.Tensor, ids: Sequence[str] | None, step: int
    ) -> torch.Tensor:
        if self._failed:
            return torch.ones_like(losses.detach())
        x = losses.detach().double().flatten().cpu()
        t = torch.as_tensor(timesteps).flatten().long().cpu()
        if x.shape != t.shape or (ids is not None and len(ids) != len(x)):
            raise ValueError(f"losses {tuple(x.shape)}, timesteps {tuple(t.shape)} and ids must be one per example")
        b = (t.clamp(0, self.num_train_timesteps - 1) * self.buckets // self.num_train_timesteps).long()
        seen = self._seen[b]
        mean = self._mean[b] / (1 - self.momentum ** seen.clamp(min=1).double())
        gate = (seen >= self.warmup) & (x < self.ratio * mean)
        for bucket, value in zip(b.tolist(), x.tolist(), strict=True):  # then the batch joins the means
            self._mean[bucket] = self.momentum * self._mean[bucket] + (1 - self.momentum) * value
            self._seen[bucket] += 1
        self.examples += len(x)
        if bool(gate.any()):
            self.gated += int(gate.sum())
            names = [ids[i] if ids is not None else f"#{i}" for i in gate.nonzero().flatten().tolist()]
            first = self._last_record is None
            self._pending.update(names)
            if first or step - self._last_record >= self.record_every:
                self._flush(step, first=first)
        weights = torch.ones(len(x), dtype=torch.float64)
        weights[gate] = self.weight
        return weights.to(device=losses.device, dtype=losses.dtype)

    def close(self, step: int | None = None) -> None:
        """Record what was gated since the last record (call it when training ends)."""
        if self._pending:
            self._flush(self._calls if step is None else step, first=False)

    def _flush(self, step: int, *, first: bool) -> None:
        counts = dict(self._pending.most_common())
        self._pending.clear()
        self._last_record = step
        message = (f"loss gate: first examples gated at step {step}" if first else
                   f"loss gate: {sum(counts.values())} example(s) gated up to step {step}")  # fmt: skip
        self._record(step, list(counts), counts=counts, message=message)

    def _record(self, step: int, images: list[str], *, counts: dict | None = None, message: str = "",
                error: str | None = None) -> None:  # fmt: skip
        if self.session is None:
            return
        detail = {"ratio": self.ratio, "weight": self.weight, "buckets": self.buckets, "warmup": self.warmup,
                  "momentum": self.momentum, "gated_total": self.gated, "examples_total": self.examples,
                  "gated": counts or {}}  # fmt: skip
        try:
            self.session.record_intervention("loss-gate", step, images, detail, message=message, error=error)
        except Exception as e:  # never into the loop
            log.warning("memwatch: the loss gate's record failed: %s", failure_reason(e))
