"""What a pipeline task runs inside its container (or local subprocess).

`run_task` is the only bridge between KFP and the stages: it parses the config, opens a
nested MLflow run under the pipeline's parent run, calls `components.<stage>.run` with
artifact paths, and copies the returned metrics into the KFP Metrics artifact and the
parent run. No training logic lives here.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import time
from typing import Any, Iterator

import mlflow

from components import tracking
from components.config import Config, config_from_json
from components.stage_cli import apply_process_settings, quiet_hf

# metrics also logged to the parent run, for the run-level curves
PARENT_METRICS = ("rollout/reward_mean", "rollout/accuracy", "update/kl_round", "update/clip_fraction_round",
                  "eval/accuracy", "replay/rm_accuracy_before", "replay/rm_accuracy_after")
STEP_PARAMS = ("step", "iteration")


def setup(config_json: str) -> Config:
    """Parse the task's config and apply process settings (quiet HF logs, threads)."""
    quiet_hf()
    cfg = config_from_json(config_json)
    apply_process_settings(cfg)
    return cfg


@contextlib.contextmanager
def stage_run(stage: str, cfg: Config, parent_run_id: str, tracking_uri: str) -> Iterator[str | None]:
    """A nested MLflow run for one task (nothing when the pipeline runs untracked)."""
    if not parent_run_id:
        yield None
        return
    c = tracking.client(tracking_uri or cfg.tracking.tracking_uri)
    parent = c.get_run(parent_run_id)
    with mlflow.start_run(experiment_id=parent.info.experiment_id, run_name=stage, nested=True,
                          parent_run_id=parent_run_id, tags={"kfp_grpo.stage": stage}) as run:
        yield run.info.run_id


def run_task(stage: str, config_json: str, parent_run_id: str = "", tracking_uri: str = "",
             metrics_artifact: Any = None, **kwargs: Any) -> dict:
    """Run `components.<stage>.run(cfg, **kwargs)` as a tracked pipeline task."""
    cfg = setup(config_json)
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    module = importlib.import_module(f"components.{stage}")
    start = time.perf_counter()
    with stage_run(stage, cfg, parent_run_id, tracking_uri) as run_id:
        if run_id:
            tracking.log_params({k: v for k, v in kwargs.items() if k in STEP_PARAMS})
        result = module.run(cfg, **kwargs)
        seconds = time.perf_counter() - start
        tracking.log_metrics({f"{stage}/seconds": seconds})
    numeric = {k: float(v) for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if metrics_artifact is not None:
        for k, v in numeric.items():
            metrics_artifact.log_metric(k.replace("/", "."), v)
    if parent_run_id:
        step = int(kwargs.get("step", kwargs.get("iteration", 0)))
        c = mlflow.MlflowClient()
        for k in PARENT_METRICS:
            if k in numeric:
                c.log_metric(parent_run_id, k, numeric[k], step=step)
    return result


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


def sft_or_resume(config_json: str, parent_run_id: str, tracking_uri: str, init_policy_uri: str, train_path: str,
                  out_dir: str, metrics_artifact: Any) -> None:
    """Start from `init_policy_uri` when it resolves, else run SFT."""
    cfg = setup(config_json)
    if init_policy_uri and resolve_model(init_policy_uri, out_dir, tracking_uri, cfg.tracking.tracking_uri):
        return
    run_task("sft", config_json, parent_run_id, tracking_uri, metrics_artifact, train_path=train_path,
             out_dir=out_dir)


def reward_model_or_resume(config_json: str, parent_run_id: str, tracking_uri: str, init_reward_uri: str,
                           train_path: str, policy_dir: str, out_dir: str, data_out: str,
                           metrics_artifact: Any) -> None:
    """Start from `init_reward_uri` (and its replay buffer) when it resolves, else train r_φ."""
    cfg = setup(config_json)
    if init_reward_uri and resolve_model(init_reward_uri, out_dir, tracking_uri, cfg.tracking.tracking_uri):
        carry_buffer(cfg, init_reward_uri, train_path, out_dir, data_out)
        return
    run_task("reward_model", config_json, parent_run_id, tracking_uri, metrics_artifact, train_path=train_path,
             policy_dir=policy_dir, out_dir=out_dir, data_out=data_out)


def start_parent_run(config_json: str, tracking_uri: str, init_policy_uri: str = "") -> str:
    """Create the pipeline's parent MLflow run (params: the flattened config); return its id."""
    import pandas as pd

    cfg = setup(config_json)
    c = tracking.client(tracking_uri or cfg.tracking.tracking_uri)
    exp_id = tracking.ensure_experiment(c, cfg.tracking.experiment)
    tags = {"kfp_grpo.config_hash": cfg.hash(), "kfp_grpo.init_policy": init_policy_uri or "sft"}
    for var in ("KFP_RUN_ID", "KFP_POD_NAME"):
        if os.environ.get(var):
            tags[f"kfp_grpo.{var.lower()}"] = os.environ[var]
    run = c.create_run(exp_id, run_name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    flat = pd.json_normalize(cfg.model_dump(mode="json", exclude={"cluster"}), sep=".").iloc[0].to_dict()
    for k, v in flat.items():
        c.log_param(run.info.run_id, k, str(v)[:6000])
    print(f"[tracking] MLflow parent run {run.info.run_id} in experiment '{cfg.tracking.experiment}'", flush=True)
    return run.info.run_id


def carry_buffer(cfg: Config, uri: str, train_path: str, rm_dir: str, data_out: str) -> None:
    """The replay buffer stored with a registered RM becomes this run's RM history.

    A version registered without a buffer gets fresh synthetic RM data instead.
    """
    import shutil
    from pathlib import Path

    from components.io import read_parquet, write_parquet
    from components.promote import BUFFER_FILE
    from components.reward_model import synthetic_rm_data

    buffer = Path(rm_dir) / BUFFER_FILE
    if buffer.exists():
        shutil.copy(buffer, data_out)
        print(f"[resolve] replay buffer carried forward from {uri}", flush=True)
    else:
        prompts = read_parquet(train_path, "training prompts")
        write_parquet(synthetic_rm_data(prompts, cfg.reward_model.negatives_per_prompt, cfg.seed), data_out)


def gather(paths: list[str], out_path: str) -> None:
    """Concatenate rollout shards into one Parquet file."""
    from components.grpo_update import load_rollouts
    from components.io import write_parquet

    write_parquet(load_rollouts(paths), out_path)


def promote_task(config_json: str, parent_run_id: str, tracking_uri: str, accuracy: float, sft_accuracy: float,
                 policy_dir: str, rm_dir: str, buffer_path: str, test_path: str, metrics_artifact: Any) -> str:
    """Promotion gate + run-level plot; closes the parent run. Returns the decision as JSON."""
    import json

    result = run_task("promote", config_json, parent_run_id, tracking_uri, metrics_artifact,
                      policy_dir=policy_dir, rm_dir=rm_dir, test_path=test_path, run_id=parent_run_id,
                      buffer_path=buffer_path, challenger_accuracy=accuracy,
                      tags={"pipeline_run": parent_run_id, "sft_accuracy": f"{sft_accuracy:.4f}",
                            "data": data_description(setup(config_json))})
    result["sft_accuracy"] = sft_accuracy
    if parent_run_id:
        c = mlflow.MlflowClient()
        c.log_metric(parent_run_id, "final/sft_accuracy", sft_accuracy)
        c.log_metric(parent_run_id, "final/accuracy", accuracy)
        log_curves(c, parent_run_id)
        c.set_terminated(parent_run_id, "FINISHED")
    return json.dumps(result)


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
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    c.log_figure(run_id, fig, "curves.png")
    plt.close(fig)
