"""The task wrapper: what a pipeline task runs inside its container (or local subprocess), and
the in-process runner too.

`run_task` wraps one stage's `run`: it parses the config, opens a nested MLflow run (named
after the task) under the pipeline's parent run, calls the stage with artifact paths, and
copies the returned metrics into the KFP Metrics artifact and the parent run. Beside it, the
two tasks that only move rollouts (`gather`, `accumulate`). Starting from a registered model
is `pipelines.warm_start`; opening and closing the parent run is `pipelines.parent_run`. No
training logic lives here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterator

import mlflow

from components import tracking
from components.config import Config, config_from_json
from components.stage_cli import apply_process_settings, quiet_hf

# metrics also logged to the parent run, for the run-level curves
PARENT_METRICS = ("rollout/reward_mean", "rollout/accuracy", "update/kl_round", "update/clip_fraction_round",
                  "eval/accuracy", "replay/rm_accuracy_before", "replay/rm_accuracy_after",
                  "rollout/rm_agreement", "rollout/step_accuracy", "rollout/prm_step_accuracy")
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
    numeric = record_metrics(metrics_artifact, result)
    if parent_run_id and not (stage == "rollout" and cfg.rollout.shards > 1):  # shards: `gather` logs the round
        step = int(kwargs.get("step", kwargs.get("iteration", 0)))
        log_to_run(mlflow.MlflowClient(), parent_run_id, {k: numeric[k] for k in PARENT_METRICS if k in numeric}, step)
    return result


def record_metrics(metrics_artifact: Any, result: dict) -> dict[str, float]:
    """The finite numbers of a task's `result`, copied into its KFP Metrics artifact (if any, then written)."""
    numeric = {k: float(v) for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if metrics_artifact is not None:
        for k, v in numeric.items():
            metrics_artifact.log_metric(k.replace("/", "."), v)
        write_metrics_file(metrics_artifact)
    return numeric


def log_to_run(c: "mlflow.MlflowClient", run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log `metrics` to run `run_id` at `step` in one batch (one store transaction, not one per metric)."""
    from mlflow.entities import Metric

    if metrics:
        now = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def exit_fast_on_success() -> None:
    """Skip the interpreter's teardown once this kfp task process has succeeded (component bodies end with it).

    Finalising the modules of torch, transformers and mlflow takes ~2 s per task process
    (far more on a busy machine) and does nothing a finished task needs. This registers an
    atexit handler — the last one, so it runs first — that, when the process ends after kfp's
    executor wrote this task's output file (`--executor_input` → outputs.outputFile; written
    after the component returned, so: success) and no exception is pending, runs the other
    atexit handlers, flushes stdout/stderr and `os._exit(0)`s. A task that raised keeps the
    normal exit and its non-zero status. Nothing happens outside a kfp task process.
    """
    path = _executor_output_file()
    if path is None or not hasattr(atexit, "_run_exitfuncs") or getattr(exit_fast_on_success, "armed", False):
        return
    before = _file_state(path)

    def exit_now() -> None:
        if getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None) is not None:
            return  # an uncaught exception: the normal exit, status 1
        after = _file_state(path)
        if after is None or after == before:
            return  # not written by this process
        atexit.unregister(exit_now)
        atexit._run_exitfuncs()  # every other handler, once, in order
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)

    atexit.register(exit_now)
    exit_fast_on_success.armed = True


def _executor_output_file() -> str | None:
    """This kfp task's executor output file (None outside a kfp executor process)."""
    if os.environ.get("_KFP_RUNTIME") != "true" or "--executor_input" not in sys.argv[:-1]:
        return None
    try:
        return json.loads(sys.argv[sys.argv.index("--executor_input") + 1])["outputs"]["outputFile"]
    except (ValueError, KeyError, TypeError):
        return None


def _file_state(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


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
        log_to_run(tracking.client(tracking_uri or cfg.tracking.tracking_uri), parent_run_id, round_metrics, step)


def accumulate(earlier: str | None, this_round: str, out_path: str) -> None:
    """The iteration's rollouts so far: the rounds in `earlier` (if any) followed by `this_round`.

    KFP has no fan-in of artifacts from different tasks (only `dsl.Collected` of one loop),
    so the pipeline hands each round's rollouts on to the next round's task, and the
    iteration's last one to `rm-replay`, which learns from every round.
    """
    from components.artifacts import read_rollouts, write_rollouts

    write_rollouts(read_rollouts(([earlier] if earlier else []) + [this_round]), out_path)
