"""Multi-node updates through a Kubeflow Trainer job: the manifest, create/wait/delete against a
local fake of the Kubernetes API (Complete, Failed, timeout), and a TrainJob end to end whose
"controller" starts the manifest's torchrun command on two local "nodes" with the PET_*
rendezvous environment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from components import distributed, grpo_update
from components.artifacts import OPTIMIZER_FILE
from components.config import ConfigError, parse_config
from pipelines import trainer_job
from tests.scale import GRPO, ROOT, max_diff, state, update_cfg
from tests.conftest import fast_config, send_json


# =========================================================================== Kubeflow Trainer job
def multinode_cfg(**trainer_job):
    return fast_config(
        grpo={**GRPO, "nodes": 2, "nproc_per_node": 1,
              "trainer_job": {"shared_pvc": "grpo-shared", "namespace": "team-a", **trainer_job}},
        cluster={"image_pull_secrets": ["regcred"], "stages": {"grpo_update": {
            "image": "gpu", "cpu_request": "8", "memory_request": "64Gi", "accelerator_type": "nvidia.com/gpu",
            "accelerator_limit": 1, "node_selector": {"nvidia.com/gpu.present": "true"}, "shm_size": "16Gi",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}})


def test_multinode_config_needs_a_shared_volume():
    with pytest.raises(ConfigError, match="trainer_job.shared_pvc"):
        parse_config({"grpo": {"nodes": 2}})


def test_trainjob_manifest_structure():
    cfg = multinode_cfg()
    cmd = distributed.torchrun_command(cfg, ["--rollouts", "/mnt/s/j/rollouts/0.parquet", "--policy", "/mnt/s/j/policy",
                                             "--new-policy", "/mnt/s/j/out", "--step", "5"], 1, 2, launcher=["torchrun"])
    m = trainer_job.build_trainjob(cfg, "kfp-grpo-update-s5-abc", "team-a", cmd,
                                   {"KFP_GRPO_METRICS_OUT": "/mnt/s/j/metrics.json", "MLFLOW_TRACKING_URI": "http://m"})
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and m["kind"] == "TrainJob"
    assert m["metadata"]["name"] == "kfp-grpo-update-s5-abc" and m["metadata"]["namespace"] == "team-a"
    spec = m["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}
    t = spec["trainer"]
    assert t["image"] == cfg.cluster.images.gpu and t["command"] == cmd and t["command"][0] == "torchrun"
    assert t["numNodes"] == 2 and t["numProcPerNode"] == 1
    assert t["resourcesPerNode"] == {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"nvidia.com/gpu": "1"}}
    env = {e["name"]: e for e in t["env"]}
    assert len(env) == len(t["env"])  # a list-map: unique names
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "kfp-grpo-mlflow-client", "key": "MLFLOW_TRACKING_PASSWORD", "optional": True}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["name"] == "kfp-grpo-config"
    assert env["MLFLOW_TRACKING_URI"] == {"name": "MLFLOW_TRACKING_URI", "value": "http://m"}  # overrides the ConfigMap
    (patch,) = spec["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    assert job["name"] == "node" and patch["manager"] == "kfp-grpo"
    assert {"name": "kfp-grpo-shared", "persistentVolumeClaim": {"claimName": "grpo-shared"}} in pod["volumes"]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [
        {"name": "kfp-grpo-shared", "mountPath": "/mnt/kfp-grpo-shared"}, {"name": "dshm", "mountPath": "/dev/shm"}]}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert len(trainer_job.job_name(123)) <= 63
    json.dumps(m)  # plain JSON, as the API takes it


class FakeKubernetes:
    """The few Kubernetes API endpoints `create_and_wait` uses, on 127.0.0.1; `controller(obj)` plays the
    Trainer controller and returns the status conditions GETs report from then on."""

    def __init__(self, controller=None):
        self.objects: dict[str, dict] = {}
        self.deleted: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.controller = controller or (lambda obj: [{"type": "Complete", "status": "True", "reason": "JobsCompleted",
                                                       "message": "done"}])
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, code, body):
                send_json(self, code, body)

            def do_POST(self):
                fake.requests.append(("POST", self.path))
                obj = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
                if self.path != f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs":
                    return self.reply(404, {"kind": "Status", "code": 404})
                fake.objects[name] = obj
                threading.Thread(target=lambda: obj.update(status={"conditions": fake.controller(obj)})).start()
                self.reply(201, obj)

            def do_GET(self):
                fake.requests.append(("GET", self.path))
                obj = fake.objects.get(self.path.rsplit("/", 1)[-1])
                self.reply(200, obj) if obj else self.reply(404, {"kind": "Status", "code": 404})

            def do_DELETE(self):
                fake.requests.append(("DELETE", self.path))
                name = self.path.split("?")[0].rsplit("/", 1)[-1]
                fake.deleted.append(name)
                self.reply(200, {"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def api(self):
        from kubernetes import client

        conf = client.Configuration()
        conf.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        return client.CustomObjectsApi(client.ApiClient(conf))

    def close(self):
        self.server.shutdown()


@pytest.fixture
def kube():
    servers = []
    yield lambda controller=None: servers.append(FakeKubernetes(controller)) or servers[-1]
    for s in servers:
        s.close()


def manifest(name="kfp-grpo-update-s0-test"):
    return trainer_job.build_trainjob(multinode_cfg(), name, "team-a", ["torchrun", "-m", "components.grpo_update"])


def test_create_and_wait_until_complete(kube):
    k = kube(lambda obj: [{"type": "Created", "status": "True"}, {"type": "Complete", "status": "True"}])
    obj = trainer_job.create_and_wait(manifest(), k.api(), timeout_s=10, poll_s=0.05, log=lambda s: None)
    assert obj["metadata"]["name"] == "kfp-grpo-update-s0-test"
    assert k.requests[0] == ("POST", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs")
    assert ("GET", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs/kfp-grpo-update-s0-test") \
        in k.requests and not k.deleted


def test_create_and_wait_raises_the_failed_condition(kube):
    k = kube(lambda obj: [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                           "message": "TrainJob exceeded its activeDeadlineSeconds"}])
    with pytest.raises(trainer_job.TrainJobFailed, match="DeadlineExceeded: TrainJob exceeded its activeDeadline"):
        trainer_job.create_and_wait(manifest(), k.api(), timeout_s=10, poll_s=0.05, log=lambda s: None)


def test_create_and_wait_deletes_the_job_on_timeout(kube):
    k = kube(lambda obj: [{"type": "Suspended", "status": "True", "reason": "Suspended"},
                          {"type": "Complete", "status": "False"}])
    with pytest.raises(TimeoutError, match="was deleted"):
        trainer_job.create_and_wait(manifest(), k.api(), timeout_s=0.3, poll_s=0.05, log=lambda s: None)
    assert k.deleted == ["kfp-grpo-update-s0-test"]
    assert any(m == "DELETE" and "propagationPolicy=Foreground" in p for m, p in k.requests)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_trainer(obj: dict) -> list[dict]:
    """Run the TrainJob's command the way the torch runtime would, with each node a local process group:
    PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT set, `torchrun` from this Python."""
    t = obj["spec"]["trainer"]
    cmd = [sys.executable, "-m", "torch.distributed.run"] + t["command"][1:]
    port = str(free_port())
    env = dict(os.environ, PET_NNODES=str(t["numNodes"]), PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=port,
               **{e["name"]: e["value"] for e in t["env"] if "value" in e})
    nodes = [subprocess.Popen(cmd, env=dict(env, PET_NODE_RANK=str(i)), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(t["numNodes"])]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    if any(p.returncode for p in nodes):
        return [{"type": "Failed", "status": "True", "reason": "JobFailed", "message": logs[0][-3000:]}]
    return [{"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": ""}]


def test_multinode_update_through_a_trainjob(kube, scale_work, scale_rollouts, round1, untrained_policy, tmp_path):
    """grpo.nodes=2: inputs staged on the shared volume, a TrainJob posted to the (fake) API, its torchrun
    command run on two local 'nodes' (node ranks 0 and 1), the new policy and metrics brought back —
    the same update as one process."""
    shared = tmp_path / "shared"
    shared.mkdir()
    cfg = multinode_cfg(shared_mount_path=str(shared), poll_seconds=0.2)
    k = kube(local_trainer)
    args = ([str(scale_rollouts[1.0])], str(round1), str(untrained_policy))
    multi = trainer_job.run_multinode(cfg, *args, str(tmp_path / "out"), step=0, api=k.api())
    posted = next(iter(k.objects.values()))
    assert posted["spec"]["trainer"]["command"][:3] == ["torchrun", "--nnodes=2", "--nproc-per-node=1"]
    assert multi["update/world_size"] == 2
    single = grpo_update.run(update_cfg(), *args, str(scale_work / "single-mn"))
    for key in ("update/loss", "update/kl", "update/grad_norm"):
        assert multi[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    assert max_diff(state(scale_work / "single-mn"), state(tmp_path / "out")) < 1e-5
    assert (tmp_path / "out" / OPTIMIZER_FILE).exists()
    assert list(shared.iterdir()) == []  # the job's working directory is cleaned up


def test_grpo_update_component_single_node_runs_the_stage_in_process(scale_work, scale_rollouts, untrained_policy, monkeypatch):
    calls = []
    import pipelines.runtime as runtime
    from components import grpo_update as stage
    from pipelines import kfp_components

    monkeypatch.setattr(runtime, "run_task", lambda *a, **kw: calls.append((a, kw)) or {"update/loss": 0.0})
    artifact = lambda p: SimpleNamespace(path=str(p))  # noqa: E731 — what KFP hands the component body
    kfp_components.grpo_update(fast_config().to_json(), "", "", "grpo-update-i0-m0", 0, artifact(scale_rollouts[1.0]),
                               artifact(untrained_policy), artifact(untrained_policy), artifact(scale_work / "unused"), None)
    assert calls and calls[0][0][0] is stage.run and calls[0][1]["rollouts"] == str(scale_rollouts[1.0])


