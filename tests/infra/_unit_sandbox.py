"""A stand-in for the systemd unit's sandbox, for a machine where no systemd runs.

The service is started as the unit starts it, with the restrictions that the
kernel can impose without systemd:

* ``ProtectSystem=strict`` + ``StateDirectory=esper``: a private mount
  namespace in which every mount is read-only except ``/var/lib/esper``
  (a bind mount of the test's state directory) and the private ``/tmp``;
* ``PrivateTmp=``: fresh tmpfs on ``/tmp`` and ``/var/tmp``;
* ``ProtectHome=``: empty tmpfs on ``/home`` and ``/root`` (the paths this
  interpreter, its venv and the checkout live under are bound back in,
  read-only: on a real host they live in ``/usr`` and ``/opt``);
* ``ProtectProc=invisible`` + ``ProcSubset=pid``: a private PID namespace
  with ``/proc`` mounted ``hidepid=invisible,subset=pid``;
* ``DynamicUser=`` / ``CapabilityBoundingSet=`` / ``NoNewPrivileges=``: an
  unprivileged uid with no capabilities and ``no_new_privs``;
* ``MemoryDenyWriteExecute=``: ``PR_SET_MDWE`` (kept across ``execve``);
* ``LimitNOFILE=`` (as far as the caller's hard limit allows) and ``UMask=``.

Not reproduced: the system-call filter, address families, ``PrivateUsers=``
and ``PrivateDevices=``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

NOBODY = 65534
STATE = "/var/lib/esper"

_SETUP = r"""
set -eu
state="$1"; shift
# /var/lib/esper is the one writable place (the state directory).
mount -t tmpfs -o mode=0755 sandbox-var-lib /var/lib
mkdir /var/lib/esper
mount --bind "$state" /var/lib/esper
# Paths that must stay readable although the sandbox hides where they live (a home directory,
# or /tmp when the checkout is there): held aside, then put back over the fresh mounts.
hold=/var/lib/.hold
i=0
for keep in $SANDBOX_KEEP; do
  mkdir -p "$hold/$i" && mount --rbind "$keep" "$hold/$i"
  i=$((i + 1))
done
mount -t tmpfs -o mode=0755 sandbox-home /home
mount -t tmpfs -o mode=0755 sandbox-root /root
mount -t tmpfs -o mode=1777 sandbox-tmp /tmp
mount -t tmpfs -o mode=1777 sandbox-var-tmp /var/tmp
i=0
for keep in $SANDBOX_KEEP; do
  mkdir -p "$keep" && mount --move "$hold/$i" "$keep"
  i=$((i + 1))
done
# Everything read-only except the state directory and the private /tmp and /var/tmp.
awk '{print $2}' /proc/self/mounts | sort -u | while read -r m; do
  case "$m" in
    /var/lib/esper|/tmp|/var/tmp|/proc|/proc/*|/dev|/dev/*) ;;
    *) mount -o remount,bind,ro "$m" 2>/dev/null || true ;;
  esac
done
mount -t proc -o hidepid=invisible,subset=pid proc /proc
exec setpriv --reuid=$SANDBOX_UID --regid=$SANDBOX_UID --clear-groups \
  --inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"
"""

_EXEC = r"""
import ctypes, os, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "PR_SET_MDWE")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
limit = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
os.umask(0o077)
os.chdir(os.environ.pop("SANDBOX_CWD"))
os.execv(sys.argv[1], sys.argv[1:])
"""


def unavailable() -> str | None:
    """Why the sandbox cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces)"
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"no {tool}"
    probe = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"no mount/PID namespaces here: {probe.stderr.strip()}"
    if not Path("/proc/sys/kernel").exists():
        return "no /proc"
    return None


def _hidden_by_sandbox(path: Path) -> bool:
    """Whether the sandbox mounts something over the place ``path`` lives in."""
    return path.parts[1:2] in (("root",), ("home",), ("tmp",)) or path.parts[1:3] == ("var", "tmp")


def sandboxed(argv: list[str], state: Path, keep: list[Path]) -> tuple[list[str], dict[str, str]]:
    """The command and extra environment that run ``argv`` in the sandbox, state at /var/lib/esper."""
    state.chmod(0o700)
    os.chown(state, NOBODY, NOBODY)
    kept = sorted({str(p.resolve()) for p in keep if _hidden_by_sandbox(p.resolve())})
    command = [
        "unshare",
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        _SETUP,
        "sandbox",
        str(state),
        sys.executable,
        "-c",
        _EXEC,
        *argv,
    ]
    env = {"SANDBOX_KEEP": " ".join(kept), "SANDBOX_UID": str(NOBODY), "SANDBOX_CWD": STATE}
    return command, env
