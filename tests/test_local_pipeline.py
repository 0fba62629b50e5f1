"""A real `kfp.local` run of the whole pipeline on the embedded default, then the registry.

The same pipeline function that compiles for a cluster runs here task by task in
subprocesses (SubprocessRunner), tracked in a real MLflow SQLite store.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest

from components import tracking
from components.config import load_config
from pipelines.plan import algorithm1
from tests.test_learning import MARGIN as LEARNING_MARGIN


@pytest.fixture
def local_run(default_run):
    """The default `kfp-grpo run` (conftest.py: one per test session, shared with test_learning.py)."""
    return default_run


def test_local_run_promotes_a_champion_better_than_sft(local_run):
    """`kfp-grpo run` on the embedded default: GRPO beats SFT by the README's margin, and that model
    is the champion."""
    workdir, summary = local_run
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    assert summary["tracking_uri"] == uri
    c = mlflow.MlflowClient(uri)
    champ = c.get_model_version_by_alias("kfp-grpo-policy", "champion")
    reward = c.get_model_version_by_alias("kfp-grpo-reward", "champion")
    assert summary["promoted"] and str(champ.version) == summary["policy_version"]
    acc = float(champ.tags[tracking.ACCURACY_TAG])
    print(f"\nSFT {summary['start_accuracy']:.3f} → champion {acc:.3f} in {summary['seconds']:.0f}s")
    assert acc >= summary["start_accuracy"] + LEARNING_MARGIN, "GRPO must beat its SFT start on held-out problems"
    assert float(champ.tags["start_accuracy"]) == pytest.approx(summary["start_accuracy"], abs=1e-4)
    assert reward.tags["policy_version"] == str(champ.version)


def test_local_run_prints_one_line_per_task_and_logs_each_task_to_its_file(local_run):
    """The terminal gets ≤ 100 lines: a counter line per task with its time, metrics and the ETA, then the
    summary; each task's stream (kfp.local's and the stage's) is in <workdir>/logs/<time>/<task>.log."""
    workdir, summary = local_run
    text = (workdir / "stdout.txt").read_text()
    lines = text.splitlines()
    assert len(lines) <= 100, f"{len(lines)} lines"
    names = [t.name for t in algorithm1(load_config())] + ["start-tracking"]
    counted = [line for line in lines if re.match(r"\[ *\d+/\d+\] ", line)]  # not the "[tracking] ..." lines
    assert len(counted) == len(names)
    assert counted[-1].startswith(f"[{len(names)}/{len(names)}] promote")
    assert all("ETA" in line for line in counted[:-1])
    assert any("held-out accuracy" in line for line in counted if "evaluate-" in line)
    assert "Executing task" not in text and "executor_input" not in text  # kfp.local's stream is in the files
    logs = Path(summary["logs"])
    assert sorted(p.stem for p in logs.glob("*.log") if p.stem != "run") == sorted(names)
    assert "[sft] step 2000/2000" in (logs / "sft.log").read_text()


def test_local_run_tracks_parent_and_nested_runs(local_run):
    workdir, summary = local_run
    c = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = c.get_experiment_by_name("kfp-grpo")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["promotion_decision"] == "champion"
    cfg = load_config()
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = sorted(r.data.tags["kfp_grpo.stage"] for r in children)
    rounds = cfg.loop.iterations * cfg.loop.steps_per_iteration
    assert stages.count("rollout") == rounds and stages.count("grpo_update") == rounds
    assert stages.count("rm_replay") == cfg.loop.iterations
    assert stages.count("evaluate") == cfg.loop.iterations + 1
    assert {"prepare_data", "sft", "reward_model", "promote"} <= set(stages)
    # one name per task: the nested runs are named as the plan's (and the compiled pipeline's) tasks
    assert sorted(r.info.run_name for r in children) == sorted(t.name for t in algorithm1(cfg))
    # the final task closed the run after every evaluation had landed in it
    evals = c.get_metric_history(parent.info.run_id, "eval/accuracy")
    assert sorted(m.step for m in evals) == list(range(cfg.loop.iterations + 1))
    # step-wise metrics on the nested runs, curves on the parent
    update = next(r for r in children if r.data.tags["kfp_grpo.stage"] == "grpo_update")
    assert {"update/kl", "update/clip_fraction", "update/loss", "update/entropy"} <= set(update.data.metrics)
    assert len(c.get_metric_history(parent.info.run_id, "rollout/reward_mean")) == rounds
    assert "curves.png" in {a.path for a in c.list_artifacts(parent.info.run_id)}
    # the registered models are MLflow logged models of the parent run
    logged = c.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{parent.info.run_id}'")
    assert {"policy", "reward_model"} <= {m.name for m in logged}
    assert parent.data.params["grpo.beta"] == str(cfg.grpo.beta)


def test_local_run_artifacts_are_standard_hf_dirs(local_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    workdir, _ = local_run
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    policy = tracking.download_model("models:/kfp-grpo-policy@champion", str(tmp_path / "p"))
    rm = tracking.download_model("models:/kfp-grpo-reward@champion", str(tmp_path / "r"))
    AutoModelForCausalLM.from_pretrained(policy)
    assert AutoTokenizer.from_pretrained(policy).chat_template
    AutoModelForSequenceClassification.from_pretrained(rm)
    import os

    assert "optimizer.pt" not in os.listdir(policy)
    assert "replay_buffer.parquet" in os.listdir(rm)


def test_a_bad_run_time_setting_fails_the_first_task(tmp_path, capsys):
    """A run created with a bad value for a run-time parameter (as from the KFP "Create run" form) fails in
    start-tracking, in the run's first seconds, naming the key — before any data, model or MLflow run."""
    from kfp import local

    from pipelines.local import prepare_tracking
    from pipelines.pipeline import build_pipeline

    cfg = load_config()
    uri = prepare_tracking(cfg, tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
               raise_on_error=True)
    with pytest.raises(RuntimeError, match="start-tracking"):
        build_pipeline(cfg)(tracking_uri=uri, grpo_beta=-1.0)
    assert "grpo.beta: Input should be greater than or equal to 0" in capsys.readouterr().out
    c = mlflow.MlflowClient(uri)
    assert c.search_runs([c.get_experiment_by_name(cfg.tracking.experiment).experiment_id]) == []
    assert not list((tmp_path / "kfp").glob("*/prepare-data"))
