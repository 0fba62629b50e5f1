"""`loop.warm_engine`: an iteration's rounds in one task, the policy and the sampler in memory.

It must be the same algorithm as one task per rollout and per update: the same final weights (bit
for bit), the same rollouts, the same per-round MLflow runs; through the in-process runner, the
compiled pipeline and a real `kfp-grpo run` (kfp.local, embedded MLflow, a tiny model).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from components.config import ConfigError, parse_config
from pipelines.inprocess import run_in_process
from pipelines.plan import Ref, algorithm1, producers
from components.config import Config
from tests.conftest import fast_config

LOOP = {"loop": {"iterations": 2, "steps_per_iteration": 2}, "sft": {"steps": 40, "lr": 1e-3},
        "grpo": {"minibatch_size": 8, "lr": 1e-3, "beta": 0.04}}


def _config(warm: bool, **over) -> Config:
    """The reduced loop of these tests (2 iterations × 2 rounds), `loop.warm_engine` = `warm`, `over` on top."""
    from components.config import _deep_merge

    return fast_config(**_deep_merge(_deep_merge(LOOP, {"loop": {"warm_engine": warm}}), over))


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _round_runs(result: dict) -> dict[str, dict[str, float]]:
    """The nested MLflow runs of the rounds: task name → metrics."""
    c = mlflow.MlflowClient(result["tracking_uri"])
    parent = c.get_run(result["parent_run_id"])
    runs = c.search_runs([parent.info.experiment_id],
                         f"tags.mlflow.parentRunId = '{result['parent_run_id']}'", max_results=200)
    return {r.info.run_name: r.data.metrics for r in runs
            if r.info.run_name.startswith(("rollout-", "grpo-update-"))}


def test_the_plan_has_one_task_per_iteration_for_the_rounds():
    tasks = algorithm1(_config(True, loop={"steps_per_iteration": 3}))
    producers(tasks)
    names = [t.name for t in tasks]
    assert [n for n in names if "rounds" in n] == ["grpo-rounds-i0", "grpo-rounds-i1"]
    assert not [n for n in names if n.startswith(("rollout-", "grpo-update-"))]
    by_name = {t.name: t for t in tasks}
    assert [by_name[f"grpo-rounds-i{i}"].params["first_step"] for i in (0, 1)] == [0, 3]
    assert by_name["rm-replay-i0"].inputs["rollouts"] == Ref("grpo-rounds-i0", "rollouts")
    assert by_name["grpo-rounds-i1"].inputs["policy"] == Ref("grpo-rounds-i0", "new_policy")
    assert by_name["evaluate-i1"].inputs["policy"] == Ref("grpo-rounds-i1", "new_policy")


def test_warm_engine_needs_one_process_per_round():
    for key, value in (("rollout", {"shards": 2}), ("grpo", {"nproc_per_node": 2})):
        with pytest.raises(ConfigError, match=rf"loop.warm_engine .*{key}\.\w+ is 2"):
            parse_config({"loop": {"warm_engine": True}, key: value})


@pytest.mark.parametrize("reference", ["iteration", "sft"])
def test_warm_rounds_equal_one_task_per_stage(tmp_path, reference):
    """Same config and seed, both modes in process: identical final policy (every tensor bit for bit),
    identical rollouts of every round, the same per-round MLflow runs with the same metrics."""
    results = {}
    for warm in (False, True):
        cfg = _config(warm, grpo={"reference": reference})
        results[warm] = run_in_process(cfg, tmp_path / str(warm))
    cold, warm = _weights(tmp_path / "False/grpo-update-i1-m1/new_policy"), \
        _weights(tmp_path / "True/grpo-rounds-i1/new_policy")
    assert cold.keys() == warm.keys()
    assert all(torch.equal(cold[k], warm[k]) for k in cold)
    start = _weights(tmp_path / "False/sft/model")
    assert any(not torch.equal(start[k], warm[k]) for k in warm)  # the policy did move
    for it in (0, 1):  # rm-replay's input: the iteration's rounds, in order
        cold_rows = pd.concat([pd.read_parquet(tmp_path / f"False/rollout-i{it}-m{m}/rollouts") for m in (0, 1)],
                              ignore_index=True)
        warm_rows = pd.read_parquet(tmp_path / f"True/grpo-rounds-i{it}/rollouts")
        assert warm_rows.step.tolist() == cold_rows.step.tolist() == [2 * it] * 32 + [2 * it + 1] * 32
        for col in ("completion_ids", "advantage", "reward", "policy_version"):
            assert warm_rows[col].astype(str).tolist() == cold_rows[col].astype(str).tolist(), col
    cold_runs, warm_runs = _round_runs(results[False]), _round_runs(results[True])
    assert sorted(warm_runs) == sorted(cold_runs) and len(warm_runs) == 8
    for name, metrics in cold_runs.items():
        for key in ("rollout/reward_mean", "rollout/accuracy", "update/loss", "update/kl"):
            if key in metrics:
                assert warm_runs[name][key] == pytest.approx(metrics[key], abs=1e-6), (name, key)
    assert not list((tmp_path / "True").glob("*/.rounds-*"))  # the rounds' scratch tables are gone


def test_a_failing_round_writes_nothing(tmp_path):
    """A round that stops (a divergence limit) fails the task: no new policy, no rollouts, no scratch."""
    from components.training import DivergenceError
    from pipelines import rounds

    cfg = _config(True, grpo={"max_kl": 1e-12, "lr": 1e-2})
    base = run_in_process(_config(False), tmp_path / "base")  # an SFT policy, prompts, a reward model
    del base
    out = tmp_path / "out"
    with pytest.raises(DivergenceError, match="grpo.max_kl"):
        rounds.rounds_task("grpo-rounds-i0", cfg.to_json(), "", "", None,
                           prompts=str(tmp_path / "base/prepare-data/train"),
                           policy=str(tmp_path / "base/sft/model"),
                           reward_model=str(tmp_path / "base/reward-model/reward_model"),
                           reference=str(tmp_path / "base/sft/model"), rollouts=str(out / "rollouts"),
                           new_policy=str(out / "new_policy"), iteration=0, first_step=0)
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_bf16_sampler_gets_the_trained_weights(trained_policy):
    """An HF sampler in another dtype than the trainer's is a copy: `load_weights` pushes the new weights."""
    from components.generation import HFBackend
    from components.modeling import load_policy

    cfg = fast_config()
    trainer, tok = load_policy(str(trained_policy), cfg.model)
    sampler = HFBackend(load_policy(str(trained_policy), cfg.model.model_copy(update={"dtype": "bfloat16"}))[0], tok)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.01)
    sampler.load_weights(trainer)
    got, want = sampler.model.state_dict(), trainer.state_dict()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    same = HFBackend(trainer, tok)
    same.load_weights(trainer)  # sampling with the trained model itself: nothing to copy
    assert same.model is trainer


def test_compiled_pipeline_places_the_rounds_where_the_update_runs(tmp_path):
    """One KFP task per iteration's rounds, with the update's resources and image (hf), the rollout's (vllm)."""
    from pipelines.pipeline import compile_pipeline

    gpu = {"cluster": {"stages": {"grpo_update": {"image": "gpu", "accelerator_limit": 1, "memory_limit": "40Gi"},
                                  "rollout": {"image": "rollout", "accelerator_limit": 1}}},
           "loop": {"iterations": 2, "steps_per_iteration": 3, "warm_engine": True}}
    for backend, image, memory in (("hf", "trainer-cuda", "40Gi"), ("vllm", "rollout-vllm", None)):
        path = compile_pipeline(fast_config(**gpu, rollout={"backend": backend}), str(tmp_path / f"{backend}.yaml"))
        docs = list(yaml.safe_load_all(Path(path).read_text()))
        spec = docs[0]
        tasks = spec["root"]["dag"]["tasks"]
        rounds = {k: v for k, v in tasks.items() if v["taskInfo"]["name"].startswith("grpo-rounds-")}
        assert sorted(t["taskInfo"]["name"] for t in rounds.values()) == ["grpo-rounds-i0", "grpo-rounds-i1"]
        assert not [t for t in tasks.values() if t["taskInfo"]["name"].startswith(("rollout-i", "grpo-update-"))]
        executor = spec["components"][tasks[next(iter(rounds))]["componentRef"]["name"]]["executorLabel"]
        container = spec["deploymentSpec"]["executors"][executor]["container"]
        assert image in container["image"]
        assert container["resources"].get("accelerator", {}).get("resourceCount") in ("1", 1)
        if memory:
            assert container["resources"]["resourceMemoryLimit"] == memory


def test_kfp_grpo_run_with_warm_engine(tmp_path, monkeypatch, capsys):
    """A real `kfp-grpo run` (kfp.local, embedded MLflow) with the rounds in memory: one task per
    iteration on the terminal, every round's nested MLflow run and parent-run point, the iteration's
    rollouts (both rounds) handed on, the models registered."""
    from pipelines import local as local_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _config(True, data={"num_train": 64, "num_test": 16}, sft={"steps": 5}, reward_model={"steps": 2},
                  replay={"steps": 2})  # the wiring, not the learning
    summary = local_run.run_local(cfg, tmp_path / "run", {"init_policy_uri": "", "init_reward_uri": ""})
    terminal = capsys.readouterr().out
    assert "(2 iterations × 2 rounds in memory)" in terminal
    assert "grpo-rounds-i1" in terminal and "rollout-i0-m0" not in terminal
    c = mlflow.MlflowClient(summary["tracking_uri"])
    (experiment,) = [e for e in c.search_experiments() if e.name == cfg.tracking.experiment]
    runs = c.search_runs([experiment.experiment_id], max_results=200)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    names = {r.info.run_name for r in runs}
    assert {f"{s}-i{i}-m{m}" for s in ("rollout", "grpo-update") for i in (0, 1) for m in (0, 1)} <= names
    assert [m.step for m in c.get_metric_history(parent.info.run_id, "rollout/reward_mean")] == [0, 1, 2, 3]
    (last_update,) = [r for r in runs if r.info.run_name == "grpo-update-i1-m1"]
    assert {"update/loss", "update/kl", "grpo_update/seconds"} <= set(last_update.data.metrics)
    (second,) = (tmp_path / "run").glob("kfp/*/grpo-rounds-2/rollouts")
    assert sorted(set(pd.read_parquet(second).step)) == [2, 3]
    assert summary["policy_version"]
