"""``memwatch exclude RUN_DIR --out FOLDER``: a training folder without the images at risk, and where to resume.

For scripts memwatch does not control (the diffusers examples, watched by ``memwatch watch``): after a warning,
stop the script, run this, and restart it on the new folder from the last clean checkpoint. The change is put on
the run's record (an ``interventions`` row and its event), as the in-loop interventions are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from memwatch.errors import MemwatchError

NAME = "exclude"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="write a training folder without the images at risk, and say which checkpoint to resume from",
        description="After a warning, for a script memwatch does not control: mirror the run's training folder "
        "into --out without the images the run names at risk (hard links, so no space is used and nothing is "
        "changed; caption side files and metadata.jsonl/.csv rows go with their image), print the last clean "
        "checkpoint to resume from, and record the change in the run's store.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the watched run (its output dir with memwatch/, or the store)")
    p.add_argument("--out", required=True, metavar="FOLDER", help="the new training folder (must not exist yet)")
    p.add_argument("--reference", metavar="FOLDER", help="the training folder (default: the one the run recorded)")
    p.add_argument("--run", help="run name in the store (default: the most recent)")
    p.add_argument(
        "--most",
        type=float,
        default=0.5,
        metavar="SHARE",
        help="leave out at most this share of the training images, the most at risk first (default 0.5: on a "
        "small set every image approaches copying)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memwatch.core.declared import load_run
    from memwatch.core.run_state import RunState
    from memwatch.data.refset import load_reference_set
    from memwatch.interventions.filtered_folder import write_filtered_folder
    from memwatch.signals.image_risk import image_trajectories, rank_images
    from memwatch.signals.rules import Event
    from memwatch.snapshots.checkpoints import checkpoint_step
    from memwatch.store import Store
    from memwatch.store.history import find_store

    if not 0 < args.most <= 1:
        raise MemwatchError(f"--most {args.most}: give a share of the training images in (0, 1]")
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
        leave_out, held_back = named[:room], named[room:]
        if not leave_out:
            print("no training image at risk in this run: nothing to leave out" if not named else
                  f"{len(named)} image(s) at risk, but --most {args.most} leaves none out")  # fmt: skip
            return 0
        state = RunState.from_store(store, history.run_id)
        checkpoint, matched = state.clean_checkpoint(store, history.run_id, training_dir)
        done = write_filtered_folder(folder, args.out, leave_out)
        step = checkpoint_step(checkpoint) if checkpoint is not None else state.last_clean_step
        detail = {"reference": str(folder), "out": str(done.out), "files": done.files, "left_out": done.left_out,
                  "metadata_rows_left_out": done.rows_left_out, "held_back": held_back[:50], "most": args.most,
                  "resume_from": str(checkpoint) if checkpoint else None, "matched_by": matched}  # fmt: skip
        event = Event.intervention("exclude", step, leave_out, detail,
                                   message=f"intervention exclude: {len(leave_out)} image(s) at risk left out of "
                                   f"{done.out}")  # fmt: skip
        store.add_intervention(history.run_id, "exclude", step, leave_out, detail, event=event.to_dict())
    shown = ", ".join(leave_out[:8]) + (" ..." if len(leave_out) > 8 else "")
    print(f"left out {len(leave_out)} image(s) at risk of {len(refs.items)}, most at risk first: {shown}")
    if held_back:
        print(f"  held back by --most {args.most}: {len(held_back)} more at risk")
    how = "hard links" if done.linked else "copies"
    print(f"wrote {done.out}: {done.files} file(s) as {how}, {done.rows_left_out} metadata row(s) left out")
    if state.last_clean_step is None:
        print("no probe was clean before the first warning: restart from the start (the base model)")
    elif checkpoint is None:
        print(f"no checkpoint saved by the last clean step ({step}) in {training_dir}: restart from the start")
    else:
        how_matched = "its weights were probed clean" if matched == "weights" else "saved by the last clean step"
        print(f"resume from {checkpoint} ({how_matched}):")
        print(f"  ... --train_data_dir {done.out} --resume_from_checkpoint {checkpoint}")
    print(f"recorded in {store_path}: intervention exclude" + (f" from step {step}" if step is not None else ""))
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
