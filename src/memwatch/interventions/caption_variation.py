"""Varied captions for text-to-image fine-tunes: the caption at risk, told a little differently each time.

Somepalli et al. 2023 ("Understanding and Mitigating Copying in Diffusion Models", NeurIPS) find that a
caption repeated word for word with its image drives copying, and that randomising the caption during
training (multiple captions, random words added, words repeated) reduces it. The diffusers example scripts
already train on a *list* of captions per image (``train_text_to_image.py`` draws one at random each time it
reads the row, and validates with the first), so varied captions need no change to the script: only a
``metadata.jsonl`` whose ``text`` is a list.

A variant here is the caption with a few words inserted at random places, each word either one of the
caption's own words repeated (caption word repetition) or a word from the other captions of the set (random
token addition); the first caption of the list is always the original, the one a user prompts with.

Two ways to use it, both opt-in and on the run's record:

* a script memwatch does not run: ``memwatch recaption RUN_DIR --out FOLDER`` writes the training folder with
  the captions of the images at risk as lists, to resume the script on;
* a loop memwatch watches: :class:`VariedCaptions` gives each example its caption, varied for the images at
  risk once the first warning fired (``captions.of(indices)`` where the loop tokenizes its captions).

Example:
    >>> variants = caption_variants("a photo of a red clock", ["cell", "grey", "dark"], count=3, seed=0)
    >>> variants[0], len(variants), all(len(v.split()) == 8 for v in variants[1:])
    ('a photo of a red clock', 3, True)
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from memwatch.interventions.weights import ImageWeights

#: words inserted into each variant (Somepalli et al. add or repeat a few tokens, not rewrite the caption)
WORDS_ADDED = 2


def caption_variants(caption: str, vocabulary: Sequence[str], *, count: int, seed: int = 0) -> list[str]:
    """``caption`` and ``count - 1`` variants of it, the same for the same arguments on any machine.

    Args:
        caption: the training caption.
        vocabulary: words to draw added words from (e.g. every word of the set's captions); may be empty, then
            only the caption's own words are repeated.
        count: how many captions to return, the original first (>= 1).
        seed: varies the variants between runs; the caption itself also seeds them.

    Returns:
        ``count`` distinct captions where the words allow, the original first.
    """
    if count < 1:
        raise ValueError(f"count {count}: give at least 1 (the original caption)")
    words = caption.split()
    pool = sorted(set(vocabulary) - set(words)) or words
    digest = hashlib.sha256(f"{seed}\0{caption}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    out = [caption]
    for _ in range(count - 1):
        varied = list(words)
        for _ in range(WORDS_ADDED):
            word = rng.choice(words) if words and rng.random() < 0.5 else rng.choice(pool) if pool else ""
            varied.insert(rng.randrange(len(varied) + 1), word)
        out.append(" ".join(w for w in varied if w))
    return out


def vocabulary_of(captions: Sequence[str]) -> list[str]:
    """Every distinct word of ``captions``, sorted (commas and full stops stripped).

    Example:
        >>> vocabulary_of(["a red clock,", "a cell."])
        ['a', 'cell', 'clock', 'red']
    """
    return sorted({w.strip(",.;:") for c in captions for w in c.split()} - {""})


class VariedCaptions(ImageWeights):
    """The captions of a training set's examples, varied for the images memwatch finds at risk once the
    run's first warning fires (the examples keep their weight 1; :class:`ImageWeights` does the following).

    Args:
        monitor: the run's ``MemorizationMonitor`` (or its ``ProbeSession``).
        ids: the reference set's image id of each example, in the dataset's order.
        captions: each example's caption, in the same order.
        variants: captions per image at risk, the original included.
        most: at most this share of the distinct images gets varied captions, the most at risk first.
        seed: varies the variants (with each caption).

    Example:
        >>> captions = VariedCaptions(monitor, ids, texts)  # doctest: +SKIP
        >>> for step, batch in enumerate(loader):  # doctest: +SKIP
        ...     tokens = tokenizer(captions.of(batch["index"], rng), padding="max_length", ...)
        ...     ...
        ...     monitor.step(step, unet, scheduler)
        ...     captions.update()
    """

    kind = "recaption"

    def __init__(
        self,
        monitor: Any,
        ids: Sequence[str],
        captions: Sequence[str],
        *,
        variants: int = 8,
        most: float = 1.0,
        seed: int = 0,
    ) -> None:
        if len(captions) != len(ids):
            raise ValueError(f"VariedCaptions: {len(captions)} captions for {len(ids)} examples; give one each")
        if variants < 2:
            raise ValueError(f"VariedCaptions: variants={variants}; give at least 2 (the original and a variant)")
        super().__init__(monitor, ids, at_risk=1.0, most=most)
        self.captions = [str(c) for c in captions]
        self.variants, self.seed = variants, seed
        self._words = vocabulary_of(self.captions)
        #: example index -> its captions (the original first), for the examples of the images at risk
        self.varied: dict[int, list[str]] = {}

    def of(self, indices: Any, rng: random.Random | None = None) -> list[str]:  # type: ignore[override]
        """The captions to train the examples ``indices`` on at this step: each example's own, or for an image
        at risk one of its captions drawn by ``rng`` (seed it for a reproducible run).

        Example:
            >>> texts = captions.of([0, 1, 2], random.Random(step))  # doctest: +SKIP
        """
        rng = rng or random.Random(0)
        out = []
        for i in (int(i) for i in indices):
            out.append(rng.choice(self.varied[i]) if i in self.varied else self.captions[i])
        return out

    def _act_on(self, new: list[str]) -> tuple[dict[str, Any], str]:
        shown = {}
        for image in new:
            for i in self._positions[image]:
                self.varied[i] = caption_variants(self.captions[i], self._words, count=self.variants, seed=self.seed)
                shown.setdefault(image, self.varied[i])
        return {"variants": self.variants, "captions": dict(list(shown.items())[:50])}, "given varied captions"

    def _settings(self) -> dict[str, Any]:
        return {"variants": self.variants, "most": self.most, "seed": self.seed, "examples": len(self.ids)}
