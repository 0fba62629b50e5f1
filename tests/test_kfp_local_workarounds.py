"""Sharded rollouts fanned out and gathered in a real kfp.local run, and the kfp.local workarounds
they need (print put back, upstream parameters kept in loops); the GPU benchmark harness."""

from __future__ import annotations

import builtins
import io
import json

import mlflow
import pandas as pd
import pytest
import torch



# =========================================================================== the GPU throughput benchmark
def test_gpu_throughput_benchmark_measures_what_runs_here_and_names_what_does_not(tmp_path):
    """`python -m benchmarks.gpu_throughput` (smoke size, tiny shape): the HF rollout and the update are
    measured by the stages themselves (> 0 tokens/s, completions as asked); vLLM, which cannot run without
    CUDA, is listed as skipped with the reason instead of a number."""
    from benchmarks import gpu_throughput

    out = tmp_path / "out"
    assert gpu_throughput.main(["--shape", "tiny", "--prompts", "4", "--group", "4", "--max-new-tokens", "8",
                                "--repeats", "1", "--minibatch", "16", "--work", str(tmp_path / "work"),
                                "--out", str(out)]) == 0
    res = json.loads((out / "gpu_throughput.json").read_text())
    (hf_run,) = res["rollout"]["hf"]["runs"]
    assert hf_run["completions"] == 16 and 0 < hf_run["completion_tokens_mean"] <= 8
    assert res["rollout"]["hf"]["tokens_per_s"] == hf_run["tokens_per_s"] > 0
    assert res["update"]["tokens_per_s"] > 0 and res["update"]["optimizer_steps"] == 1
    table = (out / "gpu_throughput.md").read_text()
    if not torch.cuda.is_available():
        assert res["rollout"]["vllm"] == {"skipped": "vLLM needs a CUDA GPU (none here)"}
        assert "| rollout | vllm | skipped: vLLM needs a CUDA GPU" in table
    assert f"| rollout | hf | {hf_run['tokens_per_s']:.0f} |" in table


# =========================================================================== sharded rollouts, run for real
def test_sharded_rollouts_fan_out_and_gather_in_a_local_run(tmp_path, capsys, monkeypatch):
    """`kfp-grpo run` with rollout.shards=2 (a reduced pipeline through kfp.local): the round's prompts are
    split across two ParallelFor iterations, each a rollout task nested under the pipeline's MLflow run
    (kfp.local 2.17 handed the shards the loop index instead of that run's id until
    pipelines.local.keep_upstream_parameters_in_loops), and gather-rollouts (dsl.Collected) joins them
    into the round the update learns from; the parent run's rollout curves get one point per round, over
    the whole round."""
    from pipelines import cli

    work = tmp_path / "run"
    sets = ["sft.steps=20", "reward_model.steps=5", "replay.steps=5", "loop.iterations=1",
            "loop.steps_per_iteration=1", "data.num_train=200", "data.num_test=40", "rollout.prompts_per_step=8",
            "rollout.shards=2"]
    print_ = builtins.print
    code = cli.main(["run", "--workdir", str(work), "--output", "json", *sum([["--set", s] for s in sets], [])])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert builtins.print is print_  # kfp.local's per-task print indentation does not outlive the run
    import logging  # nor a racing shard's log handler on the run's (closed) terminal sink

    assert not [h for h in logging.getLogger().handlers if type(getattr(h, "stream", None)).__name__ == "TaskLog"]
    (run_dir,) = (work / "kfp").iterdir()
    shards = [pd.read_parquet(p) for p in sorted(run_dir.glob("for-loop-*-iteration-*/rollout/rollouts"))]
    gathered = pd.read_parquet(run_dir / "gather-rollouts" / "rollouts")
    assert len(shards) == 2 and all(len(s) == 4 * 8 for s in shards)  # 8 prompts × G=8, half each
    ids = [set(s.id) for s in shards]
    assert len(ids[0]) == len(ids[1]) == 4 and not ids[0] & ids[1]
    assert len(gathered) == 64 and set(gathered.id) == ids[0] | ids[1]

    summary = json.loads(out[out.rindex("\n{") + 1:])  # the --json summary, printed last
    assert summary["tracking_uri"] == f"sqlite:///{work / 'mlflow.db'}"
    client = mlflow.MlflowClient(summary["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("kfp-grpo").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    rollouts = [r for r in runs if r.data.tags.get("kfp_grpo.stage") == "rollout"]
    assert sorted(r.data.params["shard"] for r in rollouts) == ["0", "1"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in rollouts)
    assert parent.data.params["rollout.shards"] == "2" and parent.info.status == "FINISHED"
    for key, column in (("rollout/accuracy", "correct"), ("rollout/reward_mean", "reward")):  # the round, once
        (point,) = client.get_metric_history(parent.info.run_id, key)
        assert point.step == 0 and point.value == pytest.approx(float(gathered[column].mean())), key


def test_print_and_log_handlers_are_put_back_when_kfp_local_leaves_them_swapped():
    import logging

    from pipelines.local import kfp_globals_restored

    original, root = builtins.print, logging.getLogger()
    handlers = root.handlers[:]
    with kfp_globals_restored():
        builtins.print = lambda *a, **kw: original("    ", *a, **kw)  # what kfp.local's racing tasks leave
        root.addHandler(logging.StreamHandler(io.StringIO()))  # a racing task's handler on the run's sink
    assert builtins.print is original and root.handlers == handlers


def test_the_kfp_local_loop_workaround_keeps_upstream_parameters():
    from kfp.local.orchestrator import task_spec_utils
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipelines.local import keep_upstream_parameters_in_loops

    assert keep_upstream_parameters_in_loops() is True  # kfp 2.17: the bug is there, the fix is in
    spec = pipeline_spec_pb2.PipelineTaskSpec()
    spec.inputs.parameters["run_id"].task_output_parameter.producer_task = "start-tracking"
    spec.inputs.parameters["uri"].component_input_parameter = "tracking_uri"
    spec.parameter_iterator.item_input = "pipelinechannel--loop-item-param-1"
    it = task_spec_utils.create_parameter_loop_iteration_task_spec(spec, 1, "for-loop-2")
    assert it.inputs.parameters["run_id"].task_output_parameter.producer_task == "start-tracking"
    assert it.inputs.parameters["uri"].component_input_parameter == "tracking_uri"
    assert it.inputs.parameters["pipelinechannel--loop-item-param-1"].runtime_value.constant.number_value == 1
    assert keep_upstream_parameters_in_loops() is True  # idempotent
