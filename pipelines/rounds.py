"""`loop.warm_engine`: one task runs an iteration's M rounds, the policy and the sampler kept in memory.

The one-task-per-stage mode saves the policy after every update and the next task loads it again
(and on a GPU would start a fresh vLLM engine). Here the same stage code runs the rounds in one
process: each round is `rollout.sample` then `grpo_update.train_round`, each wrapped by
`runtime.run_task` as the nested MLflow run of the task it stands for (`rollout-i{i}-m{m}`,
`grpo-update-i{i}-m{m}`: the same runs, metrics, sample tables and parent-run curves, the same
seeds). What changes: the policy is loaded once and trained in place with one optimizer; the
sampler is that very model (the HF backend in the policy's dtype) or gets the new weights pushed
into it after each update (`Backend.load_weights`: an HF sampler in another dtype, vLLM); the
policy is saved once, after the last round. The task's outputs are what the per-stage tasks hand
on: the iteration's rollouts (every round, for rm-replay) and the new policy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from components import grpo_update, rollout, tracking
from components.artifacts import read_rollouts, write_rollouts
from components.config import Config
from components.distributed import Context
from components.io import distinct_outputs
from components.sampling import Backend
from components.timing import PhaseClock
from pipelines import runtime


def sampler(cfg: Config, trainer: grpo_update.Trainer, policy_dir: str) -> Backend:
    """The iteration's sampler: the HF backend on the trained model itself when it samples in the policy's
    dtype, else the configured backend loaded from `policy_dir` (its weights pushed after each update)."""
    from components.generation import HFBackend, make_backend
    from components.modeling import check_finite_weights

    rc = cfg.rollout
    if rc.backend == "hf" and (rc.hf.dtype or cfg.model.dtype) == cfg.model.dtype:
        check_finite_weights(trainer.model, policy_dir)
        return HFBackend(trainer.model, trainer.tok, rc.generation_batch_size)
    if rc.backend == "vllm":  # the engine core in this process: new weights go in by reference, not pickled
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return make_backend(rc.backend, policy_dir, cfg.model, rc)


def rounds_task(name: str, config_json: str, parent_run_id: str, tracking_uri: str, metrics_artifact: Any,
                prompts: str, policy: str, reward_model: str | None, reference: str | None, rollouts: str,
                new_policy: str, iteration: int, first_step: int) -> dict:
    """Iteration `iteration`'s M rounds (global steps `first_step`…) from the policy directory `policy`;
    writes every round's rollouts to `rollouts` and the updated policy (+ optimizer) to `new_policy`.

    Returns the last round's rollout and update metrics (`name` is the task's own name; each round
    logs under its per-stage task name). Nothing is written when a round fails.
    """
    cfg = runtime.setup(config_json)
    distinct_outputs(rollouts=rollouts, new_policy=new_policy)
    ctx = Context.single()
    trainer = grpo_update.load_trainer(ctx, cfg, policy)
    engine = sampler(cfg, trainer, policy)
    reference_model = None
    Path(rollouts).parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".rounds-", dir=Path(rollouts).parent))
    metrics: dict[str, float] = {}

    def update(c: Config, round_rollouts: str, step: int) -> dict:
        """grpo_update's round on the policy in memory (no load, no save)."""
        clock = PhaseClock("update")
        rows = read_rollouts(round_rollouts)
        clock.lap("io")
        result = grpo_update.train_round(ctx, c, trainer, rows, round_rollouts, reference_model, step, clock)
        tracking.log_metrics(clock.metrics(), step=step)
        return {**result, **clock.metrics()}

    try:
        paths = []
        for m in range(cfg.loop.steps_per_iteration):
            step, path = first_step + m, str(work / f"round-{m}.parquet")
            metrics |= runtime.run_task(lambda c, **kw: rollout.sample(c, lambda: engine, **kw),
                                        f"rollout-i{iteration}-m{m}", config_json, parent_run_id, tracking_uri,
                                        None, stage="rollout", prompts=prompts, reward_model=reward_model,
                                        rollouts=path, step=step, policy_version=f"{iteration}.{m}")
            paths.append(path)
            # π_ref is the policy itself only in the first round when the reference is this iteration's start
            if cfg.grpo.beta > 0 and reference and reference_model is None and not (m == 0 and reference == policy):
                reference_model = grpo_update.load_reference(ctx, cfg, reference)
            metrics |= runtime.run_task(update, f"grpo-update-i{iteration}-m{m}", config_json, parent_run_id,
                                        tracking_uri, None, stage="grpo_update", round_rollouts=path, step=step)
            engine.load_weights(trainer.model)
        grpo_update.save_trainer(ctx, trainer, new_policy)
        write_rollouts(read_rollouts(paths), rollouts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[{name}] {cfg.loop.steps_per_iteration} rounds in one process (policy and sampler in memory)", flush=True)
    runtime.record_metrics(metrics_artifact, metrics)
    return metrics
