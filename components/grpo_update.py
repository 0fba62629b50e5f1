"""Stage: the GRPO policy update on one round of rollouts.

π_old log-probs are the sampler's own when the rollouts were drawn from these weights
at τ = 1 (checked on one minibatch), else recomputed once at the start; π_ref
log-probs once from the reference model; then μ epochs over shuffled minibatches of
the clipped objective in `components.grpo`. The AdamW state is saved beside the
weights (``optimizer.pt``) so the next round continues it. A NaN/inf loss or gradient,
or a KL / clip fraction over the configured limits, stops the stage before anything
is saved: the previous policy stays the current one. The same `update` runs alone or as
each rank of a torchrun/FSDP launch (`components.distributed`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from components import distributed, tracking
from components.artifacts import OPTIMIZER_FILE, as_paths, read_rollouts
from components.distributed import Context
from components.config import Config
from components.grpo import grpo_loss, zero_variance_fraction
from components.io import distinct_outputs
from components.modeling import ModelLoadError, batched, completion_logprobs, encode_prompts, load_policy, pad_right, \
    save_model, shared_prompt_logprobs
from components.stage_cli import stage_argv, stage_main
from components.timing import PhaseClock
from components.training import DivergenceError, NonFiniteError



def _tensors(tok, rows: pd.DataFrame, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for `rows`: left-padded prompts, right-padded completions, advantages."""
    enc = encode_prompts(tok, rows.prompt_text.tolist())
    c_ids, c_mask = pad_right([list(x) for x in rows.completion_ids], tok.pad_token_id)
    behavior = _pad([torch.tensor(list(lp), dtype=torch.float32) for lp in rows.sampler_logprobs], c_ids.shape[1])
    advantages = torch.tensor(rows.advantage.to_numpy(), dtype=torch.float32)  # [N]: outcome supervision
    if "token_advantages" in rows and any(len(a) for a in rows.token_advantages):  # [N, T]: process supervision
        advantages = _pad([torch.tensor(list(a), dtype=torch.float32) for a in rows.token_advantages], c_ids.shape[1])
    t = {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"], "completion_ids": c_ids,
         "completion_mask": c_mask, "advantages": advantages, "behavior_logp": behavior}
    return {k: v.to(device) for k, v in t.items()}


@torch.no_grad()
def _logprobs(model, tok, rows: pd.DataFrame, batch_size: int, ctx: Context) -> list[torch.Tensor]:
    """Per-row log-prob vectors (unpadded) under `model`.

    Ranks split the rows (rows[rank::world]) and all-gather them; each runs the same number
    of forward passes (FSDP's collectives need it), a rank out of rows a throw-away one.
    """
    mine = list(range(ctx.rank, len(rows), ctx.world))
    slices = list(batched(len(mine), batch_size))
    n_passes = math.ceil(math.ceil(len(rows) / ctx.world) / batch_size)
    local: dict[int, torch.Tensor] = {}
    model.eval()
    for sl in slices + [slice(0, 0)] * (n_passes - len(slices)):
        part = mine[sl] or [0]
        t = _tensors(tok, rows.iloc[part], ctx.device)
        lp, _ = _forward(model, t, rows.prompt_text.iloc[part].tolist(), share_prompts=not ctx.sharded)
        for j, i in enumerate(mine[sl]):
            local[i] = lp[j, : int(t["completion_mask"][j].sum())]
    return ctx.gather_rows(local, len(rows))


def _forward(model, t: dict[str, torch.Tensor], texts: list[str], with_entropy: bool = False,
             share_prompts: bool = True):
    """`completion_logprobs` of a batch, each distinct prompt run once (the rows of a group share it).

    `share_prompts=False` (FSDP ranks) always takes one plain forward pass: sharing changes the
    number of passes with the batch, and the ranks' collectives must stay in step.
    """
    first = {p: i for i, p in reversed(list(enumerate(texts)))}  # each distinct prompt's first row
    if not share_prompts or len(first) == len(texts):
        return completion_logprobs(model, t["prompt_ids"], t["prompt_mask"], t["completion_ids"],
                                   t["completion_mask"], with_entropy=with_entropy)
    keep = sorted(first.values())
    slot = {row: j for j, row in enumerate(keep)}
    index = torch.tensor([slot[first[p]] for p in texts], device=t["prompt_ids"].device)
    return shared_prompt_logprobs(model, t["prompt_ids"][keep], t["prompt_mask"][keep], index, t["completion_ids"],
                                  t["completion_mask"], with_entropy=with_entropy)


def _old_logprobs(cfg: Config, model, tok, rows: pd.DataFrame, batch_size: int, ctx: Context) -> list[torch.Tensor]:
    """π_old per row: the sampler's own log-probs when they are this policy's, else one no-grad pass.

    The HF backend sampling in fp32 at τ = 1 without top-p samples from exactly these
    log-probs (up to float rounding); recomputing them would repeat its forward passes.
    One minibatch is recomputed to confirm the rollouts came from these weights.
    """
    rc, temps = cfg.rollout, rows.get("temperature")
    if rc.backend == "hf" and rc.top_p == 1.0 and cfg.model.dtype == "float32" \
            and rc.hf.dtype in (None, "float32") and temps is not None and bool((temps == 1.0).all()):
        probe = _logprobs(model, tok, rows.iloc[:batch_size], batch_size, ctx)
        sampler = [torch.tensor(list(lp), dtype=torch.float32, device=probe[0].device) for lp in rows.sampler_logprobs]
        if all(p.shape == s.shape and torch.allclose(p, s, rtol=0, atol=1e-3) for p, s in zip(probe, sampler)):
            return probe + sampler[len(probe):]
    return _logprobs(model, tok, rows, batch_size, ctx)


def _pad(vectors: list[torch.Tensor], width: int) -> torch.Tensor:
    """Stack 1-D tensors into [N, width], zero-padded on the right (on their device)."""
    out = torch.zeros(len(vectors), width, device=vectors[0].device if vectors else None)
    for i, v in enumerate(vectors):
        out[i, : len(v)] = v
    return out


def run(cfg: Config, rollouts: str | list[str], policy: str, reference: str | None, new_policy: str,
        step: int = 0) -> dict | None:
    """Update π_θ (the model directory `policy`) on the rollout table(s) `rollouts`, with π_ref the
    model directory `reference`; write the new policy (+ optimizer state) to `new_policy`.

    One process by default; with `grpo.nproc_per_node > 1` the stage re-runs itself under
    torchrun and each rank runs the same `update` on its share (components.distributed).
    Returns the round's metrics (None on a torchrun rank other than 0).
    """
    distinct_outputs(new_policy=new_policy)
    args = (cfg, as_paths(rollouts), policy, reference, new_policy, step)
    if distributed.should_launch(cfg.grpo.nproc_per_node):  # several GPUs in this pod: re-run under torchrun
        return distributed.launch(cfg, stage_argv(run, rollouts=args[1], policy=policy, reference=reference,
                                                  new_policy=new_policy, step=step))
    if distributed.is_rank():  # one rank of a torchrun launch: FSDP-sharded
        return distributed.run_rank(lambda ctx: update(ctx, *args))
    return update(Context.single(), *args)


def load_optimizer_file(path: Path) -> dict:
    """The AdamW state saved beside a policy (tensors only: never unpickles code); ModelLoadError if damaged."""
    import pickle
    import zipfile

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).split("\n")[0].split(". ")[0][:160]  # not torch's advice to load unsafely
        raise ModelLoadError(f"{path} is not a readable optimizer state ({type(err).__name__}: {first}); the "
                             f"policy directory is damaged — delete {path.name} to start the optimizer afresh"
                             ) from None
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise ModelLoadError(f"{path} is not an optimizer state dict (no 'state'/'param_groups'); delete "
                             f"{path.name} to start the optimizer afresh")
    return state


def check_token_ids(rows, vocab_size: int, where: str) -> None:
    """ValueError naming the first row whose completion holds a token id outside the policy's vocabulary
    (a table sampled from another model): the embedding lookup would fail deep in the forward pass."""
    for i, ids in enumerate(rows.completion_ids):
        bad = [int(t) for t in ids if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"rollouts {where}: completion_ids of row {i} hold token id {bad[0]}, outside the "
                             f"policy's vocabulary (0..{vocab_size - 1}); was the table sampled from another model?")


@dataclass
class Trainer:
    """The policy being trained: model, tokenizer, AdamW (its state continues across rounds), and what the
    sharded save needs (the model's class, its parameter names before sharding)."""

    model: torch.nn.Module
    tok: Any
    opt: torch.optim.Optimizer
    model_cls: type
    names: list[str]


def load_trainer(ctx: Context, cfg: Config, policy_dir: str) -> Trainer:
    """The policy in `policy_dir` ready to train: on this process's device (sharded over FSDP ranks), with
    the optimizer state saved beside it (if any) and the config's hyper-parameters."""
    g = cfg.grpo
    model, tok = load_policy(policy_dir, cfg.model)  # whole on this process's device, then sharded
    model_cls, names = type(model), distributed.param_names(model)
    if g.gradient_checkpointing:
        distributed.enable_gradient_checkpointing(model)
    if ctx.sharded:
        distributed.shard_model(model, ctx, g.bf16)
    opt = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay)
    opt_file = Path(policy_dir) / OPTIMIZER_FILE
    if opt_file.exists():
        distributed.load_optimizer_state(model, opt, load_optimizer_file(opt_file), names, ctx)
        for group in opt.param_groups:  # the config, not the checkpoint, owns the hyper-parameters
            group.update(lr=g.lr, weight_decay=g.weight_decay)
    return Trainer(model, tok, opt, model_cls, names)


def load_reference(ctx: Context, cfg: Config, ref_dir: str) -> torch.nn.Module:
    """π_ref from its directory (sharded like the policy over FSDP ranks); it is never trained."""
    ref_model = load_policy(ref_dir, cfg.model)[0]
    if ctx.sharded:
        distributed.shard_model(ref_model, ctx, cfg.grpo.bf16)
    return ref_model


def save_trainer(ctx: Context, trainer: Trainer, out_dir: str) -> None:
    """The policy and its optimizer state as a model directory (`optimizer.pt` beside the weights)."""
    if ctx.sharded:
        distributed.save_sharded(trainer.model, trainer.model_cls, trainer.opt, trainer.tok, out_dir, trainer.names,
                                 ctx)
    else:
        save_model(trainer.model, trainer.tok, out_dir, extra={OPTIMIZER_FILE: trainer.opt.state_dict()})


def update(ctx: Context, cfg: Config, rollout_paths: list[str], policy_dir: str, ref_dir: str | None,
           out_dir: str, step: int = 0) -> dict:
    """The update in this process: alone (``ctx.world == 1``) or as one FSDP rank of ``ctx.world``."""
    clock = PhaseClock("update")  # phases: io (Parquet, model/optimizer load and save), logprobs (no-grad), train
    rows = read_rollouts(rollout_paths)
    trainer = load_trainer(ctx, cfg, policy_dir)
    # π_ref = π_old when the reference is the policy being updated (the first round of an iteration)
    separate = cfg.grpo.beta > 0 and ref_dir and ref_dir != policy_dir
    reference = load_reference(ctx, cfg, ref_dir) if separate else None
    clock.lap("io")
    metrics = train_round(ctx, cfg, trainer, rows, ", ".join(rollout_paths), reference, step, clock)
    save_trainer(ctx, trainer, out_dir)
    clock.lap("io")
    tracking.log_metrics(clock.metrics(), step=step)
    return {**metrics, **clock.metrics()}


def train_round(ctx: Context, cfg: Config, trainer: Trainer, rows: pd.DataFrame, where: str,
                reference: torch.nn.Module | None, step: int, clock: PhaseClock) -> dict:
    """μ epochs of the clipped objective over `rows` (one round's rollouts, read from `where`) on
    `trainer`'s policy, in place.

    π_old: the sampler's log-probs or one no-grad pass (`_old_logprobs`); π_ref: `reference`'s
    log-probs, or π_old's when `reference` is None (the policy is the reference). Returns the round's
    metrics; raises before the optimizer steps that would take a NaN/inf, or past a divergence limit.
    """
    g = cfg.grpo
    model, tok, opt = trainer.model, trainer.tok, trainer.opt
    check_token_ids(rows, model.get_input_embeddings().num_embeddings, where)
    mb = g.minibatch_size
    old = _old_logprobs(cfg, model, tok, rows, mb, ctx)
    ref = None
    if g.beta > 0:
        ref = old if reference is None else _logprobs(reference, tok, rows, mb, ctx)
    clock.lap("logprobs")
    use_is = g.importance_sampling_cap is not None
    lengths = [len(x) for x in rows.completion_ids]

    rng = random.Random(cfg.seed * 7919 + step)  # the same shuffle on every rank
    history: list[dict[str, float]] = []
    n_tokens, start = 0, time.perf_counter()
    opt_step = 0
    for epoch in range(g.epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for sl in batched(len(order), mb):
            idx = order[sl]
            mine = idx[ctx.rank::ctx.world]  # this process's share (all of it when alone)
            take = mine or idx[:1]  # a rank with no share joins the collectives with a zero-weight pass
            t = _tensors(tok, rows.iloc[take], ctx.device)
            model.train()
            logp, entropy = _forward(model, t, rows.prompt_text.iloc[take].tolist(), with_entropy=True,
                                     share_prompts=not (ctx.sharded or g.gradient_checkpointing))  # no KV cache
            width = logp.shape[1]
            loss, stats = grpo_loss(
                logp, _pad([old[i] for i in take], width).to(ctx.device),
                _pad([ref[i] for i in take], width).to(ctx.device) if ref else None,
                t["advantages"], t["completion_mask"], g.eps_low, g.eps_high, g.beta, g.loss_agg,
                max_completion_length=cfg.rollout.max_new_tokens,
                behavior_logp=t["behavior_logp"] if use_is else None, is_cap=g.importance_sampling_cap)
            mask = t["completion_mask"].to(logp.dtype)
            tokens = float(mask.sum()) if mine else 0.0
            # the share's weight in the minibatch's loss: what `grpo_loss` on the whole minibatch would give
            share = tokens / sum(lengths[i] for i in idx) if g.loss_agg == "token" else len(mine) / len(idx)
            loss_sum, kl, clip, ratio_mean, ent, tokens_all = ctx.all_reduce([
                share * stats["loss"], stats["kl"] * tokens, stats["clip_fraction"] * tokens,
                stats["ratio_mean"] * tokens, float((entropy.detach() * mask).sum()) if mine else 0.0, tokens])
            (ratio_max,) = ctx.all_reduce([stats["ratio_max"] if mine else 0.0], op="max")
            if not math.isfinite(loss_sum):
                raise NonFiniteError(f"grpo_update: loss is {loss_sum} at step {step}, optimizer step "
                                     f"{opt_step}; the policy was not updated")
            opt.zero_grad(set_to_none=True)
            (loss * (share * ctx.world)).backward()  # FSDP averages over ranks: the sum is the minibatch's gradient
            lr = warmup_lr(opt, g.lr, g.warmup_steps)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), g.max_grad_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not math.isfinite(grad_norm):
                raise NonFiniteError(f"grpo_update: gradient norm is {grad_norm} at step {step}, optimizer step "
                                     f"{opt_step}; the policy was not updated")
            opt.step()
            n = max(tokens_all, 1.0)
            stats = {"loss": loss_sum, "kl": kl / n, "clip_fraction": clip / n, "ratio_mean": ratio_mean / n,
                     "ratio_max": ratio_max, "grad_norm": grad_norm, "lr": lr, "entropy": ent / n}
            history.append(stats)
            n_tokens += int(tokens_all)
            tracking.log_metrics({f"update/{k}": v for k, v in stats.items()}, step=step * 10_000 + opt_step)
            _check_divergence(cfg, stats, step, opt_step)
            opt_step += 1
    metrics = summarize_round(cfg, rows, history, n_tokens, time.perf_counter() - start, step, ctx.world)
    clock.lap("train")
    if ctx.is_main:
        ranks = f" on {ctx.world} ranks" if ctx.sharded else ""
        print(f"[grpo_update] step {step}: {opt_step} optimizer steps{ranks}, loss "
              f"{metrics['update/loss']:.4f}, KL {metrics['update/kl']:.4f}, clip "
              f"{metrics['update/clip_fraction']:.3f}, {metrics['update/tokens_per_s']:.0f} tok/s", flush=True)
    return metrics


def summarize_round(cfg: Config, rows: pd.DataFrame, history: list[dict[str, float]], n_tokens: int,
                    seconds: float, step: int, world_size: int = 1) -> dict[str, float]:
    """The round's metrics from its per-optimizer-step stats (logged with a `_round` suffix)."""
    rewards = torch.tensor(rows.reward.to_numpy(), dtype=torch.float64)

    def mean(key: str) -> float:
        return sum(h[key] for h in history) / len(history)

    metrics = {
        "update/loss": mean("loss"), "update/kl": mean("kl"), "update/clip_fraction": mean("clip_fraction"),
        "update/entropy": mean("entropy"), "update/grad_norm": mean("grad_norm"),
        "update/ratio_max": max(h["ratio_max"] for h in history), "update/optimizer_steps": len(history),
        "update/reward_mean": float(rewards.mean()), "update/reward_std": float(rewards.std(correction=0)),
        "update/zero_variance_groups": zero_variance_fraction(rewards, cfg.rollout.group_size),
        "update/tokens_per_s": n_tokens / max(seconds, 1e-9), "update/world_size": world_size,
    }
    tracking.log_metrics({k + "_round": v for k, v in metrics.items()}, step=step)
    return metrics


def warmup_lr(opt: torch.optim.Optimizer, lr: float, warmup_steps: int) -> float:
    """Set the lr for the next step: linear warmup over the run's first `warmup_steps` steps.

    The step count lives in the optimizer state saved with each checkpoint, so the
    warmup spans rounds and iterations.
    """
    states = [s for s in opt.state.values() if "step" in s]
    done = int(states[0]["step"]) if states else 0
    current = lr * min(1.0, (done + 1) / warmup_steps) if warmup_steps else lr
    for group in opt.param_groups:
        group["lr"] = current
    return current


def _check_divergence(cfg: Config, stats: dict[str, float], step: int, opt_step: int) -> None:
    g = cfg.grpo
    if g.max_kl is not None and stats["kl"] > g.max_kl:
        raise DivergenceError(f"grpo_update: KL {stats['kl']:.4f} exceeds grpo.max_kl={g.max_kl} at step "
                              f"{step}, optimizer step {opt_step}; run aborted, the policy was not updated")
    if g.max_clip_fraction is not None and stats["clip_fraction"] > g.max_clip_fraction:
        raise DivergenceError(f"grpo_update: clip fraction {stats['clip_fraction']:.3f} exceeds "
                              f"grpo.max_clip_fraction={g.max_clip_fraction} at step {step}; run aborted, "
                              "the policy was not updated")


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, "GRPO update of the policy on one round of rollouts.", {
        "rollouts": "rollout table(s) (Parquet; several: the shards of a round)",
        "policy": "current policy directory (π_old)",
        "reference": "reference model directory (π_ref); default: the policy itself",
        "new_policy": "output: the updated policy directory (+ optimizer.pt)",
        "step": "global round index (seeds the minibatch order)"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
