"""Rollout backends: sample completions for templated prompts.

A backend returns, for every prompt and every one of its `n` samples, the completion
token ids, text, the sampler's per-token log-probs and a finish reason. `hf` uses
`transformers.generate` (batched, KV cache); `vllm` lives in `components.vllm_backend`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from components.modeling import batched, encode_prompts


@dataclass
class Sampling:
    """How to sample: n per prompt, one temperature per sample index (len n)."""

    n: int
    temperatures: list[float]
    max_new_tokens: int
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0


@dataclass
class Generation:
    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS) or "length"
    temperature: float


@dataclass
class GenerationStats:
    seconds: float = 0.0
    tokens: int = 0
    extra: dict = field(default_factory=dict)


class Backend(Protocol):
    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]: ...


def group_temperatures(n: int, temperature: float, temperature_range: tuple[float, float] | None) -> list[float]:
    """τ_k = τ_lo + (τ_hi − τ_lo)·k/G for k = 0..G−1, or one temperature for all."""
    if temperature_range is None:
        return [temperature] * n
    lo, hi = temperature_range
    return [lo + (hi - lo) * k / n for k in range(n)]


class _RowTemperature(LogitsProcessor):
    """Divide each row's logits by its own temperature (a group may use a schedule)."""

    def __init__(self, temps: torch.Tensor):
        self.temps = temps

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores / self.temps.to(scores.dtype).unsqueeze(1)


class HFBackend:
    """`transformers.generate` over batches of whole groups (a prompt × its n samples), prompt prefilled once."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 256):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.stats = GenerationStats()

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        rows = [(p, k) for p in range(len(prompts)) for k in range(sampling.n)]
        torch.manual_seed(sampling.seed)
        self.model.eval()
        out: list[Generation] = []
        start = time.perf_counter()
        n = sampling.n
        for psl in batched(len(prompts), max(1, self.batch_size // n)):  # whole groups per generate() call
            chunk = rows[psl.start * n: psl.stop * n]
            enc = encode_prompts(self.tok, prompts[psl])
            enc = {k: v.to(self.model.device) for k, v in enc.items()}
            cache = self._shared_prefix(enc, n)
            enc = {k: v.repeat_interleave(n, 0) for k, v in enc.items()}
            temps = torch.tensor([sampling.temperatures[k] for _, k in chunk], device=self.model.device)
            kw = dict(do_sample=False) if sampling.greedy else dict(
                do_sample=True, temperature=1.0, top_p=sampling.top_p, top_k=0,
                logits_processor=LogitsProcessorList([_RowTemperature(temps)]),
            )
            if cache is not None:
                kw["cache"] = cache
            res = self.model.generate(
                **enc, max_new_tokens=sampling.max_new_tokens, return_dict_in_generate=True,
                output_scores=True, pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id, **kw,
            )
            new = res.sequences[:, enc["input_ids"].shape[1]:]
            # scores are the processed logits the sampler drew from: its log-probs.
            logps = torch.stack([F.log_softmax(s.float(), -1) for s in res.scores], 1)
            logps = logps.gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for row, (p, k) in enumerate(chunk):
                ids = new[row].tolist()
                finish = "length"
                if self.tok.eos_token_id in ids:
                    ids = ids[: ids.index(self.tok.eos_token_id) + 1]
                    finish = "stop"
                out.append(Generation(
                    prompt_index=p, sample_index=k, token_ids=ids,
                    text=self.tok.decode(ids, skip_special_tokens=True),
                    logprobs=logps[row, : len(ids)].tolist(), finish_reason=finish,
                    temperature=float(sampling.temperatures[k]) if not sampling.greedy else 0.0,
                ))
        self.stats.seconds += time.perf_counter() - start
        self.stats.tokens += sum(len(g.token_ids) for g in out)
        return out

    def _shared_prefix(self, enc: dict[str, torch.Tensor], n: int):
        """The KV cache of each prompt but its last token, computed once and repeated for its n samples.

        The n samples of a prompt share it: prefilling it once instead of n times removes
        (n−1)/n of the prefill, most of a rollout's compute when prompts are longer than
        completions. generate() then runs the last prompt token and samples as before.
        """
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if n == 1 or ids.shape[1] < 2:
            return None
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding, as generate() does
        cache = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
                           use_cache=True).cache
        cache.batch_repeat_interleave(n)
        return cache


def make_backend(name: str, policy_dir: str, model_cfg, rollout_cfg) -> Backend:
    """The rollout backend named in the config, loaded from a policy directory."""
    if name == "vllm":
        from components.vllm_backend import VLLMBackend  # GPU-only extra

        return VLLMBackend(policy_dir, rollout_cfg.vllm, seed=0, model_cfg=model_cfg)
    from components.modeling import load_policy

    model, tok = load_policy(policy_dir, model_cfg)
    return HFBackend(model, tok, rollout_cfg.generation_batch_size)
