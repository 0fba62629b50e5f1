"""What both sides of the benchmark share: the settings, the data + SFT checkpoint,
the held-out evaluation, timers, the machine description and the matmul peak.

Every number the report prints is measured by this package in the run that writes
the report; nothing here is a constant taken from elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


# --------------------------------------------------------------------------- settings
@dataclass
class Spec:
    """The settings both sides run with (one source of truth for the comparison)."""

    seed: int = 0
    threads: int = 1                  # torch.set_num_threads for both sides
    group_size: int = 8               # G (TRL num_generations)
    prompts_per_step: int = 64        # B prompts per round (TRL generation batch = B·G)
    minibatch: int = 64               # completions per optimizer step (TRL per_device_train_batch_size)
    max_new_tokens: int = 12          # TRL max_completion_length
    temperature: float = 1.0
    lr: float = 1e-4
    beta: float = 0.04
    eps: float = 0.2                  # ε_low = ε_high (TRL epsilon / epsilon_high)
    loss: str = "token"               # ours grpo.loss_agg; TRL loss_type from TRL_LOSS
    correctness_weight: float = 1.0
    format_weight: float = 0.1
    rounds: int = 24                  # rollout→update rounds per side
    eval_every: int = 4               # held-out evaluation every k rounds (clock paused)
    warmup_rounds: int = 1            # rounds left out of the throughput numbers
    sft_steps: int = 500
    sft_lr: float = 1e-3
    num_train: int = 2000
    num_test: int = 200
    eval_max_new_tokens: int = 12
    extra: dict[str, Any] = field(default_factory=dict)  # ours-only config overrides (documented in the report)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        return cls(**json.loads(text))

    @property
    def rows_per_round(self) -> int:
        return self.group_size * self.prompts_per_step


# Our loss_agg → the TRL loss_type with the same aggregation for one optimizer step
# without gradient accumulation: "token" = Σ tokens / #tokens of the minibatch (TRL
# "bnpo"; TRL "dapo" divides by the generation batch's mean tokens per minibatch
# instead), "sequence" = mean of per-sequence means (TRL "grpo"), "dr_grpo" = dr_grpo.
TRL_LOSS = {"token": "bnpo", "sequence": "grpo", "dr_grpo": "dr_grpo"}


def ours_config(spec: Spec):
    """The kfp-grpo Config equal to `spec` (the embedded tiny.yaml plus overrides).

    Every setting the comparison depends on is pinned here, so edits to tiny.yaml do not
    change what is compared.
    """
    from components.config import _deep_merge, load_config

    over = {
        "seed": spec.seed,
        "torch_threads": spec.threads,
        "data": {"num_train": spec.num_train, "num_test": spec.num_test},
        "sft": {"steps": spec.sft_steps, "lr": spec.sft_lr, "batch_size": 32, "warmup_steps": 10, "max_length": 64},
        "reward": {"rm_weight": 0.0, "correctness_weight": spec.correctness_weight,
                   "format_weight": spec.format_weight},
        "rollout": {"group_size": spec.group_size, "prompts_per_step": spec.prompts_per_step,
                    "max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature, "top_p": 1.0,
                    "temperature_range": None, "backend": "hf", "shards": 1,
                    "generation_batch_size": spec.rows_per_round},
        "grpo": {"beta": spec.beta, "eps_low": spec.eps, "eps_high": spec.eps, "loss_agg": spec.loss,
                 "advantage": {"scale": "group", "std": "sample", "eps": 1e-4},
                 "epochs": 1, "minibatch_size": spec.minibatch, "lr": spec.lr, "weight_decay": 0.0,
                 "max_grad_norm": 1.0, "reference": "sft", "warmup_steps": 0, "importance_sampling_cap": None,
                 "max_kl": None, "max_clip_fraction": None},
        "evaluation": {"max_new_tokens": spec.eval_max_new_tokens},
    }
    return load_config(None, _deep_merge(over, spec.extra))


def setup_torch(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


# --------------------------------------------------------------------------- data + SFT
def prepare(spec: Spec, cache: Path | None = None) -> dict[str, str]:
    """Data splits and the SFT checkpoint both sides start from (cached by settings)."""
    cfg = ours_config(spec)
    key = json.dumps({"data": cfg.data.model_dump(mode="json"), "sft": cfg.sft.model_dump(mode="json"),
                      "model": cfg.model.model_dump(mode="json"), "seed": cfg.seed,
                      "threads": spec.threads}, sort_keys=True)
    cache = cache or RESULTS / "cache" / hashlib.sha256(key.encode()).hexdigest()[:12]
    paths = {"train": str(cache / "train.parquet"), "test": str(cache / "test.parquet"), "sft": str(cache / "sft")}
    meta = cache / "sft.json"
    if meta.exists() and Path(paths["sft"], "config.json").exists():
        return {**paths, **json.loads(meta.read_text())}
    from components import prepare_data, sft

    setup_torch(spec.threads)
    cache.mkdir(parents=True, exist_ok=True)
    prepare_data.run(cfg, paths["train"], paths["test"])
    start = time.perf_counter()
    sft.run(cfg, paths["train"], paths["sft"])
    seconds = time.perf_counter() - start
    from components.modeling import load_policy
    import pandas as pd

    model, tok = load_policy(paths["sft"], cfg.model)
    acc = heldout_accuracy(model, tok, pd.read_parquet(paths["test"]), spec.eval_max_new_tokens)
    info = {"sft_seconds": round(seconds, 1), "sft_accuracy": acc}
    meta.write_text(json.dumps(info))
    return {**paths, **info}


def heldout_accuracy(model, tok, test, max_new_tokens: int) -> float:
    """Greedy pass@1 on the held-out prompts, the same code for both sides (as evaluate.run)."""
    from components.generation import HFBackend
    from components.sampling import Sampling
    from components.modeling import chat_prompt
    from components.rewards import is_correct

    was_training = model.training
    backend = HFBackend(model, tok, batch_size=256)
    texts = [chat_prompt(tok, p) for p in test.prompt]
    gens = backend.generate(texts, Sampling(n=1, temperatures=[0.0], max_new_tokens=max_new_tokens, greedy=True))
    gens.sort(key=lambda g: g.prompt_index)
    correct = [is_correct(g.text, a) for g, a in zip(gens, test.answer)]
    model.train(was_training)
    return sum(correct) / len(correct)


# --------------------------------------------------------------------------- timers
def cpu_seconds() -> float:
    """CPU time of this process (all threads), user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Phases:
    """Wall and CPU seconds per named phase, accumulated until `take()`."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds() - c
            self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)
        timed.__wrapped__ = fn
        return timed

    def take(self) -> dict[str, dict[str, float]]:
        out = {"wall": dict(self.wall), "cpu": dict(self.cpu), "calls": dict(self.calls)}
        self.wall.clear(), self.cpu.clear(), self.calls.clear()
        return out


# --------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    """CPU model, cores, memory, load, library versions (for the report header)."""
    info: dict[str, Any] = {"host_cores": os.cpu_count(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        models = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        info["avx512"] = "avx512f" in flags
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info["loadavg"] = loadavg()
    import torch
    import transformers

    info["torch"], info["transformers"] = torch.__version__, transformers.__version__
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --------------------------------------------------------------------------- FLOPs
def matmul_peak(threads: int, sizes: tuple[int, ...] = (512, 1024, 2048), seconds: float = 3.0) -> dict[str, Any]:
    """Best fp32 torch.mm throughput (FLOP/s) over square sizes, on `threads` threads (CPU) or the GPU."""
    import torch

    setup_torch(threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    best, best_cpu, per = 0.0, 0.0, {}
    for n in sizes:
        a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
        torch.mm(a, b)  # warm up
        reps, start, cpu0 = 0, time.perf_counter(), cpu_seconds()
        while True:
            torch.mm(a, b)
            reps += 1
            if dev == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / len(sizes):
                break
        flops = 2 * n**3 * reps / elapsed
        per[n] = flops
        best = max(best, flops)
        best_cpu = max(best_cpu, 2 * n**3 * reps / max(cpu_seconds() - cpu0, 1e-9))
    # per CPU-second: what one thread does while it runs, whatever else shares the machine
    return {"peak_flops": best, "peak_flops_cpu": best_cpu, "by_size": per, "device": dev, "threads": threads}


def param_count(model) -> int:
    """Parameters (tied embedding/LM head counted once: it is the LM head matmul)."""
    return sum(p.numel() for p in model.parameters())


def update_flops(n_params: int, train_tokens: int, nograd_tokens: int) -> float:
    """6·N·T for the trained forward+backward plus 2·N·T for each no-grad forward (π_old, π_ref)."""
    return 6.0 * n_params * train_tokens + 2.0 * n_params * nograd_tokens


def write_json(obj: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    tmp.replace(path)


def fresh_dir(path: str | Path) -> Path:
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
