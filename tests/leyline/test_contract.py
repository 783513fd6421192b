"""Leyline stays wire-compatible with esper-lite v1 and in sync with its .proto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from esper.leyline import leyline_pb2

ROOT = Path(__file__).resolve().parents[2]
#: The esper-lite v1 wire contract (field numbers, labels, types, enum values), kept in the repository.
FIELDS_JSON = ROOT / "contracts" / "leyline" / "leyline-v1-fields.json"


def _contract() -> dict[str, object]:
    data: dict[str, object] = json.loads(FIELDS_JSON.read_text())
    return data


CONTRACT = _contract()
MESSAGES: dict[str, list[dict[str, object]]] = CONTRACT["messages"]  # type: ignore[assignment]
ENUMS: dict[str, dict[str, int]] = CONTRACT["enums"]  # type: ignore[assignment]


def test_package_name() -> None:
    assert leyline_pb2.DESCRIPTOR.package == CONTRACT["package"] == "esper.leyline.v1"


@pytest.mark.parametrize(
    ("message", "spec"),
    [(m, f) for m, fields in sorted(MESSAGES.items()) for f in fields],
    ids=lambda v: v if isinstance(v, str) else str(v["name"]),  # type: ignore[index]
)
def test_message_field_unchanged(message: str, spec: dict[str, object]) -> None:
    descriptor = leyline_pb2.DESCRIPTOR.message_types_by_name[message]
    field = descriptor.fields_by_name[str(spec["name"])]
    assert field.number == spec["number"]
    assert field.is_repeated == (spec["label"] == "repeated")
    expected_type = spec["type"]
    if isinstance(expected_type, int):
        assert field.type == expected_type
    else:
        target = field.message_type or field.enum_type
        assert target is not None
        assert target.full_name == expected_type


@pytest.mark.parametrize(
    ("enum", "name", "number"),
    [(e, n, v) for e, values in sorted(ENUMS.items()) for n, v in sorted(values.items())],
)
def test_enum_value_unchanged(enum: str, name: str, number: int) -> None:
    descriptor = leyline_pb2.DESCRIPTOR.enum_types_by_name[enum]
    assert descriptor.values_by_name[name].number == number


def test_no_messages_or_enums_beyond_v1() -> None:
    assert set(leyline_pb2.DESCRIPTOR.message_types_by_name) == set(MESSAGES)
    assert set(leyline_pb2.DESCRIPTOR.enum_types_by_name) == set(ENUMS)


def test_round_trip_of_a_nested_message() -> None:
    command = leyline_pb2.AdaptationCommand(command_id="c-1", command_type=leyline_pb2.COMMAND_SEED)
    command.seed_operation.operation = leyline_pb2.SEED_OP_GERMINATE
    command.seed_operation.parameters["alpha"] = 0.5
    command.annotations["k"] = "v"
    decoded = leyline_pb2.AdaptationCommand.FromString(command.SerializeToString())
    assert decoded == command
    assert decoded.WhichOneof("payload") == "seed_operation"


def test_generated_code_matches_proto() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_leyline.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
