"""DSSE envelopes (Dead Simple Signing Envelope, v1): sign a payload, and check one.

The signature covers the pre-authentication encoding (PAE) of the payload and its type, never the JSON around
it, so the envelope's own formatting is irrelevant to verification:
``PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` (lengths in ASCII decimal bytes).

Example:
    >>> pae("application/vnd.in-toto+json", b"{}")
    b'DSSEv1 28 application/vnd.in-toto+json 2 {}'
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from memwatch.attest.keys import key_id
from memwatch.errors import MemwatchError

#: The payload type of an in-toto Statement.
IN_TOTO = "application/vnd.in-toto+json"


def pae(payload_type: str, payload: bytes) -> bytes:
    """The pre-authentication encoding that a DSSE signature signs."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign(payload: bytes, private_key: Any, payload_type: str = IN_TOTO) -> dict[str, Any]:
    """An envelope holding ``payload`` with one Ed25519 signature (keyid: :func:`memwatch.attest.keys.key_id`)."""
    signature = private_key.sign(pae(payload_type, payload))
    return {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": payload_type,
        "signatures": [{"keyid": key_id(private_key.public_key()), "sig": base64.b64encode(signature).decode()}],
    }


def parse(text: str, where: str) -> dict[str, Any]:
    """The envelope in ``text`` (a JSON object, or the first line of a JSON Lines bundle), its layout checked.

    Raises:
        MemwatchError: not JSON, or not a DSSE envelope (fields missing, of the wrong type, or unknown).
    """
    try:
        envelope = json.loads(text)
    except json.JSONDecodeError:
        first = next((line for line in text.splitlines() if line.strip()), "")  # a bundle: one envelope a line
        try:
            envelope = json.loads(first)
        except json.JSONDecodeError as e:
            raise MemwatchError(f"{where} is not JSON ({e.msg}): it was damaged, or it is not an attestation") from None
    problems = layout_problems(envelope)
    if problems:
        raise MemwatchError(f"{where} is not a DSSE envelope: {problems[0]}")
    return envelope


def layout_problems(envelope: Any) -> list[str]:
    """What makes ``envelope`` not a DSSE v1 envelope (JSON encoding); empty when it is one."""
    if not isinstance(envelope, dict):
        return ["not a JSON object"]
    problems = [f"unknown field {k!r}" for k in envelope if k not in ("payload", "payloadType", "signatures")]
    for field in ("payload", "payloadType"):
        if not isinstance(envelope.get(field), str):
            problems.append(f"{field} is missing or not a string")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        problems.append("signatures is missing or empty")
    else:
        for i, s in enumerate(signatures):
            if not isinstance(s, dict) or not isinstance(s.get("sig"), str) or set(s) - {"sig", "keyid"}:
                problems.append(f"signatures[{i}] is not {{keyid, sig}}")
    if isinstance(envelope.get("payload"), str):
        try:
            base64.b64decode(envelope["payload"], validate=True)
        except (binascii.Error, ValueError):
            problems.append("payload is not base64")
    return problems


def payload_of(envelope: dict[str, Any]) -> bytes:
    """The envelope's payload bytes (not yet authenticated)."""
    return base64.b64decode(envelope["payload"], validate=True)


def verify(envelope: dict[str, Any], public_key: Any) -> bool:
    """Whether one of the envelope's signatures is ``public_key``'s over its payload and type."""
    from cryptography.exceptions import InvalidSignature

    message = pae(envelope["payloadType"], payload_of(envelope))
    for s in envelope["signatures"]:
        try:
            public_key.verify(base64.b64decode(s["sig"], validate=True), message)
            return True
        except (InvalidSignature, binascii.Error, ValueError):
            continue
    return False
