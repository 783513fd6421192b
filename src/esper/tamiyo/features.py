"""The fixed feature vector the Tamiyo policy sees for one SystemStatePacket.

The vector layout *is* part of the policy interface: a policy trained by
Simic in one process must read the same numbers in another. Every feature is
therefore named, has a fixed index in :data:`FEATURE_NAMES` and is computed
from packet fields only; nothing depends on salted ``hash()``, on registries
that grow at run time or on dictionary order. The layout is:

====  ==========================  =============================================
idx   name                        meaning
====  ==========================  =============================================
0     validation_loss             ``state.validation_loss``
1     validation_accuracy         ``state.validation_accuracy``
2     training_loss               ``state.training_loss``
3     log_epoch                   ``log1p(state.current_epoch)``
4     loss_trend                  validation loss minus the previous one for the
                                  same run (0 on a run's first packet)
5     has_previous                1 when ``loss_trend`` is meaningful, else 0
6     generalization_gap          ``validation_loss - training_loss``
7     seeds_total                 ``len(state.seed_states)``
8-18  seeds_<stage>               seeds per ``SeedLifecycleStage`` DORMANT ..
                                  TERMINATED (unknown stages are not counted)
19    metric_loss                 ``training_metrics["loss"]``
20    metric_accuracy             ``training_metrics["accuracy"]``
21    metric_log_gradient_norm    ``log1p(training_metrics["gradient_norm"])``
22    metric_log_latency_ms       ``log1p(training_metrics["latency_ms"])``
23    metric_log_samples_per_s    ``log1p(training_metrics["samples_per_s"])``
====  ==========================  =============================================

Missing metrics read as 0; non-finite values are replaced by 0 and every
value is clipped to ``±FEATURE_CLIP`` so one absurd number cannot saturate
the network.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from esper.leyline import leyline_pb2

FEATURE_CLIP = 1.0e4

#: Seed stages counted in features 8-18, in enum order.
COUNTED_STAGES: tuple[leyline_pb2.SeedLifecycleStage.ValueType, ...] = (
    leyline_pb2.SEED_STAGE_DORMANT,
    leyline_pb2.SEED_STAGE_GERMINATED,
    leyline_pb2.SEED_STAGE_TRAINING,
    leyline_pb2.SEED_STAGE_BLENDING,
    leyline_pb2.SEED_STAGE_SHADOWING,
    leyline_pb2.SEED_STAGE_PROBATIONARY,
    leyline_pb2.SEED_STAGE_FOSSILIZED,
    leyline_pb2.SEED_STAGE_CULLED,
    leyline_pb2.SEED_STAGE_EMBARGOED,
    leyline_pb2.SEED_STAGE_RESETTING,
    leyline_pb2.SEED_STAGE_TERMINATED,
)

# (metric key, apply log1p)
_NAMED_METRICS: tuple[tuple[str, bool], ...] = (
    ("loss", False),
    ("accuracy", False),
    ("gradient_norm", True),
    ("latency_ms", True),
    ("samples_per_s", True),
)

FEATURE_NAMES: tuple[str, ...] = (
    "validation_loss",
    "validation_accuracy",
    "training_loss",
    "log_epoch",
    "loss_trend",
    "has_previous",
    "generalization_gap",
    "seeds_total",
    *(
        "seeds_" + leyline_pb2.SeedLifecycleStage.Name(stage).removeprefix("SEED_STAGE_").lower()
        for stage in COUNTED_STAGES
    ),
    "metric_loss",
    "metric_accuracy",
    "metric_log_gradient_norm",
    "metric_log_latency_ms",
    "metric_log_samples_per_s",
)

FEATURE_DIM = len(FEATURE_NAMES)


def _clean(value: float) -> float:
    if not math.isfinite(value):
        return 0.0
    return max(-FEATURE_CLIP, min(FEATURE_CLIP, value))


def _log1p(value: float) -> float:
    # Negative counts/rates are nonsense; treat them as zero rather than NaN.
    return math.log1p(value) if value > 0 else 0.0


def feature_values(state: leyline_pb2.SystemStatePacket, loss_trend: float | None) -> list[float]:
    """The feature vector as plain floats (see the module docstring for the layout).

    ``loss_trend`` is None on the first packet of a run; the controller owns
    the per-run history, so it passes the trend in rather than this function
    keeping state.
    """
    counts = dict.fromkeys(COUNTED_STAGES, 0)
    for seed in state.seed_states:
        if seed.stage in counts:
            counts[seed.stage] += 1
    metrics = state.training_metrics
    named = []
    for key, use_log in _NAMED_METRICS:
        raw = float(metrics.get(key, 0.0))
        named.append(_log1p(raw) if use_log else raw)
    values = [
        float(state.validation_loss),
        float(state.validation_accuracy),
        float(state.training_loss),
        _log1p(float(state.current_epoch)),
        0.0 if loss_trend is None else float(loss_trend),
        0.0 if loss_trend is None else 1.0,
        float(state.validation_loss) - float(state.training_loss),
        float(len(state.seed_states)),
        *(float(counts[stage]) for stage in COUNTED_STAGES),
        *named,
    ]
    return [_clean(v) for v in values]


def extract_features(
    state: leyline_pb2.SystemStatePacket, loss_trend: float | None = None
) -> NDArray[np.float32]:
    """The feature vector as a float32 array of shape ``(FEATURE_DIM,)`` (what the policy reads)."""
    return np.asarray(feature_values(state, loss_trend), dtype=np.float32)
