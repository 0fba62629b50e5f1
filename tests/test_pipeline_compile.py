"""The compiled pipeline: DAG of the unrolled loop, parameters, placement, caching, secrets, sharding.

Each test compiles a config with `compile_pipeline` into a temp file and reads it back
with `yaml.safe_load_all`: the IR document, then (kfp-kubernetes) the platform spec
`platforms.kubernetes.deploymentSpec.executors`. Tasks are found by their display names
(`rollout-i0-m1`); the compiler's own keys (`rollout-2`) are translated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components.config import STAGES, load_config
from pipelines.pipeline import compile_pipeline
from tests.conftest import fast_config

REPO = Path(__file__).resolve().parent.parent
GPU_CONFIG = REPO / "pipelines" / "configs" / "qwen2.5-0.5b-gsm8k.yaml"


class Compiled:
    """A compiled pipeline YAML, queried by task display name."""

    def __init__(self, path: Path):
        self.text = path.read_text(encoding="utf-8")
        docs = list(yaml.safe_load_all(self.text))
        assert 1 <= len(docs) <= 2
        self.ir = docs[0]
        self.platform = (docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
                         if len(docs) == 2 else {})
        self.components = self.ir["components"]
        # every task of every DAG (root and ParallelFor bodies): display name -> (dag key, task)
        self.tasks: dict[str, tuple[str, dict]] = {}
        self.display: dict[str, str] = {}  # dag key -> display name (keys are unique per DAG only)
        for dag in [self.ir["root"]["dag"]] + [c["dag"] for c in self.components.values() if "dag" in c]:
            for key, task in dag["tasks"].items():
                name = task["taskInfo"]["name"]
                assert name not in self.tasks, f"display name {name} used twice"
                self.tasks[name] = (key, task)
                self.display[key] = name
        self.root = {self.display[k]: t for k, t in self.ir["root"]["dag"]["tasks"].items()}

    def task(self, name: str) -> dict:
        return self.tasks[name][1]

    def deps(self, name: str) -> set[str]:
        return {self.display[k] for k in self.task(name).get("dependentTasks", [])}

    def artifact(self, name: str, input_name: str) -> tuple[str, str]:
        """(producer display name, output key) of one input artifact of a task."""
        src = self.task(name)["inputs"]["artifacts"][input_name]["taskOutputArtifact"]
        return self.display[src["producerTask"]], src["outputArtifactKey"]

    def parameter(self, name: str, input_name: str) -> dict:
        return self.task(name)["inputs"]["parameters"][input_name]

    def ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.deps(name))
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += self.deps(n)
        return seen

    def executor_label(self, name: str) -> str:
        return self.components[self.task(name)["componentRef"]["name"]]["executorLabel"]

    def container(self, name: str) -> dict:
        return self.ir["deploymentSpec"]["executors"][self.executor_label(name)]["container"]

    def k8s(self, name: str) -> dict:
        return self.platform.get(self.executor_label(name), {})

    def is_container_task(self, name: str) -> bool:
        return "executorLabel" in self.components[self.task(name)["componentRef"]["name"]]


def compile_to(cfg, path: Path) -> Compiled:
    out = compile_pipeline(cfg, str(path))
    assert out == str(path) and path.is_file()
    return Compiled(path)


@pytest.fixture(scope="module")
def loop22(tmp_path_factory) -> Compiled:
    """I=2 outer iterations × M=2 rounds, default placement, π_ref per iteration."""
    cfg = fast_config(loop={"iterations": 2, "steps_per_iteration": 2})
    return compile_to(cfg, tmp_path_factory.mktemp("compile") / "loop22.yaml")


@pytest.fixture(scope="module")
def gpu(tmp_path_factory) -> tuple[Compiled, object]:
    """The real-model GPU config, as shipped."""
    cfg = load_config(GPU_CONFIG)
    return compile_to(cfg, tmp_path_factory.mktemp("compile") / "gpu.yaml"), cfg


# --------------------------------------------------------------------------- DAG
def test_task_count_is_what_iterations_and_rounds_imply(loop22, tmp_path):
    # start-tracking, prepare-data, sft, evaluate-sft, reward-model; per iteration M×(rollout,
    # update) + rm-replay + evaluate; promote
    assert len(loop22.root) == 5 + 2 * (2 * 2 + 2) + 1 == 18
    expected = {"start-tracking", "prepare-data", "sft", "evaluate-sft", "reward-model", "promote"}
    for i in range(2):
        expected |= {f"rm-replay-i{i}", f"evaluate-i{i}"}
        expected |= {f"{t}-i{i}-m{m}" for t in ("rollout", "grpo-update") for m in range(2)}
    assert set(loop22.root) == expected
    for I, M in [(1, 1), (3, 2)]:
        c = compile_to(fast_config(loop={"iterations": I, "steps_per_iteration": M}), tmp_path / f"{I}x{M}.yaml")
        assert len(c.root) == 5 + I * (2 * M + 2) + 1
        assert sum(n.startswith("grpo-update-") for n in c.root) == I * M
        assert sum(n.startswith("rm-replay-") for n in c.root) == I


def test_unrolled_loop_wiring(loop22):
    c = loop22
    # first round samples from the SFT model, scored by the initial reward model
    assert c.artifact("rollout-i0-m0", "policy") == ("sft", "model")
    assert c.artifact("rollout-i0-m0", "reward_model") == ("reward-model", "reward_model")
    assert c.artifact("rollout-i0-m0", "prompts") == ("prepare-data", "train")
    # the update learns from that round, starting from the SFT model (also π_ref in iteration 0)
    assert c.artifact("grpo-update-i0-m0", "rollouts") == ("rollout-i0-m0", "rollouts")
    assert c.artifact("grpo-update-i0-m0", "policy") == ("sft", "model")
    assert c.artifact("grpo-update-i0-m0", "reference") == ("sft", "model")
    assert {"rollout-i0-m0", "sft"} <= c.deps("grpo-update-i0-m0")
    # the next round samples from the updated policy (π_old ← π_θ)
    assert c.artifact("rollout-i0-m1", "policy") == ("grpo-update-i0-m0", "new_policy")
    assert c.artifact("rollout-i0-m1", "reward_model") == ("reward-model", "reward_model")
    assert c.artifact("grpo-update-i0-m1", "policy") == ("grpo-update-i0-m0", "new_policy")
    assert c.artifact("grpo-update-i0-m1", "rollouts") == ("rollout-i0-m1", "rollouts")
    # RM replay: after the iteration's last update, retrains the initial RM on its data + fresh samples
    assert "grpo-update-i0-m1" in c.deps("rm-replay-i0")
    assert c.artifact("rm-replay-i0", "reward_model") == ("reward-model", "reward_model")
    assert c.artifact("rm-replay-i0", "history") == ("reward-model", "rm_data")
    # ... on every round of the iteration: KFP has no fan-in, so each round hands the rounds so far on
    assert "earlier_rollouts" not in c.task("rollout-i0-m0")["inputs"].get("artifacts", {})
    assert c.artifact("rollout-i0-m1", "earlier_rollouts") == ("rollout-i0-m0", "iteration_rollouts")
    assert c.artifact("rm-replay-i0", "rollouts") == ("rollout-i0-m1", "iteration_rollouts")
    assert c.artifact("evaluate-i0", "policy") == ("grpo-update-i0-m1", "new_policy")
    # iteration 1: rollouts use the replayed RM; π_ref ← π_θ at the start of the iteration
    assert c.artifact("rollout-i1-m0", "policy") == ("grpo-update-i0-m1", "new_policy")
    assert c.artifact("rollout-i1-m0", "reward_model") == ("rm-replay-i0", "new_reward_model")
    assert c.artifact("rollout-i1-m1", "reward_model") == ("rm-replay-i0", "new_reward_model")
    assert c.artifact("grpo-update-i1-m0", "reference") == ("grpo-update-i0-m1", "new_policy")
    assert c.artifact("grpo-update-i1-m1", "reference") == ("grpo-update-i0-m1", "new_policy")
    assert c.artifact("grpo-update-i1-m1", "policy") == ("grpo-update-i1-m0", "new_policy")
    assert "grpo-update-i1-m1" in c.deps("rm-replay-i1")
    assert c.artifact("rm-replay-i1", "reward_model") == ("rm-replay-i0", "new_reward_model")
    assert c.artifact("rm-replay-i1", "history") == ("rm-replay-i0", "buffer")
    assert c.artifact("evaluate-i1", "policy") == ("grpo-update-i1-m1", "new_policy")
    assert c.artifact("evaluate-sft", "policy") == ("sft", "model")
    # promote: the final policy, the last replay's RM and buffer, the last evaluation's accuracy
    assert c.artifact("promote", "policy") == ("grpo-update-i1-m1", "new_policy")
    assert c.artifact("promote", "reward_model") == ("rm-replay-i1", "new_reward_model")
    assert c.artifact("promote", "buffer") == ("rm-replay-i1", "buffer")
    assert c.artifact("promote", "test") == ("prepare-data", "test")
    acc = c.parameter("promote", "challenger_accuracy")["taskOutputParameter"]
    assert (c.display[acc["producerTask"]], acc["outputParameterKey"]) == ("evaluate-i1", "accuracy")
    start_acc = c.parameter("promote", "start_accuracy")["taskOutputParameter"]
    assert (c.display[start_acc["producerTask"]], start_acc["outputParameterKey"]) == ("evaluate-sft", "accuracy")
    # every task below the first logs into the parent MLflow run that start-tracking opens
    for name in c.root:
        if name != "start-tracking":
            src = c.parameter(name, "parent_run_id")["taskOutputParameter"]
            assert c.display[src["producerTask"]] == "start-tracking", name


def test_promote_closes_the_run_after_every_other_task(loop22, tmp_path):
    """The final task (promotion, closing the parent MLflow run) waits for every other task, so every
    evaluation lands in the parent run and its curves before the run is closed."""
    for c in (loop22, compile_to(load_config(GPU_CONFIG, {"rollout": {"shards": 2}, "loop": {"warm_engine": False}}), tmp_path / "shards.yaml")):
        assert c.ancestors("promote") == set(c.root) - {"promote"}
        for i in range(2):
            assert f"evaluate-i{i}" in c.deps("promote")


def test_the_pipeline_runs_the_plan(loop22):
    """The compiled DAG is the plan (`pipelines.plan.algorithm1`) that the in-process runner walks:
    the same task names, and every artifact a task reads comes from the task the plan names."""
    from pipelines.plan import algorithm1

    tasks = algorithm1(fast_config(loop={"iterations": 2, "steps_per_iteration": 2}))
    assert {t.name for t in tasks} | {"start-tracking"} == set(loop22.root)
    for t in tasks:
        for name, ref in t.inputs.items():
            if isinstance(ref, tuple):  # every round of the iteration, accumulated by its last round
                assert loop22.artifact(t.name, name) == (ref[-1].task, "iteration_rollouts")
            elif ref.output == "accuracy":
                src = loop22.parameter(t.name, name)["taskOutputParameter"]
                assert (loop22.display[src["producerTask"]], src["outputParameterKey"]) == (ref.task, ref.output)
            else:
                assert loop22.artifact(t.name, name) == (ref.task, ref.output), (t.name, name)
        assert set(t.after) <= loop22.ancestors(t.name)


def test_rounds_are_strictly_sequential(loop22):
    """rollout → update → rollout → … → promote is one chain of the DAG (no round overtakes another)."""
    chain = ["prepare-data", "sft", "reward-model"]
    for i in range(2):
        for m in range(2):
            chain += [f"rollout-i{i}-m{m}", f"grpo-update-i{i}-m{m}"]
        chain += [f"rm-replay-i{i}"]
    chain += ["promote"]
    for before, after in zip(chain, chain[1:]):
        assert before in loop22.ancestors(after), f"{before} does not precede {after}"
    assert "evaluate-i1" in loop22.ancestors("promote")
    assert loop22.deps("start-tracking") == set()


def test_pipeline_parameters_default_to_empty(loop22):
    params = loop22.ir["root"]["inputDefinitions"]["parameters"]
    for name in ("tracking_uri", "init_policy_uri", "init_reward_uri"):
        p = params[name]
        assert p["parameterType"] == "STRING" and p["defaultValue"] == "" and p["isOptional"]
    # and they reach the tasks that use them
    assert loop22.parameter("start-tracking", "tracking_uri") == {"componentInputParameter": "tracking_uri"}
    assert loop22.parameter("sft", "init_policy_uri") == {"componentInputParameter": "init_policy_uri"}
    assert loop22.parameter("reward-model", "init_reward_uri") == {"componentInputParameter": "init_reward_uri"}
    assert loop22.parameter("grpo-update-i1-m1", "tracking_uri") == {"componentInputParameter": "tracking_uri"}


def test_reference_sft_keeps_the_sft_model_as_reference(tmp_path):
    cfg = fast_config(loop={"iterations": 2, "steps_per_iteration": 2}, grpo={"reference": "sft"})
    c = compile_to(cfg, tmp_path / "ref-sft.yaml")
    updates = [n for n in c.root if n.startswith("grpo-update-")]
    assert len(updates) == 4
    for name in updates:
        assert c.artifact(name, "reference") == ("sft", "model"), name
    # the policy still moves on
    assert c.artifact("grpo-update-i1-m0", "policy") == ("grpo-update-i0-m1", "new_policy")


def test_caching_disabled_and_retries_on_every_task(loop22):
    for name in loop22.tasks:
        if not loop22.is_container_task(name):
            continue
        task = loop22.task(name)
        assert not task.get("cachingOptions", {}).get("enableCache", False), name
        assert task["retryPolicy"]["maxRetryCount"] == 1, name  # StageResources.retries default
        assert task["retryPolicy"]["backoffDuration"] == "30s"


def test_default_placement_is_cpu_without_gpu_settings(loop22):
    for name in loop22.tasks:
        container = loop22.container(name)
        assert container["image"] == "ghcr.io/kfp-grpo/trainer-cpu:0.1.0", name
        assert "accelerator" not in container.get("resources", {}), name
        k8s = loop22.k8s(name)
        assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(k8s), name
        # MLflow settings still come from the chart's ConfigMap and Secret
        assert k8s["secretAsEnv"][0]["secretName"] == "kfp-grpo-mlflow-client"
        assert k8s["configMapAsEnv"][0]["configMapName"] == "kfp-grpo-config"


# --------------------------------------------------------------------------- GPU config
def stage_of(name: str) -> str:
    """The config stage whose placement a task gets."""
    for prefix, stage in [("start-tracking", "prepare_data"), ("prepare-data", "prepare_data"),
                          ("gather-rollouts", "prepare_data"), ("reward-model", "reward_model"),
                          ("rollout", "rollout"), ("grpo-update", "grpo_update"), ("rm-replay", "rm_replay"),
                          ("grpo-rounds", "rollout"),  # loop.warm_engine with vLLM: placed as the rollout
                          ("evaluate", "evaluate"), ("sft", "sft"), ("promote", "promote")]:
        if name.startswith(prefix):
            return stage
    raise AssertionError(f"unknown task {name}")


def test_gpu_config_validates_and_names_a_real_model():
    cfg = load_config(GPU_CONFIG)
    assert cfg.model.policy == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.model.dtype == "float32"  # trainable at lr 1e-6
    assert (cfg.data.source, cfg.data.path, cfg.data.hf_config, cfg.data.layout) == ("hf", "openai/gsm8k", "main",
                                                                                     "gsm8k")
    assert cfg.sft.with_reasoning
    assert cfg.rollout.backend == "vllm" and cfg.rollout.vllm.tensor_parallel_size == 1
    assert cfg.rollout.group_size == 8 and cfg.grpo.lr == 1e-6 and cfg.grpo.beta == 0.04
    assert cfg.tracking.tracking_uri is None  # from the cluster's ConfigMap, never written in the file
    assert set(cfg.cluster.stages) == set(STAGES)


def test_gpu_config_placement(gpu):
    c, cfg = gpu
    images = {"prepare_data": "cpu", "sft": "gpu", "reward_model": "gpu", "rollout": "rollout",
              "grpo_update": "gpu", "rm_replay": "gpu", "evaluate": "rollout", "promote": "rollout"}
    gpu_stages = set(images) - {"prepare_data"}
    seen = set()
    for name in c.root:
        stage = stage_of(name)
        seen.add(stage)
        r = cfg.cluster.resources(stage)
        container, k8s = c.container(name), c.k8s(name)
        assert container["image"] == getattr(cfg.cluster.images, images[stage]), name
        res = container["resources"]
        assert res["resourceCpuRequest"] == r.cpu_request and res["resourceMemoryRequest"] == r.memory_request
        assert k8s["activeDeadlineSeconds"] == str(r.timeout_seconds), name
        assert c.task(name)["retryPolicy"]["maxRetryCount"] == r.retries, name
        assert k8s["secretAsEnv"] == [{
            "keyToEnv": [{"envVar": k, "secretKey": k} for k in
                         ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID",
                          "AWS_SECRET_ACCESS_KEY")],
            "optional": True, "secretName": "kfp-grpo-mlflow-client",
            "secretNameParameter": {"runtimeValue": {"constant": "kfp-grpo-mlflow-client"}}}], name
        cm = k8s["configMapAsEnv"]
        assert len(cm) == 1 and cm[0]["configMapName"] == "kfp-grpo-config" and cm[0]["optional"]
        assert {e["envVar"] for e in cm[0]["keyToEnv"]} == {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
                                                            "MLFLOW_EXPERIMENT_NAME"}
        if stage in gpu_stages:
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu", name
            assert res["accelerator"]["resourceCount"] == "1", name
            assert k8s["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}, name
            assert k8s["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                           "effect": "NoSchedule"}], name
            assert k8s["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                              "sizeLimit": "16Gi"}], name
        else:
            assert "accelerator" not in res, name
            assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(k8s), name
    # the shipped config keeps vLLM warm between rounds: an iteration's rounds in one task on the vLLM image
    assert cfg.loop.warm_engine and seen == set(STAGES) - {"grpo_update"}
    assert c.container("grpo-rounds-i0")["image"] == "ghcr.io/kfp-grpo/rollout-vllm:0.1.0"
    assert c.container("prepare-data")["image"] == "ghcr.io/kfp-grpo/trainer-cpu:0.1.0"
    assert len(c.root) == 5 + cfg.loop.iterations * 3 + 1


def test_gpu_config_one_task_per_stage(tmp_path):
    """The same config with `loop.warm_engine: false`: the vLLM image for sampling, the CUDA trainer image
    for training, one task each per round."""
    cfg = load_config(GPU_CONFIG, {"loop": {"warm_engine": False}})
    c = compile_to(cfg, tmp_path / "gpu-per-stage.yaml")
    assert c.container("rollout-i0-m0")["image"] == "ghcr.io/kfp-grpo/rollout-vllm:0.1.0"
    assert c.container("grpo-update-i0-m0")["image"] == "ghcr.io/kfp-grpo/trainer-cuda:0.1.0"
    assert c.container("grpo-update-i0-m0")["resources"]["resourceMemoryRequest"] == \
        cfg.cluster.resources("grpo_update").memory_request
    assert len(c.root) == 5 + cfg.loop.iterations * (2 * cfg.loop.steps_per_iteration + 2) + 1


def test_caching_disabled_on_every_gpu_task(gpu):
    c, _ = gpu
    for name in c.tasks:
        assert not c.task(name).get("cachingOptions", {}).get("enableCache", False), name


def test_no_secret_values_in_compiled_yaml(tmp_path, monkeypatch):
    secrets = {"MLFLOW_TRACKING_PASSWORD": "s3cr3t-pw-planted-4417",
               "MLFLOW_TRACKING_USERNAME": "planted-user-9921",
               "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-7781",
               "AWS_ACCESS_KEY_ID": "AKIAPLANTED00000",
               "HF_TOKEN": "hf_plantedtoken123"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://planted-user-9921:s3cr3t-pw-planted-4417@mlflow.example")
    small = {"loop": {"iterations": 1, "steps_per_iteration": 1}}
    for cfg in (load_config(GPU_CONFIG, small), fast_config(**small)):
        text = compile_to(cfg, tmp_path / "p.yaml").text
        for value in list(secrets.values()) + ["mlflow.example"]:
            assert value not in text
        # the Secret is referenced by name only
        assert "kfp-grpo-mlflow-client" in text


# --------------------------------------------------------------------------- sharded rollouts
def test_rollout_shards_compile_to_parallel_for_and_gather(tmp_path):
    cfg = load_config(GPU_CONFIG, {"rollout": {"shards": 2}, "loop": {"iterations": 1, "steps_per_iteration": 2, "warm_engine": False}})
    c = compile_to(cfg, tmp_path / "shards.yaml")
    loops = [n for n in c.root if n.startswith("rollout-shards-")]
    assert loops == ["rollout-shards-i0-m0", "rollout-shards-i0-m1"]
    for m in range(2):
        loop = c.task(f"rollout-shards-i0-m{m}")
        assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [0, 1]
        body = c.components[loop["componentRef"]["name"]]["dag"]
        (shard_key, shard_task), = body["tasks"].items()
        shard_name = c.display[shard_key]
        assert shard_name == f"rollout-i0-m{m}-shard"
        # each shard gets its loop item as `shard`
        assert shard_task["inputs"]["parameters"]["shard"] == {
            "componentInputParameter": loop["parameterIterator"]["itemInput"]}
        # shards sample on GPU nodes with the vLLM image
        assert c.container(shard_name)["image"] == cfg.cluster.images.rollout
        assert c.container(shard_name)["resources"]["accelerator"]["resourceCount"] == "1"
        assert "nodeSelector" in c.k8s(shard_name)
        # the loop collects the shards' outputs; gather consumes the collection
        (selector,) = body["outputs"]["artifacts"].values()
        assert selector["artifactSelectors"] == [{"outputArtifactKey": "rollouts", "producerSubtask": shard_key}]
        gather = f"gather-rollouts-i0-m{m}"
        producer, key = c.artifact(gather, "shards")
        assert producer == f"rollout-shards-i0-m{m}" and key in body["outputs"]["artifacts"]
        gather_comp = c.components[c.task(gather)["componentRef"]["name"]]
        assert gather_comp["inputDefinitions"]["artifacts"]["shards"]["isArtifactList"] is True
        # a concat needs no GPU
        assert "accelerator" not in c.container(gather).get("resources", {})
        assert "nodeSelector" not in c.k8s(gather)
        assert c.artifact(f"grpo-update-i0-m{m}", "rollouts") == (gather, "rollouts")
        assert not c.task(shard_name).get("cachingOptions", {}).get("enableCache", False)
    # the first round's shards sample from SFT, the second round's from the first update
    for m, policy in [(0, ("sft", "model")), (1, ("grpo-update-i0-m0", "new_policy"))]:
        loop = f"rollout-shards-i0-m{m}"
        inputs = {c.artifact(loop, k) for k in c.task(loop)["inputs"]["artifacts"]}
        assert inputs == {policy, ("prepare-data", "train"), ("reward-model", "reward_model")}
    assert c.artifact("rm-replay-i0", "rollouts") == ("gather-rollouts-i0-m1", "iteration_rollouts")
    assert c.artifact("gather-rollouts-i0-m1", "earlier_rollouts") == ("gather-rollouts-i0-m0", "iteration_rollouts")
    assert "grpo-update-i0-m1" in c.deps("rm-replay-i0")
    assert c.artifact("promote", "policy") == ("grpo-update-i0-m1", "new_policy")


# --------------------------------------------------------------------------- run-time parameters
def test_hyperparameters_are_pipeline_parameters_with_the_compiled_defaults(loop22, tmp_path):
    """What does not change the DAG's shape can be set when a run is created (KFP "Create run" form):
    one typed pipeline parameter per run-time key, defaulting to the compiled config's value; the
    start-tracking task applies them to the config every other task reads."""
    from components.config import RUN_TIME_KEYS, run_time_parameters

    cfg = fast_config(loop={"iterations": 2, "steps_per_iteration": 2})
    params = loop22.ir["root"]["inputDefinitions"]["parameters"]
    expected = run_time_parameters(cfg)
    assert set(params) == set(expected) | {"tracking_uri", "init_policy_uri", "init_reward_uri"}
    assert len(expected) == len(RUN_TIME_KEYS)
    kinds = {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING", bool: "BOOLEAN"}
    for name, (kind, default) in expected.items():
        assert params[name]["parameterType"] == kinds[kind], name
        assert params[name]["defaultValue"] == default, name
    assert params["grpo_lr"]["defaultValue"] == cfg.grpo.lr and params["seed"]["defaultValue"] == cfg.seed
    assert not {"loop_iterations", "loop_steps_per_iteration", "rollout_shards"} & set(params)  # compile-time
    settings = loop22.parameter("start-tracking", "settings")["runtimeValue"]["constant"]
    assert set(settings) == set(expected)
    for name in loop22.root:
        if name != "start-tracking":
            src = loop22.parameter(name, "config")["taskOutputParameter"]
            assert (loop22.display[src["producerTask"]], src["outputParameterKey"]) == ("start-tracking", "config")


def test_run_time_settings_are_validated_by_the_schema():
    from components.config import ConfigError, with_run_time_settings

    cfg = fast_config()
    # KFP hands pipeline parameters to the task as text
    applied = with_run_time_settings(cfg, {"grpo_lr": "0.0005", "seed": "7.0", "grpo_loss_agg": "token"})
    assert (applied.grpo.lr, applied.seed, applied.grpo.loss_agg) == (0.0005, 7, "token")
    with pytest.raises(ConfigError, match=r"grpo\.beta: Input should be greater than or equal to 0"):
        with_run_time_settings(cfg, {"grpo_beta": "-1"})
    with pytest.raises(ConfigError, match="compile-time"):
        with_run_time_settings(cfg, {"loop_iterations": "5"})
