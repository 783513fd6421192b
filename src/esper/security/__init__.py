"""Message authentication for the bus and for adaptation commands."""

from esper.security.commands import (
    SIGNATURE_ANNOTATION,
    command_signing_bytes,
    sign_command,
    verify_command,
)
from esper.security.signing import KeyRing, SigningKey, key_id, sign_bytes

__all__ = [
    "SIGNATURE_ANNOTATION",
    "KeyRing",
    "SigningKey",
    "command_signing_bytes",
    "key_id",
    "sign_bytes",
    "sign_command",
    "verify_command",
]
