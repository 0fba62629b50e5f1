"""Stage: sample G completions per prompt from π_old, score them, compute advantages.

Output: one Parquet row per completion — prompt, completion, token ids, the sampler's
log-probs, rewards (total and parts), verifier verdict, advantage, group, policy
version, finish reason.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pandas as pd
import torch

from components import tracking
from components.artifacts import write_rollouts
from components.config import Config
from components.generation import make_backend
from components.sampling import Backend, Sampling, group_temperatures
from components.grpo import group_advantages, process_advantages, zero_variance_fraction
from components.io import distinct_outputs, read_parquet
from components.modeling import chat_prompt, load_reward_model
from components.reward_model import check_process, ranking_agreement, score
from components.stage_cli import stage_main
from components.rewards import rewards_for, rm_term, step_labels
from components.seeds import TORCH_BITS, derived_seed
from components.timing import PhaseClock


def select_prompts(prompts: pd.DataFrame, n: int, seed: int, step: int, shard: int = 0,
                   shards: int = 1) -> pd.DataFrame:
    """The round's batch of prompts (seeded by step), optionally one shard of it."""
    batch = prompts.sample(n=min(n, len(prompts)), random_state=derived_seed(seed * 100_003 + step))
    return batch.iloc[shard::shards]


def step_spans(tok, completion: str, ids: list[int], answer: str) -> list[tuple[int, int, float]]:
    """The steps of one completion as (index of the token that ends it, end in characters, the verifier's verdict
    `rewards.step_labels`); steps ending in the same token are one step, with the worse verdict."""
    reached = [len(tok.decode(ids[:k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    spans: list[tuple[int, int, float]] = []
    for (_, end), label in step_labels(completion, answer):
        k = next((k for k, n in enumerate(reached) if n >= end), len(ids) - 1)
        if spans and k <= spans[-1][0]:
            spans[-1] = (spans[-1][0], end, min(spans[-1][2], label))
            continue
        spans.append((k, end, label))
    return spans


StepScorer = Callable[[list[str], list[str]], np.ndarray]  # (prompts, completion prefixes) → r_φ per prefix


def process_token_advantages(tok, out: pd.DataFrame, group_size: int, eps: float, prm: StepScorer | None = None,
                             weights: tuple[float, float] = (0.0, 1.0),
                             squash: bool = True) -> tuple[list[list[float]], dict[str, float]]:
    """Per-token advantages of every completion (`grpo.process_advantages`, group by group) and the round's step
    metrics. Step j's reward is `weights[0]·s(prm(prefix to the end of step j)) + weights[1]·label_j` (the process
    reward model's score of the step, s = σ or the identity (`squash`); the verifier's verdict on it);
    `rollout/step_accuracy` is the fraction of steps the verifier judged right, and with a `prm`,
    `rollout/prm_step_accuracy` how often the PRM agrees (r_φ > 0 on the steps judged right, ≤ 0 on the others)."""
    spans = [step_spans(tok, c, list(ids), a) for c, ids, a in zip(out.completion, out.completion_ids, out.answer)]
    labels = [torch.tensor([s[2] for s in sp], dtype=torch.float64) for sp in spans]
    rewards = [weights[1] * lab for lab in labels]
    flat = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.float64)
    metrics = {"rollout/step_accuracy": float(flat.mean()) if flat.numel() else float("nan")}
    if prm is not None and flat.numel():
        prompts = [p for p, sp in zip(out.prompt, spans) for _ in sp]
        prefixes = [c[:end] for c, sp in zip(out.completion, spans) for _, end, _ in sp]
        raw = np.asarray(prm(prompts, prefixes), dtype=np.float64)
        scores = torch.tensor(rm_term(raw, squash))
        rewards = [r + weights[0] * s for r, s in zip(rewards, scores.split([len(sp) for sp in spans]))]
        metrics["rollout/prm_step_accuracy"] = float(((torch.tensor(raw) > 0) == (flat > 0.5)).double().mean())
    ends = [torch.tensor([s[0] for s in sp], dtype=torch.long) for sp in spans]
    token_adv: list[list[float]] = []
    for g in range(0, len(spans), group_size):
        lengths = [len(ids) for ids in out.completion_ids[g:g + group_size]]
        token_adv += [a.tolist() for a in process_advantages(rewards[g:g + group_size], ends[g:g + group_size],
                                                             lengths, eps)]
    return token_adv, metrics


def step_scorer(cfg: Config, rm, rm_tok) -> StepScorer:
    """The process reward model as a step scorer: r_φ(prompt, prefix) of each prefix (raw scores)."""
    def scores(prompts: list[str], prefixes: list[str]) -> np.ndarray:
        return score(rm, rm_tok, prompts, prefixes, cfg.reward_model.max_length, cfg.data.system_prompt).cpu().numpy()
    return scores


def run(cfg: Config, prompts: str, policy: str, reward_model: str | None, rollouts: str,
        step: int = 0, policy_version: str = "0", shard: int = 0) -> dict:
    """Sample G completions per prompt from the model directory `policy`, score them (with the
    reward model directory `reward_model`, if any) and write the round (or one shard of it) to `rollouts`."""
    return sample(cfg, lambda: make_backend(cfg.rollout.backend, policy, cfg.model, cfg.rollout), prompts,
                  reward_model, rollouts, step, policy_version, shard)


def sample(cfg: Config, backend: Callable[[], Backend], prompts: str, reward_model: str | None, rollouts: str,
           step: int = 0, policy_version: str = "0", shard: int = 0) -> dict:
    """`run` with the sampler that `backend()` returns (called once the prompts are read): a policy
    loaded from its directory, or the one an iteration's rounds keep in memory (`pipelines.rounds`)."""
    distinct_outputs(rollouts=rollouts)
    rc = cfg.rollout
    clock = PhaseClock("rollout")  # phases: io (prompts, model load, Parquet), generate, score
    batch = select_prompts(read_parquet(prompts, "prompts", ["id", "prompt", "answer"]), rc.prompts_per_step,
                           cfg.seed, step, shard, rc.shards)
    if batch.empty:
        raise ValueError(f"no prompts for rollout shard {shard} of {rc.shards} ({prompts})")
    backend = backend()
    clock.lap("io")
    tok = backend.tok
    texts = [chat_prompt(tok, p, cfg.data.system_prompt) for p in batch.prompt]
    sampling = Sampling(n=rc.group_size, temperatures=group_temperatures(rc.group_size, rc.temperature,
                        rc.temperature_range), max_new_tokens=rc.max_new_tokens, top_p=rc.top_p,
                        seed=derived_seed(cfg.seed * 100_003 + step * 101 + shard, TORCH_BITS))
    start = time.perf_counter()
    gens = backend.generate(texts, sampling)
    gen_seconds = time.perf_counter() - start
    clock.lap("generate")
    gens.sort(key=lambda g: (g.prompt_index, g.sample_index))  # consecutive groups of G
    rows = batch.iloc[[g.prompt_index for g in gens]].reset_index(drop=True)
    completions = [g.text for g in gens]
    empty = sum(1 for g in gens if not g.token_ids)
    if empty:
        raise ValueError(f"{empty} of {len(gens)} completions are empty (no token generated); "
                         "check rollout.max_new_tokens and the tokenizer's EOS")
    rm_scores = None
    # the RM scores the round whenever it counts in the reward, and beside the verifier (the monitor)
    if reward_model and (cfg.reward.weights()[0] or cfg.reward.kind == "verifier"):
        clock.lap("score")
        rm, rm_tok = load_reward_model(reward_model, cfg.model)
        clock.lap("io")
        rm_scores = score(rm, rm_tok, rows.prompt.tolist(), completions, cfg.reward_model.max_length,
                          cfg.data.system_prompt).cpu().numpy()
    parts = rewards_for(cfg, completions, rows.answer.tolist(), rm_scores)
    a = cfg.grpo.advantage
    rewards = torch.tensor(parts.reward.to_numpy(), dtype=torch.float64)
    advantages = group_advantages(rewards, rc.group_size, a.scale, a.std, a.eps)
    clock.lap("score")
    out = pd.DataFrame({
        "id": rows.id, "prompt": rows.prompt, "answer": rows.answer, "prompt_text": [texts[g.prompt_index] for g in gens],
        "completion": completions, "completion_ids": [g.token_ids for g in gens],
        "sampler_logprobs": [g.logprobs for g in gens], "temperature": [g.temperature for g in gens],
        "finish_reason": [g.finish_reason for g in gens],
        "group": [shard * 1_000_000 + g.prompt_index for g in gens],
        **{c: parts[c] for c in ["reward", "reward_rm", "reward_correct", "reward_format"]},
        "correct": parts.reward_correct > 0.5, "advantage": advantages.numpy(),
        "token_advantages": [[] for _ in gens], "policy_version": policy_version, "step": step,
    })
    step_metrics: dict[str, float] = {}
    if cfg.grpo.supervision == "process":
        rm_w, correct_w, _ = cfg.reward.weights()
        prm = step_scorer(cfg, rm, rm_tok) if rm_scores is not None and rm_w else None
        if prm is not None:
            check_process(rm, reward_model)
        out["token_advantages"], step_metrics = process_token_advantages(tok, out, rc.group_size, a.eps, prm,
                                                                         (rm_w, correct_w), cfg.reward.rm_squash)
        out["advantage"] = [sum(t) / len(t) for t in out.token_advantages]
    write_rollouts(out, rollouts)
    clock.lap("io")
    n_tokens = int(sum(len(g.token_ids) for g in gens))
    metrics = {
        "rollout/reward_mean": float(parts.reward.mean()), "rollout/reward_std": float(parts.reward.std(ddof=0)),
        "rollout/accuracy": float(out.correct.mean()), "rollout/format": float(parts.reward_format.mean()),
        "rollout/zero_variance_groups": zero_variance_fraction(rewards, rc.group_size),
        "rollout/completion_tokens_mean": n_tokens / len(gens),
        "rollout/tokens_per_s": n_tokens / max(gen_seconds, 1e-9),
        "rollout/truncated_fraction": float((out.finish_reason == "length").mean()),
        **clock.metrics(),
    }
    metrics.update(step_metrics)
    if rm_scores is not None:  # does the reward model still rank the way the verifier does on this round?
        metrics["rollout/rm_agreement"], metrics["rollout/rm_agreement_pairs"] = ranking_agreement(
            rm_scores, out.correct, out.group)
    tracking.log_metrics(metrics, step=step)
    tracking.log_samples(out[SAMPLE_COLUMNS].head(SAMPLE_GROUPS * rc.group_size), f"samples/round_{step:03d}.json")
    print(f"[rollout] step {step}: {len(batch)} prompts × {rc.group_size} → accuracy "
          f"{metrics['rollout/accuracy']:.3f}, reward {metrics['rollout/reward_mean']:.3f}, "
          f"{metrics['rollout/tokens_per_s']:.0f} tok/s", flush=True)
    return metrics


SAMPLE_GROUPS = 2  # groups of each round logged as a table of sample completions
SAMPLE_COLUMNS = ["prompt", "completion", "answer", "reward", "correct", "advantage", "finish_reason"]


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "Sample G completions per prompt, score them, compute group advantages.", {
        "prompts": "Parquet of prompts", "policy": "policy directory (π_old)",
        "reward_model": "reward model directory (omit: rule-based rewards only)",
        "rollouts": "output: the round's rollout table (Parquet)", "step": "round index (seeds the prompt batch)",
        "policy_version": "the policy version recorded on every row, e.g. 1.2",
        "shard": "this shard of the round's prompts (of rollout.shards)"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
