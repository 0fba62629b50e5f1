"""The one config schema of kfp-grpo.

It drives the CLI, every stage and the pipeline. Unknown keys and bad values are
errors whose message names the key's path (``grpo.beta: Input should be greater than
or equal to 0``). Load a YAML file with :func:`load_config`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
        return self


# --------------------------------------------------------------------------- stages
class SFTConfig(_Strict):
    steps: int = Field(200, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    max_length: int = Field(64, ge=8)
    with_reasoning: bool = Field(False, description="train on '<think>solution</think>' when the data has one")


class RewardModelConfig(_Strict):
    """Reward model r_φ: a scalar head on the SFT policy's backbone."""

    objective: Literal["pairwise", "pointwise"] = "pairwise"
    steps: int = Field(150, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    max_length: int = Field(64, ge=8)
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    negatives_per_prompt: int = Field(1, ge=1)
    policy_samples: int = Field(0, ge=0, description="completions sampled per prompt from the SFT policy and "
                                                     "labelled by the verifier, added to the synthetic data "
                                                     "(0: synthetic correct vs wrong answers only)")
    sample_prompts: int = Field(1000, ge=1, description="training prompts the policy samples are drawn for")


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
    group_size: int = Field(8, ge=2, description="G: samples per prompt")
    prompts_per_step: int = Field(64, ge=1, description="B: prompts per rollout round")
    max_new_tokens: int = Field(16, gt=0)
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
    minibatch_size: int = Field(64, ge=1, description="outputs per optimizer step")
    lr: float = Field(1e-6, gt=0)
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
    lr: float = Field(5e-4, gt=0)


class EvalConfig(_Strict):
    max_new_tokens: int = Field(16, gt=0)
    maj_k: int = Field(0, ge=0, description="k for maj@k (0 = only greedy pass@1)")
    maj_temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(256, ge=1)


class PromoteConfig(_Strict):
    model_prefix: str = Field("kfp-grpo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    margin: float = Field(0.0, ge=0, description="accuracy a challenger must add to the champion's")


class LoopConfig(_Strict):
    iterations: int = Field(2, ge=1, le=50, description="I: outer iterations")
    steps_per_iteration: int = Field(3, ge=1, le=50, description="M: rollout→update rounds per iteration")


class TrackingConfig(_Strict):
    tracking_uri: str | None = Field(None, description="null: $MLFLOW_TRACKING_URI, else the embedded store")
    experiment: str = "kfp-grpo"

    @model_validator(mode="after")
    def _no_credentials(self) -> "TrackingConfig":
        from urllib.parse import urlsplit

        if self.tracking_uri and "://" in self.tracking_uri and urlsplit(self.tracking_uri).password:
            raise ValueError("tracking_uri must not contain a password (it would be compiled into the pipeline); "
                             "use MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD from a Kubernetes Secret")
        return self


# --------------------------------------------------------------------------- cluster
class Toleration(_Strict):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class StageResources(_Strict):
    """Where and how one stage runs on a cluster (ignored by local runs)."""

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
    seed: int = 0
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
        node[last] = yaml.safe_load(value) if isinstance(value, str) and last != "loss_agg" else value
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


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a YAML config; None means the embedded default (tiny.yaml)."""
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
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


def set_dotted(overrides: dict[str, Any], dotted: str, value: Any) -> None:
    """`set_dotted(d, "grpo.beta", 0.1)` → d["grpo"]["beta"] = 0.1 (CLI --set)."""
    keys = dotted.split(".")
    node = overrides
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
