"""`memwatch probe` / `memwatch watch` on text-to-image runs: LoRA and full fine-tune Stable Diffusion folders.

The run folders are written as diffusers' train_text_to_image(_lora).py write them (see
diffusers_layouts.py: real tiny CLIP text encoder and tokenizer, real peft adapters). The training
set is a diffusers imagefolder whose metadata.jsonl gives the captions; one image has none.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from support.clock import ScriptedClock
from support.images import write_images
from support.layouts import (
    save_final_lora,
    save_final_sd_pipeline,
    save_full_checkpoint,
    save_lora_checkpoint,
    save_sd_pipeline,
    sd_scheduler,
    tiny_cond_unet,
)
from support.models import text_to_image_parts, tiny_unet

from memwatch.cli import main
from memwatch.core.config import load_config
from memwatch.core.session import ProbeSession
from memwatch.data.images import load_image
from memwatch.data.refset import load_reference_set
from memwatch.errors import MemwatchError
from memwatch.frontends.jobs import probe_run_dir, watch_run_dir
from memwatch.models.parts import ModelParts
from memwatch.probes.condnoise import condnoise_scores
from memwatch.probes.membership import denoising_losses, noise_seed_for
from memwatch.sampling.text_to_image import encode_images, encode_prompts
from memwatch.signals.stats import roc_auc
from memwatch.snapshots import load_snapshot
from memwatch.store import Store

TRAIN_CAPTIONS = {"img000.png": "a red fox", "img001.png": "a red fox", "img002.png": "a blue car"}  # img003: none
HOLDOUT_CAPTIONS = {"img040.png": "a green boat", "img041.png": "a red fox"}  # a training caption: not held out
MEMBER_PROMPTS = {"a red fox", "a blue car"}
HOLDOUT_PROMPTS = {"a green boat"}
K = 2  # samples per prompt
CONDNOISE = {"every": 1, "num_members": 4, "num_holdout": 4, "num_steps": 1, "num_generations": 1}
CONDNOISE.update({"num_inference_steps": 3, "batch_size": 4})
PROBES = {"membership", "regurgitation", "forecast", "condnoise"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they give on busy cores
    yield
    torch.set_num_threads(before)


def _imagefolder(folder: Path, seeds: list[int], captions: dict[str, str]) -> None:
    write_images(folder, seeds, size=16)  # the tiny SD pipeline makes 16x16 images (8 latent px x VAE factor 2)
    rows = [json.dumps({"file_name": name, "text": text}) for name, text in captions.items()]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("t2i")
    _imagefolder(root / "train", [0, 1, 2, 3], TRAIN_CAPTIONS)
    _imagefolder(root / "holdout", [40, 41], HOLDOUT_CAPTIONS)
    save_sd_pipeline(root / "sd-base", seed=0)
    settings = {
        "reference": str(root / "train"),
        "holdout": str(root / "holdout"),
        "base_model": str(root / "sd-base"),
        "run_name": "t2i",
        "probes": {
            "membership": {"every": 1, "num_members": 8, "num_holdout": 8, "timesteps": [100, 400], "batch_size": 8},
            "regurgitation": {
                "every": 1,
                "samples_per_prompt": K,
                "max_prompts": 2,
                "max_holdout_prompts": 1,
                "inference_steps": 2,
                "batch_size": 8,
            },
            "condnoise": CONDNOISE,
        },
        # fires at every condnoise result (AUC is always >= 0), so its event shows the evidence it carries
        "rules": [
            {
                "name": "condnoise-seen",
                "type": "threshold",
                "metric": "condnoise/condnoise_auc",
                "op": ">=",
                "value": 0.0,
                "severity": "info",
                "message": "condnoise AUC {value}",
            }
        ],
    }
    (root / "memwatch.yaml").write_text(yaml.safe_dump(settings))
    return {"root": root, "settings": settings, "config": root / "memwatch.yaml"}


def _store(run_dir: Path) -> dict:
    with Store(run_dir / "memwatch" / "memwatch.sqlite") as store:
        run = store.runs()[0]["id"]
        return {
            "results": store.results(run),
            "metrics": {(m["step"], m["kind"], m["probe"], m["metric"]): m["value"] for m in store.metrics(run)},
            "items": store.items(run),
            "matches": store.matches(run),
            "snapshots": store.snapshots(run),
            "events": store.events(run),
        }


def _ok(data: dict) -> set[tuple]:
    return {(r["step"], r["kind"], r["probe"]) for r in data["results"] if r["status"] == "ok"}


def _rows(data: dict, probe: str, kind: str, table: str = "items") -> list[dict]:
    return [r for r in data[table] if r["probe"] == probe and r["kind"] == kind]


def _check_regurgitation(data: dict, kind: str) -> None:
    """Per-prompt rows, matches carrying their prompt, and overall metrics consistent with them."""
    m = {k[3]: v for k, v in data["metrics"].items() if k[1] == kind and k[2] == "regurgitation"}
    n = K * len(MEMBER_PROMPTS | HOLDOUT_PROMPTS)
    assert m["num_samples"] == n and m["num_prompts"] == 3
    assert m["uncaptioned_member"] == 1 and m["uncaptioned_holdout"] == 0  # img003 has no caption
    matches = _rows(data, "regurgitation", kind, "matches")
    assert len(matches) == n and len({r["seed"] for r in matches}) == n  # one distinct seed per sample
    assert {r["prompt"] for r in matches if r["group"] == "member"} == MEMBER_PROMPTS
    assert {r["prompt"] for r in matches if r["group"] == "holdout"} == HOLDOUT_PROMPTS
    items = _rows(data, "regurgitation", kind)
    assert {r["prompt"]: r["group"] for r in items} == {p: "member" for p in MEMBER_PROMPTS} | {
        p: "holdout" for p in HOLDOUT_PROMPTS
    }
    for row in items:
        mine = [x for x in matches if x["prompt"] == row["prompt"]]
        assert row["num_samples"] == K == len(mine)
        assert row["mem_fraction"] == pytest.approx(sum(x["memorized"] for x in mine) / K)
        assert row["sim_max"] == pytest.approx(max(x["similarity"] for x in mine))
    assert m["mem_fraction"] == pytest.approx(sum(r["memorized"] for r in matches) / n)
    members = [r for r in matches if r["group"] == "member"]
    assert m["mem_fraction_member"] == pytest.approx(sum(r["memorized"] for r in members) / len(members))
    # each sample says whether its nearest training image is one its prompt is the caption of
    assert all(r["own_image"] == (TRAIN_CAPTIONS.get(r["nn1"]) == r["prompt"]) for r in matches)


def _check_report_prompts(run_dir: Path) -> None:
    """The report ranks every prompt, each with the training image its closest sample came to, from the store."""
    from memwatch.views.report.build import build_report

    rows = build_report(run_dir)["evidence"]["at_risk_prompts"]
    assert {r["prompt"]: r["group"] for r in rows} == {p: "member" for p in MEMBER_PROMPTS} | {
        p: "holdout" for p in HOLDOUT_PROMPTS
    }
    assert [r["rank"] for r in rows] == [1, 2, 3]
    matches = [m for m in _store(run_dir)["matches"] if m["probe"] == "regurgitation"]
    for r in rows:
        closest = min((m for m in matches if m["prompt"] == r["prompt"]), key=lambda m: m["ratio"])
        assert r["ratio_min"] == pytest.approx(closest["ratio"]) and r["copies_image"] == closest["nn1"]
        assert r["own_image"] == (TRAIN_CAPTIONS.get(closest["nn1"]) == r["prompt"])


def _check_condnoise(data: dict, kind: str, snapshot_dir: Path, base_model: Path | None) -> dict[str, float]:
    """Stored scores are Wen et al.'s scores of this snapshot, recomputed here; AUC over them."""
    rows = _rows(data, "condnoise", kind)
    scores = {r["item"]: r["score"] for r in rows}
    assert {r["item"] for r in rows if r["group"] == "member"} == MEMBER_PROMPTS
    assert {r["item"] for r in rows if r["group"] == "holdout"} == HOLDOUT_PROMPTS
    snap = load_snapshot(snapshot_dir, base_model=base_model)
    prompts = sorted(scores)
    cfg = {k: v for k, v in CONDNOISE.items() if k not in ("every", "num_members", "num_holdout")}
    expected = condnoise_scores(snap, prompts, **cfg)
    assert [scores[p] for p in prompts] == pytest.approx(expected.tolist(), rel=1e-4)
    auc = data["metrics"][(rows[0]["step"], kind, "condnoise", "condnoise_auc")]
    assert auc == roc_auc([scores[p] for p in MEMBER_PROMPTS], [scores[p] for p in HOLDOUT_PROMPTS])
    return scores


def _check_membership(data: dict, kind: str, snapshot_dir: Path, base_model: Path | None, root: Path) -> None:
    """Captioned images only; each loss is the caption-conditioned loss on VAE latents, recomputed here."""
    rows = _rows(data, "membership", kind)
    assert {r["item"] for r in rows if r["group"] == "member"} == set(TRAIN_CAPTIONS)
    assert {r["item"] for r in rows if r["group"] == "holdout"} == set(HOLDOUT_CAPTIONS)
    assert data["metrics"][(rows[0]["step"], kind, "membership", "uncaptioned_member")] == 1
    snap = load_snapshot(snapshot_dir, base_model=base_model).parts
    text = snap
    item = "img002.png"
    image = load_image(root / "train" / item, 16)[None]

    def loss(caption: str) -> float:
        return denoising_losses(
            snap.unet,
            snap.scheduler,
            image,
            timesteps=[100, 400],
            noise_seeds=[noise_seed_for(item)],
            conditioning=encode_prompts(text.tokenizer, text.text_encoder, [caption]),
            encode=lambda x: encode_images(text.vae, x),
        ).item()

    stored = next(r["loss"] for r in rows if r["item"] == item)
    assert stored == pytest.approx(loss(TRAIN_CAPTIONS[item]), rel=1e-4)
    assert stored != pytest.approx(loss(""), rel=1e-4)  # the caption conditions the loss


def test_lora_run_is_probed_end_to_end(world: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "sd-lora"
    save_lora_checkpoint(run_dir, 2, script="text_to_image_lora", seed=1)
    save_final_lora(run_dir, seed=2)  # the script's last save, in OUTPUT_DIR itself
    assert main(["probe", str(run_dir), "--config", str(world["config"])]) == 0
    data = _store(run_dir)
    assert _ok(data) == {(2, kind, p) for kind in ("checkpoint", "final") for p in PROBES}
    assert not [r for r in data["results"] if r["status"] == "failed"]
    base = Path(world["settings"]["base_model"])
    for kind, folder in (("checkpoint", run_dir / "checkpoint-2"), ("final", run_dir)):
        _check_regurgitation(data, kind)
        _check_membership(data, kind, folder, base, world["root"])
    lora_scores = _check_condnoise(data, "checkpoint", run_dir / "checkpoint-2", base)
    final_scores = _check_condnoise(data, "final", run_dir, base)
    assert lora_scores != final_scores  # each snapshot's own adapter
    # condnoise events carry the prompts with the highest scores, highest first
    (event,) = [e for e in data["events"] if e["rule"] == "condnoise-seen"]
    top = [(t["prompt"], t["score"]) for t in event["evidence"]["top_prompts"]]
    assert top in ([(p, s) for p, s in sorted(x.items(), key=lambda kv: -kv[1])] for x in (lora_scores, final_scores))
    sha = {s["kind"]: s["weights_sha256"] for s in data["snapshots"]}
    assert sha["checkpoint"] == load_snapshot(run_dir / "checkpoint-2", base_model=base).weights_sha256
    _check_report_prompts(run_dir)
    # a second run finds everything done
    report = probe_run_dir(run_dir, load_config(world["config"]))
    assert report.probed == [] and report.already_done == 2 and report.failed == []


def test_a_final_lora_equal_to_the_last_checkpoint_is_measured_once(world: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "sd-lora-same"
    save_lora_checkpoint(run_dir, 2, script="text_to_image_lora", seed=1)
    save_final_lora(run_dir, seed=1)  # training ended at the checkpoint: same adapter, diffusers key form
    report = probe_run_dir(run_dir, load_config(world["config"]))
    assert report.probed == [2] and report.already_done == 1 and report.failed == []
    data = _store(run_dir)
    assert len(data["snapshots"]) == 1


def test_full_fine_tune_run_is_watched_end_to_end(world: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "sd-full"
    base = Path(world["settings"]["base_model"])
    state = save_full_checkpoint(run_dir, 2, conditional=True, use_ema=False, seed=0)
    trained = tiny_cond_unet(0)
    trained.load_state_dict(state["raw"])
    with torch.no_grad():  # training went on after the last checkpoint: the final model has other weights
        next(trained.parameters()).mul_(1.01)
    save_final_sd_pipeline(run_dir, base, trained)  # train_text_to_image.py's pipeline.save_pretrained
    clock = ScriptedClock([])  # the run is already saved: no wall-clock waiting
    report = watch_run_dir(run_dir, load_config(world["config"]), quiet_period=1.0, poll=1.0, idle_timeout=60,
                           clock=clock.clock, sleep=clock.sleep)  # fmt: skip
    assert sorted(report.probed) == [2, 2] and report.failed == [] and clock.now < 10
    data = _store(run_dir)
    assert _ok(data) == {(2, kind, p) for kind in ("checkpoint", "final") for p in PROBES}
    for kind, folder in (("checkpoint", run_dir / "checkpoint-2"), ("final", run_dir)):
        _check_regurgitation(data, kind)
        _check_condnoise(data, kind, folder, base)
    _check_membership(data, "final", run_dir, None, world["root"])  # the pipeline brings its own text encoder


def test_lora_without_its_base_model_fails_alone(world: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "moved-base"
    save_lora_checkpoint(run_dir, 2, script="dreambooth_lora", seed=1)
    shutil.copytree(Path(world["settings"]["base_model"]), run_dir, dirs_exist_ok=True)  # a saved full pipeline
    settings = {**world["settings"], "base_model": str(tmp_path / "no-longer-here")}
    report = probe_run_dir(run_dir, load_config(settings))
    assert [(f["step"], Path(f["path"]).name) for f in report.failed] == [(2, "checkpoint-2")]
    assert "no-longer-here" in report.failed[0]["error"] and "base_model" in report.failed[0]["error"]
    assert report.probed == [2]  # the final pipeline
    data = _store(run_dir)
    failed = {(r["step"], r["kind"], r["probe"]) for r in data["results"] if r["status"] == "failed"}
    assert failed == {(2, "checkpoint", p) for p in PROBES}
    assert _ok(data) == {(2, "final", p) for p in PROBES}


def test_training_set_without_captions_is_recorded_not_dropped(world: dict, tmp_path: Path) -> None:
    train = tmp_path / "uncaptioned"
    write_images(train, [0, 1], size=16)
    run_dir = tmp_path / "run"
    shutil.copytree(Path(world["settings"]["base_model"]), run_dir)
    settings = {**world["settings"], "reference": str(train)}
    report = probe_run_dir(run_dir, load_config(settings))
    # the snapshot loaded, but none of its probes could run: a failed snapshot, not a probed one
    assert report.probed == [] and [f["step"] for f in report.failed] == [0]
    assert "has a caption" in report.failed[0]["error"]
    data = _store(run_dir)
    errors = {r["probe"]: r["error"] for r in data["results"] if r["status"] == "failed"}
    assert set(errors) == PROBES and not _ok(data)
    assert all("none of its 2 items has a caption" in e for e in errors.values())


def test_session_picks_the_sampling_from_what_it_is_given(world: dict, tmp_path: Path) -> None:
    config = load_config(world["settings"])
    session = ProbeSession(config, load_reference_set(world["root"] / "train"), None, tmp_path / "out")
    applicable = {p.name for p in session.applicable(text_to_image=True)}
    assert "condnoise" in applicable and "condnoise" not in {p.name for p in session.applicable()}
    # condnoise does not apply to an unconditional UNet: nothing is probed, nothing recorded
    assert session.probe(1, tiny_unet(16), DDPMScheduler(1000), ["condnoise"]) == []
    assert session.store.snapshots(session.run_id) == []
    with pytest.raises(MemwatchError, match=r"is text-conditioned: .*pass the loaded snapshot"):
        session.probe(1, tiny_cond_unet(), sd_scheduler(), ["condnoise"])
    assert ModelParts.of(text_to_image_parts()).text_to_image
    assert not ModelParts.of(tiny_unet(16), DDPMScheduler()).text_to_image
    session.close()
