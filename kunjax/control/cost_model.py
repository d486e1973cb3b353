"""Cost model: how long a step takes on a unit or a pipeline stage, and a transition on the links
(plain Python and numpy, no JAX: the simulator reuses it unchanged).

A step's time is linear in a handful of features, the way a step's work is: every layer reads its
weights once (a per-layer constant), computes per prefill token and per decode row, and reads the KV
of the context it attends to (per context page); the head (final norm + LM head + sampling) costs a
constant plus a part per sampled row; a step has a fixed launch overhead.

    t = c_fixed + L * (c_layer + c_tok * prefill_tokens + c_row * decode_rows + c_page * context_pages)
        + H * (c_head + c_head_row * rows)

with L the layers the unit or stage runs and H = 1 where it carries the head. The coefficients are
fitted by least squares on measured steps (`fit`; `kunjax.runtime.calibrate` times real steps at
start-up), weighted by 1/time so that the fit minimises relative error: a 2 ms decode step counts as
much as a 200 ms prefill. Coefficients stay non-negative (a feature the samples cannot separate from
another gets 0, never a negative cost that would make a bigger step look cheaper).

A transition (drop, restore) moves bytes over links (device to device, host to device, a copy on the
same device); its time is bytes / the bandwidth measured on that link, per link, summed.

The model keeps score of itself: `observe(predicted, actual)` adds one observed step, and `error()`
is the running mean absolute percentage error, exposed in Status and the metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

FEATURES = ("fixed", "layer", "layer_prefill_token", "layer_decode_row", "layer_context_page", "head", "head_row")


@dataclasses.dataclass(frozen=True)
class StepSample:
    """One measured step (or one stage's part of it)."""

    prefill_tokens: int
    decode_rows: int
    context_pages: int  # KV pages attention reads, summed over rows
    layers: int
    seconds: float
    head: bool = True
    prefill_rows: int = 0  # rows of the prefill tokens (each samples through the head)


def features(prefill_tokens: int, decode_rows: int, context_pages: int, layers: int, head: bool = True,
             prefill_rows: int = 0) -> np.ndarray:
    """The feature vector of a step (FEATURES order)."""
    h = 1.0 if head else 0.0
    return np.array([1.0, layers, layers * prefill_tokens, layers * decode_rows, layers * context_pages, h,
                     h * (decode_rows + prefill_rows)], np.float64)


def shape_work(rows: int, query: int, pages: int) -> dict:
    """The work of a step run at a padded shape (batch.StepShape: rows x query tokens, pages gathered
    per row), as step_time's keyword arguments: what the device computes, padding included."""
    prefill = query > 1
    return {"prefill_tokens": rows * query if prefill else 0, "decode_rows": 0 if prefill else rows,
            "context_pages": rows * pages, "prefill_rows": rows if prefill else 0}


class CostModel:
    def __init__(self, coef: Sequence[float], bandwidths: Optional[Mapping[str, float]] = None):
        """`coef`: seconds per unit of each feature (FEATURES order); `bandwidths`: bytes/s per link
        name (e.g. "d2d", "h2d", "local")."""
        if len(coef) != len(FEATURES):
            raise ValueError(f"coef: {len(FEATURES)} coefficients ({', '.join(FEATURES)}), got {len(coef)}")
        if any(c < 0 for c in coef):
            raise ValueError(f"coef: costs must be >= 0, got {list(coef)}")
        self.coef = np.asarray(coef, np.float64)
        self.bandwidths = dict(bandwidths or {})
        self._abs_pct_sum = 0.0
        self._observed = 0

    def as_dict(self) -> dict:
        return {"coef": dict(zip(FEATURES, self.coef.tolist())), "bandwidths": dict(self.bandwidths),
                **self.error_stats()}

    # ---- steps -----------------------------------------------------------------------------
    def step_time(self, prefill_tokens: int = 0, decode_rows: int = 0, context_pages: int = 0, layers: int = 1,
                  head: bool = True, prefill_rows: int = 0) -> float:
        """Predicted seconds of a step on a unit (head=True) or a stage that runs `layers` layers."""
        return float(self.coef @ features(prefill_tokens, decode_rows, context_pages, layers, head, prefill_rows))

    def shape_time(self, shape, layers: int, head: bool = True) -> float:
        """Predicted seconds of a step at a padded shape (batch.StepShape) on `layers` layers."""
        return self.step_time(**shape_work(shape.rows, shape.query, shape.pages), layers=layers, head=head)

    def layer_time(self, prefill_tokens: int = 0, decode_rows: int = 0, context_pages: int = 0) -> float:
        """Predicted seconds of one layer of a step."""
        c = self.coef
        return float(c[1] + c[2] * prefill_tokens + c[3] * decode_rows + c[4] * context_pages)

    def head_time(self, rows: int = 1) -> float:
        """Predicted seconds of the head (norm, LM head, sampling) for `rows` sampled rows."""
        return float(self.coef[5] + self.coef[6] * rows)

    @property
    def fixed_time(self) -> float:
        return float(self.coef[0])

    # ---- transitions -----------------------------------------------------------------------
    def transition_time(self, bytes_by_link: Mapping[str, int]) -> float:
        """Predicted seconds to move these bytes (per link name) one link after the other."""
        missing = [k for k, b in bytes_by_link.items() if b and k not in self.bandwidths]
        if missing:
            raise ValueError(f"bytes_by_link: no measured bandwidth for link(s) {missing} "
                             f"(measured: {sorted(self.bandwidths)})")
        return sum(b / self.bandwidths[k] for k, b in bytes_by_link.items() if b)

    # ---- its own error ---------------------------------------------------------------------
    def observe(self, predicted: float, actual: float) -> float:
        """Adds one observed step; returns the running mean absolute percentage error."""
        if actual > 0:
            self._abs_pct_sum += abs(predicted - actual) / actual * 100.0
            self._observed += 1
        return self.error()

    def observe_step(self, actual: float, **step) -> float:
        """Predicts the step described by `step` (step_time's arguments) and observes it."""
        return self.observe(self.step_time(**step), actual)

    def error(self) -> float:
        """Mean absolute percentage error over the observed steps (0 before any)."""
        return self._abs_pct_sum / self._observed if self._observed else 0.0

    def error_stats(self) -> dict:
        return {"mean_abs_pct_error": self.error(), "observed_steps": self._observed}


def fit(samples: Sequence[StepSample], bandwidths: Optional[Mapping[str, float]] = None) -> CostModel:
    """Least-squares coefficients from measured steps, relative-error weighted, non-negative.

    Non-negativity by an active set: solve, drop the most negative coefficient's feature, solve again
    (features that never vary from zero in the samples are out from the start). Features the samples
    cannot tell apart share their cost by the minimum-norm solution."""
    if not samples:
        raise ValueError("samples: at least one measured step is needed")
    bad = [s for s in samples if not s.seconds > 0]
    if bad:
        raise ValueError(f"samples: every step must take > 0 seconds, got {bad[0]}")
    x = np.stack([features(s.prefill_tokens, s.decode_rows, s.context_pages, s.layers, s.head, s.prefill_rows)
                  for s in samples])
    y = np.array([s.seconds for s in samples], np.float64)
    w = 1.0 / y
    return CostModel(nonnegative_lstsq(x * w[:, None], y * w), bandwidths)


def nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin |a x - b| with x >= 0, by an active set: solve, drop the most negative coefficient's
    column, solve again (columns that are all zero are out from the start; 0 where dropped)."""
    active = [j for j in range(a.shape[1]) if np.any(a[:, j] != 0)]
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if np.all(sol >= -1e-15):
            coef[active] = np.maximum(sol, 0.0)
            break
        active.pop(int(np.argmin(sol)))
    return coef
