"""``esper-demo``: a small model grows under Weatherlight, live in the terminal."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from esper.core.cli import run_main
from esper.core.logs import configure_logging
from esper.demo.processes import ChildFailed
from esper.demo.run import DemoConfig, run_demo
from esper.grow import PlatformUnavailable

#: Exit statuses (also in ``--help``): 0 a seed was grafted, 1 a service or the platform failed,
#: 2 bad arguments or configuration, 3 the run finished without a graft (the reason is printed).
EXIT_GRAFTED, EXIT_FAILED, EXIT_NO_GRAFT = 0, 1, 3


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _epochs(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            "must be at least 2: seeds are grafted between epochs, in answer to an epoch's report, "
            "so a 1-epoch run can never graft"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esper-demo",
        description=(
            "Start Weatherlight (on its embedded Redis-protocol server, or REDIS_URL) and Nissa, "
            "forge the kernels Tamiyo may choose, then train an MLP on scikit-learn's bundled "
            "digits for a few epochs while Tamiyo grows it through the bus; then train the same "
            "host without growth and a static host of the grown model's final size on the same data. "
            "Prints a table per epoch, the three runs side by side and a summary, and writes a PNG plot."
        ),
        epilog=(
            "exit status: 0 a seed was grafted; 1 a service failed or the platform was unavailable; "
            "2 bad arguments or configuration; 3 the run finished without a graft (the reason is printed)"
        ),
    )
    parser.add_argument("--epochs", type=_epochs, default=8, help="training epochs, at least 2 (default 8)")
    parser.add_argument(
        "--hidden", type=_positive, default=32, help="hidden width = seed slot width (default 32)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("./var/demo"), help="state, logs and plot (default ./var/demo)"
    )
    parser.add_argument("--plot", type=Path, help="PNG path (default <workdir>/esper-demo.png)")
    parser.add_argument("--redis-url", help="use this Redis instead of an embedded server")
    parser.add_argument("--no-nissa", action="store_true", help="do not start Nissa")
    parser.add_argument("--limit", type=_positive, help="use only this many digits (quicker runs)")
    return parser


def demo_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = DemoConfig(
        epochs=args.epochs,
        hidden=args.hidden,
        workdir=args.workdir,
        plot_path=args.plot,
        redis_url=args.redis_url,
        with_nissa=not args.no_nissa,
        limit=args.limit,
    )

    def body() -> int:
        configure_logging("WARNING", "console")
        try:
            summary = asyncio.run(run_demo(config))
        except (ChildFailed, PlatformUnavailable) as exc:
            print(f"esper-demo: {exc}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_GRAFTED if summary.succeeded else EXIT_NO_GRAFT

    return run_main(body)


def main() -> None:
    sys.exit(demo_main())
