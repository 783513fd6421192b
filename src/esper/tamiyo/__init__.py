"""Tamiyo: the controller that decides how the host model grows.

Bus-independent core: :class:`TamiyoController` turns SystemStatePackets
into signed commands, telemetry and field reports; policy updates go through
:meth:`TamiyoController.apply_policy_update`. :class:`TamiyoService` runs it
on Oona (states and policy updates in; commands, reports, telemetry out).

Nothing here imports torch: :class:`TamiyoPolicy` is evaluated with numpy
and policy updates are safetensors read with numpy, so the control plane
stays small. Offline training (torch) lives in :mod:`esper.tamiyo.simic`,
including ``publish_simic_update``.
"""

from esper.tamiyo.controller import TamiyoController
from esper.tamiyo.decision import FEATURE_METRIC_PREFIX, ControllerConfig, Decision
from esper.tamiyo.features import FEATURE_DIM, FEATURE_NAMES, extract_features
from esper.tamiyo.field_reports import FieldReportStore, generate_field_report
from esper.tamiyo.metadata import BlueprintMetadataSource, CachedBlueprintMetadata, StaticBlueprintMetadata
from esper.tamiyo.payload import PayloadError, decode_payload
from esper.tamiyo.policy import (
    DEFAULT_BLUEPRINT_CANDIDATES,
    PolicyAction,
    PolicyConfig,
    PolicyOutput,
    TamiyoPolicy,
)
from esper.tamiyo.registry import (
    PolicyUpdateResult,
    TamiyoPolicyRegistry,
    encode_policy,
    policy_version_of,
)
from esper.tamiyo.service import TamiyoService

__all__ = [
    "DEFAULT_BLUEPRINT_CANDIDATES",
    "FEATURE_DIM",
    "FEATURE_METRIC_PREFIX",
    "FEATURE_NAMES",
    "BlueprintMetadataSource",
    "CachedBlueprintMetadata",
    "ControllerConfig",
    "Decision",
    "FieldReportStore",
    "PayloadError",
    "PolicyAction",
    "PolicyConfig",
    "PolicyOutput",
    "PolicyUpdateResult",
    "StaticBlueprintMetadata",
    "TamiyoController",
    "TamiyoPolicy",
    "TamiyoPolicyRegistry",
    "TamiyoService",
    "decode_payload",
    "encode_policy",
    "extract_features",
    "generate_field_report",
    "policy_version_of",
]
