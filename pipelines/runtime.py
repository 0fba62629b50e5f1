"""What a pipeline task runs inside its container (or local subprocess), and the in-process runner too.

`run_task` wraps one stage's `run`: it parses the config, opens a nested MLflow run (named
after the task) under the pipeline's parent run, calls the stage with artifact paths, and
copies the returned metrics into the KFP Metrics artifact and the parent run. The other
functions are the tasks with more to do than that: starting from a registered model
(`sft_task`, `reward_model_task`), opening and closing the parent run (`start_parent_run`,
`promote_task`), and collecting rollouts (`gather`, `accumulate`). No training logic lives here.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Callable, Iterator

import mlflow

from components import tracking
from components.config import Config, config_from_json
from components.stage_cli import apply_process_settings, quiet_hf

# metrics also logged to the parent run, for the run-level curves
PARENT_METRICS = ("rollout/reward_mean", "rollout/accuracy", "update/kl_round", "update/clip_fraction_round",
                  "eval/accuracy", "replay/rm_accuracy_before", "replay/rm_accuracy_after",
                  "rollout/rm_agreement")
STEP_PARAMS = ("step", "iteration", "shard")


def setup(config_json: str) -> Config:
    """Parse the task's config and apply process settings (quiet HF logs, threads)."""
    quiet_hf()
    cfg = config_from_json(config_json)
    apply_process_settings(cfg)
    return cfg


@contextlib.contextmanager
def stage_run(name: str, stage: str, cfg: Config, parent_run_id: str, tracking_uri: str) -> Iterator[str | None]:
    """A nested MLflow run named `name` for one task (nothing when the pipeline runs untracked)."""
    if not parent_run_id:
        yield None
        return
    c = tracking.client(tracking_uri or cfg.tracking.tracking_uri)
    parent = c.get_run(parent_run_id)
    with mlflow.start_run(experiment_id=parent.info.experiment_id, run_name=name, nested=True,
                          parent_run_id=parent_run_id, tags={"kfp_grpo.stage": stage, "kfp_grpo.task": name}) as run:
        yield run.info.run_id


def run_task(run_fn: Callable[..., dict], name: str, config_json: str, parent_run_id: str = "",
             tracking_uri: str = "", metrics_artifact: Any = None, stage: str | None = None, **kwargs: Any) -> dict:
    """Run a stage's `run_fn(cfg, **kwargs)` as the tracked pipeline task `name`; return its metrics.

    `stage` defaults to the name of `run_fn`'s module (`components.sft.run` → "sft").
    """
    stage = stage or run_fn.__module__.rsplit(".", 1)[-1]
    cfg = setup(config_json)
    seed_everything(cfg.seed)
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    start = time.perf_counter()
    with stage_run(name, stage, cfg, parent_run_id, tracking_uri) as run_id:
        if run_id:
            tracking.log_params({k: v for k, v in kwargs.items() if k in STEP_PARAMS})
        result = run_fn(cfg, **kwargs)
        seconds = time.perf_counter() - start
        tracking.log_metrics({f"{stage}/seconds": seconds})
    numeric = {k: float(v) for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if metrics_artifact is not None:
        for k, v in numeric.items():
            metrics_artifact.log_metric(k.replace("/", "."), v)
        write_metrics_file(metrics_artifact)
    if parent_run_id and not (stage == "rollout" and cfg.rollout.shards > 1):  # shards: `gather` logs the round
        step = int(kwargs.get("step", kwargs.get("iteration", 0)))
        c = mlflow.MlflowClient()
        for k in PARENT_METRICS:
            if k in numeric:
                c.log_metric(parent_run_id, k, numeric[k], step=step)
    return result


def seed_everything(seed: int) -> None:
    """Seed torch/numpy/random before a stage: a task's outputs are a function of its inputs
    (e.g. the reward model's freshly initialised score head), so a resumed run equals an
    uninterrupted one."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def write_metrics_file(metrics_artifact: Any) -> None:
    """Materialise the task's Metrics artifact as a JSON file.

    KFP keeps metric values in executor metadata only; kfp.local's cache (2.17) treats an
    output artifact whose file does not exist as a miss, so without this no task with a
    Metrics output would ever be skipped by `kfp-grpo run --resume`.
    """
    from components.io import write_json

    if metrics_artifact is None:
        return
    write_json(dict(metrics_artifact.metadata), metrics_artifact.path)


def resolve_model(uri: str, dst: str, tracking_uri: str, cfg_tracking_uri: str | None) -> bool:
    """Download a registered model (e.g. `models:/kfp-grpo-policy@champion`) into `dst`, atomically.

    Returns False when `uri` names an alias that no version holds yet (no champion so
    far: the caller trains from scratch instead); other failures raise.
    """
    import shutil
    import tempfile

    from mlflow.exceptions import MlflowException

    from components.io import atomic_path

    tracking.client(tracking_uri or cfg_tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as tmp, atomic_path(dst) as out:
            local = tracking.download_model(uri, tmp)
            shutil.copytree(local, out, dirs_exist_ok=True)
    except MlflowException as err:
        if "@" in uri and ("alias" in str(err).lower() or "not found" in str(err).lower()):
            print(f"[resolve] {uri} does not exist yet ({err.message}); training from scratch", flush=True)
            return False
        raise
    print(f"[resolve] {uri} → {dst}", flush=True)
    return True


def sft_task(name: str, config_json: str, parent_run_id: str, tracking_uri: str, metrics_artifact: Any,
             init_policy_uri: str, train: str, model: str) -> dict:
    """The sft task: start from the registered model `init_policy_uri` when it resolves, else run SFT."""
    from components import sft

    cfg = setup(config_json)
    if init_policy_uri and resolve_model(init_policy_uri, model, tracking_uri, cfg.tracking.tracking_uri):
        write_metrics_file(metrics_artifact)
        return {}
    return run_task(sft.run, name, config_json, parent_run_id, tracking_uri, metrics_artifact, train=train,
                    model=model)


def reward_model_task(name: str, config_json: str, parent_run_id: str, tracking_uri: str, metrics_artifact: Any,
                      init_reward_uri: str, train: str, policy: str, reward_model: str, rm_data: str) -> dict:
    """The reward-model task: start from `init_reward_uri` (and its replay history) when it resolves,
    else train r_φ."""
    from components import reward_model as stage

    cfg = setup(config_json)
    if init_reward_uri and resolve_model(init_reward_uri, reward_model, tracking_uri, cfg.tracking.tracking_uri):
        carry_buffer(cfg, init_reward_uri, train, reward_model, rm_data)
        write_metrics_file(metrics_artifact)
        return {}
    return run_task(stage.run, name, config_json, parent_run_id, tracking_uri, metrics_artifact, train=train,
                    policy=policy, reward_model=reward_model, rm_data=rm_data)


def start_parent_run(config_json: str, tracking_uri: str, init_policy_uri: str = "", resume_run_id: str = "") -> str:
    """Create the pipeline's parent MLflow run (params: the flattened config); return its id.

    With `resume_run_id` (`kfp-grpo run --resume ID`), reopen that run instead.
    """
    import pandas as pd

    cfg = setup(config_json)
    c = tracking.client(tracking_uri or cfg.tracking.tracking_uri)
    if resume_run_id:
        reopen_parent_run(c, cfg, resume_run_id)
        return resume_run_id
    exp_id = tracking.ensure_experiment(c, cfg.tracking.experiment)
    tags = {"kfp_grpo.config_hash": cfg.hash(), "kfp_grpo.init_policy": init_policy_uri or "sft"}
    for var in ("KFP_RUN_ID", "KFP_POD_NAME"):
        if os.environ.get(var):
            tags[f"kfp_grpo.{var.lower()}"] = os.environ[var]
    run = c.create_run(exp_id, run_name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    from mlflow.entities import Param

    flat = pd.json_normalize(cfg.model_dump(mode="json", exclude={"cluster"}), sep=".").iloc[0].to_dict()
    params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run.info.run_id, params=params[i:i + 100])
    print(f"[tracking] MLflow parent run {run.info.run_id} in experiment '{cfg.tracking.experiment}' "
          f"(if interrupted, resume locally with: kfp-grpo run <same options> --resume {run.info.run_id})", flush=True)
    return run.info.run_id


class ResumeError(ValueError):
    """`--resume` names a run that cannot be resumed with this config."""


def reopen_parent_run(c: "mlflow.MlflowClient", cfg: Config, run_id: str, reopen: bool = True) -> None:
    """Check that `run_id` is a parent run of this config's pipeline; reopen it (RUNNING).

    Nested runs still RUNNING belong to tasks killed with the old process: they are marked
    KILLED (their tasks run again; completed tasks are cache hits and do not run).
    """
    from mlflow.exceptions import MlflowException

    try:
        run = c.get_run(run_id)
    except MlflowException:
        raise ResumeError(f"cannot resume: no MLflow run {run_id} at {tracking.redact(c.tracking_uri)}") from None
    tags = run.data.tags
    if "mlflow.parentRunId" in tags or "kfp_grpo.config_hash" not in tags:
        raise ResumeError(f"cannot resume: MLflow run {run_id} is not the parent run of a kfp-grpo pipeline")
    if tags["kfp_grpo.config_hash"] != cfg.hash():
        raise ResumeError(f"cannot resume run {run_id}: it ran config {tags['kfp_grpo.config_hash']}, this is "
                          f"config {cfg.hash()}; resume with the same config and --set options")
    if run.info.status == "FINISHED":
        raise ResumeError(f"cannot resume run {run_id}: it already FINISHED")
    if not reopen:
        return
    stale = c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and "
                                                    "attributes.status = 'RUNNING'")
    for r in stale:
        c.set_terminated(r.info.run_id, "KILLED")
    c.update_run(run_id, status="RUNNING")
    c.set_tag(run_id, "kfp_grpo.resumed", str(int(tags.get("kfp_grpo.resumed", "0")) + 1))
    print(f"[tracking] resuming MLflow parent run {run_id} ({len(stale)} interrupted task run(s) marked KILLED)",
          flush=True)


def carry_buffer(cfg: Config, uri: str, train_path: str, rm_dir: str, data_out: str) -> None:
    """The replay history stored with a registered RM becomes this run's history.

    A version registered without a buffer gets fresh synthetic RM data instead.
    """
    import shutil
    from pathlib import Path

    from components.io import read_parquet, write_parquet
    from components.artifacts import BUFFER_FILE
    from components.reward_model import synthetic_rm_data

    buffer = Path(rm_dir) / BUFFER_FILE
    if buffer.exists():
        shutil.copy(buffer, data_out)
        print(f"[resolve] replay buffer carried forward from {uri}", flush=True)
    else:
        prompts = read_parquet(train_path, "training prompts")
        write_parquet(synthetic_rm_data(prompts, cfg.reward_model.negatives_per_prompt, cfg.seed), data_out)


def gather(config_json: str, parent_run_id: str, tracking_uri: str, step: int, paths: list[str],
           out_path: str) -> None:
    """Concatenate rollout shards into one Parquet file.

    The shards log their own metrics in their nested runs; the parent run's per-round
    rollout curves (`rollout/reward_mean`, `rollout/accuracy`) come from here, over the
    whole round, one point per step.
    """
    from components.artifacts import read_rollouts, write_rollouts

    rows = read_rollouts(paths)
    write_rollouts(rows, out_path)
    print(f"[gather] {len(paths)} shards → {len(rows)} rollouts", flush=True)
    if parent_run_id:
        cfg = setup(config_json)
        round_metrics = {"rollout/reward_mean": float(rows.reward.mean()),
                         "rollout/accuracy": float(rows.correct.mean())}
        c = tracking.client(tracking_uri or cfg.tracking.tracking_uri)
        for k, v in round_metrics.items():
            c.log_metric(parent_run_id, k, v, step=step)


def accumulate(earlier: str | None, this_round: str, out_path: str) -> None:
    """The iteration's rollouts so far: the rounds in `earlier` (if any) followed by `this_round`.

    KFP has no fan-in of artifacts from different tasks (only `dsl.Collected` of one loop),
    so the pipeline hands each round's rollouts on to the next round's task, and the
    iteration's last one to `rm-replay`, which learns from every round.
    """
    from components.artifacts import read_rollouts, write_rollouts

    write_rollouts(read_rollouts(([earlier] if earlier else []) + [this_round]), out_path)


def promote_task(name: str, config_json: str, parent_run_id: str, tracking_uri: str, metrics_artifact: Any,
                 policy: str, reward_model: str, buffer: str, test: str, challenger_accuracy: float,
                 start_accuracy: float) -> dict:
    """Promotion gate + run-level plot; closes the parent run. Returns the decision."""
    from components import promote

    result = run_task(promote.run, name, config_json, parent_run_id, tracking_uri, metrics_artifact,
                      policy=policy, reward_model=reward_model, test=test, run_id=parent_run_id, buffer=buffer,
                      challenger_accuracy=challenger_accuracy, start_accuracy=start_accuracy,
                      tags={"pipeline_run": parent_run_id, "start_accuracy": f"{start_accuracy:.4f}",
                            "data": data_description(setup(config_json))})
    if parent_run_id:
        c = mlflow.MlflowClient()
        c.log_metric(parent_run_id, "final/start_accuracy", start_accuracy)
        c.log_metric(parent_run_id, "final/accuracy", challenger_accuracy)
        log_curves(c, parent_run_id)
        c.set_terminated(parent_run_id, "FINISHED")
    return result


def data_description(cfg: Config) -> str:
    """A short tag naming the data a model was trained on."""
    d = cfg.data
    if d.source == "arithmetic":
        a = d.arithmetic
        return (f"arithmetic ops={''.join(a.operators)} n_ops={a.num_operations} "
                f"operands={a.min_operand}..{a.max_operand} train={d.num_train} seed={cfg.seed}")
    return f"{d.source}:{d.path} layout={d.layout}"


def log_curves(c: "mlflow.MlflowClient", run_id: str) -> None:
    """Reward / accuracy curves of the whole run as a PNG on the parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("rollout/reward_mean", "rollout/accuracy"), ("eval/accuracy",),
              ("replay/rm_accuracy_before", "replay/rm_accuracy_after")]
    titles = ["rollouts (per round)", "held-out accuracy (per iteration)", "RM accuracy on fresh samples"]
    for ax, keys, title in zip(axes, panels, titles):
        for key in keys:
            hist = sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)
            if hist:
                ax.plot([m.step for m in hist], [m.value for m in hist], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("step" if "rollout" in title else "iteration")
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    c.log_figure(run_id, fig, "curves.png")
    plt.close(fig)
