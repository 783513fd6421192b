"""Accepting or rejecting policy updates, and resuming the last accepted policy.

Rules (esper-lite v1 took any pickle, any version, ``strict=False``):

* **Version.** The monotonic policy version is ``int(update.tamiyo_policy_version)``
  when that string is set, otherwise ``update.version``. (Leyline's
  ``version`` fields elsewhere carry the schema version, so the explicit
  string wins; Simic sets both to the same number.) The string must be 1 to
  :data:`MAX_VERSION_DIGITS` ASCII digits (``malformed_version`` otherwise:
  no ``²``, no ``٣``, no 5,000-digit numbers; such an update is dead-lettered,
  never retried). The version must be strictly greater than the version in
  force (``stale_version``) and at most ``max_version_step`` (default
  :data:`MAX_VERSION_STEP`) greater (``version_jump``). The bound is what
  keeps one bogus far-future version - a typo such as ``99999999999`` - from
  being accepted, persisted and then making every later update stale
  forever; a publisher that really skips ahead does it in bounded steps, and
  the dead letter's reason says why it was refused. Every accepted version is
  persisted under a name the restart finds again (up to 18 digits), so it
  neither vanishes nor changes after a restart.
* **Freshness** (optional, ``max_age_s``): ``missing_timestamp``,
  ``stale_update`` or ``issued_in_future``. The bus already checks signature
  and freshness; this is defence in depth for callers outside the bus.
* **Payload** must be safetensors (:mod:`esper.tamiyo.payload`):
  ``unsafe_payload`` for pickles, ``malformed_payload`` for anything else.
* **Interface**: keys exactly equal (``key_mismatch``), shapes
  (``shape_mismatch``), dtypes (``dtype_mismatch``), recorded candidate list
  when present (``candidate_mismatch``), all values finite (``non_finite``).

Validation reads the safetensors header first (layout, dtypes, shapes and
candidates are refused before a byte of tensor data is decoded), then
decodes the arrays with safetensors' numpy API; no torch and no unpickling.
An accepted update becomes a *new* :class:`~esper.tamiyo.policy.TamiyoPolicy`
(the one in force is immutable), is persisted atomically to the policy
directory, and only then swapped in, so a rejection or a failed write leaves
the running policy byte-identical and a restart resumes the newest policy.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from esper.core import EsperSettings, get_logger
from esper.core.files import write_atomic
from esper.leyline import leyline_pb2
from esper.tamiyo.payload import PayloadError, decode_tensors, encode_tensors, layout, read_header
from esper.tamiyo.policy import PolicyConfig, TamiyoPolicy, WeightsMismatch, check_layout

_LOG = get_logger(__name__)
#: Most digits a policy version may have (every such number fits a signed 64-bit integer).
MAX_VERSION_DIGITS = 18
#: How far past the version in force an update may jump by default.
MAX_VERSION_STEP = 1000
_VERSION_RE = re.compile(rf"[0-9]{{1,{MAX_VERSION_DIGITS}}}")
_FILE_RE = re.compile(rf"^tamiyo-policy-v([0-9]{{10,{MAX_VERSION_DIGITS}}})\.safetensors$")
#: Tolerated clock skew for updates stamped slightly in the future.
FUTURE_SKEW_S = 5.0

META_VERSION = "tamiyo_policy_version"
META_POLICY_ID = "policy_id"
META_RUN_ID = "training_run_id"
META_CANDIDATES = "blueprint_candidates"


@dataclass(frozen=True)
class PolicyUpdateResult:
    """Outcome of one update; ``reason`` is ``"accepted"`` or a rejection code."""

    accepted: bool
    reason: str
    #: Version in force after the call.
    current_version: int
    #: Version the update claimed (None when it could not be read).
    update_version: int | None = None
    detail: str = ""


class PolicyRejected(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def policy_version_of(update: leyline_pb2.PolicyUpdate) -> int:
    """The monotonic version an update claims (see the module docstring)."""
    label = update.tamiyo_policy_version.strip(" \t\r\n")
    if label:
        if len(label) > MAX_VERSION_DIGITS:
            raise PolicyRejected(
                "malformed_version",
                f"tamiyo_policy_version has {len(label)} characters (at most {MAX_VERSION_DIGITS} digits)",
            )
        if not _VERSION_RE.fullmatch(label):
            raise PolicyRejected(
                "malformed_version", f"tamiyo_policy_version {label!r} is not ASCII decimal digits"
            )
        return int(label)
    if update.version == 0:
        raise PolicyRejected("malformed_version", "neither tamiyo_policy_version nor version is set")
    return int(update.version)


def policy_metadata(
    policy: TamiyoPolicy, version: int, policy_id: str, training_run_id: str = ""
) -> dict[str, str]:
    """Header metadata stored with every serialized policy."""
    return {
        META_VERSION: str(version),
        META_POLICY_ID: policy_id,
        META_RUN_ID: training_run_id,
        META_CANDIDATES: json.dumps(list(policy.blueprint_candidates)),
    }


def encode_policy(policy: TamiyoPolicy, version: int, policy_id: str, training_run_id: str = "") -> bytes:
    """The safetensors payload for ``policy`` (what a PolicyUpdate carries)."""
    return encode_tensors(policy.weights, policy_metadata(policy, version, policy_id, training_run_id))


def _check_candidates(config: PolicyConfig, metadata: Mapping[str, str]) -> None:
    recorded = metadata.get(META_CANDIDATES)
    if recorded is None:
        return
    try:
        candidates = json.loads(recorded)
    except json.JSONDecodeError:
        raise PolicyRejected("malformed_payload", "blueprint_candidates metadata is not JSON") from None
    if candidates != list(config.blueprint_candidates):
        raise PolicyRejected(
            "candidate_mismatch", f"payload candidates {candidates} != {list(config.blueprint_candidates)}"
        )


def load_policy(config: PolicyConfig, payload: bytes) -> tuple[TamiyoPolicy, dict[str, str]]:
    """The policy a payload holds, with its metadata; :class:`PolicyRejected` unless it fits ``config``.

    The header is checked before anything is decoded: layout (keys, shapes,
    dtypes) and recorded candidates, then the arrays must be finite.
    """
    try:
        header = read_header(payload)
        check_layout(config, layout(header))
        _check_candidates(config, header.metadata)
        return TamiyoPolicy(config, decode_tensors(payload)), header.metadata
    except (PayloadError, WeightsMismatch) as exc:
        raise PolicyRejected(exc.reason, exc.detail) from None


class TamiyoPolicyRegistry:
    """Holds the policy in force and its version; the only way to change either."""

    def __init__(
        self,
        policy: TamiyoPolicy | None = None,
        *,
        policy_dir: Path | None = None,
        version: int = 0,
        policy_id: str = "tamiyo-default",
        clock: Callable[[], float] = time.time,
        keep_files: int = 3,
        max_version_step: int = MAX_VERSION_STEP,
    ) -> None:
        self._policy = policy if policy is not None else TamiyoPolicy()
        self._max_step = max(1, max_version_step)
        self._policy_dir = policy_dir
        self._version = version
        self._policy_id = policy_id
        self._clock = clock
        self._keep_files = max(1, keep_files)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        settings: EsperSettings,
        config: PolicyConfig | None = None,
        *,
        policy_id: str = "tamiyo-default",
        clock: Callable[[], float] = time.time,
    ) -> TamiyoPolicyRegistry:
        """A registry persisting to ``settings.tamiyo_policy_dir``, resumed from it."""
        registry = cls(
            TamiyoPolicy(config),
            policy_dir=Path(settings.tamiyo_policy_dir),
            policy_id=policy_id,
            clock=clock,
        )
        registry.resume()
        return registry

    @property
    def policy(self) -> TamiyoPolicy:
        return self._policy

    @property
    def version(self) -> int:
        return self._version

    @property
    def policy_id(self) -> str:
        return self._policy_id

    @property
    def policy_dir(self) -> Path | None:
        return self._policy_dir

    def apply(
        self, update: leyline_pb2.PolicyUpdate, *, max_age_s: float | None = None
    ) -> PolicyUpdateResult:
        """Validate and (only if everything passes) install ``update``."""
        with self._lock:
            claimed: int | None = None
            try:
                claimed = policy_version_of(update)
                if claimed <= self._version:
                    raise PolicyRejected("stale_version", f"version {claimed} <= current {self._version}")
                if claimed - self._version > self._max_step:
                    raise PolicyRejected(
                        "version_jump",
                        f"version {claimed} is more than {self._max_step} past current {self._version}",
                    )
                if max_age_s is not None:
                    self._check_freshness(update, max_age_s)
                candidate, _ = load_policy(self._policy.config, update.payload)
                policy_id = update.policy_id or self._policy_id
                try:
                    self._persist(candidate, claimed, policy_id, update.training_run_id)
                except OSError as exc:
                    raise PolicyRejected("persist_failed", str(exc)) from None
            except PolicyRejected as exc:
                _LOG.warning(
                    "tamiyo.policy_update_rejected",
                    reason=exc.reason,
                    detail=exc.detail,
                    update_version=claimed,
                    current_version=self._version,
                )
                return PolicyUpdateResult(False, exc.reason, self._version, claimed, exc.detail)
            self._policy = candidate
            self._version = claimed
            self._policy_id = policy_id
            _LOG.info("tamiyo.policy_update_accepted", version=claimed, policy_id=policy_id)
            return PolicyUpdateResult(True, "accepted", claimed, claimed)

    def _check_freshness(self, update: leyline_pb2.PolicyUpdate, max_age_s: float) -> None:
        if not update.HasField("issued_at") or update.issued_at.ToNanoseconds() == 0:
            raise PolicyRejected("missing_timestamp", "issued_at is not set")
        age = self._clock() - update.issued_at.ToNanoseconds() / 1e9
        if age > max_age_s:
            raise PolicyRejected("stale_update", f"issued {age:.1f}s ago (max {max_age_s}s)")
        if age < -FUTURE_SKEW_S:
            raise PolicyRejected("issued_in_future", f"issued {-age:.1f}s in the future")

    def _persist(self, policy: TamiyoPolicy, version: int, policy_id: str, run_id: str) -> None:
        if self._policy_dir is None:
            return
        path = self._policy_dir / f"tamiyo-policy-v{version:010d}.safetensors"
        write_atomic(path, encode_policy(policy, version, policy_id, run_id))
        for old in self._persisted()[self._keep_files :]:
            old[1].unlink(missing_ok=True)

    def _persisted(self) -> list[tuple[int, Path]]:
        """Persisted policy files, newest version first."""
        if self._policy_dir is None or not self._policy_dir.is_dir():
            return []
        found = []
        for path in self._policy_dir.iterdir():
            match = _FILE_RE.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def resume(self) -> bool:
        """Load the newest valid persisted policy newer than the current one.

        Only accepted updates are persisted, so a file's version is trusted.
        Files that fail validation (corrupt, wrong architecture) are logged
        and skipped, never deleted, so an operator can inspect them.
        """
        with self._lock:
            for version, path in self._persisted():
                if version <= self._version:
                    break
                try:
                    policy, metadata = load_policy(self._policy.config, path.read_bytes())
                except (OSError, PolicyRejected) as exc:
                    _LOG.warning("tamiyo.policy_file_skipped", path=str(path), error=str(exc))
                    continue
                self._policy = policy
                self._version = version
                self._policy_id = metadata.get(META_POLICY_ID) or self._policy_id
                _LOG.info("tamiyo.policy_resumed", version=version, path=str(path))
                return True
            return False
