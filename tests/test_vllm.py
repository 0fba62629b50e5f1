"""The vLLM rollout backend: conversion of vLLM-shaped outputs with stand-in objects; where vLLM
is installed (`tests/install_vllm_api.sh`: imports only, no GPU) its own output classes and
its validation of our engine and sampling arguments; on a GPU (skipped without one) real vLLM
against transformers."""

from __future__ import annotations

import re
import sys
import types
from dataclasses import fields

import pandas as pd
import pytest
import torch

from components import rollout
from components.config import VLLMConfig
from components.generation import HFBackend
from components.sampling import Generation, Sampling, group_temperatures
from components.modeling import load_policy
from components.vllm_backend import (INSTALL_HINT, Request, VLLMUnavailableError, engine_kwargs, plan_requests,
                                     sampling_kwargs, to_generations)
from tests.scale import NO_VLLM, ROOT, gpu_vllm, has_vllm
from tests.conftest import fast_config


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


def test_rollout_with_backend_vllm_writes_the_hf_schema(scale_work, data_dir, untrained_policy, monkeypatch):
    """rollout.run with backend vllm, through a stand-in vllm module (this checks our backend code, not
    vLLM): same Parquet columns and value types as backend hf; the engine and sampling parameters come
    from the config; prompts go in as token ids with a single BOS."""
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    vcfg = {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.3, "dtype": "float32", "enforce_eager": True}
    out = {}
    for backend in ("hf", "vllm"):
        cfg = fast_config(rollout={"backend": backend, "temperature": 0.9, "top_p": 0.9, "vllm": vcfg})
        out[backend] = scale_work / f"schema-{backend}.parquet"
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
@gpu_vllm
def test_vllm_takes_new_weights_without_a_restart_on_gpu(trained_policy, untrained_policy, monkeypatch):
    """`loop.warm_engine`'s weight push: an engine started on the trained policy, given the untrained
    policy's weights with `load_weights`, answers greedily as transformers does with the untrained one.
    Not run yet: no GPU was lent to this task."""
    from components.vllm_backend import VLLMBackend

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as pipelines.rounds runs it
    prompts = [f"<|user|>{a}+{b}<|assistant|>" for a, b in [(1, 2), (13, 29), (40, 8), (25, 25)]]
    sampling = Sampling(n=1, temperatures=[1.0], max_new_tokens=16, greedy=True)
    new, tok = load_policy(str(untrained_policy))
    new.to("cuda")
    want = [g.token_ids for g in HFBackend(new, tok).generate(prompts, sampling)]
    vb = VLLMBackend(str(trained_policy), VLLMConfig(dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True))
    before = [g.token_ids for g in vb.generate(prompts, sampling)]
    vb.load_weights(new)
    after = [g.token_ids for g in sorted(vb.generate(prompts, sampling), key=lambda g: g.prompt_index)]
    assert after == want and before != want
