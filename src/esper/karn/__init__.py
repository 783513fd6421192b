"""Karn: the blueprint catalogue (50 v1 defaults, validated requests, template choice)."""

from esper.karn.catalog import (
    CONSERVATIVE_POOL_SIZE,
    EXPERIMENTAL,
    HIGH_RISK,
    SAFE,
    InvalidParametersError,
    KarnCatalog,
    UnknownBlueprintError,
    default_descriptors,
    ids_in,
    tier_of,
)

__all__ = [
    "CONSERVATIVE_POOL_SIZE",
    "EXPERIMENTAL",
    "HIGH_RISK",
    "SAFE",
    "InvalidParametersError",
    "KarnCatalog",
    "UnknownBlueprintError",
    "default_descriptors",
    "ids_in",
    "tier_of",
]
