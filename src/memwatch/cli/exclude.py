"""``memwatch exclude|recaption RUN_DIR --out FOLDER``: a training folder without the images at risk (or with their
captions varied), and where to resume.

For scripts memwatch does not control (the diffusers examples, watched by ``memwatch watch``): after a warning,
stop the script, run this, and restart it on the new folder from the last clean checkpoint. ``exclude`` leaves the
images at risk out; ``recaption`` keeps them and gives each a list of varied captions, the original first
(:mod:`memwatch.interventions.caption_variation`; the text-to-image scripts draw one of the list each time they
read the image). The change is put on the run's record (an ``interventions`` row and its event), as the in-loop
interventions are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from memwatch.errors import MemwatchError

NAME = "exclude"
RECAPTION = "recaption"
#: captions per image at risk for ``recaption``: the original and 7 variants (each drawn 1 time in 8)
VARIANTS = 8


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="write a training folder without the images at risk, and say which checkpoint to resume from",
        description="After a warning, for a script memwatch does not control: mirror the run's training folder "
        "into --out without the images the run names at risk (hard links, so no space is used and nothing is "
        "changed; caption side files and metadata.jsonl/.csv rows go with their image), print the last clean "
        "checkpoint to resume from, and record the change in the run's store.",
    )
    _common(p, most=0.5, why="on a small set every image approaches copying")
    r = sub.add_parser(
        RECAPTION,
        help="write a training folder whose images at risk have varied captions, and say where to resume",
        description="After a warning on a text-to-image run of a script memwatch does not control: mirror the "
        "run's training folder into --out (hard links) with the metadata.jsonl captions of the images the run "
        "names at risk replaced by a list: the original first, then variants with a few words added or repeated "
        "(Somepalli et al. 2023: duplicated captions drive copying). The diffusers text-to-image scripts train "
        "on a random caption of the list each time they read the image, and use the first elsewhere. Prints the "
        "last clean checkpoint to resume from and records the change in the run's store.",
    )
    _common(r, most=1.0, why="varying a caption keeps its image")
    r.add_argument(
        "--variants",
        type=int,
        default=VARIANTS,
        metavar="K",
        help=f"captions per image at risk, the original included (default {VARIANTS})",
    )
    r.set_defaults(action=RECAPTION)


def _common(p: argparse.ArgumentParser, *, most: float, why: str) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the watched run (its output dir with memwatch/, or the store)")
    p.add_argument("--out", required=True, metavar="FOLDER", help="the new training folder (must not exist yet)")
    p.add_argument("--reference", metavar="FOLDER", help="the training folder (default: the one the run recorded)")
    p.add_argument("--run", help="run name in the store (default: the most recent)")
    p.add_argument(
        "--most",
        type=float,
        default=most,
        metavar="SHARE",
        help=f"change at most this share of the training images, the most at risk first (default {most}: {why})",
    )
    p.set_defaults(func=run, action=NAME)


def run(args: argparse.Namespace) -> int:
    from memwatch.core.declared import load_run
    from memwatch.core.run_state import RunState
    from memwatch.data.refset import load_reference_set
    from memwatch.interventions.caption_variation import caption_variants, vocabulary_of
    from memwatch.interventions.filtered_folder import write_filtered_folder
    from memwatch.signals.image_risk import image_trajectories, rank_images
    from memwatch.signals.rules import Event
    from memwatch.snapshots.checkpoints import checkpoint_step
    from memwatch.store import Store
    from memwatch.store.history import find_store

    if not 0 < args.most <= 1:
        raise MemwatchError(f"--most {args.most}: give a share of the training images in (0, 1]")
    recaption = args.action == RECAPTION
    if recaption and args.variants < 2:
        raise MemwatchError(f"--variants {args.variants}: give at least 2 (the original caption and a variant)")
    store_path = find_store(args.run_dir)
    training_dir = store_path.parent.parent if store_path.parent.name == "memwatch" else store_path.parent
    with Store(store_path) as store:
        history = load_run(store, args.run)
        folder = _reference_folder(args.reference, history.info.get("reference"), store_path.parent)
        refs = load_reference_set(folder, what="--reference")
        risks = rank_images(
            image_trajectories(history.seeds), threshold=history.mem_ratio, training_copies=history.training_copies
        )
        named = [r.training_id for r in risks if r.at_risk]  # most at risk first
        room = int(args.most * len(refs.items))
        chosen, held_back = named[:room], named[room:]
        if not chosen:
            print("no training image at risk in this run: nothing to change" if not named else
                  f"{len(named)} image(s) at risk, but --most {args.most} changes none")  # fmt: skip
            return 0
        captions = {}
        if recaption:
            by_id = {it.id: it.caption for it in refs.items}
            words = vocabulary_of([c for c in by_id.values() if c])
            captions = {i: caption_variants(by_id[i], words, count=args.variants) for i in chosen if by_id.get(i)}
            if not captions:
                raise MemwatchError(
                    f"{folder}: none of the {len(chosen)} image(s) at risk has a caption in a metadata.jsonl row, "
                    "where recaption writes the varied captions (a metadata.csv cell holds one: convert it to "
                    "metadata.jsonl); or leave the images out with exclude"
                )
        state = RunState.from_store(store, history.run_id)
        checkpoint, matched = state.clean_checkpoint(store, history.run_id, training_dir)
        done = write_filtered_folder(folder, args.out, [] if recaption else chosen, recaption=captions)
        changed = done.recaptioned if recaption else chosen
        step = checkpoint_step(checkpoint) if checkpoint is not None else state.last_clean_step
        detail = {"reference": str(folder), "out": str(done.out), "files": done.files, "left_out": done.left_out,
                  "metadata_rows_left_out": done.rows_left_out, "held_back": held_back[:50], "most": args.most,
                  "resume_from": str(checkpoint) if checkpoint else None, "matched_by": matched}  # fmt: skip
        if recaption:
            detail.update(variants=args.variants, captions={i: captions[i] for i in done.recaptioned[:50]},
                          without_caption=[i for i in chosen if i not in done.recaptioned][:50])  # fmt: skip
        what = "captions varied in" if recaption else "left out of"
        event = Event.intervention(args.action, step, changed, detail,
                                   message=f"intervention {args.action}: {len(changed)} image(s) at risk {what} "
                                   f"{done.out}")  # fmt: skip
        store.add_intervention(history.run_id, args.action, step, changed, detail, event=event.to_dict())
    shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
    how = "hard links" if done.linked else "copies"
    if recaption:
        print(f"varied the captions of {len(changed)} image(s) at risk of {len(refs.items)} ({args.variants} "
              f"each, the original first), most at risk first: {shown}")  # fmt: skip
        missed = len(chosen) - len(changed)
        if missed:
            print(f"  {missed} image(s) at risk have no caption in a metadata.jsonl row: left as they are")
    else:
        print(f"left out {len(changed)} image(s) at risk of {len(refs.items)}, most at risk first: {shown}")
    if held_back:
        print(f"  held back by --most {args.most}: {len(held_back)} more at risk")
    rows = f"{len(done.recaptioned)} metadata row(s) recaptioned" if recaption else \
        f"{done.rows_left_out} metadata row(s) left out"  # fmt: skip
    print(f"wrote {done.out}: {done.files} file(s) as {how}, {rows}")
    if state.last_clean_step is None:
        print("no probe was clean before the first warning: restart from the start (the base model)")
    elif checkpoint is None:
        print(f"no checkpoint saved by the last clean step ({step}) in {training_dir}: restart from the start")
    else:
        how_matched = "its weights were probed clean" if matched == "weights" else "saved by the last clean step"
        print(f"resume from {checkpoint} ({how_matched}):")
        print(f"  ... --train_data_dir {done.out} --resume_from_checkpoint {checkpoint}")
    print(f"recorded in {store_path}: intervention {args.action}" + (f" from step {step}" if step is not None else ""))
    return 0


def _reference_folder(given: str | None, recorded: object, store_dir: Path) -> Path:
    """``--reference``, else the reference folder the run recorded (relative to the run folder if so)."""
    if given is not None:
        return Path(given)
    raw = recorded.get("root") if isinstance(recorded, dict) else None
    if not raw:
        raise MemwatchError("the run recorded no reference folder: give the training folder with --reference")
    for candidate in (Path(raw), store_dir.parent / raw):
        if candidate.is_dir():
            return candidate
    raise MemwatchError(f"reference {raw} (recorded with the run) is not a folder here: give it with --reference")
