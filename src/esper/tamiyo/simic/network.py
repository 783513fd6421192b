"""PolicyNetwork: the Tamiyo policy as a trainable torch module (Simic's side of the policy).

The control plane evaluates :class:`~esper.tamiyo.policy.TamiyoPolicy` with
numpy; gradient descent needs torch, so Simic copies the weights into this
module, fits it and converts the result back. Layer names match the numpy
policy's weight names, so ``state_dict()`` and ``TamiyoPolicy.weights`` are
the same mapping, and the forward pass is the same computation (a test holds
the two to identical decisions).
"""

from __future__ import annotations

import torch
from torch import nn

from esper.tamiyo.policy import PolicyAction, PolicyConfig, TamiyoPolicy


class PolicyNetwork(nn.Module):
    """Two tanh layers and three heads: action, blueprint candidate, parameter."""

    def __init__(self, policy: TamiyoPolicy) -> None:
        """A module holding private copies of ``policy``'s weights."""
        super().__init__()
        self.config: PolicyConfig = policy.config
        cfg = self.config
        # nn.Linear initialises from the global RNG; fork it so building a network
        # never perturbs the caller's random stream (the weights are replaced below).
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
        tensors = {name: torch.tensor(value.copy()) for name, value in policy.weights.items()}
        self.load_state_dict(tensors, strict=True)
        self.eval()

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits for actions and blueprints and the raw parameter, for a batch ``(N, F)``."""
        hidden = self.encoder(features)
        return self.action_head(hidden), self.blueprint_head(hidden), self.param_head(hidden).squeeze(-1)

    def to_policy(self) -> TamiyoPolicy:
        """The numpy policy with this module's current weights (raises ``WeightsMismatch`` if not finite)."""
        weights = {name: value.detach().cpu().numpy() for name, value in self.state_dict().items()}
        return TamiyoPolicy(self.config, weights)
