"""The GRPO update on several processes: torchrun + FSDP2 (one pod, or a Kubeflow Trainer job).

`components.grpo_update.run` comes here in two cases:
- `grpo.nproc_per_node > 1` and the stage is not already under torchrun: `launch` re-runs
  the stage as ``python -m torch.distributed.run --standalone --nproc-per-node N -m
  components.grpo_update ...`` in the same pod and returns rank 0's metrics;
- the process is a rank of a torchrun launch (``WORLD_SIZE > 1``; by `launch`, by hand, or
  in a Trainer job's pods): `run` does the update.

What `run` does, next to the single-process loop in `grpo_update.run`:
- one process group (NCCL on CUDA, gloo on CPU); the model (and the reference model) is
  sharded with FSDP2 `fully_shard` per decoder layer and at the root; on CUDA with
  `grpo.bf16` the compute runs in bfloat16 (master weights, optimizer state and gradient
  reduction stay float32); `grpo.gradient_checkpointing` turns on HF's non-reentrant
  activation checkpointing;
- every rank reads all rollouts and draws the same shuffle as the single-process run, so
  the minibatches are the same; each rank takes its slice ``idx[rank::world]`` of every
  minibatch. The loss is the same `components.grpo.grpo_loss` on each slice, weighted by
  the slice's share of the minibatch (outputs, or tokens for `loss_agg: token`) and by the
  world size (FSDP averages gradients), so the summed gradient is the full minibatch's;
- the stats (loss, KL, clip fraction, ratios, entropy) are all-reduced, so every rank sees
  the numbers the single-process run would log, and NaN / divergence checks stop all ranks;
- π_old / π_ref log-probs are computed on each rank's share of the rows and all-gathered;
- only rank 0 writes: the full state dict gathered to rank 0, saved as the same standard HF
  directory + ``optimizer.pt`` (in the single-process format, so either path can continue
  the other), then a barrier.

On CPU (gloo) this runs for real in the tests; on CUDA/NCCL it has not been run by this
project yet (no GPU was available when it was written).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

METRICS_ENV = "KFP_GRPO_METRICS_OUT"  # rank 0 writes the stage's metrics JSON here
RUN_ID_ENV = "KFP_GRPO_MLFLOW_RUN_ID"  # rank 0 logs into this MLflow run


class DistributedLaunchError(RuntimeError):
    """A torchrun launch of the update failed (the ranks' own errors are in the log above)."""


# --------------------------------------------------------------------------- when
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_rank() -> bool:
    """True in one of several processes started by torchrun (WORLD_SIZE > 1)."""
    return under_torchrun() and world_size() > 1


def should_launch(nproc_per_node: int) -> bool:
    """True when the config asks for several processes and this is not one of them yet."""
    return nproc_per_node > 1 and not under_torchrun()


def enable_gradient_checkpointing(model) -> None:
    """HF activation checkpointing, non-reentrant (the variant that composes with FSDP)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# --------------------------------------------------------------------------- launch (one pod)
def torchrun_command(cfg, rollout_paths: list[str], policy_dir: str, ref_dir: str | None, out_dir: str,
                     step: int, nproc_per_node: int, nnodes: int = 1, launcher: list[str] | None = None) -> list[str]:
    """The command line that runs the update stage under torchrun.

    One node: ``--standalone`` (a local rendezvous). Several nodes: the rendezvous comes
    from the environment (``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, ``PET_NODE_RANK``, which
    Kubeflow Trainer's torch runtime sets and torchrun reads).
    """
    launcher = launcher or [sys.executable, "-m", "torch.distributed.run"]
    cmd = list(launcher) + (["--standalone"] if nnodes == 1 else [f"--nnodes={nnodes}"])
    cmd += [f"--nproc-per-node={nproc_per_node}", "-m", "components.grpo_update", "--config-json", cfg.to_json(),
            "--rollouts", *rollout_paths, "--policy", policy_dir, "--out", out_dir, "--step", str(step)]
    if ref_dir:
        cmd += ["--reference", ref_dir]
    return cmd


def launch(cfg, rollout_paths: list[str], policy_dir: str, ref_dir: str | None, out_dir: str, step: int = 0) -> dict:
    """Run the update under torchrun with `grpo.nproc_per_node` processes; return rank 0's metrics.

    An active MLflow run is handed to rank 0 (it logs the per-step metrics into it).
    """
    import mlflow

    n = cfg.grpo.nproc_per_node
    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        raise ValueError(f"grpo.nproc_per_node={n} but this pod has {torch.cuda.device_count()} GPU(s); "
                         "request as many GPUs (cluster.stages.grpo_update.accelerator_limit)")
    with tempfile.TemporaryDirectory(prefix="kfp-grpo-torchrun-") as tmp:
        metrics_path = Path(tmp) / "metrics.json"
        # the ranks import this same checkout, installed or not; paths stay relative to this cwd
        path = os.pathsep.join(p for p in (_project_root(), os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, **{METRICS_ENV: str(metrics_path), "PYTHONPATH": path})
        run = mlflow.active_run()
        if run is not None:
            env[RUN_ID_ENV] = run.info.run_id
            env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
        cmd = torchrun_command(cfg, rollout_paths, policy_dir, ref_dir, out_dir, step, n)
        print(f"[grpo_update] launching {n} processes: torchrun --standalone --nproc-per-node={n} "
              "-m components.grpo_update ...", flush=True)
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise DistributedLaunchError(f"grpo_update under torchrun ({n} processes) exited with code "
                                         f"{proc.returncode}; see the ranks' errors above")
        if not metrics_path.exists():
            raise DistributedLaunchError("grpo_update under torchrun finished but rank 0 wrote no metrics")
        return json.loads(metrics_path.read_text())


def _project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


# --------------------------------------------------------------------------- process group
@dataclass
class Context:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Context:
    """Join the torchrun process group: NCCL on CUDA (one GPU per local rank), gloo on CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return Context(dist.get_rank(), dist.get_world_size(), device)


def _fully_shard():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6: FSDP2 lived under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def shard_model(model: torch.nn.Module, ctx: Context, bf16: bool) -> torch.nn.Module:
    """FSDP2: shard each decoder layer (HF's `_no_split_modules`), then the root.

    On CUDA with `bf16`, parameters are cast to bfloat16 for compute and gradients are
    reduced in float32; on CPU no casting (gloo, exact float32 for the tests).
    """
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, MixedPrecisionPolicy = _fully_shard()
    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16 and ctx.device.type == "cuda" else MixedPrecisionPolicy())
    block_types = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_types]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _all_reduce(values: list[float], ctx: Context, op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def _even_slices(n: int, parts: int) -> list[slice]:
    """`parts` consecutive slices covering range(n) (some empty when n < parts)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out


@torch.no_grad()
def sharded_logprobs(model, tok, rows, batch_size: int, ctx: Context) -> list[torch.Tensor]:
    """Per-row log-prob vectors of all rows: each rank does rows[rank::world], then all-gather.

    Every rank runs the same number of forward passes (FSDP's collectives need it); a rank
    with no rows left runs a throw-away forward on row 0.
    """
    from components.grpo_update import _tensors
    from components.modeling import completion_logprobs

    mine = list(range(ctx.rank, len(rows), ctx.world))
    n_batches = max(1, math.ceil(math.ceil(len(rows) / ctx.world) / batch_size))
    local: dict[int, torch.Tensor] = {}
    model.eval()
    for sl in _even_slices(len(mine), n_batches):
        part = mine[sl] or [0]
        t = _tensors(tok, rows.iloc[part], ctx.device)
        lp, _ = completion_logprobs(model, t["prompt_ids"], t["prompt_mask"], t["completion_ids"], t["completion_mask"])
        if mine[sl]:
            for j, i in enumerate(part):
                local[i] = lp[j, : int(t["completion_mask"][j].sum())].float().cpu()
    gathered: list[dict[int, torch.Tensor] | None] = [None] * ctx.world
    dist.all_gather_object(gathered, local)
    merged = {i: v for part in gathered for i, v in part.items()}
    return [merged[i] for i in range(len(rows))]


# --------------------------------------------------------------------------- optimizer state
def _param_names(model: torch.nn.Module) -> list[str]:
    """Names of `model.parameters()` in order (what AdamW's integer state keys index)."""
    return [n for n, _ in model.named_parameters()]


def ids_to_names(state: dict, names: list[str]) -> dict:
    """A single-process AdamW state dict (integer keys) → FQN keys (torch.distributed.checkpoint)."""
    return {"state": {names[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


def names_to_ids(state: dict, names: list[str]) -> dict:
    """The inverse of `ids_to_names`: what `torch.optim.Optimizer.load_state_dict` reads."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


# --------------------------------------------------------------------------- the update
def run(cfg, rollout_paths: list[str], policy_dir: str, ref_dir: str | None, out_dir: str,
        step: int = 0) -> dict | None:
    """One rank of the distributed update; returns the metrics on rank 0, None elsewhere."""
    ctx = init()
    mlflow_run = None
    try:
        if ctx.is_main and os.environ.get(RUN_ID_ENV):
            import mlflow

            mlflow_run = mlflow.start_run(run_id=os.environ[RUN_ID_ENV])
        metrics = _update(cfg, ctx, rollout_paths, policy_dir, ref_dir, out_dir, step)
        if ctx.is_main and os.environ.get(METRICS_ENV):
            Path(os.environ[METRICS_ENV]).write_text(json.dumps(metrics))
        return metrics if ctx.is_main else None
    finally:
        if mlflow_run is not None:
            import mlflow

            mlflow.end_run()
        if dist.is_initialized():
            dist.destroy_process_group()


def _update(cfg, ctx: Context, rollout_paths, policy_dir, ref_dir, out_dir, step) -> dict:
    from components import tracking
    from components.grpo import grpo_loss
    from components.grpo_update import (OPTIMIZER_FILE, _check_divergence, _pad, _tensors, load_rollouts,
                                        summarize_round, warmup_lr)
    from components.modeling import batched, completion_logprobs, load_policy
    from components.training import NonFiniteError
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    import random

    g = cfg.grpo
    rows = load_rollouts(rollout_paths)
    model, tok = load_policy(policy_dir, cfg.model)  # on this rank's GPU (or CPU), whole, then sharded
    names, model_cls = _param_names(model), type(model)
    if g.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    shard_model(model, ctx, g.bf16)
    opt = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay)
    opt_file = Path(policy_dir) / OPTIMIZER_FILE
    if opt_file.exists():
        full = ids_to_names(torch.load(opt_file, weights_only=True), names)
        set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))
        for group in opt.param_groups:  # the config, not the checkpoint, owns the hyper-parameters
            group.update(lr=g.lr, weight_decay=g.weight_decay)
    mb = g.minibatch_size
    old = sharded_logprobs(model, tok, rows, mb, ctx)
    ref = None
    if g.beta > 0:
        if not ref_dir or ref_dir == policy_dir:
            ref = old
        else:
            ref_model = shard_model(load_policy(ref_dir, cfg.model)[0], ctx, g.bf16)
            ref = sharded_logprobs(ref_model, tok, rows, mb, ctx)
            del ref_model
    use_is = g.importance_sampling_cap is not None
    lengths = [len(x) for x in rows.completion_ids]

    rng = random.Random(cfg.seed * 7919 + step)  # the single-process run's shuffle: same minibatches
    history: list[dict[str, float]] = []
    n_tokens, start, opt_step = 0, time.perf_counter(), 0
    for epoch in range(g.epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for sl in batched(len(order), mb):
            idx = order[sl]
            mine = idx[ctx.rank::ctx.world]
            total_tokens = sum(lengths[i] for i in idx)
            t = _tensors(tok, rows.iloc[mine or idx[:1]], ctx.device)
            model.train()
            logp, entropy = completion_logprobs(model, t["prompt_ids"], t["prompt_mask"], t["completion_ids"],
                                                t["completion_mask"], with_entropy=True)
            mask = t["completion_mask"].to(logp.dtype)
            if mine:
                width = logp.shape[1]
                loss, stats = grpo_loss(
                    logp, _pad([old[i] for i in mine], width).to(ctx.device),
                    _pad([ref[i] for i in mine], width).to(ctx.device) if ref else None,
                    t["advantages"], t["completion_mask"], g.eps_low, g.eps_high, g.beta, g.loss_agg,
                    max_completion_length=cfg.rollout.max_new_tokens,
                    behavior_logp=t["behavior_logp"] if use_is else None, is_cap=g.importance_sampling_cap)
                tokens = float(mask.sum())
                share = tokens / total_tokens if g.loss_agg == "token" else len(mine) / len(idx)
                part = [share * stats["loss"], stats["kl"] * tokens, stats["clip_fraction"] * tokens,
                        stats["ratio_mean"] * tokens, float((entropy.detach() * mask).sum()), tokens]
                ratio_max = stats["ratio_max"]
            else:  # fewer outputs than ranks: join the collectives with a zero-weight pass
                loss, share, part, ratio_max = logp.sum() * 0.0, 0.0, [0.0] * 6, 0.0
            loss_sum, kl, clip, ratio_mean, ent, tokens_all = _all_reduce(part, ctx)
            (ratio_max,) = _all_reduce([ratio_max], ctx, dist.ReduceOp.MAX)
            if not math.isfinite(loss_sum):
                raise NonFiniteError(f"grpo_update: loss is {loss_sum} at step {step}, optimizer step "
                                     f"{opt_step}; the policy was not updated")
            opt.zero_grad(set_to_none=True)
            (loss * (share * ctx.world)).backward()  # FSDP averages over ranks: the sum is the full gradient
            lr = warmup_lr(opt, g.lr, g.warmup_steps)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), g.max_grad_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not math.isfinite(grad_norm):
                raise NonFiniteError(f"grpo_update: gradient norm is {grad_norm} at step {step}, optimizer step "
                                     f"{opt_step}; the policy was not updated")
            opt.step()
            denom = max(tokens_all, 1.0)
            stats = {"kl": kl / denom, "clip_fraction": clip / denom, "ratio_mean": ratio_mean / denom,
                     "ratio_max": ratio_max, "loss": loss_sum, "grad_norm": grad_norm, "lr": lr,
                     "entropy": ent / denom}
            history.append(stats)
            n_tokens += int(tokens_all)
            tracking.log_metrics({f"update/{k}": v for k, v in stats.items()}, step=step * 10_000 + opt_step)
            _check_divergence(cfg, stats, step, opt_step)
            opt_step += 1
    metrics = summarize_round(cfg, rows, history, n_tokens, time.perf_counter() - start, step)
    metrics["update/world_size"] = ctx.world
    tracking.log_metrics({"update/world_size_round": ctx.world}, step=step)
    if ctx.is_main:
        print(f"[grpo_update] step {step}: {opt_step} optimizer steps on {ctx.world} ranks, loss "
              f"{metrics['update/loss']:.4f}, KL {metrics['update/kl']:.4f}, clip "
              f"{metrics['update/clip_fraction']:.3f}, {metrics['update/tokens_per_s']:.0f} tok/s", flush=True)
    save_sharded(model, model_cls, opt, tok, out_dir, names, ctx)
    return metrics


def save_sharded(model, model_cls, opt, tok, out_dir: str, names: list[str], ctx: Context) -> None:
    """Gather the full weights and optimizer state to rank 0 and save them as `save_model` does.

    Rank 0 builds an unsharded `model_cls` on the meta device, assigns it the gathered
    tensors (no second copy of the weights) and writes it with `save_pretrained`.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from components.grpo_update import OPTIMIZER_FILE
    from components.io import atomic_path

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it all, others nothing
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, opt, options=options)
    if ctx.is_main:
        with torch.device("meta"):
            plain = model_cls(model.config)
        plain.load_state_dict(weights, strict=False, assign=True)
        plain.tie_weights()
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"gathered state dict lacks {missing[:5]}")
        plain.generation_config = model.generation_config
        with atomic_path(out_dir) as tmp:
            plain.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            torch.save(names_to_ids(optim, names), tmp / OPTIMIZER_FILE)
    dist.barrier()
