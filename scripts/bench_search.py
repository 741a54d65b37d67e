#!/usr/bin/env python
"""Benchmark: exact chunked nearest-neighbour search (memwatch.neighbours.knn) in pixel space.

Searches Q generated samples against R reference embeddings (32x32x3 pixel vectors, the demo's
resolution) for several R, and reports time and the largest distance matrix held at once, which
chunking bounds at Q x chunk_size whatever R is. Prints a Markdown table for docs/benchmarks.md.

    python scripts/bench_search.py [--queries 64] [--chunk 4096]
"""

from __future__ import annotations

import argparse
import time

import torch

from memwatch.embedders.pixel import PixelEmbedder
from memwatch.neighbours import knn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    args = p.parse_args()
    emb = PixelEmbedder(resolution=32)
    g = torch.Generator().manual_seed(0)
    query = torch.rand(args.queries, 3 * 32 * 32, generator=g)
    print(f"\n{torch.get_num_threads()} torch threads, Q={args.queries}, chunk={args.chunk}, D={query.shape[1]}\n")
    print("| reference images | search time (s) | per query (ms) | largest distance block (MiB) |\n|---|---|---|---|")
    for n in args.sizes:
        ref = torch.rand(n, query.shape[1], generator=g)
        t0 = time.perf_counter()
        knn(query, ref, 50, emb.pairwise_distance, chunk_size=args.chunk)
        dt = time.perf_counter() - t0
        block = args.queries * min(args.chunk, n) * 8 / 2**20  # float64 distances of one chunk
        print(f"| {n:,} | {dt:.2f} | {1000 * dt / args.queries:.1f} | {block:.1f} |")


if __name__ == "__main__":
    main()
