"""``memwatch verify ATTESTATION``: check a signed report, the store it came from, and the weights and data it names."""

from __future__ import annotations

import argparse

NAME = "verify"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="check a signed audit report: signature, store hash chain, and the weights and data it names",
        description="Is this the report memwatch wrote, about these weights and data, from this store, unchanged? "
        "Checks the attestation's Ed25519 signature, re-hashes the report files, every audited checkpoint and the "
        "reference and holdout images, and recomputes the store's hash chain; one line per check. Never writes. "
        "Exit 0 only when everything that can be checked matches (weights probed inside training that no "
        "checkpoint holds cannot be, and are listed); 1 when something does not match or could not be checked for "
        "want of an input (it says which); 2 for bad usage.",
    )
    p.add_argument(
        "attestation",
        metavar="ATTESTATION",
        nargs="?",
        help="the .intoto.jsonl file memwatch report --sign wrote (omit it to check a --store alone)",
    )
    p.add_argument("--key", default=None, help="the signer's public key (the .pub file of memwatch keygen)")
    p.add_argument("--store", default=None, help="the run's store (default: memwatch.sqlite beside the attestation)")
    p.add_argument("--run-dir", default=None, help="the run folder (default: as the attestation says, from its place)")
    p.add_argument("--checkpoints", default=None, help="a folder holding the checkpoint folders, if they moved")
    p.add_argument("--data", default=None, help="the training (reference) images, if not where the store says")
    p.add_argument("--holdout", default=None, help="the held-out images, if not where the store says")
    p.add_argument("--base-model", default=None, help="the base pipeline of LoRA checkpoints")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memwatch.attest.verify import verify

    result = verify(
        args.attestation, key=args.key, store=args.store, run_dir=args.run_dir, checkpoints=args.checkpoints,
        data=args.data, holdout=args.holdout, base_model=args.base_model,
    )  # fmt: skip
    for line in result.lines():
        print(line)
    failed = sum(s == "FAIL" for s, _, _ in result.checks)
    print(f"verified: everything that can be checked matches ({len(result.checks)} checks)" if result.ok
          else f"NOT verified: {failed} of {len(result.checks)} checks failed")  # fmt: skip
    return 0 if result.ok else 1
