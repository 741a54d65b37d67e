#!/usr/bin/env python
"""Reliability check: ``memwatch probe`` killed with SIGKILL at random moments never loses an event or
duplicates a row.

Builds a run folder with several checkpoints of a small UNet2DModel (each with other weights), probes
a copy of it once without interruption, then probes the run again and again, killing the job with
SIGKILL at a random moment each time, and finally lets it finish. The final store must equal the
uninterrupted one: the same results, metrics and events, none twice, none missing, and SQLite's
integrity check clean. Prints a Markdown table for docs/reliability.md.

    python scripts/chaos_kill.py [--kills 24] [--seed 0]   (--kills: SIGKILLs that land in a running job)
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from diffusers import DDPMScheduler, UNet2DModel

from memwatch.store import Store
from memwatch.store.history import find_store, load_history

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = 8


def build_run(run_dir: Path) -> None:
    """``checkpoint-<step>/unet/`` folders as the diffusers scripts save them, each with other weights."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )  # fmt: skip
    for k in range(1, CHECKPOINTS + 1):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.01 * torch.randn_like(p))
        unet.save_pretrained(run_dir / f"checkpoint-{100 * k}" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(run_dir / "scheduler")


def fingerprint(run_dir: Path) -> dict:
    """What a store holds, without times and ids: results, metrics, events; and its integrity."""
    with Store(find_store(run_dir), readonly=True) as store:
        history = load_history(store)
        integrity = store.integrity()
    return {
        "results": sorted((r["step"], r["kind"], r["probe"], r["status"]) for r in history.results),
        "metrics": sorted(
            (m["step"], m["probe"], m["metric"], None if math.isnan(m["value"]) else round(m["value"], 9))
            for m in history.metric_rows
        ),
        "events": sorted((e["step"], e["rule"]) for e in history.events),
        "integrity": integrity,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = tmp / "memwatch.yaml"
        rules = [
            {"name": "every-probe", "type": "threshold", "metric": "membership/loss_member", "op": ">", "value": -1,
             "severity": "warning", "message": "step {step}", "source": "chaos test: fires at every probe"},
            {"name": "first", "type": "first", "metric": "regurgitation/num_samples", "op": ">", "value": 0,
             "severity": "info", "message": "step {step}", "source": "chaos test: fires once"},
        ]  # fmt: skip
        config.write_text(
            yaml.safe_dump(
                {
                    "reference": str(ROOT / "assets" / "demo" / "train"),
                    "holdout": str(ROOT / "assets" / "demo" / "holdout"),
                    "sampling": {"num_samples": 16, "inference_steps": 20, "batch_size": 16},
                    "probes": {
                        "membership": {"num_members": 8, "num_holdout": 16, "timesteps": [50, 150, 300, 500]},
                    },
                    "rules": rules,
                }
            )
        )
        clean, chaos = tmp / "clean", tmp / "chaos"
        build_run(clean)
        shutil.copytree(clean, chaos)
        cmd = [sys.executable, "-m", "memwatch.cli", "probe", "RUN", "--config", str(config)]

        def run(folder: Path) -> subprocess.Popen:
            return subprocess.Popen([folder if a == "RUN" else a for a in cmd], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip

        t0 = time.perf_counter()
        proc = run(clean)
        store = clean / "memwatch" / "memwatch.sqlite"
        while not store.exists() and proc.poll() is None:  # when the job has started up and opened its store
            time.sleep(0.05)
        startup_s = time.perf_counter() - t0
        assert proc.wait() == 0
        full_s = time.perf_counter() - t0
        expected = fingerprint(clean)

        rows, kills, attempt = [], 0, 0
        while kills < args.kills and attempt < 4 * args.kills:
            attempt += 1
            proc = run(chaos)
            delay = rng.uniform(startup_s, full_s)  # anywhere in the probing, from opening the store to the end
            time.sleep(delay)
            finished = proc.poll() is not None
            if not finished:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
            now = fingerprint(chaos) if (chaos / "memwatch" / "memwatch.sqlite").exists() else None
            partial = now["results"] if now else []
            dupes = len(partial) - len(set(partial))
            rows.append((attempt, delay, "finished first" if finished else "killed", len(partial), dupes,
                         now["integrity"] if now else "no store yet"))  # fmt: skip
            if finished:  # start over, so that the kills keep landing in unfinished jobs
                shutil.rmtree(chaos / "memwatch")
        assert run(chaos).wait() == 0
        final = fingerprint(chaos)

    print(f"\n`memwatch probe` on {CHECKPOINTS} checkpoints (uninterrupted: {full_s:.1f} s, of which {startup_s:.1f} s "
          f"starting up) started {attempt} times "
          f"and SIGKILLed at a random moment (seed {args.seed}): {kills} kills (a job that finished before its kill is "
          "started over with an empty store); then one run to the end.\n")  # fmt: skip
    print("| run | killed after (s) | outcome | results stored | duplicated | integrity |\n|---|---|---|---|---|---|")
    for k, delay, outcome, n, dupes, integrity in rows:
        print(f"| {k} | {delay:.2f} | {outcome} | {n} | {dupes} | {integrity} |")
    same = {key: final[key] == expected[key] for key in expected}
    print(f"\nfinal store equals the uninterrupted one: {same}")
    print(f"results {len(final['results'])}, metrics {len(final['metrics'])}, events {len(final['events'])}")
    if not all(same.values()):
        raise SystemExit("the final store differs from the uninterrupted run's")


if __name__ == "__main__":
    main()
