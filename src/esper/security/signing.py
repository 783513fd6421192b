"""HMAC-SHA256 signatures for bus entries, with key rotation.

A signature is the standard base64 of HMAC-SHA256(secret, exact bytes), as in
esper-lite v1, so v1 peers sharing the secret interoperate. Each key has a
short id (``kid``) derived from the secret itself, letting a verifier pick the
right key without trying them all and letting operators see which key signed
an entry without ever seeing the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field


def key_id(secret: bytes) -> str:
    """A stable, non-reversible 8-hex-digit name for a secret."""
    return hashlib.sha256(b"esper-kid:" + secret).hexdigest()[:8]


#: The length of an HMAC-SHA256, so a signature of any other length is refused before any HMAC.
_DIGEST_BYTES = 32


def sign_bytes(secret: bytes, payload: bytes) -> str:
    """Base64 HMAC-SHA256 of ``payload``: the v1 ``signature`` entry field."""
    return base64.b64encode(hmac.digest(secret, payload, "sha256")).decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    """One secret and its id; ``repr`` never shows the secret."""

    secret: bytes = field(repr=False)
    kid: str = ""

    def __post_init__(self) -> None:
        if not self.secret:
            raise ValueError("a signing secret must not be empty")
        if not self.kid:
            object.__setattr__(self, "kid", key_id(self.secret))
        # Keyed once: each message then costs a copy of this state instead of a fresh key setup.
        # Not a field, so it stays out of comparisons and ``asdict``.
        object.__setattr__(self, "_keyed", hmac.new(self.secret, digestmod=hashlib.sha256))

    def __reduce__(self) -> tuple[type[SigningKey], tuple[bytes, str]]:
        # The keyed state cannot be pickled or copied; it is rebuilt from the secret.
        return (type(self), (self.secret, self.kid))

    def mac(self, payload: bytes) -> bytes:
        """The raw HMAC-SHA256 of ``payload`` under this key."""
        keyed: hmac.HMAC = self._keyed.copy()  # type: ignore[attr-defined]
        keyed.update(payload)
        return keyed.digest()


class KeyRing:
    """The primary signing key plus previous keys still accepted for verification.

    Build one from settings with ``KeyRing(*settings.signing_secrets())``.
    Verification with a known ``kid`` uses only that key; without one (v1
    peers send no ``kid``) every key is tried, each comparison in constant
    time, so rotation never breaks a peer that has not yet learned key ids.
    """

    def __init__(self, primary: bytes, previous: Iterable[bytes] = ()) -> None:
        self.primary = SigningKey(primary)
        keys = [self.primary]
        for secret in previous:
            key = SigningKey(secret)
            if key.kid not in {k.kid for k in keys}:
                keys.append(key)
        self._keys: dict[str, SigningKey] = {k.kid: k for k in keys}

    @property
    def kid(self) -> str:
        return self.primary.kid

    def knows(self, kid: str) -> bool:
        """Whether ``kid`` names an accepted key."""
        return kid in self._keys

    def sign(self, payload: bytes) -> str:
        """Sign with the primary key."""
        return base64.b64encode(self.primary.mac(payload)).decode("ascii")

    def verify(self, payload: bytes, signature: str | bytes | None, kid: str | None = None) -> bool:
        """True when ``signature`` is a valid HMAC of ``payload`` under an accepted key.

        An empty or undecodable signature, or a ``kid`` naming no accepted
        key, is simply invalid: this never raises on bad input.
        """
        if not signature:
            return False
        try:
            given = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            return False
        if len(given) != _DIGEST_BYTES:
            return False
        if kid:
            key = self._keys.get(kid)
            candidates = [key] if key is not None else []
        else:
            candidates = list(self._keys.values())
        valid = False
        for key in candidates:
            valid |= hmac.compare_digest(key.mac(payload), given)
        return valid
