"""Ed25519 key pairs for signing attestations: made by ``memwatch keygen``, stored as PEM files.

The private key is PKCS#8 PEM, readable by its owner only (mode 0600), unencrypted unless a passphrase is
given; the public key (``<key>.pub``) is SubjectPublicKeyInfo PEM, to hand to whoever verifies. A key's id is the
sha256 of its public key's DER encoding (hex), as DSSE signatures name it.

Example:
    >>> import tempfile
    >>> private, public = generate_key_pair(Path(tempfile.mkdtemp()) / "audit.key")
    >>> key_id(load_public_key(public)) == key_id(load_private_key(private).public_key())
    True
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from memwatch.errors import MemwatchError

#: What to install when the signing extra is missing.
NEEDS = "signing needs the cryptography package: pip install 'memwatch[sign]'"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MemwatchError(NEEDS) from None
    return serialization, ed25519


def generate_key_pair(path: str | Path, *, passphrase: bytes | None = None, force: bool = False) -> tuple[Path, Path]:
    """Make an Ed25519 key pair: the private key at ``path`` (mode 0600) and the public key at ``path.pub``.

    Raises:
        MemwatchError: a key file is already there (and not ``force``), or the folder cannot be written.
    """
    serialization, ed25519 = _crypto()
    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists() and not force:
            raise MemwatchError(f"{p} already exists: choose another path, or pass --force to replace the key pair")
    key = ed25519.Ed25519PrivateKey.generate()
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())  # fmt: skip
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        if force:
            private_path.unlink(missing_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        public_path.write_bytes(public)
    except OSError as e:
        raise MemwatchError(f"cannot write the key pair at {private_path}: {e.strerror or e}") from None
    return private_path, public_path


def load_private_key(path: str | Path, passphrase: bytes | None = None) -> Any:
    """The Ed25519 private key in a PEM file.

    Raises:
        MemwatchError: missing, unreadable, encrypted without a passphrase, or not an Ed25519 private key.
    """
    serialization, ed25519 = _crypto()
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as e:
        raise MemwatchError(f"signing key {path} cannot be read ({e}): pass a PEM file of memwatch keygen") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise MemwatchError(f"signing key {path} is not an Ed25519 key: make one with memwatch keygen")
    return key


def load_public_key(path: str | Path) -> Any:
    """The Ed25519 public key in a PEM file.

    Raises:
        MemwatchError: missing, unreadable, or not an Ed25519 public key.
    """
    serialization, ed25519 = _crypto()
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise MemwatchError(f"public key {path} cannot be read ({e}): pass the .pub file of memwatch keygen") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise MemwatchError(f"public key {path} is not an Ed25519 key: pass the .pub file memwatch keygen made")
    return key


def key_id(public_key: Any) -> str:
    """sha256 (hex) of the public key's DER SubjectPublicKeyInfo."""
    serialization, _ = _crypto()
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise MemwatchError(f"{what} {path} cannot be read: {e.strerror or e}") from None
