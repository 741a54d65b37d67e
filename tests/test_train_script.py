"""scripts/train_ddpm.py, the example users copy, runs under `accelerate launch` with two CPU processes."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from support.images import write_images
from support.models import accelerate_launch

from memwatch.snapshots.checkpoints import list_checkpoints
from memwatch.store import Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_ddpm_under_accelerate_launch_with_two_processes(tmp_path: Path) -> None:
    write_images(tmp_path / "train", list(range(8)), size=16)
    write_images(tmp_path / "holdout", list(range(50, 58)), size=16)
    cfg = tmp_path / "mw.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "run_name": "script",
                "probes": {
                    "membership": {"every": 4, "num_members": 8, "num_holdout": 8, "timesteps": [100, 400]},
                    "regurgitation": {"every": 6, "num_samples": 6, "inference_steps": 3, "batch_size": 4},
                    "forecast": {"every": 6},
                },
                "cadence": {"adaptive": False},  # the fixed cadence: the adaptive one depends on the wall clock
            }
        )
    )
    out = tmp_path / "run"
    cmd = accelerate_launch(
        2,
        29611,
        ROOT / "scripts" / "train_ddpm.py",
        "--train-data",
        str(tmp_path / "train"),
        "--holdout-data",
        str(tmp_path / "holdout"),
        "--output-dir",
        str(out),
        "--memwatch-config",
        str(cfg),
        "--steps",
        "12",
        "--resolution",
        "16",
        "--block-channels",
        "16",
        "32",
        "--batch-size",
        "2",
        "--checkpointing-steps",
        "6",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Store(out / "memwatch" / "memwatch.sqlite") as store:
        run = store.runs()[0]
        assert run["name"] == "script" and run["info"]["processes"] == 2  # two processes really trained
        probed = sorted({(m["step"], m["probe"]) for m in store.metrics(run["id"])})
    assert probed == [
        (4, "membership"),
        (6, "forecast"),
        (6, "regurgitation"),
        (8, "membership"),
        (12, "forecast"),
        (12, "membership"),
        (12, "regurgitation"),
    ]
    # Checkpoints as diffusers' train_unconditional.py writes them, and the final model.
    assert [s for s, _ in list_checkpoints(out)] == [6, 12]
    assert (out / "checkpoint-6" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()
    summary = json.loads((out / "memwatch" / "summary.json").read_text())
    assert summary["last_step"] == 12


def test_drop_at_risk_puts_the_scripts_batches_under_the_weights_intervention(tmp_path: Path) -> None:
    """``--drop-at-risk`` (``memwatch demo --drop-at-risk``): after the first warning the script's batches are
    drawn by ``ImageWeights``, whose change (or why there is none) is on the run's record."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_ddpm_under_test", ROOT / "scripts" / "train_ddpm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    write_images(tmp_path / "train", list(range(4)), size=16)
    cfg = tmp_path / "mw.yaml"
    warn_at_once = {"name": "test-warning", "type": "threshold", "metric": "regurgitation/ratio_min", "op": "<",
                    "value": 10, "severity": "warning", "message": "step {step}: a warning for the test"}  # fmt: skip
    cfg.write_text(yaml.safe_dump({
        "sampling": {"every": 2, "num_samples": 4, "inference_steps": 2, "batch_size": 4},
        "probes": {"membership": {"every": 0}}, "cadence": {"adaptive": False}, "rules": [warn_at_once],
    }))  # fmt: skip
    out = tmp_path / "run"
    summary = script.main(["--train-data", str(tmp_path / "train"), "--output-dir", str(out), "--memwatch-config",
                           str(cfg), "--steps", "4", "--resolution", "16", "--block-channels", "16", "32",
                           "--batch-size", "2", "--repeats", "2", "--drop-at-risk"])  # fmt: skip
    assert summary["first_alarm_step"] == 2
    with Store(out / "memwatch" / "memwatch.sqlite") as store:
        rows = store.interventions(store.runs()[0]["id"])
    assert rows and {r["kind"] for r in rows} == {"reweight"}
    assert rows[0]["step"] == 2 and rows[0]["detail"]["setting"]["examples"] == 8  # 4 images, repeated twice


def test_train_t2i_counts_the_unets_work_and_links_its_checkpoints_to_the_probes(tmp_path: Path) -> None:
    """scripts/train_t2i.py, the in-loop text-to-image example: the monitor is handed the pipeline's parts
    (``ModelParts``), counts the trained UNet's work for its budget (not the wall clock) and records each
    ``checkpoint-<step>`` as a sighting of the weights it probed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_t2i_under_test", ROOT / "scripts" / "train_t2i.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for sub, seeds in (("train", range(4)), ("holdout", range(50, 54))):
        paths = write_images(tmp_path / sub, list(seeds), size=32)
        rows = [json.dumps({"file_name": p.name, "text": f"a photo of thing {p.stem}"}) for p in paths]
        (tmp_path / sub / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "mw.yaml"
    cfg.write_text(yaml.safe_dump({
        "sampling": {"every": 4, "num_samples": 4, "inference_steps": 2, "batch_size": 4},
        "probes": {"membership": {"every": 4, "num_members": 4, "num_holdout": 4, "timesteps": [100, 400]},
                   "condnoise": {"every": 0}},
        "cadence": {"adaptive": False},
    }))  # fmt: skip
    out = tmp_path / "run"
    summary = script.main(["--base", str(ROOT / "assets" / "t2i" / "base"), "--train-data", str(tmp_path / "train"),
                           "--holdout-data", str(tmp_path / "holdout"), "--output-dir", str(out),
                           "--memwatch-config", str(cfg), "--steps", "8", "--batch-size", "2",
                           "--checkpointing-steps", "4", "--threads", "1"])  # fmt: skip
    assert summary["failed_probes"] == []
    assert summary["budget_unit"] == "work" and summary["probe_work_share"] > 0  # the UNet's passes were counted
    with Store(out / "memwatch" / "memwatch.sqlite") as store:
        run_id = store.runs()[0]["id"]
        probed = {r["snapshot_id"] for r in store.results(run_id) if r["status"] == "ok"}
        seen = {s["step"]: (s["id"] in probed, sorted((g["kind"], g["step"]) for g in s["sightings"]))
                for s in store.snapshots(run_id)}  # fmt: skip
    assert seen == {4: (True, [("checkpoint", 4), ("live", 4)]), 8: (True, [("checkpoint", 8), ("live", 8)])}
    assert (out / "checkpoint-8" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
