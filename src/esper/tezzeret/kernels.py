"""Blueprint → kernel family table and :func:`build_kernel`.

Every one of the 50 Karn blueprints maps to a family of
:mod:`esper.urza.families` (``[batch, d] → [batch, d]``); Karn parameters are
turned into family arguments as shown (integers are rounded, at least 1).
Quarantined HIGH_RISK blueprints (BP043-BP050) compile to ``identity``: the
harmful behaviour their names describe is never built.

=====  ======================  ============  =====================================
id     name                    family        family arguments
=====  ======================  ============  =====================================
BP001  identity_passthrough    identity      -
BP002  linear_projection       linear        scale
BP003  layer_norm_basic        layer_norm    eps = epsilon
BP004  dropout_light           dropout       p = dropout
BP005  relu_activation         activation    kind = relu
BP006  batch_norm_1d           batch_norm    momentum (keep rate)
BP007  pooling_max             max_pool      kernel
BP008  skip_connection         skip_linear   -
BP009  residual_block          residual_mlp  depth
BP010  concat_fusion           concat        branches
BP011  gelu_activation         activation    kind = gelu
BP012  layer_scaling           layer_scale   scale
BP013  grouped_conv            grouped       groups (largest divisor of d ≤ groups)
BP014  highway_gate            highway       gate_bias
BP015  depthwise_separable     conv1d        kernel
BP016  squeeze_excitation      squeeze_exc   reduction
BP017  channel_attention       attention     heads
BP018  spatial_attention       conv1d        kernel = 2·radius + 1
BP019  cross_attention         attention     heads (self-attention: a slot has one input)
BP020  attention_single_head   attention     heads = 1 (tokens = the d features;
                                             sequence_length is recorded only)
BP021  feedforward_gated       gated_ff      hidden_multiple
BP022  multi_head_attention_4  attention     heads
BP023  transformer_block       transformer   layers
BP024  conv_transformer        conv1d        kernel
BP025  dynamic_conv            moe           experts
BP026  adaptive_pooling        adapt_pool    output_size
BP027  feature_pyramid         concat        branches = levels
BP028  dense_connection        residual_mlp  depth = 1 + growth_rate // 16
BP029  multi_head_attention_8  attention     heads
BP030  graph_attention         transformer   layers = hops
BP031  temporal_conv           conv1d        kernel = 3, dilation
BP032  dilated_conv            conv1d        kernel = 3, dilation
BP033  deformable_conv         conv1d        kernel = 3, channels = 4·offset_groups
BP034  non_local_block         attention     heads = 1 (window recorded only)
BP035  learned_positional      positional    frequency
BP036  mixture_of_experts_4    moe           experts, capacity
BP037  hierarchical_attention  attention     heads = levels
BP038  memory_augmented        memory        memory_slots
BP039  neural_ode_block        shared_resid  steps
BP040  differentiable_nas      moe           experts = 3, temperature
BP041  meta_learning_layer     shared_resid  steps = adapt_steps
BP042  recursive_processing    shared_resid  steps = depth
BP043  exploding_gradient      identity      - (quarantine)
BP044  vanishing_gradient      identity      - (quarantine)
BP045  nan_injection           identity      - (quarantine)
BP046  infinite_loop           identity      - (quarantine)
BP047  memory_leak             identity      - (quarantine)
BP048  deadlock_pattern        identity      - (quarantine)
BP049  race_condition          identity      - (quarantine)
BP050  adversarial_noise       identity      - (quarantine)
=====  ======================  ============  =====================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from esper.urza.families import build_family

Params = Mapping[str, float]
ArgsFn = Callable[[Params], dict[str, int | float | str]]


def _i(value: float) -> int:
    return max(1, round(value))


def _none(p: Params) -> dict[str, int | float | str]:
    return {}


BLUEPRINT_FAMILIES: dict[str, tuple[str, ArgsFn]] = {
    "BP001": ("identity", _none),
    "BP002": ("linear", lambda p: {"scale": p["scale"]}),
    "BP003": ("layer_norm", lambda p: {"eps": p["epsilon"]}),
    "BP004": ("dropout", lambda p: {"p": p["dropout"]}),
    "BP005": ("activation", lambda p: {"kind": "relu"}),
    "BP006": ("batch_norm", lambda p: {"momentum": p["momentum"]}),
    "BP007": ("max_pool", lambda p: {"kernel": _i(p["kernel"])}),
    "BP008": ("skip_linear", _none),
    "BP009": ("residual_mlp", lambda p: {"depth": _i(p["depth"])}),
    "BP010": ("concat", lambda p: {"branches": _i(p["branches"])}),
    "BP011": ("activation", lambda p: {"kind": "gelu"}),
    "BP012": ("layer_scale", lambda p: {"scale": p["scale"]}),
    "BP013": ("grouped", lambda p: {"groups": _i(p["groups"])}),
    "BP014": ("highway", lambda p: {"gate_bias": p["gate_bias"]}),
    "BP015": ("conv1d", lambda p: {"kernel": _i(p["kernel"])}),
    "BP016": ("squeeze_exc", lambda p: {"reduction": _i(p["reduction"])}),
    "BP017": ("attention", lambda p: {"heads": _i(p["heads"])}),
    "BP018": ("conv1d", lambda p: {"kernel": 2 * _i(p["radius"]) + 1}),
    "BP019": ("attention", lambda p: {"heads": _i(p["heads"])}),
    "BP020": ("attention", lambda p: {"heads": 1}),
    "BP021": ("gated_ff", lambda p: {"hidden_multiple": p["hidden_multiple"]}),
    "BP022": ("attention", lambda p: {"heads": _i(p["heads"])}),
    "BP023": ("transformer", lambda p: {"layers": _i(p["layers"])}),
    "BP024": ("conv1d", lambda p: {"kernel": _i(p["kernel"])}),
    "BP025": ("moe", lambda p: {"experts": _i(p["experts"])}),
    "BP026": ("adapt_pool", lambda p: {"output_size": _i(p["output_size"])}),
    "BP027": ("concat", lambda p: {"branches": _i(p["levels"])}),
    "BP028": ("residual_mlp", lambda p: {"depth": 1 + int(p["growth_rate"]) // 16}),
    "BP029": ("attention", lambda p: {"heads": _i(p["heads"])}),
    "BP030": ("transformer", lambda p: {"layers": _i(p["hops"])}),
    "BP031": ("conv1d", lambda p: {"kernel": 3, "dilation": _i(p["dilation"])}),
    "BP032": ("conv1d", lambda p: {"kernel": 3, "dilation": _i(p["dilation"])}),
    "BP033": ("conv1d", lambda p: {"kernel": 3, "channels": 4 * _i(p["offset_groups"])}),
    "BP034": ("attention", lambda p: {"heads": 1}),
    "BP035": ("positional", lambda p: {"frequency": p["frequency"]}),
    "BP036": ("moe", lambda p: {"experts": _i(p["experts"]), "capacity": p["capacity"]}),
    "BP037": ("attention", lambda p: {"heads": _i(p["levels"])}),
    "BP038": ("memory", lambda p: {"memory_slots": _i(p["memory_slots"])}),
    "BP039": ("shared_resid", lambda p: {"steps": _i(p["steps"])}),
    "BP040": ("moe", lambda p: {"experts": 3, "temperature": p["temperature"]}),
    "BP041": ("shared_resid", lambda p: {"steps": _i(p["adapt_steps"])}),
    "BP042": ("shared_resid", lambda p: {"steps": _i(p["depth"])}),
    **{f"BP{n:03d}": ("identity", _none) for n in range(43, 51)},
}


class NoKernelFamily(LookupError):
    """The blueprint id has no kernel family (e.g. a custom blueprint registered at runtime)."""


def family_for(blueprint_id: str, parameters: Params) -> tuple[str, dict[str, int | float | str]]:
    """The family name and family arguments for a (validated) blueprint request."""
    try:
        family, args = BLUEPRINT_FAMILIES[blueprint_id]
    except KeyError:
        raise NoKernelFamily(f"blueprint {blueprint_id!r} has no kernel family") from None
    return family, args(parameters)


def build_kernel(blueprint_id: str, parameters: Params, d: int, dtype: str = "float32") -> nn.Module:
    """Construct the blueprint's module deterministically (seeded), ``[batch, d] → [batch, d]``.

    ``parameters`` must already be validated (``KarnCatalog.validate_request``).
    """
    family, args = family_for(blueprint_id, parameters)
    return build_family(family, args, d, dtype)
