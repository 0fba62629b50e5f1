"""The update under torchrun on CPU (FSDP2 over gloo) against the single-process update: same
per-step loss/KL, same weights, interchangeable optimizer state; the launch command; and, on
two GPUs (skipped without them), NCCL + bf16 FSDP."""

from __future__ import annotations

import json
import subprocess

import mlflow
import pytest
import torch

from components import distributed, grpo_update
from components.artifacts import OPTIMIZER_FILE
from components.modeling import load_policy
from tests.scale import gpu, max_diff, state, two_gpus, update_cfg


# =========================================================================== torchrun / FSDP on CPU
def test_torchrun_two_processes_match_the_single_process_update(scale_work, scale_rollouts, round1, untrained_policy,
                                                                 mlflow_uri, monkeypatch, capfd):
    """grpo.nproc_per_node=2 re-runs the stage as `torchrun --nproc-per-node=2 -m components.grpo_update`
    (FSDP2 over gloo): same minibatches → the same per-step loss/KL as one process, the same weights,
    and an optimizer state either path can continue."""
    cfg1, cfg2 = update_cfg(), update_cfg(nproc_per_node=2)
    args = ([str(scale_rollouts[1.0])], str(round1), str(untrained_policy))  # round 2: optimizer state + separate π_ref
    commands = []
    real_run = subprocess.run
    monkeypatch.setattr(distributed.subprocess, "run", lambda cmd, **kw: commands.append(cmd) or real_run(cmd, **kw))
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_uri)
    try:
        with mlflow.start_run() as r1:
            single = grpo_update.run(cfg1, *args, str(scale_work / "single"))
        with mlflow.start_run() as r2:
            multi = grpo_update.run(cfg2, *args, str(scale_work / "torchrun"))
        client = mlflow.MlflowClient(mlflow_uri)
        curves = {k: [[m.value for m in sorted(client.get_metric_history(r.info.run_id, k), key=lambda m: m.step)]
                      for r in (r1, r2)] for k in ("update/loss", "update/kl", "update/grad_norm", "update/entropy")}
    finally:
        mlflow.set_tracking_uri(previous)

    assert len(commands) == 1 and commands[0][1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in commands[0] and commands[0][commands[0].index("-m", 3) + 1] == "components.grpo_update"
    assert "on 2 ranks" in capfd.readouterr().out
    assert multi["update/world_size"] == 2 and multi["update/optimizer_steps"] == single["update/optimizer_steps"] == 2
    for key in ("update/loss", "update/kl", "update/clip_fraction", "update/entropy", "update/grad_norm",
                "update/ratio_max"):
        assert multi[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    for key, (a, b) in curves.items():  # per optimizer step, logged by rank 0 into the task's MLflow run
        assert len(a) == len(b) == 2 and a == pytest.approx(b, rel=1e-4, abs=1e-6), key
    s_in, s_one, s_two = state(round1), state(scale_work / "single"), state(scale_work / "torchrun")
    assert max_diff(s_in, s_two) > 5e-4  # it learned
    assert max_diff(s_one, s_two) < 1e-5  # what one process learned

    opt_one = torch.load(scale_work / "single" / OPTIMIZER_FILE, weights_only=True)
    opt_two = torch.load(scale_work / "torchrun" / OPTIMIZER_FILE, weights_only=True)
    assert opt_two["state"].keys() == opt_one["state"].keys()
    assert float(opt_two["state"][0]["step"]) == float(opt_one["state"][0]["step"]) == 4  # continued round 1's
    model, _ = load_policy(str(scale_work / "torchrun"))
    torch.optim.AdamW(model.parameters()).load_state_dict(opt_two)  # a single-process round can continue it
    for f in ("config.json", "tokenizer.json", "generation_config.json", "chat_template.jinja"):
        assert (scale_work / "torchrun" / f).read_text() == (scale_work / "single" / f).read_text(), f


def test_gradient_checkpointing_leaves_the_update_unchanged_alone_and_under_torchrun(scale_work, scale_rollouts, round1,
                                                                                   untrained_policy):
    """grpo.gradient_checkpointing recomputes activations in the backward pass: the same update, in one
    process and on two FSDP ranks (gloo), as one process without it."""
    args = ([str(scale_rollouts[1.0])], str(round1), str(untrained_policy))
    plain = grpo_update.run(update_cfg(), *args, str(scale_work / "gc-off"))
    alone = grpo_update.run(update_cfg(gradient_checkpointing=True), *args, str(scale_work / "gc-on"))
    ranks = grpo_update.run(update_cfg(gradient_checkpointing=True, nproc_per_node=2), *args, str(scale_work / "gc-fsdp"))
    for m in (alone, ranks):
        assert m["update/loss"] == pytest.approx(plain["update/loss"], rel=1e-4, abs=1e-6)
        assert m["update/grad_norm"] == pytest.approx(plain["update/grad_norm"], rel=1e-4)
    off = state(scale_work / "gc-off")
    assert max_diff(off, state(scale_work / "gc-on")) < 1e-5 and max_diff(off, state(scale_work / "gc-fsdp")) < 1e-5
    assert max_diff(off, state(round1)) > 5e-4  # it learned


def test_distributed_optimizer_state_keys_roundtrip(untrained_policy):
    model, _ = load_policy(str(untrained_policy))
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    sd = opt.state_dict()
    names = distributed.param_names(model)
    by_name = distributed.ids_to_names(sd, names)
    assert set(by_name["state"]) == set(names) and by_name["param_groups"][0]["params"] == names
    back = distributed.names_to_ids(by_name, names)
    assert back["param_groups"] == sd["param_groups"] and back["state"].keys() == sd["state"].keys()


def test_torchrun_command_single_and_multi_node(cfg):
    from components.stage_cli import stage_argv

    args = stage_argv(grpo_update.run, rollouts=["r.parquet"], policy="p", reference=None, new_policy="o", step=3)
    one = distributed.torchrun_command(cfg, args, 4)
    assert one[-8:] == ["--rollouts", "r.parquet", "--policy", "p", "--new-policy", "o", "--step", "3"]
    assert "--standalone" in one and "--nproc-per-node=4" in one and "--reference" not in one
    args = stage_argv(grpo_update.run, rollouts=["a", "b"], policy="p", reference="ref", new_policy="o", step=0)
    multi = distributed.torchrun_command(cfg, args, 8, nnodes=2, launcher=["torchrun"])
    assert multi[:3] == ["torchrun", "--nnodes=2", "--nproc-per-node=8"] and "--standalone" not in multi
    assert multi[multi.index("--rollouts") + 1: multi.index("--rollouts") + 3] == ["a", "b"]
    assert multi[multi.index("--reference") + 1] == "ref"
    assert json.loads(multi[multi.index("--config-json") + 1]) == json.loads(cfg.to_json())


def test_launch_failure_is_reported(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(distributed.DistributedLaunchError, match="exited with code 1"):
        distributed.launch(update_cfg(nproc_per_node=2), ["--rollouts", "x.parquet", "--policy", "p",
                                                          "--new-policy", str(tmp_path / "o")])



@pytest.mark.gpu
@gpu
@two_gpus
def test_torchrun_fsdp_bf16_on_two_gpus(scale_work, scale_rollouts, round1, untrained_policy):
    """NCCL + FSDP2 with bf16 compute against the float32 single-process update (loose: bf16).
    Not run yet: no GPU was lent to this task."""
    args = ([str(scale_rollouts[1.0])], str(round1), str(untrained_policy))
    single = grpo_update.run(update_cfg(), *args, str(scale_work / "gpu-single"))
    multi = grpo_update.run(update_cfg(nproc_per_node=2, gradient_checkpointing=True), *args, str(scale_work / "gpu-fsdp"))
    assert multi["update/world_size"] == 2
    assert multi["update/kl"] == pytest.approx(single["update/kl"], rel=0.1, abs=1e-3)
    assert max_diff(state(scale_work / "gpu-single"), state(scale_work / "gpu-fsdp")) < 1e-2


