"""What every benchmark shares: the settings (read from the default config at run time), the
data + SFT checkpoint, the held-out evaluation, the per-round bookkeeping of both sides
(kfp-grpo and TRL), timers, the machine description with library versions, and the
matmul peak.

Every number a report prints is measured by this package in the run that writes the
report; nothing here is a constant taken from elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
PHASES = ("generate", "score", "logprobs", "train", "io")
LIBRARIES = ("torch", "transformers", "trl", "kfp", "mlflow", "pandas", "numpy", "pyarrow")

# `--smoke`: a setting in which every part of a benchmark runs in seconds (tests/test_benchmarks.py)
SMOKE = {
    "data": {"num_train": 64, "num_test": 16},
    "sft": {"steps": 5, "batch_size": 8},
    "reward_model": {"steps": 2, "batch_size": 8},
    "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 8},
    "grpo": {"minibatch_size": 8, "warmup_steps": 0},
    "replay": {"steps": 2, "batch_size": 8},
    "evaluation": {"max_new_tokens": 8},
    "loop": {"iterations": 1, "steps_per_iteration": 2},
}

# What kfp-grpo must change in the default for the side-by-side run with TRL: TRL has no reward
# model here (the verifier + format rewards only), one sampler, one process, TRL's advantage
# (Bessel std + 1e-4) and no abort limits. Each change of a default value is listed in the report.
COMPARISON = {
    "reward": {"rm_weight": 0.0},
    "rollout": {"backend": "hf", "shards": 1, "temperature_range": None},
    "grpo": {"advantage": {"std": "sample", "eps": 1e-4}, "importance_sampling_cap": None, "max_kl": None,
             "max_clip_fraction": None, "gradient_checkpointing": False, "nproc_per_node": 1, "nodes": 1},
}

# kfp-grpo's grpo.loss_agg → the TRL loss_type with the same aggregation of one optimizer step without
# gradient accumulation: "sequence" = mean of per-completion means (TRL "grpo"), "token" = Σ tokens /
# #tokens of the minibatch (TRL "bnpo"), "dr_grpo" = Σ tokens / (#completions · max length).
TRL_LOSS = {"sequence": "grpo", "token": "bnpo", "dr_grpo": "dr_grpo"}


# --------------------------------------------------------------------------- settings
def parse_sets(items: list[str]) -> dict[str, Any]:
    """`["grpo.beta=0.02", ...]` (the CLI's --set) → a nested overrides dict."""
    import yaml

    from components.config import ConfigError, set_dotted

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        set_dotted(overrides, key, yaml.safe_load(value))
    return overrides


def default_config(overrides: dict[str, Any] | None = None, smoke: bool = False):
    """The embedded default config (as `kfp-grpo run` loads it now), plus `overrides` (and SMOKE)."""
    from components.config import _deep_merge, load_config

    return load_config(None, _deep_merge(SMOKE, overrides or {}) if smoke else overrides)


def comparison_config(cfg) -> tuple[Any, list[str]]:
    """`cfg` with COMPARISON applied, and one line per value that changed ("key: old → new")."""
    from components.config import _deep_merge, parse_config

    before = cfg.model_dump(mode="json")
    after = parse_config(_deep_merge(before, COMPARISON), "comparison config")
    changes: list[str] = []

    def diff(a: dict, b: dict, prefix: str = "") -> None:
        for k, v in b.items():
            if isinstance(v, dict):
                diff(a.get(k, {}), v, f"{prefix}{k}.")
            elif a.get(k) != v:
                changes.append(f"{prefix}{k}: {a.get(k)} → {v}")

    diff(before, after.model_dump(mode="json"))
    return after, changes


@dataclass
class Spec:
    """One side-by-side run: the kfp-grpo config both sides follow, and the benchmark's own knobs."""

    config: str                    # canonical JSON of the kfp-grpo Config (comparison_config applied)
    rounds: int                    # rollout→update rounds per side (one TRL generation batch each)
    eval_every: int = 1            # held-out evaluation every k rounds, clock paused (0: never)
    warmup_rounds: int = 1         # rounds left out of the throughput numbers
    changes: list[str] = field(default_factory=list)  # what comparison_config changed in the default

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        return cls(**json.loads(text))

    @property
    def cfg(self):
        from components.config import config_from_json

        return config_from_json(self.config)

    def settings(self) -> dict[str, Any]:
        """The settings both sides run with, by name (for the reports)."""
        c = self.cfg
        g, r = c.grpo, c.rollout
        rows = r.group_size * r.prompts_per_step
        return {"seed": c.seed, "threads": c.torch_threads, "G": r.group_size, "prompts_per_step": r.prompts_per_step,
                "completions_per_step": rows, "minibatch": g.minibatch_size,
                "optimizer_steps_per_step": g.epochs * (rows // g.minibatch_size), "epochs": g.epochs,
                "lr": g.lr, "warmup_steps": g.warmup_steps, "weight_decay": g.weight_decay,
                "max_grad_norm": g.max_grad_norm, "beta": g.beta, "eps_low": g.eps_low, "eps_high": g.eps_high,
                "loss_agg": g.loss_agg, "trl_loss_type": TRL_LOSS[g.loss_agg], "reference": g.reference,
                "max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p,
                "correctness_weight": c.reward.correctness_weight, "format_weight": c.reward.format_weight,
                "advantage": c.grpo.advantage.model_dump(mode="json"), "dtype": c.model.dtype,
                "rounds": self.rounds, "steps_per_iteration": c.loop.steps_per_iteration,
                "num_train": c.data.num_train, "num_test": c.data.num_test, "sft_steps": c.sft.steps,
                "config_hash": c.hash()}


def setup_torch(threads: int | None) -> None:
    """Threads for this process (the config's torch_threads; None: torch's default); quiet HF logs."""
    import torch

    from components.stage_cli import quiet_hf

    quiet_hf()

    if threads:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


# --------------------------------------------------------------------------- data + SFT
def cache_root() -> Path:
    """Where SFT checkpoints are cached: $KFP_GRPO_BENCH_CACHE, else benchmarks/results/cache."""
    return Path(os.environ.get("KFP_GRPO_BENCH_CACHE") or RESULTS / "cache")


def prepare(cfg, cache: Path | None = None) -> dict[str, Any]:
    """Data splits and the SFT checkpoint both sides start from, made by the pipeline's own stages
    (seeded as a pipeline task is) and cached by the settings and the code (components/) they depend on."""
    code = hashlib.sha256(b"".join(f.read_bytes() for f in sorted((ROOT.parent / "components").glob("*.py"))))
    key = json.dumps({"data": cfg.data.model_dump(mode="json"), "sft": cfg.sft.model_dump(mode="json"),
                      "model": cfg.model.model_dump(mode="json"), "seed": cfg.seed,
                      "threads": cfg.torch_threads, "code": code.hexdigest()}, sort_keys=True)
    cache = cache or cache_root() / hashlib.sha256(key.encode()).hexdigest()[:12]
    paths = {"train": str(cache / "train.parquet"), "test": str(cache / "test.parquet"), "sft": str(cache / "sft")}
    meta = cache / "sft.json"
    if meta.exists() and Path(paths["sft"], "config.json").exists():
        return {**paths, **json.loads(meta.read_text())}
    import pandas as pd

    from components import prepare_data, sft
    from components.modeling import load_policy
    from pipelines.runtime import seed_everything

    setup_torch(cfg.torch_threads)
    cache.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    prepare_data.run(cfg, paths["train"], paths["test"])
    seed_everything(cfg.seed)
    start = time.perf_counter()
    sft.run(cfg, paths["train"], paths["sft"])
    seconds = time.perf_counter() - start
    model, tok = load_policy(paths["sft"], cfg.model)
    accuracy = heldout_accuracy(model, tok, pd.read_parquet(paths["test"]), cfg)
    info = {"sft_seconds": round(seconds, 1), "sft_accuracy": accuracy}
    meta.write_text(json.dumps(info))
    return {**paths, **info}


def heldout_accuracy(model, tok, test, cfg) -> float:
    """Greedy pass@1 on the held-out prompts — what the evaluate stage computes, the same code for both sides."""
    from components.generation import HFBackend
    from components.sampling import Sampling
    from components.modeling import chat_prompt
    from components.rewards import is_correct

    was_training = model.training
    backend = HFBackend(model, tok, batch_size=cfg.evaluation.batch_size)
    texts = [chat_prompt(tok, p, cfg.data.system_prompt) for p in test.prompt]
    gens = backend.generate(texts, Sampling(n=1, temperatures=[0.0], max_new_tokens=cfg.evaluation.max_new_tokens,
                                            greedy=True, seed=cfg.seed))
    gens.sort(key=lambda g: g.prompt_index)
    correct = [is_correct(g.text, a) for g, a in zip(gens, test.answer)]
    model.train(was_training)
    return sum(correct) / len(correct)


# --------------------------------------------------------------------------- timers
def cpu_seconds() -> float:
    """CPU time of this process (all threads), user + system — the clock the stages' PhaseClock uses."""
    return time.process_time()


def children_cpu_seconds() -> float:
    """CPU time of this process's finished child processes (and theirs), user + system."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Phases:
    """Wall and CPU seconds per named phase, accumulated until `take()` (the TRL side's timers)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds() - c

    def take(self) -> dict[str, dict[str, float]]:
        out = {"wall": dict(self.wall), "cpu": dict(self.cpu)}
        self.wall.clear(), self.cpu.clear()
        return out


# --------------------------------------------------------------------------- per-round bookkeeping
class SideLog:
    """What each side (kfp-grpo, TRL) records: one entry per round, and the held-out accuracy curve
    against training wall time (the clock paused while evaluating). Both runners fill it the same way."""

    def __init__(self, side: str, spec: Spec, sft_accuracy: float, previous: dict | None = None) -> None:
        self.side, self.spec = side, spec
        self.rounds: list[dict] = previous["rounds"] if previous else []
        self.curve: list[dict] = previous["curve"] if previous else [{"round": 0, "wall": 0.0, "cpu": 0.0,
                                                                       "accuracy": sft_accuracy}]
        self.loadavg_start = previous["loadavg_start"] if previous else loadavg()

    @property
    def clock(self) -> float:
        """Training wall time so far (evaluations excluded)."""
        return sum(r["wall"] for r in self.rounds)

    def add_round(self, wall: float, cpu: float, phase_wall: dict[str, float], phase_cpu: dict[str, float],
                  tokens: dict[str, int], stats: dict[str, float], evaluate: Callable[[], float],
                  other: bool = True) -> dict:
        """Record one round, then evaluate if due. With `other`, the part of the round its phases do not
        cover is recorded as `other_wall` / `other_cpu` (a side whose last phase is the remainder has none)."""
        r = len(self.rounds) + 1
        rec = {"round": r, "wall": wall, "cpu": cpu, "phase_wall": phase_wall, "phase_cpu": phase_cpu,
               **tokens, **stats}
        if other:
            rec.update(other_wall=wall - sum(phase_wall.values()), other_cpu=cpu - sum(phase_cpu.values()))
        self.rounds.append(rec)
        print(f"[bench {self.side}] round {r}/{self.spec.rounds}: {wall:.2f}s ("
              + ", ".join(f"{p} {v:.2f}" for p, v in phase_wall.items()) + ")", flush=True)
        every = self.spec.eval_every
        if every and (r % every == 0 or r == self.spec.rounds):
            acc = evaluate()
            self.curve.append({"round": r, "wall": self.clock, "cpu": sum(x["cpu"] for x in self.rounds),
                               "accuracy": acc})
            print(f"[bench {self.side}] held-out accuracy after {r} rounds ({self.clock:.1f}s): {acc:.3f}",
                  flush=True)
        return rec

    def result(self, **extra: Any) -> dict:
        return {"side": self.side, "rounds": self.rounds, "curve": self.curve, "loadavg_start": self.loadavg_start,
                "loadavg_end": loadavg(), "versions": versions(), **extra}


def run_side(module: str, spec: Spec, paths: dict, out: Path, work: Path, until: int | None = None) -> dict:
    """Run one side (`benchmarks.ours` / `benchmarks.trl_runner`) in a fresh Python process; its result."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", module, "--spec", spec.to_json(), "--paths", json.dumps(paths),
           "--out", str(out), "--work", str(work)] + (["--until", str(until)] if until else [])
    print(f"[bench] {module}: rounds up to {until or spec.rounds} of {spec.rounds}", flush=True)
    subprocess.run(cmd, check=True, env=child_env(), cwd=str(ROOT.parent))
    return json.loads(out.read_text())


def side_main(run: Callable[..., dict], with_until: bool = False) -> None:
    """The command line of a side runner: --spec --paths --out --work [--until]."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--paths", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    if with_until:
        p.add_argument("--until", type=int, help="stop after this many rounds (continue later with the same --out)")
    a = p.parse_args()
    extra = {"until": a.until} if with_until else {}
    run(Spec.from_json(a.spec), json.loads(a.paths), a.out, a.work, **extra)


def child_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (child processes import this checkout)."""
    env = dict(os.environ)
    root = str(ROOT.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# --------------------------------------------------------------------------- statistics
def spread(values: list[float]) -> dict[str, float | int | None]:
    """mean, sample std (None for one value), min, max and n of `values`."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def accuracy_at(curve: list[dict], t: float) -> float:
    """Accuracy of the last evaluation at or before training wall time `t`."""
    return [p for p in curve if p["wall"] <= t + 1e-9][-1]["accuracy"]


# --------------------------------------------------------------------------- machine
def versions() -> dict[str, str | None]:
    """Python and the versions of the libraries the numbers depend on (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_version() -> str | None:
    """The checkout's commit (short hash, "+dirty" with uncommitted changes), None outside git."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def cores_available() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, load, GPU and library versions (recorded in every results file)."""
    info: dict[str, Any] = {"host_cores": os.cpu_count(), "cores_available": cores_available(),
                            "python": platform.python_version()}
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
    info["commit"] = code_version()
    info["versions"] = versions()
    info["torch"], info["transformers"], info["trl"] = (info["versions"][k] for k in ("torch", "transformers", "trl"))
    import torch

    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def machine_line(m: dict[str, Any], loadavg_end: list[float] | None = None) -> str:
    """The machine and library versions as one Markdown paragraph (every report starts with it)."""
    v = m.get("versions", {})
    return (f"Machine: {m.get('cpu')}, {m.get('cores_available')} cores available ({m.get('host_cores')} on the "
            f"host), {m.get('mem_gib')} GiB" + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
            + f"; load average at start {m.get('loadavg')}" + (f", at end {loadavg_end}" if loadavg_end else "")
            + f". Code: kfp-grpo {m.get('commit')}. Versions: " + ", ".join(f"{k} {val}" for k, val in v.items())
            + ".")


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --------------------------------------------------------------------------- FLOPs
def matmul_peak(threads: int | None, sizes: tuple[int, ...] = (512, 1024, 2048),
                seconds: float = 3.0) -> dict[str, Any]:
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
    return {"peak_flops": best, "peak_flops_cpu": best_cpu, "by_size": per, "device": dev,
            "threads": torch.get_num_threads()}


def param_count(model) -> int:
    """Parameters (tied embedding/LM head counted once: it is the LM head matmul)."""
    return sum(p.numel() for p in model.parameters())


def update_flops(n_params: int, tokens: int, reference_pass: bool) -> float:
    """Model FLOPs of the update's algorithm (as in MFU): 6·N·T for the trained forward + backward, plus
    2·N·T for the π_ref forward when β > 0. Passes an implementation may add or skip (recomputing π_old)
    are not counted, so both sides are credited the same work for the same tokens."""
    return (6.0 + (2.0 if reference_pass else 0.0)) * n_params * tokens


# --------------------------------------------------------------------------- files
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


def publish(markdown: str, section: str, plots: list[Path]) -> Path:
    """Put a report into benchmarks/RESULTS.md, between `<!-- section:begin -->` and `<!-- section:end -->`
    (appended when absent), one heading level down, with its plots copied to benchmarks/plots/ (links rewritten)."""
    import re

    target = ROOT / "RESULTS.md"
    markdown = re.sub(r"^#", "##", markdown, flags=re.M)
    (ROOT / "plots").mkdir(exist_ok=True)
    for p in plots:
        shutil.copy(p, ROOT / "plots" / p.name)
        markdown = markdown.replace(f"]({p.name})", f"](plots/{p.name})")
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = target.read_text() if target.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    target.write_text(text)
    return target
