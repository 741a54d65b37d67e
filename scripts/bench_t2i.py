"""The text-to-image warning benchmark: memwatch beside the unmodified diffusers fine-tuning scripts.

``python scripts/bench_warnings.py --t2i ...`` runs this module (the same summary and JSON schema as the
unconditional benchmark). Each run fine-tunes the benchmark's small Stable Diffusion pipeline
(``assets/t2i/base``, built by ``scripts/make_t2i_base.py``: a trained VAE, a pretrained UNet, a CLIP text
encoder) on ``n`` captioned photo crops (``scripts/t2i_data.py``) with one of the official example scripts at
the pinned diffusers release, run **unmodified** by ``accelerate launch`` on one CPU process:

* ``lora``: ``examples/text_to_image/train_text_to_image_lora.py``;
* ``full``: ``examples/text_to_image/train_text_to_image.py`` (the whole UNet);
* ``loop``: this repository's ``scripts/train_t2i.py``, a plain accelerate loop that fine-tunes the whole UNet
  as ``full`` does (lr 1e-4, batch 4), with memwatch's monitor **in the loop** at its defaults.

``memwatch watch`` follows the diffusers scripts' runs beside them at memwatch's defaults (the user's config
names only the training and held-out folders and the base model) and probes each ``checkpoint-<step>`` folder
the script writes; in ``loop`` the monitor probes at the steps its cadence chooses, under its work budget, and
the checkpoints are only for the truth. The diffusers scripts are not in the diffusers package: ``--diffusers
PATH`` is a git checkout (or bare clone) of huggingface/diffusers that has the release tag; they are read from
it at that tag, never copied here.

The ground truth is measured after training on every checkpoint: 4 seeds for each training caption and each
of 8 held-out captions, sampled as memwatch samples text-to-image models (DDIM, guidance 7.5) with 20 steps,
decoded by the VAE and compared with the training images by d1/d2 (nearest / second-nearest, pixels):

* a sample copies when d1/d2 < 1/3 **and** d1 < ``COPY_D1`` (a third of the least distance between two
  training images): on a set of a few very different photos, d1/d2 alone counts every sample of the right
  subject and colour as a copy (the second-nearest image is far from everything), so the truth also asks for
  a sample that is closer to its image than a third of the way to any other training image could be;
* onset: the first checkpoint at which 5% of the training-caption samples copy;
* first copy: the first checkpoint with any copying sample; per caption, its first copy and the image it
  copies (its own image, or another one);
* first warning: the first event of severity warning or above in the watch's store; lead and misses as in the
  unconditional benchmark; a false alarm is a warning in a run without onset.

    python scripts/bench_warnings.py --t2i --quick --diffusers ~/src/diffusers --json runs/t2i_quick.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "assets" / "t2i" / "base"
#: the diffusers release whose example scripts are run (its check_min_version accepts the pinned diffusers)
TAG = "v0.40.0"
SCRIPTS = {
    "lora": "examples/text_to_image/train_text_to_image_lora.py",
    "full": "examples/text_to_image/train_text_to_image.py",
}
#: each script's own arguments beyond the data and the step budget: the settings of its README scaled to
#: a 32x32 model on one CPU core (batch 4, constant learning rate)
SCRIPT_ARGS = {
    "lora": ["--rank", "16", "--learning_rate", "1e-3"],
    "full": ["--learning_rate", "1e-4"],
}
#: the in-loop fine-tune, a plain accelerate loop in this repository (``full``'s settings)
LOOP_SCRIPT = ROOT / "scripts" / "train_t2i.py"
BATCH = 4
#: seconds without a new save after which the watch takes the run as ended. Its default, three times the
#: longest gap it saw between saves, counts the gaps as it sees them: a watch still busy with its first probe
#: (loading, embedding the references) sees several saves at once after a minute and then waits three minutes
#: after the script ends. The scripts here save every 5-15 s and never pause longer: 30 s is ample.
END_QUIET = 30
HOLDOUT_CAPTIONS = 8
TRUTH_SEEDS_PER_CAPTION = 4
TRUTH_STEPS = 20
TRUTH_MAX_CAPTIONS = 32  # larger sets: the truth samples their first 32 captions (4 seeds each)
TRUTH_SEED0 = 100_000  # apart from the watch's seeds (0, 1, ...): the truth does not reuse the monitor's samples
ONSET_FRACTION = 0.05
QUALITY_IMAGES = 64  # crops no run trains on, for the quality measure at the last checkpoint
QUALITY_SEED = 5_000
MEM_RATIO = 1 / 3
#: a copy lies within this normalised l2 (RMSE on [0, 1]) of its training image: a third of the least distance
#: between two training images (t2i_data.MIN_SET_DISTANCE), 3.5 x the VAE's median round-trip error (0.024)
COPY_D1 = 0.25 / 3


@dataclass(frozen=True)
class T2IRunSpec:
    """One fine-tune: which script, how many captioned images, which seed, how long."""

    script: str
    n: int
    seed: int
    steps: int
    checkpoint_every: int
    out: str
    diffusers: str
    base: str = str(BASE)
    watch: bool = True
    #: the truth samples the first this many training captions (4 seeds each) besides the held-out ones
    truth_captions: int = TRUTH_MAX_CAPTIONS
    #: torch threads for the truth's sampling (the machine's cores shared among the runs in parallel)
    threads: int = 1
    #: False: the script alone, for the cost comparison (no truth; its twin measures it)
    truth: bool = True
    #: > 0: every training caption becomes a list of this many (the original first, then variants with words
    #: added: ``memwatch.interventions.caption_variation``), from which the script draws one each time
    vary_captions: int = 0

    @property
    def name(self) -> str:
        vary = f"-vary{self.vary_captions}" if self.vary_captions else ""
        return f"{self.script}-n{self.n:04d}-s{self.seed}{vary}" + ("" if self.truth else "-alone")


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit status 2."""
    print(f"bench_warnings.py --t2i: {message}", file=sys.stderr)
    raise SystemExit(2)


def example_scripts(diffusers: str | Path, dest: Path) -> dict[str, Path]:
    """Read the example scripts at ``TAG`` from a diffusers git checkout into ``dest``; exit with one line
    saying what to do when the checkout or the tag is missing."""
    dest.mkdir(parents=True, exist_ok=True)
    found = {}
    for key, rel in SCRIPTS.items():
        done = subprocess.run(["git", "-C", str(diffusers), "show", f"{TAG}:{rel}"], capture_output=True, text=True)
        if done.returncode != 0:
            fail(f"--diffusers {diffusers}: no {rel} at tag {TAG} there; give a git clone of "
                 f"https://github.com/huggingface/diffusers (git clone --branch {TAG} URL PATH)")  # fmt: skip
        path = dest / Path(rel).name
        path.write_text(done.stdout)
        found[key] = path
    return found


def write_sets(spec: T2IRunSpec, run_dir: Path) -> tuple[Path, Path]:
    """The run's training and held-out captioned crops as imagefolders with ``metadata.jsonl``."""
    import numpy as np
    from PIL import Image
    from t2i_data import distinct_crops, load_photos

    from memwatch.interventions.caption_variation import caption_variants, vocabulary_of

    photos, rng = load_photos(), np.random.default_rng(spec.seed)
    train = distinct_crops(photos, rng, spec.n)
    holdout = distinct_crops(photos, rng, HOLDOUT_CAPTIONS, avoid=train)
    # the quality measure's images: never trained on, never the held-out captions the truth samples
    unseen = distinct_crops(photos, np.random.default_rng(QUALITY_SEED + spec.seed), QUALITY_IMAGES,
                            avoid=train + holdout)  # fmt: skip
    words = vocabulary_of([c.caption for c in train])
    folders = []
    for sub, crops in (("train", train), ("holdout", holdout), ("unseen", unseen)):
        folder = run_dir / "data" / sub
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w") as f:
            for i, crop in enumerate(crops):
                name = f"{i:04d}_{crop.source}.png"
                Image.fromarray(crop.image).save(folder / name)
                text: str | list[str] = crop.caption
                if sub == "train" and spec.vary_captions:
                    text = caption_variants(crop.caption, words, count=spec.vary_captions, seed=spec.seed)
                f.write(json.dumps({"file_name": name, "text": text}) + "\n")
        folders.append(folder)
    return folders[0], folders[1]


def train_command(spec: T2IRunSpec, script: Path, train_dir: Path, out_dir: Path) -> list[str]:
    """``accelerate launch`` of the unmodified script on one CPU process (``loop``: the in-loop script, the
    monitor in it at memwatch's defaults, the run's config naming the held-out set)."""
    if spec.script == "loop":
        holdout = train_dir.parent / "holdout"
        return [
            sys.executable, str(LOOP_SCRIPT), "--base", spec.base, "--train-data", str(train_dir),
            "--holdout-data", str(holdout), "--output-dir", str(out_dir), "--steps", str(spec.steps),
            "--checkpointing-steps", str(spec.checkpoint_every), "--batch-size", str(BATCH), "--lr", "1e-4",
            "--seed", str(spec.seed), "--threads", "1",
            *(["--memwatch-config", str(out_dir.parent / "memwatch.yaml")] if spec.watch else []),
        ]  # fmt: skip
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
        "--pretrained_model_name_or_path", spec.base, "--train_data_dir", str(train_dir), "--caption_column", "text",
        "--resolution", "32", "--train_batch_size", str(BATCH), "--max_train_steps", str(spec.steps),
        "--checkpointing_steps", str(spec.checkpoint_every), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--seed", str(spec.seed), "--dataloader_num_workers", "0", "--output_dir", str(out_dir),
        *SCRIPT_ARGS[spec.script],
    ]  # fmt: skip


def run_one(spec: T2IRunSpec) -> dict[str, Any]:
    """Fine-tune with ``memwatch watch`` beside the script, then measure the truth on every checkpoint."""
    run_dir = Path(spec.out) / spec.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    train_dir, holdout_dir = write_sets(spec, run_dir)
    scripts = example_scripts(spec.diffusers, run_dir / "scripts")
    out_dir = run_dir / "train"
    config = run_dir / "memwatch.yaml"
    # the config a user writes: their data and base model, every other setting memwatch's default
    lines = [f"run_name: {spec.name}", f"reference: {train_dir}", f"holdout: {holdout_dir}", f"base_model: {spec.base}"]
    config.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    logs = run_dir / "logs"
    logs.mkdir()
    watcher = None
    if spec.watch and spec.script != "loop":  # the in-loop monitor needs no watch beside it
        watch = [sys.executable, "-m", "memwatch.cli", "watch", str(out_dir), "--config", str(config),
                 "--quiet-period", "2", "--poll", "1", "--idle-timeout", "600",
                 "--end-quiet", str(END_QUIET)]  # fmt: skip
        watcher = subprocess.Popen(watch, env=env, stdout=open(logs / "watch.log", "w"), stderr=subprocess.STDOUT)
    t0 = time.perf_counter()
    with open(logs / "train.log", "w") as log:
        command = train_command(spec, scripts.get(spec.script, LOOP_SCRIPT), train_dir, out_dir)
        trainer = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        code, train_cpu = wait_cpu(trainer)
    train_s = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"{spec.name}: the training script failed ({code}); see {logs / 'train.log'}")
    watch_s = watch_cpu = None
    if watcher is not None:
        _, watch_cpu = wait_cpu(watcher)
        watch_s = time.perf_counter() - t0
    from bench_warnings import provenance

    if not spec.truth:  # the cost twin: how fast the script trains without the watch beside it
        record = {**asdict(spec), "train_s": round(train_s, 1), "train_cpu_s": round(train_cpu, 1),
                  "measured": provenance()}  # fmt: skip
        (run_dir / "alone.json").write_text(json.dumps(record) + "\n")
        return record
    t1 = time.perf_counter()
    truth = truth_over_checkpoints(out_dir, train_dir, holdout_dir, Path(spec.base), spec.truth_captions, spec.threads)
    quality = final_quality(out_dir, run_dir / "data" / "unseen", Path(spec.base))

    record = {
        **asdict(spec),
        "family": "photo crops, captioned",
        "steps_trained": spec.steps,
        "onset_step": truth["onset_step"],
        "first_copy_step": truth["first_copy_step"],
        "onset_ratio_only_step": truth["onset_ratio_only_step"],
        "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu, 1),
        "watch_done_s": None if watch_s is None else round(watch_s, 1),
        # the watch's CPU time (all its threads) against the training script's: what probing beside costs
        "watch_cpu_s": None if watch_cpu is None else round(watch_cpu, 1),
        "truth_s": round(time.perf_counter() - t1, 1),
        "quality": quality,
        "measured": provenance(),
    }
    (run_dir / "truth.json").write_text(json.dumps({**record, "truth": truth}) + "\n")
    return record


def wait_cpu(process: subprocess.Popen) -> tuple[int, float]:
    """Wait for a child process; its exit status and CPU time (user + system, all its threads)."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_utime + usage.ru_stime


def truth_over_checkpoints(
    out_dir: Path, train_dir: Path, holdout_dir: Path, base: Path, max_captions: int, threads: int
) -> dict[str, Any]:
    """Dense ground truth on the base model (step 0) and every checkpoint of the run: 4 seeds for each of the
    first ``max_captions`` training captions and each held-out caption, sampled with ``threads`` torch threads."""
    import torch

    from memwatch.data.reference_index import ReferenceIndex
    from memwatch.data.refset import load_reference_set
    from memwatch.embedders.pixel import PixelEmbedder
    from memwatch.probes.regurgitation import RegurgitationConfig, regurgitation_probe
    from memwatch.sampling.text_to_image import generate_text_to_image_samples
    from memwatch.snapshots import load_snapshot
    from memwatch.snapshots.checkpoints import list_checkpoints

    torch.set_num_threads(threads)
    refs = load_reference_set(str(train_dir))
    index = ReferenceIndex(refs, PixelEmbedder(32), None)
    # the first max_captions training captions (the set is in random draw order): a sample of a large set
    captions = [caption for _, caption in metadata_rows(train_dir)][:max_captions]
    held = [caption for _, caption in metadata_rows(holdout_dir)]
    k = TRUTH_SEEDS_PER_CAPTION
    prompts = [c for c in captions + held for _ in range(k)]
    seeds = [TRUTH_SEED0 + i for i in range(len(prompts))]
    members = len(captions) * k
    ids = [it.id for it in refs.items][: len(captions)]  # files sort as the set was drawn: 0000_..., 0001_...
    truth: dict[str, Any] = {"steps": [], "ratios": [], "nn1": [], "d1": [], "mem_fraction": [],
                             "holdout_mem_fraction": [], "captions": captions, "holdout_captions": held,
                             "image_ids": ids, "seeds_per_caption": k}  # fmt: skip
    for step, path in [(0, base), *list_checkpoints(out_dir)]:
        snap = load_snapshot(str(path), base_model=str(base))
        images = generate_text_to_image_samples(snap, prompts, seeds, num_inference_steps=TRUTH_STEPS, batch_size=64)
        matches = regurgitation_probe(images, index, RegurgitationConfig(), seeds=seeds).matches
        copies = [is_copy(m) for m in matches]
        truth["steps"].append(step)
        truth["ratios"].append([round(m["ratio"], 5) for m in matches])
        truth["nn1"].append([m["nn1"] for m in matches])
        truth["d1"].append([round(m["d1"], 5) for m in matches])
        truth["mem_fraction"].append(sum(copies[:members]) / members)
        truth["holdout_mem_fraction"].append(sum(copies[members:]) / max(1, len(held) * k))
    truth.update(onsets(truth))
    truth["per_caption"] = per_caption(truth)
    return truth


def metadata_rows(folder: Path) -> list[tuple[str, str]]:
    """``(file_name, caption)`` of a set's ``metadata.jsonl``, the caption as the script reads it outside
    training (the first of a list of varied captions)."""
    from memwatch.data.containers import script_caption

    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    return [(r["file_name"], script_caption(r["text"])) for r in rows]


def final_quality(out_dir: Path, unseen_dir: Path, base: Path) -> dict[str, Any] | None:
    """Quality at the run's last checkpoint without downloaded weights, on ``QUALITY_IMAGES`` crops no run
    trains on: the kernel inception distance's estimator (``bench_warnings.kernel_distance``) between one
    sample per crop's caption (seed 0, DDIM 20 steps, guidance 7.5) and the crops, in pixels; and the
    held-out denoising loss of the crops with their captions (memwatch's membership losses)."""
    import numpy as np
    import torch
    from bench_warnings import kernel_distance
    from PIL import Image

    from memwatch.embedders.pixel import PixelEmbedder
    from memwatch.probes.membership import MembershipConfig, membership_probe
    from memwatch.sampling.text_to_image import encode_images, encode_prompts, generate_text_to_image_samples
    from memwatch.snapshots import load_snapshot
    from memwatch.snapshots.checkpoints import list_checkpoints

    checkpoints = list_checkpoints(out_dir)
    if not checkpoints or not (unseen_dir / "metadata.jsonl").exists():
        return None
    step, path = checkpoints[-1]
    rows = metadata_rows(unseen_dir)
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(unseen_dir / name).convert("RGB"), np.float32) / 255)
                          .permute(2, 0, 1) for name, _ in rows])  # fmt: skip
    captions = [c for _, c in rows]
    snap = load_snapshot(str(path), base_model=str(base))
    parts = snap.parts
    samples = generate_text_to_image_samples(snap, captions, list(range(len(captions))),
                                             num_inference_steps=TRUTH_STEPS, batch_size=64)  # fmt: skip
    embed = PixelEmbedder(32)
    kid = kernel_distance(embed.embed(samples), embed.embed(images))
    cond = encode_prompts(parts.tokenizer, parts.text_encoder, captions)
    losses = membership_probe(parts.unet, parts.scheduler, images, None, member_ids=[n for n, _ in rows],
                              holdout_ids=[], timesteps=MembershipConfig().timesteps, batch_size=64,
                              member_conditioning=cond, encode=lambda x: encode_images(parts.vae, x))  # fmt: skip
    return {"step": step, "kid": round(kid, 6), "holdout_loss": round(losses.metrics["loss_member"], 6),
            "images": len(rows)}  # fmt: skip


def onsets(truth: dict[str, Any]) -> dict[str, Any]:
    """Onset and first copy from the truth's per-sample rows, counting only the captions the base model does
    not copy already: a caption whose samples pass as a copy at step 0 (before any fine-tuning: a near-uniform
    training crop the base paints from its caption alone) says nothing about what the fine-tune memorized.
    Its samples stay in the denominator. Also the onset by d1/d2 alone, for comparison.

    Returns:
        ``onset_step``, ``first_copy_step``, ``onset_ratio_only_step`` and ``base_copied_captions``.
    """
    k, captions = truth["seeds_per_caption"], truth["captions"]
    members = len(captions) * k
    copied = [[is_copy({"ratio": r, "d1": d}) for r, d in zip(rs, ds, strict=True)]
              for rs, ds in zip(truth["ratios"], truth["d1"], strict=True)]  # fmt: skip
    at_base = copied[0] if truth["steps"] and truth["steps"][0] == 0 else [False] * members
    base = {c for c in range(len(captions)) if any(at_base[c * k : c * k + k])}
    counted = [i for i in range(members) if i // k not in base]
    out: dict[str, Any] = {"onset_step": None, "first_copy_step": None, "onset_ratio_only_step": None,
                           "base_copied_captions": [captions[c] for c in sorted(base)]}  # fmt: skip
    for step, row, ratios in zip(truth["steps"], copied, truth["ratios"], strict=True):
        hits = sum(row[i] for i in counted)
        if out["first_copy_step"] is None and hits:
            out["first_copy_step"] = step
        if out["onset_step"] is None and hits >= ONSET_FRACTION * members:
            out["onset_step"] = step
        near = sum(ratios[i] < MEM_RATIO for i in counted)
        if out["onset_ratio_only_step"] is None and near >= ONSET_FRACTION * members:
            out["onset_ratio_only_step"] = step
    return out


def is_copy(match: dict[str, Any]) -> bool:
    """The truth's copy: d1/d2 below 1/3 and d1 below ``COPY_D1``."""
    return match["ratio"] < MEM_RATIO and match["d1"] < COPY_D1


def per_caption(truth: dict[str, Any]) -> list[dict[str, Any]]:
    """Per training caption: the first step at which one of its samples copies, and which image it copies
    (its own image or another training image)."""
    k, ids = truth["seeds_per_caption"], truth["image_ids"]
    rows = []
    for c, caption in enumerate(truth["captions"]):
        first, copied = None, None
        for ratios, nn1, d1, step in zip(truth["ratios"], truth["nn1"], truth["d1"], truth["steps"], strict=True):
            hits = [nn1[i] for i in range(c * k, c * k + k) if is_copy({"ratio": ratios[i], "d1": d1[i]})]
            if hits:
                first, copied = step, hits[0]
                break
        rows.append({"caption": caption, "image": ids[c], "first_copy_step": first, "copies": copied,
                     "own_image": None if copied is None else copied == ids[c]})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------- analysis


def analyse_run(run_dir: Path) -> dict[str, Any]:
    """One run's row: the unconditional benchmark's columns, plus the script and the captions that copied."""
    from bench_warnings import warnings_of

    data = json.loads((run_dir / "truth.json").read_text())
    data.update(onsets(data["truth"]))  # one definition for truth files of every age
    warnings = warnings_of(run_dir / "train")
    first = warnings[0] if warnings else None
    onset = data["onset_step"]
    copied = [c for c in data["truth"]["per_caption"] if c["first_copy_step"] is not None]
    row = {
        "script": data["script"], "n": data["n"], "seed": data["seed"], "family": data["family"],
        "steps_trained": data["steps_trained"], "onset_step": onset, "first_copy_step": data["first_copy_step"],
        "onset_ratio_only_step": data.get("onset_ratio_only_step"),
        "first_warning_step": first["step"] if first else None, "first_warning_rule": first["rule"] if first else None,
        "lead_steps": None, "lead_fraction": None, "train_s": data["train_s"], "watch_done_s": data["watch_done_s"],
        "truth_s": data.get("truth_s"),
        "train_cpu_s": data.get("train_cpu_s"), "watch_cpu_s": data.get("watch_cpu_s"),
        "captions_copied": len(copied), "captions_measured": len(data["truth"]["per_caption"]),
        "captions_copying_own_image": sum(bool(c["own_image"]) for c in copied),
        "captions_copied_by_the_base": len(data["base_copied_captions"]),
        "vary_captions": data.get("vary_captions", 0),
        **{k: (data.get("quality") or {}).get(k) for k in ("kid", "holdout_loss")},
        "measured": data.get("measured"),
    }  # fmt: skip
    if onset is not None and first is not None:
        row["lead_steps"] = onset - first["step"]
        row["lead_fraction"] = round((onset - first["step"]) / onset, 4) if onset else None
    return row


def _key(row: dict[str, Any]) -> tuple[str, int, int, int]:
    return row["script"], row["n"], row["seed"], row.get("vary_captions") or 0


def variation_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Varied captions against the same fine-tune with its captions as written (same script, n and seed):
    per pair the onset delay (onset with / without; an onset avoided within the budget counts apart) and the
    quality change at the last checkpoint (holdout loss ratio - 1, KID difference)."""
    import statistics

    plain = {_key(r)[:3]: r for r in rows if not r.get("vary_captions")}
    pairs = []
    for r in rows:
        b = plain.get(_key(r)[:3])
        if not r.get("vary_captions") or b is None:
            continue
        pairs.append({
            "script": r["script"], "n": r["n"], "seed": r["seed"], "vary_captions": r["vary_captions"],
            "onset_without": b["onset_step"], "onset_with": r["onset_step"],
            "delay": (r["onset_step"] / b["onset_step"]) if r["onset_step"] and b["onset_step"] else None,
            "avoided": b["onset_step"] is not None and r["onset_step"] is None,
            "holdout_loss_cost": (r["holdout_loss"] / b["holdout_loss"] - 1) if r["holdout_loss"] and b["holdout_loss"]
            else None,
            "kid_change": (r["kid"] - b["kid"]) if r["kid"] is not None and b["kid"] is not None else None,
        })  # fmt: skip

    def med(key: str) -> float | None:
        values = [p[key] for p in pairs if p[key] is not None]
        return round(statistics.median(values), 4) if values else None

    return {"pairs": pairs, "median_delay": med("delay"), "avoided": sum(p["avoided"] for p in pairs),
            "with_onset_without": sum(p["onset_without"] is not None for p in pairs),
            "median_holdout_loss_cost": med("holdout_loss_cost"), "median_kid_change": med("kid_change")}  # fmt: skip


def cost_summary(rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """What the watch beside the script cost: its CPU time against the script's (every watched run), and the
    script's training time with the watch beside it against its twin alone (runs made with ``--cost``)."""
    import statistics

    shares = [r["watch_cpu_s"] / r["train_cpu_s"] for r in rows if r.get("watch_cpu_s") and r.get("train_cpu_s")]
    pairs = []
    for r in rows:
        alone = out / f"{r['script']}-n{r['n']:04d}-s{r['seed']}-alone" / "alone.json"
        if alone.is_file() and r.get("train_s"):
            twin = json.loads(alone.read_text())
            pairs.append({
                "script": r["script"], "n": r["n"], "seed": r["seed"], "train_s_watched": r["train_s"],
                "train_s_alone": twin["train_s"], "slowdown": round(r["train_s"] / twin["train_s"] - 1, 4),
                "train_cpu_s_watched": r.get("train_cpu_s"), "train_cpu_s_alone": twin["train_cpu_s"],
            })  # fmt: skip
    return {
        "median_watch_cpu_share": round(statistics.median(shares), 4) if shares else None,
        "side_by_side": pairs,
        "median_slowdown": round(statistics.median(p["slowdown"] for p in pairs), 4) if pairs else None,
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| script | n | seed | onset | first copy | onset by d1/d2 alone | captions copied (own image) "
        "| first warning (rule) | lead / onset |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["script"], r["n"], r["seed"])):
        warn = "-" if r["first_warning_step"] is None else f"{r['first_warning_step']} ({r['first_warning_rule']})"
        frac = "-" if r["lead_fraction"] is None else f"{r['lead_fraction']:.0%}"
        lines.append(
            f"| {r['script']} | {r['n']} | {r['seed']} | {_step(r['onset_step'])} | {_step(r['first_copy_step'])} "
            f"| {_step(r.get('onset_ratio_only_step'))} | {r['captions_copied']} of {r['captions_measured']} "
            f"({r['captions_copying_own_image']}) | {warn} | {frac} |"
        )
    return "\n".join(lines)


def _step(step: int | None) -> str:
    return "none" if step is None else str(step)


# ---------------------------------------------------------------------------------------------- main

#: the first sweep (2026-12-07, docs/benchmarks.md): the full fine-tune at learning rate 1e-4 copies 4-8 images
#: within a few hundred steps; LoRA (rank 16, 1e-3 or 5e-3) gave no clean onset here and is not in it yet
FULL = {"scripts": ["full"], "sizes": [4, 8, 64], "seeds": [0, 1], "steps": 1500, "every": 50, "truth_captions": 32}
#: 12 min 11 s on 2 cores (docs/benchmarks.md; goal 15): the dense truth is the cost (0.36 s a sample on one
#: core, 0.21 s on two), so the control's truth measures 16 of its captions and the budget is 600 steps (the
#: memorizing sizes copy within 300)
QUICK = {"scripts": ["full"], "sizes": [4, 64], "seeds": [0], "steps": 600, "every": 50, "truth_captions": 16}


def main(argv: list[str] | None = None) -> int:
    """``bench_warnings.py --t2i [options]``."""
    import argparse
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from bench_warnings import _nan, summarise

    p = argparse.ArgumentParser(prog="bench_warnings.py --t2i", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help=f"{QUICK} (<= 15 min on 2 cores)")
    p.add_argument("--scripts", nargs="+", choices=[*sorted(SCRIPTS), "loop"],
                   help="which example scripts ('loop': the in-loop monitor in scripts/train_t2i.py)")  # fmt: skip
    p.add_argument("--sizes", type=int, nargs="+", help="training-set sizes")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds for every size")
    p.add_argument("--steps", type=int, help="step budget per run")
    p.add_argument("--checkpoint-every", type=int, help="the scripts' --checkpointing_steps")
    p.add_argument("--diffusers", default=os.environ.get("MEMWATCH_DIFFUSERS_GIT"),
                   help=f"git clone of huggingface/diffusers with tag {TAG} (or $MEMWATCH_DIFFUSERS_GIT)")  # fmt: skip
    p.add_argument("--base", default=str(BASE), help="the pipeline folder the scripts fine-tune")
    p.add_argument("--out", default="runs/bench_t2i", help="run folders go here")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each: the script and its watch)")
    p.add_argument("--no-watch", action="store_true", help="ground truth only (for tuning)")
    p.add_argument(
        "--cost",
        action="store_true",
        help="also run each fine-tune without the watch, alternated with its watched twin (--jobs 1)",
    )
    p.add_argument("--truth-captions", type=int, help="training captions the truth samples (4 seeds each)")
    p.add_argument(
        "--vary-captions",
        type=int,
        nargs="+",
        default=[0],
        metavar="K",
        help="train every caption as a list of K varied captions (0: as written); '0 8' runs each fine-tune both "
        "ways and compares them (caption variation, issue 25)",
    )
    p.add_argument("--analyse", action="store_true", help="only re-read the run folders under --out")
    p.add_argument("--json", default=None, help="write runs and summary here")
    p.add_argument("--merge", action="store_true", help="keep the runs already in --json not measured now")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    plan = {
        "scripts": args.scripts or preset["scripts"], "sizes": args.sizes or preset["sizes"],
        "seeds": args.seeds or preset["seeds"], "steps": args.steps or preset["steps"],
        "every": args.checkpoint_every or preset["every"],
        "truth_captions": args.truth_captions or preset["truth_captions"],
    }  # fmt: skip
    out = Path(args.out)
    t0 = time.perf_counter()
    if not args.analyse:
        if not args.diffusers:
            fail(f"give --diffusers PATH, a git clone of https://github.com/huggingface/diffusers with tag {TAG}")
        example_scripts(args.diffusers, out / "scripts")  # fails in one line before any training
        if args.cost and args.jobs != 1:
            fail("--cost compares training times side by side: run it with --jobs 1")
        if not (Path(args.base) / "model_index.json").is_file():
            fail(f"--base {args.base}: no pipeline there; build the benchmark's with python scripts/make_t2i_base.py")
        out.mkdir(parents=True, exist_ok=True)
        threads = max(1, (os.cpu_count() or 1) // args.jobs)  # the truth's sampling uses the cores left idle
        specs = [
            T2IRunSpec(
                s,
                n,
                seed,
                plan["steps"],
                plan["every"],
                str(out),
                args.diffusers,
                args.base,
                not args.no_watch,
                plan["truth_captions"],
                threads,
                vary_captions=vary,
            )  # fmt: skip
            for s in plan["scripts"]
            for n in sorted(plan["sizes"], reverse=True)
            for seed in plan["seeds"]
            for vary in args.vary_captions
        ]
        if args.cost:  # each run's twin without the watch, before or after it in turn: drift favours neither
            twins = [replace(spec, watch=False, truth=False) for spec in specs]
            pairs = enumerate(zip(specs, twins, strict=True))
            specs = [x for i, pair in pairs for x in (pair if i % 2 else pair[::-1])]
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
            for record in pool.map(run_one, specs):
                name = f"{record['script']} n {record['n']} seed {record['seed']}"
                if not record["truth"]:
                    print(f"{name} without the watch: training {record['train_s']} s")
                    continue
                print(f"{name}: onset {record['onset_step']}, first copy {record['first_copy_step']} "
                      f"(training {record['train_s']} s, truth {record['truth_s']} s)")  # fmt: skip
    wanted = {(s, n, seed, vary) for s in plan["scripts"] for n in plan["sizes"] for seed in plan["seeds"]
              for vary in args.vary_captions}  # fmt: skip
    rows = [analyse_run(d) for d in sorted(out.iterdir()) if (d / "truth.json").is_file()]
    rows = [r for r in rows if _key(r) in wanted]
    if args.merge and args.json and Path(args.json).is_file():
        mine = {_key(r) for r in rows}
        rows += [r for r in json.loads(Path(args.json).read_text())["runs"] if _key(r) not in mine]
    varied = [r for r in rows if r.get("vary_captions")]
    summary = summarise([r for r in rows if not r.get("vary_captions")])
    if varied:
        summary["caption_variation"] = variation_summary(rows)
    summary["cost"] = cost_summary(rows, out)
    summary["measured_with"] = sorted({(r.get("measured") or {}).get("memwatch_src", "unknown") for r in rows})
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(markdown_table(rows))
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"runs": rows, "summary": summary}, indent=2, default=_nan) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
