"""Field reports: what happened after a command, in a crash-safe local log.

Record format (little-endian)::

    u32 length | length bytes of serialized FieldReport | u32 CRC32(payload)

Esper-lite v1's log had only the length prefix and stopped *silently* at the
first bad record, so a torn tail made every later append unreadable. Here
the CRC detects torn or garbled records, loading stops at the first bad one,
**truncates** the file there (so later appends land after valid data) and
logs how many bytes were dropped. Each append is fsynced. Retention (by the
report's ``issued_at``) rewrites through a temp file, fsync, rename and a
directory fsync. Report ids are uuid4 hex, never derived from a count, so pruning cannot make ids collide.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

from google.protobuf.message import DecodeError

from esper.core import EsperSettings, get_logger
from esper.core.files import write_atomic
from esper.leyline import leyline_pb2

_LOG = get_logger(__name__)
_HEADER = struct.Struct("<I")
_TRAILER = struct.Struct("<I")
#: A length above this is treated as corruption, not an allocation request.
MAX_RECORD_BYTES = 1 << 20


def generate_field_report(
    command: leyline_pb2.AdaptationCommand,
    outcome: leyline_pb2.FieldReportOutcome.ValueType,
    metrics_delta: Mapping[str, float],
    *,
    training_run_id: str = "",
    seed_id: str | None = None,
    blueprint_id: str | None = None,
    policy_version: str = "",
    observation_window_epochs: int = 1,
    notes: str = "",
    clock: Callable[[], float] = time.time,
) -> leyline_pb2.FieldReport:
    """A FieldReport about ``command``: uuid4 id, issued now, ids taken from the command.

    ``seed_id``/``blueprint_id``/``training_run_id`` default to what the
    command itself names (target seed, seed-operation blueprint,
    ``training_run_id`` annotation).
    """
    if outcome not in leyline_pb2.FieldReportOutcome.values():
        raise ValueError(f"unknown FieldReportOutcome {outcome}")
    blueprint = blueprint_id
    if blueprint is None:
        blueprint = command.seed_operation.blueprint_id if command.HasField("seed_operation") else ""
    report = leyline_pb2.FieldReport(
        version=1,
        report_id=uuid.uuid4().hex,
        command_id=command.command_id,
        training_run_id=training_run_id or command.annotations.get("training_run_id", ""),
        seed_id=command.target_seed_id if seed_id is None else seed_id,
        blueprint_id=blueprint,
        outcome=outcome,
        observation_window_epochs=observation_window_epochs,
        tamiyo_policy_version=policy_version or command.annotations.get("policy_version", ""),
        notes=notes,
    )
    for key, value in metrics_delta.items():
        report.metrics[key] = float(value)
    report.issued_at.FromNanoseconds(int(clock() * 1e9))
    return report


def encode_record(report: leyline_pb2.FieldReport) -> bytes:
    payload = report.SerializeToString(deterministic=True)
    return _HEADER.pack(len(payload)) + payload + _TRAILER.pack(zlib.crc32(payload))


def decode_records(data: bytes) -> tuple[list[leyline_pb2.FieldReport], int, str]:
    """Parse records from the start; returns (reports, bytes of valid prefix, why it stopped)."""
    reports: list[leyline_pb2.FieldReport] = []
    offset = 0
    while offset < len(data):
        if offset + _HEADER.size > len(data):
            return reports, offset, "torn length prefix"
        (length,) = _HEADER.unpack_from(data, offset)
        if length > MAX_RECORD_BYTES:
            return reports, offset, f"implausible record length {length}"
        end = offset + _HEADER.size + length + _TRAILER.size
        if end > len(data):
            return reports, offset, "torn record"
        payload = data[offset + _HEADER.size : offset + _HEADER.size + length]
        (crc,) = _TRAILER.unpack_from(data, end - _TRAILER.size)
        if zlib.crc32(payload) != crc:
            return reports, offset, "checksum mismatch"
        report = leyline_pb2.FieldReport()
        try:
            report.ParseFromString(payload)
        except DecodeError as exc:
            return reports, offset, f"unparsable record: {exc}"
        reports.append(report)
        offset = end
    return reports, offset, ""


class FieldReportStore:
    """Append-only, fsynced, self-repairing log of FieldReports with retention.

    The path is always explicit (or derived from ``settings.var_dir`` by
    :meth:`from_settings`), never relative to whatever the CWD happens to be.
    Thread-safe: one lock serialises appends, loads and rewrites.
    """

    def __init__(
        self,
        path: Path,
        *,
        retention_hours: float = 24.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if retention_hours <= 0:
            raise ValueError("retention_hours must be positive")
        self.path = Path(path)
        self.retention_hours = retention_hours
        self._clock = clock
        self._lock = threading.Lock()
        self._reports: list[leyline_pb2.FieldReport] = []
        self._handle: BinaryIO | None = None
        #: Bytes dropped by the most recent load because of a torn/garbled tail.
        self.dropped_bytes = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.load()
        self.prune()

    @classmethod
    def from_settings(cls, settings: EsperSettings, path: Path | None = None) -> FieldReportStore:
        """The store at ``<var_dir>/tamiyo/field_reports.log`` (or ``path``)."""
        return cls(
            path or Path(settings.var_dir) / "tamiyo" / "field_reports.log",
            retention_hours=settings.tamiyo_field_report_retention_hours,
        )

    def reports(self) -> list[leyline_pb2.FieldReport]:
        """Retained reports in append order (copies of the list, shared messages)."""
        with self._lock:
            return list(self._reports)

    def __len__(self) -> int:
        with self._lock:
            return len(self._reports)

    def load(self) -> list[leyline_pb2.FieldReport]:
        """(Re)read the file, truncating a torn or garbled tail so later appends stay readable."""
        with self._lock:
            self._close_handle()
            data = self.path.read_bytes() if self.path.exists() else b""
            reports, valid, why = decode_records(data)
            self.dropped_bytes = len(data) - valid
            if self.dropped_bytes:
                _LOG.warning(
                    "tamiyo.field_report_log_truncated",
                    path=str(self.path),
                    reason=why,
                    kept_records=len(reports),
                    kept_bytes=valid,
                    dropped_bytes=self.dropped_bytes,
                )
                with open(self.path, "r+b") as handle:
                    handle.truncate(valid)
                    handle.flush()
                    os.fsync(handle.fileno())
            self._reports = reports
            return list(reports)

    def append(self, report: leyline_pb2.FieldReport) -> None:
        """Append one report durably (fsync before returning)."""
        record = encode_record(report)
        with self._lock:
            handle = self._open_handle()
            handle.write(record)
            handle.flush()
            os.fsync(handle.fileno())
            stored = leyline_pb2.FieldReport()
            stored.CopyFrom(report)
            self._reports.append(stored)

    def extend(self, reports: Iterable[leyline_pb2.FieldReport]) -> None:
        for report in reports:
            self.append(report)

    def prune(self, now: float | None = None) -> int:
        """Drop reports issued before ``now - retention``; returns how many.

        A report without ``issued_at`` is kept (treated as issued now), as at
        esper-lite v1; Tamiyo always stamps the reports it creates.
        """
        cutoff_ns = int(((self._clock() if now is None else now) - self.retention_hours * 3600.0) * 1e9)
        with self._lock:
            kept = [
                r
                for r in self._reports
                if r.issued_at.ToNanoseconds() == 0 or r.issued_at.ToNanoseconds() >= cutoff_ns
            ]
            removed = len(self._reports) - len(kept)
            if removed:
                self._close_handle()
                write_atomic(self.path, b"".join(encode_record(r) for r in kept))
                self._reports = kept
                _LOG.info("tamiyo.field_reports_pruned", removed=removed, kept=len(kept))
            return removed

    def close(self) -> None:
        with self._lock:
            self._close_handle()

    def _open_handle(self) -> BinaryIO:
        if self._handle is None:
            self._handle = open(self.path, "ab")  # noqa: SIM115 - kept open across appends
        return self._handle

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
