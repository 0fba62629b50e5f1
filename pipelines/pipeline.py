"""The iterative GRPO pipeline (DeepSeekMath Algorithm 1) as a KFP v2 pipeline.

The outer loop is unrolled at compile time (KFP v2 has no recursion and ParallelFor
carries no state): I iterations, each M rounds of rollout → GRPO update, then RM
replay retraining and a held-out evaluation. Cluster placement comes from the config
through kfp-kubernetes; local runs ignore it.
"""


import contextvars
from typing import Callable

from kfp import dsl, kubernetes

from components.config import Config, StageResources
from pipelines.components import make_components
from pipelines.trainer_job import launcher_placement

MLFLOW_CLIENT_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID",
                      "AWS_SECRET_ACCESS_KEY")
MLFLOW_CONFIG_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_EXPERIMENT_NAME")


# Local runs (`kfp-grpo run`) cache task outputs so that `--resume` skips completed tasks. A
# cache hit needs identical inputs, and every task takes the run's own parent_run_id, so
# different runs never share a cache entry; start-tracking (which yields that id) never caches.
# Compiled/cluster pipelines keep caching off (runs must retrain; KFP's retry resumes a run).
_CACHING: contextvars.ContextVar[bool] = contextvars.ContextVar("kfp_grpo_caching", default=False)


def place(task: dsl.PipelineTask, cfg: Config, stage: str, name: str) -> dsl.PipelineTask:
    """Apply the stage's placement from the config (caching: off, except in local runs, see _CACHING)."""
    r: StageResources = cfg.cluster.resources(stage)
    task.set_display_name(name)
    task.set_caching_options(_CACHING.get() and name != "start-tracking")
    if r.cpu_request:
        task.set_cpu_request(r.cpu_request)
    if r.memory_request:
        task.set_memory_request(r.memory_request)
    if r.cpu_limit:
        task.set_cpu_limit(r.cpu_limit)
    if r.memory_limit:
        task.set_memory_limit(r.memory_limit)
    if r.accelerator_limit:
        task.set_accelerator_type(r.accelerator_type or "nvidia.com/gpu")
        task.set_accelerator_limit(r.accelerator_limit)
    for key, value in r.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    for t in r.tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    if r.shm_size:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=r.shm_size)
    if r.retries:
        task.set_retry(num_retries=r.retries, backoff_duration="30s", backoff_factor=2.0)
    if r.timeout_seconds:
        kubernetes.set_timeout(task, r.timeout_seconds)
    c = cfg.cluster
    if c.mlflow_secret:
        kubernetes.use_secret_as_env(task, c.mlflow_secret, {k: k for k in MLFLOW_CLIENT_KEYS}, optional=True)
    if c.config_map:
        kubernetes.use_config_map_as_env(task, c.config_map, {k: k for k in MLFLOW_CONFIG_KEYS}, optional=True)
    if c.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, c.image_pull_secrets)
    return task


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
    I, M, shards = cfg.loop.iterations, cfg.loop.steps_per_iteration, cfg.rollout.shards
    # grpo.nodes > 1: the update task only submits a Trainer job and waits (a CPU pod, not a GPU one)
    update_stage = "grpo_update" if cfg.grpo.nodes == 1 else "prepare_data"

    @dsl.pipeline(name=cfg.name, description="Iterative GRPO: SFT → RM → I × (M × (rollout → update) → RM replay "
                                             "→ eval) → promote, tracked in MLflow")
    def grpo_pipeline(tracking_uri: str = "", init_policy_uri: str = "", init_reward_uri: str = "") -> str:
        resume = {"resume_run_id": resume_run_id} if resume_run_id else {}
        start = place(ops.start_tracking(config=config, tracking_uri=tracking_uri, init_policy_uri=init_policy_uri,
                                         **resume), cfg, "prepare_data", "start-tracking")
        shared = dict(config=config, parent_run_id=start.output, tracking_uri=tracking_uri)
        data = place(ops.prepare_data(**shared), cfg, "prepare_data", "prepare-data")
        train, test = data.outputs["train"], data.outputs["test"]
        sft = place(ops.sft(**shared, init_policy_uri=init_policy_uri, train=train), cfg, "sft", "sft")
        sft_policy = sft.outputs["model"]
        sft_eval = place(ops.evaluate(**shared, step=0, test=test, policy=sft_policy), cfg, "evaluate", "evaluate-sft")
        rm_task = place(ops.reward_model(**shared, init_reward_uri=init_reward_uri, train=train, policy=sft_policy),
                        cfg, "reward_model", "reward-model")
        policy, rm, history = sft_policy, rm_task.outputs["reward_model"], rm_task.outputs["rm_data"]
        accuracy = sft_eval.outputs["Output"]
        step = 0
        for it in range(I):
            reference = policy if cfg.grpo.reference == "iteration" else sft_policy
            for m in range(M):
                rollouts = rollout_round(ops, cfg, shared, step, f"{it}.{m}", train, policy, rm, shards)
                update = place(ops.grpo_update(**shared, step=step, rollouts=rollouts, policy=policy,
                                               reference=reference), cfg, update_stage, f"grpo-update-i{it}-m{m}")
                if cfg.grpo.nodes > 1:
                    launcher_placement(update, cfg)
                policy, step = update.outputs["new_policy"], step + 1
            replay = place(ops.rm_replay(**shared, iteration=it, rollouts=rollouts, reward_model=rm,
                                         history=history), cfg, "rm_replay", f"rm-replay-i{it}")
            replay.after(update)  # Algorithm 1: r_φ is retrained after the iteration's last policy update
            rm, history = replay.outputs["new_reward_model"], replay.outputs["buffer"]
            ev = place(ops.evaluate(**shared, step=it + 1, test=test, policy=policy), cfg, "evaluate",
                       f"evaluate-i{it}")
            accuracy = ev.outputs["Output"]
        promote = place(ops.promote(**shared, accuracy=accuracy, sft_accuracy=sft_eval.outputs["Output"],
                                    policy=policy, reward_model=rm, buffer=history, test=test),
                        cfg, "promote", "promote")
        return promote.outputs["Output"]

    return grpo_pipeline


def rollout_round(ops, cfg: Config, common: dict, step: int, version: str, prompts, policy, rm, shards: int):
    """One round's rollouts: a single task, or `shards` parallel tasks gathered into one dataset."""
    it_m = version.replace(".", "-m")
    if shards == 1:
        task = ops.rollout(**common, step=step, policy_version=version, shard=0, prompts=prompts, policy=policy,
                           reward_model=rm)
        return place(task, cfg, "rollout", f"rollout-i{it_m}").outputs["rollouts"]
    with dsl.ParallelFor(list(range(shards)), name=f"rollout-shards-i{it_m}") as shard:
        task = ops.rollout(**common, step=step, policy_version=version, shard=shard, prompts=prompts, policy=policy,
                           reward_model=rm)
        place(task, cfg, "rollout", f"rollout-i{it_m}-shard")
    gathered = ops.gather_rollouts(**common, step=step, shards=dsl.Collected(task.outputs["rollouts"]))
    # a Parquet concat: placed like the other light CPU tasks, not on a GPU node like the shards
    return place(gathered, cfg, "prepare_data", f"gather-rollouts-i{it_m}").outputs["rollouts"]


def compile_pipeline(cfg: Config, path: str) -> str:
    """Write the pipeline's IR YAML (with the kubernetes platform spec) to `path`."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(cfg), package_path=path)
    return path
