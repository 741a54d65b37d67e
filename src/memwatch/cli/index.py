"""``memwatch index REFERENCE``: embed a reference set once, resumably, and build its search index.

The embeddings go to the embedding cache and the FAISS index beside it, where ``memwatch probe``,
``memwatch watch``, ``memwatch score`` and the monitor find them (same embedder, same reference set):
they then skip the embedding and the index build. The work is split across the processes of
``accelerate launch`` (each embeds its share of the images; the main process builds the index), and an
interrupted run resumes: what was embedded is in the cache.

    memwatch index data/train --embedder clip
    accelerate launch --num_processes 8 -m memwatch.cli index data/train --embedder clip
"""

from __future__ import annotations

import argparse
import os

from memwatch.cli.embedder_options import (
    add_embedder_options,
    add_reference_options,
    check_exists,
    columns_from_args,
    embedder_from_args,
)
from memwatch.errors import MemwatchError

NAME = "index"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="embed a reference set once (resumably, across accelerate processes) and build its search index",
        description="Embed REFERENCE into the embedding cache and build its search index beside it, so probe, "
        "watch, score and the monitor reuse both. Run it under `accelerate launch` to split the embedding "
        "across processes; an interrupted run resumes from the cache.",
    )
    p.add_argument("reference", metavar="REFERENCE", help="training images (any form memwatch reads)")
    add_embedder_options(p, default_resolution=64)
    add_reference_options(p)
    p.add_argument(
        "--search",
        choices=("auto", "exact", "flat", "compressed"),
        default="auto",
        help="the search to build (default auto: exact up to 100,000 images, then a compressed FAISS index)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState

    from memwatch.core.workers import split_for_process
    from memwatch.data.embed_cache import embed_items
    from memwatch.data.reference_index import ReferenceIndex
    from memwatch.data.refset import load_reference_set

    if args.no_cache:
        raise MemwatchError("--no-cache: memwatch index writes the cache; drop --no-cache (or set --cache-dir)")
    if args.batch_size < 1:
        raise MemwatchError(f"--batch-size {args.batch_size}: give a number of images >= 1")
    check_exists("REFERENCE", args.reference)
    # Without GPUs, accelerate's processes talk over gloo on the CPU (the test of two processes does so).
    state = PartialState(cpu=not torch.cuda.is_available())
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and state.num_processes == 1:
        raise MemwatchError("the launcher started several processes but accelerate sees one: check the launch")
    from memwatch.data.embed_cache import EmbeddingCache

    cache = EmbeddingCache(args.cache_dir)
    embedder = embedder_from_args(args)
    refs = load_reference_set(args.reference, what="REFERENCE", **columns_from_args(args))
    distinct = list({it.sha256: it for it in refs.items}.values())
    have = cache.get(embedder.key, [it.sha256 for it in distinct])
    todo = [it for it in distinct if it.sha256 not in have]
    state.wait_for_everyone()  # every process has read the cache before any writes: the same shares for all
    mine = split_for_process(todo, state.process_index, state.num_processes)
    new = embed_items(refs, mine, embedder, cache, batch_size=args.batch_size, progress=state.is_main_process)
    print(f"process {state.process_index}: embedded {len(new)} of {len(todo)} to do ({len(have)} were cached)")
    state.wait_for_everyone()
    problem = None
    if state.is_main_process:
        # storing is this command's job: check the cache holds every vector before saying it does
        stored = EmbeddingCache(args.cache_dir)
        have_now = stored.get(embedder.key, [it.sha256 for it in distinct])
        usable = {it.id for it in refs.items}  # images found undecodable while embedding were skipped (and named)
        missing = [it for it in distinct if it.sha256 not in have_now and it.id in usable]
        if stored.db is None or missing:
            problem = (
                f"the embedding cache {cache.path} could not store {len(missing) or 'the'} vectors (see the warning "
                "above): nothing is kept for probes to reuse; set --cache-dir to a writable folder with free space"
            )
        else:
            index = ReferenceIndex(refs, embedder, stored, search=args.search)  # all cached now: no embedding
            search = index.prepare_search()
            if getattr(search, "kept", True) is False:
                problem = (
                    f"the {search.kind} search index could not be kept beside the cache in {stored.dir} (see the "
                    "warning above): set --cache-dir to a writable folder with free space"
                )
            else:
                kept = getattr(search, "loaded", None)
                state_note = {None: "nothing to build", True: "loaded (already built)", False: "built and kept"}
                print(
                    f"{len(refs)} images ({len(index)} distinct) embedded with {embedder.name} in {stored.path}; "
                    f"search {search.describe()['kind']}: {state_note[kept]}"
                )
    state.wait_for_everyone()
    state.destroy_process_group()  # as accelerator.end_training() does: no rank exits with gloo's threads running
    if problem is not None:
        raise MemwatchError(problem)
    return 0
