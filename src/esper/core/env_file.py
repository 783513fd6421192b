"""The ``.env`` file that every Esper-Lite process started in a directory shares.

Every console script reads settings from the environment and from ``.env`` in
its working directory (the environment wins). ``esper-config init`` writes
that file once, with a fresh signing secret, so the service, Nissa, the forge,
the demo and ``esper-oona`` all sign and verify with the same key without
anyone copying it around. The secret must outlive restarts: the bus keeps its
entries, and a new secret would turn every kept entry into a ``bad_signature``
dead letter. So an existing file is never overwritten unless asked.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from esper.core.files import write_atomic
from esper.core.settings import MIN_SECRET_BYTES, PREVIOUS_SECRETS_ENV, SECRET_ENV, EsperSettings

ENV_FILE = Path(".env")
#: Settings shown (commented out, with their defaults) in a new ``.env``: the ones people change first.
_SHOWN = (
    "REDIS_URL",
    "ESPER_VAR_DIR",
    "URZA_DATABASE_URL",
    "URZA_ARTIFACT_DIR",
    "TAMIYO_POLICY_DIR",
    "WEATHERLIGHT_HTTP_HOST",
    "WEATHERLIGHT_HTTP_PORT",
    "NISSA_HTTP_HOST",
    "NISSA_HTTP_PORT",
    "ESP_LOG_LEVEL",
    "ESP_LOG_FORMAT",
)
_HEADER = f"""\
# Esper-Lite settings for every process started in this directory (written by esper-config init).
# esper-weatherlight-service, esper-nissa-service, esper-forge, esper-oona and esper-demo read this
# file from their working directory; a variable set in the environment wins over this file.
# Keep it private (mode 0600): it holds the bus's signing secret. `esper-config` shows what is in force.

# HMAC secret for every bus entry and command; every process of one platform needs the same value.
# Changing it makes entries already on the bus unverifiable: rotate by moving the old value to
# {PREVIOUS_SECRETS_ENV} (comma-separated) for a while.
"""


@dataclass(frozen=True)
class InitResult:
    path: Path
    created: bool
    message: str


class EnvFileError(Exception):
    """``.env`` cannot be written as asked; the message says why and what to do."""


def new_secret() -> str:
    """A fresh signing secret: 32 random bytes as 64 hex digits (far above ``MIN_SECRET_BYTES``)."""
    return secrets.token_hex(32)


def render(secret: str) -> str:
    """The text of a new ``.env``: the secret, then the usual settings commented out at their defaults."""
    lines = [_HEADER, f"{SECRET_ENV}={secret}", f"# {PREVIOUS_SECRETS_ENV}=", ""]
    lines.append("# Defaults, shown for reference: uncomment a line to change it (.env.example lists all).")
    lines.append("# REDIS_URL unset: the service runs its own private server under ESPER_VAR_DIR.")
    defaults = _defaults()
    lines.extend(f"# {name}={defaults[name]}" for name in _SHOWN)
    return "\n".join(lines) + "\n"


def init_env_file(path: Path = ENV_FILE, *, force: bool = False) -> InitResult:
    """Create ``path`` (mode 0600) with a fresh secret, unless it exists and ``force`` is false.

    An existing file that already holds a usable secret is left alone and
    reported as such (running the set-up command again is harmless); one
    without a usable secret is an ``EnvFileError``, as it cannot be fixed
    without replacing the file.
    """
    data = render(new_secret()).encode()
    try:
        write_atomic(path, data, mode=0o600, replace=force)
    except FileExistsError:
        if path.exists():
            return _existing(path)
        raise EnvFileError(f"cannot write {path}: {path.parent} is not a directory") from None
    except OSError as exc:
        raise EnvFileError(f"cannot write {path}: {exc.strerror or type(exc).__name__}") from None
    os.chmod(path, 0o600)  # whatever the umask
    verb = "replaced" if force else "wrote"
    note = ""
    if os.environ.get(SECRET_ENV, "").strip():
        note = f"\nnote: {SECRET_ENV} is also set in this environment, and wins over {path}: unset it"
    return InitResult(
        path,
        True,
        f"{verb} {path} (mode 0600) with a new {SECRET_ENV}; "
        f"Esper-Lite processes started in {path.resolve().parent} use it{note}",
    )


def _existing(path: Path) -> InitResult:
    if path.is_dir():
        raise EnvFileError(f"{path} is a directory; remove it or choose another file")
    try:
        values = dotenv_values(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise EnvFileError(f"{path} exists but cannot be read ({type(exc).__name__})") from None
    secret = (values.get(SECRET_ENV) or "").strip()
    if len(secret.encode()) >= MIN_SECRET_BYTES:
        return InitResult(
            path,
            False,
            f"{path} already exists and holds {SECRET_ENV}: left unchanged "
            "(--force writes a new file and a new secret, which makes entries already on the bus "
            "unverifiable)",
        )
    what = f"is shorter than {MIN_SECRET_BYTES} bytes" if secret else "is missing"
    raise EnvFileError(
        f"{path} already exists and its {SECRET_ENV} {what}; not overwriting it. "
        f"Set {SECRET_ENV} in it yourself, or run esper-config init --force to replace the file"
    )


def _defaults() -> dict[str, str]:
    shown: dict[str, str] = {}
    for name, info in EsperSettings.model_fields.items():
        alias = info.validation_alias
        choices = getattr(alias, "choices", None)
        env_name = str(choices[0]) if choices else name
        default = info.get_default(call_default_factory=True)
        if default is None:
            shown[env_name] = ""
        elif isinstance(default, Path) and not default.is_absolute():
            shown[env_name] = f"./{default}"
        else:
            shown[env_name] = str(default)
    return shown
