"""TamiyoPolicy: the small network that proposes one adaptation per epoch, evaluated with numpy.

The network is two tanh layers and three linear heads (action, blueprint
candidate, parameter) - small enough that the control plane evaluates it
with a numpy forward pass and never imports torch. It has no stochastic
layers, so a decision is a pure function of the weights and the features.
Simic trains the same architecture in torch
(:class:`esper.tamiyo.simic.PolicyNetwork`, loaded from and converted back
to these weights); a test holds the two forward passes to identical
decisions on the same weights.

Weights are a mapping of float32 arrays named like a torch ``state_dict``
(``encoder.0.weight``, ..., ``param_head.bias``); :func:`policy_interface`
lists the names and shapes. That mapping *is* the policy's interface: policy
updates are accepted only when they match exactly, and the candidate
blueprint list is recorded alongside persisted weights because the blueprint
head's output *i* means candidate *i*. A policy's arrays are read-only, so
the policy in force can never change under the controller; a new one is
built instead.

An untrained policy is initialised from an explicit seed with its own
generator (never a global RNG), so two fresh processes with the same seed
agree bit for bit; see :func:`initial_weights` for the growth prior.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from numpy.typing import ArrayLike, NDArray

from esper.tamiyo.features import FEATURE_DIM

#: SAFE-tier blueprints the default policy may choose from.
DEFAULT_BLUEPRINT_CANDIDATES: tuple[str, ...] = (
    "BP002",
    "BP003",
    "BP009",
    "BP012",
    "BP014",
    "BP021",
    "BP022",
)

Weights = Mapping[str, NDArray[np.float32]]


class PolicyAction(enum.IntEnum):
    """Output index of the action head (the order is part of the interface)."""

    GERMINATE = 0
    OPTIMIZER = 1
    PAUSE = 2
    NO_OP = 3


@dataclass(frozen=True)
class PolicyConfig:
    """Architecture of the policy; two policies with equal configs share an interface."""

    hidden_dim: int = 64
    blueprint_candidates: tuple[str, ...] = DEFAULT_BLUEPRINT_CANDIDATES
    feature_dim: int = FEATURE_DIM
    #: Seed for the deterministic weight initialisation.
    seed: int = 0
    #: Initial action preference of an untrained policy (see :func:`initial_weights`).
    growth_prior: bool = True

    def __post_init__(self) -> None:
        if self.hidden_dim < 1 or self.feature_dim < 1:
            raise ValueError("hidden_dim and feature_dim must be positive")
        if not self.blueprint_candidates:
            raise ValueError("at least one blueprint candidate is required")
        if len(set(self.blueprint_candidates)) != len(self.blueprint_candidates):
            raise ValueError("blueprint candidates must be unique")


@dataclass(frozen=True)
class PolicyOutput:
    """One decision: the argmax action and blueprint plus the bounded parameter."""

    action: PolicyAction
    blueprint_index: int
    blueprint_id: str
    #: Parameter head output squashed into [-1, 1].
    param: float
    action_probs: tuple[float, ...] = field(default=())


class WeightsMismatch(ValueError):
    """Weights that do not fit a policy's interface; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def linear_layers(config: PolicyConfig) -> tuple[tuple[str, int, int], ...]:
    """``(name, in_features, out_features)`` of every linear layer, in forward order."""
    hidden = config.hidden_dim
    return (
        ("encoder.0", config.feature_dim, hidden),
        ("encoder.2", hidden, hidden),
        ("action_head", hidden, len(PolicyAction)),
        ("blueprint_head", hidden, len(config.blueprint_candidates)),
        ("param_head", hidden, 1),
    )


def policy_interface(config: PolicyConfig) -> dict[str, tuple[int, ...]]:
    """Weight names and shapes: what a policy update must match exactly."""
    interface: dict[str, tuple[int, ...]] = {}
    for name, n_in, n_out in linear_layers(config):
        interface[f"{name}.weight"] = (n_out, n_in)
        interface[f"{name}.bias"] = (n_out,)
    return interface


def check_layout(config: PolicyConfig, layout: Mapping[str, tuple[str, Sequence[int]]]) -> None:
    """Raise :class:`WeightsMismatch` unless ``layout`` (name -> (dtype name, shape)) fits ``config``."""
    expected = policy_interface(config)
    missing = sorted(set(expected) - set(layout))
    unexpected = sorted(set(layout) - set(expected))
    if missing or unexpected:
        raise WeightsMismatch("key_mismatch", f"missing={missing} unexpected={unexpected}")
    for key, shape in expected.items():
        dtype, got = layout[key]
        if tuple(got) != shape:
            raise WeightsMismatch("shape_mismatch", f"{key}: {tuple(got)} != {shape}")
        if dtype != "float32":
            raise WeightsMismatch("dtype_mismatch", f"{key}: {dtype} != float32")


def check_finite(weights: Mapping[str, NDArray[np.generic]]) -> None:
    for key, value in weights.items():
        if not bool(np.isfinite(value).all()):
            raise WeightsMismatch("non_finite", f"{key} holds NaN or infinite values")


def initial_weights(config: PolicyConfig) -> dict[str, NDArray[np.float32]]:
    """Seeded uniform init, then (by default) a growth prior on the action head.

    Every weight and bias is drawn from ``U(-1/sqrt(in), 1/sqrt(in))`` by a
    generator seeded with ``config.seed``. An untrained network's argmax is
    arbitrary (it may well always pick PAUSE, i.e. never grow anything). The
    prior shrinks the random action weights tenfold and sets the action
    biases so that an untrained policy prefers GERMINATE, then NO_OP, and
    never PAUSE; the controller still defers a graft while another is in
    progress and applies every risk rule. Simic updates replace all of it
    with learned weights.
    """
    rng = np.random.default_rng(config.seed)
    weights: dict[str, NDArray[np.float32]] = {}
    for name, n_in, n_out in linear_layers(config):
        bound = 1.0 / math.sqrt(n_in)
        weights[f"{name}.weight"] = rng.uniform(-bound, bound, (n_out, n_in)).astype(np.float32)
        weights[f"{name}.bias"] = rng.uniform(-bound, bound, (n_out,)).astype(np.float32)
    if config.growth_prior:
        weights["action_head.weight"] *= np.float32(0.1)
        prior = np.zeros(len(PolicyAction), dtype=np.float32)
        prior[PolicyAction.GERMINATE] = 1.0
        prior[PolicyAction.NO_OP] = 0.5
        prior[PolicyAction.PAUSE] = -1.0
        weights["action_head.bias"] = prior
    return weights


def _softmax(logits: NDArray[np.float32]) -> NDArray[np.float32]:
    shifted = np.exp(logits - logits.max())
    out: NDArray[np.float32] = shifted / shifted.sum()
    return out


class TamiyoPolicy:
    """The policy in force: immutable weights and a deterministic numpy forward pass."""

    def __init__(
        self, config: PolicyConfig | None = None, weights: Mapping[str, NDArray[np.generic]] | None = None
    ) -> None:
        """``weights`` default to :func:`initial_weights`; given ones must fit the interface exactly.

        Raises :class:`WeightsMismatch` (``key_mismatch``, ``shape_mismatch``,
        ``dtype_mismatch``, ``non_finite``) otherwise. The arrays are copied.
        """
        self.config = config or PolicyConfig()
        if weights is None:
            arrays = initial_weights(self.config)
        else:
            check_layout(
                self.config, {k: (np.asarray(v).dtype.name, np.shape(v)) for k, v in weights.items()}
            )
            check_finite(weights)
            arrays = {k: np.array(v, dtype=np.float32, order="C", copy=True) for k, v in weights.items()}
        for array in arrays.values():
            array.flags.writeable = False
        self._weights: Mapping[str, NDArray[np.float32]] = MappingProxyType(arrays)

    @property
    def blueprint_candidates(self) -> tuple[str, ...]:
        return self.config.blueprint_candidates

    @property
    def weights(self) -> Weights:
        """Read-only arrays by name; ``dict(policy.weights)`` plus changes builds a new policy."""
        return self._weights

    def interface(self) -> dict[str, tuple[int, ...]]:
        return policy_interface(self.config)

    def forward(
        self, features: ArrayLike
    ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
        """Action logits ``(N, 4)``, blueprint logits ``(N, C)`` and raw parameter ``(N,)`` for ``(N, F)``."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.config.feature_dim:
            raise ValueError(f"features must have shape (N, {self.config.feature_dim}), got {x.shape}")
        w = self._weights
        hidden = np.tanh(x @ w["encoder.0.weight"].T + w["encoder.0.bias"])
        hidden = np.tanh(hidden @ w["encoder.2.weight"].T + w["encoder.2.bias"])
        actions = hidden @ w["action_head.weight"].T + w["action_head.bias"]
        blueprints = hidden @ w["blueprint_head.weight"].T + w["blueprint_head.bias"]
        param = (hidden @ w["param_head.weight"].T + w["param_head.bias"])[:, 0]
        return actions, blueprints, param

    def decide(self, features: ArrayLike) -> PolicyOutput:
        """The deterministic decision for one feature vector ``(F,)`` (first maximum wins a tie)."""
        actions, blueprints, param = self.forward(np.asarray(features, dtype=np.float32).reshape(1, -1))
        bp_index = int(np.argmax(blueprints[0]))
        return PolicyOutput(
            action=PolicyAction(int(np.argmax(actions[0]))),
            blueprint_index=bp_index,
            blueprint_id=self.config.blueprint_candidates[bp_index],
            param=float(np.tanh(param[0])),
            action_probs=tuple(float(p) for p in _softmax(actions[0])),
        )
