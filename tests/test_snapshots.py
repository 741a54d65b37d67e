"""Loading snapshots laid out as diffusers and its example training scripts write them."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, PNDMScheduler
from support.layouts import (
    save_ddpm_pipeline,
    save_final_lora,
    save_full_checkpoint,
    save_lora_checkpoint,
    save_sd_pipeline,
)
from support.models import tiny_cond_unet, tiny_unet

from memwatch.errors import MemwatchError
from memwatch.hashing import sha256_file
from memwatch.snapshots import (
    check_safetensors,
    detect_layout,
    load_snapshot,
    merge_lora,
    snapshot_complete,
    snapshot_sha256,
)
from memwatch.snapshots.checkpoints import list_checkpoints

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def differs(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every layout, written once for the module (each test copies what it damages)."""
    root = tmp_path_factory.mktemp("layouts")
    ddpm_unet = save_ddpm_pipeline(root / "ddpm-pipeline", seed=1)
    save_sd_pipeline(root / "sd-base", seed=0)
    model_dir = root / "model"
    tiny_unet(16, seed=2).save_pretrained(model_dir)
    uncond = save_full_checkpoint(root / "ddpm-run", 200, seed=3)
    save_full_checkpoint(root / "ddpm-run", 400, seed=4, use_ema=False)
    t2i = save_full_checkpoint(root / "t2i-run", 300, conditional=True, seed=5)
    loras = {
        script: save_lora_checkpoint(root / f"{script}-run", 500, script=script, seed=0)
        for script in ("text_to_image_lora", "dreambooth_lora")
    }
    notes = root / "ddpm-run" / "checkpoint-final-notes"
    notes.mkdir()
    (notes / "notes.md").write_text("what went wrong\n")
    return {"root": root, "ddpm_unet": ddpm_unet, "uncond": uncond, "t2i": t2i, "loras": loras}


def test_ddpm_pipeline_loads_with_its_scheduler(layouts: dict) -> None:
    folder = layouts["root"] / "ddpm-pipeline"
    assert detect_layout(folder) == "pipeline"
    assert snapshot_complete(folder)
    snap = load_snapshot(folder)
    assert (snap.layout, snap.step, snap.weights, snap.parts.text_encoder) == ("pipeline", None, "raw", None)
    assert_same_weights(snap.parts.unet, layouts["ddpm_unet"].state_dict())
    assert isinstance(snap.parts.scheduler, DDPMScheduler) and snap.notes == []
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert snap.weights_files == {"unet/diffusion_pytorch_model.safetensors": sha256_file(weights)}
    assert snap.weights_sha256 == sha256_file(weights)
    # a pipeline holds one set of weights (the EMA ones when the run used EMA): the same weights for either
    assert load_snapshot(folder, weights="ema").weights_sha256 == snap.weights_sha256


def test_model_folder_loads_with_default_scheduler_and_a_note(layouts: dict) -> None:
    folder = layouts["root"] / "model"
    assert detect_layout(folder) == "model" and snapshot_complete(folder)
    snap = load_snapshot(folder)
    assert snap.layout == "model" and snap.step is None
    assert_same_weights(snap.parts.unet, tiny_unet(16, seed=2).state_dict())
    assert (
        snap.parts.scheduler.config.num_train_timesteps == 1000
        and snap.parts.scheduler.config.beta_schedule == "linear"
    )
    assert any("DDPMScheduler" in n for n in snap.notes)
    assert snap.weights_sha256 == sha256_file(folder / "diffusion_pytorch_model.safetensors")


def test_unconditional_checkpoint_raw_and_ema(layouts: dict) -> None:
    run = layouts["root"] / "ddpm-run"
    folder = run / "checkpoint-200"
    names = {p.name for p in folder.iterdir()}
    # what accelerator.save_state wrote around train_unconditional.py's hook (and nothing pickled was read)
    assert {"unet", "unet_ema", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= names
    assert detect_layout(folder) == "checkpoint" and snapshot_complete(folder)

    raw = load_snapshot(folder)
    ema = load_snapshot(folder, weights="ema")
    assert (raw.step, raw.layout, ema.weights) == (200, "checkpoint", "ema")
    assert_same_weights(raw.parts.unet, layouts["uncond"]["raw"])
    assert_same_weights(ema.parts.unet, layouts["uncond"]["ema"])
    assert differs(raw.parts.unet, layouts["uncond"]["ema"])
    assert raw.weights_sha256 == sha256_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert ema.weights_sha256 == sha256_file(folder / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert raw.weights_sha256 != ema.weights_sha256
    assert load_snapshot(folder).weights_sha256 == raw.weights_sha256  # stable across loads
    assert isinstance(raw.parts.scheduler, DDPMScheduler) and raw.notes

    no_ema = run / "checkpoint-400"
    assert load_snapshot(no_ema).step == 400
    with pytest.raises(MemwatchError, match=r"checkpoint-400: no unet_ema/"):
        load_snapshot(no_ema, weights="ema")


def test_text_to_image_checkpoint_takes_scheduler_from_base_model(layouts: dict) -> None:
    root = layouts["root"]
    folder = root / "t2i-run" / "checkpoint-300"
    snap = load_snapshot(folder, weights="ema", base_model=root / "sd-base", load_text=False)
    assert snap.parts.text_to_image and snap.step == 300 and snap.base_model == root / "sd-base"
    assert_same_weights(snap.parts.unet, layouts["t2i"]["ema"])
    assert (
        isinstance(snap.parts.scheduler, PNDMScheduler) and snap.parts.scheduler.config.beta_schedule == "scaled_linear"
    )
    assert snap.notes == []
    # an explicit scheduler wins over the base model's; without either, the default with a note
    override = load_snapshot(folder, base_model=root / "sd-base", scheduler=DDPMScheduler(500), load_text=False)
    assert override.parts.scheduler.config.num_train_timesteps == 500
    alone = load_snapshot(folder, load_text=False)
    assert isinstance(alone.parts.scheduler, DDPMScheduler) and alone.notes


@pytest.mark.parametrize("script", ["text_to_image_lora", "dreambooth_lora"])
def test_lora_checkpoint_is_merged_into_the_base_unet(layouts: dict, script: str) -> None:
    root = layouts["root"]
    folder = root / f"{script}-run" / "checkpoint-500"
    assert detect_layout(folder) == "lora" and snapshot_complete(folder)
    snap = load_snapshot(folder, base_model=root / "sd-base", load_text=False)
    base = load_snapshot(root / "sd-base", load_text=False)
    assert (snap.layout, snap.step) == ("lora", 500)
    assert isinstance(snap.parts.scheduler, PNDMScheduler)

    # every targeted layer is W + B @ A (scale 1: the scripts use lora_alpha = rank); the rest untouched
    lora = layouts["loras"][script]
    merged, original = snap.parts.unet.state_dict(), base.parts.unet.state_dict()
    targeted = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    assert len(targeted) == 4 * 2 * 4  # transformer blocks (down 1, mid 1, up 2) x (attn1, attn2) x 4 projections
    for name in targeted:
        expected = original[f"{name}.weight"] + lora[f"{name}.lora_B.weight"] @ lora[f"{name}.lora_A.weight"]
        torch.testing.assert_close(merged[f"{name}.weight"], expected)
    untouched = [k for k in original if not any(k.startswith(t + ".") for t in targeted)]
    assert all(torch.equal(merged[k], original[k]) for k in untouched)

    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 8, 32)
    with torch.no_grad():
        assert not torch.allclose(snap.parts.unet(x, t, text).sample, base.parts.unet(x, t, text).sample)

    lora_file = folder / "pytorch_lora_weights.safetensors"
    base_file = root / "sd-base" / "unet" / "diffusion_pytorch_model.safetensors"
    assert snap.weights_files == {
        "base_model/unet/diffusion_pytorch_model.safetensors": sha256_file(base_file),
        "pytorch_lora_weights.safetensors": sha256_file(lora_file),
    }
    assert snap.weights_sha256 == snapshot_sha256(folder, base_model=root / "sd-base") != sha256_file(lora_file)


def test_a_lora_saved_in_two_key_forms_is_one_snapshot(tmp_path: Path, layouts: dict) -> None:
    """train_text_to_image_lora.py: peft keys in checkpoints, diffusers keys in the final file."""
    base = layouts["root"] / "sd-base"
    run = tmp_path / "run"
    save_lora_checkpoint(run, 7, script="text_to_image_lora", seed=3)
    save_final_lora(run, seed=3)  # the same adapter, other bytes
    checkpoint, final = run / "checkpoint-7", run
    lora = "pytorch_lora_weights.safetensors"
    assert sha256_file(checkpoint / lora) != sha256_file(final / lora)
    same = snapshot_sha256(checkpoint, base_model=base)
    assert same == snapshot_sha256(final, base_model=base)
    assert load_snapshot(final, base_model=base, load_text=False).weights_sha256 == same
    save_final_lora(run, seed=4)  # another adapter
    assert snapshot_sha256(checkpoint, base_model=base) != snapshot_sha256(final, base_model=base)


def test_lora_needs_a_base_model(layouts: dict) -> None:
    folder = layouts["root"] / "text_to_image_lora-run" / "checkpoint-500"
    with pytest.raises(MemwatchError, match=r"checkpoint-500.*set 'base_model'"):
        load_snapshot(folder)
    with pytest.raises(MemwatchError, match=r"base_model .*no-such-pipeline.* not a local folder"):
        load_snapshot(folder, base_model=layouts["root"] / "no-such-pipeline")
    with pytest.raises(MemwatchError, match=r"no model_index.json"):
        load_snapshot(folder, base_model=layouts["root"] / "model")
    with pytest.raises(MemwatchError, match=r"LoRA folders have no EMA"):
        load_snapshot(folder, weights="ema", base_model=layouts["root"] / "sd-base")


def test_lora_for_another_architecture_is_refused() -> None:
    unet = tiny_cond_unet()
    with pytest.raises(MemwatchError, match=r"does not have"):
        merge_lora(unet, {"nope.to_q.lora_A.weight": torch.zeros(4, 32), "nope.to_q.lora_B.weight": torch.zeros(32, 4)})
    with pytest.raises(MemwatchError, match=r"not in a format"):
        merge_lora(unet, {"down_blocks.0.attentions.0.proj_in.hada_w1_a": torch.zeros(4, 32)})


def test_checkpoint_final_notes_is_not_a_checkpoint(layouts: dict) -> None:
    run = layouts["root"] / "ddpm-run"
    notes = run / "checkpoint-final-notes"
    assert [step for step, _ in list_checkpoints(run)] == [200, 400]
    assert detect_layout(notes) == "unknown" and not snapshot_complete(notes)
    with pytest.raises(MemwatchError, match=r"checkpoint-final-notes: not a diffusers pipeline"):
        load_snapshot(notes)


def test_truncated_safetensors_names_the_file(layouts: dict, tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-200"
    shutil.copytree(layouts["root"] / "ddpm-run" / "checkpoint-200", folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert not snapshot_complete(folder)
    with pytest.raises(MemwatchError, match=r"unet/diffusion_pytorch_model.safetensors: truncated"):
        load_snapshot(folder)
    assert load_snapshot(folder, weights="ema").step == 200  # the other copy is intact
    weights.write_bytes(b"\x10\x00")
    with pytest.raises(MemwatchError, match=r"diffusion_pytorch_model.safetensors: truncated"):
        check_safetensors(weights)
    weights.write_bytes((200).to_bytes(8, "little") + b"{" * 200)
    with pytest.raises(MemwatchError, match=r"diffusion_pytorch_model.safetensors: corrupt"):
        load_snapshot(folder)


def test_folders_without_weights_are_errors(layouts: dict, tmp_path: Path) -> None:
    empty = tmp_path / "checkpoint-7"
    empty.mkdir()
    assert detect_layout(empty) == "checkpoint" and not snapshot_complete(empty)
    with pytest.raises(MemwatchError, match=r"checkpoint-7: no unet/ weights \(found: nothing\)"):
        load_snapshot(empty)
    config_only = tmp_path / "checkpoint-8"
    (config_only / "unet").mkdir(parents=True)
    shutil.copy(layouts["root"] / "model" / "config.json", config_only / "unet")
    with pytest.raises(MemwatchError, match=r"checkpoint-8/unet: no weights"):
        load_snapshot(config_only)
    with pytest.raises(MemwatchError, match=r"no such folder"):
        load_snapshot(tmp_path / "missing")


def test_snapshot_complete_waits_for_every_file(layouts: dict, tmp_path: Path) -> None:
    source = layouts["root"] / "ddpm-run" / "checkpoint-200"
    folder = tmp_path / "checkpoint-200"
    shutil.copytree(source, folder)
    assert snapshot_complete(folder)
    (folder / "random_states_0.pkl").unlink()  # accelerate writes it after weights, optimizer, LR scheduler
    assert not snapshot_complete(folder)
    shutil.copy(source / "random_states_0.pkl", folder)
    (folder / "unet_ema" / "diffusion_pytorch_model.safetensors").unlink()  # EMA save begun, not finished
    assert not snapshot_complete(folder)

    lora = tmp_path / "checkpoint-500"
    shutil.copytree(layouts["root"] / "dreambooth_lora-run" / "checkpoint-500", lora)
    (lora / "random_states_0.pkl").unlink()
    assert not snapshot_complete(lora)

    pipe = tmp_path / "pipe"
    shutil.copytree(layouts["root"] / "ddpm-pipeline", pipe)
    shutil.rmtree(pipe / "scheduler")  # save_pretrained writes model_index.json first
    assert not snapshot_complete(pipe)


def test_full_stable_diffusion_pipeline_is_complete_when_every_component_is(layouts: dict, tmp_path: Path) -> None:
    sd = tmp_path / "sd"
    shutil.copytree(layouts["root"] / "sd-base", sd)
    assert snapshot_complete(sd)  # StableDiffusionPipeline.save_pretrained wrote every indexed component
    weights = (sd / "text_encoder" / "model.safetensors").read_bytes()
    (sd / "text_encoder" / "model.safetensors").unlink()
    assert not snapshot_complete(sd)  # text encoder config written, weights not yet
    (sd / "text_encoder" / "model.safetensors").write_bytes(weights[:-10])
    assert not snapshot_complete(sd)  # truncated
    (sd / "text_encoder" / "model.safetensors").write_bytes(weights)
    shutil.rmtree(sd / "tokenizer")
    assert not snapshot_complete(sd)


def test_stable_diffusion_pipeline_loads_its_text_components(layouts: dict) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = layouts["root"] / "sd-base"
    snap = load_snapshot(folder)
    assert snap.parts.text_to_image and isinstance(snap.parts.tokenizer, CLIPTokenizer)
    assert snap.parts.tokenizer.model_max_length == 16 and snap.parts.vae is not None
    saved = CLIPTextModel.from_pretrained(folder / "text_encoder")
    assert_same_weights(snap.parts.text_encoder, saved.state_dict())
    # only the denoiser's weights make up the snapshot's hash (the fixed text encoder and VAE do not)
    assert snap.weights_files == {
        "unet/diffusion_pytorch_model.safetensors": sha256_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    }


def test_scheduler_argument_accepts_a_folder_or_config(layouts: dict) -> None:
    folder = layouts["root"] / "ddpm-run" / "checkpoint-200"
    from_folder = load_snapshot(folder, scheduler=layouts["root"] / "sd-base")
    assert isinstance(from_folder.parts.scheduler, PNDMScheduler) and from_folder.notes == []
    config = json.loads((layouts["root"] / "sd-base" / "scheduler" / "scheduler_config.json").read_text())
    assert load_snapshot(folder, scheduler=config).parts.scheduler.config.beta_end == 0.012
    with pytest.raises(MemwatchError, match=r"no scheduler_config.json"):
        load_snapshot(folder, scheduler=layouts["root"] / "model")


@pytest.mark.skipif(HAS_TRANSFORMERS, reason="checks the message shown when transformers is missing")
def test_text_components_without_transformers_name_the_package(layouts: dict) -> None:
    folder = layouts["root"] / "sd-base"
    with pytest.raises(MemwatchError, match=r"sd-base: .*needs the 'transformers' package"):
        load_snapshot(folder)
    snap = load_snapshot(folder, load_text=False)
    assert snap.parts.text_to_image and snap.parts.text_encoder is None
