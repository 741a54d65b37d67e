"""Varied captions (issue 25): the variants, and memwatch reading a caption list as the scripts do."""

from __future__ import annotations

import json
from pathlib import Path

from support.images import write_images

from memwatch.data.containers import script_caption
from memwatch.data.refset import load_reference_set
from memwatch.interventions.caption_variation import WORDS_ADDED, caption_variants, vocabulary_of

CAPTION = "a medium photo of cell, black, dark, smooth, middle right"


def test_variants_keep_the_caption_first_add_words_and_repeat_on_any_machine() -> None:
    words = vocabulary_of([CAPTION, "a wide photo of astronaut, red, even, smooth, bottom right"])
    variants = caption_variants(CAPTION, words, count=8, seed=3)
    assert variants[0] == CAPTION and len(variants) == 8
    assert len(set(variants)) == 8  # every variant tells the caption differently
    for v in variants[1:]:
        assert len(v.split()) == len(CAPTION.split()) + WORDS_ADDED
        # the caption's own words stay, in order: the variant only adds
        rest = iter(v.split())
        assert all(any(w == x for x in rest) for w in CAPTION.split())
        assert set(v.split()) <= set(CAPTION.split()) | set(words)
    assert caption_variants(CAPTION, words, count=8, seed=3) == variants
    assert caption_variants(CAPTION, words, count=8, seed=4) != variants  # the seed varies them
    assert caption_variants(CAPTION, [], count=1) == [CAPTION]


def test_a_caption_list_is_read_as_the_scripts_read_it_outside_training(tmp_path: Path) -> None:
    write_images(tmp_path, [1, 2, 3])
    rows = [
        {"file_name": "img001.png", "text": ["a red square", "a red red square"]},
        {"file_name": "img002.png", "text": "a dog"},
        {"file_name": "img003.png", "text": [1, 2]},  # not captions: the image is used without one
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    refs = load_reference_set(tmp_path)
    assert [it.caption for it in refs.items] == ["a red square", "a dog", None]
    assert [script_caption(v) for v in ("x", ["y", "z"], [], ["y", 3], None)] == ["x", "y", None, None, None]
