"""``memwatch keygen PATH``: an Ed25519 key pair for signing audit reports (``memwatch report --sign``)."""

from __future__ import annotations

import argparse
import os

NAME = "keygen"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="make an Ed25519 key pair for signing audit reports (memwatch report --sign)",
        description="Write an Ed25519 private key to PATH (PEM, readable by you only) and its public key to "
        "PATH.pub, to hand to whoever verifies (memwatch verify --key PATH.pub). Nothing uses the network. "
        "With MEMWATCH_KEY_PASSPHRASE set, the private key is encrypted with it.",
    )
    p.add_argument("path", metavar="PATH", help="the private key file to write (the public key goes to PATH.pub)")
    p.add_argument("--force", action="store_true", help="replace a key pair already at PATH")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memwatch.attest.keys import generate_key_pair, key_id, load_public_key

    passphrase = os.environ.get("MEMWATCH_KEY_PASSPHRASE")
    private, public = generate_key_pair(args.path, passphrase=passphrase.encode() if passphrase else None,
                                        force=args.force)  # fmt: skip
    print(f"wrote private key: {private} (keep it secret)\nwrote public key: {public} (key id "
          f"{key_id(load_public_key(public))[:16]}...)")  # fmt: skip
    return 0
