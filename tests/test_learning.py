"""End-to-end learning on the embedded default, in process, seeded, on CPU.

The plan of `kfp-grpo run` (`pipelines.plan.algorithm1`, the same tasks and wiring as the
KFP pipeline), walked in this process by `pipelines.inprocess`. The assertion is the claim
of the project: GRPO beats the SFT policy it started from on held-out problems by a clear
margin, and only then is a champion promoted.
"""

from __future__ import annotations

import mlflow
import pytest

from components import tracking
from components.config import load_config
from pipelines.inprocess import run_in_process

# The README's claim for the default (3 seeds): held-out accuracy +15 points or more over SFT.
MARGIN = 0.15


def test_grpo_beats_sft_on_heldout_problems(tmp_path):
    """Seed 1 (the pipeline test runs the default, seed 0): a second seed of the README's claim."""
    cfg = load_config(None, {"seed": 1})  # the embedded default, as `kfp-grpo run --set seed=1` uses it
    result = run_in_process(cfg, tmp_path)
    metrics = result["results"]
    sft = metrics["evaluate-sft"]["eval/accuracy"]
    curve = [metrics[f"evaluate-i{i}"]["eval/accuracy"] for i in range(cfg.loop.iterations)]
    decision = metrics["promote"]
    print(f"\nSFT {sft:.3f} → GRPO {' → '.join(f'{a:.3f}' for a in curve)} in {result['seconds']:.0f}s; "
          f"{decision['reason']}")
    assert metrics["evaluate-sft"]["eval/num_prompts"] >= 500, "a held-out split too small to trust one seed"
    assert curve[-1] >= sft + MARGIN, f"GRPO {curve[-1]:.3f} did not beat SFT {sft:.3f} by {MARGIN}"
    assert decision["promoted"] and decision["start_accuracy"] == sft
    c = mlflow.MlflowClient(result["tracking_uri"])
    champion = c.get_model_version_by_alias(f"{cfg.promote.model_prefix}-policy", tracking.CHAMPION)
    assert float(champion.tags[tracking.ACCURACY_TAG]) == pytest.approx(curve[-1])
