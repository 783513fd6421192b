from __future__ import annotations

import hashlib

import pytest

from esper.karn import (
    EXPERIMENTAL,
    HIGH_RISK,
    SAFE,
    InvalidParametersError,
    KarnCatalog,
    UnknownBlueprintError,
    tier_of,
)
from esper.leyline import leyline_pb2


@pytest.fixture
def catalog() -> KarnCatalog:
    return KarnCatalog()


def test_counts_and_order(catalog: KarnCatalog) -> None:
    assert len(catalog) == 50
    assert [d.blueprint_id for d in catalog.all()] == [f"BP{n:03d}" for n in range(1, 51)]
    assert len(catalog.list_by_tier(SAFE)) == 35
    assert len(catalog.list_by_tier(EXPERIMENTAL)) == 7
    assert len(catalog.list_by_tier(HIGH_RISK)) == 8


def test_tier_flags_and_stages(catalog: KarnCatalog) -> None:
    for d in catalog.list_by_tier(SAFE):
        assert not d.quarantine_only
        assert not d.approval_required
        assert d.stage <= 4
    for d in catalog.list_by_tier(EXPERIMENTAL):
        assert d.approval_required
        assert not d.quarantine_only
        assert d.stage == 5
    for d in catalog.list_by_tier(HIGH_RISK):
        assert d.approval_required
        assert d.quarantine_only
        assert d.stage == 6


@pytest.mark.parametrize(
    ("bid", "name", "tier", "risk", "stage", "bounds"),
    [
        ("BP001", "identity_passthrough", SAFE, 0.0, 0, {}),
        ("BP003", "layer_norm_basic", SAFE, 0.1, 0, {"epsilon": (1e-6, 1e-3)}),
        ("BP009", "residual_block", SAFE, 0.3, 1, {"depth": (1, 4)}),
        ("BP014", "highway_gate", SAFE, 0.4, 1, {"gate_bias": (-3, 3)}),
        ("BP022", "multi_head_attention_4", SAFE, 0.5, 3, {"heads": (4, 6)}),
        ("BP035", "learned_positional", SAFE, 0.5, 4, {"frequency": (0.1, 1.0)}),
        ("BP036", "mixture_of_experts_4", EXPERIMENTAL, 0.7, 5, {"experts": (4, 8), "capacity": (1, 2)}),
        ("BP038", "memory_augmented", EXPERIMENTAL, 0.8, 5, {"memory_slots": (32, 128)}),
        ("BP046", "infinite_loop", HIGH_RISK, 1.0, 6, {"iterations": (1000, 10000)}),
        ("BP050", "adversarial_noise", HIGH_RISK, 0.9, 6, {"epsilon": (0.1, 1.0)}),
    ],
)
def test_exact_entries(catalog: KarnCatalog, bid, name, tier, risk, stage, bounds) -> None:
    d = catalog.get(bid)
    assert (d.blueprint_id, d.name, d.tier, d.stage) == (bid, name, tier, stage)
    assert d.risk == pytest.approx(risk)
    got = {k: (v.min_value, v.max_value) for k, v in d.allowed_parameters.items()}
    assert got == {k: (float(lo), float(hi)) for k, (lo, hi) in bounds.items()}


def test_get_returns_copies(catalog: KarnCatalog) -> None:
    d = catalog.get("BP002")
    d.name = "mutated"
    d.allowed_parameters["scale"].max_value = 99
    assert catalog.get("BP002").name == "linear_projection"
    assert catalog.get("BP002").allowed_parameters["scale"].max_value == 2.0
    catalog.all()[0].name = "x"
    assert catalog.get("BP001").name == "identity_passthrough"


def test_unknown_id_is_key_error_naming_it(catalog: KarnCatalog) -> None:
    with pytest.raises(KeyError) as info:
        catalog.get("BP999")
    assert isinstance(info.value, UnknownBlueprintError)
    assert "BP999" in str(info.value)
    with pytest.raises(UnknownBlueprintError, match="BP777"):
        catalog.validate_request("BP777", {})


def test_validate_request(catalog: KarnCatalog) -> None:
    assert catalog.validate_request("BP009", {"depth": 4}) == {"depth": 4.0}
    assert catalog.validate_request("BP009", {"depth": 1}) == {"depth": 1.0}  # inclusive
    assert catalog.validate_request("BP001", None) == {}
    with pytest.raises(ValueError, match=r"'depth'=5 is out of bounds \[1, 4\] inclusive"):
        catalog.validate_request("BP009", {"depth": 5})
    with pytest.raises(ValueError, match=r"'scale' is missing \(allowed \[0.5, 2\] inclusive\)"):
        catalog.validate_request("BP002", {})
    with pytest.raises(InvalidParametersError, match="'bogus' is not allowed"):
        catalog.validate_request("BP002", {"scale": 1.0, "bogus": 1})
    with pytest.raises(ValueError, match="out of bounds"):
        catalog.validate_request("BP002", {"scale": float("nan")})
    with pytest.raises(InvalidParametersError) as info:
        catalog.validate_request("BP036", {"experts": 99})
    assert len(info.value.problems) == 2  # both problems reported together


def test_default_parameters_are_midpoints(catalog: KarnCatalog) -> None:
    assert catalog.default_parameters("BP009") == {"depth": 2.5}
    assert catalog.default_parameters("BP036") == {"capacity": 1.5, "experts": 6.0}
    for d in catalog.all():
        catalog.validate_request(d.blueprint_id, catalog.default_parameters(d.blueprint_id))


def test_choose_template_deterministic(catalog: KarnCatalog) -> None:
    assert catalog.choose_template(SAFE).blueprint_id == "BP001"
    safe_ids = sorted(d.blueprint_id for d in catalog.list_by_tier(SAFE))
    index = int.from_bytes(hashlib.sha256(b"run-42").digest()[:4], "big") % len(safe_ids)
    assert catalog.choose_template(SAFE, "run-42").blueprint_id == safe_ids[index]
    assert (
        catalog.choose_template(SAFE, "run-42").blueprint_id
        == catalog.choose_template(SAFE, b"run-42").blueprint_id
    )
    conservative = catalog.choose_template(SAFE, "run-42", conservative=True).blueprint_id
    i10 = int.from_bytes(hashlib.sha256(b"run-42").digest()[:4], "big") % 10
    assert conservative == f"BP{i10 + 1:03d}"
    assert catalog.choose_template(EXPERIMENTAL).blueprint_id == "BP036"
    with pytest.raises(ValueError, match="HIGH_RISK"):
        catalog.choose_template(HIGH_RISK)
    assert catalog.choose_template(HIGH_RISK, allow_adversarial=True).blueprint_id == "BP043"
    with pytest.raises(ValueError, match="no blueprint available"):
        catalog.choose_template(EXPERIMENTAL, conservative=True)


def test_register_and_remove() -> None:
    catalog = KarnCatalog(load_defaults=False)
    assert len(catalog) == 0
    desc = leyline_pb2.BlueprintDescriptor(blueprint_id="BPX", name="custom", tier=SAFE)
    desc.allowed_parameters["k"].min_value = 2
    desc.allowed_parameters["k"].max_value = 1
    with pytest.raises(ValueError, match="min > max"):
        catalog.register(desc)
    desc.allowed_parameters["k"].max_value = 3
    catalog.register(desc)
    assert catalog.choose_template(SAFE).blueprint_id == "BPX"
    catalog.remove("BPX")
    with pytest.raises(UnknownBlueprintError):
        catalog.remove("BPX")


def test_tier_of() -> None:
    assert tier_of("safe") == SAFE
    assert tier_of("BLUEPRINT_TIER_HIGH_RISK") == HIGH_RISK
    assert tier_of("2") == EXPERIMENTAL
    with pytest.raises(ValueError, match="NOPE"):
        tier_of("nope")
