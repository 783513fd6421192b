from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from esper.karn import InvalidParametersError, KarnCatalog, UnknownBlueprintError
from esper.leyline import leyline_pb2
from esper.tezzeret import (
    BLUEPRINT_FAMILIES,
    CompileError,
    TezzeretCompiler,
    build_kernel,
    family_for,
)
from esper.urza import FAMILIES, compute_guard_digest, load_bytes, parse_manifest
from esper.urza.artifact import sha256_hex

ALL_IDS = [f"BP{n:03d}" for n in range(1, 51)]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "blueprints.md"


@pytest.fixture(scope="module")
def compiler(tmp_path_factory: pytest.TempPathFactory) -> TezzeretCompiler:
    return TezzeretCompiler(tmp_path_factory.mktemp("artifacts"), prewarm_iterations=3)


def test_every_blueprint_has_a_documented_family() -> None:
    assert sorted(BLUEPRINT_FAMILIES) == ALL_IDS
    assert {family for family, _ in BLUEPRINT_FAMILIES.values()} <= set(FAMILIES)
    doc = DOCS.read_text()
    for bid in ALL_IDS:
        family, _ = BLUEPRINT_FAMILIES[bid]
        assert f"| {bid} |" in doc, bid
        assert f"`{family}`" in doc, bid
    import esper.tezzeret.kernels as kernels

    assert all(bid in (kernels.__doc__ or "") for bid in ALL_IDS)


def test_quarantine_blueprints_are_identity() -> None:
    catalog = KarnCatalog()
    for bid in ALL_IDS[42:]:
        assert family_for(bid, catalog.default_parameters(bid))[0] == "identity"


@pytest.mark.slow
@pytest.mark.parametrize("d", [16, 32])
def test_every_blueprint_compiles_runs_and_reloads(compiler: TezzeretCompiler, d: int) -> None:
    for bid in ALL_IDS:
        result = compiler.compile(bid, d=d)
        blob = result.artifact_path.read_bytes()
        assert sha256_hex(blob) == result.checksum
        module, manifest = load_bytes(
            blob, expected_checksum=result.checksum, expected_guard=result.guard_digest
        )
        assert manifest.blueprint_id == bid
        assert manifest.d == d
        module.train()
        x = torch.randn(3, d, requires_grad=True)
        y = module(x)
        assert y.shape == (3, d), bid
        y.square().mean().backward()
        assert x.grad is not None, bid
        assert torch.isfinite(x.grad).all(), bid
        for p in module.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), bid
        assert result.compile_ms > 0
        assert len(result.prewarm_samples_ms) == 3
        update = result.catalog_update
        assert isinstance(update, leyline_pb2.KernelCatalogUpdate)
        assert update.artifact_ref == f"urza://{bid}/{result.checksum[:16]}"
        assert update.prewarm_ms == pytest.approx(result.prewarm_p50_ms)


def test_named_families_behave(compiler: TezzeretCompiler) -> None:
    d = 12
    x = torch.randn(5, d)
    ident = build_kernel("BP001", {}, d)
    assert torch.equal(ident(x), x)
    lin = build_kernel("BP002", {"scale": 2.0}, d)
    assert torch.allclose(lin(x), lin.proj(x) * 2.0)
    ln = build_kernel("BP003", {"epsilon": 1e-5}, d)
    assert torch.allclose(ln(x).mean(dim=-1), torch.zeros(5), atol=1e-5)
    relu = build_kernel("BP005", {}, d)
    assert (relu(x) >= 0).all()
    drop = build_kernel("BP004", {"dropout": 0.4}, d).eval()
    assert torch.equal(drop(x), x)
    res = build_kernel("BP009", {"depth": 4}, d)
    assert len(res.blocks) == 4
    gated = build_kernel("BP021", {"hidden_multiple": 3}, d)
    assert gated.gate.out_features == 36
    single = build_kernel("BP020", {"sequence_length": 64}, d)
    assert single.attn.num_heads == 1
    mha = build_kernel("BP022", {"heads": 5}, 7)  # heads need not divide d
    assert mha.attn.num_heads == 5
    assert mha(torch.randn(2, 7)).shape == (2, 7)
    mha8 = build_kernel("BP029", {"heads": 8}, d)
    assert mha8.attn.num_heads == 8
    scale = build_kernel("BP012", {"scale": 0.8}, d)
    assert torch.allclose(scale(x), x * 0.8)
    highway = build_kernel("BP014", {"gate_bias": -3.0}, d)
    assert torch.allclose(highway.gate.bias, torch.full((d,), -3.0))


def test_build_is_deterministic_and_artifacts_are_reproducible(tmp_path: Path) -> None:
    a = build_kernel("BP009", {"depth": 2}, 16)
    b = build_kernel("BP009", {"depth": 2}, 16)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)
    c1 = TezzeretCompiler(tmp_path / "one").compile("BP006", d=16)
    c2 = TezzeretCompiler(tmp_path / "two").compile("BP006", d=16)
    assert c1.checksum == c2.checksum  # batch-norm stats captured before the checks


def test_artifact_is_safetensors_not_pickle(compiler: TezzeretCompiler) -> None:
    result = compiler.compile("BP009", {"depth": 2}, d=32)
    blob = result.artifact_path.read_bytes()
    assert result.artifact_path.suffix == ".safetensors"
    assert not blob.startswith(b"\x80")
    assert not blob.startswith(b"PK")
    with pytest.raises(Exception):  # noqa: B017,PT011 - not a pickle at all
        pickle.loads(blob)
    with safe_open(str(result.artifact_path), framework="pt") as fh:
        manifest = json.loads(fh.metadata()["esper_manifest"])
    assert manifest["family"] == "residual_mlp"
    assert manifest["family_args"] == {"depth": 2}
    assert manifest["guard_digest"] == result.guard_digest
    assert manifest["torch_version"] == torch.__version__
    assert parse_manifest(blob).parameters == {"depth": 2.0}


def test_guard_digest_definition(compiler: TezzeretCompiler) -> None:
    result = compiler.compile("BP002", {"scale": 1.5}, d=8)
    assert result.guard_digest == compute_guard_digest("BP002", {"scale": 1.5}, 8, "float32")
    assert result.guard_digest != compute_guard_digest("BP002", {"scale": 1.5}, 9, "float32")
    assert result.guard_digest != compute_guard_digest("BP002", {"scale": 1.25}, 8, "float32")
    assert result.guard_digest != compute_guard_digest("BP002", {"scale": 1.5}, 8, "float64")


def test_other_dtypes(compiler: TezzeretCompiler) -> None:
    result = compiler.compile("BP021", {"hidden_multiple": 2}, d=8, dtype="float64")
    module, manifest = load_bytes(result.artifact_path.read_bytes())
    assert manifest.dtype == "float64"
    assert module(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64


def test_bad_requests(compiler: TezzeretCompiler) -> None:
    with pytest.raises(UnknownBlueprintError):
        compiler.compile("BP404", d=8)
    with pytest.raises(InvalidParametersError, match="depth"):
        compiler.compile("BP009", {"depth": 9}, d=8)
    with pytest.raises(ValueError, match="positive"):
        compiler.compile("BP001", d=0)
    with pytest.raises(ValueError, match="dtype"):
        compiler.compile("BP001", d=4, dtype="int8")


def test_failed_checks_raise_compile_error(compiler: TezzeretCompiler, monkeypatch) -> None:
    import esper.tezzeret.compiler as mod

    class Bad(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1] * self.w

    monkeypatch.setattr(mod, "build_kernel", lambda *a, **k: Bad())
    with pytest.raises(CompileError, match="shape_mismatch"):
        compiler.compile("BP001", d=8)

    class NaN(Bad):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float("nan") * self.w

    monkeypatch.setattr(mod, "build_kernel", lambda *a, **k: NaN())
    with pytest.raises(CompileError, match="non_finite_output"):
        compiler.compile("BP001", d=8)
