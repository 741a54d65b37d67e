"""The text-to-image benchmark's base pipeline (``assets/t2i/base``, built by ``scripts/make_t2i_base.py``).

A copy is only a copy if it can be seen in pixels: the VAE must give back each training crop closely enough
that memwatch's own test (d1/d2 < 1/3 against the training set, pixels) calls the round trip a copy of that
crop and of no other. The files must be the ones the build recorded, and no caption may be cut off."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "assets" / "t2i" / "base"
sys.path.insert(0, str(ROOT / "scripts"))
pytest.importorskip("skimage", reason="scripts/t2i_data.py crops scikit-image's photos (memwatch[test])")
pytest.importorskip("transformers", reason="the base pipeline's text parts (memwatch[text])")
if not (BASE / "BUILD.json").is_file():
    pytest.skip(f"{BASE}/BUILD.json: the base model is not built; python scripts/make_t2i_base.py builds it",
                allow_module_level=True)  # fmt: skip

from t2i_data import WORDS, distinct_crops, load_photos  # noqa: E402


def test_weights_are_the_ones_the_build_recorded() -> None:
    record = json.loads((BASE / "BUILD.json").read_text())
    assert set(record["sha256"]) == {str(p.relative_to(BASE)) for p in BASE.rglob("*.safetensors")}
    for rel, digest in record["sha256"].items():
        assert hashlib.sha256((BASE / rel).read_bytes()).hexdigest() == digest, rel


def test_vae_round_trips_of_training_crops_are_copies_of_them_alone() -> None:
    from diffusers import AutoencoderKL

    from memwatch.probes.regurgitation import d1_d2

    vae = AutoencoderKL.from_pretrained(BASE / "vae").eval()
    crops = distinct_crops(load_photos(), np.random.default_rng(7), 64)  # a benchmark-sized training set
    x = torch.from_numpy(np.stack([c.image for c in crops])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        back = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    flat_back, flat_x = back.flatten(1), x.flatten(1)
    dist = torch.cdist(flat_back.double(), flat_x.double())
    found = dist.topk(2, largest=False)
    _, _, ratio = d1_d2(found.values)
    assert (found.indices[:, 0] == torch.arange(len(crops))).all()  # each round trip is nearest its own crop
    assert float(ratio.max()) < 1 / 3, f"worst d1/d2 {float(ratio.max()):.3f}"


def test_captions_fit_the_text_encoders_context_and_decode_back() -> None:
    """No caption is cut off (the scripts pad and truncate to 77 tokens): captions that differ only in their
    last words must still reach the text encoder different."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(BASE / "tokenizer")
    for crop in distinct_crops(load_photos(), np.random.default_rng(0), 64):
        ids = tok(crop.caption).input_ids
        assert len(ids) <= tok.model_max_length, crop.caption
        back = tok.decode(ids, skip_special_tokens=True)
        assert back.replace(" ", "") == crop.caption.replace(" ", ""), (back, crop.caption)
    pieces = [len(tok(w, add_special_tokens=False).input_ids) for w in WORDS]
    assert sum(pieces) < 1.5 * len(pieces), pieces  # words are merged, not spelled out
