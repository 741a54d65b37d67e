#!/usr/bin/env python
"""Benchmark: ``memwatch data`` (exact and near duplicates, isolated images) on a large synthetic set.

Writes N distinct synthetic 32x32 PNGs (smooth random colour fields: a 4x4x3 uniform field upsampled
bicubically, plus fine noise, so no two are alike), plants exact duplicates (byte copies under new
names) and near duplicates (JPEG re-encodings at quality 90), then runs ``memwatch data`` on the
folder as a user would (a subprocess, no embedding cache) and reports wall time, peak memory and
whether every planted group was found and nothing else.

    python scripts/bench_data.py [--n 100000] [--exact 200] [--near 200] [--out runs/bench_data]

Prints a Markdown row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_set(folder: Path, n: int, exact: int, near: int, seed: int = 0) -> tuple[set, set]:
    """N distinct images plus planted copies; returns the planted exact and near groups (id sets)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for start in range(0, n, 1000):
        fields = rng.random((min(1000, n - start), 4, 4, 3)).astype(np.float32)
        for k, f in enumerate(fields):
            im = Image.fromarray((f * 255).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.int16) + rng.integers(-6, 7, (32, 32, 3))
            shard = folder / f"{(start + k) // 10_000:02d}"
            shard.mkdir(exist_ok=True)
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(shard / f"img{start + k:06d}.png")
    ids = [f"{i // 10_000:02d}/img{i:06d}.png" for i in range(n)]
    picks = rng.choice(n, exact + near, replace=False)
    exact_groups, near_groups = set(), set()
    (folder / "planted").mkdir()
    for j, i in enumerate(picks[:exact]):
        shutil.copy(folder / ids[i], folder / "planted" / f"exact{j:05d}.png")
        exact_groups.add(frozenset({ids[i], f"planted/exact{j:05d}.png"}))
    for j, i in enumerate(picks[exact:]):
        Image.open(folder / ids[i]).save(folder / "planted" / f"near{j:05d}.jpg", quality=90)
        near_groups.add(frozenset({ids[i], f"planted/near{j:05d}.jpg"}))
    return exact_groups, near_groups


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--exact", type=int, default=200)
    p.add_argument("--near", type=int, default=200)
    p.add_argument("--out", default="runs/bench_data")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    exact, near = write_set(out / "images", args.n, args.exact, args.near)
    written = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "memwatch.cli", "data", str(out / "images"), "--no-cache"]
    cmd += ["--json", str(out / "d.json")]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    doc = json.loads((out / "d.json").read_text())
    found = {(g["kind"], frozenset(g["ids"])) for g in doc["duplicate_groups"]}
    planted = {("exact", g) for g in exact} | {("near", g) for g in near}
    print(f"wrote {args.n + args.exact + args.near:,} images in {written:.0f} s")
    print("| images | distinct | planted groups found | other groups | wall time (s) | peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {doc['n']:,} | {doc['distinct']:,} | {len(planted & found)} of {len(planted)} | {len(found - planted)} | "
        f"{wall:.0f} | {peak_mib:.0f} |"
    )
    return 0 if found == planted else 1


if __name__ == "__main__":
    sys.exit(main())
