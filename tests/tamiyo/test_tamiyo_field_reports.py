from __future__ import annotations

import os
from pathlib import Path

import pytest

from esper.core import EsperSettings
from esper.leyline import leyline_pb2
from esper.tamiyo import FieldReportStore, generate_field_report

S = leyline_pb2
HOUR = 3600.0


def _command(n: int = 1) -> S.AdaptationCommand:
    command = S.AdaptationCommand(
        version=1,
        command_id=f"cmd-{n}",
        command_type=S.COMMAND_SEED,
        target_seed_id=f"seed-{n}",
        issued_by="tamiyo",
    )
    command.seed_operation.operation = S.SEED_OP_GERMINATE
    command.seed_operation.blueprint_id = "BP003"
    command.annotations["training_run_id"] = "run-1"
    command.annotations["policy_version"] = "4"
    return command


def _report(n: int, issued_at: float = 1_000_000.0) -> S.FieldReport:
    return generate_field_report(
        _command(n), S.FIELD_REPORT_OUTCOME_SUCCESS, {"loss_delta": -0.1 * n}, clock=lambda: issued_at
    )


def test_report_fields_come_from_the_command() -> None:
    report = _report(2)
    assert report.command_id == "cmd-2"
    assert report.seed_id == "seed-2"
    assert report.blueprint_id == "BP003"
    assert report.training_run_id == "run-1"
    assert report.tamiyo_policy_version == "4"
    assert report.issued_at.seconds == 1_000_000
    assert abs(report.metrics["loss_delta"] + 0.2) < 1e-6
    with pytest.raises(ValueError, match="FieldReportOutcome"):
        generate_field_report(_command(), 99, {})  # type: ignore[arg-type]


def test_report_ids_are_unique_uuids() -> None:
    ids = {_report(1).report_id for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 32 for i in ids)


def test_append_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "tamiyo" / "field_reports.log"
    store = FieldReportStore(path, clock=lambda: 1_000_000.0)
    reports = [_report(i) for i in range(1, 4)]
    store.extend(reports)
    store.close()
    reloaded = FieldReportStore(path, clock=lambda: 1_000_000.0)
    assert reloaded.reports() == reports
    assert reloaded.dropped_bytes == 0


def test_torn_tail_is_truncated_and_later_appends_are_readable(tmp_path: Path) -> None:
    path = tmp_path / "reports.log"
    store = FieldReportStore(path, clock=lambda: 1_000_000.0)
    store.extend([_report(1), _report(2)])
    store.close()
    intact = path.stat().st_size
    with open(path, "ab") as handle:  # a crash mid-append: length prefix and half a record
        handle.write(b"\x40\x00\x00\x00partial-record")
    reopened = FieldReportStore(path, clock=lambda: 1_000_000.0)
    assert [r.command_id for r in reopened.reports()] == ["cmd-1", "cmd-2"]
    assert reopened.dropped_bytes == 18
    assert path.stat().st_size == intact
    reopened.append(_report(3))
    reopened.close()
    final = FieldReportStore(path, clock=lambda: 1_000_000.0)
    assert [r.command_id for r in final.reports()] == ["cmd-1", "cmd-2", "cmd-3"]


def test_garbage_in_the_middle_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "reports.log"
    store = FieldReportStore(path, clock=lambda: 1_000_000.0)
    store.extend([_report(1), _report(2), _report(3)])
    store.close()
    data = bytearray(path.read_bytes())
    first_len = int.from_bytes(data[:4], "little") + 8
    data[first_len + 10] ^= 0xFF  # flip a byte inside record 2's payload
    path.write_bytes(bytes(data))
    reopened = FieldReportStore(path, clock=lambda: 1_000_000.0)
    assert [r.command_id for r in reopened.reports()] == ["cmd-1"]
    assert reopened.dropped_bytes == len(data) - first_len
    assert path.stat().st_size == first_len


def test_implausible_length_is_corruption_not_an_allocation(tmp_path: Path) -> None:
    path = tmp_path / "reports.log"
    path.write_bytes(b"\xff\xff\xff\xff" + os.urandom(32))
    store = FieldReportStore(path)
    assert store.reports() == []
    assert path.stat().st_size == 0


def test_retention_rewrites_the_log(tmp_path: Path) -> None:
    now = [1_000_000.0]
    path = tmp_path / "reports.log"
    store = FieldReportStore(path, retention_hours=2, clock=lambda: now[0])
    store.append(_report(1, issued_at=now[0] - 3 * HOUR))  # already expired
    store.append(_report(2, issued_at=now[0] - 1 * HOUR))
    store.append(_report(3, issued_at=now[0]))
    assert store.prune() == 1
    assert [r.command_id for r in store.reports()] == ["cmd-2", "cmd-3"]
    store.append(_report(4, issued_at=now[0]))
    now[0] += 1.5 * HOUR
    assert store.prune() == 1
    store.close()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    reloaded = FieldReportStore(path, retention_hours=2, clock=lambda: now[0])
    assert [r.command_id for r in reloaded.reports()] == ["cmd-3", "cmd-4"]
    # opening prunes too
    now[0] += 10 * HOUR
    assert FieldReportStore(path, retention_hours=2, clock=lambda: now[0]).reports() == []


def test_default_path_lives_under_var_dir(tmp_path: Path) -> None:
    settings = EsperSettings(var_dir=tmp_path / "var", tamiyo_field_report_retention_hours=5)
    store = FieldReportStore.from_settings(settings)
    assert store.path == tmp_path / "var" / "tamiyo" / "field_reports.log"
    assert store.retention_hours == 5
