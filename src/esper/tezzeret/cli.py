"""``esper-forge``: compile blueprint kernels for a slot width into the Urza library.

Works without a bus; with ``--publish`` each kernel is also announced on Oona.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

from esper.core.errors import ConfigError
from esper.core.settings import EsperSettings, load_settings
from esper.karn import KarnCatalog, UnknownBlueprintError
from esper.leyline import leyline_pb2
from esper.oona import OonaClient
from esper.tezzeret.compiler import CompileError
from esper.tezzeret.forge import ForgeProgress, ForgeReport, run_forge
from esper.urza.errors import UrzaError
from esper.urza.families import DTYPES

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="esper-forge",
        description=(
            "Compile Karn blueprints into verified PyTorch kernels for seed slots of width D "
            "([batch, D] -> [batch, D]) and store them in the Urza library. The run is resumable: "
            "kernels finished by an earlier (possibly crashed) run for the same width and dtype "
            "are skipped. Settings come from the environment (URZA_ARTIFACT_DIR, "
            "URZA_DATABASE_URL, .env) unless overridden below."
        ),
        epilog="Exit status: 0 success, 1 a kernel failed to compile or save, 2 bad arguments or settings.",
    )
    parser.add_argument(
        "--width",
        "-d",
        type=_positive_int,
        required=True,
        metavar="D",
        help="slot width: kernels map [batch, D] to [batch, D] (required)",
    )
    parser.add_argument(
        "--blueprints",
        "-b",
        metavar="IDS",
        help="comma-separated blueprint ids, e.g. BP001,BP009 (default: all 50)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="parameter dtype of the kernels (default: float32)",
    )
    parser.add_argument(
        "--artifact-dir",
        metavar="DIR",
        help="artifact directory (default: URZA_ARTIFACT_DIR or ./var/urza/artifacts)",
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="catalogue URL, sqlite:///path or postgresql://... "
        "(default: URZA_DATABASE_URL or sqlite:///./var/urza/catalog.db)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="announce each compiled kernel as a signed KernelCatalogUpdate on the bus "
        "(needs REDIS_URL and ESPER_LEYLINE_SECRET)",
    )
    parser.add_argument("--force", action="store_true", help="recompile even kernels a previous run finished")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    return parser


def _parse_ids(text: str | None, catalog: KarnCatalog) -> list[str] | None:
    if text is None:
        return None
    ids = [part.strip().upper() for part in text.split(",") if part.strip()]
    if not ids:
        raise ValueError("--blueprints is empty")
    unknown = [bid for bid in ids if bid not in catalog]
    if unknown:
        raise ValueError(f"unknown blueprint id(s): {', '.join(unknown)}")
    return ids


class ProgressLine:
    """A single updating status line on a stream (``\\r``-rewritten when it is a terminal)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()

    def __call__(self, p: ForgeProgress) -> None:
        filled = int(self.width * p.index / max(1, p.total))
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {p.index}/{p.total} {p.blueprint_id} {p.status} {p.elapsed_s:6.1f}s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if p.index == p.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    catalog = KarnCatalog()
    try:
        ids = _parse_ids(args.blueprints, catalog)
    except ValueError as exc:
        parser.error(str(exc))
    overrides: dict[str, Any] = {}
    if args.artifact_dir:
        overrides["urza_artifact_dir"] = args.artifact_dir
    if args.database_url:
        overrides["urza_database_url"] = args.database_url
    try:
        settings = load_settings(**overrides)
        bus = _bus(settings) if args.publish else None
    except ConfigError as exc:
        print(f"esper-forge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    progress = None if args.quiet else ProgressLine(sys.stderr)
    try:
        report = asyncio.run(_forge(settings, args, ids, progress, bus))
    except UnknownBlueprintError as exc:
        print(f"esper-forge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CompileError, UrzaError, OSError) as exc:
        print(f"\nesper-forge: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a database error, for instance; keep the message, no traceback
        print(f"\nesper-forge: failed: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    published = f", {len(report.compiled) - len(report.publish_failures)} announced" if bus else ""
    print(
        f"esper-forge: width {report.d} {report.dtype}: {len(report.compiled)} compiled, "
        f"{len(report.skipped)} already done{published}, {report.elapsed_s:.1f}s "
        f"(artifacts in {settings.urza_artifact_dir})",
        file=sys.stderr,
    )
    if report.publish_failures:
        print(f"esper-forge: {len(report.publish_failures)} announcement(s) failed", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _bus(settings: EsperSettings) -> OonaClient:
    return OonaClient.from_settings(settings, instance="esper-forge")


async def _forge(
    settings: EsperSettings,
    args: argparse.Namespace,
    ids: list[str] | None,
    progress: ProgressLine | None,
    bus: OonaClient | None,
) -> ForgeReport:
    on_update: Callable[[leyline_pb2.KernelCatalogUpdate], Awaitable[None]] | None = None
    if bus is not None:

        async def announce(update: leyline_pb2.KernelCatalogUpdate) -> None:
            result = await bus.publish_kernel_catalog_update(update)
            if not result.ok:
                raise RuntimeError(f"catalog update for {update.blueprint_id} not published: {result.reason}")

        on_update = announce
    try:
        return await run_forge(
            settings, args.width, ids, on_update, progress, dtype=args.dtype, force=args.force
        )
    finally:
        if bus is not None:
            await bus.aclose()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
