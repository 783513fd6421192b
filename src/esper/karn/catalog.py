"""Karn: the catalogue of blueprint descriptors.

The 50 default blueprints reproduce esper-lite v1 exactly (ids, names, tiers,
risk, stage, inclusive parameter bounds, quarantine and approval flags):
35 SAFE (stages 0-4), 7 EXPERIMENTAL (approval required, stage 5) and
8 HIGH_RISK (quarantine only and approval required, stage 6).

Callers always receive copies of the stored descriptors, so nothing they do
to a returned message changes the catalogue.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any, cast

from esper.leyline import leyline_pb2

Tier = int  # a leyline_pb2.BlueprintTier value

SAFE = leyline_pb2.BLUEPRINT_TIER_SAFE
EXPERIMENTAL = leyline_pb2.BLUEPRINT_TIER_EXPERIMENTAL
HIGH_RISK = leyline_pb2.BLUEPRINT_TIER_HIGH_RISK

Bounds = dict[str, tuple[float, float]]

# (id, name, risk, stage, {parameter: (min, max)}) per tier, in v1 insertion order.
_SAFE: list[tuple[str, str, float, int, Bounds]] = [
    ("BP001", "identity_passthrough", 0.0, 0, {}),
    ("BP002", "linear_projection", 0.1, 0, {"scale": (0.5, 2.0)}),
    ("BP003", "layer_norm_basic", 0.1, 0, {"epsilon": (1e-6, 1e-3)}),
    ("BP004", "dropout_light", 0.2, 0, {"dropout": (0.0, 0.4)}),
    ("BP005", "relu_activation", 0.1, 0, {}),
    ("BP006", "batch_norm_1d", 0.2, 0, {"momentum": (0.5, 0.99)}),
    ("BP007", "pooling_max", 0.2, 0, {"kernel": (2, 5)}),
    ("BP008", "skip_connection", 0.2, 1, {}),
    ("BP009", "residual_block", 0.3, 1, {"depth": (1, 4)}),
    ("BP010", "concat_fusion", 0.3, 1, {"branches": (2, 4)}),
    ("BP011", "gelu_activation", 0.2, 1, {}),
    ("BP012", "layer_scaling", 0.3, 1, {"scale": (0.8, 1.2)}),
    ("BP013", "grouped_conv", 0.4, 1, {"groups": (2, 8)}),
    ("BP014", "highway_gate", 0.4, 1, {"gate_bias": (-3.0, 3.0)}),
    ("BP015", "depthwise_separable", 0.4, 2, {"kernel": (3, 7)}),
    ("BP016", "squeeze_excitation", 0.4, 2, {"reduction": (4, 16)}),
    ("BP017", "channel_attention", 0.4, 2, {"heads": (1, 4)}),
    ("BP018", "spatial_attention", 0.4, 2, {"radius": (1, 3)}),
    ("BP019", "cross_attention", 0.5, 2, {"heads": (2, 4)}),
    ("BP020", "attention_single_head", 0.5, 2, {"sequence_length": (16, 256)}),
    ("BP021", "feedforward_gated", 0.5, 2, {"hidden_multiple": (2, 6)}),
    ("BP022", "multi_head_attention_4", 0.5, 3, {"heads": (4, 6)}),
    ("BP023", "transformer_block", 0.5, 3, {"layers": (1, 6)}),
    ("BP024", "conv_transformer", 0.5, 3, {"kernel": (3, 11)}),
    ("BP025", "dynamic_conv", 0.5, 3, {"experts": (2, 8)}),
    ("BP026", "adaptive_pooling", 0.5, 3, {"output_size": (4, 16)}),
    ("BP027", "feature_pyramid", 0.5, 3, {"levels": (3, 5)}),
    ("BP028", "dense_connection", 0.5, 3, {"growth_rate": (8, 48)}),
    ("BP029", "multi_head_attention_8", 0.5, 4, {"heads": (8, 10)}),
    ("BP030", "graph_attention", 0.5, 4, {"hops": (1, 3)}),
    ("BP031", "temporal_conv", 0.5, 4, {"dilation": (1, 5)}),
    ("BP032", "dilated_conv", 0.5, 4, {"dilation": (1, 8)}),
    ("BP033", "deformable_conv", 0.5, 4, {"offset_groups": (1, 4)}),
    ("BP034", "non_local_block", 0.5, 4, {"window": (4, 16)}),
    ("BP035", "learned_positional", 0.5, 4, {"frequency": (0.1, 1.0)}),
]
_EXPERIMENTAL: list[tuple[str, str, float, int, Bounds]] = [
    ("BP036", "mixture_of_experts_4", 0.7, 5, {"experts": (4, 8), "capacity": (1, 2)}),
    ("BP037", "hierarchical_attention", 0.7, 5, {"levels": (2, 4)}),
    ("BP038", "memory_augmented", 0.8, 5, {"memory_slots": (32, 128)}),
    ("BP039", "neural_ode_block", 0.8, 5, {"steps": (1, 10)}),
    ("BP040", "differentiable_nas", 0.8, 5, {"temperature": (0.5, 2.0)}),
    ("BP041", "meta_learning_layer", 0.8, 5, {"adapt_steps": (1, 5)}),
    ("BP042", "recursive_processing", 0.8, 5, {"depth": (2, 6)}),
]
_HIGH_RISK: list[tuple[str, str, float, int, Bounds]] = [
    ("BP043", "exploding_gradient", 0.9, 6, {"scale": (5, 20)}),
    ("BP044", "vanishing_gradient", 0.9, 6, {"decay": (0.0, 0.1)}),
    ("BP045", "nan_injection", 1.0, 6, {"frequency": (0.01, 0.1)}),
    ("BP046", "infinite_loop", 1.0, 6, {"iterations": (1000, 10000)}),
    ("BP047", "memory_leak", 1.0, 6, {"growth_rate": (1, 5)}),
    ("BP048", "deadlock_pattern", 1.0, 6, {"threads": (2, 16)}),
    ("BP049", "race_condition", 0.9, 6, {"window_ns": (10, 1000)}),
    ("BP050", "adversarial_noise", 0.9, 6, {"epsilon": (0.1, 1.0)}),
]

CONSERVATIVE_POOL_SIZE = 10


class UnknownBlueprintError(KeyError):
    """The blueprint id is not in the catalogue (a ``KeyError`` naming the id)."""

    def __init__(self, blueprint_id: str) -> None:
        super().__init__(blueprint_id)
        self.blueprint_id = blueprint_id

    def __str__(self) -> str:
        return f"unknown blueprint {self.blueprint_id!r}"


class InvalidParametersError(ValueError):
    """A request's parameters are missing, out of bounds, unknown or not finite."""

    def __init__(self, blueprint_id: str, problems: list[str]) -> None:
        self.blueprint_id = blueprint_id
        self.problems = list(problems)
        super().__init__(f"invalid parameters for {blueprint_id}: " + "; ".join(self.problems))


def _descriptor(
    blueprint_id: str, name: str, tier: int, risk: float, stage: int, bounds: Bounds
) -> leyline_pb2.BlueprintDescriptor:
    desc = leyline_pb2.BlueprintDescriptor(
        blueprint_id=blueprint_id,
        name=name,
        tier=cast(Any, tier),
        risk=risk,
        stage=stage,
        quarantine_only=tier == HIGH_RISK,
        approval_required=tier in (EXPERIMENTAL, HIGH_RISK),
        description=f"{name.replace('_', ' ')} ({leyline_pb2.BlueprintTier.Name(cast(Any, tier))})",
    )
    for key, (low, high) in bounds.items():
        desc.allowed_parameters[key].min_value = float(low)
        desc.allowed_parameters[key].max_value = float(high)
    return desc


def default_descriptors() -> list[leyline_pb2.BlueprintDescriptor]:
    """Fresh copies of the 50 v1 default descriptors, in catalogue order."""
    out: list[leyline_pb2.BlueprintDescriptor] = []
    for tier, rows in ((SAFE, _SAFE), (EXPERIMENTAL, _EXPERIMENTAL), (HIGH_RISK, _HIGH_RISK)):
        out.extend(_descriptor(bid, name, tier, risk, stage, b) for bid, name, risk, stage, b in rows)
    return out


def _copy(desc: leyline_pb2.BlueprintDescriptor) -> leyline_pb2.BlueprintDescriptor:
    clone = leyline_pb2.BlueprintDescriptor()
    clone.CopyFrom(desc)
    return clone


class KarnCatalog:
    """In-memory blueprint catalogue; every accessor returns copies."""

    def __init__(self, *, load_defaults: bool = True) -> None:
        self._items: dict[str, leyline_pb2.BlueprintDescriptor] = {}
        if load_defaults:
            for desc in default_descriptors():
                self._items[desc.blueprint_id] = desc

    # -- registry ------------------------------------------------------------

    def register(self, descriptor: leyline_pb2.BlueprintDescriptor) -> None:
        if not descriptor.blueprint_id:
            raise ValueError("descriptor has no blueprint_id")
        for key, bounds in descriptor.allowed_parameters.items():
            if not (math.isfinite(bounds.min_value) and math.isfinite(bounds.max_value)):
                raise ValueError(f"parameter {key!r} of {descriptor.blueprint_id} has non-finite bounds")
            if bounds.min_value > bounds.max_value:
                raise ValueError(f"parameter {key!r} of {descriptor.blueprint_id} has min > max")
        self._items[descriptor.blueprint_id] = _copy(descriptor)

    def remove(self, blueprint_id: str) -> None:
        if self._items.pop(blueprint_id, None) is None:
            raise UnknownBlueprintError(blueprint_id)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, blueprint_id: object) -> bool:
        return blueprint_id in self._items

    def ids(self) -> list[str]:
        return list(self._items)

    def get(self, blueprint_id: str) -> leyline_pb2.BlueprintDescriptor:
        try:
            return _copy(self._items[blueprint_id])
        except KeyError:
            raise UnknownBlueprintError(blueprint_id) from None

    def all(self) -> list[leyline_pb2.BlueprintDescriptor]:
        return [_copy(d) for d in self._items.values()]

    def list_by_tier(self, tier: int) -> list[leyline_pb2.BlueprintDescriptor]:
        return [_copy(d) for d in self._items.values() if d.tier == tier]

    # -- requests ------------------------------------------------------------

    def validate_request(self, blueprint_id: str, parameters: Mapping[str, Any] | None) -> dict[str, float]:
        """Check a request and return its parameters as floats.

        Every allowed parameter is required and bounds are inclusive; unknown
        extra parameters and non-finite values are rejected. All problems are
        reported together in one :class:`InvalidParametersError`.
        """
        desc = self._items.get(blueprint_id)
        if desc is None:
            raise UnknownBlueprintError(blueprint_id)
        params = dict(parameters or {})
        problems: list[str] = []
        clean: dict[str, float] = {}
        for key, bounds in sorted(desc.allowed_parameters.items()):
            rng = f"[{bounds.min_value:g}, {bounds.max_value:g}] inclusive"
            if key not in params:
                problems.append(f"parameter {key!r} is missing (allowed {rng})")
                continue
            try:
                value = float(params[key])
            except (TypeError, ValueError):
                problems.append(f"parameter {key!r} is not a number (allowed {rng})")
                continue
            if not math.isfinite(value) or not bounds.min_value <= value <= bounds.max_value:
                problems.append(f"parameter {key!r}={value:g} is out of bounds {rng}")
                continue
            clean[key] = value
        extra = sorted(set(params) - set(desc.allowed_parameters))
        for key in extra:
            allowed = ", ".join(sorted(desc.allowed_parameters)) or "none"
            problems.append(f"parameter {key!r} is not allowed (allowed: {allowed})")
        if problems:
            raise InvalidParametersError(blueprint_id, problems)
        return clean

    def default_parameters(self, blueprint_id: str) -> dict[str, float]:
        """The midpoint of each parameter's bounds."""
        desc = self._items.get(blueprint_id)
        if desc is None:
            raise UnknownBlueprintError(blueprint_id)
        return {key: (b.min_value + b.max_value) / 2.0 for key, b in sorted(desc.allowed_parameters.items())}

    def choose_template(
        self,
        tier: int,
        context: str | bytes | None = None,
        *,
        allow_adversarial: bool = False,
        conservative: bool = False,
    ) -> leyline_pb2.BlueprintDescriptor:
        """Pick a blueprint deterministically (v1 rules).

        1. keep the requested tier; drop HIGH_RISK unless ``allow_adversarial``;
        2. ``conservative`` keeps only the first 10 SAFE entries (insertion order);
        3. sort by id;
        4. no context → the first; otherwise SHA-256(context), first 4 bytes
           big-endian, modulo the number of candidates;
        5. ``ValueError`` when nothing remains.
        """
        candidates = [d for d in self._items.values() if d.tier == tier]
        if not allow_adversarial:
            candidates = [d for d in candidates if d.tier != HIGH_RISK]
        if conservative:
            candidates = [d for d in candidates if d.tier == SAFE][:CONSERVATIVE_POOL_SIZE]
        candidates.sort(key=lambda d: d.blueprint_id)
        if not candidates:
            raise ValueError(
                f"no blueprint available for tier {leyline_pb2.BlueprintTier.Name(cast(Any, tier))}"
                f" (allow_adversarial={allow_adversarial}, conservative={conservative})"
            )
        if context is None or context == "" or context == b"":
            return _copy(candidates[0])
        raw = context.encode("utf-8") if isinstance(context, str) else bytes(context)
        index = int.from_bytes(hashlib.sha256(raw).digest()[:4], "big") % len(candidates)
        return _copy(candidates[index])


def tier_of(value: int | str) -> int:
    """Accept a BlueprintTier number, full name (``BLUEPRINT_TIER_SAFE``) or short name (``safe``)."""
    if isinstance(value, int):
        leyline_pb2.BlueprintTier.Name(cast(Any, value))  # raises ValueError for unknown numbers
        return value
    text = value.strip().upper()
    if text.isdigit():
        return tier_of(int(text))
    if not text.startswith("BLUEPRINT_TIER_"):
        text = "BLUEPRINT_TIER_" + text
    return int(leyline_pb2.BlueprintTier.Value(text))


def ids_in(catalog: KarnCatalog, ids: Iterable[str]) -> list[str]:
    """Validate a list of ids against the catalogue (raises on the first unknown one)."""
    out: list[str] = []
    for bid in ids:
        if bid not in catalog:
            raise UnknownBlueprintError(bid)
        if bid not in out:
            out.append(bid)
    return out
