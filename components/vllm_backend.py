"""Rollout backend `vllm`: sample completions with vLLM (GPU, tensor parallel).

Same contract as `components.generation.HFBackend`: for every prompt and every one of
its `n` samples, one `Generation` with the completion token ids (EOS kept when the
sample stopped on it), the decoded text, the sampler's log-prob of each chosen token and
a finish reason ("stop" or "length").

How the `Sampling` maps onto vLLM:
- prompts go in as token ids (the chat template already holds the BOS, as in the HF
  backend: vLLM must not add a second one);
- the group's temperature schedule: sample indices with the same temperature share one
  request (`SamplingParams(n=<how many>, temperature=τ)`); a schedule with G distinct
  temperatures makes G requests of n=1 per prompt;
- seeds: the request for prompt p whose first sample index is k gets seed
  `sampling.seed + p·n + k`; vLLM gives its i-th child `seed + i`, so every (prompt,
  sample) pair has its own seed and the round is reproducible;
- greedy: temperature 0, one sample per prompt, repeated n times (as HF returns n
  identical rows);
- log-probs: `logprobs=0` returns the chosen token's log-prob only, and the engine is
  built with `logprobs_mode="processed_logprobs"`, so they are the log-probs of the
  distribution actually sampled from (after temperature and top-p), like the HF
  backend's. The GRPO update's optional truncated importance-sampling correction
  (`grpo.importance_sampling_cap`) uses them as π_behavior.

vLLM is the optional `gpu` extra and is imported only when this backend is built.
Status: checked against vLLM 0.32.0 on CPU (`tests/install_vllm_api.sh`, `pytest -m vllm_api`):
vLLM's own validation accepts `engine_kwargs` and `sampling_kwargs`, its output classes
convert, its child-seed rule is the one above. The engine itself (generation on a GPU) has
not been run by this project yet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from components.errors import KfpGrpoError
from components.seeds import TORCH_BITS, derived_seed
from components.sampling import Generation, GenerationStats, Sampling

INSTALL_HINT = "backend vllm needs the gpu extra: pip install 'kfp-grpo[gpu]' on a CUDA machine"


class VLLMUnavailableError(KfpGrpoError, ImportError):
    """vLLM (the `gpu` extra) is not installed in this environment."""


def import_vllm():
    """The `vllm` module, or a clear error naming the extra to install."""
    try:
        import vllm
    except ImportError as err:  # also covers a vLLM build that cannot load its CUDA libs
        raise VLLMUnavailableError(f"rollout.backend: {INSTALL_HINT} ({err})") from None
    return vllm


@dataclass(frozen=True)
class Request:
    """One vLLM request: prompt `prompt_index`, samples `sample_indices` at one temperature."""

    prompt_index: int
    sample_indices: tuple[int, ...]
    temperature: float  # 0.0 = greedy
    seed: int


def plan_requests(num_prompts: int, sampling: Sampling) -> list[Request]:
    """Group each prompt's sample indices by temperature: one request per (prompt, temperature)."""
    n = sampling.n
    if len(sampling.temperatures) != n:
        raise ValueError(f"Sampling has n={n} but {len(sampling.temperatures)} temperatures")
    if sampling.greedy:
        return [Request(p, tuple(range(n)), 0.0, derived_seed(sampling.seed + p * n, TORCH_BITS))
                for p in range(num_prompts)]
    groups: dict[float, list[int]] = {}
    for k, t in enumerate(sampling.temperatures):
        groups.setdefault(float(t), []).append(k)
    return [Request(p, tuple(ks), t, derived_seed(sampling.seed + p * n + ks[0], TORCH_BITS))
            for p in range(num_prompts) for t, ks in groups.items()]


def _chosen_logprob(entry: Any, token_id: int, position: int) -> float:
    """The log-prob of `token_id` from one position of `CompletionOutput.logprobs`.

    vLLM gives a mapping token id → `Logprob` (with `.logprob`) per position; plain
    floats are accepted too.
    """
    try:
        value = entry[token_id]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"vLLM returned no log-prob for the chosen token {token_id} at position {position}; "
                         "was SamplingParams(logprobs=0) set?") from None
    return float(getattr(value, "logprob", value))


def to_generations(outputs: Sequence[Any], requests: Sequence[Request], eos_token_id: int | None,
                   decode) -> list[Generation]:
    """Convert vLLM `RequestOutput`s (in request order) into `Generation`s.

    Mirrors the HF backend: the completion is cut after the first EOS (kept, with its
    log-prob) and then finishes with "stop"; otherwise vLLM's reason "stop" (another
    stop token) stays "stop" and "length" stays "length". `decode(ids)` gives the text.
    """
    if len(outputs) != len(requests):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
    gens: list[Generation] = []
    for req, out in zip(requests, outputs):
        completions = sorted(out.outputs, key=lambda c: getattr(c, "index", 0))
        want = 1 if req.temperature == 0.0 else len(req.sample_indices)
        if len(completions) != want:
            raise ValueError(f"vLLM returned {len(completions)} completions for prompt {req.prompt_index}, "
                             f"expected {want}")
        if req.temperature == 0.0:  # greedy: one completion stands for every sample index
            completions = completions * len(req.sample_indices)
        for k, c in zip(req.sample_indices, completions):
            ids = [int(t) for t in c.token_ids]
            if c.logprobs is None or len(c.logprobs) < len(ids):
                raise ValueError(f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} log-probs for "
                                 f"{len(ids)} tokens (prompt {req.prompt_index}); was logprobs=0 set?")
            finish = c.finish_reason
            if eos_token_id is not None and eos_token_id in ids:
                ids = ids[: ids.index(eos_token_id) + 1]
                finish = "stop"
            elif finish not in ("stop", "length"):
                raise ValueError(f"vLLM finished prompt {req.prompt_index} sample {k} with reason {finish!r} "
                                 "(aborted?); expected 'stop' or 'length'")
            gens.append(Generation(
                prompt_index=req.prompt_index, sample_index=k, token_ids=ids, text=decode(ids),
                logprobs=[_chosen_logprob(c.logprobs[i], t, i) for i, t in enumerate(ids)],
                finish_reason=finish, temperature=float(req.temperature),
            ))
    return gens


def engine_kwargs(policy_dir: str, cfg, seed: int = 0, trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` (vLLM's `EngineArgs`) for a policy directory and `rollout.vllm`."""
    return dict(
        model=policy_dir, tokenizer=policy_dir, tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization, dtype=cfg.dtype, seed=seed,
        enforce_eager=cfg.enforce_eager, trust_remote_code=trust_remote_code,
        # log-probs of the distribution sampled from (after temperature / top-p), like HFBackend
        logprobs_mode="processed_logprobs",
    )


def sampling_kwargs(req: Request, sampling: Sampling) -> dict[str, Any]:
    """Keyword arguments of the `vllm.SamplingParams` of one request."""
    greedy = req.temperature == 0.0
    return dict(n=1 if greedy else len(req.sample_indices), temperature=req.temperature,
                top_p=1.0 if greedy else sampling.top_p, max_tokens=sampling.max_new_tokens, seed=req.seed,
                logprobs=0, skip_special_tokens=True)


class VLLMBackend:
    """vLLM engine over a policy directory (a standard HF directory)."""

    def __init__(self, policy_dir: str, cfg, seed: int = 0, model_cfg=None):
        from components.modeling import load_tokenizer

        vllm = import_vllm()
        self.SamplingParams = vllm.SamplingParams
        trust = bool(getattr(model_cfg, "trust_remote_code", False))
        self.tok = load_tokenizer(policy_dir, None, trust)  # rollout.py templates prompts with it
        self.stats = GenerationStats()
        self.llm = vllm.LLM(**engine_kwargs(policy_dir, cfg, seed, trust))

    def load_weights(self, model: Any) -> None:
        """Push `model`'s current weights into the running engine (no restart, no CUDA-graph capture) and
        drop its prefix cache, which holds keys/values of the old weights.

        Uses `LLM.apply_model` (vLLM ≥ 0.9). `pipelines.rounds` runs the engine core in the calling process
        (VLLM_ENABLE_V1_MULTIPROCESSING=0), where the function and the weights are passed by reference;
        with the engine in other processes (tensor parallel) vLLM pickles them and needs
        VLLM_ALLOW_INSECURE_SERIALIZATION=1. Not yet run on a GPU by this project.
        """
        if not hasattr(self.llm, "apply_model"):
            raise VLLMUnavailableError("loop.warm_engine with rollout.backend vllm needs vLLM >= 0.9 "
                                       "(LLM.apply_model); set loop.warm_engine: false")
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        self.llm.apply_model(lambda engine_model: engine_model.load_weights(weights))
        self.llm.reset_prefix_cache()

    def prompt_ids(self, prompts: Iterable[str]) -> list[list[int]]:
        """Token ids of the templated prompts, without adding special tokens (the template has the BOS)."""
        return [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]

    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        requests = plan_requests(len(prompts), sampling)
        ids = self.prompt_ids(prompts)
        start = time.perf_counter()
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids[r.prompt_index]} for r in requests],
            sampling_params=[self.SamplingParams(**sampling_kwargs(r, sampling)) for r in requests], use_tqdm=False,
        )
        gens = to_generations(outputs, requests, self.tok.eos_token_id,
                              lambda t: self.tok.decode(t, skip_special_tokens=True))
        self.stats.seconds += time.perf_counter() - start
        self.stats.tokens += sum(len(g.token_ids) for g in gens)
        return gens
