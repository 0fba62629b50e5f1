"""`kfp-grpo run`: the same pipeline, run locally by `kfp.local` with an embedded MLflow."""

from __future__ import annotations

import builtins
import contextlib
import importlib.util
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from components import tracking
from components.config import Config
from components.io import claim_dir
from components.redaction import refuse_credentials
from pipelines.progress import TaskLog

if TYPE_CHECKING:
    from pipelines.zygote import WarmTasks


# what `kfp-grpo run` writes into its work directory (one written before the marker file holds only these)
WORKDIR_LAYOUT = ("mlflow.db", "mlartifacts", "kfp", "cache", "logs", "mlflow-server.log")


def embedded_tracking_uri(workdir: Path) -> str:
    """sqlite:///<workdir>/mlflow.db — the embedded store of local runs."""
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def prepare_tracking(cfg: Config, workdir: Path) -> str:
    """Resolve the tracking URI and create schema + experiment once, before tasks run in parallel."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri(workdir)
    refuse_credentials(uri, "$MLFLOW_TRACKING_URI")  # it becomes a run parameter, stored in the workdir
    if uri == embedded_tracking_uri(workdir):
        create_embedded_store(workdir / "mlflow.db")
    tracking.ensure_experiment(tracking.client(uri), cfg.tracking.experiment)
    return uri


def create_embedded_store(db: Path) -> None:
    """Create a new embedded store's schema in one go (if `db` does not exist yet).

    MLflow builds a new SQLite schema by running its ~100 migrations, each committed and
    fsync'ed: 5-6 s of waiting on this machine for 1 CPU-s. Here they run on a temporary file
    with SQLite's `synchronous=OFF`, which is fsync'ed once and renamed into place; MLflow
    then opens it as any existing store (it checks the schema revision). Anything unexpected:
    MLflow creates the schema itself, as before.
    """
    if db.exists():
        return
    try:
        import sqlalchemy
        from mlflow.store.db.utils import _initialize_tables
    except ImportError:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
    sqlalchemy.event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA synchronous=OFF"))
    try:
        _initialize_tables(engine)
        engine.dispose()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, db)
    except Exception:  # noqa: BLE001 — MLflow's own path below reports real problems
        engine.dispose()
        tmp.unlink(missing_ok=True)


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


class WarmTaskLaunch:
    """`warm_task_processes`' handle: the zygote (or None) and `close()` (idempotent)."""

    def __init__(self, pool: "WarmTasks | None", restore: Callable[[], None] | None):
        self.pool, self._restore = pool, restore

    def close(self) -> None:
        """Put kfp.local's launcher back and stop the zygote (killing tasks still running)."""
        restore, self._restore = self._restore, None
        if restore:
            restore()


def warm_tasks_wanted(setting: bool | None = None) -> bool:
    """Whether `kfp-grpo run` uses warm task processes: `setting`, else $KFP_GRPO_WARM_TASKS
    (`0`/`false`/`no`/`off`: plain subprocesses), else yes."""
    if setting is not None:
        return setting
    return os.environ.get("KFP_GRPO_WARM_TASKS", "1").strip().lower() not in ("0", "false", "no", "off")


def _launches_with_run_local_subprocess() -> bool:
    """Whether kfp.local's SubprocessTaskHandler.run starts a task with
    `subprocess_task_handler.run_local_subprocess(full_command, env_vars)` (kfp 2.17)."""
    import inspect

    from kfp.local import subprocess_task_handler as sth

    run = inspect.unwrap(sth.SubprocessTaskHandler.run)
    return (list(inspect.signature(sth.run_local_subprocess).parameters) == ["full_command", "env_vars"]
            and "run_local_subprocess" in run.__code__.co_names)


@contextlib.contextmanager
def warm_task_processes(log_path: Path, enabled: bool = True) -> Iterator[WarmTaskLaunch]:
    """Run this run's kfp.local tasks as children of one warm process (`pipelines/zygote.py`).

    kfp.local (2.17) starts every task with `subprocess_task_handler.run_local_subprocess(
    full_command, env_vars)`: a fresh interpreter that imports torch, transformers and mlflow
    (~5 CPU-s) and tears them down again (~2 s) around 2-5 s of compute. For the duration of
    the run that one function is replaced by one that hands the same command to the zygote,
    which forks a child that runs it (same executor, argv, environment and directory) and
    returns its exit code; kfp.local's own function still runs any command the zygote does not
    reproduce, and every task once the zygote is gone. Applied only where kfp has that
    function with that signature, called from `SubprocessTaskHandler.run`; the cluster pipeline
    is unaffected (one pod per task). The zygote's own output is appended to `log_path`.
    """
    from pipelines.zygote import WarmTasks

    if not enabled:
        yield WarmTaskLaunch(None, None)
        return
    pool, why = WarmTasks.start(log_path)  # first: it imports while kfp is probed here
    if pool is not None and not _launches_with_run_local_subprocess():
        pool.close()
        pool, why = None, "kfp.local launches tasks differently than kfp 2.17"
    if pool is None:
        print(f"kfp-grpo: warm task processes are off ({why}); tasks run as plain subprocesses",
              file=sys.stderr, flush=True)
        yield WarmTaskLaunch(None, None)
        return
    from kfp.local import subprocess_task_handler as sth

    plain = sth.run_local_subprocess

    def run_local_subprocess(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        code = pool.run(full_command, env_vars)
        return plain(full_command=full_command, env_vars=env_vars) if code is None else code

    def restore() -> None:
        sth.run_local_subprocess = plain
        pool.close()

    sth.run_local_subprocess = run_local_subprocess
    launch = WarmTaskLaunch(pool, restore)
    try:
        yield launch
    finally:
        launch.close()


@contextlib.contextmanager
def cache_hits_reported(sink: TaskLog) -> Iterator[None]:
    """Tell `sink` about every task kfp.local took from its cache instead of running it.

    kfp.local (2.17) logs a cache hit at INFO, but that line does not reach its log stream; a
    task that succeeded without printing "Executing task" is the same fact, read from
    `task_executor.execute_single_task` (wrapped for this run only).
    """
    from kfp.local import status
    from kfp.local.orchestrator import task_executor

    execute = task_executor.execute_single_task

    def reporting(*args, **kwargs):
        name = kwargs.get("task_name", "")
        before = sink.starts.get(name, 0)
        outputs, result = execute(*args, **kwargs)
        if result == status.Status.SUCCESS and sink.starts.get(name, 0) == before:
            sink.cached(name)
        return outputs, result

    task_executor.execute_single_task = reporting
    try:
        yield
    finally:
        task_executor.execute_single_task = execute


@contextlib.contextmanager
def kfp_globals_restored() -> Iterator[None]:
    """Put `builtins.print` and the root logger's handlers and level back afterwards.

    kfp.local (2.17) indents each task's output by swapping `builtins.print` in and out, and gives
    each task a root-logger handler on the current stdout, putting back the handlers it found; two
    tasks running at once (rollout shards) can restore in the wrong order and leave print indenting
    every later print of this process (the `--json` summary included) and a handler writing to this
    run's closed terminal sink (every later log record of the process then fails to print).
    """
    original, root = builtins.print, logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        builtins.print = original
        root.handlers[:] = handlers
        root.setLevel(level)


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
              verbose: bool = False, runner: object = None, warm_tasks: bool | None = None) -> dict:
    """Compile-and-run the pipeline with kfp.local's SubprocessRunner; return a summary.

    Task outputs are cached under `<workdir>/cache`; `resume_run_id` (an interrupted run's
    MLflow parent run, same workdir and config) reruns only the tasks that did not complete.
    The terminal gets one line per task (`pipelines.progress`); each task's output goes to
    `<workdir>/logs/<time>/<task>.log` (`verbose`: to the terminal as well).
    `runner`: another kfp.local runner (pipelines/containers.py: every task in its image). With
    the default runner, tasks run as children of a warm process (`warm_task_processes`) unless
    `warm_tasks` (default: $KFP_GRPO_WARM_TASKS) says no.
    """
    from pipelines.parent_run import ResumeError

    if resume_run_id and not (cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")) \
            and not (workdir / "mlflow.db").is_file():  # before anything is created there
        raise ResumeError(f"cannot resume run {resume_run_id}: {workdir} holds no MLflow store (mlflow.db); "
                          "resume with the --workdir of the interrupted run")
    given = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if given:  # a URI that cannot be used fails before the work directory is created
        refuse_credentials(given, "$MLFLOW_TRACKING_URI" if not cfg.tracking.tracking_uri else "tracking.tracking_uri")
        tracking.client(given)  # its scheme, and a server that answers
    claim_dir(workdir, "--workdir", WORKDIR_LAYOUT)
    logdir = workdir.resolve() / "logs" / time.strftime("%Y%m%d-%H%M%S")
    logdir.mkdir(parents=True, exist_ok=True)
    # first: the warm process imports torch & co. while this one compiles the pipeline
    warm = runner is None and warm_tasks_wanted(warm_tasks)
    with warm_task_processes(logdir / "run.log", warm) as launch:
        return _run_pipeline(cfg, workdir, logdir, init, resume_run_id, verbose, launch, runner)


def _run_pipeline(cfg: Config, workdir: Path, logdir: Path, init: dict[str, str], resume_run_id: str,
                  verbose: bool, launch: WarmTaskLaunch, runner: object = None) -> dict:
    """`run_local`'s body, with its log directory and task launcher."""
    from kfp import local

    from pipelines.pipeline import build_pipeline
    from pipelines.parent_run import reopen_parent_run

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "Creating initial MLflow database tables..."
    uri = prepare_tracking(cfg, workdir)
    if resume_run_id:
        reopen_parent_run(tracking.client(uri), cfg, resume_run_id, reopen=False)  # a clear error before any task
    # Expected locally: cluster placement is ignored and the project image is this environment.
    warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner.*")
    warnings.filterwarnings("ignore", message=r".*custom or non-Python base image.*")
    keep_upstream_parameters_in_loops()  # rollout.shards > 1: the shards need the parent run id
    local.init(runner=runner or local.SubprocessRunner(use_venv=False), pipeline_root=str((workdir / "kfp").resolve()),
               raise_on_error=True, enable_caching=True, cache_root=str((workdir / "cache").resolve()))
    pipeline = build_pipeline(cfg, resume_run_id=resume_run_id, caching=True)
    tasks = task_names(pipeline)
    print(f"kfp-grpo: running pipeline '{cfg.name}' locally: {sum(r for *_, r in tasks.values())} tasks "
          f"({cfg.loop.iterations} iterations × {cfg.loop.steps_per_iteration} rounds"
          f"{' in memory' if cfg.loop.warm_engine else ''}); MLflow at "
          f"{tracking.redact(uri)}; task logs in {logdir}", flush=True)
    sink = TaskLog(tasks, logdir, sys.stdout, verbose, metrics_file=lambda name: _newest(workdir / "kfp", name))
    start, started_ms = time.perf_counter(), int(time.time() * 1000)
    try:
        with kfp_globals_restored(), cache_hits_reported(sink), contextlib.redirect_stdout(sink):
            task = pipeline(tracking_uri=uri, **init)
    except RuntimeError as err:  # kfp.local: a task failed (the tail of its log is above)
        sink.close_logs()
        failed, parent = mark_failed_runs(uri, cfg.tracking.experiment, started_ms, resume_run_id)
        reason = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(err).split()))  # drop kfp's colour codes
        raise PipelineFailed(f"{reason}; MLflow run(s) {failed} marked FAILED; task logs in {logdir}; "
                             f"outputs so far in {workdir.resolve()}", parent) from None
    except KeyboardInterrupt:
        launch.close()  # the tasks still running end first: nothing writes to MLflow after this
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
    ui = s.get("browse") or (f"mlflow ui --backend-store-uri {s['tracking_uri']}"
                             if s["tracking_uri"].startswith("sqlite") else f"open {s['tracking_uri']}")
    if ui.startswith("mlflow ui") and importlib.util.find_spec("flask") is None:
        ui = f"pip install mlflow && {ui}"  # kfp-grpo needs only mlflow-skinny; the UI is mlflow's
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
