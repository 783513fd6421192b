"""Signatures match an independent HMAC computation and reject every forgery."""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import hmac
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esper.leyline import leyline_pb2
from esper.security import KeyRing, key_id, sign_bytes, sign_command, verify_command
from esper.security.commands import SIGNATURE_ANNOTATION

# Vectors computed with Python's hmac module, independently of the code under test.
VECTORS = [
    (b"secret", b"", "+eZuF5tnR65UEI+C+K3os8Jddv0wr95sOVgixTAZYWk="),
    (b"secret", b"hello", "iKqz7ejTrflNJquQ07r9SiCDBww7zOnAFO4EpEOEfAs="),
    (b"key-2", b"\x00\x01\x02\xff", None),
]


@pytest.mark.parametrize(("secret", "payload", "expected"), VECTORS)
def test_signature_matches_independent_hmac(secret: bytes, payload: bytes, expected: str | None) -> None:
    independent = base64.b64encode(hmac.new(secret, payload, hashlib.sha256).digest()).decode()
    if expected is not None:
        assert independent == expected
    assert sign_bytes(secret, payload) == independent
    assert KeyRing(secret).verify(payload, independent)


def test_tampered_byte_fails() -> None:
    ring = KeyRing(b"primary")
    payload = bytearray(b"an envelope of some length")
    signature = ring.sign(bytes(payload))
    for index in range(len(payload)):
        tampered = bytearray(payload)
        tampered[index] ^= 0x01
        assert not ring.verify(bytes(tampered), signature)


def test_unknown_key_fails() -> None:
    signature = KeyRing(b"someone-else").sign(b"payload")
    assert not KeyRing(b"primary").verify(b"payload", signature)


def test_unknown_kid_fails_even_with_right_signature() -> None:
    ring = KeyRing(b"primary")
    assert not ring.verify(b"payload", ring.sign(b"payload"), kid="deadbeef")


@pytest.mark.parametrize("bad", ["", None, b"", "not base64!!", base64.b64encode(b"short").decode()])
def test_empty_or_malformed_signature_fails(bad: str | bytes | None) -> None:
    assert not KeyRing(b"primary").verify(b"payload", bad)


def test_previous_key_still_verifies_during_rotation() -> None:
    old = KeyRing(b"old-secret")
    rotated = KeyRing(b"new-secret", previous=[b"old-secret"])
    signature = old.sign(b"payload")
    assert rotated.verify(b"payload", signature)
    assert rotated.verify(b"payload", signature, kid=old.kid)
    assert not rotated.verify(b"payload", signature, kid=rotated.kid)
    # New messages are signed with the new key only.
    assert not old.verify(b"payload", rotated.sign(b"payload"))


def test_key_id_is_stable_and_hides_secret() -> None:
    assert key_id(b"abc") == key_id(b"abc") != key_id(b"abd")
    ring = KeyRing(b"super-secret-value")
    assert "super-secret-value" not in repr(ring.primary)
    assert ring.kid == key_id(b"super-secret-value")


def test_empty_secret_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        KeyRing(b"")


@given(st.binary(max_size=512), st.binary(min_size=1, max_size=64))
def test_any_payload_round_trips(payload: bytes, secret: bytes) -> None:
    ring = KeyRing(secret)
    assert ring.verify(payload, ring.sign(payload), kid=ring.kid)


def _command() -> leyline_pb2.AdaptationCommand:
    command = leyline_pb2.AdaptationCommand(
        version=1, command_id="cmd-1", command_type=leyline_pb2.COMMAND_SEED
    )
    command.seed_operation.operation = leyline_pb2.SEED_OP_GERMINATE
    command.seed_operation.blueprint_id = "BP002"
    for name, value in {"scale": 1.5, "alpha": 0.1, "z": 3.0}.items():
        command.seed_operation.parameters[name] = value
    command.annotations["reason"] = "test"
    command.issued_at.GetCurrentTime()
    return command


def test_command_signature_round_trip_and_canonical_bytes() -> None:
    ring = KeyRing(b"primary")
    command = _command()
    sign_command(command, ring)
    assert SIGNATURE_ANNOTATION in command.annotations
    # The same command built with maps in another order verifies with the same signature.
    reordered = leyline_pb2.AdaptationCommand()
    reordered.CopyFrom(command)
    reordered.seed_operation.parameters.clear()
    for name in ("z", "scale", "alpha"):
        reordered.seed_operation.parameters[name] = command.seed_operation.parameters[name]
    assert verify_command(reordered, ring)
    # Independent computation of the signed bytes.
    unsigned = leyline_pb2.AdaptationCommand()
    unsigned.CopyFrom(command)
    del unsigned.annotations[SIGNATURE_ANNOTATION]
    expected = base64.b64encode(
        hmac.new(b"primary", unsigned.SerializeToString(deterministic=True), hashlib.sha256).digest()
    ).decode()
    assert command.annotations[SIGNATURE_ANNOTATION] == expected


def test_command_tampering_and_missing_signature_fail() -> None:
    ring = KeyRing(b"primary")
    command = _command()
    assert not verify_command(command, ring)
    sign_command(command, ring)
    command.seed_operation.blueprint_id = "BP003"
    assert not verify_command(command, ring)


@given(st.binary(max_size=2048))
def test_the_keyring_signs_as_an_independent_hmac_with_its_key_set_up_once(payload: bytes) -> None:
    ring = KeyRing(b"0123456789abcdef0123456789abcdef")
    independent = base64.b64encode(hmac.new(ring.primary.secret, payload, hashlib.sha256).digest()).decode()
    assert ring.sign(payload) == independent
    assert ring.sign(payload) == independent  # the keyed state is copied, never consumed
    assert ring.verify(payload, independent, ring.kid)


def test_a_keyring_survives_pickling_and_copying_and_its_key_hides_the_secret() -> None:
    ring = KeyRing(b"0123456789abcdef0123456789abcdef", [b"fedcba9876543210fedcba9876543210"])
    signature = ring.sign(b"payload")
    for other in (pickle.loads(pickle.dumps(ring)), copy.deepcopy(ring)):
        assert other.sign(b"payload") == signature
        assert other.primary == ring.primary
    assert dataclasses.asdict(ring.primary) == {"secret": ring.primary.secret, "kid": ring.kid}
    assert "0123456789abcdef" not in repr(ring.primary)
