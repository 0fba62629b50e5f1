"""Run the plan in this process: every task of `pipelines.plan.algorithm1`, in order, with paths.

The same tasks, wiring, task wrappers (`pipelines.runtime`) and MLflow records as a
`kfp-grpo run`, without a process per task: what the learning test and the benchmarks
use. Outputs go to `<workdir>/<task name>/<output name>`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from components import evaluate, grpo_update, prepare_data, rm_replay, rollout
from components.config import Config
from pipelines import parent_run, rounds, runtime, warm_start
from pipelines.local import prepare_tracking
from pipelines.plan import VALUE_METRICS, Ref, Task, algorithm1, producers


def _stage(run_fn: Callable[..., dict]) -> Callable[..., dict]:
    def task(name: str, config: str, parent: str, uri: str, **kwargs: Any) -> dict:
        return runtime.run_task(run_fn, name, config, parent, uri, None, **kwargs)
    return task


def _sharded_rollout(name: str, config: str, parent: str, uri: str, rollouts: str, **kwargs: Any) -> dict:
    """The shards of a round one after the other, then gathered, as the pipeline's ParallelFor does."""
    shards = runtime.setup(config).rollout.shards
    paths = [f"{rollouts}.shard-{k}" for k in range(shards)]
    for k, path in enumerate(paths):
        runtime.run_task(rollout.run, f"{name}-shard", config, parent, uri, None, rollouts=path, shard=k, **kwargs)
    runtime.gather(config, parent, uri, kwargs["step"], paths, rollouts)
    return {}


TASKS: dict[str, Callable[..., dict]] = {
    "prepare_data": _stage(prepare_data.run),
    "sft": lambda name, config, parent, uri, **kw: warm_start.sft_task(name, config, parent, uri, None, "", **kw),
    "reward_model": lambda name, config, parent, uri, **kw: warm_start.reward_model_task(name, config, parent, uri,
                                                                                      None, "", **kw),
    "evaluate": _stage(evaluate.run),
    "rollout": _stage(rollout.run),
    "grpo_update": _stage(grpo_update.run),
    "grpo_rounds": lambda name, config, parent, uri, **kw: rounds.rounds_task(name, config, parent, uri, None, **kw),
    "rm_replay": _stage(rm_replay.run),
    "promote": lambda name, config, parent, uri, **kw: parent_run.promote_task(name, config, parent, uri, None, **kw),
}


def run_in_process(cfg: Config, workdir: Path, tracking_uri: str | None = None,
                   on_task: Callable[[Task, dict, float], None] | None = None,
                   reuse: tuple[Path, dict[str, dict]] | None = None) -> dict:
    """Run every task of the plan for `cfg`; returns {"results": {task: metrics}, "seconds": ...}.

    Tracking: `tracking_uri`, else the config's / $MLFLOW_TRACKING_URI, else an embedded store in
    `workdir`. `on_task(task, metrics, seconds)` is called after each task. `reuse`: (the workdir of
    an earlier run, {task name: its metrics}): those tasks are not run again, their outputs are read
    from that workdir (the benchmarks: one SFT and reward model for several variants of the loop;
    the caller vouches that their settings are the same).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or prepare_tracking(cfg, workdir)
    config = cfg.to_json()
    tasks = algorithm1(cfg)
    producers(tasks)
    start = time.perf_counter()
    parent = parent_run.start_parent_run(config, uri)
    values: dict[Ref, Any] = {}

    def value(v: Ref | tuple[Ref, ...]) -> Any:
        return [values[r] for r in v] if isinstance(v, tuple) else values[v]

    results: dict[str, dict] = {}
    for t in tasks:
        began = time.perf_counter()
        if reuse and t.name in reuse[1]:
            outputs = {o: str(Path(reuse[0]) / t.name / o) for o in t.outputs}
            results[t.name] = dict(reuse[1][t.name])
        else:
            outputs = {o: str(workdir / t.name / o) for o in t.outputs}
            run = _sharded_rollout if t.stage == "rollout" and cfg.rollout.shards > 1 else TASKS[t.stage]
            results[t.name] = run(t.name, config, parent, uri, **{k: value(v) for k, v in t.inputs.items()},
                                  **outputs, **t.params)
        values.update({Ref(t.name, o): path for o, path in outputs.items()})
        values.update({Ref(t.name, o): results[t.name][metric]
                       for (stage, o), metric in VALUE_METRICS.items() if stage == t.stage})
        if on_task:
            on_task(t, results[t.name], time.perf_counter() - began)
    return {"results": results, "seconds": time.perf_counter() - start, "parent_run_id": parent,
            "tracking_uri": uri}

