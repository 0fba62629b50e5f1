"""MLflow tracking for stages: log only when an MLflow run is active.

Stages call `log_metrics`/`log_params`; with no active run (a test, a shell call
without tracking) these do nothing, so a stage never needs MLflow to work.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import mlflow


def active() -> bool:
    return mlflow.active_run() is not None


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the finite numeric values of `metrics` at `step` to the active run."""
    if not active():
        return
    clean = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_params(params: Mapping[str, Any]) -> None:
    """Log params (values stringified, truncated by MLflow's limit) to the active run."""
    if active():
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
