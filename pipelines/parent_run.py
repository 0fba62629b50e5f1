"""The pipeline's parent MLflow run: opened by the first task (`start_parent_run`, or reopened by
`kfp-grpo run --resume`), closed by the last (`promote_task`: the promotion gate, the final
metrics and the run-level curves)."""

from __future__ import annotations

import os
import time
from typing import Any

import mlflow

from components import tracking
from components.config import Config
from pipelines.runtime import log_to_run, run_task, setup


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
        log_to_run(c, parent_run_id, {"final/start_accuracy": start_accuracy, "final/accuracy": challenger_accuracy})
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
