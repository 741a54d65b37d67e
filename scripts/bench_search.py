#!/usr/bin/env python
"""Benchmark: nearest-neighbour search of generated samples against the reference set.

Two parts; each prints a Markdown table for docs/benchmarks.md.

``--exact`` (the default without ``--large``): exact chunked search (memwatch.search.exact.knn) in pixel
space, Q samples against R reference images (32x32x3 pixel vectors), time and the largest distance
block held at once (chunking bounds it at Q x chunk whatever R is).

``--large``: the FAISS indexes of memwatch.search.index on 1,000,000 synthetic 512-D embeddings (CLIP's
width): unit vectors drawn around 20,000 random centres (a clustered set, as image embeddings are),
1,024 queries of two kinds: near copies of reference rows (a sample that copies a training image, the
case memwatch must not miss) and fresh draws from the same clusters. Ground truth is FAISS's exact flat
index. Reports build time, index memory, query time (search plus exact re-ranking), recall@1 and
recall@10 for each ``nprobe``.

    python scripts/bench_search.py [--queries 64] [--chunk 4096]
    python scripts/bench_search.py --large [--refs 1000000] [--dim 512] [--queries 1024] [--nprobe 8 16 32 64]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from memwatch.embedders.pixel import PixelEmbedder
from memwatch.search.exact import knn


def exact_table(args: argparse.Namespace) -> None:
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


def clustered(n: int, dim: int, centres: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around randomly chosen centres (float32), in blocks to bound memory."""
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 100_000):
        b = min(a + 100_000, n)
        x = centres[rng.integers(0, len(centres), b - a)] + spread * rng.standard_normal((b - a, dim), dtype=np.float32)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall(found: torch.Tensor, truth: np.ndarray, k: int) -> float:
    """Share of queries whose true nearest row is among the first ``k`` found."""
    return float(np.mean([truth[q, 0] in found[q, :k].tolist() for q in range(len(truth))]))


def large_table(args: argparse.Namespace) -> None:
    import faiss

    from memwatch.search.index import FaissSearch

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.centres, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    ref = clustered(args.refs, args.dim, centres, args.spread, rng)
    half = args.queries // 2
    copies = ref[rng.integers(0, args.refs, half)] + 0.01 * rng.standard_normal((half, args.dim), dtype=np.float32)
    fresh = clustered(args.queries - half, args.dim, centres, args.spread, rng)
    queries = np.concatenate([copies / np.linalg.norm(copies, axis=1, keepdims=True), fresh]).astype(np.float32)
    made = time.perf_counter() - t0
    print(f"data: {args.refs:,} x {args.dim} in {made:.1f} s; {faiss.omp_get_max_threads()} threads")

    t0 = time.perf_counter()
    flat = faiss.IndexFlatL2(args.dim)
    flat.add(ref)
    _, truth = flat.search(queries, 10)
    exact_s = time.perf_counter() - t0
    print(f"exact flat search (ground truth), 1 x {args.queries} queries: {exact_s:.1f} s")
    del flat

    reference, q = torch.from_numpy(ref), torch.from_numpy(queries)
    embedder = PixelEmbedder(resolution=1)  # l2 / sqrt(D): on unit vectors it ranks as cosine does
    t0 = time.perf_counter()
    search = FaissSearch(reference, embedder, compressed=True, nlist=args.nlist, nprobe=args.nprobe[0])
    build_s = time.perf_counter() - t0
    index_mib = faiss.serialize_index(search.index).nbytes / 2**20
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    full_mib = ref.nbytes / 2**20
    print(f"IVF{search.nlist},PQ{search.m} built in {build_s:.1f} s; index {index_mib:.0f} MiB (the full "
          f"embeddings kept for re-ranking: {full_mib:.0f} MiB); process peak {peak_mib:.0f} MiB")  # fmt: skip
    print(f"\n| nprobe | shortlist | query time, {args.queries} queries (s) | recall@1 copies | recall@1 fresh | "
          "recall@10 all |\n|---|---|---|---|---|---|")  # fmt: skip
    for nprobe in args.nprobe:
        for shortlist in args.shortlist:
            search.index.nprobe = search.nprobe = nprobe
            search.shortlist = shortlist
            t0 = time.perf_counter()
            _, found = search.search(q, 10)
            dt = time.perf_counter() - t0
            print(f"| {nprobe} | {shortlist} | {dt:.2f} | {recall(found[:half], truth[:half], 1):.4f} | "
                  f"{recall(found[half:], truth[half:], 1):.4f} | {recall(found, truth, 10):.4f} |",
                  flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", action="store_true", help="the FAISS benchmark on a million embeddings")
    p.add_argument("--queries", type=int, default=None, help="queries (default 64 exact, 1024 large)")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    p.add_argument("--refs", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--centres", type=int, default=20_000)
    p.add_argument("--spread", type=float, default=0.04, help="per-dimension noise around a centre")
    p.add_argument("--nlist", type=int, default=None, help="inverted lists (default sqrt(refs))")
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--shortlist", type=int, nargs="+", default=[64, 256], help="rows re-ranked exactly per query")
    args = p.parse_args()
    if args.large:
        args.queries = args.queries or 1024
        large_table(args)
    else:
        args.queries = args.queries or 64
        exact_table(args)


if __name__ == "__main__":
    main()
