"""The safetensors header check accepts what safetensors writes and refuses every lie about the layout."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from esper.core.safetensors_header import HeaderError, parse_header


def _blob(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _raw(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def test_reads_what_safetensors_writes() -> None:
    tensors = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "n": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float16),
    }
    blob = save(tensors, metadata={"k": "v"})
    header = parse_header(blob)
    assert header.metadata == {"k": "v"}
    assert {name: (e.dtype, e.shape) for name, e in header.tensors.items()} == {
        "w": ("F32", (2, 3)),
        "n": ("I64", ()),
        "empty": ("F16", (0, 4)),
    }
    w = header.tensors["w"]
    assert header.data_section(blob)[w.start : w.end] == tensors["w"].tobytes()
    assert parse_header(save({})).tensors == {}


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"", "shorter"),
        (struct.pack("<Q", 1000) + b"{}", "length out of range"),
        (struct.pack("<Q", 1) + b"{", "length out of range"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not UTF-8 JSON"),
        (_blob([], b""), "not a JSON object"),  # type: ignore[arg-type]
        (_blob({"__metadata__": {"k": 1}}, b""), "__metadata__"),
        (_blob({"t": {"dtype": "F32", "shape": [1]}}, b""), "exactly dtype"),
        (_blob({"t": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
        (_blob({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
        (_blob({"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
        (_blob({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "byte range"),
        (_blob({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}, b"\0" * 4), "data_offsets"),
        (_blob({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "cover"),
        (_blob({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "gap"),
        (
            _blob(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "overlap",
        ),
        (_raw(b'{"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"t":1}'), "repeats"),
    ],
)
def test_malformed_layouts_are_refused_with_a_reason(blob: bytes, reason: str) -> None:
    with pytest.raises(HeaderError, match=reason):
        parse_header(blob)


def test_header_size_is_bounded() -> None:
    blob = save({"w": np.zeros(4, dtype=np.float32)}, metadata={"pad": "x" * 4096})
    with pytest.raises(HeaderError, match="length out of range"):
        parse_header(blob, max_header_bytes=1024)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_escape_as_another_error(data: bytes) -> None:
    for blob in (data, struct.pack("<Q", len(data)) + data):
        with contextlib.suppress(HeaderError):
            parse_header(blob)
