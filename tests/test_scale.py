"""GPU-scale paths: vLLM rollouts, torchrun/FSDP updates, Kubeflow Trainer jobs, truncated IS.

What runs here on CPU, for real:
- the update under ``torchrun --nproc-per-node 2 -m components.grpo_update`` (FSDP2 over gloo)
  against the single-process update on the same rollouts: same per-step loss/KL, same
  weights, optimizer state interchangeable;
- a multi-node TrainJob end to end: the manifest is posted to a local fake of the
  Kubernetes API whose "controller" starts the manifest's torchrun command on two local
  "nodes" (node rank 0 and 1, one process each) with the PET_* rendezvous environment;
- create/wait/delete of TrainJobs against that fake API (Complete, Failed, timeout);
- the truncated importance-sampling correction on rollouts whose sampler log-probs match
  (temperature 1) or differ from (temperature 0.7) the trainer's;
- VLLMBackend's conversion of vLLM-shaped outputs, with stand-in objects (not vLLM);
- where vLLM is installed (`tests/install_vllm_api.sh`: imports only, no GPU): the same conversion on
  vLLM's own output classes, and vLLM's own validation of our engine and sampling arguments.

Tests that need a GPU (real vLLM, NCCL/bf16 FSDP) are skipped here: no GPU was lent to
this task, so those paths have not been run.
"""

from __future__ import annotations

import builtins
import json
import re
import os
import socket
import subprocess
import sys
import threading
import types
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from components import distributed, grpo_update, rollout
from components.artifacts import OPTIMIZER_FILE
from components.config import ConfigError, VLLMConfig, parse_config
from components.generation import HFBackend
from components.sampling import Generation, Sampling, group_temperatures
from components.grpo import group_advantages
from components.modeling import completion_logprobs, encode_prompts, load_policy, pad_right
from components.vllm_backend import (INSTALL_HINT, Request, VLLMUnavailableError, engine_kwargs, plan_requests,
                                     sampling_kwargs, to_generations)
from pipelines import trainer_job
from tests.conftest import fast_config, send_json

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = "requires GPU (not lent to this task)"
NO_VLLM = "vLLM not installed (CPU API check: bash tests/install_vllm_api.sh; PYTHONPATH=.vllm-api pytest -m vllm_api)"


def has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
gpu_vllm = pytest.mark.skipif(not (torch.cuda.is_available() and has_vllm()), reason=NO_GPU + " and the gpu extra")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="requires 2 GPUs (not lent to this task)")


# =========================================================================== fixtures
GRPO = {"minibatch_size": 31, "lr": 1e-3, "beta": 0.04, "loss_agg": "token"}


def update_cfg(**grpo):
    """Rollouts of 8 prompts × 4; the update: 31 + 1 outputs per step (the 1-output step leaves a rank empty)."""
    return fast_config(grpo={**GRPO, **grpo})


def synthetic_advantages(path: Path, seed: int = 0) -> None:
    """The untrained policy earns no reward (all advantages 0): give the rows seeded group-relative ones."""
    df = pd.read_parquet(path)
    r = np.random.default_rng(seed).random(len(df))
    df["reward"] = r
    df["advantage"] = group_advantages(torch.tensor(r), fast_config().rollout.group_size).numpy()
    df.to_parquet(path, index=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scale")


@pytest.fixture(scope="module")
def rollouts(work, data_dir, untrained_policy) -> dict[float, Path]:
    """One round of rollouts of the untrained tiny policy at temperature 1.0 and at 0.7."""
    out = {}
    for tau in (1.0, 0.7):
        path = work / f"rollouts-{tau}.parquet"
        rollout.run(fast_config(rollout={"temperature": tau}), str(data_dir / "train.parquet"),
                    str(untrained_policy), None, str(path))
        synthetic_advantages(path)
        out[tau] = path
    return out


@pytest.fixture(scope="module")
def round1(work, rollouts, untrained_policy) -> Path:
    """A single-process update: a policy directory with optimizer state, as a later round sees it."""
    out = work / "round1"
    grpo_update.run(update_cfg(), [str(rollouts[1.0])], str(untrained_policy), None, str(out))
    return out


def state(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_policy(str(model_dir))[0].state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# =========================================================================== torchrun / FSDP on CPU
def test_torchrun_two_processes_match_the_single_process_update(work, rollouts, round1, untrained_policy,
                                                                 mlflow_uri, monkeypatch, capfd):
    """grpo.nproc_per_node=2 re-runs the stage as `torchrun --nproc-per-node=2 -m components.grpo_update`
    (FSDP2 over gloo): same minibatches → the same per-step loss/KL as one process, the same weights,
    and an optimizer state either path can continue."""
    cfg1, cfg2 = update_cfg(), update_cfg(nproc_per_node=2)
    args = ([str(rollouts[1.0])], str(round1), str(untrained_policy))  # round 2: optimizer state + separate π_ref
    commands = []
    real_run = subprocess.run
    monkeypatch.setattr(distributed.subprocess, "run", lambda cmd, **kw: commands.append(cmd) or real_run(cmd, **kw))
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_uri)
    try:
        with mlflow.start_run() as r1:
            single = grpo_update.run(cfg1, *args, str(work / "single"))
        with mlflow.start_run() as r2:
            multi = grpo_update.run(cfg2, *args, str(work / "torchrun"))
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
    s_in, s_one, s_two = state(round1), state(work / "single"), state(work / "torchrun")
    assert max_diff(s_in, s_two) > 5e-4  # it learned
    assert max_diff(s_one, s_two) < 1e-5  # what one process learned

    opt_one = torch.load(work / "single" / OPTIMIZER_FILE, weights_only=True)
    opt_two = torch.load(work / "torchrun" / OPTIMIZER_FILE, weights_only=True)
    assert opt_two["state"].keys() == opt_one["state"].keys()
    assert float(opt_two["state"][0]["step"]) == float(opt_one["state"][0]["step"]) == 4  # continued round 1's
    model, _ = load_policy(str(work / "torchrun"))
    torch.optim.AdamW(model.parameters()).load_state_dict(opt_two)  # a single-process round can continue it
    for f in ("config.json", "tokenizer.json", "generation_config.json", "chat_template.jinja"):
        assert (work / "torchrun" / f).read_text() == (work / "single" / f).read_text(), f


def test_gradient_checkpointing_leaves_the_update_unchanged_alone_and_under_torchrun(work, rollouts, round1,
                                                                                   untrained_policy):
    """grpo.gradient_checkpointing recomputes activations in the backward pass: the same update, in one
    process and on two FSDP ranks (gloo), as one process without it."""
    args = ([str(rollouts[1.0])], str(round1), str(untrained_policy))
    plain = grpo_update.run(update_cfg(), *args, str(work / "gc-off"))
    alone = grpo_update.run(update_cfg(gradient_checkpointing=True), *args, str(work / "gc-on"))
    ranks = grpo_update.run(update_cfg(gradient_checkpointing=True, nproc_per_node=2), *args, str(work / "gc-fsdp"))
    for m in (alone, ranks):
        assert m["update/loss"] == pytest.approx(plain["update/loss"], rel=1e-4, abs=1e-6)
        assert m["update/grad_norm"] == pytest.approx(plain["update/grad_norm"], rel=1e-4)
    off = state(work / "gc-off")
    assert max_diff(off, state(work / "gc-on")) < 1e-5 and max_diff(off, state(work / "gc-fsdp")) < 1e-5
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


# =========================================================================== truncated IS
def update_delta(cfg, rollouts_path: Path, policy: Path, out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    metrics = grpo_update.run(cfg, [str(rollouts_path)], str(policy), None, str(out))
    before, after = state(policy), state(out)
    return metrics, {k: after[k] - before[k] for k in before}


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt()
    return float(num / sum(b[k].pow(2).sum() for k in b).sqrt())


@pytest.mark.parametrize("tau, mismatch", [(1.0, False), (0.7, True)])
def test_importance_sampling_cap_acts_only_on_a_sampler_trainer_mismatch(work, rollouts, untrained_policy, tau,
                                                                         mismatch):
    """Sampler log-probs are those of the tempered distribution: at τ=1 they are the trainer's (up to float
    noise) and the capped IS weight min(π_old/π_behavior, cap) is 1; at τ=0.7 they differ and it reweights."""
    rows = pd.read_parquet(rollouts[tau])
    model, tok = load_policy(str(untrained_policy))
    enc = encode_prompts(tok, rows.prompt_text.tolist())
    ids, mask = pad_right([list(x) for x in rows.completion_ids], tok.pad_token_id)
    with torch.no_grad():
        trainer, _ = completion_logprobs(model, enc["input_ids"], enc["attention_mask"], ids, mask)
    sampler = torch.zeros_like(trainer)
    for i, lp in enumerate(rows.sampler_logprobs):
        sampler[i, : len(lp)] = torch.tensor(list(lp))
    gap = ((trainer - sampler).abs() * mask).sum() / mask.sum()
    assert (gap > 0.05) if mismatch else (gap < 1e-4), float(gap)

    base = dict(minibatch_size=32, beta=0.0, loss_agg="sequence")  # one optimizer step
    plain, d_plain = update_delta(update_cfg(**base), rollouts[tau], untrained_policy, work / f"is-off-{tau}")
    capped, d_capped = update_delta(update_cfg(**base, importance_sampling_cap=2.0), rollouts[tau], untrained_policy,
                                    work / f"is-on-{tau}")
    if mismatch:
        assert capped["update/loss"] != pytest.approx(plain["update/loss"], rel=1e-3)
        assert capped["update/grad_norm"] != pytest.approx(plain["update/grad_norm"], rel=1e-3)
        assert rel_diff(d_capped, d_plain) > 0.1
    else:
        assert capped["update/loss"] == pytest.approx(plain["update/loss"], rel=1e-4, abs=1e-7)
        assert capped["update/grad_norm"] == pytest.approx(plain["update/grad_norm"], rel=1e-4)
        assert rel_diff(d_capped, d_plain) < 1e-3


def test_importance_sampling_is_off_by_default():
    assert parse_config({}).grpo.importance_sampling_cap is None


# =========================================================================== vLLM backend, without vLLM
class Logprob:  # stand-ins with vLLM's attribute names (vllm.logprobs.Logprob, CompletionOutput, RequestOutput)
    def __init__(self, logprob: float):
        self.logprob, self.rank, self.decoded_token = logprob, 1, None


class CompletionOutput:
    def __init__(self, index, token_ids, logprobs, finish_reason):
        self.index, self.token_ids, self.finish_reason = index, token_ids, finish_reason
        self.logprobs = [{t: Logprob(lp)} for t, lp in zip(token_ids, logprobs)]
        self.text, self.cumulative_logprob, self.stop_reason = "", sum(logprobs), None


class RequestOutput:
    def __init__(self, outputs):
        self.outputs, self.request_id, self.prompt_token_ids, self.finished = outputs, "0", [], True


def test_plan_requests_groups_equal_temperatures_with_distinct_seeds():
    constant = Sampling(n=4, temperatures=[0.8] * 4, max_new_tokens=5, seed=100)
    reqs = plan_requests(3, constant)
    assert [(r.prompt_index, r.sample_indices, r.temperature) for r in reqs] == [
        (p, (0, 1, 2, 3), 0.8) for p in range(3)]
    schedule = Sampling(n=4, temperatures=group_temperatures(4, 1.0, (0.5, 1.3)), max_new_tokens=5, seed=100)
    reqs = plan_requests(2, schedule)
    assert len(reqs) == 8 and all(len(r.sample_indices) == 1 for r in reqs)
    assert sorted(r.seed for r in reqs) == list(range(100, 108))  # vLLM adds the child index: all distinct
    greedy = plan_requests(2, Sampling(n=3, temperatures=[1.0] * 3, max_new_tokens=5, greedy=True))
    assert [(r.sample_indices, r.temperature) for r in greedy] == [((0, 1, 2), 0.0)] * 2


def real_vllm_outputs(flat: bool):
    """Builders of vLLM's own RequestOutput / CompletionOutput / Logprob (per-position dicts or FlatLogprobs)."""
    from vllm.logprobs import FlatLogprobs
    from vllm.logprobs import Logprob as VLogprob
    from vllm.outputs import CompletionOutput as VCompletion
    from vllm.outputs import RequestOutput as VRequest

    def completion(index, token_ids, logprobs, finish_reason):
        per_position = [{t: VLogprob(logprob=lp, rank=1, decoded_token=None)} for t, lp in zip(token_ids, logprobs)]
        if flat:
            container = FlatLogprobs()
            for pos in per_position:
                container.append(pos)
            per_position = container
        return VCompletion(index=index, text="", token_ids=list(token_ids), cumulative_logprob=sum(logprobs),
                           logprobs=per_position, finish_reason=finish_reason)

    def request(outputs):
        return VRequest(request_id="0", prompt=None, prompt_token_ids=[1], prompt_logprobs=None, outputs=outputs,
                        finished=True)

    return completion, request


OUTPUT_CLASSES = [
    pytest.param("stand-in", id="stand-in-classes"),
    pytest.param("vllm", id="vllm-classes", marks=[pytest.mark.vllm_api]),
    pytest.param("vllm-flat", id="vllm-flat-logprobs", marks=[pytest.mark.vllm_api]),
]


@pytest.mark.parametrize("classes", OUTPUT_CLASSES)
def test_vllm_output_conversion_gives_the_hf_backend_generations(untrained_policy, classes):
    """HFBackend's generations are rewritten as vLLM outputs (one request per prompt and temperature, as
    VLLMBackend sends them), and `to_generations` must give back Generations with the same fields, types and
    values. With "stand-in" the outputs are objects with vLLM's attribute names (checks our code only); with
    "vllm"/"vllm-flat" they are the installed vLLM's own classes (skipped where vLLM is not installed)."""
    if classes == "stand-in":
        completion, request = CompletionOutput, RequestOutput
    else:
        if not has_vllm():
            pytest.skip(NO_VLLM)
        completion, request = real_vllm_outputs(flat=classes == "vllm-flat")
    model, tok = load_policy(str(untrained_policy))
    sampling = Sampling(n=4, temperatures=[0.7, 0.7, 1.3, 1.3], max_new_tokens=12, top_p=0.95, seed=3)
    prompts = ["<|user|>1+2<|assistant|>", "<|user|>30+4<|assistant|>", "<|user|>7+7<|assistant|>"]
    hf = HFBackend(model, tok, batch_size=5).generate(prompts, sampling)
    by_key = {(g.prompt_index, g.sample_index): g for g in hf}
    requests = plan_requests(len(prompts), sampling)
    outputs = [request([completion(j, by_key[r.prompt_index, k].token_ids, by_key[r.prompt_index, k].logprobs,
                                   by_key[r.prompt_index, k].finish_reason)
                        for j, k in enumerate(r.sample_indices)]) for r in requests]
    converted = to_generations(outputs, requests, tok.eos_token_id, lambda t: tok.decode(t, skip_special_tokens=True))
    key = lambda g: (g.prompt_index, g.sample_index)  # noqa: E731
    assert sorted(converted, key=key) == sorted(hf, key=key)
    assert {g.finish_reason for g in converted} <= {"stop", "length"}
    for g in converted:
        for f in fields(Generation):
            assert type(getattr(g, f.name)) is type(getattr(by_key[key(g)], f.name)), f.name
        assert all(type(x) is int for x in g.token_ids) and all(type(x) is float for x in g.logprobs)


@pytest.mark.vllm_api
@pytest.mark.skipif(not has_vllm(), reason=NO_VLLM)
def test_installed_vllm_accepts_our_engine_and_sampling_arguments(untrained_policy):
    """vLLM's own validation (no GPU needed): the engine arguments VLLMBackend passes build a vLLM
    ModelConfig of the policy directory; every request's SamplingParams validate with the n, temperature,
    top-p, seed and logprobs we mean; vLLM gives the i-th child of a seeded request seed + i (the seeding
    plan_requests relies on); vLLM's tokenizer of the policy directory gives the prompt ids we send."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.tokenizers import get_tokenizer
    from vllm.v1.engine.parallel_sampling import ParentRequest

    cfg = VLLMConfig(dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    model_config = EngineArgs(**engine_kwargs(str(untrained_policy), cfg, seed=5)).create_model_config()
    assert model_config.logprobs_mode == "processed_logprobs" and model_config.dtype == torch.float32
    assert model_config.seed == 5 and model_config.hf_config.architectures == ["LlamaForCausalLM"]
    with pytest.raises(Exception, match="logprobs_mode"):  # the field is validated, not silently dropped
        EngineArgs(**{**engine_kwargs(str(untrained_policy), cfg), "logprobs_mode": "bogus"}).create_model_config()

    schedule = Sampling(n=4, temperatures=group_temperatures(4, 1.0, (0.6, 1.4)), max_new_tokens=9, top_p=0.9,
                        seed=40)
    constant = Sampling(n=4, temperatures=[0.8] * 4, max_new_tokens=9, top_p=0.95, seed=40)
    greedy = Sampling(n=4, temperatures=[1.0] * 4, max_new_tokens=9, greedy=True, seed=40)
    child_seeds = []
    for sampling in (schedule, constant, greedy):
        for r in plan_requests(3, sampling):
            sp = SamplingParams(**sampling_kwargs(r, sampling))
            assert (sp.n, sp.temperature, sp.seed, sp.logprobs, sp.max_tokens) == (
                1 if sampling.greedy else len(r.sample_indices), r.temperature, r.seed, 0, 9)
            assert sp.top_p == (1.0 if sampling.greedy else sampling.top_p)
            if sampling is constant:
                parent = ParentRequest.__new__(ParentRequest)  # only the fields _get_child_sampling_params reads
                parent.sampling_params, parent.cached_child_sampling_params = sp, None
                child_seeds += [parent._get_child_sampling_params(i).seed for i in range(sp.n)]
    assert sorted(child_seeds) == list(range(40, 40 + 3 * 4))  # one distinct seed per (prompt, sample)

    _, tok = load_policy(str(untrained_policy))
    vtok = get_tokenizer(str(untrained_policy))
    prompt = "<|user|>12+7<|assistant|>"
    assert vtok(prompt, add_special_tokens=False)["input_ids"] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert vtok.eos_token_id == tok.eos_token_id


@pytest.mark.vllm_api
@pytest.mark.skipif(not has_vllm(), reason=NO_VLLM)
def test_vllm_processed_logprobs_are_what_the_hf_backend_records(untrained_policy):
    """vLLM's own sampler (`vllm.v1.sample.sampler.Sampler`, which runs on CPU), in the
    `logprobs_mode="processed_logprobs"` VLLMBackend sets, scores the HF backend's samples exactly as the HF
    backend recorded them: the same distribution after a per-sample temperature and top-p. So
    `sampler_logprobs` mean one thing whichever backend sampled (π_behavior of the IS correction)."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    model, tok = load_policy(str(untrained_policy))
    top_p = 0.8
    sampling = Sampling(n=4, temperatures=[0.6, 0.9, 1.2, 1.5], max_new_tokens=10, top_p=top_p, seed=11)
    prompts = ["<|user|>12+7<|assistant|>", "<|user|>3*4<|assistant|>"]
    gens = HFBackend(model, tok).generate(prompts, sampling)
    sampler = Sampler(logprobs_mode="processed_logprobs")
    checked = 0
    for g in gens:
        prompt_ids = tok(prompts[g.prompt_index], add_special_tokens=False)["input_ids"]
        with torch.no_grad():  # the logits each sampled token was drawn from (teacher-forced)
            logits = model(input_ids=torch.tensor([prompt_ids + g.token_ids])).logits[0, len(prompt_ids) - 1:-1]
        n = logits.shape[0]
        meta = SamplingMetadata(
            temperature=torch.full((n,), g.temperature), all_greedy=False, all_random=True,
            top_p=torch.full((n,), top_p), top_k=None, generators={}, max_num_logprobs=-1, no_penalties=True,
            prompt_token_ids=None, frequency_penalties=torch.zeros(n), presence_penalties=torch.zeros(n),
            repetition_penalties=torch.ones(n), output_token_ids=[[] for _ in range(n)],
            allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors())
        processed = sampler(logits.float().clone(), meta).logprobs_tensors.logprobs  # [n, vocab]
        vllm_lp = processed.gather(-1, torch.tensor(g.token_ids).unsqueeze(-1)).squeeze(-1)
        assert vllm_lp.tolist() == pytest.approx(g.logprobs, abs=1e-4), (g.prompt_index, g.sample_index)
        checked += n
    assert checked >= 40 and len({g.temperature for g in gens}) == 4


@pytest.mark.vllm_api
@pytest.mark.skipif(not has_vllm(), reason=NO_VLLM)
def test_rollout_image_pins_the_vllm_that_pins_the_trainers_torch():
    """The installed vLLM (the Dockerfile's VLLM_VERSION, by tests/install_vllm_api.sh) requires exactly the
    torch the image installs, and a transformers range that meets the project's: the image's pip install resolves."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    text = (ROOT / "docker" / "rollout-vllm.Dockerfile").read_text()
    arg = lambda name: re.search(rf"^ARG {name}=(\S+)$", text, re.M).group(1)  # noqa: E731
    assert version("vllm") == arg("VLLM_VERSION")
    reqs = {r.name: r for r in map(Requirement, requires("vllm")) if not r.marker or r.marker.evaluate()}
    assert reqs["torch"].specifier.contains(arg("TORCH_VERSION")), reqs["torch"]
    ours = next(Requirement(r) for r in requires("kfp-grpo") if r.startswith("transformers"))
    lo = re.search(r">=?([\d.]+)", str(reqs["transformers"].specifier)).group(1)
    assert ours.specifier.contains(lo), (ours, reqs["transformers"])


def test_vllm_conversion_cuts_at_eos_and_rejects_aborts():
    eos = 2
    req = [Request(0, (0,), 1.0, 0)]
    out = [RequestOutput([CompletionOutput(0, [5, 6, eos], [-1.0, -2.0, -0.5], "stop")])]
    (g,) = to_generations(out, req, eos, lambda t: "x")
    assert g.token_ids == [5, 6, eos] and g.logprobs == [-1.0, -2.0, -0.5] and g.finish_reason == "stop"
    out = [RequestOutput([CompletionOutput(0, [5, 6], [-1.0, -2.0], "length")])]
    assert to_generations(out, req, eos, lambda t: "x")[0].finish_reason == "length"
    out = [RequestOutput([CompletionOutput(0, [5], [-1.0], "abort")])]
    with pytest.raises(ValueError, match="abort"):
        to_generations(out, req, eos, lambda t: "x")
    bad = RequestOutput([CompletionOutput(0, [5, 6], [-1.0, -2.0], "length")])
    bad.outputs[0].logprobs = None
    with pytest.raises(ValueError, match="logprobs=0"):
        to_generations([bad], req, eos, lambda t: "x")


def test_vllm_backend_without_the_gpu_extra_says_what_to_install(untrained_policy, cfg, monkeypatch):
    from components.generation import make_backend

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm → ImportError, as where it is not installed
    with pytest.raises(VLLMUnavailableError, match=r"pip install 'kfp-grpo\[gpu\]'") as err:
        make_backend("vllm", str(untrained_policy), cfg.model, cfg.rollout)
    assert INSTALL_HINT in str(err.value)


def fake_vllm(calls: dict) -> types.ModuleType:
    """A stand-in `vllm` module (NOT vLLM): greedy decoding with the HF model, vLLM-shaped outputs."""
    mod = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)
            calls.setdefault("sampling", []).append(kw)

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw
            self.model, self.tok = load_policy(kw["model"])

        @torch.no_grad()
        def generate(self, prompts, sampling_params, use_tqdm=True):
            results = []
            for prompt, sp in zip(prompts, sampling_params):
                calls.setdefault("prompt_ids", []).append(prompt["prompt_token_ids"])
                ids, new, lps = list(prompt["prompt_token_ids"]), [], []
                while len(new) < sp.max_tokens:
                    logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                    logp = torch.log_softmax(logits / max(sp.temperature, 1e-5), -1)
                    t = int(logp.argmax())
                    ids, new, lps = ids + [t], new + [t], lps + [float(logp[t])]
                    if t == self.tok.eos_token_id:
                        break
                finish = "stop" if new[-1] == self.tok.eos_token_id else "length"
                results.append(RequestOutput([CompletionOutput(i, list(new), lps, finish) for i in range(sp.n)]))
            return results

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_rollout_with_backend_vllm_writes_the_hf_schema(work, data_dir, untrained_policy, monkeypatch):
    """rollout.run with backend vllm, through a stand-in vllm module (this checks our backend code, not
    vLLM): same Parquet columns and value types as backend hf; the engine and sampling parameters come
    from the config; prompts go in as token ids with a single BOS."""
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    vcfg = {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.3, "dtype": "float32", "enforce_eager": True}
    out = {}
    for backend in ("hf", "vllm"):
        cfg = fast_config(rollout={"backend": backend, "temperature": 0.9, "top_p": 0.9, "vllm": vcfg})
        out[backend] = work / f"schema-{backend}.parquet"
        rollout.run(cfg, str(data_dir / "train.parquet"), str(untrained_policy), None, str(out[backend]), step=2)
    hf, vl = pd.read_parquet(out["hf"]), pd.read_parquet(out["vllm"])
    assert list(vl.columns) == list(hf.columns) and (vl.dtypes == hf.dtypes).all() and len(vl) == len(hf)
    for col in ("completion_ids", "sampler_logprobs"):
        assert type(vl[col].iloc[0]) is type(hf[col].iloc[0]) and vl[col].iloc[0].dtype == hf[col].iloc[0].dtype
    assert (vl.completion_ids.map(len) == vl.sampler_logprobs.map(len)).all()
    assert set(vl.finish_reason) <= {"stop", "length"} and (vl.temperature == 0.9).all()

    llm = calls["llm"]
    assert {k: llm[k] for k in vcfg} == vcfg and llm["logprobs_mode"] == "processed_logprobs"
    assert llm["model"] == llm["tokenizer"] == str(untrained_policy)
    sp = calls["sampling"]
    assert len(sp) == cfg.rollout.prompts_per_step  # one temperature: one request of n=G per prompt
    assert all(s["n"] == 4 and s["temperature"] == 0.9 and s["top_p"] == 0.9 and s["max_tokens"] == 12
               and s["logprobs"] == 0 for s in sp)
    assert len({s["seed"] for s in sp}) == len(sp)
    _, tok = load_policy(str(untrained_policy))
    assert all(ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id for ids in calls["prompt_ids"])


# =========================================================================== GPU (skipped here)
@pytest.mark.gpu
@gpu_vllm
def test_vllm_greedy_agrees_with_hf_on_gpu(trained_policy):
    """Real vLLM vs transformers, greedy, float32, on the SFT-trained tiny policy: same completions, and
    log-probs close. Not run yet: no GPU was lent to this task."""
    from components.vllm_backend import VLLMBackend

    model, tok = load_policy(str(trained_policy))
    model.to("cuda")
    prompts = [f"<|user|>{a}+{b}<|assistant|>" for a, b in [(1, 2), (13, 29), (40, 8), (25, 25)]]
    sampling = Sampling(n=2, temperatures=[1.0, 1.0], max_new_tokens=16, greedy=True)
    hf = sorted(HFBackend(model, tok).generate(prompts, sampling), key=lambda g: (g.prompt_index, g.sample_index))
    vb = VLLMBackend(str(trained_policy), VLLMConfig(dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True))
    vl = sorted(vb.generate(prompts, sampling), key=lambda g: (g.prompt_index, g.sample_index))
    assert [g.token_ids for g in vl] == [g.token_ids for g in hf]
    for a, b in zip(vl, hf):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3) and a.finish_reason == b.finish_reason


@pytest.mark.gpu
@gpu_vllm
def test_vllm_sampling_is_seeded_and_diverse_on_gpu(trained_policy):
    """Same seed → same samples; the G samples of a group differ. Not run yet: no GPU was lent to this task."""
    from components.vllm_backend import VLLMBackend

    vb = VLLMBackend(str(trained_policy), VLLMConfig(dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True))
    sampling = Sampling(n=8, temperatures=group_temperatures(8, 1.0, (0.8, 1.4)), max_new_tokens=16, seed=7)
    a, b = vb.generate(["<|user|>3+4<|assistant|>"], sampling), vb.generate(["<|user|>3+4<|assistant|>"], sampling)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert len({tuple(g.token_ids) for g in a}) > 1
    assert all(len(g.logprobs) == len(g.token_ids) and all(lp <= 0 for lp in g.logprobs) for g in a)


@pytest.mark.gpu
@gpu
@two_gpus
def test_torchrun_fsdp_bf16_on_two_gpus(work, rollouts, round1, untrained_policy):
    """NCCL + FSDP2 with bf16 compute against the float32 single-process update (loose: bf16).
    Not run yet: no GPU was lent to this task."""
    args = ([str(rollouts[1.0])], str(round1), str(untrained_policy))
    single = grpo_update.run(update_cfg(), *args, str(work / "gpu-single"))
    multi = grpo_update.run(update_cfg(nproc_per_node=2, gradient_checkpointing=True), *args, str(work / "gpu-fsdp"))
    assert multi["update/world_size"] == 2
    assert multi["update/kl"] == pytest.approx(single["update/kl"], rel=0.1, abs=1e-3)
    assert max_diff(state(work / "gpu-single"), state(work / "gpu-fsdp")) < 1e-2


# =========================================================================== Kubeflow Trainer job
def multinode_cfg(**trainer_job):
    return fast_config(
        grpo={**GRPO, "nodes": 2, "nproc_per_node": 1,
              "trainer_job": {"shared_pvc": "grpo-shared", "namespace": "team-a", **trainer_job}},
        cluster={"image_pull_secrets": ["regcred"], "stages": {"grpo_update": {
            "image": "gpu", "cpu_request": "8", "memory_request": "64Gi", "accelerator_type": "nvidia.com/gpu",
            "accelerator_limit": 1, "node_selector": {"nvidia.com/gpu.present": "true"}, "shm_size": "16Gi",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}})


def test_multinode_config_needs_a_shared_volume():
    with pytest.raises(ConfigError, match="trainer_job.shared_pvc"):
        parse_config({"grpo": {"nodes": 2}})


def test_trainjob_manifest_structure():
    cfg = multinode_cfg()
    cmd = distributed.torchrun_command(cfg, ["--rollouts", "/mnt/s/j/rollouts/0.parquet", "--policy", "/mnt/s/j/policy",
                                             "--new-policy", "/mnt/s/j/out", "--step", "5"], 1, 2, launcher=["torchrun"])
    m = trainer_job.build_trainjob(cfg, "kfp-grpo-update-s5-abc", "team-a", cmd,
                                   {"KFP_GRPO_METRICS_OUT": "/mnt/s/j/metrics.json", "MLFLOW_TRACKING_URI": "http://m"})
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and m["kind"] == "TrainJob"
    assert m["metadata"]["name"] == "kfp-grpo-update-s5-abc" and m["metadata"]["namespace"] == "team-a"
    spec = m["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}
    t = spec["trainer"]
    assert t["image"] == cfg.cluster.images.gpu and t["command"] == cmd and t["command"][0] == "torchrun"
    assert t["numNodes"] == 2 and t["numProcPerNode"] == 1
    assert t["resourcesPerNode"] == {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"nvidia.com/gpu": "1"}}
    env = {e["name"]: e for e in t["env"]}
    assert len(env) == len(t["env"])  # a list-map: unique names
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "kfp-grpo-mlflow-client", "key": "MLFLOW_TRACKING_PASSWORD", "optional": True}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["name"] == "kfp-grpo-config"
    assert env["MLFLOW_TRACKING_URI"] == {"name": "MLFLOW_TRACKING_URI", "value": "http://m"}  # overrides the ConfigMap
    (patch,) = spec["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    assert job["name"] == "node" and patch["manager"] == "kfp-grpo"
    assert {"name": "kfp-grpo-shared", "persistentVolumeClaim": {"claimName": "grpo-shared"}} in pod["volumes"]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [
        {"name": "kfp-grpo-shared", "mountPath": "/mnt/kfp-grpo-shared"}, {"name": "dshm", "mountPath": "/dev/shm"}]}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert len(trainer_job.job_name(123)) <= 63
    json.dumps(m)  # plain JSON, as the API takes it


class FakeKubernetes:
    """The few Kubernetes API endpoints `create_and_wait` uses, on 127.0.0.1; `controller(obj)` plays the
    Trainer controller and returns the status conditions GETs report from then on."""

    def __init__(self, controller=None):
        self.objects: dict[str, dict] = {}
        self.deleted: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.controller = controller or (lambda obj: [{"type": "Complete", "status": "True", "reason": "JobsCompleted",
                                                       "message": "done"}])
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, code, body):
                send_json(self, code, body)

            def do_POST(self):
                fake.requests.append(("POST", self.path))
                obj = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
                if self.path != f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs":
                    return self.reply(404, {"kind": "Status", "code": 404})
                fake.objects[name] = obj
                threading.Thread(target=lambda: obj.update(status={"conditions": fake.controller(obj)})).start()
                self.reply(201, obj)

            def do_GET(self):
                fake.requests.append(("GET", self.path))
                obj = fake.objects.get(self.path.rsplit("/", 1)[-1])
                self.reply(200, obj) if obj else self.reply(404, {"kind": "Status", "code": 404})

            def do_DELETE(self):
                fake.requests.append(("DELETE", self.path))
                name = self.path.split("?")[0].rsplit("/", 1)[-1]
                fake.deleted.append(name)
                self.reply(200, {"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def api(self):
        from kubernetes import client

        conf = client.Configuration()
        conf.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        return client.CustomObjectsApi(client.ApiClient(conf))

    def close(self):
        self.server.shutdown()


@pytest.fixture
def kube():
    servers = []
    yield lambda controller=None: servers.append(FakeKubernetes(controller)) or servers[-1]
    for s in servers:
        s.close()


def manifest(name="kfp-grpo-update-s0-test"):
    return trainer_job.build_trainjob(multinode_cfg(), name, "team-a", ["torchrun", "-m", "components.grpo_update"])


def test_create_and_wait_until_complete(kube):
    k = kube(lambda obj: [{"type": "Created", "status": "True"}, {"type": "Complete", "status": "True"}])
    obj = trainer_job.create_and_wait(manifest(), k.api(), timeout_s=10, poll_s=0.05, log=lambda s: None)
    assert obj["metadata"]["name"] == "kfp-grpo-update-s0-test"
    assert k.requests[0] == ("POST", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs")
    assert ("GET", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs/kfp-grpo-update-s0-test") \
        in k.requests and not k.deleted


def test_create_and_wait_raises_the_failed_condition(kube):
    k = kube(lambda obj: [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                           "message": "TrainJob exceeded its activeDeadlineSeconds"}])
    with pytest.raises(trainer_job.TrainJobFailed, match="DeadlineExceeded: TrainJob exceeded its activeDeadline"):
        trainer_job.create_and_wait(manifest(), k.api(), timeout_s=10, poll_s=0.05, log=lambda s: None)


def test_create_and_wait_deletes_the_job_on_timeout(kube):
    k = kube(lambda obj: [{"type": "Suspended", "status": "True", "reason": "Suspended"},
                          {"type": "Complete", "status": "False"}])
    with pytest.raises(TimeoutError, match="was deleted"):
        trainer_job.create_and_wait(manifest(), k.api(), timeout_s=0.3, poll_s=0.05, log=lambda s: None)
    assert k.deleted == ["kfp-grpo-update-s0-test"]
    assert any(m == "DELETE" and "propagationPolicy=Foreground" in p for m, p in k.requests)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_trainer(obj: dict) -> list[dict]:
    """Run the TrainJob's command the way the torch runtime would, with each node a local process group:
    PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT set, `torchrun` from this Python."""
    t = obj["spec"]["trainer"]
    cmd = [sys.executable, "-m", "torch.distributed.run"] + t["command"][1:]
    port = str(free_port())
    env = dict(os.environ, PET_NNODES=str(t["numNodes"]), PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=port,
               **{e["name"]: e["value"] for e in t["env"] if "value" in e})
    nodes = [subprocess.Popen(cmd, env=dict(env, PET_NODE_RANK=str(i)), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(t["numNodes"])]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    if any(p.returncode for p in nodes):
        return [{"type": "Failed", "status": "True", "reason": "JobFailed", "message": logs[0][-3000:]}]
    return [{"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": ""}]


def test_multinode_update_through_a_trainjob(kube, work, rollouts, round1, untrained_policy, tmp_path):
    """grpo.nodes=2: inputs staged on the shared volume, a TrainJob posted to the (fake) API, its torchrun
    command run on two local 'nodes' (node ranks 0 and 1), the new policy and metrics brought back —
    the same update as one process."""
    shared = tmp_path / "shared"
    shared.mkdir()
    cfg = multinode_cfg(shared_mount_path=str(shared), poll_seconds=0.2)
    k = kube(local_trainer)
    args = ([str(rollouts[1.0])], str(round1), str(untrained_policy))
    multi = trainer_job.run_multinode(cfg, *args, str(tmp_path / "out"), step=0, api=k.api())
    posted = next(iter(k.objects.values()))
    assert posted["spec"]["trainer"]["command"][:3] == ["torchrun", "--nnodes=2", "--nproc-per-node=1"]
    assert multi["update/world_size"] == 2
    single = grpo_update.run(update_cfg(), *args, str(work / "single-mn"))
    for key in ("update/loss", "update/kl", "update/grad_norm"):
        assert multi[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    assert max_diff(state(work / "single-mn"), state(tmp_path / "out")) < 1e-5
    assert (tmp_path / "out" / OPTIMIZER_FILE).exists()
    assert list(shared.iterdir()) == []  # the job's working directory is cleaned up


def test_grpo_update_component_single_node_runs_the_stage_in_process(work, rollouts, untrained_policy, monkeypatch):
    calls = []
    import pipelines.runtime as runtime
    from components import grpo_update as stage
    from pipelines import kfp_components

    monkeypatch.setattr(runtime, "run_task", lambda *a, **kw: calls.append((a, kw)) or {"update/loss": 0.0})
    artifact = lambda p: SimpleNamespace(path=str(p))  # noqa: E731 — what KFP hands the component body
    kfp_components.grpo_update(fast_config().to_json(), "", "", "grpo-update-i0-m0", 0, artifact(rollouts[1.0]),
                               artifact(untrained_policy), artifact(untrained_policy), artifact(work / "unused"), None)
    assert calls and calls[0][0][0] is stage.run and calls[0][1]["rollouts"] == str(rollouts[1.0])


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


def test_print_is_put_back_when_kfp_local_leaves_it_swapped():
    from pipelines.local import print_restored

    original = builtins.print
    with print_restored():
        builtins.print = lambda *a, **kw: original("    ", *a, **kw)  # what kfp.local's racing tasks leave
    assert builtins.print is original


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
