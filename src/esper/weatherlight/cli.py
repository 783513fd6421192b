"""``esper-weatherlight-service``: boot, supervise and drain the control plane.

Exit status: 0 after a clean shutdown; 1 when a required worker failed, boot
failed, or the shutdown deadline was hit; 2 for invalid configuration, a
failed preflight (every problem is listed, secrets never are) or another
service already running in the var dir; 130 when a second signal forced an
immediate exit.

Only the standard library is imported before the arguments are parsed, so
``--version`` and ``--help`` answer at once; the control plane (and its
heavy dependencies) is imported only to run it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from esper import __version__

if TYPE_CHECKING:
    from esper.core.settings import EsperSettings

EXIT_CONFIG = 2
EXIT_FORCED = 130
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Signals that arrived before the event loop's handlers were installed (during preflight).
_early_signals: list[int] = []


def _remember_signal(signum: int, _frame: object) -> None:
    _early_signals.append(signum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esper-weatherlight-service",
        description=(
            "Run the Esper-Lite control plane: the Oona bus (a private Redis-protocol server under "
            "ESPER_VAR_DIR when REDIS_URL is unset), the Urza kernel library and prefetch worker, "
            "Kasmina's kernel warmer, Tamiyo, telemetry and housekeeping, with health probes on "
            "WEATHERLIGHT_HTTP_HOST:WEATHERLIGHT_HTTP_PORT (/livez, /readyz, /metrics, /status). "
            "Configuration comes from the environment and .env in the working directory; "
            "ESPER_LEYLINE_SECRET is required (esper-config init writes .env with a fresh one)."
        ),
        epilog=(
            "Exit status: 0 clean shutdown; 1 worker failure, boot failure or shutdown deadline hit; "
            "2 invalid configuration, failed preflight or already running; 130 forced by a second signal."
        ),
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate configuration and run preflight (including a busy HTTP port and a running "
        "instance), then exit",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


async def _preflight(settings: EsperSettings) -> None:
    from esper.core.logs import get_logger
    from esper.weatherlight.preflight import run_preflight

    report = await run_preflight(settings, check_bus=settings.redis_url is not None)
    report.raise_if_failed()
    get_logger("esper.weatherlight.cli").info("preflight passed", checks=report.passed)


async def serve(settings: EsperSettings) -> int:
    """Run the service until a signal (or a failure); return the exit status."""
    from esper.core.logs import get_logger
    from esper.weatherlight.service import WeatherlightService

    log = get_logger("esper.weatherlight.cli")
    await _preflight(settings)
    service = WeatherlightService(settings)
    loop = asyncio.get_running_loop()
    stop_requested = False

    def on_signal(signum: int) -> None:
        nonlocal stop_requested
        name = signal.Signals(signum).name
        if stop_requested:
            # The embedded server gets SIGTERM from the kernel as we go (PR_SET_PDEATHSIG).
            log.warning("second signal: exiting at once", signal=name)
            os._exit(EXIT_FORCED)
        stop_requested = True
        log.info("signal received: shutting down", signal=name)
        service.request_stop(name)

    for signum in _SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    while _early_signals:  # a signal during preflight stops the boot before it starts
        on_signal(_early_signals.pop(0))
    try:
        result = await service.run()
    finally:
        for signum in _SIGNALS:
            loop.remove_signal_handler(signum)
    if result.boot_error is not None and stop_requested and result.clean:
        log.info("stopped during boot")
        return 0
    if result.deadline_hit:
        log.error("shutdown deadline hit; abandoned workers", stragglers=list(result.stragglers))
    elif result.boot_error is not None:
        log.error("boot failed", reason=result.boot_error)
    elif result.failed_required:
        log.error("required worker failed", workers=list(result.failed_required))
    else:
        log.info("stopped cleanly", elapsed_s=round(result.elapsed_s, 3))
    return result.exit_code


async def check(settings: EsperSettings) -> int:
    await _preflight(settings)
    where = "external Redis" if settings.redis_url else f"embedded Redis under {settings.var_dir}"
    print(f"esper-weatherlight-service: configuration and preflight OK ({where})")
    return 0


def service_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.check:  # until the loop's handlers exist, remember signals instead of dying
        for signum in _SIGNALS:
            signal.signal(signum, _remember_signal)

    from esper.core.cli import run_main
    from esper.core.instance_lock import AlreadyRunning
    from esper.core.logs import configure_logging, get_logger
    from esper.core.settings import load_settings
    from esper.weatherlight.preflight import PreflightError

    def body() -> int:
        # The secret is checked by preflight, so a missing secret is listed with every other problem.
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        get_logger("esper.weatherlight.cli").info("settings", **settings.masked())
        try:
            return asyncio.run(check(settings) if args.check else serve(settings))
        except PreflightError as exc:
            print(f"esper-weatherlight-service: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except AlreadyRunning as exc:
            print(f"esper-weatherlight-service: {exc}", file=sys.stderr)
            return EXIT_CONFIG

    return run_main(body)


def main() -> None:
    code = service_main()
    # Everything is drained and closed by now. Skip the interpreter's module teardown, which
    # takes ~0.6 s with torch loaded and would dominate SIGTERM -> exit; flush output first.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
