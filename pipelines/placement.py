"""Where each task runs on a cluster: the config's `cluster.stages.<stage>` as kfp-kubernetes settings.

Local runs (`kfp.local`) ignore all of it; the compiled pipeline carries it.
"""

from __future__ import annotations

from kfp import dsl, kubernetes

from components.config import MLFLOW_CLIENT_KEYS, MLFLOW_CONFIG_KEYS, Config, StageResources


def place(task: dsl.PipelineTask, cfg: Config, stage: str, name: str, caching: bool = False) -> dsl.PipelineTask:
    """Name the task and apply the placement of `stage` from the config: resources, accelerators,
    node selectors, tolerations, /dev/shm, retries, timeout, the MLflow Secret/ConfigMap as env."""
    r: StageResources = cfg.cluster.resources(stage)
    task.set_display_name(name)
    task.set_caching_options(caching)
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


def stage_placed_as(cfg: Config, stage: str) -> str:
    """The stage whose `cluster.stages` entry (resources, image) a task of `stage` takes: with grpo.nodes > 1
    the update task only submits a Trainer job and waits (a light CPU pod, placed like prepare_data); an
    iteration's rounds in one task (`loop.warm_engine`) go where the sampler and the trainer both fit: the
    update's GPU pod, or the rollout's (its image has vLLM) with the vllm backend."""
    if stage == "grpo_update" and cfg.grpo.nodes > 1:
        return "prepare_data"
    if stage == "grpo_rounds":
        return "rollout" if cfg.rollout.backend == "vllm" else "grpo_update"
    return stage


def trainer_job_launcher(task: dsl.PipelineTask, cfg: Config) -> None:
    """KFP settings of a grpo_update task that only submits a TrainJob (grpo.nodes > 1, see
    `pipelines.trainer_job`): the shared PVC and a timeout longer than the job's."""
    tj = cfg.grpo.trainer_job
    kubernetes.mount_pvc(task, pvc_name=tj.shared_pvc, mount_path=tj.shared_mount_path)
    kubernetes.set_timeout(task, tj.timeout_seconds + 600)
