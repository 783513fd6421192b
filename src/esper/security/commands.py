"""Signatures carried inside ``AdaptationCommand.annotations["signature"]``.

The signed bytes are the command serialized *deterministically* (map entries
sorted) with the signature annotation removed, so signer and verifier agree
byte for byte regardless of map insertion order. Verification tries every
accepted key, which keeps commands verifiable across a key rotation.
"""

from __future__ import annotations

from esper.leyline import leyline_pb2
from esper.security.signing import KeyRing

SIGNATURE_ANNOTATION = "signature"


def command_signing_bytes(command: leyline_pb2.AdaptationCommand) -> bytes:
    """The canonical bytes a command signature covers."""
    unsigned = leyline_pb2.AdaptationCommand()
    unsigned.CopyFrom(command)
    unsigned.annotations.pop(SIGNATURE_ANNOTATION, None)
    return unsigned.SerializeToString(deterministic=True)


def sign_command(command: leyline_pb2.AdaptationCommand, keys: KeyRing) -> None:
    """Sign ``command`` in place with the primary key (replacing any old signature)."""
    command.annotations[SIGNATURE_ANNOTATION] = keys.sign(command_signing_bytes(command))


def verify_command(command: leyline_pb2.AdaptationCommand, keys: KeyRing) -> bool:
    """True when the command carries a valid signature from an accepted key."""
    signature = command.annotations.get(SIGNATURE_ANNOTATION, "")
    return keys.verify(command_signing_bytes(command), signature)
