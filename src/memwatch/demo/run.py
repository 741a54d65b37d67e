"""``memwatch demo``: train a small DDPM on the bundled images and watch it start to memorize.

The demo runs ``scripts/train_ddpm.py`` (the copyable example script, with memwatch added in three
lines) on ``assets/demo/train``, then draws the curves and prints a summary. ``--control`` trains
the same model for the same number of steps on the much larger ``assets/demo/control`` set, where
it does not have the capacity to copy: no regurgitation warning fires. ``--faces`` trains on
augmented crops of the portraits in ``assets/faces`` (:mod:`memwatch.demo.faces`) with the identity
probe on (dlib, offline): it shows when the model begins to reproduce the people, and to blend them.

Inside the source checkout they come from ``assets/demo``, ``scripts/train_ddpm.py`` and
``configs/demo.yaml`` and runs go to ``runs/``; an installed package carries the same files
(``memwatch/demo/assets``, ``memwatch/demo/train_ddpm.py``, ``memwatch/configs/demo.yaml``; in the checkout
these are links to the originals) and writes ``runs/`` in the current folder.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memwatch.errors import MemwatchError
from memwatch.snapshots.checkpoints import last_clean_checkpoint
from memwatch.store import OUTPUT_SUBDIR


@dataclass
class DemoFiles:
    """Where the demo's images, training script and config are, and where its runs go."""

    assets: Path
    script: Path
    config: Path
    runs: Path

    @property
    def faces(self) -> Path:
        """The portraits of ``memwatch demo --faces`` (``assets/faces``, or ``demo/portraits`` in a package)."""
        return self.assets.parent / "faces" if self.assets.name == "demo" else self.assets.parent / "portraits"

    @property
    def faces_config(self) -> Path:
        return self.config.parent / "demo_faces.yaml"


def demo_files(start: Path | None = None) -> DemoFiles:
    """The source checkout's files when run inside one, else the copies installed with the package.

    Raises:
        MemwatchError: neither is there (an installation made without its package data).
    """
    try:
        root = find_checkout(start)
        return DemoFiles(root / "assets" / "demo", root / "scripts" / "train_ddpm.py", root / "configs" / "demo.yaml",
                         root / "runs")  # fmt: skip
    except MemwatchError:
        pass
    # memwatch/demo holds assets/, portraits/ and train_ddpm.py (links to the originals in a checkout)
    here = Path(__file__).resolve().parent
    files = DemoFiles(here / "assets", here / "train_ddpm.py", here.parent / "configs" / "demo.yaml",
                      (start or Path.cwd()) / "runs")  # fmt: skip
    if not ((files.assets / "train").is_dir() and files.script.is_file()):
        raise MemwatchError(
            f"memwatch demo needs its images and training script, which this installation lacks ({files.assets}): "
            "install memwatch from a wheel or source checkout that includes them, or run bash scripts/demo.sh in "
            "the repository"
        )
    return files


def find_checkout(start: Path | None = None) -> Path:
    """The memwatch source checkout: the first folder holding ``scripts/train_ddpm.py`` and ``assets/demo``."""
    candidates = [start or Path.cwd(), Path(__file__).resolve()]
    for base in candidates:
        for folder in [base, *base.parents]:
            if (folder / "scripts" / "train_ddpm.py").is_file() and (folder / "assets" / "demo").is_dir():
                return folder
    raise MemwatchError(
        "memwatch demo needs the memwatch source checkout (scripts/train_ddpm.py and assets/demo/): "
        "run it from inside the repository"
    )


def run_demo(
    *,
    control: bool = False,
    faces: bool = False,
    steps: int | None = None,
    output_dir: str | Path | None = None,
    drop_at_risk: bool = False,
) -> dict:
    """Train, probe, draw curves; return the monitor's summary plus the curve paths.

    Args:
        control: train on the large control set instead (no memorization expected).
        faces: train on face crops of the bundled portraits with the identity probe on (needs
            ``memwatch[faces]``).
        steps: optimizer steps (default: the demo config's).
        output_dir: default ``runs/demo`` (``runs/demo-control``, ``runs/demo-faces``, ``runs/demo-drop``).
        drop_at_risk: the intervention ``ImageWeights``: after the first warning, batches leave out the images
            memwatch names at risk (the training script's ``--drop-at-risk``).

    Example:
        >>> summary = run_demo(steps=200)  # doctest: +SKIP
        >>> summary["last_clean_step"]  # doctest: +SKIP
        1200
    """
    from memwatch.views.curves import write_curves

    if control and faces:
        raise MemwatchError("--control and --faces are two different demos: give one of them")
    files = demo_files()
    name = "demo-faces" if faces else "demo-control" if control else "demo-drop" if drop_at_risk else "demo"
    out = Path(output_dir) if output_dir else files.runs / name
    if (out / OUTPUT_SUBDIR).is_dir():
        shutil.rmtree(out)  # a demo starts fresh: only a folder that an earlier demo wrote is removed
    if faces:
        from memwatch.demo.faces import make_face_training_set

        data = out / "data" / "train"
        make_face_training_set(files.faces, data, resolution=FACES_RESOLUTION, crops_per_photo=FACES_CROPS)
        argv = ["--train-data", str(data), "--memwatch-config", str(files.faces_config),
                "--steps", str(steps or FACES_STEPS), *FACES_TRAINING_ARGS]  # fmt: skip
    else:
        data = files.assets / ("control" if control else "train")
        argv = ["--train-data", str(data), "--holdout-data", str(files.assets / "holdout"), "--memwatch-config",
                str(files.config), "--steps", str(steps or DEMO_STEPS), *DEMO_TRAINING_ARGS]  # fmt: skip
    script = _load_script(files.script)
    summary: dict[str, Any] = script.main([*argv, "--output-dir", str(out), *(["--drop-at-risk"] * drop_at_risk)])
    summary["curves"] = {k: str(v) for k, v in write_curves(out / OUTPUT_SUBDIR).items()}
    ckpt = last_clean_checkpoint(out, summary["last_clean_step"])
    summary["last_clean_checkpoint"] = str(ckpt) if ckpt else None
    if faces:
        summary["people"] = people_leaked(Path(summary["store"]))
        summary["blend_paths"] = blend_paths(Path(summary["store"]))
    summary.update(sign_demo_report(out, files.runs / DEMO_KEY))
    return summary


#: The demo's signing key (made on first use, kept for the next demos), relative to the runs folder: outside
#: every run folder, so no run carries a private key.
DEMO_KEY = Path("demo-key") / "memwatch-demo.key"


def sign_demo_report(out: Path, key: Path) -> dict[str, str]:
    """Write the run's report (HTML and JSON) and its signed attestation, with the demo's own key pair; returns
    their paths (``report``, ``report_json``, ``attestation``, ``public_key``).

    A key is made for the demo: a real audit is signed with a key its team keeps (``memwatch keygen``).
    Without ``cryptography`` (``memwatch[sign]``) the report is written unsigned.
    """
    from memwatch.attest.keys import NEEDS, generate_key_pair
    from memwatch.attest.statement import sign_report
    from memwatch.views.report import write_report

    folder = out / OUTPUT_SUBDIR
    public = key.with_name(key.name + ".pub")
    files = {"html_out": folder / "report.html", "json_out": folder / "report.json"}
    try:
        if not (key.is_file() and public.is_file()):
            generate_key_pair(key, force=True)
        paths = sign_report(out, key, **files)
    except MemwatchError as e:
        if str(e) != NEEDS:
            raise
        paths = write_report(out, **files).paths
    written = {"report": str(paths["html"]), "report_json": str(paths["json"])}
    if "attestation" in paths:
        written |= {"attestation": str(paths["attestation"]), "public_key": str(public)}
    return written


def people_leaked(store_path: Path) -> list[dict[str, Any]]:
    """The training people that generated faces reproduced or blended, from a run's store: each with
    the first step, how many faces, and the highest similarity (the report shows their evidence).

    Example:
        >>> people_leaked(Path("runs/demo-faces/memwatch/memwatch.sqlite"))  # doctest: +SKIP
        [{'identity': 'joe_biden', 'first_step': 800, 'leaks': 31, 'blends': 1, 'max_similarity': 0.938}]
    """
    from memwatch.store import Store

    people: dict[str, dict[str, Any]] = {}
    with Store(store_path, readonly=True) as store:
        rows = [r for run in store.runs() for r in store.items(run["id"], "identity")]
    for r in sorted(rows, key=lambda r: r["step"]):
        names = [r["identity"]] if r.get("leak") else [r["parent_a"], r["parent_b"]] if r.get("interpolation") else []
        for person in names:
            p = people.setdefault(person, {"identity": person, "first_step": r["step"], "leaks": 0, "blends": 0,
                                           "max_similarity": None})  # fmt: skip
            p["leaks" if r.get("leak") else "blends"] += 1
            if r.get("leak"):
                p["max_similarity"] = max(p["max_similarity"] or -1.0, float(r["similarity"]))
    return sorted(people.values(), key=lambda p: (p["first_step"], p["identity"]))


def blend_paths(store_path: Path) -> dict[str, Any]:
    """What the identity paths showed (faces/paths.py): the first step at which a path between two people the
    model reproduces passed through a face that verifies as both, and the paths of the last probe that drew any.

    Example:
        >>> blend_paths(Path("runs/demo-faces/memwatch/memwatch.sqlite"))  # doctest: +SKIP
        {'first_blend_step': 1300, 'last_step': 1500, 'last': {'blend': 1, 'snap': 1, 'fade': 1}}
    """
    from memwatch.store import Store

    with Store(store_path, readonly=True) as store:
        rows = [r for run in store.runs() for r in store.items(run["id"], "identity_paths")]
    kinds: dict[int, dict[str, str]] = {}
    for r in rows:
        kinds.setdefault(int(r["step"]), {})[r["pair"]] = r["path_kind"]
    blended = [step for step, pairs in kinds.items() if "blend" in pairs.values()]
    last = max(kinds, default=None)
    counts: dict[str, int] = {}
    for kind in kinds.get(last, {}).values() if last is not None else ():
        counts[kind] = counts.get(kind, 0) + 1
    return {"first_blend_step": min(blended, default=None), "last_step": last, "last": counts}


# The demo recipe (docs/benchmarks.md has its timings): a 0.27M-parameter UNet predicting v (as Stable
# Diffusion 2 does) on 8 images (each 4 times per batch of 32) memorizes within ~2,000 steps; mem_fraction is 0 before
# step ~1,000. Found by a small sweep over model width, batch size, learning rate and prediction type.
# Checkpoints every 200 steps, a multiple of the probes' 100 (configs/demo*.yaml): each checkpoint is a probed
# snapshot, so the report can name the last clean one by its weights.
DEMO_STEPS = 2000
DEMO_TRAINING_ARGS = [
    "--resolution", "32", "--batch-size", "32", "--repeats", "4", "--lr", "1e-3", "--block-channels", "16", "32", "32",
    "--prediction-type", "v_prediction", "--checkpointing-steps", "200",
]  # fmt: skip


#: The faces recipe (docs/benchmarks.md has its timings): the same UNet at 48 px on 20 crops (5 portraits
#: x 4) in batches of 20; generated faces match a training person from about step 800 and blend two
#: people later, while no sample copies a crop pixel for pixel. Found by one run (2026-12-01).
FACES_STEPS = 1500
FACES_RESOLUTION = 48
FACES_CROPS = 4
FACES_TRAINING_ARGS = [
    "--resolution", str(FACES_RESOLUTION), "--batch-size", "20", "--lr", "1e-3", "--block-channels", "16", "32", "32",
    "--prediction-type", "v_prediction", "--checkpointing-steps", "200",
]  # fmt: skip


def format_demo_summary(summary: dict[str, Any]) -> str:
    """Human-readable end-of-demo summary."""
    events = ", ".join(f"{n} {sev}" for sev, n in sorted(summary["events"].items())) or "none"
    lines = [
        "",
        "memwatch demo summary",
        f"  steps trained:          {summary['last_step']}",
        f"  onset (first copy):     {_step(summary['onset_step'])}",
        f"  at risk (forecast):     {_step(summary.get('at_risk_step'))}",
        f"  first warning:          {_step(summary['first_alarm_step'])}",
        f"  last clean step:        {_step(summary['last_clean_step'])}",
        f"  last clean checkpoint:  {_rel(summary.get('last_clean_checkpoint')) or '-'}",
        f"  images at risk:         {_images(summary.get('images_at_risk') or [])}",
        f"  events:                 {events}",
        f"  store:                  {_rel(summary['store'])}",
        f"  events log:             {_rel(summary['events_file'])}",
    ]
    if "people" in summary:
        people = [f"{p['identity']} (from step {p['first_step']}: {p['leaks']} faces, {p['blends']} blends)"
                  for p in summary["people"]]  # fmt: skip
        lines.insert(-2, f"  people reproduced:      {', '.join(people) or '-'}")
    if "blend_paths" in summary:
        paths = summary["blend_paths"]
        last = ", ".join(f"{n} {kind}" for kind, n in sorted(paths["last"].items())) or "none drawn"
        lines.insert(-2, f"  blend ability (paths):  first blend at {_step(paths['first_blend_step'])}; "
                         f"at {_step(paths['last_step'])}: {last}")  # fmt: skip
    lines += [f"  {name + ':':<24}{_rel(path)}" for name, path in summary.get("curves", {}).items()]
    lines += [f"  {name + ':':<24}{_rel(summary[key])}" for name, key in
              (("report", "report"), ("attestation (signed)", "attestation"), ("public key", "public_key"))
              if summary.get(key)]  # fmt: skip
    if summary.get("attestation"):
        lines += ["", f"  check it: memwatch verify {_rel(summary['attestation'])} --key {_rel(summary['public_key'])}"]
    return "\n".join(lines)


def _images(rows: list[dict[str, Any]]) -> str:
    """``a.png (copied at 775), b.png (forecast 900)``, or ``-``."""
    words = [
        f"{r['training_id']} (copied at {r['first_copy_step']})"
        if r["first_copy_step"] is not None
        else f"{r['training_id']} (forecast {r['forecast_step']})"
        for r in rows
    ]
    return ", ".join(words) or "-"


def _rel(path: str | None) -> str | None:
    """``path`` relative to the current folder when it lies below it (shorter to read)."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _step(step: int | None) -> str:
    return "-" if step is None else f"step {step}"


def _load_script(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("memwatch_train_ddpm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
