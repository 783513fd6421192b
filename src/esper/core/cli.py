"""Entry-point plumbing: configuration errors end the process cleanly.

Every console script runs its body through ``run_main`` so that a bad or
missing setting prints one line naming the variable and exits with status 2
instead of a traceback (and never prints a secret value).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from esper.core.errors import ConfigError
from esper.core.settings import load_settings

EXIT_CONFIG = 2


def run_main(body: Callable[[], int]) -> int:
    """Run ``body``; report ``ConfigError`` on stderr and return exit status 2."""
    try:
        return body()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def config_main(argv: Sequence[str] | None = None) -> int:
    """``esper-config``: print the resolved settings as JSON with secrets masked."""
    parser = argparse.ArgumentParser(
        prog="esper-config",
        description="Validate Esper-Lite settings from the environment and .env, "
        "then print them as JSON with secrets masked. Exits 2 on invalid configuration.",
    )
    parser.add_argument(
        "--require-secret",
        action="store_true",
        help="also fail when ESPER_LEYLINE_SECRET is missing or empty",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        settings = load_settings(require_secret=args.require_secret)
        print(json.dumps(settings.masked(), indent=2, sort_keys=True, default=str))
        return 0

    return run_main(body)


def main() -> None:
    sys.exit(config_main())
