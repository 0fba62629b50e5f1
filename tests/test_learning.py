"""Learning on the embedded default, end to end: the claim of the project.

The run is the default `kfp-grpo run` (the real KFP pipeline through kfp.local, seed 0; the
`default_run` fixture in conftest.py, shared with tests/test_local_pipeline.py so the suite pays
for one full run). GRPO must beat the SFT policy it started from on the held-out problems by a
clear margin after its last iteration, never fall below its start, and only then is a champion
promoted. Seeds 0, 1 and 2 are measured by `python -m benchmarks.learning` (README, Results).
"""

from __future__ import annotations

import mlflow
import pytest

from components import tracking
from components.config import load_config

# The README's claim for the default (3 seeds): held-out accuracy +15 points or more over SFT.
MARGIN = 0.15


def test_grpo_beats_sft_on_heldout_problems(default_run):
    workdir, summary = default_run
    cfg = load_config()
    c = mlflow.MlflowClient(summary["tracking_uri"])
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    (parent,) = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    curve = [m.value for m in sorted(c.get_metric_history(parent.info.run_id, "eval/accuracy"), key=lambda m: m.step)]
    (sft_run,) = c.search_runs([exp.experiment_id], "attributes.run_name = 'evaluate-sft'")
    sft = curve[0]
    print(f"\nSFT {sft:.3f} → GRPO {' → '.join(f'{a:.3f}' for a in curve[1:])}; {summary['reason']}")
    assert len(curve) == cfg.loop.iterations + 1 and sft == pytest.approx(summary["start_accuracy"])
    assert sft_run.data.metrics["eval/num_prompts"] >= 500, "a held-out split too small to trust one seed"
    assert curve[-1] >= sft + MARGIN, f"GRPO {curve[-1]:.3f} did not beat SFT {sft:.3f} by {MARGIN}"
    assert min(curve[1:]) > sft, "an iteration fell below the SFT start"
    assert summary["promoted"] and summary["challenger_accuracy"] == pytest.approx(curve[-1])
    champion = c.get_model_version_by_alias(f"{cfg.promote.model_prefix}-policy", tracking.CHAMPION)
    assert float(champion.tags[tracking.ACCURACY_TAG]) == pytest.approx(curve[-1])
