"""Rollout tokens/s with vLLM vs `transformers.generate`, and GRPO update tokens/s, on this machine.

    python -m benchmarks.gpu_throughput                     # on a GPU: builds the model below, hf + vllm
    python -m benchmarks.gpu_throughput --policy DIR        # a standard HF model directory instead
    python -m benchmarks.gpu_throughput --shape tiny --prompts 8 --max-new-tokens 16   # CPU smoke run

It runs the project's own stages in process, as the pipeline calls them:
`components.rollout.run` once per backend (the same prompts, G, max tokens, temperature and
seed; a first round warms the backend up and is not reported), then
`components.grpo_update.run` on the HF backend's rollouts. The numbers are the stages'
own `rollout/tokens_per_s` (completion tokens / generate seconds) and
`update/tokens_per_s` (completion tokens / update-loop seconds), printed as a table and
written with the device, date and settings to
`benchmarks/results/gpu-<date>/gpu_throughput.json`.

No model can be downloaded on the machines this project is measured on, so by default the
model is built offline: a Llama with the Qwen2.5-0.5B trunk sizes (hidden 896, 24 layers,
14 heads, MLP 4864; full multi-head attention, ~0.39B parameters) and the project's
character vocabulary, random weights. Throughput does not depend on what the weights
learned; completion lengths do (a random model stops at EOS by chance), so the table
reports the mean completion length next to each number. A backend that cannot run here
(vLLM without CUDA or without the `gpu` extra) is listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, fresh_dir, machine, param_count, write_json

SHAPES: dict[str, dict[str, int]] = {
    "qwen0.5b-trunk": {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "intermediate_size": 4864,
                       "max_position_embeddings": 2048},
    "tiny": {},  # the embedded default's shape (components.config.TinyModelConfig)
}


def config(args: argparse.Namespace, policy: str, backend: str):
    """The run's Config: the embedded defaults with this benchmark's settings."""
    from components.config import load_config

    return load_config(None, {
        "seed": 0,
        "model": {"policy": policy, "dtype": args.dtype},
        "data": {"num_train": max(args.prompts * 4, 64), "num_test": 16},
        "reward": {"rm_weight": 0.0},
        "rollout": {"backend": backend, "prompts_per_step": args.prompts, "group_size": args.group,
                    "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0,
                    "temperature_range": None, "generation_batch_size": args.generation_batch,
                    "vllm": {"dtype": args.vllm_dtype, "gpu_memory_utilization": args.gpu_memory_utilization}},
        "grpo": {"minibatch_size": args.minibatch, "epochs": 1, "beta": 0.04, "warmup_steps": 0,
                 "max_kl": None, "max_clip_fraction": None},
    })


def build_policy(shape: str, out: Path, dtype: str) -> Path:
    """A random-weight Llama of `shape` with the project's character tokenizer, saved as an HF directory."""
    from components.config import TinyModelConfig
    from components.modeling import DTYPES, build_tiny_model, build_tiny_tokenizer, save_model

    tok = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(**SHAPES[shape]), tok, seed=0).to(DTYPES[dtype])
    save_model(model, tok, out)
    return out


def backend_unavailable(name: str) -> str | None:
    """Why `name` cannot run on this machine, or None."""
    import torch

    if name != "vllm":
        return None
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU (none here)"
    from components.vllm_backend import VLLMUnavailableError, import_vllm

    try:
        import_vllm()
    except VLLMUnavailableError as err:
        return str(err)
    return None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd
    import torch

    from components import grpo_update, prepare_data, rollout
    from components.modeling import load_policy

    work = fresh_dir(args.work)
    policy = Path(args.policy) if args.policy else build_policy(args.shape, work / "policy", args.dtype)
    n_params = param_count(load_policy(str(policy))[0])
    train, test = work / "train.parquet", work / "test.parquet"
    prepare_data.run(config(args, str(policy), "hf"), str(train), str(test))

    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(), "machine": machine(), "policy": str(policy) if args.policy else
        f"built offline: {args.shape} shape, random weights", "parameters": n_params,
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")}, "rollout": {}, "update": None,
    }
    for name in args.backends:
        why = backend_unavailable(name)
        if why:
            result["rollout"][name] = {"skipped": why}
            print(f"[gpu_throughput] rollout {name}: skipped ({why})", flush=True)
            continue
        cfg = config(args, str(policy), name)
        runs = []
        for step in range(args.repeats + 1):  # step 0 warms the backend up (CUDA init, kernels, graphs)
            out = work / f"rollouts-{name}-{step}.parquet"
            metrics = rollout.run(cfg, str(train), str(policy), None, str(out), step=step)
            lengths = pd.read_parquet(out, columns=["completion_ids"]).completion_ids.map(len)
            runs.append({"tokens_per_s": metrics["rollout/tokens_per_s"], "completions": int(len(lengths)),
                         "completion_tokens_mean": float(lengths.mean()), "path": str(out)})
            gc.collect()  # the stage's engine / model goes before the next one is built
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        result["rollout"][name] = {"runs": runs[1:], "tokens_per_s": max(r["tokens_per_s"] for r in runs[1:])}

    hf_runs = result["rollout"].get("hf", {}).get("runs")
    if hf_runs:
        cfg = config(args, str(policy), "hf")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        metrics = grpo_update.run(cfg, [hf_runs[-1]["path"]], str(policy), None, str(work / "updated"), step=1)
        result["update"] = {
            "tokens_per_s": metrics["update/tokens_per_s"], "optimizer_steps": metrics["update/optimizer_steps"],
            "stage_seconds": time.perf_counter() - start,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }
    return result


def markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    device = m.get("gpu") or f"CPU: {m.get('cpu')} ({m.get('host_cores')} cores)"
    lines = [f"Measured {res['date']} on {device}; torch {m['torch']}, transformers {m['transformers']}.",
             f"Model: {res['policy']}, {res['parameters'] / 1e6:.1f}M parameters, dtype {s['dtype']} "
             f"(vLLM dtype {s['vllm_dtype']}). {s['prompts']} prompts × G={s['group']}, up to "
             f"{s['max_new_tokens']} new tokens, temperature 1; best of {s['repeats']} rounds after a warm-up.", "",
             "| stage | backend | completion tokens/s | mean completion length |", "|---|---|---:|---:|"]
    for name, r in res["rollout"].items():
        if "skipped" in r:
            lines.append(f"| rollout | {name} | skipped: {r['skipped']} | |")
        else:
            best = max(r["runs"], key=lambda x: x["tokens_per_s"])
            lines.append(f"| rollout | {name} | {r['tokens_per_s']:.0f} | {best['completion_tokens_mean']:.1f} |")
    if res["update"]:
        u = res["update"]
        mem = f", peak GPU memory {u['peak_gpu_gib']:.1f} GiB" if u["peak_gpu_gib"] is not None else ""
        lines.append(f"| GRPO update ({u['optimizer_steps']} optimizer steps{mem}) | — | {u['tokens_per_s']:.0f} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--policy", help="an HF model directory (default: build one offline, --shape)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen0.5b-trunk")
    p.add_argument("--backends", type=lambda v: v.split(","), default=["hf", "vllm"], help="comma-separated")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--generation-batch", type=int, default=512, help="HF backend: sequences per generate() call")
    p.add_argument("--minibatch", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the trainer's weights")
    p.add_argument("--vllm-dtype", default="bfloat16")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="vLLM's share of the GPU")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", default=str(RESULTS / "gpu-work"))
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/gpu-<date>)")
    args = p.parse_args(argv)
    res = measure(args)
    out = Path(args.out or RESULTS / f"gpu-{res['date']}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(res, out / "gpu_throughput.json")
    table = markdown(res)
    (out / "gpu_throughput.md").write_text(table)
    print(table)
    print(f"[gpu_throughput] wrote {out / 'gpu_throughput.json'} and gpu_throughput.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
