"""Kernel families: the PyTorch modules every artifact is rebuilt from.

An artifact never contains code. It names a *family* and the family's
arguments (integers and floats); loading builds the module from this table
and copies the stored tensors into it with ``strict=True``. Every family maps
``[batch, d]`` to ``[batch, d]``.

The families live in Urza (not Tezzeret) because loading must rebuild them
and the package layers forbid Urza from importing Tezzeret; Tezzeret maps the
50 blueprint ids onto these families (``esper.tezzeret.kernels``).

============  ==============================================================
family        module (``x``: ``[batch, d]``)
============  ==============================================================
identity      ``x`` (no tensors)
linear        ``scale * W x + b`` (``W`` ``dxd``)
layer_norm    ``LayerNorm(d, eps)``
activation    ``relu(x)`` or ``gelu(x)``
dropout       ``Dropout(p)``
batch_norm    ``BatchNorm1d(d, momentum)`` (training mode needs batch ≥ 2)
max_pool      features as a length-``d`` signal, max-pool window ``k``, stride 1
skip_linear   ``x + W x``, ``W`` zero-initialised (starts as identity)
residual_mlp  ``depth`` pre-LN blocks ``x + W2 gelu(W1 LN(x))``, hidden ``2d``
shared_resid  one pre-LN block applied ``steps`` times, step size ``1/steps``
              (neural-ODE-like / recursive / unrolled adaptation)
concat        ``branches`` ``gelu(W_i x)`` concatenated, projected back to ``d``
layer_scale   ``gamma ⊙ x``, ``gamma`` initialised to ``scale``
grouped       block-diagonal linear with ``g`` groups, ``g`` the largest
              divisor of ``d`` not above the requested groups
highway       ``t ⊙ relu(W_h x) + (1 - t) ⊙ x``, ``t = sigmoid(W_t x + gate_bias)``
conv1d        features as a 1-channel signal of length ``d``: conv (kernel,
              dilation, 'same' padding) to 4 channels, gelu, 1x1 back, residual
squeeze_exc   ``x ⊙ sigmoid(W2 relu(W1 x))``, bottleneck ``max(1, d // reduction)``
attention     self-attention over the ``d`` features taken as ``d`` tokens of
              one scalar each: each token is lifted to ``heads x 4`` channels
              (plus a learned per-position embedding), attended with ``heads``
              heads, projected back to one scalar, added residually. Heads
              divide the embedding by construction, so any ``d`` works.
transformer   ``layers`` x (attention as above + pre-LN feed-forward ``2d``)
gated_ff      ``W2 (gelu(W_a x) ⊙ W_b x)``, hidden ``round(hidden_multiple·d)``
moe           dense mixture: ``softmax(W_g x / temperature)``-weighted sum of
              ``experts`` two-layer experts (hidden ``capacity·d``), residual
adapt_pool    ``x + W adaptive_avg_pool(x, output_size)``, ``W`` zero-init
positional    ``x + p``, ``p`` learned, initialised ``0.1 sin(frequency·i)``
memory        ``x + softmax(W_q x · K) V`` over ``memory_slots`` learned slots
============  ==============================================================

Construction is deterministic: :func:`build_family` seeds a private RNG from
the family, its arguments and ``d``, so two builds give identical weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from esper.urza import artifact as fmt

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

FamilyArgs = Mapping[str, int | float | str]


def dtype_of(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r} (choose from {', '.join(DTYPES)})") from None


class Identity(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Linear(nn.Module):
    def __init__(self, d: int, scale: float) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x) * self.scale
        return out


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=float(eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(x)
        return out


class Activation(nn.Module):
    def __init__(self, d: int, kind: str) -> None:
        super().__init__()
        if kind not in ("relu", "gelu"):
            raise ValueError(f"unknown activation {kind!r}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.kind == "relu" else F.gelu(x)


class Dropout(nn.Module):
    def __init__(self, d: int, p: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(float(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.drop(x)
        return out


class BatchNorm(nn.Module):
    def __init__(self, d: int, momentum: float) -> None:
        super().__init__()
        # Torch's momentum weights the *new* statistic; Karn's is the keep rate.
        self.norm = nn.BatchNorm1d(d, momentum=1.0 - float(momentum))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(x)
        return out


class MaxPool(nn.Module):
    def __init__(self, d: int, kernel: int) -> None:
        super().__init__()
        self.kernel = int(kernel)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        padded = F.pad(x.unsqueeze(1), (k // 2, k - 1 - k // 2), value=float("-inf"))
        return F.max_pool1d(padded, k, stride=1).squeeze(1)


class SkipLinear(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.proj(x)
        return out


class _Block(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(F.gelu(self.up(self.norm(x))))
        return out


class ResidualMLP(nn.Module):
    def __init__(self, d: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d, 2 * d) for _ in range(int(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class SharedResidual(nn.Module):
    def __init__(self, d: int, steps: int) -> None:
        super().__init__()
        self.block = _Block(d, 2 * d)
        self.steps = int(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = 1.0 / self.steps
        for _ in range(self.steps):
            x = x + h * self.block(x)
        return x


class Concat(nn.Module):
    def __init__(self, d: int, branches: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(d, d) for _ in range(int(branches)))
        self.fuse = nn.Linear(d * int(branches), d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fuse(torch.cat([F.gelu(b(x)) for b in self.branches], dim=-1))
        return out


class LayerScale(nn.Module):
    def __init__(self, d: int, scale: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def _largest_divisor_at_most(d: int, limit: int) -> int:
    return max(g for g in range(1, max(1, min(limit, d)) + 1) if d % g == 0)


class Grouped(nn.Module):
    def __init__(self, d: int, groups: int) -> None:
        super().__init__()
        self.groups = _largest_divisor_at_most(d, int(groups))
        self.conv = nn.Conv1d(d, d, 1, groups=self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x.unsqueeze(-1)).squeeze(-1)
        return out


class Highway(nn.Module):
    def __init__(self, d: int, gate_bias: float) -> None:
        super().__init__()
        self.transform = nn.Linear(d, d)
        self.gate = nn.Linear(d, d)
        nn.init.constant_(self.gate.bias, float(gate_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(self.gate(x))
        return t * F.relu(self.transform(x)) + (1.0 - t) * x


class Conv1d(nn.Module):
    def __init__(self, d: int, kernel: int, dilation: int = 1, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, int(channels), int(kernel), dilation=int(dilation), padding="same")
        self.mix = nn.Conv1d(int(channels), 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.mix(F.gelu(self.conv(x.unsqueeze(1)))).squeeze(1)
        return out


class SqueezeExcitation(nn.Module):
    def __init__(self, d: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, d // int(reduction))
        self.down = nn.Linear(d, hidden)
        self.up = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.up(F.relu(self.down(x))))


class FeatureAttention(nn.Module):
    """Self-attention over the d features, each a one-scalar token."""

    HEAD_DIM = 4

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        heads = max(1, int(heads))
        embed = heads * self.HEAD_DIM
        self.lift = nn.Linear(1, embed)
        self.position = nn.Parameter(torch.randn(d, embed) * 0.02)
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.out = nn.Linear(embed, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.lift(x.unsqueeze(-1)) + self.position  # [batch, d, embed]
        attended, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        out: torch.Tensor = x + self.out(attended).squeeze(-1)
        return out


class Transformer(nn.Module):
    def __init__(self, d: int, layers: int, heads: int = 2) -> None:
        super().__init__()
        self.attn = nn.ModuleList(FeatureAttention(d, heads) for _ in range(int(layers)))
        self.ff = nn.ModuleList(_Block(d, 2 * d) for _ in range(int(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in zip(self.attn, self.ff, strict=True):
            x = attn(x)
            x = x + ff(x)
        return x


class GatedFF(nn.Module):
    def __init__(self, d: int, hidden_multiple: float) -> None:
        super().__init__()
        hidden = max(1, round(float(hidden_multiple) * d))
        self.gate = nn.Linear(d, hidden)
        self.value = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(F.gelu(self.gate(x)) * self.value(x))
        return out


class MixtureOfExperts(nn.Module):
    def __init__(self, d: int, experts: int, capacity: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        hidden = max(1, round(float(capacity) * d))
        self.router = nn.Linear(d, int(experts))
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)) for _ in range(int(experts))
        )
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.router(x) / self.temperature, dim=-1)  # [batch, E]
        outputs = torch.stack([e(x) for e in self.experts], dim=-1)  # [batch, d, E]
        return x + (outputs * weights.unsqueeze(1)).sum(dim=-1)


class AdaptivePool(nn.Module):
    def __init__(self, d: int, output_size: int) -> None:
        super().__init__()
        self.size = int(output_size)
        self.proj = nn.Linear(self.size, d)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool1d(x.unsqueeze(1), self.size).squeeze(1)
        out: torch.Tensor = x + self.proj(pooled)
        return out


class Positional(nn.Module):
    def __init__(self, d: int, frequency: float) -> None:
        super().__init__()
        index = torch.arange(d, dtype=torch.float32)
        self.embedding = nn.Parameter(0.1 * torch.sin(float(frequency) * index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.embedding


class Memory(nn.Module):
    def __init__(self, d: int, memory_slots: int, key_dim: int = 16) -> None:
        super().__init__()
        self.query = nn.Linear(d, key_dim)
        self.keys = nn.Parameter(torch.randn(int(memory_slots), key_dim) / math.sqrt(key_dim))
        self.values = nn.Parameter(torch.zeros(int(memory_slots), d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.query(x) @ self.keys.t(), dim=-1)
        return x + weights @ self.values


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "identity": Identity,
    "linear": Linear,
    "layer_norm": LayerNorm,
    "activation": Activation,
    "dropout": Dropout,
    "batch_norm": BatchNorm,
    "max_pool": MaxPool,
    "skip_linear": SkipLinear,
    "residual_mlp": ResidualMLP,
    "shared_resid": SharedResidual,
    "concat": Concat,
    "layer_scale": LayerScale,
    "grouped": Grouped,
    "highway": Highway,
    "conv1d": Conv1d,
    "squeeze_exc": SqueezeExcitation,
    "attention": FeatureAttention,
    "transformer": Transformer,
    "gated_ff": GatedFF,
    "moe": MixtureOfExperts,
    "adapt_pool": AdaptivePool,
    "positional": Positional,
    "memory": Memory,
}
# The torch-free format (verification in the control plane) names the same families and dtypes.
if set(FAMILIES) != fmt.FAMILY_NAMES or set(DTYPES) != set(fmt.DTYPE_CODES):
    raise RuntimeError("esper.urza.artifact FAMILY_NAMES / DTYPE_CODES disagree with the families")


def family_seed(family: str, args: FamilyArgs, d: int) -> int:
    text = json.dumps({"family": family, "args": dict(args), "d": d}, sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & ((1 << 63) - 1)


def construct(family: str, args: FamilyArgs, d: int, dtype: str) -> nn.Module:
    """Build the module with whatever initial weights (used before loading tensors)."""
    try:
        factory = FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown kernel family {family!r}") from None
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"slot width d must be a positive integer, got {d!r}")
    module = factory(d, **dict(args))
    return module.to(dtype_of(dtype))


def build_family(family: str, args: FamilyArgs, d: int, dtype: str = "float32") -> nn.Module:
    """Build the module deterministically (seeded from family, arguments and ``d``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(family_seed(family, args, d))
        return construct(family, args, d, dtype)
