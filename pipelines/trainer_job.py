"""The GRPO update across nodes: a Kubeflow Trainer v2 TrainJob, submitted from the pipeline task.

With `grpo.nodes > 1` the pipeline's grpo_update task does not train: it copies its inputs
to a shared volume, creates a `TrainJob` (trainer.kubeflow.org/v1alpha1) that runs
``torchrun --nnodes=N --nproc-per-node=P -m components.grpo_update ...`` on N nodes with P
GPUs each (the same stage and the same `components.grpo` loss as everywhere else; see
`components.distributed`), waits for it, and copies the new policy back into its KFP output.
With `grpo.nodes == 1` the task runs the stage in its own pod as before (one process, or
torchrun over `grpo.nproc_per_node` GPUs).

Cluster prerequisites (none of them is created by this project):
- Kubeflow Trainer v2.3 or later (the `runtimePatches` API) with its controller and JobSet
  installed, and the ClusterTrainingRuntime named by `grpo.trainer_job.runtime`
  (default `torch-distributed`, shipped with Trainer). Its torch plugin sets the
  ``PET_NNODES``/``PET_NODE_RANK``/``PET_MASTER_ADDR``/``PET_MASTER_PORT`` environment that
  torchrun reads for the rendezvous.
- RBAC: the pipeline's ServiceAccount (`cluster.service_account`) may `create`, `get` and
  `delete` `trainjobs.trainer.kubeflow.org` in the namespace (the Helm chart grants it with
  `pipeline.rbac.trainJobs: true`).
- A ReadWriteMany PVC (`grpo.trainer_job.shared_pvc`, e.g. NFS/CephFS/EFS/Filestore) in that
  namespace, mounted at `grpo.trainer_job.shared_mount_path` in the pipeline task and in every
  trainer node: KFP artifacts are local paths of the task pod, the trainer pods cannot see them.
- GPU nodes that fit `cluster.stages.grpo_update` (accelerator type, node selector,
  tolerations) N times, and the `kfp-grpo-mlflow-client` Secret / `kfp-grpo-config`
  ConfigMap in the namespace (rank 0 logs the per-step metrics to MLflow).

Status: the manifest and the create/wait/delete calls are tested against a local fake of the
Kubernetes API; no TrainJob has been run on a real cluster by this project yet.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from components.config import MLFLOW_CLIENT_KEYS, MLFLOW_CONFIG_KEYS, Config

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
MANAGER = "kfp-grpo"
SHARED_VOLUME = "kfp-grpo-shared"
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DONE_CONDITIONS = ("Complete", "Completed", "Succeeded")


class TrainJobFailed(RuntimeError):
    """The TrainJob reported a Failed condition (its reason and message are in the text)."""


# --------------------------------------------------------------------------- manifest
def job_name(step: int) -> str:
    """A unique RFC 1035 name (<= 63 chars) for the update of round `step`."""
    return f"kfp-grpo-update-s{step}-{uuid.uuid4().hex[:8]}"


def _env(cfg: Config, extra: dict[str, str]) -> list[dict[str, Any]]:

    c = cfg.cluster
    env: list[dict[str, Any]] = []  # names are unique (a list-map): `extra` wins over the Secret/ConfigMap
    if c.mlflow_secret:
        env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": c.mlflow_secret, "key": k, "optional": True}}}
                for k in MLFLOW_CLIENT_KEYS if k not in extra]
    if c.config_map:
        env += [{"name": k, "valueFrom": {"configMapKeyRef": {"name": c.config_map, "key": k, "optional": True}}}
                for k in MLFLOW_CONFIG_KEYS if k not in extra]
    env += [{"name": k, "value": v} for k, v in extra.items()]
    return env


def _resources(cfg: Config) -> dict[str, Any]:
    r = cfg.cluster.resources("grpo_update")
    requests = {k: v for k, v in (("cpu", r.cpu_request), ("memory", r.memory_request)) if v}
    limits = {k: v for k, v in (("cpu", r.cpu_limit), ("memory", r.memory_limit)) if v}
    limits[r.accelerator_type or "nvidia.com/gpu"] = str(cfg.grpo.nproc_per_node)
    return {"requests": requests, "limits": limits}


def build_trainjob(cfg: Config, name: str, namespace: str, command: list[str],
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """The TrainJob manifest: N nodes × P GPUs running `command`, the shared PVC mounted everywhere."""
    g, c = cfg.grpo, cfg.cluster
    r = c.resources("grpo_update")
    tj = g.trainer_job
    volumes: list[dict[str, Any]] = [{"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": tj.shared_pvc}}]
    mounts: list[dict[str, Any]] = [{"name": SHARED_VOLUME, "mountPath": tj.shared_mount_path}]
    if r.shm_size:  # NCCL and data loaders want a large /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": r.shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    pod: dict[str, Any] = {"volumes": volumes, "containers": [{"name": "node", "volumeMounts": mounts}]}
    if r.node_selector:
        pod["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in r.tolerations]
    if c.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in c.image_pull_secrets]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "kfp-grpo", "app.kubernetes.io/component": "grpo-update",
                                "app.kubernetes.io/managed-by": MANAGER}},
        "spec": {
            "runtimeRef": {"name": tj.runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "activeDeadlineSeconds": tj.timeout_seconds,
            "trainer": {
                "image": getattr(c.images, r.image),
                "command": command,
                "env": _env(cfg, env or {}),
                "numNodes": g.nodes,
                "numProcPerNode": g.nproc_per_node,
                "resourcesPerNode": _resources(cfg),
            },
            "runtimePatches": [{
                "manager": MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                    {"name": "node", "template": {"spec": {"template": {"spec": pod}}}},
                ]}}},
            }],
        },
    }


# --------------------------------------------------------------------------- create and wait
def custom_objects_api(api_client=None):
    """CustomObjectsApi: in-cluster credentials in a pod, else the local kubeconfig."""
    from kubernetes import client, config

    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api_client = client.ApiClient()
    return client.CustomObjectsApi(api_client)


def condition(obj: dict[str, Any], types: tuple[str, ...]) -> dict[str, Any] | None:
    """The first status condition of one of `types` whose status is "True"."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") in types and str(c.get("status")) == "True":
            return c
    return None


def create_and_wait(manifest: dict[str, Any], api=None, timeout_s: float = 86400, poll_s: float = 15.0,
                    sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Create the TrainJob, poll it until a Complete or Failed condition; return the final object.

    Failed → `TrainJobFailed` with the condition's reason and message. No verdict within
    `timeout_s` → the TrainJob is deleted (its pods hold GPUs) and `TimeoutError` is raised.
    """
    api = api or custom_objects_api()
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, manifest)
    log(f"[trainer-job] created TrainJob {ns}/{name}: {manifest['spec']['trainer']['numNodes']} nodes × "
        f"{manifest['spec']['trainer']['numProcPerNode']} processes")
    deadline = time.monotonic() + timeout_s
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        if condition(obj, DONE_CONDITIONS):
            log(f"[trainer-job] TrainJob {ns}/{name} completed")
            return obj
        failed = condition(obj, ("Failed",))
        if failed:
            raise TrainJobFailed(f"TrainJob {ns}/{name} failed: {failed.get('reason', '')}: "
                                 f"{failed.get('message', '')} (kubectl -n {ns} describe trainjob {name})")
        if time.monotonic() >= deadline:
            api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, propagation_policy="Foreground")
            raise TimeoutError(f"TrainJob {ns}/{name} did not finish within {timeout_s:.0f} s; it was deleted")
        sleep(poll_s)


# --------------------------------------------------------------------------- the pipeline task
def current_namespace(cfg: Config) -> str:
    ns = cfg.grpo.trainer_job.namespace
    if ns:
        return ns
    if Path(NAMESPACE_FILE).exists():
        return Path(NAMESPACE_FILE).read_text().strip()
    raise ValueError("grpo.trainer_job.namespace is not set and this is not a pod (no service account namespace)")


def _copy(src: str, dst: Path) -> None:
    shutil.copytree(src, dst) if Path(src).is_dir() else shutil.copy(src, dst)


def run_multinode(cfg: Config, rollouts: str | list[str], policy: str, reference: str | None, new_policy: str,
                  step: int = 0, mlflow_run_id: str | None = None, api=None, **wait_kw) -> dict:
    """Stage the inputs on the shared volume, run the TrainJob, bring the new policy back; return its metrics.

    The arguments are those of `components.grpo_update.run`.
    """
    from components.artifacts import as_paths
    from components import grpo_update
    from components.distributed import METRICS_ENV, RUN_ID_ENV, torchrun_command
    from components.stage_cli import stage_argv
    from components.io import atomic_path

    g = cfg.grpo
    tj = g.trainer_job
    name = job_name(step)
    work = Path(tj.shared_mount_path) / name
    if not Path(tj.shared_mount_path).is_dir():
        raise FileNotFoundError(f"grpo.trainer_job.shared_mount_path {tj.shared_mount_path} is not mounted "
                                f"(PVC {tj.shared_pvc})")
    (work / "rollouts").mkdir(parents=True)
    shared_rollouts = []
    for i, p in enumerate(as_paths(rollouts)):
        shared_rollouts.append(str(work / "rollouts" / f"{i}.parquet"))
        _copy(p, Path(shared_rollouts[-1]))
    _copy(policy, work / "policy")
    shared_ref = None
    if reference and reference != policy and g.beta > 0:
        _copy(reference, work / "reference")
        shared_ref = str(work / "reference")
    env = {METRICS_ENV: str(work / "metrics.json")}
    if mlflow_run_id:  # rank 0 logs the per-step metrics into the task's MLflow run
        import mlflow

        env[RUN_ID_ENV] = mlflow_run_id
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    stage_args = stage_argv(grpo_update.run, rollouts=shared_rollouts, policy=str(work / "policy"),
                            reference=shared_ref, new_policy=str(work / "out"), step=step)
    command = torchrun_command(cfg, stage_args, g.nproc_per_node, g.nodes, launcher=["torchrun"])
    manifest = build_trainjob(cfg, name, current_namespace(cfg), command, env)
    wait_kw.setdefault("timeout_s", tj.timeout_seconds)
    wait_kw.setdefault("poll_s", tj.poll_seconds)
    create_and_wait(manifest, api, **wait_kw)
    if not (work / "metrics.json").exists() or not (work / "out").is_dir():
        raise TrainJobFailed(f"TrainJob {name} completed but left no policy/metrics in {work}")
    metrics = json.loads((work / "metrics.json").read_text())
    with atomic_path(new_policy) as tmp:
        shutil.copytree(work / "out", tmp, dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def run_multinode_tracked(cfg: Config, **kwargs: Any) -> dict:
    """`run_multinode` inside the task's MLflow run (rank 0 of the job logs into it)."""
    import mlflow

    active = mlflow.active_run()
    return run_multinode(cfg, mlflow_run_id=active.info.run_id if active else None, **kwargs)
