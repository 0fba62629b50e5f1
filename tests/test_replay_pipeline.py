"""The reward model as the reward, and process supervision with a learned process reward model, through the
real pipeline: `kfp-grpo run` (the CLI, kfp.local's SubprocessRunner, an embedded MLflow SQLite store in a
temp dir) on strongly reduced configs. The assertions read the MLflow store (parent and task runs, the
registry) and the run's rollout tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from components.artifacts import read_rollouts
from components.rewards import format_reward
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
MULTISTEP = ROOT / "pipelines" / "configs" / "multistep.yaml"


def kfp_grpo_run(workdir: Path, sets: list[str], config: Path | None = None) -> dict:
    """`kfp-grpo run --workdir <workdir> --output json [--config] --set ...` in a subprocess; its summary."""
    argv = [sys.executable, "-m", "pipelines.cli", "run", "--workdir", str(workdir), "--output", "json"]
    argv += ["--config", str(config)] if config else []
    for item in sets:
        argv += ["--set", item]
    proc = subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    text = proc.stdout
    return json.loads(text[text.index("\n{") + 1:] if "\n{" in text else text[text.index("{"):])


def rollout_tables(workdir: Path) -> list:
    """Every rollout table the run wrote (kfp.local's outputs under <workdir>/kfp), by round."""
    tables = [read_rollouts(str(p)) for p in (workdir / "kfp").glob("*/rollout*/rollouts")]
    return sorted(tables, key=lambda t: int(t.step.iloc[0]))


def parent_and_tasks(c: mlflow.MlflowClient, experiment: str) -> tuple[object, dict[str, object]]:
    """The run's MLflow parent run (the experiment's only one) and its task runs by task name."""
    runs = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parent, {r.data.tags["kfp_grpo.task"]: r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


REDUCED = ["sft.steps=300", "reward_model.steps=20", "replay.steps=5", "loop.iterations=1",
           "data.num_train=200", "data.num_test=40", "rollout.prompts_per_step=8"]


def test_rm_as_the_reward_through_kfp_grpo_run(tmp_path):
    """reward.kind rm through `kfp-grpo run`: every rollout's reward is rm_weight·σ(r_φ) + 0.1·format (the
    verifier's verdict is not in it, though it labels the RM's data), the RM's agreement and its accuracy before
    and after replay are on the MLflow parent run per round / iteration, and the RM is registered with the policy."""
    workdir = tmp_path / "run"
    summary = kfp_grpo_run(workdir, REDUCED + ["loop.steps_per_iteration=2", "reward.kind=rm", "reward.rm_weight=1.0",
                                               "reward_model.policy_samples=4", "reward_model.sample_prompts=60"])
    c = mlflow.MlflowClient(summary["tracking_uri"])
    parent, tasks = parent_and_tasks(c, "kfp-grpo")
    assert parent.info.status == "FINISHED"
    tables = rollout_tables(workdir)
    assert len(tables) == 2
    for rollouts in tables:
        expected = 1.0 * rollouts.reward_rm + 0.1 * rollouts.completion.map(format_reward)
        assert rollouts.reward.to_numpy() == pytest.approx(expected.to_numpy())
        assert (rollouts.reward_rm > 0).all() and rollouts.reward_rm.nunique() > 1  # σ(r_φ), really scored
        assert rollouts.reward_correct.isin([0.0, 1.0]).all()  # the verifier still judged (it labels the samples)
    history = lambda key: sorted((m.step, m.value) for m in c.get_metric_history(parent.info.run_id, key))  # noqa: E731
    assert [s for s, _ in history("rollout/reward_mean")] == [0, 1]
    assert [round(v, 6) for _, v in history("rollout/reward_mean")] == [round(float(t.reward.mean()), 6) for t in tables]
    assert [s for s, _ in history("rollout/rm_agreement")] == [0, 1]
    for key in ("replay/rm_accuracy_before", "replay/rm_accuracy_after"):
        assert [s for s, _ in history(key)] == [0] and 0 <= history(key)[0][1] <= 1
    rm_metrics = tasks["reward-model"].data.metrics
    assert rm_metrics["rm/policy_examples"] > 0 and "rm/heldout_accuracy_policy" in rm_metrics
    name = "kfp-grpo-reward"
    (rv,) = c.search_model_versions(f"name = '{name}'")
    assert str(rv.version) == summary["reward_version"] and rv.run_id == parent.info.run_id
    assert rv.tags["reward_model_objective"] == "pairwise" and rv.tags["policy_version"] == summary["policy_version"]


MULTISTEP_REDUCED = ["sft.steps=200", "data.num_train=400", "data.num_test=40", "rollout.prompts_per_step=8",
                     "rollout.max_new_tokens=32", "evaluation.max_new_tokens=32", "grpo.minibatch_size=64",
                     "loop.iterations=1", "loop.steps_per_iteration=2", "replay.steps=5",
                     "reward.kind=rm", "reward.rm_weight=1.0", "reward_model.objective=process",
                     "reward_model.policy_samples=4", "reward_model.sample_prompts=60", "reward_model.steps=40"]


def test_process_supervision_with_a_learned_prm_through_kfp_grpo_run(tmp_path):
    """grpo.supervision process on the multi-step task with the learned process reward model as the reward,
    through `kfp-grpo run`: the reward-model task trains a PRM on the verifier's step labels, each round logs the
    verifier's and the PRM's step accuracy, the rollout tables carry per-token advantages that vary within a
    completion and are exactly `process_advantages` of the PRM's step scores (re-scored here with the PRM the
    rollouts used), and the PRM is retrained and registered with the policy."""
    import torch

    from components.grpo import process_advantages
    from components.modeling import load_reward_model, load_tokenizer
    from components.rewards import rm_term
    from components.rollout import step_spans
    from components.reward_model import score

    workdir = tmp_path / "run"
    summary = kfp_grpo_run(workdir, MULTISTEP_REDUCED, MULTISTEP)
    c = mlflow.MlflowClient(summary["tracking_uri"])
    parent, tasks = parent_and_tasks(c, "kfp-grpo-multistep")
    parent_id = parent.info.run_id
    assert parent.info.status == "FINISHED"
    history = lambda key: sorted((m.step, m.value) for m in c.get_metric_history(parent_id, key))  # noqa: E731
    for key in ("rollout/step_accuracy", "rollout/prm_step_accuracy"):
        assert [s for s, _ in history(key)] == [0, 1], key
        assert all(0 <= v <= 1 for _, v in history(key))
    rm_metrics = tasks["reward-model"].data.metrics
    assert rm_metrics["rm/heldout_steps"] > 0 and 0 <= rm_metrics["rm/heldout_step_auc"] <= 1
    assert "replay/prm_step_auc_after" in tasks["rm-replay-i0"].data.metrics

    tables = rollout_tables(workdir)
    assert len(tables) == 2
    rollouts = tables[0]
    assert [len(a) for a in rollouts.token_advantages] == [len(i) for i in rollouts.completion_ids]
    assert any(len(set(a[:-1])) > 1 for a in rollouts.token_advantages)  # advantages vary within a completion
    assert rollouts.completion.str.contains(" = ").mean() > 0.5  # the policy writes its steps
    assert rollouts.reward.to_numpy() == pytest.approx(
        (rollouts.reward_rm + 0.1 * rollouts.completion.map(format_reward)).to_numpy())

    # the first round used the reward-model task's PRM: its step scores are the step rewards
    (rm_dir,) = (workdir / "kfp").glob("*/reward-model/reward_model")
    rm, rm_tok = load_reward_model(str(rm_dir))
    (policy_dir,) = (workdir / "kfp").glob("*/sft/model")
    tok = load_tokenizer(str(policy_dir))
    spans = [step_spans(tok, comp, list(ids), a)
             for comp, ids, a in zip(rollouts.completion, rollouts.completion_ids, rollouts.answer)]
    prompts = [p for p, sp in zip(rollouts.prompt, spans) for _ in sp]
    prefixes = [comp[:end] for comp, sp in zip(rollouts.completion, spans) for _, end, _ in sp]
    step_scores = torch.tensor(rm_term(score(rm, rm_tok, prompts, prefixes, 64).numpy(), True))
    rewards = list(step_scores.split([len(sp) for sp in spans]))
    ends = [torch.tensor([e for e, _, _ in sp]) for sp in spans]
    G = 8
    expected = []
    for g in range(0, len(spans), G):
        expected += process_advantages(rewards[g:g + G], ends[g:g + G],
                                       [len(i) for i in rollouts.completion_ids[g:g + G]], 1e-4)
    for got, want in zip(rollouts.token_advantages, expected):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4)

    (rv,) = c.search_model_versions("name = 'kfp-grpo-multistep-reward'")
    assert str(rv.version) == summary["reward_version"] and rv.tags["reward_model_objective"] == "process"
    assert rv.tags["policy_version"] == summary["policy_version"]
