"""`kfp-grpo run`: the same pipeline, run locally by `kfp.local` with an embedded MLflow."""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

from components import tracking
from components.config import Config
from pipelines.progress import TaskLog


def embedded_tracking_uri(workdir: Path) -> str:
    """sqlite:///<workdir>/mlflow.db — the embedded store of local runs."""
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def prepare_tracking(cfg: Config, workdir: Path) -> str:
    """Resolve the tracking URI and create schema + experiment once, before tasks run in parallel."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri(workdir)
    tracking.ensure_experiment(tracking.client(uri), cfg.tracking.experiment)
    return uri


class PipelineFailed(RuntimeError):
    """A task of a local pipeline run failed (`parent_run_id`: the MLflow run to `--resume`)."""

    def __init__(self, message: str, parent_run_id: str | None = None):
        super().__init__(message)
        self.parent_run_id = parent_run_id


def mark_failed_runs(uri: str, experiment: str, since_ms: int, parent_run_id: str = "",
                     status: str = "FAILED") -> tuple[list[str], str | None]:
    """Mark this run's still-RUNNING MLflow runs (parent and nested) as FAILED.

    Returns (marked run ids, the parent run's id). Never raises: the tracking server may
    be what failed; then nothing is marked.
    """
    try:
        c = tracking.client(uri)
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            return [], parent_run_id or None
        since = f"attributes.start_time >= {since_ms}"
        if parent_run_id:  # a resumed run started long ago: its own runs, not others'
            since = f"tags.mlflow.parentRunId = '{parent_run_id}'"
        runs = c.search_runs([exp.experiment_id], f"attributes.status = 'RUNNING' and {since}")
        if parent_run_id:
            runs = [c.get_run(parent_run_id)] + list(runs)
        parent = parent_run_id or next((r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags), None)
        for r in runs:
            c.set_terminated(r.info.run_id, status)
        return [r.info.run_id for r in runs], parent
    except Exception as err:  # noqa: BLE001 — report, do not mask the pipeline's own failure
        print(f"kfp-grpo: could not mark the MLflow runs {status}: {' '.join(str(err).split())[:300]}", flush=True)
        return [], parent_run_id or None


def keep_upstream_parameters_in_loops() -> bool:
    """Work around a kfp.local bug (kfp 2.17.0–2.17.3) that breaks sharded rollouts locally.

    kfp.local builds each `dsl.ParallelFor` iteration from the loop task's spec and replaces
    EVERY input that is another task's output parameter with the loop item, so the shards
    received the loop index (0, 1, …) instead of `start-tracking`'s MLflow run id. Cluster
    backends resolve these inputs correctly; the compiled pipeline is not changed. Here the
    iteration spec keeps the loop task's task-output parameters as they were. Applied only
    where the bug shows (checked on a one-input spec); returns whether it was applied.
    """
    from kfp.local.orchestrator import task_spec_utils
    from kfp.pipeline_spec import pipeline_spec_pb2

    make = task_spec_utils.create_parameter_loop_iteration_task_spec
    if getattr(make, "keeps_upstream_parameters", False):
        return True
    probe = pipeline_spec_pb2.PipelineTaskSpec()
    probe.inputs.parameters["upstream"].task_output_parameter.producer_task = "producer"
    if make(probe, 7, "loop").inputs.parameters["upstream"].HasField("task_output_parameter"):
        return False  # fixed upstream

    def iteration_spec(original_task_spec, loop_item, loop_task_name):
        spec = make(original_task_spec, loop_item, loop_task_name)
        for name, value in original_task_spec.inputs.parameters.items():
            if value.HasField("task_output_parameter"):
                spec.inputs.parameters[name].CopyFrom(value)
        return spec

    iteration_spec.keeps_upstream_parameters = True
    task_spec_utils.create_parameter_loop_iteration_task_spec = iteration_spec
    return True


@contextlib.contextmanager
def print_restored() -> Iterator[None]:
    """Put `builtins.print` back afterwards.

    kfp.local (2.17) indents each task's output by swapping `builtins.print` in and out;
    two tasks running at once (rollout shards) can swap it back in the wrong order and
    leave it indenting every later print of this process (the `--json` summary included).
    """
    original = builtins.print
    try:
        yield
    finally:
        builtins.print = original


def task_names(pipeline) -> dict[str, tuple[str, str, int]]:
    """kfp.local's name of each task of a compiled pipeline (its component's name) → (the task's name,
    its stage, how often it runs: a ParallelFor runs its body once per item)."""
    spec = pipeline.pipeline_spec
    out: dict[str, tuple[str, str, int]] = {}

    def walk(dag, runs: int) -> None:
        for task in dag.tasks.values():
            component = task.component_ref.name
            if spec.components[component].HasField("dag"):
                items = json.loads(task.parameter_iterator.items.raw) if task.HasField("parameter_iterator") else [0]
                walk(spec.components[component].dag, runs * len(items))
            else:
                name = component.removeprefix("comp-")
                out[name] = (task.task_info.name, re.sub(r"-\d+$", "", name).replace("-", "_"), runs)

    walk(spec.root.dag, 1)
    return out


def run_local(cfg: Config, workdir: Path, init: dict[str, str], resume_run_id: str = "",
              verbose: bool = False) -> dict:
    """Compile-and-run the pipeline with kfp.local's SubprocessRunner; return a summary.

    Task outputs are cached under `<workdir>/cache`; `resume_run_id` (an interrupted run's
    MLflow parent run, same workdir and config) reruns only the tasks that did not complete.
    The terminal gets one line per task (`pipelines.progress`); each task's output goes to
    `<workdir>/logs/<time>/<task>.log` (`verbose`: to the terminal as well).
    """
    from kfp import local

    from pipelines.pipeline import build_pipeline
    from pipelines.runtime import reopen_parent_run

    workdir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "Creating initial MLflow database tables..."
    uri = prepare_tracking(cfg, workdir)
    if resume_run_id:
        reopen_parent_run(tracking.client(uri), cfg, resume_run_id, reopen=False)  # a clear error before any task
    # Expected locally: cluster placement is ignored and the project image is this environment.
    warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner.*")
    warnings.filterwarnings("ignore", message=r".*custom or non-Python base image.*")
    keep_upstream_parameters_in_loops()  # rollout.shards > 1: the shards need the parent run id
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str((workdir / "kfp").resolve()),
               raise_on_error=True, enable_caching=True, cache_root=str((workdir / "cache").resolve()))
    pipeline = build_pipeline(cfg, resume_run_id=resume_run_id, caching=True)
    tasks = task_names(pipeline)
    logdir = workdir.resolve() / "logs" / time.strftime("%Y%m%d-%H%M%S")
    print(f"kfp-grpo: running pipeline '{cfg.name}' locally: {sum(r for *_, r in tasks.values())} tasks "
          f"({cfg.loop.iterations} iterations × {cfg.loop.steps_per_iteration} rounds); MLflow at "
          f"{tracking.redact(uri)}; task logs in {logdir}", flush=True)
    sink = TaskLog(tasks, logdir, sys.stdout, verbose, metrics_file=lambda name: _newest(workdir / "kfp", name))
    start, started_ms = time.perf_counter(), int(time.time() * 1000)
    try:
        with print_restored(), contextlib.redirect_stdout(sink):
            task = pipeline(tracking_uri=uri, **init)
    except RuntimeError as err:  # kfp.local: a task failed (the tail of its log is above)
        sink.close_logs()
        failed, parent = mark_failed_runs(uri, cfg.tracking.experiment, started_ms, resume_run_id)
        reason = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(err).split()))  # drop kfp's colour codes
        raise PipelineFailed(f"{reason}; MLflow run(s) {failed} marked FAILED; task logs in {logdir}; "
                             f"outputs so far in {workdir.resolve()}", parent) from None
    except KeyboardInterrupt:
        sink.close_logs()
        _, parent = mark_failed_runs(uri, cfg.tracking.experiment, started_ms, resume_run_id, "KILLED")
        raise PipelineFailed(f"interrupted; outputs so far in {workdir.resolve()}", parent) from None
    sink.close_logs()
    seconds = time.perf_counter() - start
    decision = json.loads(task.output)
    summary = {**decision, "seconds": round(seconds, 1), "tracking_uri": uri, "workdir": str(workdir.resolve()),
               "logs": str(logdir)}
    summary["text"] = format_summary(summary, cfg)
    return summary


def _newest(root: Path, kfp_name: str) -> Path | None:
    """The Metrics file task `kfp_name` wrote in the newest pipeline run under `root`."""
    found = list(root.glob(f"*/{kfp_name}/metrics"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def format_summary(s: dict, cfg: Config) -> str:
    """The run's outcome in a few lines: accuracy before → after, the promotion decision, where to look."""
    ui = (f"mlflow ui --backend-store-uri {s['tracking_uri']}" if s["tracking_uri"].startswith("sqlite")
          else f"open {s['tracking_uri']}")
    start, final, champion = s["start_accuracy"], s["challenger_accuracy"], s["champion_accuracy"]
    verdict = ("GRPO improved on it" if final > start else
               "GRPO did NOT improve on it, so nothing was promoted")
    lines = [
        "",
        f"kfp-grpo run finished in {s['seconds'] / 60:.1f} min",
        f"  held-out accuracy: start {start:.3f} → GRPO {final:.3f} ({final - start:+.3f}; {verdict})",
        f"  promotion: {cfg.promote.model_prefix}-policy v{s['policy_version']} "
        f"{'is the new champion' if s['promoted'] else 'was not promoted'} ({s['reason']})"
        + ("" if champion is None else f"; previous champion v{s['champion_version']}: {champion:.3f}"),
        *([f"  monitor: {s['reward_hacking_reason']}"] if s.get("reward_hacking") else []),
        f"  MLflow store: {s['tracking_uri']}",
        f"  local artifacts: {s['workdir']}",
        f"  browse: {ui}",
    ]
    return "\n".join(lines)
