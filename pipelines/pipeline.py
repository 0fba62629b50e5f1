"""The iterative GRPO pipeline (DeepSeekMath Algorithm 1) as a KFP v2 pipeline.

One KFP task per task of the plan (`pipelines.plan.algorithm1`), in front of them
`start-tracking`, which opens the MLflow parent run every task logs under. The outer
loop is unrolled at compile time (KFP v2 has no recursion and ParallelFor carries no
state). Cluster placement comes from the config through kfp-kubernetes; local runs ignore it.
"""


import contextvars
import inspect
from typing import Any, Callable

from kfp import dsl

from components.config import Config, run_time_parameters
from pipelines import placement
from pipelines.kfp_components import make_components
from pipelines.plan import Ref, algorithm1, producers

# Local runs (`kfp-grpo run`) cache task outputs so that `--resume` skips completed tasks. A
# cache hit needs identical inputs, and every task takes the run's own parent_run_id, so
# different runs never share a cache entry; start-tracking (which yields that id) never caches.
# Compiled/cluster pipelines keep caching off (runs must retrain; KFP's retry resumes a run).
_CACHING: contextvars.ContextVar[bool] = contextvars.ContextVar("kfp_grpo_caching", default=False)


def place(task: dsl.PipelineTask, cfg: Config, stage: str, name: str) -> dsl.PipelineTask:
    """Name the task and apply its stage's placement (caching: off, except in local runs, see _CACHING)."""
    return placement.place(task, cfg, stage, name, caching=_CACHING.get() and name != "start-tracking")


def build_pipeline(cfg: Config, resume_run_id: str = "", caching: bool = False) -> Callable:
    """The pipeline function for `cfg` (loop sizes and stage settings are compile-time).

    `caching`/`resume_run_id`: local runs only (`kfp-grpo run [--resume ID]`), see _CACHING.
    """
    token = _CACHING.set(caching)
    try:
        return _build_pipeline(cfg, resume_run_id)
    finally:
        _CACHING.reset(token)


def _build_pipeline(cfg: Config, resume_run_id: str) -> Callable:
    ops = make_components(cfg)
    config = cfg.to_json()
    tasks = algorithm1(cfg)
    producers(tasks)  # names unique, references backwards
    # KFP has no fan-in of artifacts from different tasks: a list of rounds (rm-replay's input) is
    # handed from each round's task to the next as `iteration_rollouts`; `earlier[t]` is t's predecessor.
    earlier = {ref.task: prev.task for t in tasks for value in t.inputs.values() if isinstance(value, tuple)
               for prev, ref in zip(value, value[1:])}

    def grpo_pipeline(tracking_uri: str = "", init_policy_uri: str = "", init_reward_uri: str = "",
                      **settings: Any) -> str:
        resume = {"resume_run_id": resume_run_id} if resume_run_id else {}
        start = place(ops.start_tracking(config=config, settings=settings, tracking_uri=tracking_uri,
                                         init_policy_uri=init_policy_uri, **resume), cfg, "prepare_data",
                      "start-tracking")
        shared = dict(config=start.outputs["config"], parent_run_id=start.outputs["parent_run_id"],
                      tracking_uri=tracking_uri)
        init = {"sft": {"init_policy_uri": init_policy_uri}, "reward_model": {"init_reward_uri": init_reward_uri}}
        made: dict[str, dsl.PipelineTask] = {}

        def arg(value: Ref | tuple[Ref, ...]):
            if isinstance(value, tuple):  # every round so far, accumulated by the last one
                return made[value[-1].task].outputs["iteration_rollouts"]
            return made[value.task].outputs[value.output]

        for t in tasks:
            kwargs = {**shared, **init.get(t.stage, {}), **t.params, **{k: arg(v) for k, v in t.inputs.items()}}
            if t.name in earlier:
                kwargs["earlier_rollouts"] = made[earlier[t.name]].outputs["iteration_rollouts"]
            if t.stage == "rollout" and cfg.rollout.shards > 1:
                task = sharded_rollout(ops, cfg, t.name, kwargs)
            else:
                task = place(getattr(ops, t.stage)(name=t.name, **kwargs), cfg,
                             placement.stage_placed_as(cfg, t.stage), t.name)
            if t.stage == "grpo_update" and cfg.grpo.nodes > 1:
                placement.trainer_job_launcher(task, cfg)
            for name in t.after:
                task.after(made[name])
            made[t.name] = task
        return made[tasks[-1].name].outputs["Output"]

    return dsl.pipeline(name=cfg.name, description="Iterative GRPO: SFT → RM → I × (M × (rollout → update) → RM "
                                                   "replay → eval) → promote, tracked in MLflow")(
        with_parameters(grpo_pipeline, run_time_parameters(cfg)))


def with_parameters(body: Callable, settings: dict[str, tuple[type, Any]]) -> Callable:
    """`body` with the run-time settings as named, typed pipeline parameters (defaults: the compiled
    config's values), which KFP shows in its "Create run" form; `body` gets them as **settings."""
    fixed = ("tracking_uri", "init_policy_uri", "init_reward_uri")

    def pipeline(*args: Any, **kwargs: Any) -> str:
        kwargs.update(zip(fixed + tuple(settings), args))
        return body(**{k: kwargs.pop(k) for k in fixed if k in kwargs}, **kwargs)

    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default="", annotation=str)
              for name in fixed]
    params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=kind)
               for name, (kind, default) in settings.items()]
    pipeline.__signature__ = inspect.Signature(params, return_annotation=str)
    pipeline.__annotations__ = {p.name: p.annotation for p in params} | {"return": str}
    pipeline.__name__ = pipeline.__qualname__ = "grpo_pipeline"
    pipeline.__doc__ = body.__doc__
    return pipeline


def sharded_rollout(ops, cfg: Config, name: str, kwargs: dict) -> dsl.PipelineTask:
    """One round's rollouts as `rollout.shards` parallel tasks, gathered into one dataset."""
    earlier = kwargs.pop("earlier_rollouts", None)
    with dsl.ParallelFor(list(range(cfg.rollout.shards)), name=name.replace("rollout-", "rollout-shards-")) as shard:
        task = place(ops.rollout(name=f"{name}-shard", shard=shard, **kwargs), cfg, "rollout", f"{name}-shard")
    gathered = ops.gather_rollouts(config=kwargs["config"], parent_run_id=kwargs["parent_run_id"],
                                   tracking_uri=kwargs["tracking_uri"], step=kwargs["step"],
                                   shards=dsl.Collected(task.outputs["rollouts"]),
                                   **({"earlier_rollouts": earlier} if earlier is not None else {}))
    # a Parquet concat: placed like the other light CPU tasks, not on a GPU node like the shards
    return place(gathered, cfg, "prepare_data", name.replace("rollout-", "gather-rollouts-"))


def compile_pipeline(cfg: Config, path: str) -> str:
    """Write the pipeline's IR YAML (with the kubernetes platform spec) to `path`."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(cfg), package_path=path)
    return path
