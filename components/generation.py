"""Rollout backends: sample completions for templated prompts.

A backend returns, for every prompt and every one of its `n` samples, the completion
token ids, text, the sampler's per-token log-probs and a finish reason. `hf` samples with
the transformers model's forward pass (batched, KV cache); `vllm` lives in
`components.vllm_backend`; what both take and return is in `components.sampling`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from components.modeling import batched, cache_kwargs, encode_prompts, last_logits_only
from components.sampling import Backend, Generation, GenerationStats, Sampling


class HFBackend:
    """Batched sampling with the model's own forward pass and a KV cache (transformers models).

    A batch holds whole groups (a prompt × its n samples). Each distinct prompt is prefilled
    once and its KV cache repeated for its n samples; the cache has room reserved for the
    completion, so a decode step writes one position instead of copying the whole cache.
    Rows that finished (EOS) leave the batch once they are at least a quarter of it.

    The sampler is exactly `Sampling`: logits / τ_row → top-p (as transformers' and vLLM's
    top-p) → one draw; the recorded log-prob of each token is that processed distribution's
    (greedy: the raw distribution's). Nothing from the model's `generation_config`
    (repetition penalty, default temperature/top-k/top-p) applies.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 256):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.stats = GenerationStats()

    def load_weights(self, model: torch.nn.Module) -> None:
        """Sample from `model`'s current weights from now on: nothing to do when this backend samples with
        `model` itself (an iteration's rounds in memory), else a copy (cast to this backend's dtype)."""
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        """Sample `sampling.n` completions per prompt (seeded by `sampling.seed`)."""
        rows = [(p, k) for p in range(len(prompts)) for k in range(sampling.n)]
        device = self.model.device
        rng = torch.Generator(device=device).manual_seed(sampling.seed)
        self.model.eval()
        out: list[Generation] = []
        start = time.perf_counter()
        n = sampling.n
        for psl in batched(len(prompts), max(1, self.batch_size // n)):  # whole groups per batch
            chunk = rows[psl.start * n: psl.stop * n]
            enc = {k: v.to(device) for k, v in encode_prompts(self.tok, prompts[psl]).items()}
            temps = torch.tensor([sampling.temperatures[k] for _, k in chunk], device=device)
            new, logps = self._sample(enc["input_ids"], enc["attention_mask"], n, temps, sampling, rng)
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

    def _sample(self, ids: torch.Tensor, mask: torch.Tensor, n: int, temps: torch.Tensor, sampling: Sampling,
                rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Completions of U left-padded prompts, n each: token ids [U·n, T] and their log-probs [U·n, T].

        A row's tokens after its EOS are EOS (its log-probs 0); T ≤ max_new_tokens (the loop
        stops when every row has finished).
        """
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else -1
        steps = sampling.max_new_tokens
        rows, p_len = ids.shape[0] * n, ids.shape[1]
        position = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding does not shift positions
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, position, cache)
        logits, live = logits.repeat_interleave(n, 0), torch.arange(rows, device=ids.device)
        reserve_room(cache, repeats=n, extra=steps)  # the prompt's cache, repeated for its n samples
        mask = torch.cat([mask.repeat_interleave(n, 0), mask.new_ones(rows, steps)], dim=1)
        position = position[:, -1:].repeat_interleave(n, 0)
        tokens = torch.full((rows, steps), max(eos, 0), dtype=torch.long, device=ids.device)
        logps = torch.zeros(rows, steps, device=ids.device)
        done = torch.zeros(rows, dtype=torch.bool, device=ids.device)  # of the rows still in the batch (`live`)
        for t in range(steps):
            token, logp = pick(logits, temps[live], sampling, rng)
            token, logp = token.masked_fill(done, max(eos, 0)), logp.masked_fill(done, 0.0)
            tokens[live, t], logps[live, t] = token, logp
            done = done | (token == eos)
            if t == steps - 1 or bool(done.all()):
                return tokens[:, : t + 1], logps[:, : t + 1]
            if 4 * int(done.sum()) >= len(live):  # a quarter of the batch has finished: drop those rows
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                live, token, mask, position, done = live[keep], token[keep], mask[keep], position[keep], done[keep]
            position = position + 1
            logits = self._forward(token.unsqueeze(1), mask[:, : p_len + t + 1], position, cache)
        return tokens, logps

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        """The next-token logits [B, V] (float32) after `ids`, appending their keys/values to `cache`."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
                         **cache_kwargs(self.model, cache), **last_logits_only(self.model))
        return out.logits[:, -1].float()


def pick(logits: torch.Tensor, temps: torch.Tensor, sampling: Sampling,
         rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob under the distribution it was drawn from.

    Greedy: the argmax, scored by the raw distribution. Sampling: logits / τ_row, then top-p
    (transformers' `TopPLogitsWarper` rule, which vLLM shares), then one draw by inverting the
    row's cumulative distribution (one uniform per row; `torch.multinomial` draws one
    exponential per vocabulary entry, ~10× slower for a 50k vocabulary).
    """
    if sampling.greedy:
        token = logits.argmax(-1)
        return token, F.log_softmax(logits, -1).gather(-1, token.unsqueeze(1)).squeeze(1)
    logits = logits / temps.to(logits.dtype).unsqueeze(1)
    if sampling.top_p < 1.0:
        logits = top_p_filter(logits, sampling.top_p)
    logp = F.log_softmax(logits, -1)
    cdf = logp.exp().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=rng, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)  # p = 0: never drawn
    return token, logp.gather(-1, token.unsqueeze(1)).squeeze(1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (−inf) the tokens outside the nucleus: those whose ascending cumulative probability
    is ≤ 1 − top_p, always keeping the most likely one (transformers' `TopPLogitsWarper`)."""
    sorted_logits, order = torch.sort(logits, descending=False)
    remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    remove[:, -1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


class _ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are views into buffers with room for the coming tokens.

    `DynamicLayer.update` concatenates the whole cache with each new token (a copy of the
    cache per layer per step); this writes the new positions in place. Out of room, it falls
    back to concatenation.
    """

    _keys_buf: torch.Tensor
    _values_buf: torch.Tensor

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self._keys_buf.shape[-2]:
            return super().update(key_states, value_states, *args, **kwargs)
        self._keys_buf[:, :, start:end] = key_states
        self._values_buf[:, :, start:end] = value_states
        self.keys, self.values = self._keys_buf[:, :, :end], self._values_buf[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        length = self.keys.shape[-2]
        if length > self._keys_buf.shape[-2]:  # it ran out of room: no longer a view of the buffers
            return super().batch_select_indices(indices)
        self._keys_buf, self._values_buf = self._keys_buf[indices], self._values_buf[indices]
        self.keys, self.values = self._keys_buf[:, :, :length], self._values_buf[:, :, :length]


def reserve_room(cache: DynamicCache, repeats: int, extra: int) -> None:
    """Repeat each row of `cache` `repeats` times (batch dim) and reserve `extra` positions.

    Plain `DynamicLayer`s become `_ReservedLayer`s (the repeated prompt written once into a
    buffer of length + extra); other layer kinds (sliding window, …) are only repeated.
    """
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.numel() == 0:
            layer.batch_repeat_interleave(repeats)
            continue
        reserved = _ReservedLayer.__new__(_ReservedLayer)
        reserved.__dict__.update(layer.__dict__)
        for name in ("keys", "values"):
            t = getattr(layer, name)
            b, h, length, d = t.shape
            buf = t.new_empty(b * repeats, h, length + extra, d)
            buf.view(b, repeats, h, length + extra, d)[:, :, :, :length] = t.unsqueeze(1)
            setattr(reserved, f"_{name}_buf", buf)
            setattr(reserved, name, buf[:, :, :length])
        cache.layers[i] = reserved


def make_backend(name: str, policy_dir: str, model_cfg, rollout_cfg) -> Backend:
    """The rollout backend named in the config, loaded from a policy directory."""
    if name == "vllm":
        from components.vllm_backend import VLLMBackend  # GPU-only extra

        return VLLMBackend(policy_dir, rollout_cfg.vllm, seed=0, model_cfg=model_cfg)
    from components.modeling import check_finite_weights, load_policy

    dtype = rollout_cfg.hf.dtype or model_cfg.dtype
    model, tok = load_policy(policy_dir, model_cfg.model_copy(update={"dtype": dtype}))
    check_finite_weights(model, policy_dir)  # NaN weights: torch.multinomial would fail mid-generation
    return HFBackend(model, tok, rollout_cfg.generation_batch_size)
