"""The GRPO update on several processes: torchrun + FSDP2 (one pod, or a Kubeflow Trainer job).

The update itself is `components.grpo_update.update`, one loop for one process and for
every rank; this module holds what several processes add to it:
- `launch`: with `grpo.nproc_per_node > 1` and the stage not already under torchrun, re-run
  the stage as ``python -m torch.distributed.run --standalone --nproc-per-node N -m
  components.grpo_update ...`` in the same pod and return rank 0's metrics;
- `run_rank`: in a rank of a torchrun launch (``WORLD_SIZE > 1``; by `launch`, by hand, or in
  a Trainer job's pods) join the process group (NCCL on CUDA, gloo on CPU), hand rank 0 the
  task's MLflow run, run the update, write rank 0's metrics;
- `Context`: rank, world size, device, and the two collectives the update uses (sums / max
  of its stats, all-gather of per-row log-probs); with one process they do nothing;
- `shard_model`: FSDP2 `fully_shard` per decoder layer and at the root; on CUDA with
  `grpo.bf16` the compute runs in bfloat16 (master weights, optimizer state and gradient
  reduction stay float32); `enable_gradient_checkpointing`: HF's non-reentrant checkpointing;
- `load_optimizer_state` / `save_sharded`: the single-process checkpoint format (HF directory
  + ``optimizer.pt`` with integer keys) read into and gathered out of the sharded model, so
  either path can continue the other.

How the ranks split the work (in `grpo_update.update`): every rank reads all rollouts and
draws the same shuffle as one process would, takes its slice ``idx[rank::world]`` of each
minibatch, and weights the same `components.grpo.grpo_loss` on it by the slice's share of the
minibatch times the world size (FSDP averages gradients), so the summed gradient is the full
minibatch's; the logged stats are all-reduced, so NaN / divergence checks stop all ranks.

On CPU (gloo) this runs for real in the tests; on CUDA/NCCL it has not been run by this
project yet (no GPU was available when it was written).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

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
def torchrun_command(cfg, stage_args: list[str], nproc_per_node: int, nnodes: int = 1,
                     launcher: list[str] | None = None) -> list[str]:
    """The command line that runs the update stage (`python -m components.grpo_update`, with the
    stage's own arguments `stage_args`, see `stage_cli.stage_argv`) under torchrun.

    One node: ``--standalone`` (a local rendezvous). Several nodes: the rendezvous comes
    from the environment (``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, ``PET_NODE_RANK``, which
    Kubeflow Trainer's torch runtime sets and torchrun reads).
    """
    launcher = launcher or [sys.executable, "-m", "torch.distributed.run"]
    cmd = list(launcher) + (["--standalone"] if nnodes == 1 else [f"--nnodes={nnodes}"])
    return cmd + [f"--nproc-per-node={nproc_per_node}", "-m", "components.grpo_update", "--config-json",
                  cfg.to_json(), *stage_args]


def launch(cfg, stage_args: list[str]) -> dict:
    """Run the update stage with `stage_args` under torchrun with `grpo.nproc_per_node` processes;
    return rank 0's metrics.

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
        cmd = torchrun_command(cfg, stage_args, n)
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
    """Where this process stands: rank `rank` of `world`, computing on `device`."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def single(cls) -> "Context":
        """One process, no process group (the default update)."""
        from components.modeling import default_device

        return cls(0, 1, default_device())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum (or "max") of `values` over the ranks."""
        if not self.sharded:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def gather_rows(self, local: dict[int, torch.Tensor], n: int) -> list[torch.Tensor]:
        """Rows 0..n−1 from the ranks' {row: tensor} parts (on the CPU when gathered from several ranks)."""
        if self.sharded:
            parts: list[dict[int, torch.Tensor] | None] = [None] * self.world
            dist.all_gather_object(parts, {i: v.float().cpu() for i, v in local.items()})
            local = {i: v for part in parts for i, v in part.items()}
        return [local[i] for i in range(n)]


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


# --------------------------------------------------------------------------- optimizer state
def param_names(model: torch.nn.Module) -> list[str]:
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


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, names: list[str],
                         ctx: Context) -> None:
    """Load a single-process AdamW state (``optimizer.pt``) into `opt`, sharded or not."""
    if not ctx.sharded:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, ids_to_names(state, names), options=StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------------- the update
def run_rank(update: Callable[[Context], dict]) -> dict | None:
    """Run `update` as one rank of a torchrun launch; return its metrics on rank 0, None elsewhere.

    Rank 0 logs into the MLflow run `launch` handed over (``KFP_GRPO_MLFLOW_RUN_ID``) and
    writes the metrics where `launch` reads them (``KFP_GRPO_METRICS_OUT``).
    """
    ctx = init()
    mlflow_run = None
    try:
        if ctx.is_main and os.environ.get(RUN_ID_ENV):
            import mlflow

            mlflow_run = mlflow.start_run(run_id=os.environ[RUN_ID_ENV])
        metrics = update(ctx)
        if ctx.is_main and os.environ.get(METRICS_ENV):
            Path(os.environ[METRICS_ENV]).write_text(json.dumps(metrics))
        return metrics if ctx.is_main else None
    finally:
        if mlflow_run is not None:
            import mlflow

            mlflow.end_run()
        if dist.is_initialized():
            dist.destroy_process_group()


def save_sharded(model, model_cls, opt, tok, out_dir: str, names: list[str], ctx: Context) -> None:
    """Gather the full weights and optimizer state to rank 0 and save them as `save_model` does.

    Rank 0 builds an unsharded `model_cls` on the meta device, assigns it the gathered
    tensors (no second copy of the weights) and writes it with `save_pretrained`.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from components.artifacts import OPTIMIZER_FILE
    from components.modeling import save_model

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
        save_model(plain, tok, out_dir, extra={OPTIMIZER_FILE: names_to_ids(optim, names)})
    dist.barrier()
