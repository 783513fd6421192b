"""Entry-point plumbing and ``esper-config``.

Every console script runs its body through ``run_main`` so that a bad or
missing setting prints one line naming the variable and exits with status 2
instead of a traceback (and never prints a secret value). An unexpected
failure still exits 1 with its traceback, but the traceback is printed with
URL passwords masked. A reader that stops reading our output early (``| head``)
is no failure: the command ends quietly with status 0.

``esper-config`` shows the resolved settings (secrets masked) and, with
``init``, writes the ``.env`` every process in the directory shares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from esper.core.errors import ConfigError
from esper.core.redact import mask_url
from esper.core.settings import load_settings

EXIT_FAILURE = 1
EXIT_CONFIG = 2


def run_main(body: Callable[[], int]) -> int:
    """Run ``body``; report ``ConfigError`` on stderr and return exit status 2.

    Anything else unexpected is printed as a traceback with URL passwords
    masked (Python's own report would print them) and ends with status 1.
    """
    try:
        return body()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:
        # Point stdout at /dev/null, or the interpreter's last flush would fail on the pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception:  # noqa: BLE001 - reported in full (masked) and turned into the exit status
        print(mask_url(traceback.format_exc()), file=sys.stderr, end="")
        return EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esper-config",
        description="Validate Esper-Lite settings from the environment and .env, then print them as "
        "JSON with secrets and URL passwords masked (the default, or 'show'); 'init' writes a .env "
        "with a fresh ESPER_LEYLINE_SECRET for every process started in this directory.",
        epilog="Exit status: 0 ok; 2 invalid configuration, or init could not write the file.",
    )
    _add_require_secret(parser)
    commands = parser.add_subparsers(dest="command", metavar="{show,init}")
    show = commands.add_parser("show", help="print the resolved settings (the default)")
    _add_require_secret(show)
    init = commands.add_parser(
        "init",
        help="write .env (mode 0600) with a fresh ESPER_LEYLINE_SECRET",
        description="Write .env (mode 0600) with a fresh ESPER_LEYLINE_SECRET and the usual settings "
        "commented out at their defaults. An existing file is never overwritten without --force: "
        "one that already has a secret is left as it is (exit 0), one without is an error (exit 2).",
    )
    init.add_argument("--force", action="store_true", help="replace an existing file (and its secret)")
    init.add_argument(
        "--path", type=Path, default=None, help="the file to write (default: .env in this directory)"
    )
    return parser


def _add_require_secret(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--require-secret",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also fail when ESPER_LEYLINE_SECRET is missing or empty",
    )


def config_main(argv: Sequence[str] | None = None) -> int:
    """``esper-config``: show the settings, or ``init`` the shared ``.env``."""
    args = build_parser().parse_args(argv)

    def show() -> int:
        settings = load_settings(require_secret=getattr(args, "require_secret", False))
        print(json.dumps(settings.masked(), indent=2, sort_keys=True, default=str))
        return 0

    def init() -> int:
        from esper.core.env_file import ENV_FILE, EnvFileError, init_env_file

        try:
            result = init_env_file(args.path or ENV_FILE, force=args.force)
        except EnvFileError as exc:
            print(f"esper-config init: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"esper-config init: {result.message}")
        return 0

    return run_main(init if args.command == "init" else show)


def main() -> None:
    sys.exit(config_main())
