"""Acting on memwatch's findings inside training: each change opt-in, each on the record.

* :class:`ImageWeights` (``weights.py``): per-example weights and a ``torch.utils.data.Sampler`` that drop or
  down-weight the training images at risk once the first warning fires, and weigh each group of duplicates
  as one image from the start if asked;
* :class:`VariedCaptions` (``caption_variation.py``): for text-to-image loops, each example's caption, varied
  (words repeated or added, Somepalli et al. 2023) for the images at risk once the first warning fires;
* :class:`LossGate` (``loss_gate.py``): skips or discounts examples whose denoising loss falls far below the
  running mean at their timestep (in the manner of IET-AGC's anti-gradient control);
* :func:`rollback` (``rollback.py``): restores the last clean checkpoint's weights, optimizer and scheduler
  with ``accelerator.load_state`` and checks the weights are the ones the probes measured;
* :func:`~memwatch.interventions.filtered_folder.write_filtered_folder` (``filtered_folder.py``): for scripts
  memwatch does not run, a training folder without the images at risk (``memwatch exclude``), or with their
  captions varied (``memwatch recaption``, captions from :mod:`~memwatch.interventions.caption_variation`).

Every change is a row of the store's ``interventions`` table and an ``info`` event
(``ProbeSession.record_intervention``); none of them raises into the training loop: a failure leaves
training as it was and is recorded with its reason.
"""

from memwatch.interventions.caption_variation import VariedCaptions
from memwatch.interventions.loss_gate import LossGate
from memwatch.interventions.rollback import rollback
from memwatch.interventions.weights import ImageWeights

__all__ = ["ImageWeights", "LossGate", "VariedCaptions", "rollback"]
