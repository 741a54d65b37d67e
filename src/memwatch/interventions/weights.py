"""Per-example weights that follow memwatch's findings, and a sampler that draws by them.

Once the run's first warning fires (an onset forecast, a copy, whatever rule at ``warning`` or above), the
training images memwatch names at risk — copied already, or forecast to be (``ProbeSession.images_at_risk``)
— get the weight ``at_risk`` (0: dropped). Asked for, each group of exact or near duplicates that the
training-set analysis (``memwatch data``) finds weighs as one image from the first step: each copy gets
1 / the group's size. A loop uses the weights either way:

* draw by them: ``DataLoader(dataset, sampler=weights.sampler())`` (drawn with replacement, as
  ``torch.utils.data.WeightedRandomSampler``, from the weights as they are when each epoch starts);
* or multiply them into a per-example loss: ``(loss_per_example * weights.of(indices)).mean()``.

Nothing changes until the trigger; every change is recorded (a row of the store's ``interventions`` table and
an ``info`` event) with the step and the images; a failure leaves the weights as they were and is recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from memwatch.errors import failure_reason
from memwatch.models.parts import ModelParts

log = logging.getLogger("memwatch")


class ImageWeights:
    """Weights over a training set's examples that drop or discount the images memwatch finds at risk.

    Args:
        monitor: the run's ``MemorizationMonitor`` (or its ``ProbeSession``).
        ids: the reference set's image id of each example, in the dataset's order (for an image folder,
            the file's path relative to the folder, as memwatch names it).
        at_risk: the weight of an image at risk once the first warning fired (0 drops it; None: leave them).
        duplicates: weigh each group of exact or near duplicates as one image, from the first step.
        most: at most this share of the distinct images is ever reweighted, the most at risk first (on a small
            set every image approaches copying, and dropping all of them would leave nothing to train on);
            the others at risk are recorded as held back.

    Example:
        >>> weights = ImageWeights(monitor, [item.id for item in monitor.session.refs.items])  # doctest: +SKIP
        >>> loader = DataLoader(dataset, batch_size=8, sampler=weights.sampler())  # doctest: +SKIP
        >>> for step, batch in enumerate(loader):  # doctest: +SKIP
        ...     ...
        ...     monitor.step(step, model, scheduler)
        ...     weights.update()

    Subclasses act on the images at risk in another way (``VariedCaptions`` varies their captions) by
    overriding :attr:`kind` and :meth:`_act_on`.
    """

    #: the intervention's name in the store (``interventions.kind``, event ``intervention-<kind>``)
    kind = "reweight"

    def __init__(
        self,
        monitor: Any,
        ids: Sequence[str],
        *,
        at_risk: float | None = 0.0,
        duplicates: bool = False,
        most: float = 0.5,
    ) -> None:
        if at_risk is not None and not 0.0 <= at_risk <= 1.0:
            raise ValueError(f"ImageWeights: at_risk={at_risk} must lie in [0, 1] (0 drops the images at risk)")
        if not 0.0 < most <= 1.0:
            raise ValueError(f"ImageWeights: most={most} must lie in (0, 1] (the share of images reweighted)")
        self.most = most
        self.session = getattr(monitor, "session", monitor)
        self.ids = [str(i) for i in ids]
        self.at_risk = at_risk
        self.duplicates = duplicates
        self._weights = torch.ones(len(self.ids), dtype=torch.float64)
        self._positions: dict[str, list[int]] = {}
        for i, image in enumerate(self.ids):
            self._positions.setdefault(image, []).append(i)
        self.reweighted: list[str] = []  # the images at risk whose weight changed, in the order they did
        self._duplicates_done = not duplicates
        self._risk_seen = False
        self._probed: tuple = ()  # the probes' last steps when the ranking was last read
        self._unknown: set[str] = set()  # images at risk not among ``ids``, reported once
        self._held: set[str] = set()  # images at risk beyond the share ``most``, reported once

    @property
    def weights(self) -> torch.Tensor:
        """The current weight of each example (a copy)."""
        return self._weights.clone()

    def of(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The weights of a batch's examples by their dataset indices, as float32 for a loss.

        Example:
            >>> loss = (per_example_loss * weights.of(batch["index"])).mean()  # doctest: +SKIP
        """
        index = torch.as_tensor(indices, dtype=torch.long).cpu()
        return self._weights[index].float()

    def sampler(self, num_samples: int | None = None, generator: torch.Generator | None = None) -> Sampler[int]:
        """A sampler that draws ``num_samples`` indices an epoch (default: the dataset's size), with replacement,
        each example in proportion to its weight when the epoch starts."""
        return _WeightedSampler(self, num_samples or len(self.ids), generator)

    def update(self, step: int | None = None) -> bool:
        """Apply what memwatch found so far; call it after ``monitor.step`` (main process; the weights are the
        main process's: broadcast them if other processes draw). Never raises.

        Args:
            step: the step the change applies from (default: the last step the monitor saw).

        Returns:
            Whether the weights changed.
        """
        session = self.session
        if not session.workers.is_main or session.store is None:
            return False
        changed = False
        if not self._duplicates_done:
            changed |= self._guarded("duplicates", step, self._weigh_duplicates)
        if self.at_risk is not None and session.first_alarm_step is not None:
            changed |= self._guarded(self.kind, step, self._weigh_at_risk)
        return changed

    def _guarded(self, kind: str, step: int | None, change: Any) -> bool:
        """Run one change; a failure leaves the weights as they were and is recorded once."""
        before = self._weights.clone()
        try:
            return bool(change(step))
        except Exception as e:
            self._weights = before
            detail = {"setting": self._settings()}  # as asked, before it is switched off below
            if kind == "duplicates":
                self._duplicates_done = True  # tried once: not again at every step
            else:
                self.at_risk = None
            self.session.record_intervention(kind, step, detail=detail, error=failure_reason(e))
            return False

    def _weigh_duplicates(self, step: int | None) -> bool:
        seen = self.session.last_model()
        if seen is None:
            return False  # before the first monitor.step: the model (and its resolution) is not known yet
        analysis = self.session.analyse_training_set(ModelParts.of(*seen).image_resolution, step=step)
        self._duplicates_done = True
        if analysis is None:
            raise RuntimeError("the training-set analysis failed (see the run's failed probes)")
        groups = [g["ids"] for g in analysis.get("duplicate_groups", [])]
        touched = []
        for group in groups:
            members = [i for image in group for i in self._positions.get(str(image), [])]
            if len(members) > 1:
                self._weights[members] = torch.minimum(self._weights[members], torch.tensor(1.0 / len(members)))
                touched += [self.ids[i] for i in members]
        self.session.record_intervention(
            "duplicates", step, touched,
            {"setting": self._settings(), "groups": len(groups), "examples_reweighted": len(touched)},
            message=f"{len(touched)} training examples in {len(groups)} duplicate group(s) weighted as one image "
                    f"per group",
        )  # fmt: skip
        return bool(touched)

    def _weigh_at_risk(self, step: int | None) -> bool:
        assert self.at_risk is not None
        probed = tuple(sorted(self.session.probed_at.items()))
        if probed == self._probed:
            return False  # nothing measured since the last look: the store's ranking is as it was
        self._probed = probed
        named = [r["training_id"] for r in self.session.images_at_risk(most=None)]  # most at risk first
        candidates = [image for image in named if image in self._positions and image not in self.reweighted]
        room = max(0, int(self.most * len(self._positions)) - len(self.reweighted))
        new, held_back = candidates[:room], candidates[room:]
        unknown = [image for image in named if image not in self._positions and image not in self._unknown]
        self._unknown.update(unknown)
        if not new:
            if not named and not self._risk_seen:
                self.session.record_intervention(self.kind, step, [], {"setting": self._settings()},
                                                 error="the warning named no training image at risk")  # fmt: skip
            elif unknown:
                detail = {"setting": self._settings(), "not_in_dataset": unknown[:50]}
                error = "the images at risk are not among the dataset's ids"
                self.session.record_intervention(self.kind, step, [], detail, error=error)
            elif set(held_back) - self._held:
                self._held.update(held_back)
                detail = {"setting": self._settings(), "held_back": held_back[:50]}
                # Not a failure: the cap `most` works as asked. On the record, nothing changed.
                message = (f"intervention {self.kind}: {len(held_back)} image(s) at risk held back, the share "
                           "`most` is changed already; nothing changed")  # fmt: skip
                self.session.record_intervention(self.kind, step, [], detail, message=message)
            self._risk_seen = True
            return False
        self._risk_seen = True
        self._held.update(held_back)
        detail, what = self._act_on(new)
        self.reweighted += new
        self.session.record_intervention(
            self.kind, step, new,
            {"setting": self._settings(), **detail, "not_in_dataset": unknown[:50],
             "examples": sum(len(self._positions[i]) for i in new), "held_back": held_back[:50]},
            message=f"{len(new)} training image(s) at risk {what}"
                    f" from step {step if step is not None else self.session.last_step}",
        )  # fmt: skip
        return True

    def _act_on(self, new: list[str]) -> tuple[dict[str, Any], str]:
        """Change how the images ``new`` (at risk, not changed before) are trained on; what to record of it, and
        what was done in a few words."""
        for image in new:
            self._weights[self._positions[image]] = self.at_risk
        return {"weight": self.at_risk}, "dropped" if self.at_risk == 0 else "down-weighted"

    def _settings(self) -> dict[str, Any]:
        return {"at_risk": self.at_risk, "duplicates": self.duplicates, "most": self.most, "examples": len(self.ids)}


class _WeightedSampler(Sampler[int]):
    """Draws from :class:`ImageWeights` as they are at the start of each epoch."""

    def __init__(self, weights: ImageWeights, num_samples: int, generator: torch.Generator | None) -> None:
        self.source, self.num_samples, self.generator = weights, num_samples, generator

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        w = self.source.weights
        if not bool((w > 0).any()):  # every example dropped: keep training on all rather than stop it
            log.warning("memwatch: every example has weight 0: the sampler draws from all of them")
            w = torch.ones_like(w)
        yield from torch.multinomial(w, self.num_samples, replacement=True, generator=self.generator).tolist()
