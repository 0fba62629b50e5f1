"""The one config schema of kfp-grpo.

It drives the CLI, every stage and the pipeline. Unknown keys and bad values are
errors whose message names the key's path (``grpo.beta: Input should be greater than
or equal to 0``). Load a YAML file with :func:`load_config`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _no_credentials(self) -> "_Strict":
        """No string value of the config may carry a credential: the config is compiled into the
        pipeline, logged as MLflow params and shown in the KFP UI (components/redaction.py)."""
        from components.redaction import credentials_in

        for name in type(self).model_fields:
            value = getattr(self, name)
            values = value if isinstance(value, (list, tuple)) else value.values() if isinstance(value, dict) \
                else [value]
            for v in values:
                why = credentials_in(v) if isinstance(v, str) else None
                if why:
                    raise ValueError(f"{name} must not contain a password or token ({why}; it would be compiled "
                                     "into the pipeline); use MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD "
                                     "(or AWS_*) from a Kubernetes Secret")
        return self


# --------------------------------------------------------------------------- model
class TinyModelConfig(_Strict):
    """Shape of the tiny Llama-architecture model built offline."""

    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8)
    max_position_embeddings: int = Field(128, ge=16)


class ModelConfig(_Strict):
    """Where the initial policy comes from."""

    policy: str = Field("tiny", description="'tiny' (built offline), a hub id, or a local HF directory")
    gguf_file: str | None = Field(None, description="GGUF file inside `policy` to dequantize on load")
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    use_safetensors: bool = Field(True, description="refuse pickle (.bin) weights unless false")


# --------------------------------------------------------------------------- data
class ArithmeticConfig(_Strict):
    """Difficulty knobs of the built-in arithmetic task."""

    min_operand: int = Field(0, ge=0)
    max_operand: int = Field(49, ge=1)
    num_operations: int = Field(1, ge=1, le=6)
    operators: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+"], min_length=1)
    parentheses: bool = False
    careless_demonstrations: float = Field(
        0.0, ge=0, le=1, description="fraction of the SFT demonstrations of carrying sums (a + b) that drop the "
                                     "carry, as a careless annotator does; the verifier's answers stay correct")

    @model_validator(mode="after")
    def _range(self) -> "ArithmeticConfig":
        if self.max_operand < self.min_operand:
            raise ValueError("max_operand must be >= min_operand")
        if self.careless_demonstrations and (self.num_operations != 1 or "+" not in self.operators):
            raise ValueError("careless_demonstrations drops carries of sums: it needs num_operations 1 and '+' "
                             "among the operators")
        return self


class DataConfig(_Strict):
    """The prompt data set: the built-in task, a JSONL/Parquet file, or a HF data set."""

    source: Literal["arithmetic", "file", "hf"] = "arithmetic"
    path: str | None = Field(None, description="file path (source=file) or HF name/path (source=hf)")
    test_path: str | None = Field(None, description="held-out file (source=file); else split from `path`")
    layout: Literal["plain", "gsm8k"] = Field(
        "plain", description="plain: columns prompt, answer; gsm8k: question, answer ending '#### N'"
    )
    hf_train_split: str = "train"
    hf_test_split: str = "test"
    hf_config: str | None = None
    num_train: int = Field(2000, ge=1)
    num_test: int = Field(200, ge=1)
    arithmetic: ArithmeticConfig = ArithmeticConfig()
    system_prompt: str | None = None

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if self.source in ("file", "hf") and not self.path:
            raise ValueError(f"path is required when source is '{self.source}'")
        ignored = [k for k, on in (("path", self.source == "arithmetic" and self.path),
                                   ("test_path", self.source != "file" and self.test_path),
                                   ("hf_config", self.source != "hf" and self.hf_config)) if on]
        if ignored:  # a value the data source would silently ignore
            raise ValueError(f"{' and '.join(ignored)} set, but source is '{self.source}', which ignores "
                             f"{'them' if len(ignored) > 1 else 'it'}; set data.source "
                             f"({'file or hf' if 'path' in ignored else 'file' if 'test_path' in ignored else 'hf'})"
                             " or remove the key")
        return self


# --------------------------------------------------------------------------- stages
class SFTConfig(_Strict):
    steps: int = Field(200, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    max_length: int = Field(64, ge=8, le=131_072)
    with_reasoning: bool = Field(False, description="train on '<think>solution</think>' when the data has one")


class RewardModelConfig(_Strict):
    """Reward model r_φ: a scalar head on the SFT policy's backbone."""

    objective: Literal["pairwise", "pointwise", "pairwise+pointwise", "process"] = Field(
        "pairwise", description="pairwise: Bradley–Terry on (correct, incorrect) completions of a prompt; pointwise: "
                                "BCE on each completion's verdict; pairwise+pointwise: both losses, a batch of each "
                                "per step; process: a process reward model (PRM) — BCE on "
                                "every prefix of a completion that ends a reasoning step, labelled by the verifier's "
                                "step labels (rewards.step_labels); its score of a whole completion is its outcome "
                                "score, its score of a step's prefix that step's reward under grpo.supervision process")
    steps: int = Field(150, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    max_length: int = Field(64, ge=8, le=131_072)
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    negatives_per_prompt: int = Field(1, ge=1)
    policy_samples: int = Field(0, ge=0, description="completions sampled per prompt from the SFT policy and "
                                                     "labelled by the verifier, added to the synthetic data "
                                                     "(0: synthetic correct vs wrong answers only)")
    sample_prompts: int = Field(1000, ge=1, description="training prompts the policy samples are drawn for")

    @model_validator(mode="after")
    def _process_needs_policy_samples(self) -> "RewardModelConfig":
        if self.objective == "process" and not self.policy_samples:
            raise ValueError("objective 'process' learns step labels from the policy's own worked solutions: set "
                             "policy_samples (e.g. 8); the synthetic data has no wrong steps")
        return self


class RewardConfig(_Strict):
    """Final reward = rm_weight·s(r_φ) + correctness_weight·correct + format_weight·format.

    s is the sigmoid (the RM's probability that the completion is good, bounded in (0, 1)
    so an exploited RM cannot outweigh the verifier) or the identity (`rm_squash: false`).
    `kind` says which terms count: `mixed` all three; `rm` the learned reward model (and the
    format), the verifier only labelling the samples the RM is retrained on (iterative RL);
    `verifier` the verifier (and the format), no reward model.
    """

    kind: Literal["mixed", "rm", "verifier"] = "mixed"
    rm_weight: float = 0.5
    rm_squash: bool = True
    correctness_weight: float = 1.0
    format_weight: float = 0.1

    def weights(self) -> tuple[float, float, float]:
        """(rm, correctness, format) weights that count for `kind`."""
        return (0.0 if self.kind == "verifier" else self.rm_weight,
                0.0 if self.kind == "rm" else self.correctness_weight, self.format_weight)

    @model_validator(mode="after")
    def _some_reward(self) -> "RewardConfig":
        if self.kind == "rm" and self.rm_weight == 0:
            raise ValueError("kind 'rm' optimises the reward model: rm_weight must not be 0")
        if self.kind == "verifier" and self.correctness_weight == 0:
            raise ValueError("kind 'verifier' optimises the verifier: correctness_weight must not be 0")
        if not any(self.weights()):
            raise ValueError("all reward weights are 0: there is nothing to optimise")
        return self


class VLLMConfig(_Strict):
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    dtype: str = "auto"
    enforce_eager: bool = False


class HFGenerationConfig(_Strict):
    """The `hf` rollout backend: sampling with the transformers model itself (CPU, or one GPU)."""

    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype the weights sample in (null: model.dtype). bfloat16 sampled 2.4x more tokens "
                          "per CPU-second on an AVX512-BF16 CPU; its log-probs are then not float32 π_old's, so "
                          "the update recomputes π_old (set grpo.importance_sampling_cap to correct for the "
                          "mismatch)")


class RolloutConfig(_Strict):
    backend: Literal["hf", "vllm"] = "hf"
    group_size: int = Field(8, ge=2, le=1024, description="G: samples per prompt")
    prompts_per_step: int = Field(64, ge=1, le=1_000_000, description="B: prompts per rollout round")
    max_new_tokens: int = Field(16, gt=0, le=131_072)
    temperature: float = Field(1.0, gt=0)
    temperature_range: tuple[float, float] | None = Field(
        None, description="(τ_lo, τ_hi): τ_k = τ_lo + (τ_hi−τ_lo)·k/G across the group"
    )
    top_p: float = Field(1.0, gt=0, le=1)
    generation_batch_size: int = Field(256, ge=1, description="hf backend: sequences sampled together (whole "
                                                               "groups; at least one group per batch)")
    shards: int = Field(1, ge=1, description="rollout shards fanned out across pods")
    hf: HFGenerationConfig = HFGenerationConfig()
    vllm: VLLMConfig = VLLMConfig()

    @field_validator("temperature_range")
    @classmethod
    def _temperature_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError(f"need 0 < τ_lo <= τ_hi, got {list(v)} (τ_0 = τ_lo divides the logits)")
        return v


class AdvantageConfig(_Strict):
    scale: Literal["group", "batch", "none"] = "group"
    std: Literal["population", "sample"] = "population"
    eps: float = Field(1e-4, gt=0)


class TrainerJobConfig(_Strict):
    """The Kubeflow Trainer v2 TrainJob that runs the update when `grpo.nodes > 1`."""

    runtime: str = Field("torch-distributed", description="ClusterTrainingRuntime the TrainJob references")
    namespace: str | None = Field(None, description="null: the namespace of the pipeline pod")
    shared_pvc: str | None = Field(None, description="ReadWriteMany PVC mounted in the pipeline task and every node")
    shared_mount_path: str = "/mnt/kfp-grpo-shared"
    timeout_seconds: int = Field(86400, gt=0, description="delete the TrainJob and fail after this long")
    poll_seconds: float = Field(15.0, gt=0)


class GRPOConfig(_Strict):
    supervision: Literal["outcome", "process"] = Field(
        "outcome", description="outcome: one advantage per completion; process: per-token advantages from the "
                               "verifier's verdict on each reasoning step (rewards.step_labels)")
    beta: float = Field(0.04, ge=0)
    eps_low: float = Field(0.2, gt=0, lt=1)
    eps_high: float = Field(0.2, gt=0)
    loss_agg: Literal["sequence", "token", "dr_grpo"] = "sequence"
    advantage: AdvantageConfig = AdvantageConfig()
    epochs: int = Field(1, ge=1, description="μ: passes over each rollout batch")
    minibatch_size: int = Field(64, ge=1, le=1_000_000, description="outputs per optimizer step")
    lr: float = Field(1e-6, gt=0, le=1)
    warmup_steps: int = Field(0, ge=0, description="linear lr warmup over the first optimizer steps of the run")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    reference: Literal["iteration", "sft"] = Field(
        "iteration", description="π_ref ← π_θ at each outer iteration, or keep the SFT model"
    )
    importance_sampling_cap: float | None = Field(
        None, gt=0, description="truncated IS correction for sampler/trainer mismatch (vLLM); off when null"
    )
    max_kl: float | None = Field(None, gt=0, description="abort the run if the mean KL exceeds this")
    max_clip_fraction: float | None = Field(None, gt=0, le=1, description="abort if clip fraction exceeds this")
    gradient_checkpointing: bool = Field(False, description="HF activation checkpointing (less memory, ~30% slower)")
    bf16: bool = Field(True, description="FSDP on CUDA: bfloat16 compute, float32 master weights and reduction")
    nproc_per_node: int = Field(1, ge=1, description="> 1: torchrun + FSDP over this many GPUs in one pod")
    nodes: int = Field(1, ge=1, description="> 1: a Kubeflow Trainer job over this many nodes (see trainer_job)")
    trainer_job: TrainerJobConfig = TrainerJobConfig()

    @model_validator(mode="after")
    def _multi_node(self) -> "GRPOConfig":
        if self.nodes > 1 and not self.trainer_job.shared_pvc:
            raise ValueError("nodes > 1 needs trainer_job.shared_pvc (a ReadWriteMany PVC for the job's inputs/outputs)")
        return self


class ReplayConfig(_Strict):
    historical_fraction: float = Field(0.1, ge=0, le=1)
    steps: int = Field(60, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0, le=1)


class EvalConfig(_Strict):
    max_new_tokens: int = Field(16, gt=0, le=131_072)
    maj_k: int = Field(0, ge=0, description="k for maj@k (0 = only greedy pass@1)")
    maj_temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(256, ge=1)


class PromoteConfig(_Strict):
    model_prefix: str = Field("kfp-grpo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    margin: float = Field(0.0, ge=0, description="accuracy a challenger must add to the champion's")


class LoopConfig(_Strict):
    iterations: int = Field(2, ge=1, le=50, description="I: outer iterations")
    steps_per_iteration: int = Field(3, ge=1, le=50, description="M: rollout→update rounds per iteration")
    warm_engine: bool = Field(
        False, description="one task per iteration runs its M rounds with the policy, its optimizer and the "
                           "sampler kept in memory (the same stage code and per-round MLflow runs); false: "
                           "one task per rollout and per update, the policy saved and reloaded between them")


# the tracking stores an MLflow client can open (a bare path would be the deprecated file store)
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
                    "file")


def check_tracking_scheme(uri: str) -> None:
    """ValueError naming the URI when it is not a tracking store MLflow opens (MLflow's own error is a
    traceback deep in its store registry, or a silently created local file store)."""
    from components.redaction import scrub

    if uri in ("databricks", "databricks-uc"):
        return
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(f"tracking URI {scrub(uri)}: " + (f"unknown scheme '{scheme}'" if scheme else
                         "not a URI (a bare path would be MLflow's deprecated file store)")
                         + f"; use one of {', '.join(s + '://' for s in TRACKING_SCHEMES)}")


class TrackingConfig(_Strict):
    tracking_uri: str | None = Field(None, description="null: $MLFLOW_TRACKING_URI, else the embedded store")
    experiment: str = Field("kfp-grpo", min_length=1, max_length=500)

    @field_validator("tracking_uri")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v:
            check_tracking_scheme(v)
        return v


# --------------------------------------------------------------------------- cluster
class Toleration(_Strict):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


_QUANTITY = re.compile(r"^\+?(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
                       r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$")
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": 1e-9, "u": 1e-6,
           "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, None: 1}


def quantity(text: str) -> float:
    """The value of a Kubernetes resource quantity (``500m`` → 0.5, ``2Gi`` → 2147483648); ValueError if malformed."""
    m = _QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 8Gi)")
    suffix = m["suffix"]
    scale = float(f"1{suffix}") if suffix and suffix[0] in "eE" else _SUFFIX[suffix]
    return float(m["num"]) * scale


class StageResources(_Strict):
    """Where and how one stage runs on a cluster (ignored by local runs)."""

    @field_validator("cpu_request", "cpu_limit")
    @classmethod
    def _cpu(cls, v: str | None) -> str | None:
        if v is not None and quantity(v) <= 0:
            raise ValueError(f"{v!r}: a CPU quantity must be > 0 (e.g. 500m, 2)")
        return v

    @field_validator("memory_request", "memory_limit", "shm_size")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is not None and quantity(v) < 2**20:
            raise ValueError(f"{v!r} is under 1Mi of memory (bytes; 'm' is milli): write e.g. 512Mi or 8Gi")
        return v

    @model_validator(mode="after")
    def _request_within_limit(self) -> "StageResources":
        for kind in ("cpu", "memory"):
            request, limit = getattr(self, f"{kind}_request"), getattr(self, f"{kind}_limit")
            if request is not None and limit is not None and quantity(request) > quantity(limit):
                raise ValueError(f"{kind}_request {request} exceeds {kind}_limit {limit}")
        return self

    image: Literal["cpu", "gpu", "rollout"] = "cpu"
    cpu_request: str | None = "1"
    memory_request: str | None = "2Gi"
    cpu_limit: str | None = None
    memory_limit: str | None = None
    accelerator_type: str | None = None
    accelerator_limit: int = Field(0, ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    shm_size: str | None = Field(None, description="size of a memory-backed /dev/shm volume (GPU stages)")
    retries: int = Field(1, ge=0)
    timeout_seconds: int | None = Field(None, gt=0)


class Images(_Strict):
    cpu: str = "ghcr.io/kfp-grpo/trainer-cpu:0.1.0"
    gpu: str = "ghcr.io/kfp-grpo/trainer-cuda:0.1.0"
    rollout: str = "ghcr.io/kfp-grpo/rollout-vllm:0.1.0"


STAGES = ("prepare_data", "sft", "reward_model", "rollout", "grpo_update", "rm_replay", "evaluate", "promote")


# what every task gets as env from the Secret `cluster.mlflow_secret` and the ConfigMap `cluster.config_map`
MLFLOW_CLIENT_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID",
                      "AWS_SECRET_ACCESS_KEY")
MLFLOW_CONFIG_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_EXPERIMENT_NAME")


class ClusterConfig(_Strict):
    images: Images = Images()
    mlflow_secret: str | None = Field("kfp-grpo-mlflow-client", description="Secret injected as env")
    config_map: str | None = Field("kfp-grpo-config", description="ConfigMap injected as env")
    image_pull_secrets: list[str] = Field(default_factory=list)
    service_account: str | None = "kfp-grpo-pipeline"
    stages: dict[str, StageResources] = Field(default_factory=dict)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: dict[str, StageResources]) -> dict[str, StageResources]:
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:  # reported at cluster.stages, with the known names
            raise ValueError(f"unknown stage(s) {unknown}, stages are {list(STAGES)}")
        return stages

    def resources(self, stage: str) -> StageResources:
        """The placement of `stage` (defaults when the config does not name it)."""
        return self.stages.get(stage, StageResources())


# --------------------------------------------------------------------------- root
class Config(_Strict):
    """The whole kfp-grpo config (one YAML file)."""

    name: str = Field("kfp-grpo", pattern=r"^[a-z0-9][a-z0-9-]*$", description="pipeline name")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="the run's seed (a KFP int64 parameter); every "
                      "per-step seed is derived from it (components/seeds.py)")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads per stage (null: torch's default)")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    reward: RewardConfig = RewardConfig()
    rollout: RolloutConfig = RolloutConfig()
    grpo: GRPOConfig = GRPOConfig()
    replay: ReplayConfig = ReplayConfig()
    evaluation: EvalConfig = EvalConfig()
    loop: LoopConfig = LoopConfig()
    promote: PromoteConfig = PromoteConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _process_reward_model(self) -> "Config":
        scores_steps = self.grpo.supervision == "process" and self.reward.weights()[0]
        if scores_steps and self.reward_model.objective != "process":
            raise ValueError(f"grpo.supervision 'process' with reward.kind '{self.reward.kind}' scores every step with "
                             "the reward model, which needs reward_model.objective 'process' (a process reward model "
                             f"trained on step labels; it is '{self.reward_model.objective}'), or reward.kind 'verifier' "
                             "(the verifier's step labels as the step rewards)")
        return self

    @model_validator(mode="after")
    def _warm_engine(self) -> "Config":
        if self.loop.warm_engine:
            clashes = [f"{key} is {value}" for key, value in (("rollout.shards", self.rollout.shards),
                       ("grpo.nproc_per_node", self.grpo.nproc_per_node), ("grpo.nodes", self.grpo.nodes))
                       if value != 1]
            if clashes:  # reported at the root, naming the keys
                raise ValueError(f"loop.warm_engine runs an iteration's rounds in one process, so it needs "
                                 f"rollout.shards, grpo.nproc_per_node and grpo.nodes at 1 ({', '.join(clashes)})")
        return self

    def to_json(self) -> str:
        """Canonical JSON (what the pipeline passes to every component)."""
        return self.model_dump_json()

    def hash(self) -> str:
        """Short content hash of the config (tags registered models)."""
        canon = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()[:12]


# Values that can be set when a run is created (KFP UI "Create run" form, API, `schedule`) without
# recompiling: none of them changes the DAG's shape or placement. Everything else (loop sizes,
# shards, nodes, images, resources, the model) is compile-time: change it with --set and recompile.
RUN_TIME_KEYS = (
    "seed", "sft.steps", "sft.lr", "reward_model.steps", "reward_model.lr", "reward.rm_weight",
    "reward.correctness_weight", "reward.format_weight", "rollout.group_size", "rollout.prompts_per_step",
    "rollout.max_new_tokens", "rollout.temperature", "rollout.top_p", "grpo.lr", "grpo.beta", "grpo.eps_low",
    "grpo.eps_high", "grpo.loss_agg", "grpo.epochs", "grpo.minibatch_size", "grpo.warmup_steps",
    "replay.historical_fraction", "replay.steps", "replay.lr", "evaluation.max_new_tokens", "promote.margin",
)


def run_time_parameters(cfg: Config) -> dict[str, tuple[type, Any]]:
    """The pipeline's run-time parameters: name (``grpo.lr`` → ``grpo_lr``) → (type, `cfg`'s value)."""
    params: dict[str, tuple[type, Any]] = {}
    for key in RUN_TIME_KEYS:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        params[key.replace(".", "_")] = (type(value) if isinstance(value, (bool, int, float)) else str, value)
    return params


def with_run_time_settings(cfg: Config, settings: dict[str, Any]) -> Config:
    """`cfg` with run-time settings (by parameter name, e.g. {"grpo_lr": 1e-4}) applied and validated.

    Values may arrive as strings (KFP passes pipeline parameters into a task's dict input as text);
    they are read as YAML scalars, then the schema validates them (an error names the key path).
    """
    names = {k.replace(".", "_"): k for k in RUN_TIME_KEYS}
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ConfigError(f"run-time settings: unknown parameter(s) {unknown}; the run-time parameters are "
                          f"{sorted(names)} (everything else is compile-time: --set it and recompile)")
    data = cfg.model_dump(mode="json")
    for name, value in settings.items():
        node = data
        *parents, last = names[name].split(".")
        for part in parents:
            node = node[part]
        try:
            node[last] = yaml_load(value) if isinstance(value, str) and last != "loss_agg" else value
        except yaml.YAMLError as err:
            raise ConfigError(f"run-time settings: {names[name]}: the value {value!r} is not valid YAML: "
                              f"{yaml_error(err)}") from None
    return parse_config(data, "run-time settings")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {loc}: {msg}")
    return "; ".join(lines)


def parse_config(data: dict[str, Any] | None, source: str = "config") -> Config:
    """Validate a config dict; raise ConfigError naming each bad key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last
    silently: a repeated `grpo:` section would drop the first one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key (a list or mapping): the schema names it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first}); YAML keeps only the last one, "
                    "so the first would be silently dropped", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def yaml_error(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what, and where (line, column)."""
    problem = getattr(err, "problem", None)
    if not problem:
        return " ".join(str(err).split())
    context, mark = getattr(err, "context", None), getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{context + ': ' if context else ''}{problem}{where}"


def yaml_load(text: str) -> Any:
    """`yaml.safe_load`, refusing duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a YAML config; None means the embedded default (tiny.yaml)."""
    path = Path(path) if path is not None else default_config_path()
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error(err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); is it a YAML config?") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
    if data is None:  # an empty file (or only comments) would silently run on built-in defaults
        raise ConfigError(f"{path}: the config file is empty; write at least one key (`{{}}` for every default), "
                          "or omit --config to use the embedded tiny.yaml")
    if overrides and (data is None or isinstance(data, dict)):  # else parse_config names the bad top level
        data = _deep_merge(data or {}, overrides)
    return parse_config(data, str(path))


def config_from_json(text: str) -> Config:
    """Parse the canonical JSON a pipeline task receives."""
    return parse_config(json.loads(text), "config")


def default_config_path() -> Path:
    """The embedded default config shipped with the package."""
    return Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "tiny.yaml"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def set_dotted(overrides: dict[str, Any], dotted: str, value: Any) -> None:
    """`set_dotted(d, "grpo.beta", 0.1)` → d["grpo"]["beta"] = 0.1 (CLI --set).

    ConfigError for a malformed key path, or one that conflicts with a key set before
    (`grpo=...` and `grpo.beta=...`, or the same key twice with different values)."""
    keys = dotted.split(".")
    bad = [k for k in keys if not _KEY.match(k)]
    if bad:
        raise ConfigError(f"--set {dotted}=...: {bad[0]!r} is not a key name (a dotted key path such as grpo.beta)")
    node = overrides
    for i, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: conflicts with --set {'.'.join(keys[:i + 1])}=..., which sets "
                              "that section to a single value")
    last = keys[-1]
    if last in node and node[last] != value:
        what = "a section" if isinstance(node[last], dict) else f"{node[last]!r}"
        raise ConfigError(f"--set {dotted} is given twice (as {what} and as {value!r}); give each key once")
    node[last] = value


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """The overrides of the CLI's `--set KEY=VALUE` options (values read as YAML scalars)."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: the value {text!r} is not valid YAML: {yaml_error(err)}") from None
        set_dotted(overrides, key.strip(), value)
    return overrides
