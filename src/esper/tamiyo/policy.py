"""TamiyoPolicy: the small network that proposes one adaptation per epoch.

The network is deliberately tiny and free of stochastic layers: decisions
must be reproducible (esper-lite v1 left dropout active in train
mode), so :meth:`TamiyoPolicy.decide` always runs in eval mode under
``torch.no_grad`` and weights are initialised from an explicit seed with a
private generator (never the global RNG), making two fresh processes with
the same seed agree bit for bit.

The ``state_dict`` keys and shapes (see :func:`TamiyoPolicy.interface`) are
the policy's interface: policy updates are accepted only when they match
exactly, and the candidate blueprint list is recorded alongside persisted
weights because the blueprint head's output *i* means candidate *i*.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch
from torch import nn

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
    #: Initial action preference of an untrained policy (see ``TamiyoPolicy._init_weights``).
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


class TamiyoPolicy(nn.Module):
    """Two tanh layers and three heads: action, blueprint candidate, parameter."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__()
        self.config = config or PolicyConfig()
        cfg = self.config
        # nn.Linear initialises from the global RNG; fork it so building a policy
        # never perturbs the caller's random stream (weights are reset below anyway).
        with torch.random.fork_rng(devices=[]):
            self.encoder = nn.Sequential(
                nn.Linear(cfg.feature_dim, cfg.hidden_dim),
                nn.Tanh(),
                nn.Linear(cfg.hidden_dim, cfg.hidden_dim),
                nn.Tanh(),
            )
            self.action_head = nn.Linear(cfg.hidden_dim, len(PolicyAction))
            self.blueprint_head = nn.Linear(cfg.hidden_dim, len(cfg.blueprint_candidates))
            self.param_head = nn.Linear(cfg.hidden_dim, 1)
        self._init_weights(cfg.seed)
        self.eval()

    def _init_weights(self, seed: int) -> None:
        """Seeded uniform init, then (by default) a growth prior on the action head.

        An untrained network's argmax is arbitrary (with seed 0 it always picks
        PAUSE, i.e. it never grows anything). The prior shrinks the random
        action weights and sets the biases so that an untrained policy prefers
        GERMINATE, then NO_OP, and never PAUSE; the controller still defers a
        graft while another is in progress and applies every risk rule. Simic
        updates replace all of it with learned weights.
        """
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    bound = 1.0 / math.sqrt(module.in_features)
                    module.weight.uniform_(-bound, bound, generator=generator)
                    module.bias.uniform_(-bound, bound, generator=generator)
            if self.config.growth_prior:
                self.action_head.weight.mul_(0.1)
                prior = torch.zeros(len(PolicyAction))
                prior[PolicyAction.GERMINATE] = 1.0
                prior[PolicyAction.NO_OP] = 0.5
                prior[PolicyAction.PAUSE] = -1.0
                self.action_head.bias.copy_(prior)

    @property
    def blueprint_candidates(self) -> tuple[str, ...]:
        return self.config.blueprint_candidates

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits for actions and blueprints and the raw parameter, for a batch ``(N, F)``."""
        hidden = self.encoder(features)
        return self.action_head(hidden), self.blueprint_head(hidden), self.param_head(hidden).squeeze(-1)

    def decide(self, features: torch.Tensor) -> PolicyOutput:
        """Deterministic decision for one feature vector ``(F,)``."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                action_logits, blueprint_logits, param = self(features.reshape(1, -1).to(torch.float32))
        finally:
            self.train(was_training)
        probs = torch.softmax(action_logits[0], dim=-1)
        action = PolicyAction(int(torch.argmax(action_logits[0]).item()))
        bp_index = int(torch.argmax(blueprint_logits[0]).item())
        return PolicyOutput(
            action=action,
            blueprint_index=bp_index,
            blueprint_id=self.config.blueprint_candidates[bp_index],
            param=float(torch.tanh(param[0]).item()),
            action_probs=tuple(float(p) for p in probs.tolist()),
        )

    def interface(self) -> dict[str, tuple[int, ...]]:
        """State-dict keys and shapes: what a policy update must match exactly."""
        return {key: tuple(value.shape) for key, value in self.state_dict().items()}

    def clone(self) -> TamiyoPolicy:
        """An independent copy with the same config and weights."""
        twin = TamiyoPolicy(self.config)
        twin.load_state_dict(self.state_dict(), strict=True)
        return twin
